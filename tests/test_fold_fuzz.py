"""fold on seeded random graphs: dynamic shape arithmetic, layout chains, fusions and
generated constants. Each case must give ORT outputs equal to the input model's at
several sizes of its dynamic dims (ORT graph optimizations off, so the check sees the
fold, not ORT's own rewrites)."""

from __future__ import annotations

import random

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fold_helpers import fold
from opc.ort import compare, make_session

CASES = 40


def _model(nodes, inits, x_dims, y_outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
                              y_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _valid(model) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        make_session(model, optimize=False)
        return True
    except Exception:
        return False


def _run(model, x):
    return make_session(model, threads=1, optimize=False).run(None, {"x": x})


def _same(model, out, xs, tol=1e-5):
    for x in xs:
        try:
            ref = _run(model, x)
        except Exception:
            continue  # this size is invalid for the model itself
        got = _run(out, x)
        for a, b in zip(ref, got):
            m = compare(a, b)
            if not (m["max_rel"] <= tol or m["max_abs"] <= 1e-6):
                return False
    return True


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _dynamic_target(rng: random.Random):
    """Reshape/Expand of x by a target assembled from x's own Shape and constants."""
    rank = rng.randint(2, 4)
    dims = [rng.choice(["A", "B", 1, 2, 3]) for _ in range(rank)]
    nodes, inits, parts = [helper.make_node("Shape", ["x"], ["s"])], [], []
    order = list(range(rank))
    if rng.random() < 0.3:
        rng.shuffle(order)
    for k, i in enumerate(order):
        r = rng.random()
        if r < 0.6:
            inits.append(_ints(f"i{k}", [i]))
            nodes.append(helper.make_node("Gather", ["s", f"i{k}"], [f"g{k}"]))
            parts.append(f"g{k}")
        elif r < 0.8:
            inits += [_ints(f"st{k}", [i]), _ints(f"en{k}", [i + 1])]
            nodes.append(helper.make_node("Slice", ["s", f"st{k}", f"en{k}"], [f"g{k}"]))
            parts.append(f"g{k}")
        elif not any(p.startswith("m") for p in parts):
            inits.append(_ints(f"m{k}", [-1]))
            parts.append(f"m{k}")
        else:
            return None
    op = rng.choice(["Reshape", "Expand"])
    nodes += [helper.make_node("Concat", parts, ["t"], axis=0), helper.make_node(op, ["x", "t"], ["r"]),
              helper.make_node("Neg", ["r"], ["y"])]
    out_rank = len(parts) if op == "Reshape" else max(rank, len(parts))
    model = _model(nodes, inits, dims, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                      [f"o{i}" for i in range(out_rank)])])
    sizes = ({"A": 2, "B": 3}, {"A": 3, "B": 1}, {"A": 1, "B": 4})
    return model, [np.random.default_rng(1).standard_normal([s.get(d, d) for d in dims]).astype(np.float32)
                    for s in sizes]


def _layout_chain(rng: random.Random):
    """Transposes, Unsqueezes, Flatten and Cast round trips, then a flattening Reshape."""
    rank = rng.randint(2, 5)
    dims = [rng.choice(["A", "B", 1, 1, 2, 3]) for _ in range(rank)]
    nodes, inits, cur, cur_rank = [], [_ints("flat", [-1])], "x", rank
    for k in range(rng.randint(1, 4)):
        kind, out = rng.choice(["T", "T", "U", "F", "C"]), f"v{k}"
        if kind == "T":
            perm = list(range(cur_rank))
            rng.shuffle(perm)
            nodes.append(helper.make_node("Transpose", [cur], [out], perm=perm))
        elif kind == "U":
            inits.append(_ints(f"a{k}", [rng.randint(0, cur_rank)]))
            nodes.append(helper.make_node("Unsqueeze", [cur, f"a{k}"], [out]))
            cur_rank += 1
        elif kind == "F":
            nodes.append(helper.make_node("Flatten", [cur], [out], axis=1))
            cur_rank = 2
        else:
            nodes += [helper.make_node("Cast", [cur], [out + "d"], to=TensorProto.DOUBLE),
                      helper.make_node("Cast", [out + "d"], [out], to=TensorProto.FLOAT)]
        cur = out
    nodes.append(helper.make_node("Reshape", [cur, "flat"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
               helper.make_tensor_value_info(cur, TensorProto.FLOAT, [f"d{i}" for i in range(cur_rank)])]
    model = _model(nodes, inits, dims, outputs)
    sizes = ({"A": 2, "B": 3}, {"A": 1, "B": 1}, {"A": 3, "B": 1})
    return model, [np.random.default_rng(1).standard_normal([s.get(d, d) for d in dims]).astype(np.float32)
                   for s in sizes]


def _affine(rng: random.Random):
    """Conv/ConvTranspose/Gemm/MatMul followed by BatchNorm and per-channel arithmetic."""
    nrng = np.random.default_rng(rng.randint(0, 2**31))
    c, cin = rng.choice([1, 3, 4]), rng.choice([1, 2])
    layer = rng.choice(["Conv", "ConvTranspose", "Gemm", "MatMul"])
    inits = []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    nodes = []
    if layer in ("Conv", "ConvTranspose"):
        wshape, x_dims, rank = ([c, cin, 3, 3] if layer == "Conv" else [cin, c, 3, 3]), ["N", cin, 5, 5], 4
    else:
        wshape, x_dims, rank = [cin * 2, c], ["N", cin * 2], 2
    if rng.random() < 0.3:  # a generated weight, light-model style
        inits.append(_ints("ws", wshape))
        nodes.append(helper.make_node("ConstantOfShape", ["ws"], ["w"],
                                      value=numpy_helper.from_array(np.array([0.3], np.float32))))
    else:
        init("w", nrng.standard_normal(wshape))
    ins = ["x", "w"] + (["b"] if layer != "MatMul" and rng.random() < 0.5 else [])
    if "b" in ins:
        init("b", nrng.standard_normal([c]))
    nodes.append(helper.make_node(layer, ins, ["h0"]))
    cur = "h0"
    for k in range(rng.randint(1, 3)):
        op, out = rng.choice(["Mul", "Add", "Sub", "Div", "BN"]), f"h{k + 1}"
        if op == "BN":
            names = [init(f"{p}{k}", nrng.standard_normal([c]) if p != "v" else np.abs(nrng.standard_normal([c])) + 0.5)
                     for p in "sbmv"]
            nodes.append(helper.make_node("BatchNormalization", [cur] + names, [out], epsilon=1e-3))
        else:
            shapes = [[c], [1], [c, 1, 1], [1, c, 1, 1], []] if rank == 4 else [[c], [1], [1, c], []]
            const = init(f"c{k}", nrng.standard_normal(rng.choice(shapes)) + (2.0 if op == "Div" else 0.0))
            args = [cur, const] if rng.random() < 0.6 or op in ("Sub", "Div") else [const, cur]
            nodes.append(helper.make_node(op, args, [out]))
        cur = out
    nodes.append(helper.make_node("Relu", [cur], ["y"]))
    out_dims = {"Conv": ["N", c, 5, 5], "ConvTranspose": ["N", c, 7, 7]}.get(layer, ["N", c])
    model = _model(nodes, inits, x_dims, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)])
    return model, [nrng.standard_normal([n] + x_dims[1:]).astype(np.float32) for n in (1, 3)]


def _generated(rng: random.Random):
    """Arithmetic and transposes on a ConstantOfShape value, added to the input."""
    nrng = np.random.default_rng(rng.randint(0, 2**31))
    shape = [rng.choice([1, 2, 16, 40]) for _ in range(rng.randint(1, 4))]
    inits = [_ints("s", shape)]
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["g0"],
                              value=numpy_helper.from_array(np.array([rng.choice([0.5, 2.0, 1.5])], np.float32)))]
    cur = "g0"
    for k in range(rng.randint(1, 4)):
        out, r = f"g{k + 1}", rng.random()
        if r < 0.4:
            op = rng.choice(["Neg", "Abs", "Sqrt", "Exp", "Relu", "Sigmoid", "Tanh", "Floor", "Reciprocal"])
            nodes.append(helper.make_node(op, [cur], [out]))
        elif r < 0.6:
            perm = list(range(len(shape)))
            rng.shuffle(perm)
            nodes.append(helper.make_node("Transpose", [cur], [out], perm=perm))
            shape = [shape[p] for p in perm]
        else:
            cshape = [d if rng.random() < 0.5 else 1 for d in shape][rng.randint(0, len(shape)):]
            inits.append(numpy_helper.from_array((np.abs(nrng.standard_normal(cshape)) + 0.5).astype(np.float32), f"c{k}"))
            nodes.append(helper.make_node(rng.choice(["Add", "Mul", "Sub", "Div", "Max", "Min", "Pow"]),
                                          [cur, f"c{k}"], [out]))
        cur = out
    nodes.append(helper.make_node("Add", ["x", cur], ["y"]))
    model = _model(nodes, inits, shape, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return model, [nrng.standard_normal(shape).astype(np.float32)]


def _fuzz(make, seed):
    rng = random.Random(seed)
    failures, modified, tried = [], 0, 0
    for case in range(CASES):
        made = make(rng)
        if made is None or not _valid(made[0]):
            continue
        model, xs = made
        tried += 1
        out, result = fold(model)
        modified += result.modified
        if not _same(model, out, xs):
            failures.append((case, [n.op_type for n in model.graph.node], [n.op_type for n in out.graph.node]))
    assert not failures, failures
    return tried, modified


def test_dynamic_shape_targets():
    tried, modified = _fuzz(_dynamic_target, 0)
    assert tried >= 20 and modified >= tried // 2


def test_layout_chains():
    tried, modified = _fuzz(_layout_chain, 1)
    assert tried >= 20 and modified >= 5


def test_fusions():
    tried, modified = _fuzz(_affine, 2)
    assert tried >= 20 and modified >= tried // 2


def test_generated_values():
    tried, modified = _fuzz(_generated, 3)
    assert tried >= 20 and modified >= tried // 2
