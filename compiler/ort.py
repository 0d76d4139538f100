"""ONNX Runtime helpers: sessions, seeded inputs, output comparison.

CUDA is asked for only when a GPU is present (otherwise ORT logs errors); tests and
verification use the CPU provider with a fixed thread count unless told otherwise.
"""

from __future__ import annotations

import functools
import os
import shutil
import time

import numpy as np
import onnx

from opc.errors import DataError, ModelError

DEFAULT_DYNAMIC_DIM = 2  # size used for a symbolic dimension in seeded inputs


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
        return False
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception:
        return False


def make_session(model: onnx.ModelProto | str, *, providers=None, threads: int | None = None,
                 optimize: bool = True, optimized_model_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors reach the user as one OpcError line, not ORT's log
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the default; latency_clock relies on it
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    if providers is None:
        providers = ["CPUExecutionProvider"]
    payload = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(payload, so, providers=providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        raise ModelError(f"ONNX Runtime cannot load the model: {msg[0] if msg else type(exc).__name__}") from None


def latency_clock(threads: int | None):
    """The clock an inference's latency is read from, for sessions made with ``threads``.

    With one intra-op thread (and sequential execution, one inter-op thread) ONNX Runtime
    runs every node on the calling thread, so that thread's CPU time (``time.thread_time``)
    is the inference's cost, and other jobs on a shared machine barely change it: they
    stretch wall time, not the CPU time spent by the run. With more threads the work runs on
    pool threads this clock does not see: wall time (``time.perf_counter``).
    """
    return time.thread_time if threads == 1 else time.perf_counter


_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def is_tensor(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type")


def input_spec(value: onnx.ValueInfoProto) -> tuple[list, np.dtype]:
    if not is_tensor(value):
        kind = value.type.WhichOneof("value") or "untyped"
        raise DataError(f"input '{value.name}' is a {kind.replace('_type', '')}, not a tensor: give its data explicitly")
    t = value.type.tensor_type
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(d.dim_value)
        else:
            dims.append(d.dim_param or None)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    return dims, dtype


def seeded_feeds(model: onnx.ModelProto, input_shapes: dict | None = None, seed: int = 0,
                 dynamic_dim: int = DEFAULT_DYNAMIC_DIM) -> dict[str, np.ndarray]:
    """Deterministic random inputs; symbolic dims take ``input_shapes`` or ``dynamic_dim``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    input_shapes = input_shapes or {}
    for value in graph_inputs(model):
        dims, dtype = input_spec(value)
        if value.name in input_shapes:
            shape = tuple(input_shapes[value.name])
        else:
            shape = tuple(d if isinstance(d, int) else dynamic_dim for d in dims)
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arr = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, 4, size=shape).astype(dtype)  # small: valid token ids / indices
        else:
            raise DataError(f"input '{value.name}': cannot make seeded data of type {dtype}")
        feeds[value.name] = arr
    return feeds


def run_model(model: onnx.ModelProto, feeds: dict, session=None) -> dict[str, np.ndarray]:
    sess = session or make_session(model)
    names = [o.name for o in sess.get_outputs()]
    known = {i.name for i in sess.get_inputs()}
    outs = sess.run(names, {k: v for k, v in feeds.items() if k in known})
    return dict(zip(names, outs))


def compare(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """max abs error, max error relative to the largest |reference|, cosine similarity."""
    ref = np.asarray(reference)
    act = np.asarray(actual)
    if ref.shape != act.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0, "shape_mismatch": 1.0}
    if ref.dtype == np.bool_ or not np.issubdtype(ref.dtype, np.number):
        equal = float(np.array_equal(ref, act))
        return {"max_abs": 0.0 if equal else 1.0, "max_rel": 0.0 if equal else 1.0, "cosine": equal}
    r = ref.astype(np.float64).ravel()
    a = act.astype(np.float64).ravel()
    if r.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    both_nan = np.isnan(r) & np.isnan(a)
    diff = np.where(both_nan, 0.0, np.abs(r - a))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max())
    scale = float(np.nanmax(np.abs(np.where(np.isfinite(r), r, 0.0)))) if np.isfinite(r).any() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    finite = np.isfinite(r) & np.isfinite(a)
    rn, an = r[finite], a[finite]
    denom = np.linalg.norm(rn) * np.linalg.norm(an)
    cosine = float(rn @ an / denom) if denom > 0 else float(np.allclose(rn, an))
    return {"max_abs": max_abs, "max_rel": max_rel, "cosine": cosine}


def within(metrics: dict, rtol: float, atol: float) -> bool:
    """max |a-b| <= atol + rtol * max|ref| (encoded through max_rel/max_abs)."""
    if metrics.get("shape_mismatch"):
        return False
    if metrics["max_abs"] <= atol:
        return True
    return metrics["max_rel"] <= rtol


def report_outputs(reference: dict, actual: dict, rtol: float, atol: float, echo, prefix: str = "") -> list[str]:
    """Print one comparison line per output; return the names outside tolerance."""
    bad = []
    for name, ref in reference.items():
        m = compare(ref, actual[name])
        ok = within(m, rtol, atol)
        bad += [] if ok else [name]
        echo(f"{prefix}{name}: max abs {m['max_abs']:.4g}  max rel {m['max_rel']:.4g}  cosine {m['cosine']:.6f}  "
             f"{'ok' if ok else 'MISMATCH'}")
    return bad
