"""fold: shape folding with static, partly dynamic and user-given shapes."""

from __future__ import annotations

import numpy as np
import onnx

from fold_helpers import (assert_idempotent, assert_same_outputs, fold, initializer, io_signature, nonzero,
                          ops, parse)

# the usual exporter pattern: Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], Unsqueeze(dim 2)))
RESHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[{dims}] x) => (float[{out}] y) {{
  s = Shape(x)
  i0 = Constant <value = int64 {{0}}> ()
  i2 = Constant <value = int64 {{2}}> ()
  ax = Constant <value = int64[1] {{0}}> ()
  d0 = Gather(s, i0)
  d2 = Gather(s, i2)
  u0 = Unsqueeze(d0, ax)
  u2 = Unsqueeze(d2, ax)
  m1 = Constant <value = int64[1] {{-1}}> ()
  t = Concat <axis = 0> (u0, m1, u2)
  y = Reshape(x, t)
}}
"""


def test_static_shapes_fold_to_a_constant_target():
    model = parse(RESHAPE.format(dims="2, 3, 4, 5", out="2, 15, 4"))
    out, result = fold(model)
    assert ops(out) == ["Reshape"]
    assert result.stats["shapes_folded"] >= 1
    assert list(out.graph.initializer[0].dims) == [3]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]), [2, -1, 4])
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_dynamic_dims_fold_to_copy_and_infer():
    # batch N is dynamic: the target becomes [0, -1, 4] (0 copies N), right for every N
    model = parse(RESHAPE.format(dims="N, 3, 4, 5", out="N, 15, 4"))
    out, result = fold(model)
    assert ops(out) == ["Reshape"]
    assert result.stats["dynamic_shapes_folded"] == 1
    assert result.stats["shapes_folded"] == 1  # Gather(Shape(x), 2) = 4
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]), [0, -1, 4])
    assert io_signature(out) == io_signature(model)
    assert_same_outputs(model, out, sizes=(2, 3, 7))
    assert_idempotent(out)


def test_two_dynamic_dims_keep_the_computation():
    # both N and C are dynamic and neither is at its own position: nothing can be baked in
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, C] x) => (float[C, N] y) {
      s = Shape(x)
      i0 = Constant <value = int64[1] {0}> ()
      i1 = Constant <value = int64[1] {1}> ()
      d0 = Gather(s, i0)
      d1 = Gather(s, i1)
      t = Concat <axis = 0> (d1, d0)
      y = Reshape(x, t)
    }
    """)
    out, result = fold(model)
    assert nonzero(result.stats) == {"constant_nodes": 2}  # only the Constant nodes became initializers
    assert ops(out) == ["Shape", "Gather", "Gather", "Concat", "Reshape"]
    assert_same_outputs(model, out, sizes=(2, 3))
    assert_idempotent(out)


def test_exporter_annotations_are_not_trusted():
    # the exporter traced S=3 and wrote it into value_info and the output type; the model
    # is dynamic in S. Folding Shape(t) from those annotations would break S != 3.
    model = parse(RESHAPE.format(dims="S, 2, 5, 10", out="S, 10, 5"))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [4]))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("d0", onnx.TensorProto.INT64, []))
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    out_dims[0].Clear()
    out_dims[0].dim_value = 3  # the wrong, traced output annotation
    x_dims = model.graph.input[0].type.tensor_type.shape.dim
    out, result = fold(model)
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [3, 10, 5]  # kept as given
    assert x_dims[0].dim_param == "S"
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]), [0, -1, 5])
    assert_same_outputs(model, out, sizes=(2, 3, 5))


def test_input_shapes_option_folds_everything():
    model = parse(RESHAPE.format(dims="N, 3, 4, 5", out="N, 15, 4"))
    out, result = fold(model, input_shapes={"x": (2, 3, 4, 5)})
    assert ops(out) == ["Reshape"]
    # specialized: the input type says so (the output type is kept as declared)
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 4, 5]
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]), [2, -1, 4])
    assert_same_outputs(model, out, sizes=(2,))


def test_expand_by_own_shape_disappears():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 10] x) => (float[N, 10] y) {
      s = Shape(x)
      e = Expand(x, s)
      y = Add(e, x)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Add"]
    assert nonzero(result.stats) == {"dynamic_shapes_folded": 1, "noops_removed": 1, "dead_nodes_removed": 1}
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_size_and_shape_slices():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6, 4] x) => (float[N, 24] y, int64 n) {
      s = Shape(x)
      one = Constant <value = int64[1] {1}> ()
      big = Constant <value = int64[1] {100}> ()
      tail = Slice(s, one, big)
      p = ReduceProd <keepdims = 1> (tail)
      m1 = Constant <value = int64[1] {-1}> ()
      t = Concat <axis = 0> (m1, p)
      y = Reshape(x, t)
      sz = Size(tail)
      n = Identity(sz)
    }
    """)
    out, result = fold(model)
    # the graph output n keeps a producer: Size writes it directly once Identity is gone
    assert sorted(ops(out)) == ["Reshape", "Size"]
    assert result.stats["shapes_folded"] == 1  # Slice(Shape(x)) -> [6, 4]
    assert result.stats["identity_removed"] == 1
    assert [o.name for o in out.graph.output] == ["y", "n"]
    np.testing.assert_array_equal(initializer(out, "t"), [-1, 24])
    assert_same_outputs(model, out)


def test_value_info_is_dropped_or_re_inferred():
    model = parse(RESHAPE.format(dims="S, 2, 5, 10", out="S, 10, 5"))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [9]))
    out, _ = fold(model)
    assert len(out.graph.value_info) == 0  # the exporter's (wrong) annotation is gone
    relu = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[S, 4] x) => (float[S, 4] y) {
      a = Identity(x)
      r = Relu(a)
      y = Neg(r)
    }
    """)
    out, _ = fold(relu, value_info=True)
    infos = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert infos == {"r": ["S", 4]}
