"""Fake-quant fusion on QDQ models: opc's runtime with activation QuantizeLinear ->
DequantizeLinear pairs as two steps (``Session(fuse_qdq=False)``) and as one fused step, and
ONNX Runtime, in one process, interleaved call by call; CPU time of the calling thread, one
thread everywhere (BLAS, ORT). The QDQ models are opc's ``fold,quantize`` of the digits CNN
(shipped calibration data) and of zoo models (calibrated on 8 seeded normal samples).

    python -m benchmarks.runtime_qdq [--models digits-cnn resnet18 mobilenetv2] [--repeats 20]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import bench_args, digits_assets, report, zoo_model


def _quantized(name: str, folder: Path):
    import onnx

    import opc

    if name == "digits-cnn":
        a = digits_assets()
        return opc.compile(a["model"], passes="fold,quantize", calibration=a["calib"])[0]
    path = zoo_model(name)
    m = onnx.load(str(path))
    inp = m.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim][1:]
    calib = folder / f"{name}-calib.npz"
    np.savez(calib, **{inp.name: np.random.default_rng(0).standard_normal([8] + shape).astype(np.float32)})
    return opc.compile(path, passes="fold,quantize", calibration=calib)[0]


def _cpu(fn) -> float:
    t = time.thread_time()
    fn()
    return (time.thread_time() - t) * 1e3


def main(argv=None):
    args = bench_args(__doc__.splitlines()[0], ["digits-cnn", "resnet18", "mobilenetv2"], argv,
                      extra=lambda p: p.add_argument("--batches", type=int, nargs="*", default=[1, 32]))
    from threadpoolctl import threadpool_limits

    import opc.runtime as rt
    from opc.ort import make_session, seeded_feeds

    rows = []
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(1):
        for name in args.models:
            q = _quantized(name, Path(tmp))
            fused = rt.Session(q, backend="numpy", threads=1)
            plain = rt.Session(q, backend="numpy", threads=1, fuse_qdq=False)
            ort = make_session(q, threads=1)
            inp = fused.get_inputs()[0]
            for batch in args.batches:
                shape = (batch,) + tuple(d if isinstance(d, int) else 1 for d in inp.shape[1:])
                feeds = seeded_feeds(q, {inp.name: shape}, seed=batch)
                a, b = fused.run(None, feeds)[0], plain.run(None, feeds)[0]  # shapes, arena
                same = bool(np.array_equal(a, b))
                times = {"plain": [], "fused": [], "ort": []}
                for _ in range(args.repeats):
                    times["plain"].append(_cpu(lambda: plain.run(None, feeds)))
                    times["fused"].append(_cpu(lambda: fused.run(None, feeds)))
                    times["ort"].append(_cpu(lambda: ort.run(None, feeds)))
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append({"model": name, "batch": batch, "QDQ pairs fused": fused.program.fused_qdq,
                             "two-step ms": med["plain"], "fused ms": med["fused"],
                             "speedup": med["plain"] / med["fused"], "ORT ms": med["ort"],
                             "two-step/ORT": med["plain"] / med["ort"], "fused/ORT": med["fused"] / med["ort"],
                             "bit-identical": same})
                print(rows[-1], flush=True)
    report("runtime_qdq", rows, title="runtime: fake-quant fusion on QDQ models", threads=1,
           settings={"repeats": args.repeats, "clock": "thread CPU time", "threads": 1},
           write_json=not args.no_json)


if __name__ == "__main__":
    main()
