"""opc tune against the best uniform configuration, and the Pareto front of all trials.

    python -m benchmarks.tune [--models digits-cnn mobilenetv2 ...] [--trials 20] [--max-drop 0.01]
                              [--objective latency|size] [--quick]

For every model: ``opc.tune`` with the budget, then every uniform configuration
(quantize with each calibration method, with bias correction, weight-only and SmoothQuant
for MatMul models, channel pruning + quantize) evaluated on the same data by the same
evaluator. The best uniform configuration that meets the budget, the tuned winner and the
float model are then timed again in this process, interleaved, so the latency ratios come
from one run. Metrics: top-1 against labels (digits, efficientnet-lite0), top-1 agreement
with the float model (mobilenetv2: seeded weights, labels meaningless), cosine similarity
of the sentence embeddings (minilm-l6).

Tables: the summary (benchmarks/results/tune.json) and the Pareto front of each model's
trials in (drop, objective) (benchmarks/results/tune-pareto.json); the trial logs go to
benchmarks/results/tune-MODEL.jsonl (with ``--strategy tpe`` or ``--objective size``:
tune-tpe.json, tune-size-pareto.json, ...).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, bench_args, digits_assets, report, zoo_model

DEFAULT_MODELS = ["digits-cnn", "mobilenetv2", "efficientnet-lite0", "minilm-l6"]


def model_setup(name: str, calib_samples: int):
    """(model path, CalibrationData, eval inputs, labels or None, metric)."""
    import onnx

    from opc.data import CalibrationData

    if name == "digits-cnn":
        a = digits_assets()
        model = onnx.load(str(a["model"]))
        with np.load(a["eval"]) as npz:
            inputs, labels = {"input": npz["input"]}, npz["labels"]
        return a["model"], CalibrationData.load(a["calib"], model), inputs, labels, "top1"
    import opc.models as zoo

    path = zoo_model(name, dynamic_batch=True)
    model = onnx.load(str(path))
    calib = CalibrationData(Path(f"<{name} calibration>"), zoo.sample_data(name, calib_samples, "calib"))
    calib.check_against(model)
    es = zoo.eval_set(name)
    if es.metric == "pairs":  # sentence embeddings: stay close to the float embeddings
        return path, calib, es.inputs, None, "cosine"
    if name == "efficientnet-lite0":
        return path, calib, es.inputs, es.labels, "top1"
    # seeded weights: logits have tiny margins, so top-1 agreement flips on noise; the
    # cosine similarity of the logits to the float model's is the meaningful budget
    return path, calib, es.inputs, None, "cosine"


def uniform_configs(model, objective: str, prune: bool) -> list[str]:
    """Every layer treated alike: quantize with the pass's defaults plus the tuner's own
    uniform candidates (``opc.tune.uniform_configs``: other calibrations, bias correction
    and SmoothQuant switched, weight-only, and on small models channel pruning), and with
    ``prune`` channel pruning + quantize on every model. No SQNR table: it does not
    change the model, only compile time."""
    from opc.tune import PRUNE_LEVELS, Config, uniform_configs as tuner_uniform

    plain = Config(table=False)
    configs = [plain] + [c for c, _ in tuner_uniform(model, objective)]
    if prune:
        configs += [replace(plain, sparsity=s, prune_mode="channels") for s in PRUNE_LEVELS]
    return list(dict.fromkeys(c.pipeline() for c in configs))


def _same_model(a: str, b: str) -> bool:
    return _strip(a) == _strip(b)


def _strip(p: str) -> str:
    return p.replace("(sensitivity_samples=0)", "").replace(",sensitivity_samples=0", "")


def run_model(name: str, args) -> tuple[dict, list[dict]]:
    import onnx

    from opc.trials import Trial, _guarded, make_runner
    from opc.tune import _retime, tune

    path, calib, inputs, labels, metric = model_setup(name, args.calib_samples)
    model = onnx.load(str(path))
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(args)
    log = RESULTS / f"tune{suffix}-{name}.jsonl"
    t0 = time.perf_counter()
    res = tune(model, calib, inputs, labels=labels, metric=metric, max_drop=args.max_drop, trials=args.trials,
               objective=args.objective, seed=0, runner=make_runner(args.workers), log=log,
               repeats=args.repeats, threads=args.threads, strategy=args.strategy,
               on_result=lambda r, s: print(f"  [{name}] #{r.index} {r.phase:<11} "
                                            + (f"drop {r.drop:+.4f} {r.latency_ms:.3f} ms "
                                               f"x{r.rel_latency:.3f} {r.size_bytes}"
                                               if r.ok else f"ERROR {r.error}") + f"  {r.pipeline}", flush=True))
    tune_s = time.perf_counter() - t0
    if res.best is None:
        return {"model": name, "met": False, "note": "no trial could be evaluated"}, []
    # every uniform configuration, with the tuner's own evaluator
    from opc.tune import TuneTask

    task = TuneTask(model_bytes=model.SerializeToString(deterministic=True),
                    calibration={k: np.asarray(v) for k, v in calib.arrays.items()},
                    calibration_source=str(calib.source), eval_inputs=inputs, labels=labels, metric=metric,
                    repeats=args.repeats, threads=args.threads)
    ev = task.setup()
    known = {_strip(r.pipeline): r for r in res.results if r.ok}
    uniform = []
    for i, p in enumerate(uniform_configs(model, args.objective, name == "digits-cnn" or args.prune_uniform)):
        r = known.get(_strip(p))
        if r is None:
            r = _guarded(ev, Trial(1000 + i, p, "uniform"))
            if not r.ok:  # a uniform config that fails is reported, not fatal
                print(f"  [{name}] uniform {p}: failed: {r.error}")
                continue
        print(f"  [{name}] uniform drop {r.drop:+.4f} {r.latency_ms:.3f} ms {r.size_bytes}  {p}", flush=True)
        uniform.append(r)
    key = (lambda r: r.latency_ms) if args.objective == "latency" else (lambda r: r.size_bytes)
    feasible = [r for r in uniform if r.drop <= args.max_drop]
    # configurations that compile to the same graph up to weight and scale values (the same
    # structure_key: same kernels on the same shapes) are timed once, as one model
    groups: dict[str, list] = {}
    for r in feasible:
        groups.setdefault(r.structure, []).append(r)
    models = {"float": ev.model}
    if args.objective == "latency":
        for k, rs in groups.items():
            models[k] = ev.compile(rs[0].pipeline)[0]
    tuned_key = res.best.structure if res.best.structure in groups and res.best.structure in models else "tuned"
    if tuned_key == "tuned":
        models["tuned"] = res.model
    timed = _retime(ev, models, rounds=args.rounds)
    timed["tuned"] = timed[tuned_key]
    if args.objective == "latency":
        best_u = min(feasible, key=lambda r: (timed[r.structure], r.drop)) if feasible else None
        if best_u is not None:
            timed["uniform"] = timed[best_u.structure]
    else:
        best_u = min(feasible, key=key) if feasible else None
        if best_u is not None:
            timed["uniform"] = _retime(ev, {"u": ev.compile(best_u.pipeline)[0]}, 3)["u"]
    twin = best_u is not None and best_u.structure == res.best.structure
    best = res.best
    size = {"float": res.baseline.size_bytes, "tuned": best.size_bytes,
            "uniform": best_u.size_bytes if best_u else None}
    row = {
        "model": name, "metric": metric, "float_metric": round(res.baseline.metric, 4),
        "trials": sum(1 for r in res.results if r.phase != "baseline"), "met": res.met,
        "tuned_drop": round(best.drop, 4), "uniform_drop": round(best_u.drop, 4) if best_u else None,
        "float_ms": timed["float"], "uniform_ms": timed.get("uniform"), "tuned_ms": timed["tuned"],
        "tuned_vs_uniform": (timed["tuned"] / timed["uniform"]) if "uniform" in timed else None,
        "tuned_vs_uniform_size": best.size_bytes / best_u.size_bytes if best_u else None,
        "tuned_is_uniform": any(_same_model(r.pipeline, best.pipeline) for r in uniform),
        "same_graph_as_uniform": twin,
        "float_KiB": size["float"] / 1024, "uniform_KiB": size["uniform"] / 1024 if size["uniform"] else None,
        "tuned_KiB": size["tuned"] / 1024, "reproduced": res.reproduced, "tune_s": round(tune_s, 1),
        "uniform_pipeline": best_u.pipeline if best_u else None, "tuned_pipeline": best.pipeline,
    }
    front = [{"model": name, "trial": r.index, "phase": r.phase, "drop": round(r.drop, 4),
              "latency_ms": r.latency_ms, "vs_float": r.rel_latency, "KiB": r.size_bytes / 1024,
              "meets": r.drop <= args.max_drop, "pipeline": r.pipeline} for r in res.pareto]
    return row, front


def _suffix(args) -> str:
    """Results of other strategies and objectives go to their own files (tune-tpe, tune-size)."""
    return ("" if args.strategy == "greedy" else f"-{args.strategy}") + \
        ("" if args.objective == "latency" else f"-{args.objective}")


def main(argv=None) -> None:
    def extra(p):
        p.add_argument("--trials", type=int, default=20)
        p.add_argument("--max-drop", type=float, default=0.01)
        p.add_argument("--objective", choices=["latency", "size"], default="latency")
        p.add_argument("--workers", type=int, default=1, help="trial processes (1: serial, steadier timings)")
        p.add_argument("--calib-samples", type=int, default=16, help="calibration samples for zoo models")
        p.add_argument("--rounds", type=int, default=11, help="interleaved rounds of the final timing")
        p.add_argument("--strategy", choices=["greedy", "tpe"], default="greedy", help="the tuner's search strategy")
        p.add_argument("--prune-uniform", action="store_true",
                       help="also compare uniform channel pruning on zoo models (minutes per config here)")

    args = bench_args("opc tune vs the best uniform configuration", DEFAULT_MODELS, argv, extra)
    if args.quick:
        args.trials = min(args.trials, 6)
        args.models = args.models if args.models != DEFAULT_MODELS else ["digits-cnn"]
    rows, fronts = [], []
    for name in args.models:
        print(f"# {name}", flush=True)
        row, front = run_model(name, args)
        rows.append(row)
        fronts += front
    settings = {"trials": args.trials, "max_drop": args.max_drop, "objective": args.objective,
                "repeats": args.repeats, "threads": args.threads, "workers": args.workers,
                "latency_batch": 1, "calib_samples": args.calib_samples, "rounds": args.rounds,
                "strategy": args.strategy}
    notes = ["latency columns: CPU time of the single ONNX Runtime thread per run (equal to wall time on an "
             "idle core; other jobs on this shared machine do not inflate it), medians of interleaved rounds "
             "(two sessions per model) measured at the end, in one process",
             "configurations that compile to the same graph up to weight and scale values (same nodes, shapes "
             "and zero/nonzero zero points: the same kernels) are timed once as one model; same_graph_as_uniform "
             "marks a winner that is such a twin of the best uniform configuration (ratio 1 by construction)",
             "tuned_vs_uniform < 1 means the tuned model is faster than the best uniform configuration "
             "that meets the same budget"]
    suffix = _suffix(args)
    report(f"tune{suffix}", rows, title="opc tune vs the best uniform configuration", settings=settings, notes=notes,
           threads=args.threads, write_json=not args.no_json)
    print()
    report(f"tune{suffix}-pareto", fronts, title="Pareto front of all trials (drop vs " + args.objective + ")",
           settings=settings, threads=args.threads, write_json=not args.no_json)


if __name__ == "__main__":
    main()
