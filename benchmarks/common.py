"""Helpers every benchmark uses.

- ``machine()``: what the numbers were measured on (CPU model, cores, threads, versions).
- ``ort_latency()``: median ONNX Runtime latency over repeats with a fixed thread count
  (wall time; ``clock="cpu"``/``ort_cpu_latency()``: CPU time of the single ORT thread).
- ``node_count()``, ``file_size()``, ``param_count()``, ``model_stats()``: size columns.
- ``peak_rss()``: peak resident memory of a function run in a fresh subprocess.
- ``timed()``: median wall time of a callable (compile times).
- ``zoo_model()``, ``light_models()``: the models to benchmark (zoo exports are cached
  in $OPC_CACHE/zoo, default ~/.cache/opc/zoo, so repeated runs do not re-export).
- ``top1()``: accuracy of a model on an input/label set (digits, ImageNet samples).
- ``markdown_table()``, ``report()``: print the Markdown table and write
  benchmarks/results/NAME.json (rows + machine + settings + date).
- ``bench_args()``: the shared command-line options (--models, --repeats, --threads,
  --quick, --no-json).

The machine is shared and noisy: report medians and ratios measured in the same run,
and always print ``machine()`` with the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("OPC_CACHE") or Path.home() / ".cache" / "opc") / "zoo"  # outside the repo
DEFAULT_THREADS = 1
DEFAULT_REPEATS = 20


# --- the machine -----------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> dict[str, Any]:
    """CPU model, logical cores (and those this process may use), threads, versions, GPU."""
    import onnxruntime as ort

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "threads": threads if threads is not None else DEFAULT_THREADS,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    from opc.ort import gpu_available

    info["gpu"] = gpu_available()
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def machine_line(info: dict | None = None) -> str:
    info = info or machine()
    return (f"{info['cpu']}, {info['usable_cores']}/{info['logical_cores']} cores usable, "
            f"{info['threads']} ORT thread(s), load {info.get('load_avg_1m', '?')}, "
            f"onnxruntime {info['onnxruntime']}, python {info['python']}")


# --- model statistics ------------------------------------------------------------------

def _as_model(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return onnx.load(str(model_or_path))


def node_count(model_or_path) -> int:
    """Nodes in the graph and all subgraphs."""
    from opc.summary import iter_nodes

    return sum(1 for _ in iter_nodes(_as_model(model_or_path).graph))


def param_count(model_or_path) -> int:
    from opc.summary import model_summary

    return model_summary(_as_model(model_or_path))["parameters"]


def file_size(model_or_path) -> int:
    """Bytes on disk (a path, plus its external-data files) or serialized bytes (a ModelProto)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path.ByteSize()
    path = Path(model_or_path)
    size = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                f = path.parent / e.value
                size += f.stat().st_size if f.exists() else 0
    return size


def model_stats(model_or_path) -> dict[str, Any]:
    from opc.summary import model_summary

    s = model_summary(_as_model(model_or_path))
    return {"nodes": s["nodes"], "parameters": s["parameters"], "weight_bytes": s["weight_bytes"],
            "file_bytes": file_size(model_or_path)}


# --- timing ----------------------------------------------------------------------------

def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> dict[str, Any]:
    """Median wall time (seconds) of ``fn()`` over ``repeats``; returns the last result too."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times),
            "times_s": times, "result": result}


def ort_latency(model_or_path, feeds: dict[str, np.ndarray] | None = None, *, threads: int = DEFAULT_THREADS,
                repeats: int = DEFAULT_REPEATS, warmup: int = 3, batch: int | None = None,
                optimize: bool = True, session=None, clock: str = "wall") -> dict[str, Any]:
    """Median latency (ms) of one ``session.run`` with ``threads`` intra-op threads.

    ``clock="wall"`` times wall-clock (perf_counter); ``clock="cpu"`` the CPU time of the
    calling thread (``opc.ort.latency_clock``), which needs ``threads=1``: ORT then runs the
    whole graph on that thread, so other jobs on the shared machine do not inflate it.
    See ``ort_cpu_latency``.

    ``feeds`` default to seeded random inputs; ``batch`` sets symbolic leading dims.
    ORT's own graph optimizations stay on (what a user gets) unless ``optimize=False``.
    """
    from opc.ort import graph_inputs, latency_clock, make_session, seeded_feeds

    if clock not in ("wall", "cpu"):
        raise ValueError(f"ort_latency: clock must be 'wall' or 'cpu', not {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError("ort_latency(clock='cpu') needs threads=1 (pool threads escape the thread's CPU clock)")
    tick = latency_clock(1) if clock == "cpu" else time.perf_counter
    model = _as_model(model_or_path)
    if feeds is None:
        shapes = {}
        if batch is not None:
            from opc.ort import input_spec

            for v in graph_inputs(model):
                dims, _ = input_spec(v)
                if dims and not isinstance(dims[0], int):
                    shapes[v.name] = tuple([batch] + [d if isinstance(d, int) else 1 for d in dims[1:]])
                elif dims and dims[0] != batch:
                    raise ValueError(f"ort_latency(batch={batch}): input '{v.name}' has a fixed batch of {dims[0]}")
        feeds = seeded_feeds(model, shapes, seed=0)
    sess = session or make_session(model, threads=threads, optimize=optimize)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(max(1, repeats)):
        t0 = tick()
        sess.run(None, feeds)
        times.append((tick() - t0) * 1000.0)
    q = np.percentile(times, [10, 90])
    return {"median_ms": statistics.median(times), "p10_ms": float(q[0]), "p90_ms": float(q[1]),
            "repeats": len(times), "threads": threads, "clock": clock}


def ort_cpu_latency(model_or_path, feeds: dict[str, np.ndarray] | None = None, **kwargs) -> dict[str, Any]:
    """``ort_latency`` as the CPU time of ONNX Runtime's single thread (threads=1).

    Why: on this shared 2-core machine an informal check (not recorded in results/) read
    mobilenetv2 batch 1 at 7.2-7.6 ms wall and CPU alone, but 23.9 ms wall vs 7.5-7.7 ms
    CPU with two competing busy processes.
    """
    kwargs["threads"] = 1
    return ort_latency(model_or_path, feeds, clock="cpu", **kwargs)


# --- memory ----------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss_child(conn, fn, args, kwargs):
    try:
        try:  # reset the high-water mark so the peak counts fn, not the interpreter start-up
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        base = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        wall = time.perf_counter() - t0
        peak = _rss_kib("VmHWM")
        if peak == 0:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send({"ok": True, "peak_rss_mb": peak / 1024, "base_rss_mb": base / 1024,
                   "delta_rss_mb": (peak - base) / 1024, "wall_s": wall, "result": result})
    except BaseException as exc:  # report, never hang the parent
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def peak_rss(fn: Callable, *args, timeout: float = 600, **kwargs) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) process; its peak RSS in MiB.

    ``fn`` must be importable (a module-level function) and its result picklable.
    Returns peak_rss_mb (high-water mark while fn ran, after a reset where Linux allows
    it), base_rss_mb (before fn: interpreter + imports), delta_rss_mb, wall_s, result.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rss_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} took over {timeout:.0f} s")
        out = parent.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"peak_rss({getattr(fn, '__name__', fn)}): the subprocess died "
                           f"(exit code {proc.exitcode})") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if not out["ok"]:
        raise RuntimeError(f"peak_rss({getattr(fn, '__name__', fn)}): {out['error']}")
    del out["ok"]
    return out


# --- models and data -------------------------------------------------------------------

def light_models(names: Iterable[str] | None = None) -> list[Path]:
    """The onnx package's backend/test/data/light models (optionally only ``names``, e.g. resnet50)."""
    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    paths = sorted(folder.glob("light_*.onnx"))
    if names is not None:
        wanted = set(names)
        paths = [p for p in paths if p.stem.removeprefix("light_") in wanted or p.stem in wanted]
    return paths


def zoo_model(name: str, *, batch: int = 1, dynamic_batch: bool = True, opset: int | None = None) -> Path:
    """Export zoo model ``name`` once into the cache (``CACHE``) and return the path.

    The default is a symbolic batch axis, so one file serves batch 1 and batch 32.
    """
    from opc.models import export

    import torch

    CACHE.mkdir(parents=True, exist_ok=True)
    import hashlib

    import opc.models as zoo

    # the key covers the model's source, so an edited model is exported afresh
    src = Path(zoo.__file__).parent
    digest = hashlib.sha1(b"".join((src / f).read_bytes() for f in
                                   ("__init__.py", f"{zoo.describe(name).module}.py"))).hexdigest()[:10]
    stem = (f"{name}-o{opset or 'd'}-b{batch}{'-dyn' if dynamic_batch else ''}"
            f"-t{torch.__version__.split('+')[0]}-{digest}")
    path = CACHE / f"{stem}.onnx"
    if not path.exists():
        export(name, path, opset=opset, batch=batch, dynamic_batch=dynamic_batch)
    return path


def digits_assets() -> dict[str, Path]:
    import opc

    folder = Path(opc.__file__).resolve().parent / "data"
    return {"model": folder / "digits_cnn.onnx", "calib": folder / "digits_calib.npz",
            "eval": folder / "digits_eval.npz"}


def top1(model_or_path, inputs: dict[str, np.ndarray], labels: np.ndarray, *, batch: int = 64,
         threads: int = DEFAULT_THREADS, output: int = 0) -> float:
    """Top-1 accuracy of output ``output`` (logits, samples on axis 0) over ``labels``."""
    from opc.ort import make_session

    sess = make_session(_as_model(model_or_path), threads=threads)
    names = {i.name for i in sess.get_inputs()}
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch
    correct = 0
    n = len(labels)
    for start in range(0, n, step):
        feed = {k: v[start:start + step] for k, v in inputs.items() if k in names}
        got = len(next(iter(feed.values())))
        if got < step and isinstance(fixed, int):  # a fixed batch dim: pad the last batch
            feed = {k: np.concatenate([v, np.repeat(v[-1:], step - got, axis=0)]) for k, v in feed.items()}
        logits = sess.run(None, feed)[output][:got]
        correct += int((logits.argmax(axis=1) == labels[start:start + got]).sum())
    return correct / n


# --- output ----------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table; ``columns`` picks and orders keys (default: all, first-seen order)."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def ratio(new: float | None, old: float | None) -> float | None:
    """new/old, or None when either is missing or old is 0."""
    if new is None or old in (None, 0):
        return None
    return new / old


def report(name: str, rows: list[dict[str, Any]], *, columns: list[str] | None = None, title: str | None = None,
           settings: dict[str, Any] | None = None, notes: list[str] | None = None, threads: int | None = None,
           write_json: bool = True, echo: Callable[[str], None] = print) -> Path | None:
    """Print the Markdown table (with machine and settings) and write benchmarks/results/NAME.json."""
    info = machine(threads)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    echo(f"## {title or name}\n")
    echo(markdown_table(rows, columns))
    echo("")
    echo(f"Machine: {machine_line(info)}. Date: {when}.")
    if settings:
        echo("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".")
    for n in notes or []:
        echo(f"Note: {n}")
    if not write_json:
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": when, "machine": info, "settings": settings or {},
               "columns": columns, "rows": rows, "notes": notes or [], "argv": sys.argv}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    os.replace(tmp, path)
    echo(f"Wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def bench_args(description: str, default_models: list[str] | None = None,
               argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """The options every benchmark takes; ``extra`` may add its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", nargs="*", default=default_models,
                   help="zoo names (digits-cnn, resnet18, ...) and/or light model names (resnet50, ...)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="ONNX Runtime intra-op threads")
    p.add_argument("--quick", action="store_true", help="fewer models and repeats (smoke run)")
    p.add_argument("--no-json", action="store_true", help="print only, write no results file")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    return args
