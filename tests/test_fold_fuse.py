"""fold: BatchNormalization, per-channel affine ops and zero Pads fused into weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fold_helpers import assert_idempotent, assert_same_outputs, fold, nonzero, op_counts, ops

RNG = np.random.default_rng(0)


def _init(name, shape, positive=False):
    v = RNG.standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(np.abs(v) + 0.5 if positive else v, name)


def _bn_inits(c):
    return [_init("scale", [c]), _init("bias", [c]), _init("mean", [c]), _init("var", [c], positive=True)]


def _model(nodes, inits, x_shape, y_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _bn(inp="c"):
    return helper.make_node("BatchNormalization", [inp, "scale", "bias", "mean", "var"], ["b"], epsilon=1e-3)


def test_conv_batchnorm_fused():
    model = _model([helper.make_node("Conv", ["x", "w", "cb"], ["c"], pads=[1, 1, 1, 1]), _bn(),
                    helper.make_node("Relu", ["b"], ["y"])],
                   [_init("w", [8, 3, 3, 3]), _init("cb", [8])] + _bn_inits(8), ["N", 3, 6, 6], ["N", 8, 6, 6])
    out, result = fold(model)
    assert ops(out) == ["Conv", "Relu"]
    assert nonzero(result.stats) == {"batchnorms_fused": 1}
    assert len(out.graph.initializer) == 2  # the new weight and bias; the BN parameters are gone
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_conv_without_bias_and_conv_transpose():
    model = _model([helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2]), _bn(),
                    helper.make_node("Relu", ["b"], ["y"])],
                   [_init("w", [3, 8, 2, 2])] + _bn_inits(8), ["N", 3, 4, 4], ["N", 8, 8, 8])
    out, result = fold(model)
    assert ops(out) == ["ConvTranspose", "Relu"]
    assert result.stats["batchnorms_fused"] == 1
    assert_same_outputs(model, out)


def test_gemm_and_matmul_batchnorm_fused():
    gemm = _model([helper.make_node("Gemm", ["x", "w", "gb"], ["c"], transB=1, alpha=0.5, beta=2.0), _bn(),
                   helper.make_node("Relu", ["b"], ["y"])],
                  [_init("w", [8, 5]), _init("gb", [8])] + _bn_inits(8), ["N", 5], ["N", 8])
    out, result = fold(gemm)
    assert ops(out) == ["Gemm", "Relu"] and result.stats["batchnorms_fused"] == 1
    assert_same_outputs(gemm, out)
    matmul = _model([helper.make_node("MatMul", ["x", "w"], ["c"]), _bn(), helper.make_node("Relu", ["b"], ["y"])],
                    [_init("w", [5, 8])] + _bn_inits(8), ["N", 5], ["N", 8])
    out, result = fold(matmul)
    assert ops(out) == ["Gemm", "Relu"] and result.stats["batchnorms_fused"] == 1
    assert_same_outputs(matmul, out)
    assert_idempotent(out)


def test_per_channel_mul_add_fused_into_conv():
    model = _model([helper.make_node("Conv", ["x", "w"], ["c"]),
                    helper.make_node("Mul", ["k", "c"], ["m"]),
                    helper.make_node("Sub", ["m", "o"], ["s"]),
                    helper.make_node("Div", ["s", "d"], ["y"])],
                   [_init("w", [4, 3, 1, 1]), _init("k", [4, 1, 1]), _init("o", [1, 4, 1, 1]),
                    numpy_helper.from_array(np.array(2.0, np.float32), "d")], ["N", 3, 5, 5], ["N", 4, 5, 5])
    out, result = fold(model)
    assert ops(out) == ["Conv"]
    assert result.stats["affine_fused"] == 3
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_matmul_add_becomes_gemm_only_in_2d():
    model = _model([helper.make_node("MatMul", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "bb"], ["y"])],
                   [_init("w", [5, 8]), _init("bb", [8])], ["N", 5], ["N", 8])
    out, result = fold(model)
    assert ops(out) == ["Gemm"] and result.stats["affine_fused"] == 1
    assert_same_outputs(model, out)
    model3 = _model([helper.make_node("MatMul", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "bb"], ["y"])],
                    [_init("w", [5, 8]), _init("bb", [8])], ["N", 2, 5], ["N", 2, 8])
    out3, result3 = fold(model3)
    assert ops(out3) == ["MatMul", "Add"] and result3.modified is False


def test_non_channel_constants_and_shared_outputs_are_not_fused():
    full = _model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "full"], ["y"])],
                  [_init("w", [4, 3, 1, 1]), _init("full", [1, 4, 5, 5])], [1, 3, 5, 5], [1, 4, 5, 5])
    out, result = fold(full)
    assert ops(out) == ["Conv", "Add"] and result.modified is False
    shared = _model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["m"]),
                     helper.make_node("Add", ["m", "c"], ["y"])],
                    [_init("w", [4, 3, 1, 1]), _init("k", [4, 1, 1])], [1, 3, 5, 5], [1, 4, 5, 5])
    out, result = fold(shared)
    assert op_counts(out) == {"Conv": 1, "Mul": 1, "Add": 1} and result.modified is False


def test_zero_pad_fused_into_conv():
    model = _model([helper.make_node("Pad", ["x", "pads"], ["p"]),
                    helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 0, 0, 1])],
                   [numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 3, 4], np.int64), "pads"),
                    _init("w", [4, 3, 3, 3])], ["N", 3, 6, 6], ["N", 4, 9, 9])
    out, result = fold(model)
    assert ops(out) == ["Conv"] and result.stats["pads_fused"] == 1
    conv_pads = [a for a in out.graph.node[0].attribute if a.name == "pads"][0].ints
    assert list(conv_pads) == [2, 2, 3, 5]
    assert_same_outputs(model, out)
    reflect = _model([helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
                      helper.make_node("Conv", ["p", "w"], ["y"])],
                     [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                      _init("w", [4, 3, 3, 3])], ["N", 3, 6, 6], ["N", 4, 6, 6])
    out, result = fold(reflect)
    assert ops(out) == ["Pad", "Conv"] and result.modified is False


def test_batchnorm_on_generated_weights_keeps_them_generated():
    # light-model style: every weight and BN parameter made by ConstantOfShape
    def cos(name, shape, value):
        s = numpy_helper.from_array(np.array(shape, np.int64), name + "_shape")
        node = helper.make_node("ConstantOfShape", [name + "_shape"], [name],
                                value=numpy_helper.from_array(np.array([value], np.float32)))
        return node, s

    parts = [cos("w", [64, 32, 3, 3], 0.02), cos("scale", [64], 1.5), cos("bias", [64], 0.1),
             cos("mean", [64], 0.2), cos("var", [64], 2.0)]
    nodes = [p[0] for p in parts] + [helper.make_node("Conv", ["x", "w"], ["c"]), _bn(),
                                     helper.make_node("Relu", ["b"], ["y"])]
    model = _model(nodes, [p[1] for p in parts], [1, 32, 6, 6], [1, 64, 4, 4])
    out, result = fold(model)
    assert op_counts(out) == {"ConstantOfShape": 1, "Conv": 1, "Relu": 1}
    assert result.stats["batchnorms_fused"] == 1
    assert out.ByteSize() <= model.ByteSize()
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_dynamo_style_zero_bias_then_batchnorm():
    # torch's dynamo exporter (optimize=False) writes the bias as Expand(CastLike(0, x), Shape(w)[:1])
    nodes = [helper.make_node("Shape", ["w"], ["ws"], start=0, end=1),
             helper.make_node("Constant", [], ["one"], value_ints=[1]),
             helper.make_node("Expand", ["ws", "one"], ["bshape"]),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float64))),
             helper.make_node("CastLike", ["zero", "x"], ["zero_f"]),
             helper.make_node("Expand", ["zero_f", "bshape"], ["bias0"]),
             helper.make_node("Conv", ["x", "w", "bias0"], ["c"], pads=[1, 1, 1, 1]), _bn(),
             helper.make_node("Relu", ["b"], ["y"])]
    model = _model(nodes, [_init("w", [8, 3, 3, 3])] + _bn_inits(8), ["N", 3, 6, 6], ["N", 8, 6, 6], opset=20)
    out, result = fold(model)
    assert ops(out) == ["Conv", "Relu"]
    assert result.stats["castlike_folded"] == 1 and result.stats["batchnorms_fused"] == 1
    assert_same_outputs(model, out)
    assert_idempotent(out)
