"""opc's prune pass vs plain magnitude pruning and onnxsim 0.8.1's pruning, same run.

    python -m benchmarks.prune [--models digits-cnn resnet18 ...] [--threads 1]
           [--samples 32] [--repeats 20] [--quick]

Per model and method: parameters (stored and nonzero) and their ratio to fp32, file
size, accuracy (top-1 vs labels for digits-cnn and efficientnet-lite0; top-1 agreement
with fp32 for the seeded resnet18/mobilenetv2; mean cosine of sentence embeddings vs
fp32 for minilm-l6), ONNX Runtime CPU latency at batch 1 and 8 (median, ``--threads``
intra-op threads) with the ratio to fp32, whether ONNX Runtime loads the result, and
compile time. Methods: opc with and without reconstruction (``reconstruct=false`` is
plain magnitude pruning), channel pruning, ``prune`` then ``quantize`` in one pipeline,
and onnxsim's apply_magnitude_pruning / apply_sparsegpt_pruning /
apply_structured_pruning on the same calibration samples.
"""

from __future__ import annotations

import time
import traceback

import numpy as np
import onnx

from benchmarks import common

DEFAULT_MODELS = ["digits-cnn", "resnet18", "mobilenetv2", "efficientnet-lite0", "minilm-l6"]
FOLD = "fold,"

CONFIGS = {
    "digits-cnn": [
        ("opc magnitude 50%", "prune(sparsity=0.5,reconstruct=false)"),
        ("opc reconstruct 50%", "prune(sparsity=0.5)"),
        ("opc magnitude 80%", "prune(sparsity=0.8,reconstruct=false)"),
        ("opc reconstruct 80%", "prune(sparsity=0.8)"),
        ("opc magnitude 80% per-layer", "prune(sparsity=0.8,scope=layer,reconstruct=false)"),
        ("opc reconstruct 80% per-layer", "prune(sparsity=0.8,scope=layer)"),
        ("opc magnitude 2:4", "prune(mode=nm,reconstruct=false)"),
        ("opc reconstruct 2:4", "prune(mode=nm)"),
        ("opc channels 30% magnitude", "prune(mode=channels,sparsity=0.3,scope=layer,reconstruct=false)"),
        ("opc channels 30% reconstruct", "prune(mode=channels,sparsity=0.3,scope=layer)"),
        ("opc prune 50% + quantize", "prune(sparsity=0.5),quantize"),
        ("onnxsim magnitude 50%", ("magnitude", 0.5)),
        ("onnxsim sparsegpt 50%", ("sparsegpt", 0.5)),
        ("onnxsim structured 30%", ("structured", 0.3)),
    ],
    "resnet18": [
        ("opc channels 30% magnitude", "prune(mode=channels,sparsity=0.3,scope=layer,reconstruct=false)"),
        ("opc channels 30% reconstruct", "prune(mode=channels,sparsity=0.3,scope=layer,batch=8)"),
        ("opc channels 30% + quantize", "prune(mode=channels,sparsity=0.3,scope=layer,batch=8),quantize"),
        ("onnxsim structured 30%", ("structured", 0.3)),
    ],
    "mobilenetv2": [
        ("opc channels 30% magnitude", "prune(mode=channels,sparsity=0.3,scope=layer,reconstruct=false)"),
        ("opc channels 30% reconstruct", "prune(mode=channels,sparsity=0.3,scope=layer,batch=8)"),
        ("onnxsim structured 30%", ("structured", 0.3)),
    ],
    "efficientnet-lite0": [
        ("opc channels 30% magnitude", "prune(mode=channels,sparsity=0.3,scope=layer,reconstruct=false)"),
        ("opc channels 30% reconstruct", "prune(mode=channels,sparsity=0.3,scope=layer,batch=8)"),
        ("opc channels 10% magnitude", "prune(mode=channels,sparsity=0.1,scope=layer,reconstruct=false)"),
        ("opc channels 10% reconstruct", "prune(mode=channels,sparsity=0.1,scope=layer,batch=8)"),
        ("opc magnitude 50%", "prune(sparsity=0.5,reconstruct=false)"),
        ("opc reconstruct 50%", "prune(sparsity=0.5,batch=8)"),
        ("opc magnitude 30% per-layer", "prune(sparsity=0.3,scope=layer,reconstruct=false)"),
        ("opc reconstruct 30% per-layer", "prune(sparsity=0.3,scope=layer,batch=8)"),
    ],
    "minilm-l6": [
        ("opc magnitude 50%", "prune(sparsity=0.5,reconstruct=false)"),
        ("opc reconstruct 50%", "prune(sparsity=0.5)"),
        ("opc magnitude 50% per-layer", "prune(sparsity=0.5,scope=layer,reconstruct=false)"),
        ("opc reconstruct 50% per-layer", "prune(sparsity=0.5,scope=layer)"),
        ("opc channels 30% reconstruct", "prune(mode=channels,sparsity=0.3,scope=layer)"),
        ("onnxsim magnitude 50%", ("magnitude", 0.5)),
        ("onnxsim sparsegpt 50%", ("sparsegpt", 0.5)),
        ("onnxsim structured 30%", ("structured", 0.3)),
    ],
}


def load(name: str):
    """(model, calibration arrays, eval inputs, labels or None, metric)."""
    from opc.models import eval_set, sample_data

    if name == "digits-cnn":
        assets = common.digits_assets()
        model = onnx.load(str(assets["model"]))
        calib = dict(np.load(assets["calib"]))
        ev = dict(np.load(assets["eval"]))
        return model, calib, {"input": ev["input"]}, ev["labels"], "top1"
    model = onnx.load(str(common.zoo_model(name, dynamic_batch=True)))
    es = eval_set(name)
    calib = sample_data(name, ARGS.samples, "calib")
    if es.metric == "pairs":
        return model, calib, es.inputs, None, "cosine"
    metric = "top1" if name == "efficientnet-lite0" else "agree"
    return model, calib, es.inputs, es.labels, metric


def predict(model, inputs) -> np.ndarray:
    from opc.ort import make_session

    sess = make_session(model, threads=ARGS.threads)
    names = {i.name for i in sess.get_inputs()}
    n = len(next(iter(inputs.values())))
    outs = [sess.run(None, {k: v[i:i + 32] for k, v in inputs.items() if k in names})[0] for i in range(0, n, 32)]
    return np.concatenate(outs)


def accuracy(out: np.ndarray, ref: np.ndarray, labels, metric: str) -> float:
    if metric == "top1":
        return float((out.argmax(1) == labels).mean())
    if metric == "agree":
        return float((out.argmax(1) == ref.argmax(1)).mean())
    a, b = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def run_opc(model, calib, pipeline: str):
    import opc
    from opc.data import CalibrationData

    data = CalibrationData(None, calib)
    full = (FOLD + pipeline) if ARGS.fold else pipeline
    with blas_threads():
        out, report = opc.compile(model, passes=full, calibration=data)
    stats = next(r.stats for r in report.passes if r.name == "prune")
    return out, stats


def blas_threads():
    """NumPy's BLAS at the benchmark's thread count (the shared machine punishes more)."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(ARGS.threads)
    except ImportError:
        import contextlib

        return contextlib.nullcontext()


def run_onnxsim(model, calib, spec):
    import onnxsim

    with blas_threads():
        return _onnxsim(onnxsim, model, calib, spec)


def _onnxsim(onnxsim, model, calib, spec):
    kind, sparsity = spec
    if kind == "magnitude":
        return onnxsim.apply_magnitude_pruning(model, sparsity=sparsity), {}
    if kind == "structured":
        return onnxsim.apply_structured_pruning(model, sparsity=sparsity), {}
    n = len(next(iter(calib.values())))
    samples = [{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)]
    return onnxsim.apply_sparsegpt_pruning(model, calibration_data=samples, num_samples=n, sparsity=sparsity), {}


def nonzero_params(model) -> int:
    """Nonzero weights (float and int8 tensors of more than one element)."""
    from onnx import numpy_helper

    from opc.summary import weight_tensors

    kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return int(sum(np.count_nonzero(numpy_helper.to_array(t)) for t in weight_tensors(model)
                   if t.data_type in kinds and np.prod(t.dims) > 1))


def _session_and_feeds(model, batch: int):
    from opc.ort import graph_inputs, input_spec, make_session, seeded_feeds

    shapes = {}
    for v in graph_inputs(model):
        dims, _ = input_spec(v)
        if dims and not isinstance(dims[0], int):
            shapes[v.name] = tuple([batch] + [d if isinstance(d, int) else 1 for d in dims[1:]])
    sess = make_session(model, threads=ARGS.threads)
    names = {i.name for i in sess.get_inputs()}
    return sess, {k: v for k, v in seeded_feeds(model, shapes, seed=0).items() if k in names}


def paired_latency(base, model, batch: int) -> tuple[float | None, float | None]:
    """Median ms of fp32 and of ``model``, runs alternating one by one (the shared machine's
    load drifts; alternating keeps both medians in the same window)."""
    import statistics

    try:
        (sa, fa), (sb, fb) = _session_and_feeds(base, batch), _session_and_feeds(model, batch)
    except Exception:
        return None, None
    ta, tb = [], []
    for i in range(ARGS.repeats + 2):
        for sess, feeds, times in ((sa, fa, ta), (sb, fb, tb)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            if i >= 2:  # warm-up
                times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ta), statistics.median(tb)


def bench_model(name: str) -> list[dict]:
    model, calib, inputs, labels, metric = load(name)
    ref = predict(model, inputs)
    base = {"model": name, "method": "fp32", "params": common.param_count(model),
            "nonzero": nonzero_params(model), "file_MB": model.ByteSize() / 2**20,
            "metric": metric, "value": accuracy(ref, ref, labels, metric), "cos_fp32": 1.0, "loads": True}
    rows = [base]
    print(f"{name}: fp32 {base['metric']}={base['value']:.4f}", flush=True)
    for label, spec in CONFIGS[name]:
        if ARGS.quick and "80%" in label:
            continue
        row = {"model": name, "method": label, "pipeline": spec if isinstance(spec, str) else f"onnxsim {spec}",
               "metric": metric}
        t0 = time.perf_counter()
        try:
            out, stats = run_opc(model, calib, spec) if isinstance(spec, str) else run_onnxsim(model, calib, spec)
            row["compile_s"] = time.perf_counter() - t0
            out_model = out
            out_check = onnx.ModelProto()
            out_check.CopyFrom(out_model)
            onnx.checker.check_model(out_check)
            got = predict(out_model, inputs)
            row["loads"] = True
        except Exception as exc:  # an anchor that fails is a result, not a crash
            row.update(loads=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            if ARGS.debug:
                traceback.print_exc()
            rows.append(row)
            print(f"  {label}: FAILED {row['error']}", flush=True)
            continue
        row.update(params=common.param_count(out_model), nonzero=nonzero_params(out_model),
                   file_MB=out_model.ByteSize() / 2**20, value=accuracy(got, ref, labels, metric),
                   cos_fp32=accuracy(got, ref, None, "cosine"))
        for b in (1, 8):
            base_ms, ms = paired_latency(model, out_model, b)
            row[f"b{b}_fp32_ms"], row[f"b{b}_ms"], row[f"b{b}_x"] = base_ms, ms, common.ratio(ms, base_ms)
        row["delta"] = row["value"] - base["value"]
        row["params_x"] = common.ratio(row["params"], base["params"])
        row["nonzero_x"] = common.ratio(row["nonzero"], base["nonzero"])
        row["file_x"] = common.ratio(row["file_MB"], base["file_MB"])
        if stats:
            row["sparsity"] = stats.get("sparsity")
            row["params_removed"] = stats.get("params_removed")
        rows.append(row)
        print(f"  {label}: {metric}={row['value']:.4f} params_x={row['params_x']:.3f} "
              f"nonzero_x={row['nonzero_x']:.3f} b1_x={row['b1_x']} ({row['compile_s']:.1f}s)", flush=True)
    return rows


ARGS = None


def main(argv=None) -> None:
    global ARGS

    def extra(p):
        p.add_argument("--samples", type=int, default=32, help="calibration samples for zoo models")
        p.add_argument("--no-fold", dest="fold", action="store_false", help="do not run fold before prune")
        p.add_argument("--debug", action="store_true")

    ARGS = common.bench_args(__doc__.splitlines()[0], DEFAULT_MODELS, argv, extra)
    models = ["digits-cnn"] if ARGS.quick and ARGS.models == DEFAULT_MODELS else ARGS.models
    rows = []
    for name in models:
        rows += bench_model(name)
    columns = ["model", "method", "metric", "value", "delta", "cos_fp32", "params", "params_x", "nonzero_x", "file_x",
               "b1_fp32_ms", "b1_ms", "b1_x", "b8_fp32_ms", "b8_ms", "b8_x", "compile_s", "loads", "error"]
    name = "prune" if models == DEFAULT_MODELS else "prune-" + "-".join(models)
    common.report(name, rows, columns=columns, title="prune: accuracy, size and ONNX Runtime latency",
                  threads=ARGS.threads, write_json=not ARGS.no_json,
                  settings={"samples": ARGS.samples, "repeats": ARGS.repeats, "fold_first": ARGS.fold},
                  notes=["value: top1 = top-1 vs labels; agree = top-1 agreement with fp32 (seeded weights); "
                         "cosine = mean cosine of sentence embeddings vs fp32; cos_fp32: mean cosine of "
                         "each sample's outputs (logits/embeddings) vs fp32",
                         "params_x/nonzero_x/file_x: ratio to the fp32 model; b1_x/b8_x: latency ratio to fp32 "
                         "at batch 1/8, the two models run alternately in the same window (median of --repeats)",
                         "unstructured and N:M sparsity do not speed up ONNX Runtime CPU (dense kernels); "
                         "channel pruning does"])


if __name__ == "__main__":
    main()
