"""fold: constant folding, Constant nodes, the size policy, generated values, CastLike."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fold_helpers import (assert_idempotent, assert_same_outputs, fold, initializer, nonzero, op_counts,
                          ops, parse)

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2] x) => (float[N, 2] y) {
  a = Constant <value = float[2] {1.0, 2.0}> ()
  b = Constant <value = float[2] {3.0, 4.0}> ()
  c = Add(a, b)
  d = Sqrt(c)
  y = Mul(x, d)
}
"""


def test_constant_chain_becomes_one_initializer():
    model = parse(CHAIN)
    out, result = fold(model)
    assert ops(out) == ["Mul"]
    assert result.modified is True
    assert nonzero(result.stats) == {"constant_nodes": 2, "constants_folded": 2}
    np.testing.assert_allclose(initializer(out, "d"), np.sqrt([4.0, 6.0]).astype(np.float32))
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_nothing_to_fold_reports_unmodified():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2] x, float[N, 2] z) => (float[N, 2] y) {
      r = Relu(x)
      y = Add(r, z)
    }
    """)
    out, result = fold(model)
    assert result.modified is False
    assert not nonzero(result.stats)
    assert ops(out) == ["Relu", "Add"]


def test_huge_constant_of_shape_is_never_materialized():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1] x) => (float[1] y) {
      s = Constant <value = int64[2] {100000, 100000}> ()
      z = ConstantOfShape <value = float[1] {1.0}> (s)
      two = Constant <value = float[1] {2.0}> ()
      z2 = Mul(z, two)
      m = ReduceMax <keepdims = 0> (z2)
      y = Add(x, m)
    }
    """)
    tracemalloc.start()
    out, result = fold(model)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert ops(out) == ["ConstantOfShape", "ReduceMax", "Add"]
    assert result.stats["generated_folded"] == 1  # Mul(z, 2) -> ConstantOfShape(value=2)
    cos = out.graph.node[0]
    value = [a for a in cos.attribute if a.name == "value"][0].t
    assert list(value.float_data or np.frombuffer(value.raw_data, np.float32)) == [2.0]
    assert out.ByteSize() < 2 * model.ByteSize()


def test_small_constant_of_shape_becomes_an_initializer():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      s = Constant <value = int64[1] {4}> ()
      z = ConstantOfShape <value = float[1] {0.25}> (s)
      y = Mul(x, z)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Mul"]
    assert result.stats["constants_folded"] == 1
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_generated_weight_scaled_per_channel_stays_generated():
    # a 6.9 KB weight made by ConstantOfShape and scaled per output channel: an Expand of
    # 64 values, not a materialized tensor (generator_limit_kb=1)
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] x) => (float[1, 64, 6, 6] y) {
      s = Constant <value = int64[4] {64, 3, 3, 3}> ()
      w = ConstantOfShape <value = float[1] {0.01}> (s)
      start = Constant <value = float {1.0}> ()
      limit = Constant <value = float {65.0}> ()
      delta = Constant <value = float {1.0}> ()
      k = Range(start, limit, delta)
      ks = Constant <value = int64[4] {64, 1, 1, 1}> ()
      kk = Reshape(k, ks)
      w2 = Mul(w, kk)
      y = Conv(x, w2)
    }
    """)
    out, result = fold(model)
    assert op_counts(out) == {"Expand": 1, "Conv": 1}
    assert result.stats["generated_folded"] == 1
    assert out.ByteSize() < 2000
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_size_and_generator_limits():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 512] x) => (float[N, 512] y) {
      a = Constant <value = float[1] {3.0}> ()
      r = Constant <value = int64[1] {512}> ()
      t = Tile(a, r)
      e = Exp(t)
      y = Add(x, e)
    }
    """)
    # default: the 2 KiB Tile output stays generated, and Exp of it folds into the generator
    out, result = fold(model)
    assert ops(out) == ["ConstantOfShape", "Add"]
    assert result.stats["generated_folded"] == 1
    assert_same_outputs(model, out)
    # a larger generator limit materializes it
    out2, result2 = fold(model, generator_limit_kb=4)
    assert ops(out2) == ["Add"]
    assert result2.stats["constants_folded"] == 2
    assert_same_outputs(model, out2)
    # the size limit wins over the generator limit
    out3, _ = fold(model, generator_limit_kb=4, size_limit_mb=0.001)
    assert ops(out3) == ["ConstantOfShape", "Add"]
    assert max(t.ByteSize() for t in out3.graph.initializer) < 1024


def test_castlike_constant_folds_without_the_other_input():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x, double[N, 3] d) => (float[N, 3] y, float[N, 3] z) {
      c = Constant <value = double[1] {0.5}> ()
      cl = CastLike(c, x)
      y = Add(x, cl)
      dl = CastLike(d, x)
      z = Mul(dl, x)
    }
    """)
    out, result = fold(model)
    assert op_counts(out) == {"Add": 1, "Cast": 1, "Mul": 1}
    assert result.stats["castlike_folded"] == 2
    assert initializer(out, "cl").dtype == np.float32
    assert_same_outputs(model, out)
    assert_idempotent(out)


def test_old_opset_node_falls_back_to_onnxruntime():
    # the reference evaluator cannot run opset-9 Unsqueeze (axes attribute); ORT does
    model = parse("""
    <ir_version: 4, opset_import: ["" : 9]>
    g (float[1, 4, 2, 2] x) => (float[1, 4, 2, 2] y) {
      c = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
      u = Unsqueeze <axes = [1, 2]> (c)
      y = Mul(x, u)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Mul"]
    assert initializer(out, "u").shape == (4, 1, 1)
    assert_same_outputs(model, out)


def test_random_ops_are_never_folded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      r = RandomUniform <shape = [2], seed = 1.0> ()
      y = Add(x, r)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["RandomUniform", "Add"]
    assert result.modified is False


def test_scalar_constants_keep_rank_zero():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 5] x) => (float[3, 1] y) {
      shape = Shape(x)
      i = Constant <value = int64 {1}> ()
      n = Gather(shape, i)
      ax = Constant <value = int64[1] {0}> ()
      u = Unsqueeze(n, ax)
      one = Constant <value = int64[1] {1}> ()
      start = Constant <value = int64[1] {0}> ()
      y = Slice(x, start, one, one)
      unused = Add(u, u)
    }
    """)
    out, result = fold(model)
    assert ops(out) == ["Slice"]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("option,value", [("skip", ("nonsense",))])
def test_bad_option_is_a_pipeline_error(option, value):
    from opc.errors import PipelineError

    with pytest.raises(PipelineError, match="unknown rule family"):
        fold(CHAIN, **{option: value})
