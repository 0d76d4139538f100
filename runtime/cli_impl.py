"""``opc run`` and ``opc bench``: the runtime from the command line (the typer wrappers are in
compiler/cli.py's [run/bench] block)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from opc.errors import DataError, OpcError, UsageError, VerificationError


def load_inputs(path: Path, model) -> dict[str, np.ndarray]:
    """Feeds from an .npz whose keys are input names."""
    from opc.data import read_arrays
    from opc.ort import graph_inputs

    feeds = read_arrays(path, "input data")
    names = [v.name for v in graph_inputs(model)]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise DataError(f"{path}: no array for input '{missing[0]}' (keys: {', '.join(feeds) or 'none'})")
    extra = [k for k in feeds if k not in names]
    if extra:
        raise DataError(f"{path}: '{extra[0]}' is not an input of the model (inputs: {', '.join(names)})")
    return feeds


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    folder = path.absolute().parent
    if not folder.is_dir():
        raise OpcError(f"{path}: the output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=folder)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _flatten_outputs(outs: dict, echo) -> dict[str, np.ndarray]:
    """Outputs as named arrays: a sequence output ``s`` becomes ``s.0``, ``s.1``, ... (the keys
    ``--save-outputs`` writes); an empty optional output is left out (said on ``echo``)."""
    flat = {}
    for name, val in outs.items():
        if val is None:
            if echo is not None:
                echo(f"{name}: empty optional (not saved)")
        elif isinstance(val, (list, tuple)):
            if echo is not None:
                echo(f"{name}: sequence of {len(val)} tensors, saved as {name}.0 ... {name}.{len(val) - 1}"
                     if val else f"{name}: empty sequence (not saved)")
            for i, v in enumerate(val):
                flat[f"{name}.{i}"] = np.asarray(v)
        else:
            flat[name] = np.asarray(val)
    return flat


def _feeds(model, inputs: Path | None, shapes: dict, seed: int, batch: int | None = None):
    from opc.ort import graph_inputs, input_spec, seeded_feeds

    if inputs is not None:
        return load_inputs(inputs, model)
    shapes = dict(shapes)
    if batch is not None:
        for v in graph_inputs(model):
            dims, _ = input_spec(v)
            if v.name in shapes or not dims:
                continue
            if isinstance(dims[0], int) and dims[0] != batch:
                raise UsageError(f"input '{v.name}' has a fixed batch of {dims[0]}; --batch {batch} needs a "
                                 f"model exported with a dynamic batch")
            shapes[v.name] = (batch,) + tuple(d if isinstance(d, int) else 1 for d in dims[1:])
    return seeded_feeds(model, shapes, seed=seed)


def run_command(model_path: Path, inputs: Path | None, backend: str, save_outputs: Path | None,
                compare_to: str | None, validate: bool, rtol: float, atol: float, shapes: dict, seed: int,
                echo) -> None:
    from opc.ir import load_model
    from opc.ort import make_session, report_outputs
    from opc.runtime import Session

    if compare_to not in (None, "ort"):
        raise UsageError(f"--compare-to {compare_to!r}: only 'ort' is supported")
    model = load_model(model_path)
    feeds = _feeds(model, inputs, shapes, seed)
    sess = Session(model, backend=backend)
    t0 = time.perf_counter()
    names = [o.name for o in sess.get_outputs()]
    outs = _flatten_outputs(dict(zip(names, sess.run(None, feeds))), echo)
    dt = time.perf_counter() - t0
    for name, arr in outs.items():
        echo(f"{name}: shape {tuple(arr.shape)} {arr.dtype}" + (
            f"  min {arr.min():.4g} max {arr.max():.4g} mean {arr.astype(np.float64).mean():.4g}"
            if arr.size and arr.dtype.kind in "fiu" else ""))
    echo(f"ran on {sess.backend} in {dt * 1e3:.1f} ms (first run: includes shape resolution)")
    if validate:
        for name, arr in outs.items():
            if arr.dtype.kind == "f":
                nan, inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
                if nan or inf:
                    raise OpcError(f"output '{name}' holds {nan} NaN and {inf} Inf values")
        echo("validate: every output is finite")
    if save_outputs is not None:
        save_npz_atomic(save_outputs, outs)
        echo(f"outputs written to {save_outputs}")
    if compare_to == "ort":
        ref = _flatten_outputs(dict(zip(names, make_session(model).run(None, feeds))), None)
        if sorted(ref) != sorted(outs):
            raise VerificationError(f"outputs differ from ONNX Runtime in structure: ORT gives {sorted(ref)}, "
                                    f"opc {sorted(outs)}")
        bad = report_outputs(ref, outs, rtol, atol, echo, prefix="vs ORT ")
        if bad:
            raise VerificationError(f"{len(bad)} of {len(names)} outputs differ from ONNX Runtime beyond "
                                    f"rtol={rtol:g} atol={atol:g}")


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_command(model_path: Path, backend: str, batch: int, vs: str | None, repeats: int, threads: int,
                  shapes: dict, echo) -> dict:
    from opc.ir import load_model
    from opc.ort import make_session
    from opc.runtime import Session

    if vs not in (None, "ort"):
        raise UsageError(f"--vs {vs!r}: only 'ort' is supported")
    if repeats < 1 or batch < 1 or threads < 1:
        raise UsageError("--repeats, --batch and --threads must be at least 1")
    model = load_model(model_path)
    feeds = _feeds(model, None, shapes, 0, batch)
    sess = Session(model, backend=backend, threads=threads)
    ms = median_ms(lambda: sess.run(None, feeds), repeats)
    row = {"model": Path(model_path).name, "batch": batch, "backend": sess.backend, "threads": threads,
           "opc_ms": ms, "arena_bytes": sess.arena_bytes(feeds)}
    echo(f"opc ({sess.backend}, {threads} thread(s)) batch {batch}: median {ms:.2f} ms over {repeats} runs; "
         f"arena {row['arena_bytes'] / 2**20:.1f} MiB")
    if vs == "ort":
        ort = make_session(model, threads=threads)
        ort_ms = median_ms(lambda: ort.run(None, feeds), repeats)
        row["ort_ms"] = ort_ms
        echo(f"ORT CPU ({threads} thread(s)): median {ort_ms:.2f} ms; opc/ORT = {ms / ort_ms:.2f}x")
    return row
