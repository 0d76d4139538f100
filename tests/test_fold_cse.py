"""fold: duplicate initializers, common subexpressions and dead code."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from fold_helpers import assert_idempotent, assert_same_outputs, fold, nonzero, op_counts, ops, parse


def test_identical_initializers_and_nodes_are_shared():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
         helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Relu", ["b"], ["rb"]),
         helper.make_node("Add", ["ra", "rb"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w.copy(), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, result = fold(model)
    assert op_counts(out) == {"MatMul": 1, "Relu": 1, "Add": 1}
    assert nonzero(result.stats) == {"initializers_deduplicated": 1, "subexpressions_merged": 2}
    assert len(out.graph.initializer) == 1
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_different_attributes_or_values_are_not_merged():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      a = LeakyRelu <alpha = 0.1> (x)
      b = LeakyRelu <alpha = 0.2> (x)
      c1 = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
      c2 = Constant <value = float[4] {1.0, 2.0, 3.0, 5.0}> ()
      p = Mul(a, c1)
      q = Mul(b, c2)
      y = Add(p, q)
    }
    """)
    out, result = fold(model)
    assert op_counts(out) == {"LeakyRelu": 2, "Mul": 2, "Add": 1}
    assert nonzero(result.stats) == {"constant_nodes": 2}


def test_nondeterministic_nodes_are_not_merged():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      a = RandomNormalLike(x)
      b = RandomNormalLike(x)
      y = Sub(a, b)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["RandomNormalLike", "RandomNormalLike", "Sub"]
    assert result.modified is False


def test_graph_outputs_are_never_merged_away():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2] x) => (float[N, 2] y, float[N, 2] z) {
      y = Relu(x)
      z = Relu(x)
    }
    """)
    out, result = fold(model)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert ops(out) == ["Relu", "Relu"]
    assert result.modified is False


def test_dead_nodes_initializers_and_values_removed():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2] x, float[N, 2] unused_input) => (float[N, 2] y) {
      dead = Exp(x)
      dead2 = Log(dead)
      c = Constant <value = float[2] {1.0, 2.0}> ()
      dead3 = Mul(dead2, c)
      y = Relu(x)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Relu"]
    assert len(out.graph.initializer) == 0
    assert result.stats["dead_nodes_removed"] == 3
    assert [i.name for i in out.graph.input] == ["x", "unused_input"]  # the interface is kept
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_outer_values_used_only_by_a_subgraph_stay():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, bool c) => (float[N, 4] y) {
      e = Exp(x)
      y = If(c) <
        then_branch = t () => (float[N, 4] o1) { o1 = Relu(e) },
        else_branch = f () => (float[N, 4] o2) { o2 = Neg(x) }
      >
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Exp", "If"]
    assert result.modified is False
