"""Shared machinery of the fold rules: the rewrite state, graph walking, tensor
replacement, re-inferred shapes, "lazy" (generated) constants and node evaluation.

A lazy constant is a tensor whose value is known without being stored: a
``ConstantOfShape`` output or an ``Expand`` of a small constant. It is held as a small
array that broadcasts to the full shape, so arithmetic on generated weights (the light
models in the onnx package build every weight with ConstantOfShape) can be folded
without writing megabytes into the file.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx

import onnx_graphsurgeon as gs

from opc.summary import iter_graphs as iter_proto_graphs

# ops whose result is not a function of their inputs: never folded or merged
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "Multinomial", "Bernoulli", "Dropout"}
# cheap generators: their outputs can be much bigger than their inputs
GENERATORS = {"ConstantOfShape", "Expand", "Tile", "Range", "EyeLike", "OneHot", "Resize",
              "Upsample", "Pad"}
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class State:
    """What every rule sees: options, the statistics and the re-inferred value types."""

    opset: int
    size_limit: int  # bytes: no folded value above this is materialized
    generator_limit: int  # bytes: generated (ConstantOfShape-like) values above this stay generated
    stats: collections.Counter = field(default_factory=collections.Counter)
    # tensor name -> (elem_type or 0, dims tuple or None); dims hold ints, str (symbolic) or None
    types: dict = field(default_factory=dict)
    counter: int = 0
    # tensors that must keep their producer: id(graph output) -> the graph (nested ones too)
    pinned: dict = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}__fold{self.counter}"

    def shape(self, t: gs.Tensor):
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        entry = self.types.get(t.name)
        return entry[1] if entry else None

    def static_shape(self, t: gs.Tensor):
        s = self.shape(t)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return s

    def elem_type(self, t: gs.Tensor) -> int:
        if isinstance(t, gs.Constant):
            return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
        entry = self.types.get(t.name)
        return entry[0] if entry else 0


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and all graphs nested in its nodes' attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    out = []
    for attr in node.attrs.values():
        for sub in attr if isinstance(attr, list) else [attr]:
            if isinstance(sub, gs.Graph):
                out.append(sub)
    return out


def is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in DEFAULT_DOMAINS


def const(t) -> np.ndarray | None:
    """The value of a constant tensor (an initializer), or None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def pin_outputs(state: State, graph: gs.Graph) -> None:
    """Record every graph output (of nested graphs too) with the graph it belongs to."""
    state.pinned = {id(t): g for g in iter_graphs(graph) for t in g.outputs}


def replace_tensor(state: State, old: gs.Tensor, new: gs.Tensor) -> bool:
    """Make every consumer of ``old`` read ``new``; False when ``old`` must stay (a graph output)."""
    if old is new:
        return False
    if id(old) in state.pinned:
        # a graph output keeps its name: let new's producer write it directly when that is safe
        node = producer(new)
        if (node is None or not isinstance(new, gs.Variable) or id(new) in state.pinned
                or any(c is not producer(old) for c in new.outputs)):
            return False
        if not any(n is node for n in state.pinned[id(old)].nodes):
            return False  # new comes from an outer graph: a subgraph output must stay its own value
        for consumer in list(old.outputs):
            _swap_input(consumer, old, new)  # none expected; kept for safety
        node.outputs[node.outputs.index(new)] = old
        for consumer in list(new.outputs):
            _swap_input(consumer, new, old)
        old_producer = [n for n in old.inputs if n is not node]
        for n in old_producer:
            n.outputs[n.outputs.index(old)] = gs.Variable(state.fresh(old.name))
        return True
    for consumer in list(old.outputs):
        _swap_input(consumer, old, new)
    return True


def _swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def _contiguous(value) -> np.ndarray:
    """A C-contiguous copy that keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.array(value, copy=True, order="C")


def new_constant(state: State, hint: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(state.fresh(hint), _contiguous(value))


# ---------------------------------------------------------------------------------------
# lazy (generated) constants


@dataclass
class Lazy:
    small: np.ndarray  # broadcasts (numpy rules) to `shape`
    shape: tuple

    @property
    def full_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.small.dtype.itemsize

    @property
    def concrete(self) -> bool:
        return self.small.shape == tuple(self.shape)

    def value(self) -> np.ndarray:
        return _contiguous(np.broadcast_to(self.small, self.shape))


def generated(t: gs.Tensor) -> Lazy | None:
    """A ConstantOfShape / Expand-of-constant / Tile-of-a-scalar output as a Lazy value, else None."""
    node = producer(t)
    if node is None or not is_default_domain(node) or len(node.outputs) != 1:
        return None
    if node.op == "ConstantOfShape":
        shape = const(node.inputs[0]) if node.inputs else None
        if shape is None or (shape.size and shape.min() < 0):
            return None
        value = node.attrs.get("value")
        small = np.asarray(value.values).reshape(()) if isinstance(value, gs.Constant) else np.zeros((), np.float32)
        return Lazy(small.reshape((1,) * shape.size), tuple(int(d) for d in shape))
    if node.op == "Expand" and len(node.inputs) == 2:
        data, shape = const(node.inputs[0]), const(node.inputs[1])
        if data is None or shape is None:
            return None
        try:
            full = np.broadcast_shapes(data.shape, tuple(int(d) for d in shape))
        except ValueError:
            return None
        return Lazy(data, tuple(full))
    if node.op == "Tile" and len(node.inputs) == 2:
        data, repeats = const(node.inputs[0]), const(node.inputs[1])
        if data is None or repeats is None or data.size != 1 or repeats.size != data.ndim or repeats.min() < 0:
            return None
        return Lazy(data, tuple(int(d) * int(r) for d, r in zip(data.shape, repeats)))
    return None


def lazy_of(t: gs.Tensor) -> Lazy | None:
    value = const(t)
    if value is not None:
        return Lazy(value, tuple(value.shape))
    return generated(t)


def emit_lazy(state: State, graph: gs.Graph, lazy: Lazy, hint: str) -> gs.Tensor | None:
    """A tensor holding ``lazy``: an initializer when small, else one generator node."""
    nbytes = lazy.full_bytes
    if lazy.concrete or nbytes <= min(state.generator_limit, state.size_limit):
        return new_constant(state, hint, lazy.value())
    rank = len(lazy.shape)
    small = lazy.small.reshape((1,) * (rank - lazy.small.ndim) + lazy.small.shape)
    if small.size > 1 and small.dtype.kind in "biuf" and np.all(small == small.reshape(-1)[0]):
        small = small.reshape(-1)[:1].reshape((1,) * rank)  # uniform after all: one value
    shape = new_constant(state, hint + "_shape", np.array(lazy.shape, dtype=np.int64))
    out = gs.Variable(state.fresh(hint), dtype=lazy.small.dtype, shape=list(lazy.shape))
    if small.size == 1 and lazy.small.dtype != np.dtype(np.str_):
        value = gs.Constant(state.fresh(hint + "_value"), small.reshape(1).copy())
        node = gs.Node("ConstantOfShape", inputs=[shape], outputs=[out], attrs={"value": value})
    else:
        node = gs.Node("Expand", inputs=[new_constant(state, hint + "_small", small)], outputs=[out])
        node.inputs.append(shape)
    graph.nodes.append(node)
    return out


# ---------------------------------------------------------------------------------------
# evaluation


def export_node(node: gs.Node) -> onnx.NodeProto:
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    return OnnxExporter.export_node(node)


def evaluate(node: gs.Node, inputs: list, opset: int) -> list[np.ndarray]:
    """Run one node on concrete inputs (None for an omitted optional input)."""
    from onnx.reference import ReferenceEvaluator

    proto = export_node(node)
    in_names = [f"i{i}" if x is not None else "" for i, x in enumerate(inputs)]
    out_names = [f"o{i}" if o.name else "" for i, o in enumerate(node.outputs)]
    del proto.input[:]
    proto.input.extend(in_names)
    del proto.output[:]
    proto.output.extend(out_names)
    feeds = {n: np.asarray(x) for n, x in zip(in_names, inputs) if n}
    try:
        evaluator = ReferenceEvaluator(proto, opsets={"": opset})
        return [np.asarray(r) for r in evaluator.run(None, feeds)]
    except Exception:
        # the reference evaluator lacks some old-opset forms: ask ONNX Runtime instead
        return _evaluate_ort(proto, feeds, opset)


def _evaluate_ort(proto: onnx.NodeProto, feeds: dict, opset: int) -> list[np.ndarray]:
    from opc.ort import make_session

    inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]
    outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in proto.output if n]
    graph = onnx.helper.make_graph([proto], "fold_eval", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8
    session = make_session(model, threads=1, optimize=False)
    return [np.asarray(r) for r in session.run(None, feeds)]


def output_bound(node: gs.Node, values: list, state: State) -> int | None:
    """An upper bound on the element count of the node's largest output, before running it."""
    op = node.op
    sizes = [v.size for v in values if v is not None]
    try:
        if op == "ConstantOfShape":
            return int(np.prod(values[0], dtype=np.float64)) if values else 1
        if op == "Expand":
            return int(np.prod(np.broadcast_shapes(values[0].shape, tuple(int(d) for d in values[1])), dtype=np.float64))
        if op == "Tile":
            return int(values[0].size * np.prod(values[1], dtype=np.float64))
        if op == "Range":
            start, limit, delta = (float(v) for v in values[:3])
            return max(int(np.ceil((limit - start) / delta)), 0) if delta else None
        if op == "OneHot":
            return int(values[0].size * abs(float(values[1].reshape(-1)[0])))
        if op in ("Resize", "Upsample", "Pad", "EyeLike"):
            shapes = [state.static_shape(o) for o in node.outputs]
            if any(s is None for s in shapes):
                return None
            return max(int(np.prod(s, dtype=np.float64)) for s in shapes)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    shapes = [state.static_shape(o) for o in node.outputs if o.name]
    if shapes and all(s is not None for s in shapes):
        return max(int(np.prod(s, dtype=np.float64)) for s in shapes)
    return max(sizes, default=1)


# ---------------------------------------------------------------------------------------
# shape inference


def infer_types(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """Re-infer every value's type, ignoring the exporter's value_info and output shapes.

    ``model`` must be a private copy (an export made for this call): it is changed.
    """
    m = model  # a private export: changed in place
    for g in iter_proto_graphs(m.graph):
        del g.value_info[:]
        # inference needs only the types of big initializers, not their bytes
        listed = {i.name for i in g.input}
        small = []
        for init in g.initializer:
            if int(np.prod(init.dims, dtype=np.int64)) <= 64:
                small.append(init)
            elif init.name not in listed:
                g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        if len(small) != len(g.initializer):
            kept = [onnx.TensorProto() for _ in small]
            for dst, src in zip(kept, small):
                dst.CopyFrom(src)
            del g.initializer[:]
            g.initializer.extend(kept)
        for out in g.output:
            if out.type.HasField("tensor_type"):
                out.type.tensor_type.ClearField("shape")
    for inp in m.graph.input:
        if input_shapes and inp.name in input_shapes and inp.type.HasField("tensor_type"):
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[inp.name]:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
        except Exception:
            return {}
    types = {}
    for g in iter_proto_graphs(inferred.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            dims = None
            if tt.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
            types[vi.name] = (tt.elem_type, dims)
    return types
