"""benchmarks/common.py: the helpers every benchmark's table is built from."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from benchmarks import common


def _allocate_mib(mib: int) -> int:
    block = np.ones(mib * 1024 * 1024 // 8)  # touched pages: resident
    return int(block.size)


def _fail() -> None:
    raise ValueError("boom")


def test_machine_description():
    info = common.machine(threads=2)
    assert info["threads"] == 2 and info["logical_cores"] >= 1 and info["usable_cores"] >= 1
    assert info["cpu"] and info["onnxruntime"] and info["onnx"] == onnx.__version__
    line = common.machine_line(info)
    assert "2 ORT thread(s)" in line and info["cpu"] in line


def test_model_statistics(digits_assets):
    from opc.summary import model_summary

    path = digits_assets["model"]
    s = model_summary(onnx.load(str(path)))
    assert common.node_count(path) == s["nodes"] == 12
    assert common.param_count(path) == s["parameters"]
    assert common.file_size(path) == path.stat().st_size
    assert common.model_stats(path) == {"nodes": 12, "parameters": s["parameters"],
                                        "weight_bytes": s["weight_bytes"], "file_bytes": path.stat().st_size}


def test_ort_latency_and_top1(digits_assets):
    lat = common.ort_latency(digits_assets["model"], batch=4, repeats=5, warmup=1, threads=1)
    assert lat["repeats"] == 5 and lat["threads"] == 1
    assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    ev = np.load(digits_assets["eval"])
    acc = common.top1(digits_assets["model"], {"input": ev["input"]}, ev["labels"], batch=50)
    assert 0.97 <= acc <= 1.0


def test_timed_median():
    calls = []
    out = common.timed(lambda: calls.append(1) or len(calls), repeats=3, warmup=1)
    assert out["repeats"] == 3 and len(calls) == 4 and out["result"] == 4
    assert out["min_s"] <= out["median_s"]


def test_peak_rss_measures_the_function_in_a_subprocess():
    small = common.peak_rss(_allocate_mib, 1)
    big = common.peak_rss(_allocate_mib, 200)
    assert big["result"] == 200 * 1024 * 1024 // 8
    assert big["delta_rss_mb"] >= 180 and small["delta_rss_mb"] < 50
    assert big["peak_rss_mb"] >= big["base_rss_mb"] + 180
    with pytest.raises(RuntimeError, match="ValueError: boom"):
        common.peak_rss(_fail)


def test_markdown_table_and_report(tmp_path, monkeypatch):
    rows = [{"model": "a|b", "nodes": 1234, "ratio": 0.5, "ms": None}, {"model": "c", "nodes": 3, "extra": True}]
    table = common.markdown_table(rows)
    assert table.splitlines() == [
        "| model | nodes | ratio | ms | extra |",
        "|---|---:|---:|---:|---:|",
        "| a\\|b | 1,234 | 0.500 | - | - |",
        "| c | 3 | - | - | yes |",
    ]
    assert common.ratio(2.0, 4.0) == 0.5 and common.ratio(1.0, 0) is None
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    lines = []
    path = common.report("demo", rows, columns=["model", "nodes"], settings={"repeats": 3}, threads=1,
                         echo=lines.append)
    assert path == tmp_path / "demo.json"
    payload = json.loads(path.read_text())
    assert payload["rows"][0]["nodes"] == 1234 and payload["columns"] == ["model", "nodes"]
    assert payload["machine"]["threads"] == 1 and payload["settings"] == {"repeats": 3}
    text = "\n".join(lines)
    assert "| model | nodes |" in text and "Machine:" in text and "repeats=3" in text


def test_light_models_and_args():
    paths = common.light_models(["resnet50", "squeezenet"])
    assert [p.name for p in paths] == ["light_resnet50.onnx", "light_squeezenet.onnx"]
    args = common.bench_args("x", default_models=["digits-cnn"], argv=["--quick", "--threads", "2"])
    assert args.quick and args.repeats == 3 and args.threads == 2 and args.models == ["digits-cnn"]


def test_cpu_latency_counts_the_work_run_on_the_calling_thread(digits_assets):
    import time

    from opc.ort import latency_clock

    assert latency_clock(1) is time.thread_time and latency_clock(2) is time.perf_counter
    small = common.ort_cpu_latency(digits_assets["model"], batch=1, repeats=9, warmup=1)
    big = common.ort_cpu_latency(digits_assets["model"], batch=128, repeats=9, warmup=1)
    assert small["clock"] == big["clock"] == "cpu" and small["threads"] == 1
    # the work of the run lands on this thread's CPU clock: 128x the batch costs several times more
    assert 0 < small["median_ms"] and big["median_ms"] > 5 * small["median_ms"]
    with pytest.raises(ValueError, match="threads=1"):
        common.ort_latency(digits_assets["model"], batch=1, threads=2, clock="cpu")


def test_ort_latency_refuses_a_batch_the_model_cannot_take(tmp_path):
    from opc.ir import save_model

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }
    """)
    path = save_model(model, tmp_path / "m.onnx")
    assert common.ort_latency(path, batch=1, repeats=2, warmup=0)["repeats"] == 2
    with pytest.raises(ValueError, match="fixed batch of 1"):
        common.ort_latency(path, batch=32, repeats=2)
