"""fold: no-op removal, merges of consecutive ops, graph outputs and subgraph bodies."""

from __future__ import annotations

import numpy as np
import pytest

from fold_helpers import (assert_idempotent, assert_same_outputs, fold, io_signature, nonzero, op_counts, ops,
                          parse)


def test_identity_and_dropout_removed():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Identity(x)
      b = Relu(a)
      c = Dropout(b)
      y = Identity(c)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Relu"]
    assert out.graph.node[0].output[0] == "y"  # the graph output keeps its name
    assert nonzero(result.stats) == {"identity_removed": 2, "dropout_removed": 1}
    assert io_signature(out) == io_signature(model)
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_identity_from_input_to_output_stays():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      y = Identity(x)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Identity"]
    assert result.modified is False


def test_dropout_in_training_mode_stays():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, bool t) => (float[N, 4] y) {
      r = Constant <value = float {0.5}> ()
      y = Dropout(x, r, t)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Dropout"]
    assert result.stats["dropout_removed"] == 0


NOOPS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 4] x) => (float[N, 3, 4] y) {
  c = Cast <to = 1> (x)
  t = Transpose <perm = [0, 1, 2]> (c)
  shape = Constant <value = int64[3] {0, 3, -1}> ()
  r = Reshape(t, shape)
  pads = Constant <value = int64[6] {0, 0, 0, 0, 0, 0}> ()
  p = Pad(r, pads)
  ones = Constant <value = int64[3] {1, 1, 1}> ()
  tl = Tile(p, ones)
  es = Constant <value = int64[2] {3, 1}> ()
  e = Expand(tl, es)
  st = Constant <value = int64[1] {0}> ()
  en = Constant <value = int64[1] {9223372036854775807}> ()
  ax = Constant <value = int64[1] {1}> ()
  s = Slice(e, st, en, ax)
  z = Constant <value = float[4] {0.0, 0.0, 0.0, 0.0}> ()
  a = Add(s, z)
  one = Constant <value = float {1.0}> ()
  m = Mul(one, a)
  k = Concat <axis = 1> (m)
  y = Relu(k)
}
"""


def test_every_noop_kind_is_removed():
    model = parse(NOOPS)
    out, result = fold(model)
    assert ops(out) == ["Relu"]
    assert result.stats["noops_removed"] == 10
    assert_same_outputs(model, out, sizes=(2, 5))
    assert_idempotent(out)


@pytest.mark.parametrize("line,op", [
    ("y = Cast <to = 11> (x)", "Cast"),  # a real conversion
    ("y = Transpose <perm = [0, 2, 1]> (x)", "Transpose"),
])
def test_real_changes_stay(line, op):
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4] x) => (float[N, 4, 3] y) {{
      {line}
    }}
    """.replace("float[N, 4, 3] y", "double[N, 3, 4] y" if op == "Cast" else "float[N, 4, 3] y"))
    out, result = fold(model)
    assert ops(out) == [op]
    assert result.modified is False


def test_broadcasting_add_of_zero_stays():
    # x + zeros[3, 4] changes x's shape from [1, 4] to [3, 4]: not a no-op
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4] x) => (float[3, 4] y) {
      s = Constant <value = int64[2] {3, 4}> ()
      z = ConstantOfShape(s)
      y = Add(x, z)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Add"]
    assert result.stats["noops_removed"] == 0
    assert_same_outputs(model, out)


def test_consecutive_reshapes_transposes_casts_unsqueezes_merge():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6] x, int32[N, 6] i) => (float[N, 3, 2] y, float[6, N] z, float[N, 6] w, float[1, N, 1, 6] u) {
      s1 = Constant <value = int64[3] {-1, 2, 3}> ()
      s2 = Constant <value = int64[3] {-1, 3, 2}> ()
      a = Relu(x)
      r2 = Reshape(a, s1)
      y = Reshape(r2, s2)
      t1 = Transpose <perm = [1, 0]> (x)
      t2 = Transpose <perm = [1, 0]> (t1)
      z = Transpose <perm = [1, 0]> (t2)
      c1 = Cast <to = 7> (i)
      c2 = Cast <to = 1> (c1)
      w = Identity(c2)
      a0 = Constant <value = int64[1] {0}> ()
      a2 = Constant <value = int64[1] {2}> ()
      u1 = Unsqueeze(x, a0)
      u = Unsqueeze(u1, a2)
    }
    """)
    out, result = fold(model)
    counts = op_counts(out)
    assert counts == {"Reshape": 1, "Relu": 1, "Transpose": 1, "Cast": 1, "Unsqueeze": 1}, counts
    assert result.stats["reshapes_merged"] == 1
    assert result.stats["transposes_merged"] >= 1
    assert result.stats["casts_merged"] == 1
    assert result.stats["unsqueezes_merged"] == 1
    assert_same_outputs(model, out, sizes=(2, 3))
    assert_idempotent(out)


def test_lossy_cast_chain_is_kept():
    # float -> int32 -> float truncates: the two casts are not one
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (double[N, 4] y) {
      a = Cast <to = 6> (x)
      y = Cast <to = 11> (a)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Cast", "Cast"]
    assert result.modified is False


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool c) => (float[N, 4] y) {
  w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
  y = If(c) <
    then_branch = t () => (float[N, 4] o1) {
      two = Constant <value = float {2.0}> ()
      w2 = Mul(w, two)
      i1 = Identity(x)
      o1 = Mul(i1, w2)
    },
    else_branch = e () => (float[N, 4] o2) {
      s = Shape(x)
      o2 = Reshape(x, s)
    }
  >
}
"""


def test_rules_run_inside_if_bodies():
    model = parse(IF_MODEL)
    out, result = fold(model)
    then_g = [a.g for a in out.graph.node[0].attribute if a.name == "then_branch"][0]
    else_g = [a.g for a in out.graph.node[0].attribute if a.name == "else_branch"][0]
    assert [n.op_type for n in then_g.node] == ["Mul"]
    assert [n.op_type for n in else_g.node] == ["Reshape"] or [n.op_type for n in else_g.node] == []
    assert result.stats["constants_folded"] == 1 and result.stats["identity_removed"] == 1
    assert [o.name for o in then_g.output] == ["o1"]
    for flag in (True, False):
        from opc.ort import make_session

        feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4), "c": np.array(flag)}
        a = make_session(model).run(None, feeds)[0]
        b = make_session(out).run(None, feeds)[0]
        np.testing.assert_array_equal(a, b)
    assert_idempotent(out)


def test_custom_domain_nodes_untouched():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[N, 4] x) => (float[N, 4] y) {
      a = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
      b = com.example.Twice(a)
      c = com.example.Twice(a)
      y = com.example.Join(x, b, c)
    }
    """)
    out, result = fold(model)
    assert [n.op_type for n in out.graph.node] == ["Twice", "Twice", "Join"]
    assert [n.domain for n in out.graph.node] == ["com.example"] * 3
    assert {o.domain: o.version for o in out.opset_import} == {"": 17, "com.example": 1}
    assert nonzero(result.stats) == {"constant_nodes": 1}


def test_zero_default_inputs_are_dropped():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden, feat = 4, 3
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, feat)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R"),
             numpy_helper.from_array(np.zeros((1, 8 * hidden), np.float32), "B"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([hidden], np.int64), "h"),
             numpy_helper.from_array(np.array(1, np.int64), "i1")]
    nodes = [  # zeros of shape [1, batch, hidden], the batch read from x at run time
        helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i1"], ["b"]),
        helper.make_node("Unsqueeze", ["b", "zero_axis"], ["bu"]),
        helper.make_node("Concat", ["one", "bu", "h"], ["hs"], axis=0),
        helper.make_node("ConstantOfShape", ["hs"], ["h0"]),
        helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "h0"], ["y"], hidden_size=hidden)]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_axis"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", feat])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, "N", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, result = fold(model)
    assert ops(out) == ["LSTM"]
    assert list(out.graph.node[0].input) == ["x", "W", "R"]
    assert result.stats["default_inputs_dropped"] == 3
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_subgraph_output_identity_of_an_outer_value_stays():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, bool c) => (float[N, 4] y) {
      e = Exp(x)
      y = If(c) <
        then_branch = t () => (float[N, 4] o1) { o1 = Identity(e) },
        else_branch = f () => (float[N, 4] o2) { o2 = Neg(x) }
      >
    }
    """)
    out, result = fold(model)
    then_g = [a.g for a in out.graph.node[1].attribute if a.name == "then_branch"][0]
    assert [n.op_type for n in then_g.node] == ["Identity"]
    assert [n.output[0] for n in out.graph.node] == ["e", "y"]
    assert result.modified is False


def test_rules_run_inside_loop_bodies():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, int64 n) => (float[2] y) {
      cond = Constant <value = bool {1}> ()
      y = Loop(n, cond, x) <body = b (int64 i, bool c, float[2] acc) => (bool co, float[2] acc_out) {
          co = Identity(c)
          k = Constant <value = float[2] {1.0, 2.0}> ()
          k2 = Mul(k, k)
          a = Identity(acc)
          acc_out = Add(a, k2)
      }>
    }
    """)
    out, result = fold(model)
    body = out.graph.node[0].attribute[0].g
    assert [n.op_type for n in body.node] == ["Identity", "Add"]
    assert result.stats["constants_folded"] == 1 and result.stats["identity_removed"] == 1
    from opc.ort import make_session

    feeds = {"x": np.array([0.5, -1.0], np.float32), "n": np.array(3, np.int64)}
    np.testing.assert_array_equal(make_session(model).run(None, feeds)[0], make_session(out).run(None, feeds)[0])
    assert_idempotent(out)


def test_transpose_of_unit_dims_becomes_a_reshape_and_merges():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[S, 1, 1, 8] x) => (float[1, S, 8] y, float[8, S] z) {
      t = Transpose <perm = [1, 0, 2, 3]> (x)
      s = Constant <value = int64[3] {1, -1, 8}> ()
      y = Reshape(t, s)
      a = Transpose <perm = [3, 1, 2, 0]> (x)
      s2 = Constant <value = int64[2] {8, -1}> ()
      z = Reshape(a, s2)
    }
    """)
    out, result = fold(model)
    # the first Transpose only moves a size-1 dim: gone; the second really reorders S and 8
    assert sorted(ops(out)) == ["Reshape", "Reshape", "Transpose"]
    assert result.stats["transposes_as_reshapes"] == 1 and result.stats["reshapes_merged"] == 1
    assert_same_outputs(model, out, sizes=(2, 3))
    assert_idempotent(out)


def test_rules_run_inside_scan_bodies():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] init, float[T, 2] xs) => (float[2] last, float[T, 2] ys) {
      last, ys = Scan(init, xs) <num_scan_inputs = 1, body = b (float[2] acc, float[2] xi) => (float[2] acc_out, float[2] yi) {
          k = Constant <value = float[2] {0.5, 2.0}> ()
          k2 = Add(k, k)
          d = Dropout(xi)
          acc_out = Add(acc, d)
          yi = Mul(acc_out, k2)
      }>
    }
    """)
    out, result = fold(model)
    body = [a.g for a in out.graph.node[0].attribute if a.name == "body"][0]
    assert [n.op_type for n in body.node] == ["Add", "Mul"]
    assert result.stats["constants_folded"] == 1 and result.stats["dropout_removed"] == 1
    assert_same_outputs(model, out, sizes=(2, 4))
    assert_idempotent(out)
