"""plan: decide where every intermediate tensor lives in one arena (see opc.memory).

What the pass does (the planning rules themselves are documented in ``opc.memory``):
- plans the arena for ``--input-shapes`` (symbolic dims not given are planned as 1, with a
  warning) and stores the plan as compact JSON in the model's metadata_props under
  ``opc.memory_plan``; ONNX Runtime ignores it;
- ``reorder``: when a memory-aware topological order of independent branches lowers the
  peak of live bytes, the graph's nodes are put in that order (``nodes_reordered``) so that
  the stored order is the file's order; otherwise the graph is left untouched;
- statistics: ``arena_bytes``, ``lower_bound_bytes``, ``naive_bytes``, ``tensors_planned``,
  ``views``, ``inplace``, ``workspaces``, ``nodes_reordered`` (the planning time goes to the report's details).
The values computed never change, so the pass is exact; it must run last, because any
later rewrite would make the stored plan stale (``opc.memory.load_plan`` then ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from opc.errors import ModelError
from opc.memory import ALIGNMENT, META_KEY, STRATEGIES, no_workspace, plan_model
from opc.pass_api import Pass, PassContext, PassResult, option


@dataclass
class Plan(Pass):
    """Plan the activation arena and store the plan in the model."""

    name: ClassVar[str] = "plan"
    summary: ClassVar[str] = "memory liveness planning: one arena for all intermediate tensors"
    exact: ClassVar[bool] = True
    position: ClassVar[str] = "last"

    strategies: tuple[str, ...] = option(STRATEGIES, "offset strategies to try (the smallest arena wins): "
                                         + ", ".join(STRATEGIES))
    time_limit: float = option(0.5, "seconds the improvement search may spend", low=0.0, high=600.0)
    reorder: bool = option(True, "reorder independent branches when that lowers the peak")
    workspaces: bool = option(True, "reserve per-node workspaces asked for by opc.runtime")
    alignment: int = option(ALIGNMENT, "byte alignment of every offset (a power of two)", low=1, high=1 << 20)
    seed: int = option(0, "seed of the improvement search", low=0)

    def run(self, graph, ctx: PassContext) -> PassResult:
        model = ctx.to_model(graph)
        kwargs = dict(input_shapes=ctx.input_shapes or None,
                      workspace_fn=None if self.workspaces else no_workspace,
                      strategies=self.strategies, time_limit=self.time_limit,
                      alignment=self.alignment, seed=self.seed)
        try:
            plan = plan_model(model, reorder=self.reorder, **kwargs)
        except ModelError as exc:
            # a graph whose shapes cannot be known is still compiled, just without a plan
            return PassResult(modified=False, stats={"tensors_planned": 0},
                              warnings=[f"no memory plan stored: {exc}"])
        moved = sum(1 for i, n in enumerate(plan.order) if i != n)
        plan_ms = plan.plan_time_s * 1000
        result_graph = None
        if moved:
            # store the graph in the planned order, so the plan's order is the file's order
            nodes = list(graph.nodes)
            graph.nodes = [nodes[i] for i in plan.order]
            model = ctx.to_model(graph)
            plan = plan_model(model, reorder=False, **kwargs)
            plan_ms += plan.plan_time_s * 1000
            result_graph = graph
        warnings = list(plan.notes)
        ctx.metadata[META_KEY] = plan.to_json()
        kinds = [s.kind for s in plan.tensors.values()]
        stats = {
            "arena_bytes": plan.arena_size,
            "lower_bound_bytes": plan.lower_bound,
            "naive_bytes": plan.naive_total,
            "tensors_planned": len(plan.tensors),
            "views": kinds.count("view"),
            "inplace": kinds.count("inplace"),
            "workspaces": len(plan.workspaces),
            "nodes_reordered": moved,
        }
        # timings stay out of stats: stats go into the model, which must be reproducible
        details = {"memory_plan": {"plan_ms": round(plan_ms, 1), "strategy": plan.strategy, "strategy_sizes": plan.strategy_sizes,
                                   "input_shapes": {k: list(v) for k, v in plan.input_shapes.items()},
                                   "notes": plan.notes}}
        return PassResult(modified=bool(moved), stats=stats, graph=result_graph, details=details,
                          warnings=warnings)
