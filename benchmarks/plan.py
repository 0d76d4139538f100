"""Memory planning: arena vs lower bound vs naive, ONNX Runtime and onnxsim, planning time.

    python -m benchmarks.plan [--models resnet50 mobilenetv2 ...] [--quick] [--no-ort] [--no-zoo]

Models: every "light" model shipped in the onnx package and every zoo model
(``opc.models``; exported once with torch, skipped without it), batch 1.

Columns:
- arena / lower bound / naive: ``opc.memory.plan_model`` with the pass's defaults
  (reordering on, no workspaces), MiB. The lower bound is the largest total of aligned live
  bytes at any step; naive is every tensor in its own memory.
- plan ms: median wall time of ``plan_model`` (shape inference included) over the repeats.
- ORT pattern: ONNX Runtime's CPU memory-pattern block for the same model and shapes. ORT
  (enable_mem_pattern on, the default) records the first run's allocations and, from the
  second run on, allocates all activations as one block of the pattern's size. We run ORT
  in a subprocess with verbose logging; the first run asks the arena to shrink afterwards
  (run option memory.enable_memory_arena_shrinkage) so that the second run has to extend
  the arena for the block, and the block's size is read from the BFC arena's "Extending
  BFCArena ... (requested) num_bytes" log line of the second run. "-" means the block fitted
  into the arena's initial region (never shrunk), so its size did not show.
- onnxsim: ``onnxsim.memory_planning.plan_activation_memory`` (onnxsim 0.8.1), given the
  same model with constant subgraphs folded into initializers and inputs fixed. Its
  convention differs: graph inputs and outputs are in its arena, no views or in-place.
"""

from __future__ import annotations

import copy
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import onnx

from benchmarks.common import bench_args, light_models, report, zoo_model

MIB = 1 << 20
ORT_BLOCK = re.compile(r"\(requested\) num_bytes: (\d+)")


def _fixed(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    from opc.memory import _fix_inputs

    return _fix_inputs(model, shapes, with_weights=True)[0]


def ort_pattern_bytes(path: str, level: str = "all", min_bytes: int = 0) -> int | None:
    """ONNX Runtime's memory-pattern block for the model at ``path`` (inputs already fixed),
    with ORT's graph optimizations at ``level`` ("all": the default; "extended": no NCHWc
    layout change)."""
    code = (
        "import sys, onnx, onnxruntime as ort\n"
        "from opc.ort import seeded_feeds\n"
        "ort.set_default_logger_severity(0)\n"
        "m = onnx.load(sys.argv[1])\n"
        "so = ort.SessionOptions(); so.log_severity_level = 0; so.intra_op_num_threads = 1\n"
        "so.enable_mem_pattern = True\n"
        "if sys.argv[2] == 'extended':\n"
        "    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED\n"
        "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
        "names = {i.name for i in s.get_inputs()}\n"
        "feeds = {k: v for k, v in seeded_feeds(m).items() if k in names}\n"
        "ro = ort.RunOptions(); ro.add_run_config_entry('memory.enable_memory_arena_shrinkage', 'cpu:0')\n"
        "for r in range(2):\n"
        "    sys.stderr.write(f'@@RUN {r}\\n'); sys.stderr.flush()\n"
        "    s.run(None, feeds, ro)\n"
        "sys.stderr.write('@@END\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, path, level], capture_output=True, text=True, timeout=600)
    if "@@END" not in proc.stderr:
        raise RuntimeError(f"ORT probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    first = proc.stderr.split("@@RUN 0", 1)[1].split("@@RUN 1", 1)[0]
    second = proc.stderr.split("@@RUN 1", 1)[1].split("@@END", 1)[0]
    run0 = [int(x) for x in ORT_BLOCK.findall(first)]
    run1 = [int(x) for x in ORT_BLOCK.findall(second)]
    # the block is the second run's first extension, and holds at least the largest tensor
    # (of the first run, and of the model: ``min_bytes``)
    if run1 and run1[0] >= max(run0 + [min_bytes]):
        return run1[0]
    return None


def ort_optimized(path: str, out: str) -> onnx.ModelProto:
    """The graph ONNX Runtime runs at the "extended" level (fusions, no layout change)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = out
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return onnx.load(out)


def fold_constants(model: onnx.ModelProto, constants: list[str]) -> onnx.ModelProto:
    """The model with every constant-only node replaced by initializers (values from ORT)."""
    from onnx import numpy_helper

    from opc.ort import make_session, seeded_feeds

    const = set(constants)
    g = model.graph
    needed = sorted({i for n in g.node if not all(o in const for o in n.output if o)
                     for i in n.input if i in const}
                    | {o.name for o in g.output if o.name in const})
    out = copy.deepcopy(model)
    if not needed:
        return out
    probe = copy.deepcopy(model)
    del probe.graph.output[:]
    for name in needed:
        probe.graph.output.add().name = name
    sess = make_session(probe, threads=1, optimize=False)
    feeds = {k: v for k, v in seeded_feeds(probe).items() if k in {i.name for i in sess.get_inputs()}}
    values = dict(zip(needed, sess.run(needed, feeds)))
    keep = [n for n in out.graph.node if not all(o in const for o in n.output if o) or not any(n.output)]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    for name, arr in values.items():
        out.graph.initializer.append(numpy_helper.from_array(arr, name))
    out.ir_version = max(out.ir_version, 4)  # initializers that are not graph inputs need IR 4
    return out


def onnxsim_arena(model: onnx.ModelProto) -> tuple[int | None, str]:
    try:
        from onnxsim.memory_planning import plan_activation_memory
    except ImportError:
        return None, "onnxsim 0.8.1 not installed (pip install onnxsim==0.8.1)"
    plan = plan_activation_memory(model)
    note = f"{len(plan.unplanned)} tensors unplanned" if plan.unplanned else ""
    return plan.arena_bytes, note


def bench_model(name: str, source: str, path: Path, repeats: int, with_ort: bool, with_onnxsim: bool = True) -> dict:
    from opc.memory import no_workspace, plan_model

    model = onnx.load(str(path))
    times = []
    plan = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = plan_model(model, workspace_fn=no_workspace, reorder=True)
        times.append(time.perf_counter() - t0)
    plan.check()
    why = [n for n in plan.notes if n.startswith("arena ")]
    row = {
        "model": name, "source": source, "nodes": len(model.graph.node), "tensors": len(plan.tensors),
        "arena MiB": plan.arena_size / MIB, "lower bound MiB": plan.lower_bound / MIB,
        "arena/LB": plan.arena_size / plan.lower_bound if plan.lower_bound else 1.0,
        "naive MiB": plan.naive_total / MIB,
        "reordered": any("reordered" in n for n in plan.notes),
        "strategy": plan.strategy, "plan ms": statistics.median(times) * 1000,
        "arena_bytes": plan.arena_size, "lower_bound_bytes": plan.lower_bound, "naive_bytes": plan.naive_total,
        "why": "; ".join(why) or "",
    }
    fixed = _fixed(model, plan.input_shapes)
    folded = fold_constants(fixed, plan.constants) if with_onnxsim else None
    tmp = Path(path).with_name(f".plan-bench-{Path(path).stem}.onnx")
    if with_ort:
        onnx.save(fixed, str(tmp))
        opt = tmp.with_name(tmp.stem + "-ortopt.onnx")
        try:
            largest = max((t.size for t in plan.tensors.values()), default=0)
            ort_bytes = ort_pattern_bytes(str(tmp), "all", largest)
            ort_ext = ort_pattern_bytes(str(tmp), "extended", largest)
            same = plan_model(ort_optimized(str(tmp), str(opt)), workspace_fn=no_workspace, reorder=True)
        finally:
            tmp.unlink(missing_ok=True)
            opt.unlink(missing_ok=True)
        row["ORT pattern MiB"] = ort_bytes / MIB if ort_bytes else None
        row["arena/ORT"] = plan.arena_size / ort_bytes if ort_bytes else None
        row["ORT ext pattern MiB"] = ort_ext / MIB if ort_ext else None
        row["arena on ORT graph MiB"] = same.arena_size / MIB
        row["same graph: arena/ORT"] = same.arena_size / ort_ext if ort_ext else None
        row["ort_pattern_bytes"] = ort_bytes
        row["ort_extended_pattern_bytes"] = ort_ext
        row["arena_on_ort_graph_bytes"] = same.arena_size
        row["arena_on_ort_graph_at_lb"] = same.arena_size == same.lower_bound
    if row.get("arena/ORT") and row["arena/ORT"] > 1 and (row.get("same graph: arena/ORT") or 2) <= 1:
        row["why"] = ("above ORT: ORT runs a rewritten graph (e.g. Pad fused into Conv); on ORT's graph "
                      f"the arena is {row['same graph: arena/ORT']:.3f}x ORT's")
    sim, note = onnxsim_arena(folded) if with_onnxsim else (None, "")
    row["onnxsim MiB"] = sim / MIB if sim is not None else None
    row["arena/onnxsim"] = plan.arena_size / sim if sim else None
    row["onnxsim_bytes"] = sim
    if note:
        row["why"] = "; ".join(x for x in (row["why"], f"onnxsim: {note}") if x)
    return row


def main(argv=None):
    def extra(p):
        p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime memory-pattern probe")
        p.add_argument("--no-zoo", action="store_true", help="light models only (no torch export)")

    args = bench_args("memory planning: arena vs lower bound, ORT and onnxsim", argv=argv, extra=extra)
    repeats = 1 if args.quick else 3
    targets: list[tuple[str, str, Path]] = []
    wanted = set(args.models) if args.models else None
    for p in light_models():
        short = p.stem.removeprefix("light_")
        if wanted is None or short in wanted:
            targets.append((short, "light", p))
    if not args.no_zoo:
        from opc.models import list_models

        for name in list_models():
            if wanted is not None and name not in wanted:
                continue
            if args.quick and name not in ("mobilenetv2", "digits-cnn"):
                continue
            try:
                targets.append((name, "zoo", zoo_model(name)))
            except Exception as exc:  # noqa: BLE001 - a missing extra should not stop the table
                print(f"skipping zoo model {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    rows = []
    for name, source, path in targets:
        try:
            rows.append(bench_model(name, source, path, repeats, not args.no_ort))
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": name, "source": source, "why": f"failed: {type(exc).__name__}: {exc}"})
        print(f"  {name}: done", file=sys.stderr)
    columns = ["model", "source", "nodes", "tensors", "arena MiB", "lower bound MiB", "arena/LB", "naive MiB",
               "ORT pattern MiB", "arena/ORT", "ORT ext pattern MiB", "arena on ORT graph MiB",
               "same graph: arena/ORT", "onnxsim MiB", "arena/onnxsim", "reordered", "strategy", "plan ms", "why"]
    at_bound = sum(1 for r in rows if r.get("arena/LB") == 1.0)
    notes = [
        f"arena = lower bound on {at_bound} of {len(rows)} models; worst arena/LB "
        f"{max((r.get('arena/LB') or 1.0) for r in rows):.4f}.",
        "ORT pattern: ONNX Runtime's CPU memory-pattern block (the second run allocates all activations "
        "as one block; size read from the BFC arena's verbose log after shrinking the arena; '-' where the "
        "block fitted in the arena's first region and did not show). ORT plans its own optimized graph "
        "(default level: fusions such as Conv+BN+Relu and Pad+Conv, folded constants, NCHWc layout).",
        "Same graph: our arena for the graph ORT runs at the 'extended' level (saved with "
        "optimized_model_filepath), against ORT's pattern at that level.",
        "onnxsim: onnxsim 0.8.1's plan_activation_memory on the same model with constants folded; its arena "
        "also holds the graph inputs and outputs and has no views or in-place.",
        "Weights (initializers and constant-only subgraphs such as the light models' ConstantOfShape weights) "
        "are outside every arena here.",
    ]
    report("plan", rows, columns=columns, title="Memory planning (batch 1, no workspaces)",
           settings={"repeats": repeats, "alignment": 256, "reorder": True}, notes=notes,
           write_json=not args.no_json)


if __name__ == "__main__":
    main()
