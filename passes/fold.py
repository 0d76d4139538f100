"""fold: meaning-preserving graph simplification, run to a fixed point.

Rewrite cases, each a named rule counted in its own statistic:
- ``constant_nodes``: Constant nodes become initializers.
- ``identity_removed``, ``dropout_removed``: Identity; Dropout in inference.
- ``noops_removed``: Cast/CastLike to the same type, Reshape/Flatten/Squeeze/Unsqueeze/Expand/Tile/
  Pad/Slice that change nothing, identity Transpose, one-input Concat, x+0, x-0, x*1, x/1.
- ``castlike_folded``: CastLike(c, x) needs only x's type: a constant c folds, and a
  computed one becomes a Cast.
- ``shapes_folded``: Shape/Size, and Gather/Slice of a Shape, whose dims are static in
  the re-inferred shapes (or ``--input-shapes``); dynamic dims stay computed.
- ``dynamic_shapes_folded``: a Reshape/Expand target computed from Shape ops that only
  repeats the input's own dynamic dims becomes a constant (0 = copy that dim, one -1).
- ``constants_folded``: nodes with all-constant inputs are evaluated (onnx reference
  evaluator) and become initializers, within the size policy below.
- ``generated_folded``: arithmetic/shape ops on ConstantOfShape-style values fold into
  one generator node instead of a materialized tensor.
- ``reshapes_merged``, ``transposes_merged``, ``casts_merged``, ``unsqueezes_merged``:
  consecutive ops merged where exact; ``transposes_as_reshapes``: a Transpose that only
  moves size-1 dims becomes a Reshape (then merged with its neighbours).
- ``batchnorms_fused``, ``affine_fused``: BatchNormalization and per-channel Mul/Div/Add/Sub
  folded into the preceding Conv/ConvTranspose/Gemm/MatMul weights and bias;
  ``pads_fused``: a zero Pad of spatial dims folded into the following Conv's pads.
- ``initializers_deduplicated``, ``subexpressions_merged``: identical initializers and
  identical nodes kept once.
- ``dead_nodes_removed``: nodes, initializers and values that reach no output.

Size policy: no folded value above ``size_limit_mb`` is materialized, and a generated
value (ConstantOfShape, Expand, Tile, Range...) becomes an initializer only when it is at
most ``generator_limit_kb`` or no bigger than its inputs, so folding never blows a small
file up. With ``--input-shapes`` the graph is specialized: those shapes are folded in
and written on the graph inputs. Shapes are re-inferred every round, ignoring the
exporter's value_info and output shapes; intermediate value_info is dropped (or, with
``value_info=true``, rewritten from the re-inferred shapes). Rules run inside If/Loop/Scan
bodies; graph input/output names and order, the opset and custom-domain nodes are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from opc.errors import PipelineError
from opc.pass_api import Pass, PassContext, PassResult, option
from opc.passes._fold import const as _const
from opc.passes._fold import cse as _cse
from opc.passes._fold import fuse as _fuse
from opc.passes._fold import noops as _noops
from opc.passes._fold import symbolic as _symbolic
from opc.passes._fold.core import State, infer_types, iter_graphs, pin_outputs

# (rule family, function); the order is one round of the fixed-point loop
RULES = (
    ("constants", _const.constant_nodes),
    ("noops", _noops.noops),
    ("noops", _noops.default_inputs_dropped),
    ("castlike", _const.castlike_folded),
    ("shapes", _const.shapes_folded),
    ("shapes", _symbolic.dynamic_shapes_folded),
    ("constants", _const.constants_folded),
    ("generated", _const.generated_folded),
    ("merges", _noops.merges),
    ("merges", _noops.transposes_as_reshapes),
    ("merges", _noops.unsqueezes_merged),
    ("fuse", _fuse.batchnorms_fused),
    ("fuse", _fuse.affine_fused),
    ("fuse", _fuse.pads_fused),
    ("cse", _cse.initializers_deduplicated),
    ("cse", _cse.subexpressions_merged),
)
FAMILIES = ("constants", "noops", "castlike", "shapes", "generated", "merges", "fuse", "cse", "dead")
STATS = ("constant_nodes", "identity_removed", "dropout_removed", "noops_removed", "default_inputs_dropped",
         "castlike_folded",
         "shapes_folded", "dynamic_shapes_folded", "constants_folded", "generated_folded", "reshapes_merged", "transposes_merged",
         "casts_merged", "unsqueezes_merged", "transposes_as_reshapes", "batchnorms_fused", "affine_fused", "pads_fused", "initializers_deduplicated",
         "subexpressions_merged", "dead_nodes_removed")


def count_nodes(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in iter_graphs(graph))


@dataclass
class Fold(Pass):
    """Constant folding, shape folding, no-op removal, fusion into weights, CSE, dead code."""

    name: ClassVar[str] = "fold"
    summary: ClassVar[str] = "constant/shape folding, no-ops, BatchNorm and affine fusion, CSE, dead code"
    size_limit_mb: float = option(16.0, "largest folded value written as an initializer (MiB)", low=0.0)
    generator_limit_kb: float = option(
        1.0, "ConstantOfShape-like values above this (KiB) stay generated unless no bigger than their inputs",
        low=0.0)
    skip: tuple[str, ...] = option((), f"rule families to leave out ({', '.join(FAMILIES)})")
    max_rounds: int = option(20, "most rounds of the fixed-point loop", low=1, high=1000)
    value_info: bool = option(False, "write the re-inferred shapes of intermediate values (else drop them)")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        unknown = [s for s in self.skip if s not in FAMILIES]
        if unknown:
            raise PipelineError(f"fold(skip=...): unknown rule family {unknown[0]!r} (known: {', '.join(FAMILIES)})")
        state = State(opset=graph.opset, size_limit=int(self.size_limit_mb * 2**20),
                      generator_limit=int(self.generator_limit_kb * 1024))
        for name in STATS:
            state.stats[name] = 0
        nodes_before = count_nodes(graph)
        rounds = 0
        for rounds in range(1, self.max_rounds + 1):
            done = sum(state.stats.values())
            _toposort(graph)
            state.types = infer_types(_export(graph, ctx), ctx.input_shapes)
            pin_outputs(state, graph)
            for family, rule in RULES:
                if family in self.skip:
                    continue
                for g in list(iter_graphs(graph)):
                    rule(state, g)
                _sweep(graph)
            if "dead" not in self.skip:
                before = count_nodes(graph)
                graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
                state.stats["dead_nodes_removed"] += before - count_nodes(graph)
            if sum(state.stats.values()) == done:
                break
        modified = any(state.stats.values())
        if modified and ctx.input_shapes:
            # the graph is specialized to these shapes now: say so in its input types
            for t in graph.inputs:
                if t.name in ctx.input_shapes and t.shape is not None:
                    t.shape = [int(d) for d in ctx.input_shapes[t.name]]
        if modified:
            _toposort(graph)
            types = infer_types(_export(graph, ctx), ctx.input_shapes) if self.value_info else {}
            _annotate(graph, types)
        details = {"fold": {"nodes_before": nodes_before, "nodes_after": count_nodes(graph), "rounds": rounds}}
        return PassResult(modified=modified, stats=dict(state.stats), details=details)


def _export(graph: gs.Graph, ctx: PassContext) -> onnx.ModelProto:
    if ctx.template is not None:
        return ctx.to_model(graph)
    return gs.export_onnx(graph, do_type_check=False)


def _toposort(graph: gs.Graph) -> None:
    try:
        graph.toposort(recurse_subgraphs=True)
    except Exception:  # a graph gs cannot order is left as it is; rules then see fewer chances
        pass


def _sweep(graph: gs.Graph) -> None:
    """Drop nodes that rules detached (no inputs and no outputs left)."""
    for g in iter_graphs(graph):
        if any(not n.outputs for n in g.nodes):
            g.nodes = [n for n in g.nodes if n.outputs]


def _annotate(graph: gs.Graph, types: dict) -> None:
    """Write the re-inferred types on intermediate values (never keep the exporter's)."""
    for g in iter_graphs(graph):
        io = {id(t) for t in list(g.inputs) + list(g.outputs)}
        for node in g.nodes:
            for t in node.outputs:
                if id(t) in io or not isinstance(t, gs.Variable):
                    continue
                entry = types.get(t.name)
                if entry is None or not entry[0]:
                    t.dtype, t.shape = None, None
                    continue
                try:
                    t.dtype = onnx.helper.tensor_dtype_to_np_dtype(entry[0])
                except Exception:
                    t.dtype, t.shape = None, None
                    continue
                t.shape = None if entry[1] is None else [d if d is not None else None for d in entry[1]]
