"""fold: meaning-preserving graph simplification.

Rewrite cases (each counted in its own statistic):
- ``identity_removed``: Identity(x) -> x
- ``dropout_removed``: Dropout(x) -> x in inference (ratio ignored, mask output unused)
- ``dead_nodes_removed``: nodes whose outputs reach no graph output
Graph input/output names and order are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_graphsurgeon as gs

from opc.pass_api import Pass, PassContext, PassResult, option


def _subgraph_names(graph: gs.Graph) -> set[str]:
    """Names of outer tensors that nested subgraphs reference (gs does not track them)."""
    used: set[str] = set()
    for node in graph.nodes:
        for attr in node.attrs.values():
            subs = attr if isinstance(attr, list) else [attr]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    for n in sub.nodes:
                        used.update(t.name for t in n.inputs)
                    used |= _subgraph_names(sub)
    return used


def _is_noop(node: gs.Node) -> bool:
    if node.op == "Identity" and len(node.inputs) == 1:
        return True
    if node.op == "Dropout":
        mask_used = len(node.outputs) > 1 and (node.outputs[1].outputs or False)
        training = node.inputs[2] if len(node.inputs) > 2 else None
        training_off = training is None or (isinstance(training, gs.Constant) and not bool(training.values))
        return not mask_used and training_off
    return False


@dataclass
class Fold(Pass):
    """Remove no-op nodes (Identity, inference Dropout) and dead code."""

    name: ClassVar[str] = "fold"
    summary: ClassVar[str] = "constant folding and simplification (no-ops, dead code)"
    remove_dead: bool = option(True, "remove nodes, initializers and values that reach no graph output")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"identity_removed": 0, "dropout_removed": 0, "dead_nodes_removed": 0}
        outer_refs = _subgraph_names(graph)
        graph_outputs = set(id(t) for t in graph.outputs)
        for node in list(graph.nodes):
            if not _is_noop(node):
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if dst.name in outer_refs:
                continue
            if id(dst) in graph_outputs:
                # keep the output name: make the producer of src write dst directly
                if (not src.inputs or id(src) in graph_outputs or src.name in outer_refs
                        or any(c is not node for c in src.outputs) or src in graph.inputs):
                    continue
                producer = src.inputs[0]
                producer.outputs[producer.outputs.index(src)] = dst
            else:
                for consumer in list(dst.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is dst:
                            consumer.inputs[i] = src
            node.inputs.clear()
            node.outputs.clear()
            stats["identity_removed" if node.op == "Identity" else "dropout_removed"] += 1
        removed = stats["identity_removed"] + stats["dropout_removed"]
        graph.nodes = [n for n in graph.nodes if n.inputs or n.outputs]  # the detached no-ops
        if self.remove_dead:
            before = len(graph.nodes)
            graph.cleanup(remove_unused_graph_inputs=False)
            stats["dead_nodes_removed"] = before - len(graph.nodes)
        return PassResult(modified=bool(removed or stats["dead_nodes_removed"]), stats=stats)
