"""opc tune: metrics, the Pareto front, the search strategy (on a synthetic evaluator with
known per-layer errors), the trial runners (serial and a local process pool), and the
real search on the shipped digits CNN: budget met, winner reproduced byte for byte by
compiling its printed pipeline again, every trial logged, exit 3 when the budget is missed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

import opc
from opc.cli import main
from opc.pipeline import canonicalize, parse_pipeline
from opc.trials import ProcessPoolRunner, SerialRunner, Trial, TrialResult
from opc.tune import (Config, _Search, cosine, fallback_order, mse, pareto_front, resolve_metric, structure_key, top1,
                      tune, uniform_configs)


# --- metrics -------------------------------------------------------------------------------
def test_top1_against_labels_and_against_the_float_model():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    ref = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert top1([logits], [ref], np.array([1, 0, 0, 0])) == 0.75
    assert top1([logits], [ref], None) == 0.75  # agreement with the float model's argmax
    assert top1([ref], [ref], None) == 1.0


def test_cosine_and_mse():
    ref = [np.array([[1.0, 0.0], [0.0, 2.0]])]
    assert cosine(ref, ref, None) == pytest.approx(1.0)
    out = [np.array([[0.0, 1.0], [0.0, 2.0]])]  # first sample orthogonal
    assert cosine(out, ref, None) == pytest.approx(0.5)
    # mse relative to the mean square of the reference: ((1+1)/4) / (5/4)
    assert mse(out, ref, None) == pytest.approx(-0.4)
    assert mse(ref, ref, None) == 0.0


def test_custom_metric_module(tmp_path):
    f = tmp_path / "mymetric.py"
    f.write_text("def score(outputs, reference, labels):\n    return float(len(outputs[0]))\n")
    fn = resolve_metric(f"{f}:score")
    assert fn([np.zeros((3, 2))], None, None) == 3.0
    with pytest.raises(opc.OpcError, match="no function"):
        resolve_metric(f"{f}:nope")
    with pytest.raises(opc.OpcError, match="expected top1"):
        resolve_metric("accuracy")


def _r(i, drop, lat, size, phase="improve", error=None):
    return TrialResult(index=i, pipeline=f"p{i}", phase=phase, drop=None if error else drop,
                       latency_ms=lat, size_bytes=size, error=error)


def test_pareto_front_keeps_only_non_dominated_trials():
    rs = [_r(0, 0.0, 5.0, 100, phase="baseline"), _r(1, 0.00, 4.0, 50), _r(2, 0.01, 3.0, 40),
          _r(3, 0.02, 3.5, 30), _r(4, 0.03, 1.0, 20), _r(5, 0.01, 1.0, 60, error="boom"), _r(6, 0.0, 4.0, 50)]
    assert [r.index for r in pareto_front(rs, "latency")] == [1, 2, 4]
    assert [r.index for r in pareto_front(rs, "size")] == [1, 2, 3, 4]


# --- the search strategy on a synthetic evaluator ---------------------------------------------
def _chain_model(names):
    nodes, prev = [], "x"
    for n in names:
        nodes.append(onnx.helper.make_node("Relu", [prev], [n + "_out"], name=n))
        prev = n + "_out"
    graph = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", 1, [1])],
                                   [onnx.helper.make_tensor_value_info(prev, 1, [1])])
    return onnx.helper.make_model(graph)


@dataclass
class FakeTask:
    """Quantizing layer n costs ``costs[n]`` of the metric; each quantized layer saves 1 ms
    and 10 bytes. The sensitivity table reports accumulated SQNR, like the real pass."""

    costs: dict

    def setup(self):
        return self.evaluate

    def evaluate(self, trial: Trial) -> TrialResult:
        passes = parse_pipeline(trial.pipeline)
        q = [p for p in passes if p.name == "quantize"]
        quantized = [n for n in self.costs if q and n not in q[0].exclude]
        if q and q[0].weight_only:  # lossless here, and slower than static quantization
            return TrialResult(index=trial.index, pipeline=trial.pipeline, phase=trial.phase, note=trial.note,
                               metric=1.0, drop=0.0, latency_ms=9.5, size_bytes=80, worker=str(os.getpid()))
        details, acc = {}, 0.0
        if trial.phase in ("sensitivity", "uniform"):
            table = []
            for n in self.costs:
                acc += self.costs[n]
                table.append({"node": n, "op": "Relu", "sqnr_db": -10 * math.log10(acc)})
            details["sensitivity"] = table
        return TrialResult(index=trial.index, pipeline=trial.pipeline, phase=trial.phase, note=trial.note,
                           metric=1.0, drop=round(sum(self.costs[n] for n in quantized), 9),
                           latency_ms=10.0 - len(quantized), size_bytes=100 - 10 * len(quantized),
                           details=details, worker=str(os.getpid()))


def _search(costs, max_drop, trials, objective="latency", runner=None, op="Relu"):
    runner = runner or SerialRunner()
    runner.start(FakeTask(costs))
    model = _chain_model(list(costs))
    for node in model.graph.node:
        node.op_type = op
    s = _Search(runner, model, max_drop=max_drop, trials=trials, objective=objective, seed=0)
    try:
        s.run()
    finally:
        runner.close()
    return s


def test_fallback_order_ranks_by_the_noise_each_layer_adds():
    costs = {"a": 0.003, "b": 0.02, "c": 0.004, "d": 0.01, "e": 0.005}
    acc, table = 0.0, []
    for n, c in costs.items():
        acc += c
        table.append({"node": n, "op": "Relu", "sqnr_db": -10 * math.log10(acc)})
    model = _chain_model(list(costs))
    # the last and the first layer, then by the dB each loses: b 8.8, d 1.4, c 0.7
    assert fallback_order(model, table) == ["e", "a", "b", "d", "c"]
    # without a table: first and last layers, then inwards
    assert fallback_order(model, None) == []  # Relu layers are not compute layers
    conv_model = _chain_model(["a", "b", "c"])
    for node in conv_model.graph.node:
        node.op_type = "MatMul"
    assert fallback_order(conv_model, None) == ["a", "c", "b"]


def test_uniform_quantization_within_budget_needs_no_fallback():
    s = _search({"a": 0.001, "b": 0.002, "c": 0.001}, max_drop=0.01, trials=6)
    phases = [r.phase for r in s.results]
    assert phases[:2] == ["baseline", "sensitivity"]
    assert "fallback" not in phases
    # the uniform configurations are candidates too: other calibrations, bias correction switched
    assert phases[2:6] == ["uniform"] * 4 and phases[6:] == ["improve"]
    assert {r.note for r in s.results[2:6]} == {"calibration=percentile", "calibration=entropy", "calibration=mse",
                                                "bias correction off"}
    best = s.best()
    assert s.meets(best) and best.pipeline == "fold,quantize"  # every layer quantized is fastest here
    assert s.used <= 6


def test_fallback_keeps_the_most_sensitive_layer_in_float():
    s = _search({"a": 0.001, "b": 0.02, "c": 0.001, "d": 0.005, "e": 0.001}, max_drop=0.01, trials=20)
    best = s.best()
    assert s.meets(best)
    assert best.pipeline == "fold,quantize(exclude=[b],sensitivity_samples=0)"
    assert best.drop == pytest.approx(0.008)
    assert "uniform" in [r.phase for r in s.results]  # tried before falling back
    assert s.used <= 20
    # no configuration twice, also not one that differs only in the SQNR table option
    same = [r.pipeline.replace("(sensitivity_samples=0)", "").replace(",sensitivity_samples=0", "")
            for r in s.results]
    assert len(set(same)) == len(same)
    assert "fold,quantize(sensitivity_samples=0)" not in same  # re-quantizing b gives trial 1 again


def test_fallback_bisects_to_the_smallest_float_set():
    # order e, a, b, d, c: k=2 misses, k=4 meets (0.004), k=3 misses (0.014); then the improve
    # phase re-quantizes a (0.007, one more layer quantized, so faster)
    s = _search({"a": 0.003, "b": 0.02, "c": 0.004, "d": 0.01, "e": 0.005}, max_drop=0.01, trials=20)
    best = s.best()
    assert best.pipeline == "fold,quantize(exclude=[b,d,e],sensitivity_samples=0)"
    assert best.drop == pytest.approx(0.007)
    ks = [r.note for r in s.results if r.phase == "fallback"]
    assert ks == ["1 most sensitive in float", "2 most sensitive in float", "4 most sensitive in float",
                  "3 most sensitive in float"]


def test_a_weight_only_config_that_meets_the_budget_does_not_stop_the_fallback():
    s = _search({"a": 0.001, "b": 0.001, "c": 0.02}, max_drop=0.01, trials=20, op="MatMul")
    wo = [r for r in s.results if "weight_only=true" in r.pipeline]
    assert wo and s.meets(wo[0]) and wo[0].phase == "uniform"
    assert any(r.phase == "fallback" for r in s.results)
    assert s.best().pipeline == "fold,quantize(exclude=[c],sensitivity_samples=0)"  # 8 ms beats 9.5 ms


def test_trial_budget_is_respected_and_a_miss_reports_the_closest():
    s = _search({"a": 0.05, "b": 0.05, "c": 0.05}, max_drop=0.01, trials=3)
    assert s.used == 3 and len([r for r in s.results if r.phase != "baseline"]) == 3
    best = s.best()
    assert not s.meets(best)
    assert best.drop == min(r.drop for r in s.results if r.phase != "baseline")


def test_process_pool_search_matches_the_serial_search():
    costs = {"a": 0.003, "b": 0.02, "c": 0.004, "d": 0.01, "e": 0.005}
    serial = _search(costs, max_drop=0.01, trials=12)
    pooled = _search(costs, max_drop=0.01, trials=12, runner=ProcessPoolRunner(2))
    assert pooled.best().pipeline == serial.best().pipeline == "fold,quantize(exclude=[b,d,e],sensitivity_samples=0)"
    # the same decisions in the same order, whichever process finished first
    assert [(r.index, r.pipeline, r.drop) for r in pooled.results if r.phase != "baseline"] == \
        [(r.index, r.pipeline, r.drop) for r in serial.results if r.phase != "baseline"]
    assert str(os.getpid()) not in {r.worker for r in pooled.results}


# --- runners ---------------------------------------------------------------------------------
@dataclass
class FlakyTask:
    def setup(self):
        return self.evaluate

    def evaluate(self, trial):
        import os

        if "bad" in trial.pipeline:
            raise ValueError("no such thing")
        return TrialResult(index=trial.index, pipeline=trial.pipeline, drop=0.0, metric=1.0,
                           worker=str(os.getpid()))


@pytest.mark.parametrize("runner_cls", [SerialRunner, lambda: ProcessPoolRunner(2)])
def test_runners_turn_a_failing_trial_into_an_error_result(runner_cls):
    import os

    runner = runner_cls()
    with runner:
        runner.start(FlakyTask())
        results = sorted(runner.run([Trial(0, "ok"), Trial(1, "bad"), Trial(2, "ok2"), Trial(3, "ok3")]),
                         key=lambda r: r.index)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert results[1].error == "ValueError: no such thing" and not results[1].ok
    assert all(r.ok for r in results if r.index != 1)
    pids = {r.worker for r in results if r.ok}
    if isinstance(runner, ProcessPoolRunner):
        assert str(os.getpid()) not in pids  # ran in the pool's processes
    else:
        assert pids == {str(os.getpid())}


# --- the real search on digits ------------------------------------------------------------------
def test_tune_digits_meets_the_budget_and_reproduces_byte_for_byte(digits_assets, tmp_path):
    log = tmp_path / "trials.jsonl"
    res = tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"], max_drop=0.01, trials=3,
               objective="size", log=log, repeats=5)
    assert res.met and res.best is not None and res.reproduced is True
    assert res.best.drop <= 0.01
    assert res.best.size_bytes < res.baseline.size_bytes / 2  # int8 weights
    assert canonicalize(res.pipeline) == res.pipeline
    assert "quantize" in res.pipeline
    again, _ = opc.compile(str(digits_assets["model"]), passes=res.pipeline, calibration=str(digits_assets["calib"]))
    assert again.SerializeToString(deterministic=True) == res.model.SerializeToString(deterministic=True)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    trials = [x for x in lines if "index" in x]
    assert len(trials) == len(res.results) == 4  # baseline + 3
    for t in trials:
        assert t["error"] is None
        assert {"pipeline", "metric", "drop", "latency_ms", "size_bytes", "time_s"} <= set(t)
        assert t["latency_ms"] > 0 and t["size_bytes"] > 0
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert meta["opc.pipeline"] == res.pipeline
    assert res.baseline.metric == pytest.approx(0.9917, abs=1e-4)  # the shipped model's held-out top-1


def test_cli_tune_with_a_process_pool_and_compile_again(digits_assets, tmp_path):
    out, log, again = tmp_path / "tuned.onnx", tmp_path / "t.jsonl", tmp_path / "again.onnx"
    metric = tmp_path / "margin.py"  # a user metric, imported by path in every worker process
    metric.write_text("import numpy as np\n"
                      "def accuracy(outputs, reference, labels):\n"
                      "    return float(np.mean(outputs[0].argmax(1) == labels))\n")
    rc = main(["tune", str(digits_assets["model"]), "-o", str(out), "--calibration-data", str(digits_assets["calib"]),
               "--eval-data", str(digits_assets["eval"]), "--trials", "4", "--log", str(log), "--workers", "2",
               "--repeats", "5", "--metric", f"{metric}:accuracy", "-q"])
    assert rc == 0 and out.is_file()
    pipeline = {p.key: p.value for p in onnx.load(str(out)).metadata_props}["opc.pipeline"]
    records = [json.loads(x) for x in log.read_text().splitlines()]
    baseline = next(r for r in records if r.get("phase") == "baseline")
    assert baseline["metric"] == pytest.approx(0.9917, abs=1e-4)  # the user metric's value for the float model
    assert f"pid{os.getpid()}" not in {r["worker"] for r in records if "worker" in r}  # ran in the pool
    assert sum(1 for r in records if r.get("phase") not in ("baseline", "final")) == 4
    assert any(r.get("pipeline") == pipeline for r in records)
    rc = main(["compile", str(digits_assets["model"]), "-o", str(again), "--calibration-data",
               str(digits_assets["calib"]), "--passes", pipeline, "-q"])
    assert rc == 0 and again.read_bytes() == out.read_bytes()


def test_cli_tune_budget_missed_writes_the_closest_and_exits_3(digits_assets, tmp_path, capsys):
    out = tmp_path / "closest.onnx"
    rc = main(["tune", str(digits_assets["model"]), "-o", str(out), "--calibration-data", str(digits_assets["calib"]),
               "--eval-data", str(digits_assets["eval"]), "--metric", "cosine", "--max-drop", "0", "--trials", "2",
               "--workers", "1", "--repeats", "3"])
    assert rc == 3 and out.is_file()
    text = capsys.readouterr().out
    assert "FAILED: no configuration met --max-drop 0" in text
    assert "quantize" in {p.key: p.value for p in onnx.load(str(out)).metadata_props}["opc.pipeline"]


@pytest.mark.parametrize("args, message", [
    (["--objective", "speed"], "--objective"),
    (["--max-drop", "-1"], "--max-drop"),
    (["--metric", "nofile.py:f"], "no such file"),
    (["--trials", "0"], "--trials"),
    (["--strategy", "anneal"], "--strategy"),
    (["-o"], "does not exist"),
])
def test_cli_tune_usage_errors(digits_assets, tmp_path, capsys, args, message):
    out = tmp_path / "x.onnx"
    if args == ["-o"]:
        out, args = tmp_path / "missing" / "x.onnx", []
    rc = main(["tune", str(digits_assets["model"]), "-o", str(out), "--calibration-data", str(digits_assets["calib"]),
               "--eval-data", str(digits_assets["eval"])] + args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_eval_data_that_does_not_fit_is_a_one_line_error(digits_assets, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((4, 1, 7, 7), np.float32))
    with pytest.raises(opc.OpcError, match="axis 2 is 7"):
        tune(digits_assets["model"], digits_assets["calib"], bad, trials=1)
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(3, np.int64))
    with pytest.raises(opc.OpcError, match="3 labels for 360"):
        tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"], labels=labels, trials=1)


def test_config_pipeline_is_canonical():
    cfg = Config(exclude=("z", "a"), calibration="percentile", extra=(("smoothquant", True),), table=False)
    text = cfg.pipeline()
    assert text == "fold,quantize(calibration=percentile,exclude=[a,z],smoothquant=true,sensitivity_samples=0)"
    assert canonicalize(text) == text
    pruned = Config(sparsity=0.25, prune_mode="channels").pipeline()
    assert pruned == "fold,prune(sparsity=0.25,mode=channels),quantize"


def test_pool_trials_give_the_same_bytes_as_the_serial_ones(digits_assets):
    """The manager's output is deterministic across processes: a trial compiled in a worker
    has the same sha256 as the same pipeline compiled here."""
    kw = dict(max_drop=0.01, trials=2, objective="size", repeats=3)
    pooled = tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"],
                  runner=ProcessPoolRunner(2), **kw)
    serial = tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"], **kw)
    assert pooled.reproduced is True and serial.reproduced is True
    sha = {r.pipeline: r.sha256 for r in serial.results}
    assert [r.pipeline for r in pooled.results] == [r.pipeline for r in serial.results]
    assert all(r.sha256 == sha[r.pipeline] for r in pooled.results)
    assert f"pid{os.getpid()}" not in {r.worker for r in pooled.results}


def test_interrupt_returns_the_best_so_far(digits_assets):
    seen = []

    def stop_after_two(result, search):
        seen.append(result.index)
        if len(seen) == 2:  # the baseline and the first quantized trial are in
            raise KeyboardInterrupt

    res = tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"], trials=10, repeats=3,
               on_result=stop_after_two)
    assert res.interrupted and len(res.results) == 2
    assert res.best is not None and res.best.pipeline == "fold,quantize" and res.model is not None


def test_latency_winner_is_picked_by_the_final_interleaved_timing(digits_assets, tmp_path):
    from opc.tune import FINAL_TIE

    log = tmp_path / "t.jsonl"
    res = tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"], trials=5, repeats=4, log=log)
    # the sensitivity trial and four uniform ones (other calibrations, bias correction off) compile
    # to twins (the same graph, other scales): one candidate, timed once, the smallest drop wins
    uniform = [r for r in res.results if r.phase in ("sensitivity", "uniform")]
    assert len(uniform) == 5 and len({r.structure for r in uniform}) == 1
    assert len({res.final_timing[r.pipeline] for r in uniform if r.drop <= 0.01}) == 1
    timed = dict(res.final_timing)
    assert "<float>" in timed and res.pipeline in timed and len(timed) >= 3  # float + at least two finalists
    float_ms = timed.pop("<float>")
    assert float_ms > 0
    assert timed[res.pipeline] <= min(timed.values()) * (1 + FINAL_TIE)
    final = [json.loads(x) for x in log.read_text().splitlines()][-1]
    assert final["phase"] == "final" and final["winner"] == res.pipeline
    assert res.best.drop == min(r.drop for r in uniform)


def test_structure_key_ignores_weight_values_but_not_the_graph(digits_assets):
    def compiled(p):
        return opc.compile(str(digits_assets["model"]), passes=p, calibration=str(digits_assets["calib"]))[0]

    plain, mse_calib = compiled("fold,quantize"), compiled("fold,quantize(calibration=mse)")
    assert plain.SerializeToString() != mse_calib.SerializeToString()  # other scales and zero points
    assert structure_key(plain) == structure_key(mse_calib)  # same kernels on the same shapes
    first = next(n.name for n in onnx.load(str(digits_assets["model"])).graph.node if n.op_type == "Conv")
    assert structure_key(compiled(f"fold,quantize(exclude=[{first}])")) != structure_key(plain)
    # a zero point that becomes nonzero changes the key (integer GEMMs skip work for zero ones)
    zp = next(t for t in mse_calib.graph.initializer if t.data_type == onnx.TensorProto.INT8 and not any(t.int32_data)
              and not any(onnx.numpy_helper.to_array(t).reshape(-1)))
    zp.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(zp) + 1, zp.name))
    assert structure_key(mse_calib) != structure_key(plain)


def test_uniform_configs_are_the_benchmarks_baselines(digits_assets):
    model = onnx.load(str(digits_assets["model"]))
    notes = [note for _, note in uniform_configs(model)]
    assert notes == ["calibration=percentile", "calibration=entropy", "calibration=mse", "bias correction off",
                     "smoothquant on", "weight-only", "prune channels 0.25", "prune channels 0.5"]
    # big models leave channel pruning (seconds per million weights) to the improve phase
    from opc import tune as tune_module

    small = tune_module.PRUNE_UNIFORM_MAX_PARAMS
    try:
        tune_module.PRUNE_UNIFORM_MAX_PARAMS = 10
        assert not any("prune" in note for _, note in uniform_configs(model))
    finally:
        tune_module.PRUNE_UNIFORM_MAX_PARAMS = small


# --- per-layer pruning ---------------------------------------------------------------------------
def test_config_with_per_layer_pruning_is_canonical():
    cfg = Config(sparsity=0.0, prune_mode="channels", prune_layers=(("b", 0.5), ("a", 0.25)), table=False)
    text = cfg.pipeline()
    assert text == "fold,prune(sparsity=0.0,mode=channels,layers={a:0.25,b:0.5}),quantize(sensitivity_samples=0)"
    assert canonicalize(text) == text


def test_prune_sensitivity_blames_each_group_for_the_error_it_adds():
    from opc.tune import prune_sensitivity

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
        a = Conv <group = 1> (x, wa)
        ar = Relu (a)
        b = Conv <group = 4> (ar, wb)
        c = Conv <group = 1> (b, wc)
        y = Conv <group = 1> (c, wd)
    }""")
    for n, name in zip(model.graph.node, ["A", "R", "B", "C", "D"]):
        n.name = name
    rows = [{"node": "A", "error_after": 0.0}, {"node": "B", "error_after": 0.001},
            {"node": "C", "error_after": 0.2}, {"node": "D", "error_after": 0.25}]
    groups = [{"producers": ["A"], "channels_before": 4, "channels_after": 2},
              {"producers": ["C"], "channels_before": 4, "channels_after": 2},
              {"producers": ["D"], "channels_before": 4, "channels_after": 4}]  # not pruned: left out
    table = prune_sensitivity(model, groups, rows)
    # A's channels show at C (through the ReLU and the depthwise B): 0.2; C's at D: 0.25 - 0.2
    assert [(t["producers"], round(t["error"], 6)) for t in table] == [(["C"], 0.05), (["A"], 0.2)]


def test_size_search_raises_the_sparsity_of_the_least_sensitive_groups(digits_assets):
    # 1 sensitivity + 8 uniform trials (the last two prune 25% and 50% of the channels), then
    # the first move from 50%: its least sensitive half of the groups at 75%
    res = tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"], max_drop=0.01, trials=10,
               objective="size", repeats=3)
    uniform = {r.note: r for r in res.results if r.phase == "uniform"}
    half = uniform["prune channels 0.5"]
    table = half.details["prune_sensitivity"]
    assert [t["error"] for t in table] == sorted(t["error"] for t in table) and len(table) >= 2
    last = res.results[-1]
    assert last.phase == "improve" and "raise the" in last.note
    calm = sorted(t["producers"][0] for t in table[:len(table) // 2])
    assert "layers={" + ",".join(f"{p}:0.75" for p in calm) + "}" in last.pipeline
    assert res.met and res.best is last and last.size_bytes < half.size_bytes
    assert res.reproduced is True
    again, _ = opc.compile(str(digits_assets["model"]), passes=res.pipeline, calibration=str(digits_assets["calib"]))
    assert again.SerializeToString(deterministic=True) == res.model.SerializeToString(deterministic=True)


# --- the TPE strategy ------------------------------------------------------------------------------
def _toy_run(seed, startup, trials=40):
    """Best loss after ``trials`` points on a hidden weighted Hamming distance (12 binary
    dimensions and a 4-way one); ``startup`` > trials makes the sampler plain random search."""
    import random

    from opc.tune import TPESampler

    space = {f"x{i}": [0, 1] for i in range(12)}
    space["c"] = ["a", "b", "c", "d"]
    r = random.Random(1000 + seed)
    target = {k: r.choice(v) for k, v in space.items()}
    weight = {k: r.uniform(0.5, 2.0) for k in space}
    sampler = TPESampler(space, seed=seed, startup=startup)
    points, losses = [], []
    for _ in range(trials):
        p = sampler.suggest()
        loss = sum(weight[k] for k in space if p[k] != target[k])
        sampler.observe(p, loss)
        points.append(p)
        losses.append(loss)
    return points, min(losses)


def test_tpe_sampler_is_deterministic_under_a_seed_and_beats_random_search():
    a, _ = _toy_run(3, startup=4)
    b, _ = _toy_run(3, startup=4)
    c, _ = _toy_run(4, startup=4)
    assert a == b and a != c
    assert len({tuple(p.values()) for p in a}) == len(a)  # no point proposed twice
    tpe = [_toy_run(s, startup=4)[1] for s in range(12)]
    rnd = [_toy_run(s, startup=10 ** 9)[1] for s in range(12)]
    # measured: TPE mean best 0.47, random 3.95 (40 trials, 20 seeds)
    assert sum(tpe) / len(tpe) < 0.5 * sum(rnd) / len(rnd)
    assert sum(t < r for t, r in zip(tpe, rnd)) >= 10


def test_tpe_prior_weights_shape_the_random_draws():
    from opc.tune import TPESampler

    space = {f"x{i}": [False, True] for i in range(20)}
    sampler = TPESampler(space, seed=0, weights={k: [0.9, 0.1] for k in space})
    share = np.mean([v for _ in range(200) for v in sampler._random().values()])
    assert 0.07 < share < 0.13  # 4000 draws at 10%
    plain = TPESampler(space, seed=0)
    assert 0.45 < np.mean([v for _ in range(200) for v in plain._random().values()]) < 0.55


def test_tpe_strategy_search_is_seeded_and_finds_the_optimum():
    costs = {"a": 0.003, "b": 0.02, "c": 0.004, "d": 0.01, "e": 0.005}

    def search(seed):
        runner = SerialRunner()
        runner.start(FakeTask(costs))
        s = _Search(runner, _chain_model(list(costs)), max_drop=0.01, trials=16, objective="latency", seed=seed,
                    strategy="tpe")
        s.run()
        return s

    one, again = search(0), search(0)
    assert [r.pipeline for r in one.results] == [r.pipeline for r in again.results]
    assert one.used == 16 and any(r.phase == "tpe" for r in one.results)
    best = one.best()
    # at most two layers fit the budget (a+c 0.007, a+e 0.008, c+e 0.009): 8 ms is optimal
    assert one.meets(best) and best.latency_ms == 8.0
    assert best.phase == "tpe"  # the fallback stopped at 9 ms (4 most sensitive in float)
    assert min(r.latency_ms for r in one.results if r.phase == "fallback" and one.meets(r)) == 9.0
    with pytest.raises(opc.OpcError, match="--strategy"):
        _Search(SerialRunner(), _chain_model(["a"]), max_drop=0.01, trials=1, objective="latency", seed=0,
                strategy="anneal")


def test_tpe_on_digits_reproduces_its_winner(digits_assets, monkeypatch):
    from opc import tune as tune_module

    monkeypatch.setattr(tune_module, "PRUNE_UNIFORM_MAX_PARAMS", 0)  # quantize choices only: fast trials
    res = tune(digits_assets["model"], digits_assets["calib"], digits_assets["eval"], max_drop=0.01, trials=9,
               objective="size", repeats=3, strategy="tpe")
    tpe = [r for r in res.results if r.phase == "tpe"]
    assert len(tpe) == 2 and all(r.ok for r in tpe)
    assert all("prune" not in r.pipeline for r in res.results)
    assert res.met and res.reproduced is True
    again, _ = opc.compile(str(digits_assets["model"]), passes=res.pipeline, calibration=str(digits_assets["calib"]))
    assert again.SerializeToString(deterministic=True) == res.model.SerializeToString(deterministic=True)
