"""`opc demo`: the whole pipeline on the bundled digits CNN, checked in ONNX Runtime.

The model, its calibration samples and its held-out evaluation split ship inside the
package (compiler/data), so the demo needs neither torch nor a download.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from opc.errors import VerificationError

DEMO_PIPELINE = "fold,quantize,plan"
MAX_TOP1_DROP = 0.01  # the demo fails if int8 top-1 drops more than one point


def data_path(name: str) -> Path:
    return Path(str(resources.files("opc") / "data" / name))


def top1(model, inputs: np.ndarray, labels: np.ndarray) -> float:
    from opc.ort import make_session

    sess = make_session(model, threads=1)
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: inputs})[0]
    return float((logits.argmax(axis=1) == labels).mean())


def run_demo(folder: Path, echo=print, pipeline: str = DEMO_PIPELINE) -> dict:
    import opc
    from opc.cli import print_compile_table, print_pass_lines
    from opc.data import CalibrationData
    from opc.ir import load_model, save_model

    source = load_model(data_path("digits_cnn.onnx"))
    calib = CalibrationData.load(data_path("digits_calib.npz"), source)
    with np.load(data_path("digits_eval.npz")) as ev:
        eval_x, eval_y = ev["input"], ev["labels"]
    echo(f"opc demo: digits CNN ({len(eval_y)} held-out images), pipeline {pipeline}")
    compiled, report = opc.compile(source, pipeline, calibration=calib, verify=True)
    folder.mkdir(parents=True, exist_ok=True)
    out_path = folder / "digits_cnn.opc.onnx"
    save_model(compiled, out_path)
    acc_fp32, acc_out = top1(source, eval_x, eval_y), top1(compiled, eval_x, eval_y)
    summary = {"pipeline": report.pipeline, "top1_fp32": acc_fp32, "top1_compiled": acc_out,
               "output": str(out_path), "report": report.to_json()}
    (folder / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    print_compile_table(report, echo)
    echo("")
    print_pass_lines(report, echo)
    echo("")
    echo(f"top-1 on the held-out split: fp32 {acc_fp32:.2%}, compiled {acc_out:.2%} "
         f"(drop {100 * (acc_fp32 - acc_out):.2f} points, budget {100 * MAX_TOP1_DROP:.1f})")
    if acc_fp32 - acc_out > MAX_TOP1_DROP:
        echo(f"FAILED: wrote {out_path}")
        raise VerificationError(f"{out_path}: top-1 dropped by {100 * (acc_fp32 - acc_out):.2f} points")
    echo(f"PASSED: wrote {out_path} and {folder / 'report.json'}")
    return summary
