"""The stable text IR and per-pass diffs."""

import re

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

from opc.textir import model_text, unified_diff

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y)
<float[4, 3] w = {1, 0, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12}, float[3] b = {1, 1, 1}> {
    h = MatMul (x, w)
    z = Add (h, b)
    c = Greater (z, b)
    y = If (c) <then_branch = t () => (float[N, 3] o) { o = Relu (z) },
                else_branch = e () => (float[N, 3] o) { o = Neg (z) }>
}
"""


def model():
    return onnx.parser.parse_model(TEXT)


def test_text_is_stable_and_has_no_weights_or_ids():
    a = model_text(model())
    b = model_text(onnx.load_from_string(model().SerializeToString()))
    assert a == b
    assert "init w: float32[4,3] nnz=10 hash=" in a
    assert "MatMul \"\" (x, w) -> (h)" in a
    assert "input x: float32[N,4]" in a and "output y: float32[N,3]" in a
    assert not re.search(r"0x[0-9a-f]{6,}", a)
    assert "11.0" not in a and "12" not in a.split("init w")[1].splitlines()[0].split("hash")[0]


def test_subgraphs_are_indented():
    text = model_text(model())
    assert "  then_branch: graph {" in text
    assert "    Relu \"\" (z) -> (o)" in text


def test_value_only_change_shows_in_the_diff():
    m1 = model()
    m2 = model()
    w = numpy_helper.to_array(m2.graph.initializer[0]).copy()
    w[w < 5] = 0  # "prune" small weights: same shape, different values
    m2.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    t1, t2 = model_text(m1), model_text(m2)
    d = unified_diff(t1, t2)
    changed = [l for l in d.splitlines() if l.startswith(("+init", "-init"))]
    assert len(changed) == 2 and "nnz=10" in changed[0] and "nnz=7" in changed[1]
    assert int(np.count_nonzero(w)) == 7


def test_identical_models_give_an_empty_diff():
    assert unified_diff(model_text(model()), model_text(model())) == ""
