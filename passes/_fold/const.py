"""Folding rules: values computed at compile time.

- ``constant_nodes``: Constant nodes become initializers.
- ``constants_folded``: a node whose inputs are all constant is evaluated (onnx's
  reference evaluator) and replaced by initializers, within the size policy.
- ``generated_folded``: elementwise/shape ops over ConstantOfShape-style generated values
  fold into one generator node (or an initializer when small), never materializing
  the big value.
- ``shapes_folded``: Shape/Size (and Gather/Slice of a Shape) whose dims are static in
  the re-inferred shapes become constants; dynamic dims stay computed.
- ``castlike_folded``: CastLike(c, x) only needs x's type, so a constant c folds even
  when x is computed; CastLike with a known target type becomes Cast.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from opc.passes._fold.core import (
    GENERATORS, NONDETERMINISTIC, Lazy, State, _contiguous, const, emit_lazy, evaluate, generated,
    is_default_domain, lazy_of, output_bound, producer, replace_tensor, subgraphs,
)

ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp",
    "Log", "Relu", "Sigmoid", "Tanh", "Cast", "Floor", "Ceil", "Round", "Sign", "Erf", "Clip", "Where",
    "Mod", "LeakyRelu", "Elu", "Selu", "Softplus", "HardSigmoid", "Sin", "Cos", "IsNaN", "IsInf", "PRelu",
    "Identity",
}
UNIFORM_SHAPE_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Tile"}
# not worth evaluating (handled elsewhere) or not a tensor function
SKIP = {"Constant", "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
        "SequenceAt", "SplitToSequence", "ConcatFromSequence", "SequenceErase", "SequenceLength",
        "Optional", "OptionalGetElement", "OptionalHasElement"}


def _is_empty(t) -> bool:
    return isinstance(t, gs.Variable) and not t.name


def _itemsize(state: State, t: gs.Tensor) -> int:
    et = state.elem_type(t)
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)).itemsize if et else 4
    except Exception:
        return 4


def _expected_dtype(state: State, t: gs.Tensor):
    et = state.elem_type(t)
    if not et:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et))
    except Exception:
        return None


def _replace_outputs(state: State, node: gs.Node, values: list[np.ndarray], stat: str) -> bool:
    outs = [o for o in node.outputs]
    if any(id(o) in state.pinned for o in outs if o.name):
        return False
    for o, v in zip(outs, values):
        if not o.name:
            continue
        want = _expected_dtype(state, o)
        if want is not None and v.dtype != want and want.kind != "O":
            v = v.astype(want)
        replace_tensor(state, o, gs.Constant(o.name, _contiguous(v)))
    node.inputs.clear()
    node.outputs.clear()
    state.stats[stat] += 1
    return True


def constant_nodes(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "Constant" or not is_default_domain(node) or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if id(out) in state.pinned:
            continue
        value = _constant_attr(node)
        if value is None:
            continue
        _replace_outputs(state, node, [value], "constant_nodes")


def _constant_attr(node: gs.Node):
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        return np.asarray(a["value"].values)
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    return None  # strings and sparse values stay


def _foldable(state: State, node: gs.Node) -> bool:
    if not is_default_domain(node) or node.op in NONDETERMINISTIC or node.op in SKIP:
        return False
    if subgraphs(node) or not node.outputs:
        return False
    if not any(o.outputs for o in node.outputs):  # unused: dead code removes it
        return False
    return not any(id(o) in state.pinned for o in node.outputs)


def constants_folded(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if not node.outputs or not _foldable(state, node):
            continue
        values = []
        for t in node.inputs:
            if _is_empty(t):
                values.append(None)
                continue
            v = const(t)
            if v is None or v.dtype.kind == "O":
                break
            values.append(v)
        else:
            if not _within_policy(state, node, values):
                continue
            try:
                results = evaluate(node, values, state.opset)
            except Exception:
                continue
            if len(results) != len([o for o in node.outputs if o.name]) and len(results) != len(node.outputs):
                continue
            if any(r.dtype.kind == "O" or r.nbytes > state.size_limit for r in results):
                continue
            _replace_outputs(state, node, results, "constants_folded")


def _within_policy(state: State, node: gs.Node, values: list) -> bool:
    bound = output_bound(node, values, state)
    if bound is None:
        return False
    nbytes = bound * max(_itemsize(state, o) for o in node.outputs)
    if nbytes > state.size_limit:
        return False
    if node.op in GENERATORS:
        # a cheap generator is materialized only when that does not grow the file
        in_bytes = sum(v.nbytes for v in values if v is not None)
        return nbytes <= max(state.generator_limit, in_bytes)
    return True


def generated_folded(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if not node.outputs or len(node.outputs) != 1 or not _foldable(state, node):
            continue
        if node.op not in ELEMENTWISE and node.op not in UNIFORM_SHAPE_OPS and node.op != "Transpose":
            continue
        lazies, any_generated = [], False
        for t in node.inputs:
            if _is_empty(t):
                lazies.append(None)
                continue
            lz = lazy_of(t)
            if lz is None:
                break
            any_generated |= generated(t) is not None
            lazies.append(lz)
        else:
            if not any_generated:
                continue
            result = _fold_lazy(state, node, lazies)
            if result is None:
                continue
            out = node.outputs[0]
            want = _expected_dtype(state, out)
            if want is not None and result.small.dtype != want:
                continue
            tensor = emit_lazy(state, graph, result, out.name)
            if tensor is None:
                continue
            replace_tensor(state, out, tensor)
            node.inputs.clear()
            node.outputs.clear()
            state.stats["generated_folded"] += 1


def _fold_lazy(state: State, node: gs.Node, lazies: list) -> Lazy | None:
    op = node.op
    if op in ELEMENTWISE:
        try:
            full = np.broadcast_shapes(*[lz.shape for lz in lazies if lz is not None])
            smalls = [None if lz is None else lz.small.reshape((1,) * (len(lz.shape) - lz.small.ndim) + lz.small.shape)
                      for lz in lazies]
            (small,) = evaluate(node, smalls, state.opset)
            np.broadcast_shapes(small.shape, full)
        except Exception:
            return None
        if small.ndim > len(full):
            return None
        return Lazy(small, tuple(full))
    data = lazies[0]
    if op == "Transpose":
        rank = len(data.shape)
        perm = node.attrs.get("perm", list(range(rank))[::-1])
        small = data.small.reshape((1,) * (rank - data.small.ndim) + data.small.shape)
        return Lazy(np.transpose(small, perm), tuple(data.shape[p] for p in perm))
    if op == "Expand" and len(lazies) == 2 and lazies[1].concrete:
        try:
            full = np.broadcast_shapes(data.shape, tuple(int(d) for d in lazies[1].small))
        except ValueError:
            return None
        return Lazy(data.small, tuple(full))
    if data.small.size != 1:
        return None
    shape = state.static_shape(node.outputs[0])
    if shape is None:
        return None
    return Lazy(data.small.reshape(()), tuple(shape))


def shapes_folded(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if not is_default_domain(node) or not _foldable(state, node) or not node.inputs:
            continue
        value = None
        if node.op == "Shape":
            dims = _shape_dims(state, node)
            if dims is not None and all(isinstance(d, int) for d in dims):
                value = np.array(dims, dtype=np.int64)
        elif node.op == "Size":
            dims = state.shape(node.inputs[0])
            if dims is not None and all(isinstance(d, int) for d in dims):
                value = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        elif node.op in ("Gather", "Slice") and producer(node.inputs[0]) is not None \
                and producer(node.inputs[0]).op == "Shape":
            value = _partial_shape(state, node)
        if value is not None:
            _replace_outputs(state, node, [value], "shapes_folded")


def _shape_dims(state: State, shape_node: gs.Node):
    dims = state.shape(shape_node.inputs[0])
    if dims is None:
        return None
    rank = len(dims)
    start = shape_node.attrs.get("start", 0)
    end = shape_node.attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return list(dims[start:end])


def _partial_shape(state: State, node: gs.Node):
    dims = _shape_dims(state, producer(node.inputs[0]))
    if dims is None:
        return None
    positions = np.arange(len(dims))
    try:
        if node.op == "Gather":
            idx = const(node.inputs[1])
            if idx is None or node.attrs.get("axis", 0) != 0:
                return None
            picked = positions[idx]
        else:
            params = [const(t) if not _is_empty(t) else None for t in node.inputs[1:]]
            if len(params) < 2 or params[0] is None or params[1] is None or any(
                    p is None for p, t in zip(params, node.inputs[1:]) if not _is_empty(t)):
                return None
            if len(params) > 2 and params[2] is not None and list(params[2].reshape(-1)) not in ([0], [-1]):
                return None
            step = int(params[3].reshape(-1)[0]) if len(params) > 3 and params[3] is not None else 1
            s, e = int(params[0].reshape(-1)[0]), int(params[1].reshape(-1)[0])
            big = 2**62
            picked = positions[slice(max(min(s, big), -big), max(min(e, big), -big), step)]
    except (IndexError, ValueError, TypeError):
        return None
    chosen = [dims[int(i)] for i in np.asarray(picked).reshape(-1)]
    if not all(isinstance(d, int) for d in chosen):
        return None
    return np.array(chosen, dtype=np.int64).reshape(np.shape(picked))


def castlike_folded(state: State, graph: gs.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "CastLike" or not is_default_domain(node) or not _foldable(state, node):
            continue
        target = state.elem_type(node.inputs[1])
        if not target:
            continue
        value = const(node.inputs[0])
        if value is not None:
            try:
                (result,) = evaluate(gs.Node("Cast", attrs={"to": target}, inputs=[gs.Variable("x")],
                                             outputs=[gs.Variable("y")]), [value], state.opset)
            except Exception:
                continue
            _replace_outputs(state, node, [result], "castlike_folded")
        elif state.opset >= 6:
            # only the type of the second input matters: drop the dependency
            node.op = "Cast"
            node.attrs = {"to": target, **{k: v for k, v in node.attrs.items() if k == "saturate"}}
            del node.inputs[1]
            state.stats["castlike_folded"] += 1
