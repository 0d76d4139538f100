"""Prunable layers and their weight matrices.

Every prunable weight is viewed as a matrix ``[outputs, reduction]`` whose rows are the
layer's output channels and whose columns are what one output sums over. For Conv the
column order is (kernel positions..., input channels of the group), so N:M groups of
consecutive columns run along input channels, the layout sparse tensor cores use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    node: gs.Node
    weight: gs.Constant
    bias: gs.Constant | None

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def output(self) -> gs.Variable:
        return self.node.outputs[0]

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def group(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.op in ("Conv", "ConvTranspose") else 1

    def transposed_b(self) -> bool:
        return self.op == "Gemm" and bool(self.node.attrs.get("transB", 0))

    # --- the matrix view -------------------------------------------------------------
    def to_matrix(self, w: np.ndarray | None = None) -> np.ndarray:
        w = self.weight.values if w is None else w
        if self.op == "Conv":
            return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        if self.op == "ConvTranspose":
            w = np.swapaxes(w, 0, 1)  # [out/g, in, k...]
            return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        if self.op == "Gemm":
            return w if self.transposed_b() else w.T
        return w.T  # MatMul: x[..., K] @ W[K, N]

    def from_matrix(self, mat: np.ndarray) -> np.ndarray:
        shape = self.weight.values.shape
        dtype = self.weight.values.dtype
        if self.op == "Conv":
            moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
            return np.ascontiguousarray(np.moveaxis(mat.reshape(moved), -1, 1)).astype(dtype)
        if self.op == "ConvTranspose":
            moved = (shape[1],) + tuple(shape[2:]) + (shape[0],)
            w = np.moveaxis(mat.reshape(moved), -1, 1)
            return np.ascontiguousarray(np.swapaxes(w, 0, 1)).astype(dtype)
        if self.op == "Gemm" and self.transposed_b():
            return np.ascontiguousarray(mat).astype(dtype)
        return np.ascontiguousarray(mat.T).astype(dtype)

    def channels_per_column_group(self) -> int:
        """Length of the innermost column run (input channels for convolutions)."""
        if self.op == "Conv":
            return self.weight.values.shape[1]
        if self.op == "ConvTranspose":
            return self.weight.values.shape[0]
        return self.to_matrix().shape[1]


def _const(t) -> gs.Constant | None:
    return t if isinstance(t, gs.Constant) else None


def find_layers(graph: gs.Graph) -> list[Layer]:
    """Conv/ConvTranspose/Gemm/MatMul nodes whose weight is a constant used only there.

    A weight shared by several nodes is left alone: pruning it for one would prune it
    for all, and reconstruction could not fit both.
    """
    layers = []
    for node in graph.nodes:
        if node.op not in LAYER_OPS or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        w = _const(node.inputs[1])
        if w is None or w.values.dtype.kind != "f" or len(w.outputs) != 1:
            continue
        if node.op in ("Gemm", "MatMul") and w.values.ndim != 2:
            continue
        if node.op in ("Conv", "ConvTranspose") and w.values.ndim < 3:
            continue
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            continue
        if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
            continue
        # a bias computed at run time stays None here: prunable, but never refitted
        bias = _const(node.inputs[2]) if node.op != "MatMul" and len(node.inputs) > 2 else None
        layers.append(Layer(node, w, bias))
    return layers


def topo_order(graph: gs.Graph) -> list[gs.Node]:
    """Nodes in a topological order, without reordering the graph itself."""
    produced_by = {}
    for node in graph.nodes:
        for t in node.outputs:
            produced_by[id(t)] = node
    order, state = [], {}
    for root in graph.nodes:
        if id(root) in state:
            continue
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                if state.get(id(node)) != 2:
                    state[id(node)] = 2
                    order.append(node)
                continue
            if id(node) in state:
                continue
            state[id(node)] = 1
            stack.append((node, True))
            for t in node.inputs:
                p = produced_by.get(id(t))
                if p is not None and id(p) not in state:
                    stack.append((p, False))
    return order


def conv_geometry(node: gs.Node, in_hw: tuple[int, ...], k_hw: tuple[int, ...]):
    """(pads_begin, pads_end, strides, dilations) for a 2-D Conv, auto_pad resolved."""
    nd = len(k_hw)
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-in_hw[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (k_hw[i] - 1) * dil[i] + 1 - in_hw[i])
            small, big = total // 2, total - total // 2
            begin.append(big if auto_pad == "SAME_LOWER" else small)
            end.append(small if auto_pad == "SAME_LOWER" else big)
    elif auto_pad == "VALID":
        begin, end = [0] * nd, [0] * nd
    else:
        pads = list(node.attrs.get("pads", [0] * 2 * nd))
        begin, end = pads[:nd], pads[nd:]
    return begin, end, strides, dil


def im2col(x: np.ndarray, node: gs.Node, kernel: tuple[int, int], group: int) -> np.ndarray:
    """Patches of a 2-D Conv input: [group, N*OH*OW, kh*kw*C/group] in matrix column order."""
    n, c, h, w = x.shape
    kh, kw = kernel
    (pt, pl), (pb, pr), (sh, sw), (dh, dw) = conv_geometry(node, (h, w), (kh, kw))
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cg = c // group
    # [N, OH, OW, kh, kw, C]: one strided slice per kernel position
    cols = np.empty((n, oh, ow, kh, kw, c), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            sl = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            cols[:, :, :, i, j, :] = sl.transpose(0, 2, 3, 1)
    cols = cols.reshape(n * oh * ow, kh * kw, group, cg)
    return np.ascontiguousarray(cols.transpose(2, 0, 1, 3)).reshape(group, n * oh * ow, kh * kw * cg)
