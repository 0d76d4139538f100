"""fold against onnxslim and onnxsim, side by side in one run.

    python -m benchmarks.fold [--models resnet50 bert-tiny ...] [--quick] [--repeats N]

Models: every light model shipped in the onnx package, and each zoo model exported three
ways: ``dyn`` (TorchScript exporter, symbolic batch, its constant folding on: what
``opc.models.export`` writes), ``raw`` (TorchScript exporter, static batch,
``do_constant_folding=False``: BatchNorm and shape arithmetic left in) and ``dynamo``
(torch's dynamo exporter with ``optimize=False``, static batch; needs onnxscript: conv
biases built as Expand(CastLike(0, x)), BatchNorm unfused).

Columns: nodes (all graphs), file bytes, ORT latency median (ms, 1 thread, ORT's own
optimizations on; the input and the three outputs run interleaved, round-robin), compile time (s: the whole ``opc.compile`` call with its model checks;
pass_s: the fold pass alone), max_rel = max |y - y_ref| / max |y_ref| against the
input model over seeded inputs (two sizes for every dynamic dim) with ORT optimizations
on, exact = the same with ORT optimizations off, io = input/output names, dtypes and
symbolic dims unchanged, gen = nodes that only generate constants (ConstantOfShape/
Expand/Tile of constants) that opc keeps instead of writing the values into the file.
"""

from __future__ import annotations

import io
import statistics
import time
import traceback
import warnings
from pathlib import Path

import onnx

from benchmarks import common

ZOO = ["digits-cnn", "resnet18", "mobilenetv2", "efficientnet-lite0", "kws-lstm", "bert-tiny", "minilm-l6"]
QUICK = ["squeezenet", "resnet50", "bert-tiny", "kws-lstm"]
GEN_OPS = {"ConstantOfShape", "Expand", "Tile"}


def raw_export(name: str) -> Path:
    """Zoo model ``name`` exported without the exporter's constant folding (cached)."""
    import torch

    import opc.models as zoo
    from opc.ir import save_model

    common.CACHE.mkdir(parents=True, exist_ok=True)
    path = common.CACHE / f"{name}-raw-t{torch.__version__.split('+')[0]}.onnx"
    if path.exists():
        return path
    ins, outs = zoo.input_names(name), zoo.output_names(name)
    example = zoo.sample_data(name, 1, "calib")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(zoo.build(name), tuple(torch.from_numpy(example[k]) for k in ins), buf,
                          input_names=ins, output_names=outs, opset_version=zoo.DEFAULT_OPSET,
                          do_constant_folding=False, dynamo=False)
    save_model(onnx.load_from_string(buf.getvalue()), path)
    return path


def dynamo_export(name: str) -> Path:
    """Zoo model ``name`` through torch's dynamo exporter without its optimizer (cached)."""
    import torch

    import opc.models as zoo
    from opc.ir import save_model

    common.CACHE.mkdir(parents=True, exist_ok=True)
    path = common.CACHE / f"{name}-dynamo-t{torch.__version__.split('+')[0]}.onnx"
    if path.exists():
        return path
    ins = zoo.input_names(name)
    example = zoo.sample_data(name, 1, "calib")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(zoo.build(name), tuple(torch.from_numpy(example[k]) for k in ins),
                                    dynamo=True, optimize=False, input_names=ins,
                                    output_names=zoo.output_names(name), verbose=False)
    save_model(program.model_proto, path)
    return path


def models(selected: list[str] | None, quick: bool) -> list[tuple[str, Path]]:
    wanted = selected or (QUICK if quick else None)
    out = []
    for p in common.light_models():
        short = p.stem.removeprefix("light_")
        if wanted is None or short in wanted or p.stem in wanted:
            out.append((p.stem, p))
    for name in ZOO:
        if wanted is not None and name not in wanted:
            continue
        try:
            out.append((f"{name} dyn", common.zoo_model(name, dynamic_batch=True)))
            out.append((f"{name} raw", raw_export(name)))
        except Exception as exc:  # torch missing or an export failure: say so, keep going
            print(f"skipping {name}: {type(exc).__name__}: {exc}")
            continue
        try:
            out.append((f"{name} dynamo", dynamo_export(name)))
        except Exception as exc:  # the dynamo exporter needs onnxscript and may not handle a model
            print(f"skipping {name} dynamo: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return out


# --- the tools -------------------------------------------------------------------------

PASS_TIME: dict[str, float] = {}


def run_opc(model: onnx.ModelProto) -> onnx.ModelProto:
    import opc

    out, report = opc.compile(model, passes="fold")
    PASS_TIME["last"] = report.passes[0].time_s  # the fold pass alone, without load/check/export
    return out


def run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    out, _ = onnxsim.simplify(model, check_n=0)
    return out


TOOLS = {"opc fold": run_opc, "onnxslim": run_onnxslim, "onnxsim": run_onnxsim}


# --- measurements ----------------------------------------------------------------------

def _has_dynamic(model: onnx.ModelProto) -> bool:
    from opc.ort import graph_inputs, input_spec

    return any(not isinstance(d, int) for v in graph_inputs(model) for d in input_spec(v)[0])


def reference(model: onnx.ModelProto) -> dict:
    from opc.ort import make_session, run_model, seeded_feeds

    sizes = (2, 3) if _has_dynamic(model) else (1,)
    feeds = [seeded_feeds(model, seed=i, dynamic_dim=s) for i, s in enumerate(sizes)]
    ref = {}
    for optimize in (True, False):
        sess = make_session(model, threads=1, optimize=optimize)
        ref[optimize] = [run_model(model, f, session=sess) for f in feeds]
    return {"feeds": feeds, "outputs": ref}


def check(model: onnx.ModelProto, ref: dict) -> dict:
    """Worst max_rel over outputs and sizes, with ORT optimizations on and off."""
    from opc.ort import compare, make_session, run_model

    result = {}
    for optimize, key in ((True, "max_rel"), (False, "exact")):
        try:
            sess = make_session(model, threads=1, optimize=optimize)
            worst = 0.0
            for feeds, expected in zip(ref["feeds"], ref["outputs"][optimize]):
                got = run_model(model, feeds, session=sess)
                for name, y in expected.items():
                    m = compare(y, got[name]) if name in got else {"max_rel": float("inf")}
                    worst = max(worst, m["max_rel"])
            result[key] = worst
        except Exception as exc:
            result[key] = float("inf")
            result["error"] = str(exc).splitlines()[0][:120]
    return result


def io_signature(model: onnx.ModelProto):
    from opc.ort import graph_inputs

    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return sig(graph_inputs(model)), sig(model.graph.output)


def generator_nodes(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type in GEN_OPS and all(i in inits for i in n.input if i))


def latencies(models: dict[str, onnx.ModelProto], feeds: dict, repeats: int, threads: int) -> dict[str, float]:
    """Median ORT latency (ms) of each model, runs interleaved round-robin so that the
    shared machine's load drifts affect every variant alike."""
    from opc.ort import make_session

    sessions = {}
    for key, model in models.items():
        try:
            sessions[key] = make_session(model, threads=threads)
            sessions[key].run(None, feeds)  # warm-up
        except Exception:
            pass
    if not sessions:
        return {}
    t0 = time.perf_counter()
    for s in sessions.values():
        s.run(None, feeds)
    once = (time.perf_counter() - t0) / len(sessions)
    reps = max(3, min(repeats, int(4.0 / max(once, 1e-4))))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for key, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[key].append((time.perf_counter() - t) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(label: str, path: Path, repeats: int, threads: int) -> list[dict]:
    original = onnx.load(str(path))
    ref = reference(original)
    feeds = ref["feeds"][0]
    sig = io_signature(original)
    rows = [{"model": label, "tool": "input", "nodes": common.node_count(original), "bytes": original.ByteSize(),
             "compile_s": None, "max_rel": 0.0, "exact": 0.0, "io": True, "gen": generator_nodes(original)}]
    outputs = {"input": original}
    for tool, fn in TOOLS.items():
        row = {"model": label, "tool": tool}
        try:
            times = []
            for _ in range(1 if original.ByteSize() > 50e6 else 2):
                copy = onnx.ModelProto()
                copy.CopyFrom(original)
                t0 = time.perf_counter()
                out = fn(copy)
                times.append(time.perf_counter() - t0)
        except Exception as exc:
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
            rows.append(row)
            continue
        if tool == "opc fold":
            row["pass_s"] = PASS_TIME.get("last")
        row.update(nodes=common.node_count(out), bytes=out.ByteSize(), compile_s=min(times),
                   io=io_signature(out) == sig, gen=generator_nodes(out))
        row.update(check(out, ref))
        rows.append(row)
        outputs[tool] = out
    measured = latencies(outputs, feeds, repeats, threads)
    for row in rows:
        row["latency_ms"] = measured.get(row["tool"])
    return rows


def huge_constant_of_shape() -> dict:
    """Fold a model holding ConstantOfShape([100000, 100000]) (40 GB if materialized)."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1] x) => (float[1] y) {
      s = Constant <value = int64[2] {100000, 100000}> ()
      z = ConstantOfShape <value = float[1] {1.0}> (s)
      two = Constant <value = float[1] {2.0}> ()
      z2 = Mul(z, two)
      m = ReduceMax <keepdims = 0> (z2)
      y = Add(x, m)
    }
    """)
    out = run_opc(model)
    return {"nodes": len(out.graph.node), "bytes": out.ByteSize(),
            "ops": ",".join(n.op_type for n in out.graph.node)}


def summarize(rows: list[dict]) -> tuple[list[dict], list[str]]:
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    summary, notes = [], []
    le = fewer = le_gen = fewer_gen = n = 0
    broken = {t: 0 for t in TOOLS}
    inexact = {t: 0 for t in TOOLS}
    compile_ratio = []
    for model, tools in by_model.items():
        inp, o, s, x = (tools.get(k, {}) for k in ("input", "opc fold", "onnxslim", "onnxsim"))
        line = {"model": model, "input": inp.get("nodes"), "opc": o.get("nodes"), "onnxslim": s.get("nodes"),
                "onnxsim": x.get("nodes"), "opc gen": o.get("gen"),
                "opc bytes/in": common.ratio(o.get("bytes"), inp.get("bytes")),
                "slim bytes/in": common.ratio(s.get("bytes"), inp.get("bytes")),
                "opc ms": o.get("latency_ms"), "slim ms": s.get("latency_ms"), "input ms": inp.get("latency_ms"),
                "opc s": o.get("compile_s"), "fold pass s": o.get("pass_s"), "slim s": s.get("compile_s")}
        if o.get("nodes") is not None and s.get("nodes") is not None:
            n += 1
            le += o["nodes"] <= s["nodes"]
            fewer += o["nodes"] < s["nodes"]
            le_gen += o["nodes"] - (o.get("gen") or 0) <= s["nodes"]
            fewer_gen += o["nodes"] - (o.get("gen") or 0) < s["nodes"]
        if o.get("compile_s") and s.get("compile_s"):
            compile_ratio.append(o["compile_s"] / s["compile_s"])
        for t in TOOLS:
            r = tools.get(t, {})
            if r.get("error") or r.get("max_rel", 0) > 1e-5 or r.get("io") is False:
                broken[t] += 1
            if r.get("exact", 0) > 1e-5:
                inexact[t] += 1
        summary.append(line)
    notes.append(f"opc nodes <= onnxslim on {le}/{n} models, strictly fewer on {fewer}/{n}")
    notes.append(f"opc nodes minus the generator nodes it keeps (gen) <= onnxslim on {le_gen}/{n} models, "
                 f"strictly fewer on {fewer_gen}/{n}")
    if compile_ratio:
        notes.append(f"compile time opc/onnxslim: median ratio {statistics.median(compile_ratio):.2f} "
                     f"over {len(compile_ratio)} models")
    notes.append("broken (error, max_rel > 1e-5 with ORT optimizations on, or changed io): "
                 + ", ".join(f"{t} {broken[t]}" for t in TOOLS))
    notes.append("not exact with ORT optimizations off (max_rel > 1e-5): "
                 + ", ".join(f"{t} {inexact[t]}" for t in TOOLS))
    return summary, notes


def main(argv=None) -> None:
    args = common.bench_args(__doc__.splitlines()[0], argv=argv)
    rows = []
    for label, path in models(args.models, args.quick):
        print(f"... {label}", flush=True)
        try:
            rows += measure(label, path, args.repeats, args.threads)
        except Exception:
            traceback.print_exc()
    summary, notes = summarize(rows)
    try:
        big = common.peak_rss(huge_constant_of_shape, timeout=300)
        notes.append(f"ConstantOfShape([100000, 100000]) model: opc fold kept it generated "
                     f"({big['result']['ops']}, {big['result']['bytes']} bytes), peak RSS "
                     f"{big['peak_rss_mb']:.0f} MiB (+{big['delta_rss_mb']:.0f} MiB while folding)")
    except Exception as exc:
        notes.append(f"ConstantOfShape([100000, 100000]) check failed: {exc}")
    columns = ["model", "tool", "nodes", "gen", "bytes", "latency_ms", "compile_s", "pass_s", "max_rel", "exact", "io",
               "error"]
    common.report("fold", rows, columns=columns, title="fold vs onnxslim vs onnxsim (all rows)",
                  settings={"repeats": args.repeats, "threads": args.threads}, threads=args.threads,
                  notes=notes, write_json=not args.no_json)
    print()
    print("## Summary (nodes; bytes and latency relative to the input)\n")
    print(common.markdown_table(summary))


if __name__ == "__main__":
    main()
