"""Sharing: identical initializers and identical computations are kept once.

- ``initializers_deduplicated``: initializers with the same type, shape and bytes, used
  only inside one graph, are merged.
- ``subexpressions_merged``: two nodes with the same op, attributes and inputs (in the
  same graph, deterministic, default domain, without subgraphs) are merged.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from opc.passes._fold.core import NONDETERMINISTIC, State, is_default_domain, replace_tensor, subgraphs

_MAX_DEDUP_BYTES = 1 << 30


def _local_constants(graph: gs.Graph) -> list[gs.Constant]:
    nodes = {id(n) for n in graph.nodes}
    seen, out = set(), []
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                if all(id(c) in nodes for c in t.outputs):
                    out.append(t)
    return out


def initializers_deduplicated(state: State, graph: gs.Graph) -> None:
    keep: dict[tuple, gs.Constant] = {}
    candidates = [t for t in _local_constants(graph) if id(t) not in state.pinned]
    buckets: dict[tuple, int] = {}
    for t in candidates:
        key = (np.dtype(t.dtype).str, tuple(t.shape))
        buckets[key] = buckets.get(key, 0) + 1
    for t in candidates:
        if buckets[(np.dtype(t.dtype).str, tuple(t.shape))] < 2:
            continue  # nothing of its type and shape to share with: skip reading its bytes
        value = np.asarray(t.values)
        if value.nbytes > _MAX_DEDUP_BYTES or value.dtype.kind == "O":
            continue
        key = (value.dtype.str, value.shape, hashlib.sha1(value.tobytes()).hexdigest())
        first = keep.setdefault(key, t)
        if first is not t and np.array_equal(np.asarray(first.values), value, equal_nan=value.dtype.kind == "f"):
            replace_tensor(state, t, first)
            state.stats["initializers_deduplicated"] += 1


def _attr_key(value):
    if isinstance(value, gs.Constant):
        v = np.asarray(value.values)
        return ("T", v.dtype.str, v.shape, v.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, (np.ndarray,)):
        return ("A", value.dtype.str, value.shape, value.tobytes())
    return (type(value).__name__, value)


def subexpressions_merged(state: State, graph: gs.Graph) -> None:
    seen: dict[tuple, gs.Node] = {}
    for node in list(graph.nodes):
        if (not node.outputs or not is_default_domain(node) or node.op in NONDETERMINISTIC
                or subgraphs(node) or any(id(o) in state.pinned for o in node.outputs)):
            continue
        try:
            attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
            key = (node.op, node.domain or "", tuple(id(t) for t in node.inputs),
                   tuple(bool(o.name) for o in node.outputs), attrs)
            hash(key)
        except TypeError:
            continue
        first = seen.setdefault(key, node)
        if first is node:
            continue
        for old, new in zip(list(node.outputs), first.outputs):
            if old.name:
                replace_tensor(state, old, new)
        node.inputs.clear()
        node.outputs.clear()
        state.stats["subexpressions_merged"] += 1
