"""Structured channel pruning with dependency groups.

A *group* is a set of channels that must be removed together: the output channels of a
producer (Conv/ConvTranspose with group=1, Gemm, MatMul with a constant weight), followed
forward through per-channel ops (activations, BatchNormalization, pooling, depthwise
Conv, per-channel constants, Flatten/Reshape of trailing dimensions) to the consumers
whose inputs shrink (the next Conv/ConvTranspose/Gemm/MatMul). Residual Add/Mul tie the
groups of their operands into one; Concat lays several groups side by side. A group that
reaches anything else (a graph output, Reshape of the channel axis, Softmax, LayerNorm,
Transpose, Split, Shape, attention MatMul...) is not pruned at all.

Each tensor the analysis reaches gets a *layout*: its channel axis (negative, so that it
survives broadcasting) and the segments along it, ``(group or None, channels, repeat)``;
``repeat`` > 1 after a Flatten of spatial dimensions (channel c covers entries
c*repeat..c*repeat+repeat-1). ``None`` marks a fixed segment (a Concat input from
outside any group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from opc.passes._prune.layers import Layer, topo_order

UNARY = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Identity", "Gelu",
         "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Dropout", "Cast"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "PRelu", "Pow"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceLogSumExp",
          "ReduceSumSquare", "ReduceProd"}
POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}

Segment = tuple  # (gid | None, channels, repeat)


@dataclass
class Layout:
    axis: int  # negative
    segments: tuple[Segment, ...]

    @property
    def total(self) -> int:
        return sum(n * r for _, n, r in self.segments)

    def gids(self) -> list[int]:
        return [g for g, _, _ in self.segments if g is not None]


@dataclass
class Group:
    size: int
    producers: list[Layer] = field(default_factory=list)
    invalid: str | None = None


class Analysis:
    def __init__(self, graph: gs.Graph, layers: list[Layer], shapes: dict[str, list], excluded):
        self.graph = graph
        self.shapes = shapes
        self.parent: list[int] = []
        self.groups: list[Group] = []
        self.layouts: dict[int, Layout] = {}  # id(tensor) -> layout
        self.tensors: dict[int, gs.Tensor] = {}
        self.members: list[tuple] = []
        self.binary: list[gs.Node] = []
        self.pending_concat: list[gs.Node] = []
        self.work: list[gs.Tensor] = []
        self.outputs = {id(t) for t in graph.outputs}
        self.by_node = {id(layer.node): layer for layer in layers}
        self.excluded = excluded

    # --- union-find ------------------------------------------------------------------------
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        ga, gb = self.groups[ra], self.groups[rb]
        if ga.size != gb.size:
            ga.invalid = ga.invalid or f"tied groups of {ga.size} and {gb.size} channels"
        ga.producers += gb.producers
        ga.invalid = ga.invalid or gb.invalid

    def invalidate(self, layout: Layout | None, why: str) -> None:
        for g in layout.gids() if layout else []:
            root = self.groups[self.find(g)]
            root.invalid = root.invalid or why

    def new_group(self, size: int, producer: Layer) -> int:
        self.parent.append(len(self.groups))
        self.groups.append(Group(size, [producer]))
        return len(self.groups) - 1

    # --- shapes ------------------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> list | None:
        if isinstance(t, gs.Constant):
            return list(t.values.shape)
        s = self.shapes.get(t.name)
        if s is None and t.shape is not None:
            s = [d if isinstance(d, int) else None for d in t.shape]
        return s

    def rank(self, t) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    # --- propagation -------------------------------------------------------------------------
    def assign(self, t: gs.Tensor, layout: Layout) -> None:
        prev = self.layouts.get(id(t))
        if prev is None:
            self.layouts[id(t)] = layout
            self.tensors[id(t)] = t
            self.work.append(t)
            if id(t) in self.outputs:
                self.invalidate(layout, f"reaches graph output '{t.name}'")
            return
        same = prev.axis == layout.axis and len(prev.segments) == len(layout.segments) and all(
            a[1:] == b[1:] for a, b in zip(prev.segments, layout.segments))
        if not same:
            self.invalidate(prev, f"incompatible channel layouts meet at '{t.name}'")
            self.invalidate(layout, f"incompatible channel layouts meet at '{t.name}'")
            return
        for (ga, _, _), (gb, _, _) in zip(prev.segments, layout.segments):
            if ga is not None and gb is not None:
                self.union(ga, gb)
            elif ga is not None or gb is not None:
                lone = ga if ga is not None else gb
                self.invalidate(Layout(0, ((lone, 1, 1),)), f"meets fixed channels at '{t.name}'")

    def positive_axis(self, t, layout: Layout) -> int | None:
        r = self.rank(t)
        return None if r is None else r + layout.axis

    def run(self) -> None:
        for layer in self.by_node.values():
            if not producer_ok(layer):
                continue
            size = out_channels(layer)
            gid = self.new_group(size, layer)
            if self.excluded(layer):
                self.groups[gid].invalid = "excluded"
            axis = -(self.rank(layer.output) or 0) + 1 if layer.op in ("Conv", "ConvTranspose") else -1
            if layer.op in ("Conv", "ConvTranspose") and self.rank(layer.output) is None:
                self.groups[gid].invalid = "unknown output rank"
                continue
            self.members.append(("producer", layer))
            self.assign(layer.output, Layout(axis, ((gid, size, 1),)))
        order = {id(n): i for i, n in enumerate(topo_order(self.graph))}
        while True:
            while self.work:
                t = self.work.pop()
                for node in list(t.outputs):
                    self.visit(node, t, self.layouts[id(t)])
            ready = sorted({id(n): n for n in self.pending_concat}.values(), key=lambda n: order[id(n)])
            self.pending_concat = []
            if not ready:
                break
            for node in ready:
                self.concat(node)
        self.check_binary()

    def visit(self, node: gs.Node, t: gs.Tensor, layout: Layout) -> None:
        op = node.op
        if (node.domain or "") not in ("", "ai.onnx"):
            return self.invalidate(layout, f"custom op '{node.name}'")
        pos = self.positive_axis(t, layout)
        if op in UNARY:
            if node.inputs[0] is not t:
                return self.invalidate(layout, f"used as a parameter of '{node.name}'")
            if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
                return self.invalidate(layout, f"Dropout mask used at '{node.name}'")
            return self.assign(node.outputs[0], layout)
        if op in POOL:
            if pos != 1 or node.inputs[0] is not t:
                return self.invalidate(layout, f"pooling over channels at '{node.name}'")
            return self.assign(node.outputs[0], layout)
        if op == "BatchNormalization":
            if pos != 1 or node.inputs[0] is not t or not all(isinstance(x, gs.Constant) for x in node.inputs[1:5]):
                return self.invalidate(layout, f"BatchNormalization '{node.name}' is not per-channel constant")
            if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
                return self.invalidate(layout, f"training outputs of '{node.name}' are used")
            self.members.append(("params", node, [1, 2, 3, 4], layout, [0, 0, 0, 0]))
            return self.assign(node.outputs[0], layout)
        if op in BINARY:
            return self.binary_op(node, t, layout)
        if op == "Concat":
            self.pending_concat.append(node)
            return
        if op == "Pad":
            return self.pad(node, t, layout, pos)
        if op in REDUCE:
            return self.reduce(node, t, layout, pos)
        if op in ("Flatten", "Reshape", "Squeeze"):
            return self.merge_trailing(node, t, layout, pos)
        layer = self.by_node.get(id(node))
        if op == "Conv" and node.inputs[0] is t:
            return self.conv_consumer(node, layer, layout, pos)
        if op in ("ConvTranspose", "Gemm", "MatMul") and node.inputs[0] is t and layer is not None:
            ok = (pos == 1) if op == "ConvTranspose" else (layout.axis == -1 and (op != "Gemm" or self.rank(t) == 2))
            if not ok:
                return self.invalidate(layout, f"'{node.name}' does not reduce over the channel axis")
            return self.members.append(("sink", layer, layout))
        return self.invalidate(layout, f"reaches {op} '{node.name or node.outputs[0].name}'")

    def conv_consumer(self, node, layer, layout, pos) -> None:
        if layer is None or pos != 1:
            return self.invalidate(layout, f"Conv '{node.name}' cannot be shrunk")
        w = layer.weight.values
        group = layer.group
        if group == 1:
            return self.members.append(("sink", layer, layout))
        if group == layout.total and w.shape[0] == group and w.shape[1] == 1 and not computed_bias(layer):
            # depthwise: channel c in -> channel c out; the group count follows the pruning
            self.members.append(("depthwise", layer, layout))
            return self.assign(node.outputs[0], layout)
        return self.invalidate(layout, f"grouped Conv '{node.name}'")

    def binary_op(self, node, t, layout) -> None:
        out_rank = self.rank(node.outputs[0])
        for i, other in enumerate(node.inputs):
            if other is t:
                continue
            if isinstance(other, gs.Constant):
                shape = list(other.values.shape)
                caxis = len(shape) + layout.axis
                if caxis < 0 or shape[caxis] == 1:
                    continue  # broadcast along the channels
                if shape[caxis] != layout.total:
                    return self.invalidate(layout, f"constant '{other.name}' does not match the channels")
                self.members.append(("params", node, [i], layout, [caxis]))
        if op_rank_changes(self, node, t, out_rank):
            return self.invalidate(layout, f"broadcast changes the rank at '{node.name}'")
        if node.op in ("PRelu", "Pow") and node.inputs[0] is not t:
            return self.invalidate(layout, f"channels feed the parameter of '{node.name}'")
        self.binary.append(node)
        self.assign(node.outputs[0], layout)

    def check_binary(self) -> None:
        """Every non-constant operand of an elementwise op must share the layout or broadcast."""
        for node in self.binary:
            out = self.layouts.get(id(node.outputs[0]))
            if out is None:
                continue
            for x in node.inputs:
                if isinstance(x, gs.Constant) or id(x) in self.layouts:
                    continue
                shape = self.shape(x)
                axis = None if shape is None else len(shape) + out.axis
                if shape is None or (axis >= 0 and shape[axis] != 1):
                    self.invalidate(out, f"'{x.name}' enters '{node.name}' from outside the group")

    def concat(self, node) -> None:
        out = node.outputs[0]
        rank = self.rank(out)
        axis = node.attrs.get("axis", 1)
        layouts = [self.layouts.get(id(x)) for x in node.inputs]
        known = [lay for lay in layouts if lay is not None]
        neg = axis - rank if rank is not None and axis >= 0 else axis
        if rank is None or any(lay.axis != neg for lay in known):
            for lay in known:
                self.invalidate(lay, f"Concat '{node.name}' joins along another axis")
            return
        segments = []
        for x, lay in zip(node.inputs, layouts):
            if lay is not None:
                segments += lay.segments
                continue
            shape = self.shape(x)
            if shape is None or shape[neg] is None:
                for lay2 in known:
                    self.invalidate(lay2, f"Concat '{node.name}' input '{x.name}' has no known size")
                return
            segments.append((None, shape[neg], 1))
        self.assign(out, Layout(neg, tuple(segments)))

    def pad(self, node, t, layout, pos) -> None:
        """Spatial padding (constant pads, none on the channel axis) keeps the channels."""
        pads = node.inputs[1] if len(node.inputs) > 1 else None
        pads = pads.values.tolist() if isinstance(pads, gs.Constant) else node.attrs.get("pads")
        rank = self.rank(t)
        has_axes = len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name
        if node.inputs[0] is not t or pads is None or rank is None or pos is None or has_axes \
                or len(pads) != 2 * rank or pads[pos] or pads[pos + rank]:
            return self.invalidate(layout, f"Pad '{node.name}' pads the channels")
        return self.assign(node.outputs[0], layout)

    def reduce(self, node, t, layout, pos) -> None:
        """A reduction over other axes (global pooling written as ReduceMean) keeps the channels."""
        rank = self.rank(t)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = node.inputs[1].values.tolist() if isinstance(node.inputs[1], gs.Constant) else None
        if axes is None or rank is None or pos is None or node.inputs[0] is not t:
            return self.invalidate(layout, f"'{node.name}' reduces over unknown axes")
        axes = [a + rank if a < 0 else a for a in np.atleast_1d(axes).tolist()]
        if pos in axes:
            return self.invalidate(layout, f"'{node.name}' reduces over the channels")
        keepdims = int(node.attrs.get("keepdims", 1))
        new_pos = pos if keepdims else pos - sum(a < pos for a in axes)
        out_rank = rank if keepdims else rank - len(set(axes))
        self.assign(node.outputs[0], Layout(new_pos - out_rank, layout.segments))

    def merge_trailing(self, node, t, layout, pos) -> None:
        """Flatten/Reshape/Squeeze that merge or drop the dimensions after the channel axis."""
        src, dst = self.shape(t), self.shape(node.outputs[0])
        if node.inputs[0] is not t or src is None or dst is None or pos is None:
            return self.invalidate(layout, f"'{node.name}' reshapes the channels")
        tail = src[pos + 1:]
        if any(d is None for d in tail) or list(dst[:-1]) != list(src[:pos]) or len(dst) != pos + 1:
            return self.invalidate(layout, f"'{node.name}' reshapes the channels")
        if node.op == "Reshape":
            target = node.inputs[1]
            if not isinstance(target, gs.Constant) or list(target.values).count(-1) != 1 or target.values[-1] != -1:
                return self.invalidate(layout, f"Reshape '{node.name}' fixes the channel count")
        rep = int(np.prod(tail)) if tail else 1
        segments = tuple((g, n, r * rep) for g, n, r in layout.segments)
        self.assign(node.outputs[0], Layout(-1, segments))


def op_rank_changes(an: Analysis, node, t, out_rank) -> bool:
    r = an.rank(t)
    return r is None or out_rank is None or r != out_rank


def computed_bias(layer: Layer) -> bool:
    inputs = layer.node.inputs
    return len(inputs) > 2 and inputs[2] is not None and bool(inputs[2].name) and layer.bias is None


def producer_ok(layer: Layer) -> bool:
    """Output channels can be removed: group 1 and no bias computed at run time."""
    if computed_bias(layer):
        return False
    if layer.op == "Gemm" and layer.bias is not None and layer.bias.values.size not in (1, out_channels(layer)):
        return False  # a full [M, N] C
    return layer.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and layer.group == 1


def out_axis(layer: Layer) -> int:
    if layer.op == "Conv":
        return 0
    if layer.op == "ConvTranspose":
        return 1
    if layer.op == "Gemm":
        return 0 if layer.transposed_b() else 1
    return 1


def in_axis(layer: Layer) -> int:
    if layer.op == "Conv":
        return 1
    if layer.op == "ConvTranspose":
        return 0
    if layer.op == "Gemm":
        return 1 if layer.transposed_b() else 0
    return 0


def out_channels(layer: Layer) -> int:
    return int(layer.weight.values.shape[out_axis(layer)])


def infer_shapes(model: onnx.ModelProto) -> dict[str, list]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return {}
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


# --- choosing and removing channels ------------------------------------------------------------

def _norm(v: np.ndarray) -> np.ndarray:
    mean = float(v.mean()) if v.size else 0.0
    return v / mean if mean > 0 else v


def magnitude_scores(an: Analysis, root: int) -> np.ndarray:
    """Sum over the group's producers of each output channel's squared weight norm (normalised)."""
    group = an.groups[root]
    score = np.zeros(group.size)
    for layer in group.producers:
        w = np.moveaxis(layer.weight.values.astype(np.float64), out_axis(layer), 0)
        score += _norm((w.reshape(w.shape[0], -1) ** 2).sum(1))
    return score


def layout_channels(an: Analysis, layout: Layout, values: np.ndarray) -> dict[int, np.ndarray]:
    """Split a per-position vector along a layout into per-group per-channel sums."""
    out: dict[int, np.ndarray] = {}
    start = 0
    for g, n, r in layout.segments:
        part = values[start:start + n * r]
        start += n * r
        if g is not None:
            root = an.find(g)
            out[root] = out.get(root, 0) + part.reshape(n, r).sum(1)
    return out


def activation_scores(an: Analysis, p, ctx, original) -> dict[int, np.ndarray]:
    """Channel energy at each consumer's input times that consumer's weight norm for it."""
    from opc.passes._prune import calib

    sinks = [m for m in an.members if m[0] == "sink"]
    if not sinks or ctx.calibration is None:
        return {}
    names = [m[1].input.name for m in sinks]
    tap = calib.Tap(original, names, ctx.ort_session)
    energy = {n: None for n in names}
    for feeds in calib.batches(ctx, p.batch, p.samples):
        values = tap.run(feeds)
        for m in sinks:
            layout = m[2]
            x = values[m[1].input.name].astype(np.float64)
            x = np.moveaxis(x, x.ndim + layout.axis, -1).reshape(-1, x.shape[layout.axis])
            e = (x ** 2).mean(0)
            energy[m[1].input.name] = e if energy[m[1].input.name] is None else energy[m[1].input.name] + e
    scores: dict[int, np.ndarray] = {}
    for m in sinks:
        layer, layout = m[1], m[2]
        w = np.moveaxis(layer.weight.values.astype(np.float64), in_axis(layer), 0)
        col = (w.reshape(w.shape[0], -1) ** 2).sum(1)
        contrib = _norm(col * energy[layer.input.name])
        for root, v in layout_channels(an, layout, contrib).items():
            scores[root] = scores.get(root, 0) + v
    return scores


def choose(p, an: Analysis, roots: list[int], scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Kept channel indices per group root (sorted); groups left whole are omitted."""
    overrides = p.overrides
    target: dict[int, float] = {}
    for r in roots:
        names = [layer.name for layer in an.groups[r].producers]
        hits = [overrides[n] for n in names if n in overrides]
        target[r] = max(hits) if hits else p.sparsity
    n_remove: dict[int, int] = {}
    free = [r for r in roots if not any(layer.name in overrides for layer in an.groups[r].producers)]
    if p.scope == "global" and free:
        # one ranking over all groups with scores normalised per group; no group loses more than 90%
        pool = sorted((float(v), r, i) for r in free for i, v in enumerate(_norm(scores[r])))
        budget = round(p.sparsity * sum(an.groups[r].size for r in free))
        cap = {r: an.groups[r].size - max(1, int(np.ceil(0.1 * an.groups[r].size))) for r in free}
        for _, r, _ in pool:
            if budget <= 0:
                break
            if n_remove.get(r, 0) < cap[r]:
                n_remove[r] = n_remove.get(r, 0) + 1
                budget -= 1
    for r in roots:
        if r not in n_remove and (r not in free or p.scope == "layer"):
            n_remove[r] = int(round(target[r] * an.groups[r].size))
    kept = {}
    for r in roots:
        size = an.groups[r].size
        keep = max(1, size - n_remove.get(r, 0))
        mult = p.channel_multiple
        if mult > 1 and size > mult:
            keep = min(size, int(np.ceil(keep / mult)) * mult)
        if keep >= size:
            continue
        order = np.argsort(-scores[r], kind="stable")[:keep]
        kept[r] = np.sort(order)
    return kept


def layout_index(an: Analysis, layout: Layout, kept: dict[int, np.ndarray]) -> np.ndarray:
    parts, start = [], 0
    for g, n, r in layout.segments:
        root = an.find(g) if g is not None else None
        if root is not None and root in kept:
            idx = kept[root]
        else:
            idx = np.arange(n)
        parts.append(start + (idx[:, None] * r + np.arange(r)[None, :]).ravel())
        start += n * r
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _take(const: gs.Constant, node: gs.Node, slot: int, index: np.ndarray, axis: int) -> int:
    """Shrink one constant input of ``node``; a constant shared with other nodes is copied."""
    values = np.take(const.values, index, axis=axis)
    removed = const.values.size - values.size
    if len(const.outputs) > 1:
        node.inputs[slot] = gs.Constant(f"{const.name}_pruned_{node.name or node.outputs[0].name}", values)
    else:
        const.values = values
    return int(removed)


def prune_channels(p, graph: gs.Graph, ctx, original, all_layers: list[Layer]):
    from opc.pass_api import PassResult
    from opc.passes.prune_weights import reconstruct_layers

    an = Analysis(graph, all_layers, infer_shapes(original), p.excluded)
    an.run()
    roots = sorted({an.find(g) for g in range(len(an.groups))})
    valid = [r for r in roots if an.groups[r].invalid is None]
    skipped = {an.groups[r].producers[0].name: an.groups[r].invalid for r in roots if an.groups[r].invalid}
    scores = {r: magnitude_scores(an, r) for r in valid}
    if p.importance == "activation":
        scores.update({r: v for r, v in activation_scores(an, p, ctx, original).items() if r in scores})
    kept = choose(p, an, valid, scores)
    details = {"groups": [{"producers": [layer.name for layer in an.groups[r].producers],
                           "channels_before": an.groups[r].size,
                           "channels_after": int(len(kept[r])) if r in kept else an.groups[r].size}
                          for r in valid],
               "not_pruned": [{"producer": k, "reason": v} for k, v in sorted(skipped.items())]}
    stats = {"groups_pruned": len(kept), "channels_removed": 0, "params_removed": 0, "groups_blocked": len(skipped)}
    if not kept:
        details["layers"] = []
        return PassResult(False, stats, details=details)

    before = {id(layer): int(layer.weight.values.size) for layer in all_layers}
    nonzero_before = {id(layer): int(np.count_nonzero(layer.weight.values)) for layer in all_layers}
    removed = 0
    out_keep: dict[str, np.ndarray] = {}
    changed: dict[int, Layer] = {}
    seen_params: set[tuple[int, int]] = set()
    for member in an.members:
        kind = member[0]
        if kind == "producer":
            layer = member[1]
            root = an.find(next(g for g in range(len(an.groups)) if layer in an.groups[g].producers))
            if root not in kept:
                continue
            idx = kept[root]
            removed += _take(layer.weight, layer.node, 1, idx, out_axis(layer))
            if layer.bias is not None and layer.bias.values.size > 1:
                removed += _take(layer.bias, layer.node, 2, idx, layer.bias.values.ndim - 1)
            out_keep[layer.output.name] = idx
            changed[id(layer)] = layer
            continue
        layout = member[-1] if kind != "params" else member[3]
        if not any(an.find(g) in kept for g in layout.gids()):
            continue
        idx = layout_index(an, layout, kept)
        if kind == "sink":
            layer = member[1]
            removed += _take(layer.weight, layer.node, 1, idx, in_axis(layer))
            changed[id(layer)] = layer
        elif kind == "depthwise":
            layer = member[1]
            removed += _take(layer.weight, layer.node, 1, idx, 0)
            if layer.bias is not None:
                removed += _take(layer.bias, layer.node, 2, idx, 0)
            layer.node.attrs["group"] = int(idx.size)
            out_keep[layer.output.name] = idx
            changed[id(layer)] = layer
        else:
            node, slots, axes = member[1], member[2], member[4]
            for slot, axis in zip(slots, axes):
                if (id(node), slot) in seen_params:
                    continue
                seen_params.add((id(node), slot))
                removed += _take(node.inputs[slot], node, slot, idx, axis)
    # shapes recorded for the reached tensors are stale now; ONNX Runtime re-infers them
    for tid, t in an.tensors.items():
        if isinstance(t, gs.Variable) and id(t) not in an.outputs and t not in graph.inputs:
            t.shape = None
    stats["channels_removed"] = int(sum(an.groups[r].size - len(k) for r, k in kept.items()))
    stats["params_removed"] = int(removed)
    layers_table = []
    for layer in changed.values():
        w = layer.weight.values
        layers_table.append({"node": layer.name, "op": layer.op,
                             "sparsity": round(1.0 - w.size / before[id(layer)], 6),
                             "params_before": before[id(layer)], "params_after": int(w.size),
                             "shape": list(w.shape)})
    details["layers"] = layers_table
    warnings: list[str] = []
    recon = []
    if p.reconstruct:
        if ctx.calibration is None:
            warnings.append("prune: no calibration data, channels removed without reconstruction "
                            "(give --calibration-data or reconstruct=false)")
        else:
            masks = {id(layer): layer.to_matrix() != 0 if nonzero_before[id(layer)] < before[id(layer)]
                     else np.ones(layer.to_matrix().shape, dtype=bool) for layer in changed.values()}
            done, skipped = reconstruct_layers(p, graph, ctx, original, all_layers, list(changed.values()), masks,
                                               out_keep)
            recon = done + skipped
            if skipped:
                warnings.append(f"prune: {len(skipped)} layer(s) not refitted, too few calibration samples "
                                f"(e.g. '{skipped[0]['node']}': {skipped[0]['skipped']})")
    stats["layers_reconstructed"] = sum("skipped" not in r for r in recon)
    details["reconstruction"] = recon
    return PassResult(True, stats, details=details, warnings=warnings)
