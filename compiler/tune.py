"""opc tune: an accuracy budget in, the fastest (or smallest) model that meets it out.

Every configuration is a pipeline string (``fold,prune(...),quantize(exclude=[...])``),
so ``opc compile --passes "<winner>"`` with the same calibration data reproduces the
winner byte for byte; the winner's string is stored in the output's ``opc.pipeline``
metadata by the pass manager (tune adds nothing else, so the bytes stay equal).

The search, in order (each step is one or more trials, offered ``runner.workers`` at a
time and decided on in trial order, so the outcome does not depend on which worker
finishes first):

1. ``baseline``: the float model (``fold``): reference latency and size; not a candidate
   and not counted in ``trials``. Trials other than the first skip the quantize pass's
   SQNR table (``sensitivity_samples=0``): it changes no weight and costs more than the
   quantization.
2. ``sensitivity``: quantize every layer once; the quantize pass's per-layer SQNR table
   ranks the layers (lowest SQNR = most sensitive). Without a table the first and last
   layers are taken as the most sensitive.
3. ``uniform``: every other configuration that treats all layers alike
   (``uniform_configs``: the other calibration methods, bias correction and SmoothQuant
   switched, weight-only quantization where there are MatMul/Gemm layers, 25%/50% channel
   pruning on small models): they are what a per-layer choice has to beat, so they are
   candidates inside the trial budget; the static one with the smallest drop is the base
   for step 4.
4. ``fallback`` (only if no static int8 configuration meets the budget): keep the k most
   sensitive layers in float; k doubles until the budget holds, then a bisection finds
   the smallest such k. At least one layer always stays quantized.
5. ``improve``: greedy hill climbing from the best configuration that meets the budget:
   re-quantize a fallen-back layer, switch weight-only (MatMul models), keep one more
   layer in float (latency only: Q/DQ pairs around a small layer can cost more than they
   save), int4 weight-only (size only), channel pruning (25% or 50% of the channels,
   removed physically, so the model gets faster and smaller), and per-layer channel
   pruning (``layer_prune_moves``: a pruned trial's per-group errors, ``prune_sensitivity``,
   raise the least sensitive half one level, or prune only that half when uniform
   pruning missed the budget). Unstructured and N:M sparsity are not searched: they keep
   ONNX Runtime's dense kernels and the file's bytes. A move is taken when it meets the
   budget and beats the incumbent's objective (latency by more than the timing noise
   margin); moves are tried in a seeded order within each kind. With ``--strategy tpe``
   the remaining trials are proposed by a seeded TPE sampler instead (``tpe_phase``; on
   the benchmark models greedy matched or beat it, so greedy is the default).
6. ``final`` (latency only): the best few candidates, every uniform configuration that
   meets the budget and the float model are re-timed together in this process
   (interleaved rounds, two sessions each, CPU time, medians), so that the winner is not
   picked on timings disturbed by concurrently running workers. Trials that compile to
   the same graph up to weight and scale values (``structure_key``) are one candidate
   timed once, represented by the smallest drop; within ``FINAL_TIE`` of the fastest,
   the candidate with the fewest changes from uniform quantization wins.

``--log`` writes one JSON object per trial as it finishes (index, phase, note, pipeline,
metric, drop, latency_ms, latency_spread_ms, rel_latency, size_bytes, sha256, structure,
compile_s, time_s, error, worker, details) and, for latency, a last ``{"phase": "final",
"retimed_ms": {...}, "winner": ...}`` line.

Metrics are scores where higher is better; ``drop`` = score(float model) - score(candidate):
``top1`` (accuracy on the labels, or agreement with the float model's argmax without
labels), ``cosine`` (mean per-sample cosine similarity to the float outputs; float = 1),
``mse`` (score = -mean squared error relative to the mean square of the float outputs),
or ``module.py:function`` called as ``function(outputs, reference, labels) -> float``
(lists of arrays, one per model output; higher is better).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx

from opc.errors import DataError, OpcError, UsageError
from opc.ort import latency_clock  # noqa: F401  (moved to opc.ort; shared with benchmarks)
from opc.trials import SerialRunner, Trial, TrialResult, TrialRunner

BUILTIN_METRICS = ("top1", "cosine", "mse")
OBJECTIVES = ("latency", "size")
STRATEGIES = ("greedy", "tpe")
LATENCY_MARGIN = 0.05  # a latency move must be this much faster to count (timing noise)
FINAL_TIE = 0.02  # final re-timing: finalists this close to the fastest count as equal
PRUNE_LEVELS = (0.25, 0.5)
PRUNE_MAX = 0.75  # per-layer channel sparsity is raised up to this
MATMUL_OPS = ("MatMul", "Gemm")


class BudgetNotMet(OpcError):
    """No configuration met the accuracy budget (the closest one was still written)."""

    exit_code = 3


# --- data and metrics --------------------------------------------------------------------
def load_eval_data(path: str | Path, model: onnx.ModelProto, labels: str | Path | None = None):
    """Read evaluation inputs (an .npz keyed by input name) and labels.

    Labels come from ``labels`` (a .npy) or from a ``labels`` key in the .npz that is not
    a model input. Returns (dict of input arrays, labels array or None).
    """
    from opc.data import CalibrationData, read_arrays
    from opc.ort import graph_inputs

    path = Path(path)
    arrays = read_arrays(path, "evaluation data")
    inputs = {v.name for v in graph_inputs(model)}
    label_array = None
    if "labels" in arrays and "labels" not in inputs:
        label_array = arrays.pop("labels")
    if labels is not None:
        lp = Path(labels)
        try:
            label_array = np.load(lp, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{lp}: cannot read labels ({exc})") from None
    data = CalibrationData(path, arrays)
    data.check_against(model)
    if label_array is not None and len(label_array) != data.num_samples:
        raise DataError(f"labels: {len(label_array)} labels for {data.num_samples} evaluation samples in {path}")
    return arrays, label_array


def _flat(outputs: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(o, dtype=np.float64).reshape(len(o), -1) for o in outputs], axis=1)


def top1(outputs, reference, labels) -> float:
    """Accuracy of argmax over the last axis of the first output (vs labels, or vs the float model)."""
    pred = np.asarray(outputs[0]).argmax(axis=-1)
    target = np.asarray(labels) if labels is not None else np.asarray(reference[0]).argmax(axis=-1)
    return float(np.mean(pred.reshape(-1) == target.reshape(pred.shape).reshape(-1)))


def cosine(outputs, reference, labels) -> float:
    a, r = _flat(outputs), _flat(reference)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1)
    num = np.sum(a * r, axis=1)
    cos = np.where(denom > 0, num / np.where(denom > 0, denom, 1.0), np.all(a == r, axis=1).astype(float))
    return float(np.mean(cos))


def mse(outputs, reference, labels) -> float:
    a, r = _flat(outputs), _flat(reference)
    scale = float(np.mean(r * r)) or 1.0
    return -float(np.mean((a - r) ** 2)) / scale


def resolve_metric(spec: str) -> Callable:
    """``top1``, ``cosine``, ``mse`` or ``path/to/module.py:function``."""
    if spec in BUILTIN_METRICS:
        return {"top1": top1, "cosine": cosine, "mse": mse}[spec]
    file, sep, func = spec.rpartition(":")
    if not sep or not file.endswith(".py") or not func:
        raise UsageError(f"--metric {spec!r}: expected top1, cosine, mse or module.py:function")
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--metric {spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"opc_user_metric_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"--metric {spec!r}: cannot import {path} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"--metric {spec!r}: {path} has no function {func!r}")
    return fn


# --- the task every worker sets up ---------------------------------------------------------
@dataclass
class TuneTask:
    """Everything a worker needs to evaluate trials; picklable (bytes and arrays)."""

    model_bytes: bytes
    calibration: dict[str, np.ndarray]
    calibration_source: str
    eval_inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    metric: str = "top1"
    repeats: int = 30
    warmup: int = 3
    threads: int = 1
    latency_batch: int = 1
    eval_batch: int = 64

    def setup(self) -> "Evaluator":
        return Evaluator(self)


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    from opc.ort import graph_inputs, input_spec

    for v in graph_inputs(model):
        dims, _ = input_spec(v)
        if dims and isinstance(dims[0], int):
            return dims[0]
    return None


def measure_latency(session, feeds: dict, repeats: int, warmup: int, clock=time.perf_counter) -> tuple[float, float]:
    """Median and interquartile range (ms) of ``repeats`` timed runs after ``warmup``."""
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(names, feeds)
    times = []
    for _ in range(repeats):
        t0 = clock()
        session.run(names, feeds)
        times.append((clock() - t0) * 1000)
    q = np.percentile(times, [25, 50, 75])
    return float(q[1]), float(q[2] - q[0])


MIN_ROUND_MS = 20.0  # a timed round lasts at least this long (tiny models: many runs per round)


def _reps(wanted: int, run_ms: float) -> int:
    return max(1, wanted, math.ceil(MIN_ROUND_MS / max(run_ms, 1e-3)))


def measure_relative(session, reference, feeds: dict, repeats: int, warmup: int,
                     rounds: int = 5, clock=time.perf_counter) -> tuple[float, float, float]:
    """Time ``session`` and the ``reference`` session (the float model) in alternating rounds.

    Returns (median ms, interquartile range ms, median over rounds of candidate/reference).
    Other jobs on a shared machine slow both sessions of a round alike, so the ratio is
    much steadier than either latency: the search compares trials by it.
    """
    sessions = [(session, [o.name for o in session.get_outputs()]),
                (reference, [o.name for o in reference.get_outputs()])]
    t0 = time.perf_counter()
    for sess, names in sessions:
        for _ in range(max(1, warmup)):
            sess.run(names, feeds)
    reps = _reps(repeats // rounds, (time.perf_counter() - t0) * 1000 / (2 * max(1, warmup)))
    mine, ratios = [], []
    for i in range(rounds):
        medians = {}
        order = sessions if i % 2 == 0 else sessions[::-1]
        for sess, names in order:
            times = []
            for _ in range(reps):
                t0 = clock()
                sess.run(names, feeds)
                times.append((clock() - t0) * 1000)
            medians[id(sess)] = statistics.median(times)
            if sess is session:
                mine += times
        ratios.append(medians[id(session)] / medians[id(reference)])
    q = np.percentile(mine, [25, 50, 75])
    return float(q[1]), float(q[2] - q[0]), float(statistics.median(ratios))


def structure_key(model: onnx.ModelProto) -> str:
    """A hash of the graph that ignores weight and scale values: nodes (types, attributes,
    wiring), every initializer's name, type and shape, and whether an integer initializer
    is all zeros (zero points: ONNX Runtime's integer GEMMs skip work for zero ones). Two
    models with the same key run the same kernels on the same shapes, so they cost the
    same time; configurations that differ only in calibration compile to such twins."""
    from onnx import numpy_helper

    h = hashlib.sha256()
    g = model.graph
    for n in g.node:
        h.update(f"{n.domain}:{n.op_type}|{','.join(n.input)}|{','.join(n.output)}|".encode())
        for a in n.attribute:
            h.update(a.SerializeToString(deterministic=True))
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
               onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    for t in g.initializer:
        value = (b"1" if np.any(numpy_helper.to_array(t)) else b"0") if t.data_type in integer else b""
        h.update(f"{t.name}|{t.data_type}|{tuple(t.dims)}|".encode() + value)
    for v in list(g.input) + list(g.output):
        h.update(v.SerializeToString(deterministic=True))
    return h.hexdigest()


def prune_sensitivity(model: onnx.ModelProto, groups: list[dict], reconstruction: list[dict]) -> list[dict]:
    """Per channel group of one channel-pruning run, the error its pruning adds, least first.

    The prune pass refits every layer downstream of a pruned one and reports each refitted
    layer's relative output error against the original model (``error_after``); removing a
    group's channels shows in the next dense layers that read them (through activations,
    BatchNormalization and depthwise convolutions, which lose the same channels). A
    group's error is the largest such error minus the error already present at its own
    producers (upstream pruning), so a deep group is not blamed for the ones above it.
    Returns ``[{"producers": [...], "error": e, "channels_before": n, "channels_after": m}]``.
    """
    err = {r["node"]: float(r["error_after"]) for r in reconstruction if "error_after" in r}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def passes_through(n) -> bool:  # a depthwise Conv carries the pruned channels onwards
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        return n.op_type == "Conv" and group > 1

    by_name = {n.name: n for n in model.graph.node}
    out = []
    for g in groups:
        if g.get("channels_after", 0) >= g.get("channels_before", 0):
            continue
        producers = list(g["producers"])
        own = max((err.get(p, 0.0) for p in producers), default=0.0)
        stack = [o for p in producers if p in by_name for o in by_name[p].output]
        seen, hit = set(), []
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in consumers.get(t, []):
                if c.name in err and not passes_through(c):
                    hit.append(err[c.name])
                else:
                    stack.extend(c.output)
        out.append({"producers": producers, "error": max(0.0, max(hit, default=own) - own),
                    "channels_before": g.get("channels_before"), "channels_after": g.get("channels_after")})
    out.sort(key=lambda r: (r["error"], r["producers"]))
    return out


class Evaluator:
    """Compiles a trial's pipeline and measures metric drop, latency and size."""

    def __init__(self, task: TuneTask):
        from opc.data import CalibrationData

        self.task = task
        self.model = onnx.load_from_string(task.model_bytes)
        self.calibration = CalibrationData(Path(task.calibration_source), task.calibration)
        self.metric = resolve_metric(task.metric)
        fixed = _fixed_batch(self.model)
        self.eval_batch = fixed or task.eval_batch
        lat_batch = fixed or task.latency_batch
        self.latency_feeds = {k: np.ascontiguousarray(v[:lat_batch]) for k, v in task.eval_inputs.items()}
        n = len(next(iter(task.eval_inputs.values())))
        if fixed is not None and n % fixed:
            raise DataError(f"the model's batch size is fixed at {fixed}; give a multiple of {fixed} "
                            f"evaluation samples (got {n})")
        self.float_session = self.session(self.model)
        self.reference = self.outputs(self.model, self.float_session)
        self.baseline_score = float(self.metric(self.reference, self.reference, task.labels))

    def session(self, model):
        from opc.ort import make_session

        return make_session(model, threads=self.task.threads)

    def outputs(self, model, session=None) -> list[np.ndarray]:
        sess = session or self.session(model)
        names = [o.name for o in sess.get_outputs()]
        n = len(next(iter(self.task.eval_inputs.values())))
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, n, self.eval_batch):
            feeds = {k: v[start:start + self.eval_batch] for k, v in self.task.eval_inputs.items()}
            for i, out in enumerate(sess.run(names, feeds)):
                parts[i].append(out)
        return [np.concatenate(p) for p in parts]

    def compile(self, pipeline: str):
        import opc

        return opc.compile(self.model, passes=pipeline, calibration=self.calibration)

    def folded(self) -> onnx.ModelProto:
        """The model after ``fold`` (the graph the prune pass sees), compiled once."""
        if getattr(self, "_folded", None) is None:
            self._folded = self.compile("fold")[0]
        return self._folded

    def __call__(self, trial: Trial) -> TrialResult:
        started = time.perf_counter()
        model, report = self.compile(trial.pipeline)
        compile_s = time.perf_counter() - started
        payload = model.SerializeToString(deterministic=True)
        sess = self.session(model)
        score = float(self.metric(self.outputs(model, sess), self.reference, self.task.labels))
        latency, spread, relative = measure_relative(sess, self.float_session, self.latency_feeds,
                                                     self.task.repeats, self.task.warmup,
                                                     clock=latency_clock(self.task.threads))
        details = {}
        for record in report.passes:
            table = record.details.get("sensitivity")
            if table and trial.phase in ("sensitivity", "uniform"):
                details.setdefault("sensitivity", table)
            if record.name == "prune" and record.details.get("groups") and record.details.get("reconstruction"):
                details["prune_sensitivity"] = prune_sensitivity(self.folded(), record.details["groups"],
                                                                 record.details["reconstruction"])
        return TrialResult(
            index=trial.index, pipeline=trial.pipeline, phase=trial.phase, note=trial.note,
            metric=score, drop=self.baseline_score - score, latency_ms=latency, latency_spread_ms=spread,
            rel_latency=relative,
            size_bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(), structure=structure_key(model),
            compile_s=compile_s,
            time_s=time.perf_counter() - started, worker=f"pid{os.getpid()}", details=details,
        )


# --- configurations --------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One point of the search space; ``pipeline()`` is its canonical pipeline string."""

    quantize: bool = True
    exclude: tuple[str, ...] = ()
    calibration: str | None = None  # None: the quantize pass's default
    weight_only: bool = False
    extra: tuple[tuple[str, Any], ...] = ()  # further quantize options, e.g. (("bias_correction", True),)
    sparsity: float = 0.0  # 0 and no prune_layers: no prune pass
    prune_mode: str | None = None
    prune_layers: tuple[tuple[str, float], ...] = ()  # per-node sparsity overrides (prune's layers={...})
    # the quantize pass's per-layer SQNR table costs more than the quantization itself; only
    # the sensitivity and calibration phases read it, every other trial turns it off
    table: bool = True

    def pipeline(self) -> str:
        from opc.pipeline import format_pipeline
        from opc.registry import get_pass_class

        passes = [get_pass_class("fold")()]
        if self.sparsity > 0 or self.prune_layers:
            options = {"sparsity": self.sparsity, "mode": self.prune_mode}
            if self.prune_layers:
                options["layers"] = dict(sorted(self.prune_layers))
            passes.append(_make_pass("prune", options))
        if self.quantize:
            options = {"exclude": tuple(sorted(self.exclude)), "calibration": self.calibration,
                       "weight_only": self.weight_only or None}
            options.update(dict(self.extra))
            if not self.table and pass_default("quantize", "sensitivity_samples") is not None:
                options["sensitivity_samples"] = 0
            passes.append(_make_pass("quantize", options))
        return format_pipeline(passes)


def _make_pass(name: str, options: dict):
    from opc.registry import get_pass_class

    cls = get_pass_class(name)
    known = {f.name for f in cls.option_fields()}
    wanted = {k: v for k, v in options.items() if v not in (None, ())}
    missing = sorted(set(wanted) - known)
    if missing:
        raise OpcError(f"tune needs option(s) {', '.join(missing)} of pass '{name}', which it does not have")
    return cls.from_options(wanted)


def pass_choices(name: str, option: str) -> tuple[str, ...]:
    """The Literal choices of a pass option ('' if the pass or option is missing)."""
    import typing

    from opc.registry import get_pass_class

    try:
        cls = get_pass_class(name)
    except Exception:
        return ()
    tp = cls.option_types().get(option)
    if tp is not None and typing.get_origin(tp) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(tp))
    return ()


def pass_default(name: str, option: str):
    from opc.registry import get_pass_class

    for f in get_pass_class(name).option_fields():
        if f.name == option:
            return f.default
    return None


def has_option(name: str, option: str) -> bool:
    from opc.registry import get_pass_class

    return any(f.name == option for f in get_pass_class(name).option_fields())


def fallback_order(model: onnx.ModelProto, table: list[dict] | None) -> list[str]:
    """Quantized layers, most sensitive first.

    First the last layers (no table layer downstream), then the first ones (no table layer
    upstream): a table of accumulated errors cannot rank them (a global pooling before the
    classifier averages the upstream noise away, so the classifier looks harmless), yet they
    are the classic sensitive ones (MobileNetV2 with seeded weights, recorded in
    benchmarks/results/tune-mobilenetv2.jsonl: keeping only its classifier Gemm in float
    takes the cosine drop of full int8 from 0.026 to 0.015).
    Then the rest by their own share of the error: the quantize table gives each layer's
    output SQNR against the float model, accumulated over every quantized layer upstream,
    so a layer's share is the dB it loses against the worst of its nearest table
    producers. Without a table: first and last compute layers, then inwards.
    """
    if table:
        sqnr = {}
        for r in table:
            if r.get("node"):
                db = float(r.get("sqnr_db", math.inf))
                sqnr[r["node"]] = -math.inf if math.isnan(db) else db
        loss, firsts, lasts = _local_loss_db(model, sqnr)
        order = {n.name: i for i, n in enumerate(model.graph.node)}
        ends = [n for n in sorted(lasts, key=lambda n: (sqnr[n], order.get(n, 0)))]
        ends += [n for n in sorted(firsts, key=lambda n: (sqnr[n], order.get(n, 0))) if n not in ends]
        rest = sorted((n for n in sqnr if n not in ends), key=lambda n: (-loss[n], sqnr[n], order.get(n, 0), n))
        return ends + rest
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose") + MATMUL_OPS and n.name]
    out = []
    while layers:
        out.append(layers.pop(0))
        if layers:
            out.append(layers.pop())
    return out


def _local_loss_db(model: onnx.ModelProto, sqnr: dict[str, float]):
    """(dB lost by each table node against the worst of its nearest table producers,
    table nodes with no table producer, table nodes with no table node downstream)."""
    producer, consumers = {}, {}
    for n in model.graph.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out, firsts, lasts = {}, set(), set()
    for n in model.graph.node:
        if n.name not in sqnr:
            continue
        stack, seen, below = list(n.output), set(), False
        while stack and not below:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in consumers.get(t, []):
                if c.name in sqnr:
                    below = True
                    break
                stack.extend(c.output)
        if not below:
            lasts.add(n.name)
    for n in model.graph.node:
        if n.name not in sqnr:
            continue
        upstream, stack, seen = math.inf, list(n.input), set()
        while stack:
            t = stack.pop()
            if t in seen or t not in producer:
                continue
            seen.add(t)
            p = producer[t]
            if p.name in sqnr:
                upstream = min(upstream, sqnr[p.name])
            else:
                stack.extend(p.input)
        if upstream == math.inf:
            firsts.add(n.name)
        own = sqnr[n.name]
        out[n.name] = -math.inf if own == math.inf else upstream - own
    for name in sqnr:  # names the graph walk did not find (e.g. renamed by earlier passes)
        out.setdefault(name, -sqnr[name])
    return out, firsts, lasts


def latency_key(r: TrialResult) -> float:
    """What the search compares: latency relative to the float model timed alongside."""
    return r.rel_latency if r.rel_latency is not None else r.latency_ms


def pareto_front(results: Iterable[TrialResult], objective: str) -> list[TrialResult]:
    """Trials not dominated in (drop, objective) — lower is better in both."""
    pts = [r for r in results if r.ok and r.phase != "baseline"]
    key = latency_key if objective == "latency" else (lambda r: r.size_bytes)
    front = []
    for r in pts:
        dominated = any(
            (q.drop <= r.drop and key(q) <= key(r)) and (q.drop < r.drop or key(q) < key(r)) for q in pts
        )
        if not dominated:
            front.append(r)
    front.sort(key=lambda r: (r.drop, key(r)))
    # one per (drop, objective) point
    out, seen = [], set()
    for r in front:
        if (r.drop, key(r)) not in seen:
            seen.add((r.drop, key(r)))
            out.append(r)
    return out


# --- a seeded TPE sampler -------------------------------------------------------------------
class TPESampler:
    """Tree-structured Parzen estimator over categorical dimensions (Bergstra et al. 2011).

    ``space`` maps each dimension to its choices. After ``startup`` random points, the
    observed points are split into the ``gamma`` best (lowest loss) and the rest; each
    dimension gets a smoothed categorical density for either half (``prior`` pseudo-counts
    per choice), ``candidates`` points are drawn from the good densities, and the one with
    the largest ratio good/bad is proposed. Points already observed are not proposed again
    (while unobserved ones can be found). Deterministic for a given seed.
    """

    def __init__(self, space: dict[str, Sequence], seed: int = 0, gamma: float = 0.25, candidates: int = 24,
                 startup: int = 4, prior: float = 1.0, weights: dict[str, Sequence[float]] | None = None):
        self.space = {k: list(v) for k, v in space.items()}
        # prior belief per choice (default uniform): random draws follow it, and it spreads the
        # ``prior`` pseudo-counts of each density
        weights = weights or {}
        self.weights = {k: [float(w) / sum(weights[k]) for w in weights[k]] if k in weights
                        else [1.0 / len(v)] * len(v) for k, v in self.space.items()}
        self.rng = random.Random(seed)
        self.gamma, self.candidates, self.startup, self.prior = gamma, candidates, startup, prior
        self.history: list[tuple[dict, float]] = []

    def observe(self, point: dict, loss: float) -> None:
        self.history.append((dict(point), float(loss)))

    def _key(self, point: dict) -> tuple:
        return tuple(point[k] for k in self.space)

    def _random(self) -> dict:
        return {k: self.rng.choices(v, weights=self.weights[k])[0] for k, v in self.space.items()}

    def suggest(self) -> dict:
        seen = {self._key(p) for p, _ in self.history}
        if len(self.history) < self.startup:
            for _ in range(100):
                point = self._random()
                if self._key(point) not in seen:
                    return point
            return point
        ranked = sorted(self.history, key=lambda h: h[1])
        n_good = max(1, math.ceil(self.gamma * len(ranked)))
        good, bad = [p for p, _ in ranked[:n_good]], [p for p, _ in ranked[n_good:]]

        def density(points, k):
            counts = Counter(p.get(k) for p in points)
            n = len(self.space[k])
            total = len(points) + self.prior * n
            return {c: (counts[c] + self.prior * n * w) / total for c, w in zip(self.space[k], self.weights[k])}

        l_dens = {k: density(good, k) for k in self.space}
        g_dens = {k: density(bad, k) for k in self.space}
        best, best_score = None, -math.inf
        for _ in range(self.candidates):
            point = {k: self.rng.choices(v, weights=[l_dens[k][c] for c in v])[0] for k, v in self.space.items()}
            if self._key(point) in seen:
                continue
            score = sum(math.log(l_dens[k][point[k]]) - math.log(g_dens[k][point[k]]) for k in self.space)
            if score > best_score:
                best, best_score = point, score
        if best is None:  # every draw was seen before: fall back to an unseen random point
            for _ in range(100):
                best = self._random()
                if self._key(best) not in seen:
                    break
        return best


# --- the search ---------------------------------------------------------------------------
@dataclass
class TuneResult:
    best: TrialResult | None
    met: bool
    model: onnx.ModelProto | None
    baseline: TrialResult | None
    results: list[TrialResult] = field(default_factory=list)
    pareto: list[TrialResult] = field(default_factory=list)
    reproduced: bool | None = None
    interrupted: bool = False
    messages: list[str] = field(default_factory=list)
    final_timing: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline(self) -> str | None:
        return self.best.pipeline if self.best else None


class _Search:
    def __init__(self, runner: TrialRunner, model: onnx.ModelProto, *, max_drop: float, trials: int,
                 objective: str, seed: int, log_file=None, on_result=None, strategy: str = "greedy"):
        if strategy not in STRATEGIES:
            raise UsageError(f"--strategy {strategy!r}: expected {' or '.join(STRATEGIES)}")
        self.strategy = strategy
        self.seed = seed
        self.runner = runner
        self.model = model
        self.max_drop = max_drop
        self.budget = trials
        self.objective = objective
        self.rng = random.Random(seed)
        self.log_file = log_file
        self.on_result = on_result
        self.results: list[TrialResult] = []
        self.by_pipeline: dict[str, TrialResult] = {}
        self.by_key: dict[str, TrialResult] = {}
        self.config_of: dict[str, Config] = {}
        self.next_index = 0
        self.used = 0
        self.baseline: TrialResult | None = None
        counts = Counter(n.op_type for n in model.graph.node)
        self.matmul_nodes = {n.name for n in model.graph.node if n.op_type in MATMUL_OPS}
        # weight-only and SmoothQuant are for models made mostly of MatMul/Gemm (transformers),
        # not for a CNN with one classifier Gemm
        self.has_matmul = sum(counts[o] for o in MATMUL_OPS) > counts["Conv"] + counts["ConvTranspose"]

    # bookkeeping
    def key(self, r: TrialResult) -> float:
        return latency_key(r) if self.objective == "latency" else r.size_bytes

    def meets(self, r: TrialResult | None) -> bool:
        return r is not None and r.ok and r.phase != "baseline" and r.drop <= self.max_drop

    def best(self) -> TrialResult | None:
        feasible = [r for r in self.results if self.meets(r)]
        if feasible:
            return min(feasible, key=lambda r: (self.key(r), r.drop, r.index))
        tried = [r for r in self.results if r.ok and r.phase != "baseline"]
        return min(tried, key=lambda r: (r.drop, self.key(r), r.index)) if tried else None

    def left(self) -> int:
        return self.budget - self.used

    def evaluate(self, items: Sequence[tuple[Config | None, str, str]], count: bool = True) -> list[TrialResult]:
        """Run (config, phase, note) items not seen before; return their results in trial order."""
        trials, known, keys = [], [], {}
        for config, phase, note in items:
            pipeline = config.pipeline() if config is not None else "fold"
            key = self.model_key(config)
            if key in self.by_key:
                known.append(self.by_key[key])
                continue
            if count and self.used >= self.budget:
                break
            if key in keys.values():
                continue
            keys[pipeline] = key
            trials.append(Trial(self.next_index, pipeline, phase, note))
            self.next_index += 1
            if config is not None:
                self.config_of[pipeline] = config
            if count:
                self.used += 1
        fresh = []
        for result in self.runner.run(trials):
            fresh.append(result)
            self.results.append(result)
            self.by_pipeline[result.pipeline] = result
            self.by_key[keys[result.pipeline]] = result
            if self.log_file is not None:
                self.log_file.write(json.dumps(result.to_json(), default=str) + "\n")
                self.log_file.flush()
            if self.on_result is not None:
                self.on_result(result, self)
        self.results.sort(key=lambda r: r.index)  # trial order, whichever worker finished first
        return sorted(known + fresh, key=lambda r: r.index)

    def model_key(self, config: Config | None) -> str:
        """Configurations that give the same weights and graph (the SQNR table aside) share a key."""
        return "fold" if config is None else replace(config, table=False).pipeline()

    def tried(self, config: Config) -> bool:
        return self.model_key(config) in self.by_key

    def batch(self) -> int:
        return max(1, self.runner.workers)

    # phases
    def run(self) -> None:
        self.baseline = self.evaluate([(None, "baseline", "float model")], count=False)[0]
        if not self.baseline.ok:
            raise OpcError(f"the float model cannot be evaluated: {self.baseline.error}")
        first = self.evaluate([(Config(), "sensitivity", "every layer quantized")])[0]
        if not first.ok:
            raise OpcError(f"quantizing every layer failed: {first.error}")
        table = first.details.get("sensitivity")
        base = self.uniform_phase(first)
        order = fallback_order(self.model, table)
        self.order = order
        if not any(self.meets(r) and _static(self.config_of.get(r.pipeline, Config())) for r in self.results):
            self.fallback_phase(base, order)
        if self.strategy == "tpe":
            self.tpe_phase(order)
        else:
            self.improve_phase(order)

    def uniform_phase(self, first: TrialResult) -> Config:
        """Every uniform configuration (``uniform_configs``) as a trial: they are the
        candidates a per-layer search must beat, and the bases it falls back from.
        Returns the static configuration with the smallest drop (the fallback's base)."""
        items = [(c, "uniform", note) for c, note in uniform_configs(self.model, self.objective)]
        results = [first]
        for start in range(0, len(items), self.batch()):
            if self.left() <= 0:
                break
            results += self.evaluate(items[start:start + self.batch()])
        # the fallback keeps layers in float from the best *static* configuration: a
        # weight-only (or pruned) one that meets the budget is a candidate, not a base
        static = [r for r in results if r.ok and _static(self.config_of.get(r.pipeline, Config()))]
        pick = min(static or [first], key=lambda r: (r.drop, r.index))
        return self.config_of.get(pick.pipeline, Config())

    def fallback_phase(self, base: Config, order: list[str]) -> None:
        n = len(order)
        if n < 2:
            return
        lo, hi = 0, None  # lo: largest k known to miss, hi: smallest k known to meet
        ks, k = [], 1
        while k < n:
            ks.append(k)
            k *= 2
        ks.append(n - 1)
        ks = sorted(set(ks))

        def try_ks(values):
            nonlocal lo, hi
            items = [(replace(base, exclude=tuple(order[:v]), table=False), "fallback",
                      f"{v} most sensitive in float")
                     for v in values]
            for v, r in zip(values, self.evaluate(items)):
                if self.meets(r):
                    hi = v if hi is None else min(hi, v)
                elif r.ok:
                    lo = max(lo, v) if hi is None or v < hi else lo

        i = 0
        while hi is None and i < len(ks) and self.left() > 0:
            try_ks(ks[i:i + self.batch()])
            i += self.batch()
        while hi is not None and hi - lo > 1 and self.left() > 0:
            span = hi - lo
            step = max(1, span // (self.batch() + 1))
            values = sorted({lo + step * j for j in range(1, self.batch() + 1) if lo + step * j < hi})
            try_ks(values)

    def moves(self, cfg: Config, order: list[str]) -> list[tuple[Config, str]]:
        cfg = replace(cfg, table=False)
        rank = {name: i for i, name in enumerate(order)}
        groups: list[list[tuple[Config, str]]] = []
        # re-quantize a layer that fell back (least sensitive first)
        back = sorted(cfg.exclude, key=lambda n: -rank.get(n, 0))
        groups.append([(replace(cfg, exclude=tuple(x for x in cfg.exclude if x != n)), f"re-quantize {n}")
                       for n in back])
        if self.objective == "latency":
            if self.has_matmul and pass_default("quantize", "weight_only") is not None:
                groups.append([(replace(cfg, weight_only=not cfg.weight_only),
                                "weight-only" if not cfg.weight_only else "full quantization")])
            # weight-only quantizes MatMul/Gemm alone: keeping a Conv in float changes nothing
            keep = [n for n in order if n not in cfg.exclude and (not cfg.weight_only or n in self.matmul_nodes)]
            if len(keep) > 1:
                moves = [(replace(cfg, exclude=cfg.exclude + (n,)), f"keep {n} in float") for n in keep]
                self.rng.shuffle(moves)
                groups.append(moves)
        if self.objective == "size" and self.has_matmul and pass_default("quantize", "weight_bits") is not None:
            extra = tuple(kv for kv in cfg.extra if kv[0] != "weight_bits") + (("weight_bits", 4),)
            groups.append([(replace(cfg, weight_only=True, extra=extra), "int4 weight-only")])
        if "channels" in pass_choices("prune", "mode"):
            # zeros only shrink or speed up a model when whole channels go: unstructured and
            # N:M sparsity keep ONNX Runtime's dense kernels and the file's bytes
            groups.append([(replace(cfg, sparsity=s, prune_mode=_mode("channels"), prune_layers=()),
                            f"prune channels {s}") for s in PRUNE_LEVELS
                           if (s, ()) != (cfg.sparsity, cfg.prune_layers)])
            groups.append(self.layer_prune_moves(cfg))
        out = []
        for g in groups:
            out += g
        return out

    def layer_prune_moves(self, cfg: Config) -> list[tuple[Config, str]]:
        """Per-layer channel pruning from the per-group errors of a pruned trial
        (``prune_sensitivity``), the two latest pruned trials first: where one met the
        budget, raise the sparsity of its least sensitive half of the groups one level
        (0.25 -> 0.5 -> 0.75); where a uniformly pruned one missed it, prune only its least
        sensitive half."""
        out = []
        pruned = [r for r in self.results if r.ok and r.details.get("prune_sensitivity")
                  and r.pipeline in self.config_of]
        for r in sorted(pruned, key=lambda r: -r.index)[:2]:
            table, c = r.details["prune_sensitivity"], self.config_of[r.pipeline]
            calm = [g["producers"][0] for g in table[: max(1, len(table) // 2)]]
            layers = dict(c.prune_layers)
            if self.meets(r):
                for p in calm:
                    layers[p] = min(max(2 * layers.get(p, c.sparsity), PRUNE_LEVELS[-1]), PRUNE_MAX)
                note = f"prune channels: raise the {len(calm)} least sensitive groups"
                out.append((replace(cfg, sparsity=c.sparsity, prune_mode=_mode("channels"),
                                    prune_layers=tuple(sorted(layers.items()))), note))
            elif not layers and c.sparsity > 0:
                out.append((replace(cfg, sparsity=0.0, prune_mode=_mode("channels"),
                                    prune_layers=tuple((p, c.sparsity) for p in sorted(calm))),
                            f"prune channels {c.sparsity} on the {len(calm)} least sensitive groups only"))
        return out

    def better(self, r: TrialResult, incumbent: TrialResult) -> bool:
        if not self.meets(r):
            return False
        if self.objective == "latency":
            return latency_key(r) < latency_key(incumbent) * (1 - LATENCY_MARGIN)
        return (r.size_bytes, r.drop) < (incumbent.size_bytes, incumbent.drop)

    def improve_phase(self, order: list[str]) -> None:
        current = self.best()
        if not self.meets(current):
            return
        tried: set[str] = set()
        while self.left() > 0:
            cfg = self.config_of.get(current.pipeline)
            if cfg is None:
                return
            candidates = [(c, note) for c, note in self.moves(cfg, order)
                          if not self.tried(c) and c.pipeline() not in tried]
            if not candidates:
                return
            improved = None
            for start in range(0, len(candidates), self.batch()):
                if self.left() <= 0:
                    break
                chunk = candidates[start:start + self.batch()]
                tried.update(c.pipeline() for c, _ in chunk)
                results = self.evaluate([(c, "improve", note) for c, note in chunk])
                winners = [r for r in results if self.better(r, current)]
                if winners:
                    improved = min(winners, key=lambda r: (self.key(r), r.drop, r.index))
                    break
            if improved is None:
                return
            current = improved


    def loss(self, r: TrialResult) -> float:
        """What TPE minimises: the objective relative to the float model when the budget
        holds; above every such value (2 + the overshoot in budgets) when it does not."""
        if not r.ok:
            return 1e6
        if not self.meets(r):
            return 2.0 + (r.drop - self.max_drop) / max(self.max_drop, 1e-9)
        if self.objective == "size":
            return r.size_bytes / self.baseline.size_bytes
        return latency_key(r) / (latency_key(self.baseline) if self.baseline.rel_latency is None else 1.0)

    def tpe_phase(self, order: list[str]) -> None:
        """The trials left after the fallback, sampled by TPE over: each quantized layer in
        float or not, the calibration method, and channel pruning (none, 25%, 50%) where
        channel pruning is a uniform candidate (small models); the incumbent's other options
        (weight-only, SmoothQuant, bias correction) stay. Every earlier trial with those
        options is its history."""
        current = self.best()
        base = replace(self.config_of.get(current.pipeline, Config()) if current else Config(), table=False)
        if base.weight_only:  # per-layer float choices are for static quantization
            static = [r for r in self.results if self.meets(r) and _static(self.config_of.get(r.pipeline, Config()))]
            base = replace(self.config_of[static[0].pipeline], table=False) if static else replace(base,
                                                                                              weight_only=False)
        layers = list(order)
        space: dict[str, list] = {f"float:{n}": [False, True] for n in layers}
        default = pass_default("quantize", "calibration")
        space["calibration"] = [None] + [c for c in pass_choices("quantize", "calibration")
                                         if c not in (default, "random")]
        if any("prune" in note for _, note in uniform_configs(self.model, self.objective)):
            space["prune"] = [0.0, *PRUNE_LEVELS]  # small models only, as in the uniform phase
        # a priori about one layer in float per draw: the fallback already found the sensitive ones
        float_share = min(0.5, 1.0 / max(1, len(layers)))
        sampler = TPESampler(space, seed=self.seed,
                             weights={f"float:{n}": [1 - float_share, float_share] for n in layers})

        def point_of(cfg: Config) -> dict | None:
            if (cfg.weight_only, cfg.extra, cfg.prune_layers) != (base.weight_only, base.extra, ()) or \
                    cfg.calibration not in space["calibration"] or not cfg.quantize:
                return None
            if "prune" in space and cfg.sparsity not in space["prune"] or "prune" not in space and cfg.sparsity:
                return None
            point = {f"float:{n}": n in cfg.exclude for n in layers}
            point["calibration"] = cfg.calibration
            if "prune" in space:
                point["prune"] = cfg.sparsity
            return point

        def config_of(point: dict) -> Config:
            return replace(base, exclude=tuple(n for n in layers if point[f"float:{n}"]),
                           calibration=point["calibration"], sparsity=point.get("prune", 0.0),
                           prune_mode=_mode("channels") if point.get("prune") else None)

        for r in self.results:
            cfg = self.config_of.get(r.pipeline)
            point = point_of(replace(cfg, table=False)) if cfg is not None else None
            if point is not None:
                sampler.observe(point, self.loss(r))
        while self.left() > 0:
            batch, keys = [], set()
            for _ in range(self.batch() * 4):
                if len(batch) >= min(self.batch(), self.left()):
                    break
                point = sampler.suggest()
                cfg = config_of(point)
                if len(cfg.exclude) >= len(layers) and layers:  # at least one layer stays quantized
                    sampler.observe(point, 1e6)
                    continue
                if self.tried(cfg) or self.model_key(cfg) in keys:
                    sampler.observe(point, self.loss(self.by_key[self.model_key(cfg)])
                                    if self.tried(cfg) else 1e6)
                    continue
                keys.add(self.model_key(cfg))
                batch.append((point, cfg))
            if not batch:
                return
            results = self.evaluate([(cfg, "tpe", f"tpe: {len(cfg.exclude)} in float"
                                      + (f", {cfg.calibration}" if cfg.calibration else "")
                                      + (f", prune {cfg.sparsity}" if cfg.sparsity else ""))
                                     for _, cfg in batch])
            for (point, _), r in zip(batch, results):
                sampler.observe(point, self.loss(r))


def _static(cfg: Config) -> bool:
    """Static int8 quantization of every layer it covers, nothing pruned."""
    return cfg.quantize and not cfg.weight_only and cfg.sparsity == 0 and not cfg.prune_layers


PRUNE_UNIFORM_MAX_PARAMS = 1_000_000  # uniform channel pruning is a uniform candidate up to this size


def uniform_configs(model: onnx.ModelProto, objective: str = "latency") -> list[tuple[Config, str]]:
    """Configurations that treat every layer alike, besides quantizing all with the pass's
    defaults (the sensitivity trial): the other calibration methods ("random" calibrates
    on synthetic data), bias correction and SmoothQuant switched, weight-only quantization
    where there are MatMul/Gemm layers, and on small models (channel pruning with
    reconstruction costs seconds per million weights) 25% and 50% channel pruning."""
    counts = Counter(n.op_type for n in model.graph.node)
    matmul = sum(counts[o] for o in MATMUL_OPS)
    plain = Config(table=False)
    out = []
    default = pass_default("quantize", "calibration")
    out += [(replace(plain, calibration=c), f"calibration={c}")
            for c in pass_choices("quantize", "calibration") if c not in (default, "random")]
    bias = pass_default("quantize", "bias_correction")
    if bias is not None:  # whichever way the pass defaults, try the other
        out.append((replace(plain, extra=(("bias_correction", not bias),)),
                    f"bias correction {'off' if bias else 'on'}"))
    if matmul and has_option("quantize", "smoothquant"):
        # the pass's default (None) turns SmoothQuant on where MatMul/Gemm outnumber Conv
        sq = pass_default("quantize", "smoothquant")
        on = matmul > counts["Conv"] + counts["ConvTranspose"] if sq is None else bool(sq)
        out.append((replace(plain, extra=(("smoothquant", not on),)), f"smoothquant {'off' if on else 'on'}"))
    if matmul and pass_default("quantize", "weight_only") is not None:
        out.append((replace(plain, weight_only=True), "weight-only"))
    if "channels" in pass_choices("prune", "mode"):
        params = sum(math.prod(t.dims) for t in model.graph.initializer)
        if params <= PRUNE_UNIFORM_MAX_PARAMS and matmul + counts["Conv"] + counts["ConvTranspose"]:
            out += [(replace(plain, sparsity=s, prune_mode=_mode("channels")), f"prune channels {s}")
                    for s in PRUNE_LEVELS]
    return out


def _mode(mode: str) -> str | None:
    return None if mode == pass_default("prune", "mode") else mode


def _changes(cfg: Config | None) -> int:
    """How far a configuration is from quantizing every layer alike (a tie-break)."""
    if cfg is None:
        return 1 << 30
    return (len(cfg.exclude) + len(cfg.extra) + int(cfg.weight_only) + int(cfg.sparsity > 0) + len(cfg.prune_layers)
            + int(cfg.calibration is not None))


def _retime(evaluator: "Evaluator", models: dict[str, onnx.ModelProto], rounds: int,
            sessions: int = 2) -> dict[str, float]:
    """Interleaved serial timing of ``models`` (median ms each, CPU time of the ORT thread).

    Every model gets ``sessions`` ONNX Runtime sessions (one session's memory layout can
    make it a few percent faster or slower than another of the same model); each round
    times every session once, forwards in even rounds and backwards in odd ones, so slow
    spells of a shared machine fall on all models alike. A model's round value is the
    mean over its sessions; its result the median over rounds."""
    made = [(k, evaluator.session(m)) for _ in range(max(1, sessions)) for k, m in models.items()]
    reps = []
    for _, sess in made:
        t0 = time.perf_counter()
        for _ in range(3):
            sess.run(None, evaluator.latency_feeds)
        reps.append(_reps(max(3, evaluator.task.repeats // rounds), (time.perf_counter() - t0) * 1000 / 3))
    clock = latency_clock(evaluator.task.threads)
    per = {k: [] for k in models}
    for i in range(rounds):
        values: dict[str, list[float]] = {k: [] for k in models}
        order = list(range(len(made))) if i % 2 == 0 else list(range(len(made)))[::-1]
        for j in order:
            k, sess = made[j]
            values[k].append(measure_latency(sess, evaluator.latency_feeds, reps[j], 1, clock=clock)[0])
        for k, v in values.items():
            per[k].append(statistics.fmean(v))
    return {k: statistics.median(v) for k, v in per.items()}


def twins(results: Iterable[TrialResult]) -> dict[str, list[TrialResult]]:
    """Trials grouped by ``structure`` (the same graph up to weight and scale values)."""
    groups: dict[str, list[TrialResult]] = {}
    for r in results:
        groups.setdefault(r.structure or r.sha256 or r.pipeline, []).append(r)
    return groups


def _final_choice(search: "_Search", evaluator: "Evaluator", feasible: list[TrialResult], finalists: int,
                  models: dict[str, onnx.ModelProto]) -> tuple[TrialResult, dict[str, float]]:
    """The latency winner among the fastest few trials and every uniform configuration.

    Trial timings come from different moments (and, with a pool, from concurrently
    running workers), so near-equal candidates are re-timed together here (``_retime``).
    Trials that compiled to the same graph up to weight values (``structure_key``) are
    one candidate, timed once, represented by its smallest drop: timing noise between
    twins cannot pick a slower one. Candidates within FINAL_TIE of the fastest count as
    equal; the one with the fewest changes from uniform quantization wins."""
    chosen = feasible[:finalists] + [r for r in feasible if r.phase in ("sensitivity", "uniform")]
    chosen = list({r.pipeline: r for r in chosen}.values())
    groups = twins(chosen)
    reps = {key: min(rs, key=lambda r: (r.drop, _changes(search.config_of.get(r.pipeline)), r.index))
            for key, rs in groups.items()}
    for r in reps.values():
        if r.pipeline not in models:
            models[r.pipeline] = evaluator.compile(r.pipeline)[0]
    timed_reps = _retime(evaluator, {**{r.pipeline: models[r.pipeline] for r in reps.values()},
                                     "<float>": evaluator.model}, rounds=9)
    timed = {"<float>": timed_reps["<float>"]}
    for key, rs in groups.items():
        for r in rs:
            timed[r.pipeline] = timed_reps[reps[key].pipeline]
    fastest = min(timed_reps[r.pipeline] for r in reps.values())
    close = [r for r in reps.values() if timed_reps[r.pipeline] <= fastest * (1 + FINAL_TIE)]
    best = min(close, key=lambda r: (_changes(search.config_of.get(r.pipeline)), timed_reps[r.pipeline], r.index))
    return best, timed


def check_search_options(objective: str, max_drop: float, trials: int, strategy: str) -> None:
    """Usage errors for the search options shared by ``tune`` and ``opc tune``."""
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective!r}: expected latency or size")
    if not (max_drop >= 0 and math.isfinite(max_drop)):
        raise UsageError(f"--max-drop {max_drop!r}: expected a number >= 0")
    if trials < 1:
        raise UsageError(f"--trials {trials}: at least 1 trial is needed")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: expected {' or '.join(STRATEGIES)}")


def tune(model: onnx.ModelProto | str | Path, calibration, eval_data, *, labels=None, metric: str = "top1",
         max_drop: float = 0.01, trials: int = 20, objective: str = "latency", seed: int = 0,
         runner: TrialRunner | None = None, log: str | Path | None = None, on_result=None,
         repeats: int = 30, threads: int = 1, latency_batch: int = 1, finalists: int = 3,
         strategy: str = "greedy") -> TuneResult:
    """Search pipelines for the best model whose metric drop is at most ``max_drop``.

    ``calibration`` and ``eval_data`` are .npz paths (``eval_data`` may also be a dict of
    arrays, then ``labels`` an array). Returns a TuneResult whose ``model`` is the winner
    compiled again in this process (``reproduced`` says whether its bytes equal the
    trial's); ``met`` is False when no configuration met the budget (``best`` is then the
    closest one).
    """
    from opc.data import CalibrationData
    from opc.ir import as_model

    check_search_options(objective, max_drop, trials, strategy)
    resolve_metric(metric)  # usage errors before any work
    source, _ = as_model(model)
    calib = calibration if isinstance(calibration, CalibrationData) else CalibrationData.load(calibration, source)
    calib.check_against(source)
    if isinstance(eval_data, dict):
        eval_inputs, label_array = dict(eval_data), (None if labels is None else np.asarray(labels))
        CalibrationData(Path("<eval>"), eval_inputs).check_against(source)
    else:
        eval_inputs, label_array = load_eval_data(eval_data, source, labels)
    if metric == "top1" and label_array is None:
        pass  # agreement with the float model's predictions
    task = TuneTask(model_bytes=source.SerializeToString(deterministic=True),
                    calibration={k: np.asarray(v) for k, v in calib.arrays.items()},
                    calibration_source=str(calib.source), eval_inputs=eval_inputs, labels=label_array,
                    metric=metric, repeats=repeats, threads=threads, latency_batch=latency_batch)
    runner = runner or SerialRunner()
    log_file = open(log, "w") if log is not None else None
    search = _Search(runner, source, max_drop=max_drop, trials=trials, objective=objective, seed=seed,
                     log_file=log_file, on_result=on_result, strategy=strategy)
    interrupted = False
    try:
        runner.start(task)
        try:
            search.run()
        except KeyboardInterrupt:
            interrupted = True
    finally:
        runner.close()
    result = TuneResult(best=None, met=False, model=None, baseline=search.baseline, results=list(search.results),
                        interrupted=interrupted)
    result.pareto = pareto_front(search.results, objective)
    try:
        best = search.best()
        if best is None:
            if log_file:
                log_file.close()
            return result
        evaluator = task.setup()
        feasible = sorted((r for r in search.results if search.meets(r)), key=lambda r: (search.key(r), r.drop))
        models = {best.pipeline: evaluator.compile(best.pipeline)[0]}
        if objective == "latency" and len(feasible) > 1 and finalists > 1 and not interrupted:
            best, timed = _final_choice(search, evaluator, feasible, finalists, models)
            result.final_timing = timed
            if log_file:
                log_file.write(json.dumps({"phase": "final", "retimed_ms": timed, "winner": best.pipeline}) + "\n")
        result.best = best
        result.met = search.meets(best)
        result.model = models[best.pipeline]
        payload = result.model.SerializeToString(deterministic=True)
        result.reproduced = hashlib.sha256(payload).hexdigest() == best.sha256
        if not result.reproduced:
            result.messages.append("compiling the winner again gave different bytes than its trial did")
        base = search.baseline
        if result.met and base is not None and base.ok and objective == "latency":
            float_ms = result.final_timing.get("<float>", base.latency_ms)
            best_ms = result.final_timing.get(best.pipeline, best.latency_ms)
            if float_ms < best_ms:
                result.messages.append(f"the float model ({float_ms:.3g} ms) is faster than every configuration "
                                       f"that meets the budget (best {best_ms:.3g} ms)")
    finally:
        if log_file:
            log_file.close()
    return result


# --- the command line (the `opc tune` command in cli.py calls this) -----------------------
def _fmt_objective(r: TrialResult | None) -> str:
    if r is None or not r.ok:
        return "-"
    rel = f" (x{r.rel_latency:.2f} of float)" if r.rel_latency is not None else ""
    return f"{r.latency_ms:.4g} ms{rel}, {r.size_bytes / 1024:.1f} KiB"


def run_cli(model_path: Path, output: Path, calibration_data: Path, eval_data: Path, *, labels: Path | None,
            metric: str, max_drop: float, trials: int, objective: str, log: Path | None, seed: int,
            workers: int, repeats: int, latency_batch: int, quiet: bool, echo=print,
            strategy: str = "greedy") -> int:
    """``opc tune``: search, write the winner (or the closest miss), print; return the exit code."""
    from opc.errors import EXIT_INTERRUPTED
    from opc.ir import load_model, save_model
    from opc.trials import make_runner

    check_search_options(objective, max_drop, trials, strategy)
    if repeats < 1 or latency_batch < 1:
        raise UsageError("--repeats and --latency-batch must be >= 1")
    if output.exists() and output.is_dir():
        raise UsageError(f"-o {output}: is a folder")
    if not output.absolute().parent.is_dir():
        raise UsageError(f"-o {output}: the folder {output.absolute().parent} does not exist")
    if log is not None and not log.absolute().parent.is_dir():
        raise UsageError(f"--log {log}: the folder {log.absolute().parent} does not exist")
    resolve_metric(metric)
    source = load_model(model_path)
    if workers <= 0:
        workers = max(1, (os.cpu_count() or 1) // 2)
    runner = make_runner(workers)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, quiet=quiet, highlight=False)
    progress = Progress(SpinnerColumn(), TextColumn("[bold]tune[/] {task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[best]}"),
                        console=console, transient=True)
    task_id = progress.add_task(f"budget drop <= {max_drop:g} ({metric})", total=trials, best="")

    def on_result(r: TrialResult, search: _Search) -> None:
        if r.phase != "baseline":
            progress.advance(task_id)
        best = search.best()
        mark = "ok  " if search.meets(r) else ("base" if r.phase == "baseline" else "miss" if r.ok else "ERR ")
        what = f"drop {r.drop:+.4f}  {_fmt_objective(r)}" if r.ok else (r.error or "")
        progress.console.print(f"  #{r.index:<3} {r.phase:<11} {mark} {what}  {r.pipeline}", markup=False,
                               soft_wrap=True)
        if best is not None:
            state = "best" if search.meets(best) else "closest"
            progress.update(task_id, best=f"{state}: drop {best.drop:.4f}, {_fmt_objective(best)}")

    with progress:
        result = tune(source, calibration_data, eval_data, labels=labels, metric=metric, max_drop=max_drop,
                      trials=trials, objective=objective, seed=seed, runner=runner, log=log, on_result=on_result,
                      repeats=repeats, latency_batch=latency_batch, strategy=strategy)
    if result.best is None or result.model is None:
        errors = [r.error for r in result.results if r.error]
        raise OpcError("tune: no configuration could be evaluated" + (f" (first error: {errors[0]})" if errors else ""))
    save_model(result.model, output)
    best, base = result.best, result.baseline
    if not quiet:
        timing = result.final_timing
        float_ms = timing.get("<float>", base.latency_ms if base else None)
        best_ms = timing.get(best.pipeline, best.latency_ms)
        echo(f"{'':<10} {'float':>14} {'tuned':>14}")
        echo(f"{'metric':<10} {base.metric:>14.4f} {best.metric:>14.4f}   ({metric}; drop {best.drop:.4f}, "
             f"budget {max_drop:g})")
        if float_ms and best_ms:
            echo(f"{'latency':<10} {float_ms:>11.4g} ms {best_ms:>11.4g} ms   (x{float_ms / best_ms:.2f}, median "
                 f"CPU time of 1 ORT thread, batch {latency_batch}{', re-timed interleaved' if timing else ''})")
        echo(f"{'size':<10} {base.size_bytes / 1024:>10.1f} KiB {best.size_bytes / 1024:>10.1f} KiB   "
             f"(x{base.size_bytes / best.size_bytes:.2f})")
        echo(f"trials: {sum(1 for r in result.results if r.phase != 'baseline')}, "
             f"pareto front: {len(result.pareto)}" + (f", log: {log}" if log else ""))
        for m in result.messages:
            echo(f"note: {m}")
        echo(f"pipeline: {best.pipeline}")
    if result.interrupted:
        echo(f"INTERRUPTED: wrote the best so far to {output} ({best.pipeline})")
        return EXIT_INTERRUPTED
    if not result.met:
        echo(f"FAILED: no configuration met --max-drop {max_drop:g} ({metric}); wrote the closest "
             f"(drop {best.drop:.4f}) to {output} ({best.pipeline})")
        return BudgetNotMet.exit_code
    echo(f"PASSED: wrote {output} ({best.pipeline})")
    return 0
