"""No-op removal and merging of consecutive layout/type ops.

- ``identity_removed``: Identity.
- ``dropout_removed``: Dropout in inference (no training input, mask unused).
- ``noops_removed``: Cast to the same type, Reshape/Flatten/Expand/Tile/Pad/Slice that
  change nothing, Transpose with the identity permutation, one-input Concat, Add/Sub of
  zero and Mul/Div by one that neither broadcast nor change the type.
- ``reshapes_merged``: Reshape(Reshape|Flatten|Squeeze|Unsqueeze(x), s) -> Reshape(x, s)
  when s has no 0 entry (a Reshape only reads its input's element order).
- ``transposes_merged``: Transpose(Transpose(x, p), q) -> Transpose(x, p[q]).
- ``casts_merged``: Cast(Cast(x, A), B) -> Cast(x, B) when A holds every value of x exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from opc.passes._fold.core import State, const, is_default_domain, producer, replace_tensor

T = onnx.TensorProto
# lossless conversions: a value of the key type survives a round trip through any listed type
_WIDER = {
    T.BOOL: {T.INT8, T.INT16, T.INT32, T.INT64, T.UINT8, T.UINT16, T.UINT32, T.UINT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.INT8: {T.INT16, T.INT32, T.INT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.UINT8: {T.INT16, T.INT32, T.INT64, T.UINT16, T.UINT32, T.UINT64, T.FLOAT16, T.FLOAT, T.DOUBLE},
    T.INT16: {T.INT32, T.INT64, T.FLOAT, T.DOUBLE},
    T.UINT16: {T.INT32, T.INT64, T.UINT32, T.UINT64, T.FLOAT, T.DOUBLE},
    T.INT32: {T.INT64, T.DOUBLE},
    T.UINT32: {T.INT64, T.UINT64, T.DOUBLE},
    T.FLOAT16: {T.FLOAT, T.DOUBLE},
    T.BFLOAT16: {T.FLOAT, T.DOUBLE},
    T.FLOAT: {T.DOUBLE},
}


def _bypass(state: State, node: gs.Node, src: gs.Tensor, stat: str) -> bool:
    """Replace the node's first output by ``src`` and drop the node."""
    dst = node.outputs[0]
    if not replace_tensor(state, dst, src):
        return False
    node.inputs.clear()
    node.outputs.clear()
    state.stats[stat] += 1
    return True


def _only_first_output_used(node: gs.Node) -> bool:
    return all(not o.outputs for o in node.outputs[1:])


def noops(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if not node.outputs or not node.inputs or not is_default_domain(node):
            continue
        if node.op == "Identity":
            _bypass(state, node, node.inputs[0], "identity_removed")
        elif node.op == "Dropout":
            training = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            off = training is None or (const(training) is not None and not bool(const(training)))
            if off and _only_first_output_used(node) and not any(id(o) in state.pinned for o in node.outputs[1:]):
                _bypass(state, node, node.inputs[0], "dropout_removed")
        elif len(node.outputs) == 1 and _is_noop(state, node):
            _bypass(state, node, node.inputs[0], "noops_removed")


def _same_shape(state: State, node: gs.Node) -> bool:
    a = state.static_shape(node.inputs[0])
    b = state.static_shape(node.outputs[0])
    return a is not None and a == b


def _is_noop(state: State, node: gs.Node) -> bool:
    op, x = node.op, node.inputs[0]
    xtype, otype = state.elem_type(x), state.elem_type(node.outputs[0])
    if op == "Cast":
        return bool(xtype) and node.attrs.get("to") == xtype
    if op == "CastLike" and len(node.inputs) == 2:
        return bool(xtype) and xtype == state.elem_type(node.inputs[1])
    if op == "Transpose":
        rank = len(state.shape(x)) if state.shape(x) is not None else None
        perm = node.attrs.get("perm")
        if perm is None:
            return rank is not None and rank <= 1
        return list(perm) == list(range(len(perm)))
    if op == "Concat":
        return len(node.inputs) == 1
    if op == "Reshape" and len(node.inputs) == 2:
        return _reshape_noop(state, node)
    if op in ("Flatten", "Squeeze", "Unsqueeze"):
        return _same_shape(state, node)
    if op == "Expand" and len(node.inputs) == 2:
        return _expand_noop(state, node)
    if op == "Tile" and len(node.inputs) == 2:
        reps = const(node.inputs[1])
        return reps is not None and bool(np.all(reps == 1))
    if op == "Pad":
        pads = const(node.inputs[1]) if len(node.inputs) > 1 else np.array(node.attrs.get("pads", [1]))
        return pads is not None and pads.size > 0 and bool(np.all(pads == 0))
    if op == "Slice":
        return _same_shape(state, node) and _slice_steps_one(node) or _slice_noop(state, node)
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        return _neutral(state, node, xtype, otype)
    return False


def _reshape_noop(state: State, node: gs.Node) -> bool:
    if _same_shape(state, node):
        return True
    target, dims = const(node.inputs[1]), state.shape(node.inputs[0])
    if target is None or dims is None or target.ndim != 1 or len(target) != len(dims):
        return False
    if node.attrs.get("allowzero", 0):
        return False
    unknown = 0
    for t, d in zip(target.tolist(), dims):
        if t == 0 or (isinstance(d, int) and t == d):
            continue
        if t == -1:
            unknown += 1
            continue
        return False
    return unknown <= 1


def _expand_noop(state: State, node: gs.Node) -> bool:
    target, dims = const(node.inputs[1]), state.shape(node.inputs[0])
    if target is None or dims is None or len(target) > len(dims):
        return False
    for t, d in zip(target.tolist()[::-1], list(dims)[::-1]):
        if t != 1 and not (isinstance(d, int) and t == d):
            return False
    return True


def _slice_noop(state: State, node: gs.Node) -> bool:
    """Every sliced axis runs from 0 to its end with step 1 (dynamic dims included)."""
    if len(node.inputs) < 3 or not _slice_steps_one(node):
        return False
    starts, ends = const(node.inputs[1]), const(node.inputs[2])
    dims = state.shape(node.inputs[0])
    if starts is None or ends is None or dims is None:
        return False
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = const(node.inputs[3])
        if axes is None:
            return False
    else:
        axes = np.arange(len(starts))
    for a, s, e in zip(axes.reshape(-1), starts.reshape(-1), ends.reshape(-1)):
        d = dims[int(a) % len(dims)] if len(dims) else None
        if s != 0 or not (e >= 2**31 - 1 or (isinstance(d, int) and e >= d)):
            return False
    return True


def _slice_steps_one(node: gs.Node) -> bool:
    if len(node.inputs) > 4 and node.inputs[4].name:
        steps = const(node.inputs[4])
        return steps is not None and bool(np.all(steps == 1))
    return True


def _neutral(state: State, node: gs.Node, xtype: int, otype: int) -> bool:
    a, b = node.inputs
    # x op c with c neutral; for Add/Mul also c op x (Sub/Div are not symmetric)
    for x, c in ((a, b), (b, a)) if node.op in ("Add", "Mul") else ((a, b),):
        value = const(c)
        if value is None or value.size == 0:
            continue
        neutral = 0 if node.op in ("Add", "Sub") else 1
        if not np.all(value == neutral):
            continue
        dims = state.shape(x)
        if dims is None or not xtype or state.elem_type(c) != xtype or value.ndim > len(dims):
            continue
        # the constant must not broadcast x to a bigger shape
        if all(cd == 1 or (isinstance(xd, int) and cd == xd) for cd, xd in zip(value.shape[::-1], dims[::-1])):
            if x is not a:
                node.inputs[0], node.inputs[1] = b, a  # the bypass forwards input 0
            return True
    return False


def merges(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if not node.inputs or not node.outputs or not is_default_domain(node):
            continue
        first = producer(node.inputs[0])
        if first is None or not is_default_domain(first) or len(first.outputs) != 1:
            continue
        if node.op == "Reshape" and first.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") and (
                len(first.inputs) < 2 or first.op != "Reshape" or not first.attrs.get("allowzero", 0)):
            target = const(node.inputs[1]) if len(node.inputs) > 1 else None
            if target is None or (np.any(target == 0) and not node.attrs.get("allowzero", 0)):
                continue
            node.inputs[0] = first.inputs[0]
            state.stats["reshapes_merged"] += 1
        elif node.op == "Transpose" and first.op == "Transpose":
            p, q = first.attrs.get("perm"), node.attrs.get("perm")
            if p is None or q is None:
                continue
            node.attrs["perm"] = [int(p[i]) for i in q]
            node.inputs[0] = first.inputs[0]
            state.stats["transposes_merged"] += 1
        elif node.op == "Cast" and first.op == "Cast":
            src = state.elem_type(first.inputs[0])
            mid = first.attrs.get("to")
            if not src or mid not in _WIDER.get(src, ()) or first.attrs.get("saturate", 1) != 1:
                continue
            node.inputs[0] = first.inputs[0]
            state.stats["casts_merged"] += 1


def _axes(node: gs.Node):
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = const(node.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    return None


def unsqueezes_merged(state: State, graph: gs.Graph) -> None:
    """Unsqueeze(Unsqueeze(x, a), b) -> Unsqueeze(x, a') (stat ``unsqueezes_merged``)."""
    for node in list(graph.nodes):
        if node.op != "Unsqueeze" or not is_default_domain(node) or not node.inputs:
            continue
        first = producer(node.inputs[0])
        if first is None or first.op != "Unsqueeze" or not is_default_domain(first) or len(first.outputs) != 1:
            continue
        a1, a2, dims = _axes(first), _axes(node), state.shape(first.inputs[0])
        if a1 is None or a2 is None or dims is None:
            continue
        r1 = len(dims) + len(a1)
        rank = r1 + len(a2)
        a1 = sorted(a % r1 for a in a1)
        a2 = sorted(a % rank for a in a2)
        kept = [i for i in range(rank) if i not in a2]
        combined = sorted(set(a2) | {kept[j] for j in a1})
        if len(combined) != len(a1) + len(a2):
            continue
        node.inputs[0] = first.inputs[0]
        if "axes" in node.attrs:
            node.attrs["axes"] = combined
        else:
            node.inputs[1] = gs.Constant(state.fresh(node.inputs[1].name), np.array(combined, dtype=np.int64))
        state.stats["unsqueezes_merged"] += 1


# optional inputs whose documented default is all zeros: (op, input index)
_ZERO_DEFAULTS = {("Conv", 2), ("ConvTranspose", 2), ("Gemm", 2), ("LSTM", 3), ("LSTM", 5), ("LSTM", 6),
                  ("LSTM", 7), ("GRU", 3), ("GRU", 5), ("RNN", 3), ("RNN", 5)}
# ops that keep an all-zeros input all zeros (any shape arguments)
_ZERO_PRESERVING = {"Slice", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Tile",
                    "Identity", "Cast", "Gather", "Concat"}


def is_zeros(t: gs.Tensor, depth: int = 0) -> bool:
    """True when every element of t is zero, whatever its (possibly dynamic) shape."""
    value = const(t)
    if value is not None:
        return value.dtype.kind in "biuf" and value.size > 0 and not np.any(value)
    node = producer(t)
    if node is None or not is_default_domain(node) or depth > 8:
        return False
    if node.op == "ConstantOfShape":
        v = node.attrs.get("value")
        return v is None or not np.any(np.asarray(v.values))
    if node.op in _ZERO_PRESERVING and node.inputs:
        data = node.inputs if node.op == "Concat" else node.inputs[:1]
        return all(is_zeros(x, depth + 1) for x in data)
    return False


def default_inputs_dropped(state: State, graph: gs.Graph) -> None:
    """Zero biases and zero initial states are the ops' defaults: drop them
    (stat ``default_inputs_dropped``)."""
    for node in list(graph.nodes):
        if not is_default_domain(node):
            continue
        for i, t in enumerate(node.inputs):
            if (node.op, i) not in _ZERO_DEFAULTS or not t.name or not is_zeros(t):
                continue
            if node.op == "Gemm" and state.opset < 11:
                continue  # C became optional in opset 11
            if i == len(node.inputs) - 1:
                del node.inputs[i]
                while node.inputs and not node.inputs[-1].name:
                    del node.inputs[-1]
            else:
                node.inputs[i] = gs.Variable.empty()
            state.stats["default_inputs_dropped"] += 1
            break  # indices moved: the next round sees the rest


def transposes_as_reshapes(state: State, graph: gs.Graph) -> None:
    """A Transpose that only moves size-1 dims keeps the element order: it is a Reshape
    (a view, no copy), which then merges with neighbouring Reshapes
    (stat ``transposes_as_reshapes``)."""
    for node in list(graph.nodes):
        if node.op != "Transpose" or not is_default_domain(node) or len(node.inputs) != 1:
            continue
        dims, perm = state.shape(node.inputs[0]), node.attrs.get("perm")
        if dims is None or perm is None or len(perm) != len(dims) or list(perm) == list(range(len(perm))):
            continue
        moved = [int(p) for p in perm if dims[int(p)] != 1]
        if moved != sorted(moved):
            continue
        out = [dims[int(p)] for p in perm]
        dynamic = sum(not isinstance(d, int) for d in out)
        target, unknown = [], 0
        for k, d in enumerate(out):
            if isinstance(d, int):
                target.append(d)
            elif dynamic > 1 and k < len(dims) and isinstance(d, str) and dims[k] == d:
                target.append(0)  # the same symbolic dim at the same position: copy it
            else:
                unknown += 1  # -1 (never 0) when it is the only dynamic dim: merges better
                target.append(-1)
        if unknown > 1:
            continue
        node.op = "Reshape"
        node.attrs = {}
        node.inputs.append(gs.Constant(state.fresh(node.outputs[0].name + "_shape"), np.array(target, np.int64)))
        state.stats["transposes_as_reshapes"] += 1
