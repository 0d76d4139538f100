"""Fusion into weights: linear ops that follow a Conv/ConvTranspose/Gemm/MatMul are folded
into its weight and bias (computed in float64, stored in the weight's type).

- ``batchnorms_fused``: inference BatchNormalization after Conv, ConvTranspose (group 1),
  Gemm, or a 2-D MatMul (which becomes a Gemm).
- ``affine_fused``: Mul/Div by a per-output-channel constant scales the weight (and
  bias); Add/Sub of one shifts the bias; a 2-D MatMul followed by such an Add becomes
  a Gemm. The constant must not broadcast the output to a bigger shape.

Weights made by ConstantOfShape stay generated: a scaled uniform weight becomes an
``Expand`` of one value per channel, never a materialized tensor.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from opc.passes._fold.core import Lazy, State, const, emit_lazy, is_default_domain, lazy_of, producer, replace_tensor

FLOATS = (np.float16, np.float32, np.float64)


def _align(small: np.ndarray, rank: int) -> np.ndarray:
    return small.reshape((1,) * (rank - small.ndim) + small.shape)


def _scaled(w: Lazy, vec: np.ndarray, axis: int) -> Lazy:
    rank = len(w.shape)
    shape = [1] * rank
    shape[axis] = -1
    new = _align(w.small, rank).astype(np.float64) * vec.reshape(shape)
    return Lazy(new.astype(w.small.dtype), w.shape)


def _producer_of_input(state: State, node: gs.Node, ops: tuple[str, ...]):
    """The node's input produced by one of ``ops`` and consumed only here, and that producer."""
    for i, t in enumerate(node.inputs[:2]):
        p = producer(t)
        if (p is not None and p.op in ops and is_default_domain(p) and len(t.outputs) == 1
                and id(t) not in state.pinned and len(p.outputs) == 1):
            return i, p
    return None, None


def _weights(state: State, p: gs.Node):
    """(weight Lazy, bias Lazy or None, output-channel axis of the weight, channels)."""
    if len(p.inputs) < 2:
        return None
    w = lazy_of(p.inputs[1])
    if w is None or w.small.dtype.type not in FLOATS:
        return None
    b = None
    if len(p.inputs) > 2 and p.inputs[2].name:
        b = lazy_of(p.inputs[2])
        if b is None:
            return None
    if p.op == "Conv":
        axis = 0
    elif p.op == "ConvTranspose":
        if p.attrs.get("group", 1) != 1:
            return None
        axis = 1
    elif p.op == "Gemm":
        if len(w.shape) != 2:
            return None
        axis = 0 if p.attrs.get("transB", 0) else 1
    elif p.op == "MatMul":
        rank = state.shape(p.inputs[0])
        if len(w.shape) != 2 or rank is None or len(rank) != 2:
            return None
        axis = 1
    else:
        return None
    if len(w.shape) <= axis:
        return None
    return w, b, axis, w.shape[axis]


def _bias_vector(p: gs.Node, b: Lazy | None, channels: int):
    if b is None:
        return np.zeros(channels, np.float64)
    value = b.value().astype(np.float64)
    if p.op in ("Conv", "ConvTranspose") or value.size in (1, channels):
        return np.broadcast_to(value.reshape(-1), (channels,)).copy() if value.size in (1, channels) else None
    return None


def _rewrite(state: State, graph: gs.Graph, p: gs.Node, node: gs.Node, w: Lazy, axis: int,
             scale: np.ndarray | None, bias: np.ndarray, stat: str) -> bool:
    """Make p compute node's output: weight scaled by ``scale``, bias ``bias`` (float64)."""
    dtype = w.small.dtype
    new_w = _scaled(w, scale, axis) if scale is not None else None
    gemm_c = None
    if p.op == "Gemm":
        beta = float(p.attrs.get("beta", 1.0))
        if len(p.inputs) > 2 and p.inputs[2].name:
            c = lazy_of(p.inputs[2]).value().astype(np.float64)
            if beta == 0.0:
                return False
            c = c * (scale if scale is not None else 1.0) + bias / beta
        else:
            c = bias
            p.attrs["beta"] = 1.0
        gemm_c = c.astype(dtype)
    w_tensor = p.inputs[1]
    if new_w is not None:
        w_tensor = emit_lazy(state, graph, new_w, p.inputs[1].name)
        if w_tensor is None:
            return False
    if p.op == "Gemm":
        b_tensor = emit_lazy(state, graph, Lazy(gemm_c, gemm_c.shape), p.outputs[0].name + "_bias")
    else:
        b_tensor = emit_lazy(state, graph, Lazy(bias.astype(dtype), bias.shape), p.outputs[0].name + "_bias")
    if b_tensor is None:
        return False
    if p.op == "MatMul":
        p.op = "Gemm"
        p.attrs = {}
    p.inputs[1] = w_tensor
    if len(p.inputs) > 2:
        p.inputs[2] = b_tensor
    else:
        p.inputs.append(b_tensor)
    out, mid = node.outputs[0], p.outputs[0]
    node.inputs.clear()
    node_outs = list(node.outputs)
    node.outputs.clear()
    if not replace_tensor(state, out, mid):
        # cannot happen for a single-consumer intermediate, but never leave a dangling output
        node.inputs.append(mid)
        node.outputs.extend(node_outs)
        return False
    state.stats[stat] += 1
    return True


def batchnorms_fused(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "BatchNormalization" or not is_default_domain(node) or len(node.inputs) != 5:
            continue
        if node.attrs.get("training_mode", 0) or any(o.outputs or id(o) in state.pinned for o in node.outputs[1:]):
            continue
        if node.attrs.get("spatial", 1) != 1:
            continue
        p = producer(node.inputs[0])
        if (p is None or p.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or not is_default_domain(p)
                or len(node.inputs[0].outputs) != 1 or id(node.inputs[0]) in state.pinned):
            continue
        params = [lazy_of(t) for t in node.inputs[1:]]
        found = _weights(state, p)
        if found is None or any(v is None for v in params):
            continue
        w, b, axis, channels = found
        try:
            scale, beta, mean, var = (np.broadcast_to(v.value().astype(np.float64).reshape(-1), (channels,))
                                      for v in params)
        except ValueError:
            continue
        if any(v.small.dtype != w.small.dtype for v in params):
            continue
        eps = float(node.attrs.get("epsilon", 1e-5))
        f = scale / np.sqrt(var + eps)
        bias0 = _bias_vector(p, b, channels) if p.op != "Gemm" else np.zeros(channels)
        if bias0 is None:
            continue
        shift = beta - mean * f
        _rewrite(state, graph, p, node, w, axis, f, bias0 * f + shift if p.op != "Gemm" else shift,
                 "batchnorms_fused")


def affine_fused(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op not in ("Mul", "Div", "Add", "Sub") or not is_default_domain(node) or len(node.inputs) != 2:
            continue
        i, p = _producer_of_input(state, node, ("Conv", "ConvTranspose", "Gemm", "MatMul"))
        if p is None or (i == 1 and node.op in ("Sub", "Div")):
            continue
        c = lazy_of(node.inputs[1 - i])
        found = _weights(state, p)
        out_shape = state.shape(p.outputs[0])
        if c is None or found is None or out_shape is None:
            continue
        w, b, axis, channels = found
        if c.small.dtype != w.small.dtype:
            continue
        rank = len(out_shape)
        out_axis = 1 if p.op in ("Conv", "ConvTranspose") else rank - 1
        vec = _channel_vector(c, rank, out_axis, channels)
        if vec is None:
            continue
        if p.op == "MatMul" and node.op in ("Mul", "Div"):
            continue  # MatMul has no bias input; a Gemm would change nothing here
        bias0 = _bias_vector(p, b, channels) if p.op != "Gemm" else np.zeros(channels)
        if bias0 is None:
            continue
        if node.op in ("Mul", "Div"):
            if node.op == "Div":
                if np.any(vec == 0):
                    continue
                vec = 1.0 / vec
            if p.op == "Gemm":
                _rewrite(state, graph, p, node, w, axis, vec, np.zeros(channels), "affine_fused")
            else:
                _rewrite(state, graph, p, node, w, axis, vec, bias0 * vec, "affine_fused")
        else:
            shift = vec if node.op == "Add" else -vec
            if p.op == "Gemm":
                _rewrite(state, graph, p, node, w, axis, None, shift, "affine_fused")
            else:
                _rewrite(state, graph, p, node, w, axis, None, bias0 + shift, "affine_fused")


def _channel_vector(c: Lazy, rank: int, axis: int, channels: int):
    """The per-channel values of c when c only varies along ``axis`` of a rank-``rank`` output."""
    if len(c.shape) > rank:
        return None
    full = (1,) * (rank - len(c.shape)) + tuple(c.shape)
    if any(d != 1 for k, d in enumerate(full) if k != axis) or full[axis] not in (1, channels):
        return None
    small = _align(c.small, rank)
    vec = small.reshape(-1).astype(np.float64) if small.size == channels else np.full(channels, float(small.reshape(-1)[0]))
    if small.size not in (1, channels):
        return None
    return vec


def pads_fused(state: State, graph: gs.Graph) -> None:
    """Pad(x) with zeros on spatial dims only, feeding only a Conv, becomes the Conv's pads
    (stat ``pads_fused``)."""
    for node in list(graph.nodes):
        if node.op != "Conv" or not is_default_domain(node) or node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            continue
        x = node.inputs[0]
        pad = producer(x)
        if (pad is None or pad.op != "Pad" or not is_default_domain(pad) or len(x.outputs) != 1
                or id(x) in state.pinned or pad.attrs.get("mode", "constant") != "constant"):
            continue
        if len(pad.inputs) > 3 and pad.inputs[3].name:
            continue  # Pad-18 axes: keep it simple
        if "pads" in pad.attrs:
            pads, value = np.array(pad.attrs["pads"]), pad.attrs.get("value", 0.0)
        else:
            pads = const(pad.inputs[1]) if len(pad.inputs) > 1 else None
            value = 0.0
            if len(pad.inputs) > 2 and pad.inputs[2].name:
                cv = const(pad.inputs[2])
                value = None if cv is None or cv.size != 1 else float(cv.reshape(-1)[0])
        if pads is None or value is None or value != 0.0 or pads.size % 2:
            continue
        rank = pads.size // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or np.any(pads < 0) or begin[0] or begin[1] or end[0] or end[1]:
            continue
        spatial = rank - 2
        old = list(node.attrs.get("pads", [0] * (2 * spatial)))
        node.attrs["pads"] = [int(old[i] + begin[2 + i]) for i in range(spatial)] + [
            int(old[spatial + i] + end[2 + i]) for i in range(spatial)]
        node.inputs[0] = pad.inputs[0]
        state.stats["pads_fused"] += 1
