"""opc's quantize pass vs onnxruntime.quantization.quantize_static (QDQ) and onnxsim 0.8.1.

    python -m benchmarks.quantize [--models digits-cnn resnet18 ...] [--threads 1]
           [--samples 64] [--skip-memory] [--memory-only] [--quick]

Table 1 (per model and quantizer, same calibration samples, same run):
- accuracy: top-1 vs labels (digits, efficientnet-lite0), top-1 agreement with fp32,
  cosine of outputs vs fp32 (sentence embeddings for minilm-l6), output SQNR vs fp32;
- ONNX Runtime CPU latency at batch 1 and 32 (median, ``--threads`` intra-op threads)
  and speed-up over fp32, timed in interleaved rounds (ABBA order) across the variants of
  one model so that the shared machine's load falls on all of them alike; with one thread
  (the default) the clock is the CPU time of ORT's single thread (``opc.ort.latency_clock``),
  which other jobs do not inflate, else wall time; opc rows also get ``vs_ort``, the paired
  per-round ratio against the ORT quantizer with the same activation type;
- integer ops after ORT's graph optimizations (QLinearConv, QGemm, MatMulIntegerToFloat,
  ...; from SessionOptions.optimized_model_filepath), float Conv/Gemm/MatMul left, and
  coverage = integer Conv/Gemm/MatMul / Conv/Gemm/MatMul in the float model;
- quantization wall time.
Table 2: calibration peak RSS (a fresh subprocess per run) at 500 and 8000 samples for
every method of opc and ORT on digits-cnn; the samples are generated batch by batch
from the digits calibration set (tiled, with noise) so that the data itself takes no
memory.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from benchmarks import common

DEFAULT_MODELS = ["digits-cnn", "resnet18", "mobilenetv2", "efficientnet-lite0", "minilm-l6"]
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
INTEGER = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
           "DynamicQuantizeMatMul", "MatMulNBits", "QAttention"}
FLOAT_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                  "NchwcConv", "ConvTransposeWithDynamicPads"}
CAL_BATCH = 16


# --- quantizers ---------------------------------------------------------------------------

def opc_quantize(model, batches, options: str):
    import opc
    from opc.data import CalibrationData

    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    data = CalibrationData(Path("<bench>"), arrays)
    q, report = opc.compile(model, f"quantize(batch={CAL_BATCH}{',' + options if options else ''})",
                            calibration=data)
    return q, report.passes[-1].stats


def ort_quantize(model, batches, activation="uint8", method="MinMax"):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method))
        return onnx.load(str(dst))


def ort_dynamic(model):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
        return onnx.load(str(dst))


def onnxsim_quantize(model, batches):
    import onnxsim

    return onnxsim.quantize_static(model, calibration_data=list(batches), method="minmax")


# --- measurements ---------------------------------------------------------------------------

def optimized_ops(model, threads) -> Counter:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "opt.onnx")
        so = ort.SessionOptions()
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(path).graph.node)


def outputs(model, feeds, threads):
    from opc.ort import make_session

    sess = make_session(model, threads=threads)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def sqnr_db(ref, act) -> float:
    from opc.calibrate import LayerError

    e = LayerError()
    e.update(ref, act)
    return e.sqnr_db


def cosine_rows(a, b) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.mean())


def batch_feeds(feeds: dict, batch: int) -> dict:
    return {k: np.ascontiguousarray(np.concatenate([v] * (-(-batch // len(v))))[:batch]) for k, v in feeds.items()}


def measure(name, label, fp32, q, ev, ref, threads, repeats, stats=None, quant_s=None, base=None):
    """Accuracy, integer-op and coverage columns of one quantized model (latency comes later)."""
    row = {"model": name, "quantizer": label}
    out = outputs(q, ev.inputs, threads)
    if ev.labels is not None and ev.metric == "top1":
        row["top1"] = float((out.argmax(1) == ev.labels).mean())
    if ev.metric == "top1":
        row["agree_fp32"] = float((out.argmax(1) == ref.argmax(1)).mean())
    row["cosine_fp32"] = round(cosine_rows(ref, out), 5)
    row["sqnr_db"] = sqnr_db(ref, out)
    ops = optimized_ops(q, threads)
    eligible = sum(1 for n in fp32.graph.node if n.op_type in WEIGHTED)
    integer = sum(v for k, v in ops.items() if k in INTEGER)
    row["int_ops"] = integer
    row["float_mm"] = sum(v for k, v in ops.items() if k in FLOAT_WEIGHTED)
    row["coverage"] = round(min(integer, eligible) / eligible, 3) if eligible else 0.0
    if quant_s is not None:
        row["quant_s"] = round(quant_s, 2)
    if stats:
        row["opc_coverage"] = stats.get("coverage")
    return row


def model_rows(name, args) -> list[dict]:
    from opc.models import eval_set, sample_data

    path = common.zoo_model(name, dynamic_batch=True)
    fp32 = onnx.load(str(path))
    ev = eval_set(name)
    n = args.samples
    data = sample_data(name, n, "calib")
    batches = [{k: v[i:i + CAL_BATCH] for k, v in data.items()} for i in range(0, n, CAL_BATCH)]
    ref = outputs(fp32, ev.inputs, args.threads)
    base = measure(name, "fp32", fp32, fp32, ev, ref, args.threads, args.repeats)
    rows = [base]
    models = {"fp32": fp32}
    variants = [("opc uint8", lambda: opc_quantize(fp32, batches, "activation_type=uint8")),
                ("opc int8", lambda: opc_quantize(fp32, batches, "activation_type=int8"))]
    if name in ("minilm-l6", "bert-tiny"):
        variants.append(("opc uint8 smoothquant", lambda: opc_quantize(fp32, batches, "smoothquant=true")))
    variants += [("ort uint8", lambda: (ort_quantize(fp32, batches, "uint8"), None)),
                 ("ort int8", lambda: (ort_quantize(fp32, batches, "int8"), None))]
    if name in ("minilm-l6", "bert-tiny"):
        variants.append(("ort dynamic", lambda: (ort_dynamic(fp32), None)))
    if not getattr(args, "latency_only", False):
        variants.append(("onnxsim 0.8.1", lambda: (onnxsim_quantize(fp32, batches), None)))
    for label, fn in variants:
        t0 = time.perf_counter()
        try:
            q, stats = fn()
        except Exception as exc:  # a quantizer that fails is a result, not a crash
            rows.append({"model": name, "quantizer": label, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
            continue
        took = time.perf_counter() - t0
        try:
            rows.append(measure(name, label, fp32, q, ev, ref, args.threads, args.repeats, stats, took, base))
            models[label] = q
        except Exception as exc:
            rows.append({"model": name, "quantizer": label, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
        print(rows[-1], flush=True)
    interleaved_latency(rows, models, ev, args.threads, args.repeats)
    return rows


def interleaved_latency(rows, models, ev, threads, repeats):
    """Median latency per variant, timed in interleaved rounds (one run of each variant per
    round, the order reversed every other round: ABBA...), so that what the shared machine
    does hits every variant alike; speed-up is against fp32 of the same rounds.

    With one ORT thread the clock is that thread's CPU time (``opc.ort.latency_clock``),
    which other jobs on the machine do not inflate; with more threads, wall time.

    Each variant gets two sessions, created in forward and in reverse order, used on even
    and odd rounds: in an informal check on this machine (not recorded in results/) the
    session created first ran ~3% slower than an identical later one (efficientnet-lite0
    batch 32), which would favour whichever
    quantizer is listed last. A variant's latency is the mean of its two sessions' medians.
    """
    from opc.ort import latency_clock, make_session

    clock = latency_clock(threads)
    by_label = {r["quantizer"]: r for r in rows}
    labels = list(models)
    for b in (1, 32):
        feeds = batch_feeds(ev.inputs, b)
        sessions = {0: {}, 1: {}}
        for half, order in ((0, labels), (1, labels[::-1])):
            for label in order:
                sess = make_session(models[label], threads=threads)
                names = {i.name for i in sess.get_inputs()}
                sessions[half][label] = (sess, {k: v for k, v in feeds.items() if k in names})
        times = {half: {label: [] for label in labels} for half in (0, 1)}
        rounds = 2 * (repeats // 2 if b == 1 else max(3, repeats // 6))
        for half in (0, 1):  # warm-up
            for sess, f in sessions[half].values():
                sess.run(None, f)
                sess.run(None, f)
        for i in range(rounds):
            half = i % 2
            order = labels if (i // 2) % 2 == 0 else labels[::-1]
            for label in order:
                sess, f = sessions[half][label]
                t0 = clock()
                sess.run(None, f)
                times[half][label].append((clock() - t0) * 1000.0)

        def med(label):
            return float(np.mean([np.median(times[h][label]) for h in (0, 1)]))

        base = med("fp32")
        for label in labels:
            m = med(label)
            ts = times[0][label] + times[1][label]
            by_label[label][f"b{b}_ms"] = round(m, 3)
            q1, q3 = np.percentile(ts, [25, 75])
            by_label[label][f"b{b}_iqr_pct"] = round(100.0 * (q3 - q1) / m, 1) if m else None
            if label != "fp32":
                by_label[label][f"b{b}_speedup"] = round(base / m, 2)
            rival = label.replace("opc ", "ort ", 1)
            if label.startswith("opc ") and rival in models:
                # paired: ORT's run / opc's run of the same round (> 1: opc faster); its quartiles
                # say how far apart the two can be told on this machine
                r = np.concatenate([np.asarray(times[h][rival]) / np.asarray(times[h][label]) for h in (0, 1)])
                lo, mid, hi = np.percentile(r, [25, 50, 75])
                by_label[label][f"b{b}_vs_ort"] = round(float(mid), 3)
                by_label[label][f"b{b}_vs_ort_iqr"] = f"{lo:.3f}-{hi:.3f}"


# --- calibration memory ---------------------------------------------------------------------

def _digits_batches(samples: int, batch: int = 20):
    """``samples`` digits-like inputs generated batch by batch (no data held in memory)."""
    base = np.load(common.digits_assets()["calib"])["input"]
    rng = np.random.default_rng(0)
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        idx = rng.integers(0, len(base), n)
        yield {"input": (base[idx] + rng.normal(0, 0.05, base[idx].shape)).astype(np.float32)}


class _StreamData:
    """A CalibrationData stand-in whose batches are generated, not stored."""

    def __init__(self, samples):
        self.num_samples = samples
        self.source = "<generated>"
        self.synthetic = False

    def batches(self, batch_size=None, limit=None):
        return _digits_batches(min(limit or self.num_samples, self.num_samples), batch_size or 20)


def calibrate_opc(samples: int, method: str) -> int:
    from opc.ir import import_graph
    from opc.pass_api import PassContext
    from opc.passes.insert_qdq import Quantize

    model = onnx.load(str(common.digits_assets()["model"]))
    ctx = PassContext(calibration=_StreamData(samples), template=model)
    p = Quantize(calibration=method, batch=20, sensitivity_samples=0)
    result = p.run(import_graph(model), ctx)
    return int(result.stats["quantized_nodes"])


def calibrate_ort(samples: int, method: str) -> int:
    model = onnx.load(str(common.digits_assets()["model"]))
    q = ort_quantize(model, _digits_batches(samples), "uint8", method)
    return sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")


def memory_rows(sample_counts=(500, 8000)) -> list[dict]:
    rows = []
    for tool, fn, methods in (("opc", calibrate_opc, ["minmax", "percentile", "entropy", "mse"]),
                              ("ort", calibrate_ort, ["MinMax", "Percentile", "Entropy", "Distribution"])):
        for method in methods:
            row = {"tool": tool, "method": method}
            for s in sample_counts:
                try:
                    r = common.peak_rss(fn, s, method, timeout=900)
                    row[f"peak_mb_{s}"] = round(r["peak_rss_mb"], 1)
                    row[f"delta_mb_{s}"] = round(r["delta_rss_mb"], 1)
                    row[f"wall_s_{s}"] = round(r["wall_s"], 2)
                except Exception as exc:
                    row[f"peak_mb_{s}"] = None
                    row["error"] = str(exc)[:80]
            lo, hi = row.get(f"peak_mb_{sample_counts[0]}"), row.get(f"peak_mb_{sample_counts[-1]}")
            row["peak_ratio"] = round(hi / lo, 2) if lo and hi else None
            rows.append(row)
            print(row, flush=True)
    return rows


def light_rows() -> list[dict]:
    """Every onnx light model: quantized by opc (synthetic calibration), loaded and run in ORT."""
    import opc
    from opc.ort import make_session, seeded_feeds

    rows = []
    for path in common.light_models():
        m = onnx.load(str(path))
        row = {"model": path.stem.removeprefix("light_"), "opset": m.opset_import[0].version}
        try:
            t0 = time.perf_counter()
            q, report = opc.compile(m, "quantize(calibration=random,samples=4,sensitivity_samples=2)")
            row["quant_s"] = round(time.perf_counter() - t0, 2)
            st = report.passes[-1].stats
            row.update(quantized=st["quantized_nodes"], eligible=st["eligible_nodes"], coverage=st["coverage"])
            ops = optimized_ops(q, 1)
            row["int_ops"] = sum(v for k, v in ops.items() if k in INTEGER)
            feeds = seeded_feeds(q)
            out = make_session(q, threads=1).run(None, feeds)[0]
            ref = make_session(m, threads=1).run(None, feeds)[0]
            row["runs"] = out.shape == ref.shape and bool(np.isfinite(out).all())
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None):
    def extra(p):
        p.add_argument("--samples", type=int, default=64, help="calibration samples per model")
        p.add_argument("--skip-memory", action="store_true")
        p.add_argument("--memory-only", action="store_true")
        p.add_argument("--skip-light", action="store_true", help="skip the onnx light models table")
        p.add_argument("--latency-only", action="store_true",
                       help="only the latency table of the CNNs (fp32, opc, ORT), written to quantize_latency")

    args = common.bench_args(__doc__.splitlines()[0], DEFAULT_MODELS, argv, extra)
    if args.quick:
        args.models = args.models if args.models != DEFAULT_MODELS else ["digits-cnn", "resnet18"]
    settings = {"threads": args.threads, "repeats_b1": args.repeats, "calibration_samples": args.samples,
                "calibration_batch": CAL_BATCH, "weights": "int8 per-channel symmetric",
                "ort": "quantize_static QDQ per_channel MinMax", "onnxsim": "0.8.1 quantize_static minmax"}
    clock = "CPU time of the single ORT thread" if args.threads == 1 else "wall time"
    settings["latency_clock"] = clock
    if args.latency_only:
        if args.models == DEFAULT_MODELS:
            args.models = [m for m in DEFAULT_MODELS if m != "minilm-l6"]
        rows = []
        for name in args.models:
            rows += model_rows(name, args)
        cols = ["model", "quantizer", "b1_ms", "b1_iqr_pct", "b1_speedup", "b1_vs_ort", "b1_vs_ort_iqr", "b32_ms",
                "b32_iqr_pct", "b32_speedup", "b32_vs_ort", "b32_vs_ort_iqr", "int_ops", "float_mm", "coverage", "error"]
        common.report("quantize_latency", rows, columns=cols,
                      title=f"quantize: ONNX Runtime CPU latency ({clock}), opc vs ORT quantize_static",
                      settings=settings, threads=args.threads, write_json=not args.no_json,
                      notes=[f"latency = median of interleaved rounds (ABBA order; two sessions per variant created in "
                             f"opposite orders, mean of their medians), {clock}; iqr_pct = "
                             "interquartile range / median; speedup = fp32 median / variant median, same rounds",
                             "vs_ort (opc rows) = median over rounds of ORT-quantizer run / opc run with the same "
                             "activation type (> 1: opc faster), with its quartiles",
                             "int_ops = QLinearConv/QGemm/... after ORT's graph optimizations; float_mm = "
                             "float Conv/Gemm/MatMul left"])
        return
    if not args.memory_only:
        rows = []
        for name in args.models:
            rows += model_rows(name, args)
        cols = ["model", "quantizer", "top1", "agree_fp32", "cosine_fp32", "sqnr_db", "b1_ms", "b1_speedup",
                "b1_vs_ort", "b32_ms", "b32_speedup", "b32_vs_ort", "int_ops", "float_mm", "coverage", "quant_s",
                "error"]
        common.report("quantize", rows, columns=cols, title="quantize: opc vs ORT quantize_static vs onnxsim",
                      settings=settings, threads=args.threads, write_json=not args.no_json,
                      notes=["coverage = integer Conv/Gemm/MatMul kernels after ORT optimization / "
                             "Conv/Gemm/MatMul in the fp32 model",
                             "resnet18/mobilenetv2 have seeded weights: compare agreement with fp32, not top-1"])
    if not args.memory_only and not args.skip_light:
        common.report("quantize_light", light_rows(), title="quantize: onnx light models (load and run in ORT)",
                      settings={"calibration": "random, 4 samples (synthetic: only validity is measured)"},
                      threads=1, write_json=not args.no_json)
    if not args.skip_memory:
        rows = memory_rows((500, 1000) if args.quick else (500, 8000))
        common.report("quantize_memory", rows, title="quantize: calibration peak RSS vs samples (digits-cnn)",
                      settings={"batch": 20, "subprocess": "spawn, VmHWM"}, threads=args.threads,
                      write_json=not args.no_json)


if __name__ == "__main__":
    main()
