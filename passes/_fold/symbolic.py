"""Dynamic shape folding: shape tensors computed from Shape ops are traced symbolically
(each element an int, a symbolic dim name from the re-inferred shapes, or unknown).

- ``dynamic_shapes_folded``: a Reshape whose computed target only repeats the input's
  own (dynamic) dims gets a constant target, using 0 ("copy this dim", allowzero=0)
  for a dim equal to the input's dim at the same position and -1 for at most one
  other; an Expand whose computed shape only repeats the input's dims (or 1) gets a
  constant shape of 1s for those. The result is correct for every input size, and the
  Shape/Gather/Concat chain that built the target dies.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from opc.passes._fold.core import State, const, is_default_domain, producer

UNKNOWN = None


def symbolic(state: State, t: gs.Tensor, depth: int = 0):
    """(elements, is_scalar) of a small int tensor, or None. Elements: int, str or None."""
    if depth > 16:
        return None
    value = const(t)
    if value is not None:
        if value.dtype.kind not in "iu" or value.ndim > 1 or value.size > 64:
            return None
        return [int(v) for v in value.reshape(-1)], value.ndim == 0
    node = producer(t)
    if node is not None and is_default_domain(node) and len(node.outputs) == 1:
        found = _through(state, node, depth)
        if found is not None:
            return found
    shape = state.static_shape(t)
    if shape is None or len(shape) > 1 or (shape and shape[0] > 64):
        return None
    return [UNKNOWN] * (shape[0] if shape else 1), len(shape) == 0


def _through(state: State, node: gs.Node, depth: int):
    op = node.op
    if op == "Shape":
        dims = state.shape(node.inputs[0])
        if dims is None:
            return None
        rank = len(dims)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return list(dims[start:end]), False
    if op == "Cast" and node.attrs.get("to") in (6, 7):  # int32/int64
        return symbolic(state, node.inputs[0], depth + 1)
    if op == "Concat" and node.attrs.get("axis", 0) in (0, -1):
        parts = [symbolic(state, t, depth + 1) for t in node.inputs]
        if any(p is None or p[1] for p in parts):
            return None
        return [e for p in parts for e in p[0]], False
    if op == "Gather" and node.attrs.get("axis", 0) == 0:
        data, idx = symbolic(state, node.inputs[0], depth + 1), const(node.inputs[1])
        if data is None or idx is None or data[1] or idx.ndim > 1:
            return None
        try:
            picked = [data[0][int(i)] for i in idx.reshape(-1)]
        except IndexError:
            return None
        return picked, idx.ndim == 0
    if op in ("Unsqueeze", "Squeeze"):
        data = symbolic(state, node.inputs[0], depth + 1)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = const(node.inputs[1])
        if data is None or axes is None or list(np.asarray(axes).reshape(-1)) not in ([0], [-1]):
            return None
        if op == "Unsqueeze" and data[1]:
            return data[0], False
        if op == "Squeeze" and not data[1] and len(data[0]) == 1:
            return data[0], True
        return None
    if op == "Slice" and len(node.inputs) >= 3:
        data = symbolic(state, node.inputs[0], depth + 1)
        params = [const(t) if t.name else None for t in node.inputs[1:5]]
        if data is None or data[1] or params[0] is None or params[1] is None:
            return None
        if len(params) > 2 and params[2] is not None and list(params[2].reshape(-1)) not in ([0], [-1]):
            return None
        step = int(params[3].reshape(-1)[0]) if len(params) > 3 and params[3] is not None else 1
        big = 2**62
        s, e = (max(min(int(p.reshape(-1)[0]), big), -big) for p in params[:2])
        return data[0][s:e:step], False
    return None


def dynamic_shapes_folded(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op not in ("Reshape", "Expand") or not is_default_domain(node) or len(node.inputs) != 2:
            continue
        target = node.inputs[1]
        if const(target) is not None:
            continue
        sym = symbolic(state, target)
        dims = state.shape(node.inputs[0])
        if sym is None or sym[1]:
            continue
        if node.op == "Reshape":
            new = _reshape_target(sym[0], dims, node.attrs.get("allowzero", 0))
        else:
            new = _expand_target(sym[0], dims)
        if new is None:
            continue
        node.inputs[1] = gs.Constant(state.fresh(target.name), np.array(new, dtype=np.int64))
        state.stats["dynamic_shapes_folded"] += 1


def _reshape_target(elems, dims, allowzero):
    new, unknown = [], 0
    for k, e in enumerate(elems):
        if isinstance(e, int):
            if e == 0 and allowzero:
                return None  # a literal 0 dim would need allowzero semantics kept exactly
            unknown += e == -1
            new.append(e)
        elif isinstance(e, str) and not allowzero and dims is not None and k < len(dims) and dims[k] == e:
            new.append(0)
        else:
            unknown += 1
            new.append(-1)
    return new if unknown <= 1 else None


def _expand_target(elems, dims):
    if dims is None:
        return None
    new = []
    offset = len(elems) - len(dims)
    for k, e in enumerate(elems):
        if isinstance(e, int):
            new.append(e)
            continue
        j = k - offset
        if isinstance(e, str) and 0 <= j < len(dims) and dims[j] == e:
            new.append(1)
        else:
            return None
    return new
