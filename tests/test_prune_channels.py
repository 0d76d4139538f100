"""prune(mode=channels): dependency groups (residual Add, Concat, depthwise, BatchNorm,
Flatten), exact removal of dead channels, blocked groups, reconstruction, and shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import opc
from opc.data import CalibrationData
from opc.ort import make_session


pytestmark = pytest.mark.usefixtures("one_blas_thread")


RNG = np.random.default_rng(5)


def build(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def compile_(model, passes, calibration=None):
    out, report = opc.compile(model, passes=passes, calibration=calibration)
    onnx.checker.check_model(out, full_check=True)  # shapes consistent after pruning
    return out, report.passes[-1]


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def outputs(model, feeds):
    return make_session(model, threads=1).run(None, feeds)[0]


def conv_w(o, i, k=3, dead=()):
    w = RNG.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)
    w[list(dead)] = 0.0
    return w


def bias(o, dead=()):
    b = RNG.standard_normal(o) * 0.1
    b[list(dead)] = 0.0
    return b


RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
res (float[N, 3, 8, 8] x) => (float[N, 4] y) {
    a = Conv<pads = [1, 1, 1, 1]>(x, w0, b0)
    c1 = Conv<pads = [1, 1, 1, 1]>(a, w1)
    n1 = BatchNormalization(c1, s1, t1, m1, v1)
    r1 = Relu(n1)
    c2 = Conv<pads = [1, 1, 1, 1]>(r1, w2, b2)
    s = Add(a, c2)
    r2 = Relu(s)
    c3 = Conv<pads = [1, 1, 1, 1]>(r2, w3, b3)
    r3 = Relu(c3)
    g = GlobalAveragePool(r3)
    f = Flatten(g)
    y = Gemm<transB = 1>(f, w4, b4)
}
"""


def residual_model():
    dead_res, dead_mid, dead_c3 = [1, 4], [0, 3, 5], [2, 6]
    bn_shift = RNG.standard_normal(6) * 0.1
    bn_shift[dead_mid] = 0.0
    mean = RNG.standard_normal(6) * 0.1
    mean[dead_mid] = 0.0
    return build(RESIDUAL, {
        "w0": conv_w(8, 3, dead=dead_res), "b0": bias(8, dead_res),
        "w1": conv_w(6, 8, dead=dead_mid),
        "s1": RNG.random(6) + 0.5, "t1": bn_shift, "m1": mean, "v1": RNG.random(6) + 0.5,
        "w2": conv_w(8, 6, dead=dead_res), "b2": bias(8, dead_res),
        "w3": conv_w(8, 8, dead=dead_c3), "b3": bias(8, dead_c3),
        "w4": RNG.standard_normal((4, 8)), "b4": RNG.standard_normal(4),
    })


def test_residual_group_pruned_together_and_dead_channels_removed_exactly():
    model = residual_model()
    out, rec = compile_(model, "prune(mode=channels,scope=layer,sparsity=0.25,layers={c1:0.5},reconstruct=false)")
    w = weights(out)
    # the Add ties a and c2: both keep the same 6 of 8 channels; c1 keeps 3 of 6; c3 6 of 8
    assert w["w0"].shape == (6, 3, 3, 3) and w["b0"].shape == (6,)
    assert w["w1"].shape == (3, 6, 3, 3)
    assert w["s1"].shape == w["t1"].shape == w["m1"].shape == w["v1"].shape == (3,)
    assert w["w2"].shape == (6, 3, 3, 3)
    assert w["w3"].shape == (6, 6, 3, 3)
    assert w["w4"].shape == (4, 6)
    assert rec.modified
    assert rec.stats["groups_pruned"] == 3 and rec.stats["channels_removed"] == 2 + 3 + 2
    before = sum(v.size for v in weights(model).values())
    assert rec.stats["params_removed"] == before - sum(v.size for v in w.values())
    groups = {tuple(sorted(g["producers"])): (g["channels_before"], g["channels_after"]) for g in rec.details["groups"]}
    assert groups[("a", "c2")] == (8, 6)
    assert rec.details["not_pruned"] == [{"producer": "y", "reason": "reaches graph output 'y'"}]
    # the removed channels were dead: outputs are unchanged
    x = {"x": RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, x), outputs(model, x), rtol=1e-5, atol=1e-5)


CONCAT = """
<ir_version: 8, opset_import: ["" : 17]>
cat (float[N, 3, 6, 6] x) => (float[N, 4] y) {
    a = Conv<pads = [1, 1, 1, 1]>(x, wa, ba)
    ra = Relu(a)
    b = Conv<pads = [1, 1, 1, 1]>(x, wb, bb)
    rb = Relu(b)
    k = Concat<axis = 1>(ra, x, rb)
    d = Conv<group = 13, pads = [1, 1, 1, 1]>(k, wd, bd)
    sc = Mul(d, scale)
    e = Conv(sc, we, be)
    re = Relu(e)
    f = Flatten(re)
    y = Gemm<transB = 1>(f, wf, bf)
}
"""


def concat_model():
    dead_a, dead_b, dead_e = [0, 5], [2], [1, 3]
    wd = RNG.standard_normal((13, 1, 3, 3))
    bd = RNG.standard_normal(13) * 0.1
    for c in dead_a + [9 + i for i in dead_b]:  # depthwise channels of dead inputs output 0 too
        bd[c] = 0.0
    return build(CONCAT, {
        "wa": conv_w(6, 3, dead=dead_a), "ba": bias(6, dead_a),
        "wb": conv_w(4, 3, dead=dead_b), "bb": bias(4, dead_b),
        "wd": wd, "bd": bd, "scale": RNG.random((13, 1, 1)) + 0.5,
        "we": conv_w(4, 13, k=1, dead=dead_e), "be": bias(4, dead_e),
        "wf": RNG.standard_normal((4, 4 * 36)), "bf": RNG.standard_normal(4),
    })


def test_concat_depthwise_constants_and_flatten_follow_the_groups():
    model = concat_model()
    out, rec = compile_(model, "prune(mode=channels,scope=layer,sparsity=0.34,layers={b:0.25,e:0.5},"
                               "reconstruct=false)")
    w = weights(out)
    assert w["wa"].shape[0] == 4 and w["wb"].shape[0] == 3  # 6 -> 4 and 4 -> 3
    # the concat has 4 + 3 (x, kept whole) + 3 = 10 channels: depthwise and scale follow
    assert w["wd"].shape == (10, 1, 3, 3) and w["bd"].shape == (10,) and w["scale"].shape == (10, 1, 1)
    dw = next(n for n in out.graph.node if n.output[0] == "d")
    assert next(a.i for a in dw.attribute if a.name == "group") == 10
    assert w["we"].shape == (2, 10, 1, 1)
    assert w["wf"].shape == (4, 2 * 36)  # Flatten: each channel is a block of 36 features
    assert rec.stats["groups_pruned"] == 3
    x = {"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, x), outputs(model, x), rtol=1e-5, atol=1e-5)


FFN = """
<ir_version: 8, opset_import: ["" : 17]>
enc (float[N, 5, 16] x) => (float[N, 5, 16] y) {
    q = MatMul(x, wq)
    k = MatMul(x, wk)
    kt = Transpose<perm = [0, 2, 1]>(k)
    att = MatMul(q, kt)
    p = Softmax<axis = -1>(att)
    v = MatMul(x, wv)
    ctx = MatMul(p, v)
    o = MatMul(ctx, wo)
    h = Add(x, o)
    n = LayerNormalization<axis = -1>(h, g, beta)
    u = MatMul(n, w1)
    ub = Add(u, b1)
    half = Div(ub, sqrt2)
    erf = Erf(half)
    one = Add(erf, onev)
    gel = Mul(ub, one)
    act = Mul(gel, halfv)
    dn = MatMul(act, w2)
    db = Add(dn, b2)
    y = Add(n, db)
}
"""


def ffn_model():
    return build(FFN, {
        "wq": RNG.standard_normal((16, 16)) / 4, "wk": RNG.standard_normal((16, 16)) / 4,
        "wv": RNG.standard_normal((16, 16)) / 4, "wo": RNG.standard_normal((16, 16)) / 4,
        "g": np.ones(16), "beta": np.zeros(16),
        "w1": RNG.standard_normal((16, 32)) / 4, "b1": RNG.standard_normal(32) * 0.1,
        "sqrt2": np.array(1.4142135), "onev": np.array(1.0), "halfv": np.array(0.5),
        "w2": RNG.standard_normal((32, 16)) / 6, "b2": RNG.standard_normal(16) * 0.1,
    })


def test_transformer_only_the_ffn_is_pruned_and_reconstruction_helps():
    model = ffn_model()
    calib = CalibrationData(None, {"x": RNG.standard_normal((64, 5, 16)).astype(np.float32)})
    plain, rec = compile_(model, "prune(mode=channels,sparsity=0.5,reconstruct=false)")
    w = weights(plain)
    assert w["w1"].shape == (16, 16) and w["b1"].shape == (16,) and w["w2"].shape == (16, 16)
    for name in ("wq", "wk", "wv", "wo"):
        assert w[name].shape == (16, 16)
    assert rec.stats["groups_pruned"] == 1
    reasons = " ".join(r["reason"] for r in rec.details["not_pruned"])
    assert "Transpose" in reasons and "LayerNormalization" in reasons
    fitted, rec2 = compile_(model, "prune(mode=channels,sparsity=0.5)", calib)
    assert rec2.stats["layers_reconstructed"] >= 1
    x = {"x": RNG.standard_normal((8, 5, 16)).astype(np.float32)}
    ref = outputs(model, x)
    assert np.linalg.norm(outputs(fitted, x) - ref) < np.linalg.norm(outputs(plain, x) - ref)


@pytest.mark.parametrize("text", [
    """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4, 4] x) => (float[N, 8, 4, 4] y) { y = Conv<pads = [1, 1, 1, 1]>(x, w) }""",
    """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4, 4] x) => (float[N, 8] y) {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        s = ReduceMean<axes = [1], keepdims = 0>(c)
        y = Reshape(s, shape)
    }""",
    """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4, 4] x) => (float[N, 8, 4, 4] y) {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        r = Relu(c)
        d = Conv<pads = [1, 1, 1, 1]>(r, w2)
        y = Add(d, x8)
    }""",
])
def test_nothing_safe_to_prune_is_not_modified(text):
    weights_ = {"w": conv_w(8, 3), "w2": conv_w(8, 8), "shape": np.array([-1, 8]), "x8": np.ones((1, 8, 1, 1))}
    names = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    model = onnx.parser.parse_model(text)
    for k, v in weights_.items():
        if k in names:
            dtype = np.int64 if k == "shape" else np.float32
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(v, dtype), k))
    out, rec = compile_(model, "prune(mode=channels,sparsity=0.5)")
    if "Add(d, x8)" in text:  # the last conv reaches the output; the first one feeds it freely
        assert rec.modified and weights(out)["w"].shape == (4, 3, 3, 3)
        return
    assert not rec.modified and rec.stats["groups_pruned"] == 0
    assert weights(out)["w"].shape == (8, 3, 3, 3)


def test_residual_with_outside_operand_is_blocked():
    model = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, 4, 4] x) => (float[N, 2] y) {
        c = Conv<pads = [1, 1, 1, 1]>(x, w)
        s = Add(c, x)
        p = GlobalAveragePool(s)
        f = Flatten(p)
        y = Gemm<transB = 1>(f, wf)
    }""", {"w": conv_w(8, 8), "wf": RNG.standard_normal((2, 8))})
    _, rec = compile_(model, "prune(mode=channels,sparsity=0.5)")
    assert not rec.modified
    assert "enters" in rec.details["not_pruned"][0]["reason"]


# --- digits: smaller, still accurate, runs -----------------------------------------------------

def test_digits_channels_with_reconstruction(digits_assets):
    model = onnx.load(str(digits_assets["model"]))
    data = CalibrationData.load(digits_assets["calib"], model)
    ev = np.load(digits_assets["eval"])

    def top1(m):
        return float((outputs(m, {"input": ev["input"]}).argmax(1) == ev["labels"]).mean())

    out, rec = compile_(model, "prune(mode=channels,sparsity=0.3)", data)
    assert rec.stats["params_removed"] > 0.3 * sum(v.size for v in weights(model).values())
    assert top1(out) >= top1(model) - 0.02
    again, rec2 = compile_(model, "prune(mode=channels,sparsity=0.3,reconstruct=false)", data)
    assert rec2.stats["params_removed"] == rec.stats["params_removed"]
    assert top1(out) > top1(again)


def test_activation_importance_finds_the_dead_channels_too():
    model = residual_model()
    calib = CalibrationData(None, {"x": RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)})
    out, rec = compile_(model, "prune(mode=channels,scope=layer,sparsity=0.25,layers={c1:0.5},"
                               "importance=activation,reconstruct=false)", calib)
    assert weights(out)["w0"].shape == (6, 3, 3, 3) and weights(out)["w1"].shape == (3, 6, 3, 3)
    x = {"x": RNG.standard_normal((3, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(outputs(out, x), outputs(model, x), rtol=1e-5, atol=1e-5)


def test_channel_multiple_rounds_kept_channels_up():
    model = concat_model()
    _, rec = compile_(model, "prune(mode=channels,scope=layer,sparsity=0.5,reconstruct=false,channel_multiple=4)")
    kept = {g["producers"][0]: g["channels_after"] for g in rec.details["groups"]}
    assert kept["a"] == 4  # 6 -> 3, rounded up to 4
    assert kept["b"] == 2 and kept["e"] == 2  # groups no larger than the multiple are not rounded


def test_unstructured_leaves_depthwise_convs_dense_by_default():
    model = concat_model()
    out, rec = compile_(model, "prune(sparsity=0.5,scope=layer,keep_ends=false,reconstruct=false)")
    np.testing.assert_array_equal(weights(out)["wd"], weights(model)["wd"])
    assert "d" not in [row["node"] for row in rec.details["layers"]]
    out, rec = compile_(model, "prune(sparsity=0.5,scope=layer,keep_ends=false,reconstruct=false,depthwise=true)")
    assert (weights(out)["wd"] == 0).sum() == round(0.5 * 13 * 9)


def test_computed_bias_blocks_the_producer():
    model = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4, 4] x) => (float[N, 8, 4, 4] y) {
        b = Identity(bc)
        c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
        r = Relu(c)
        y = Conv<pads = [1, 1, 1, 1]>(r, w2)
    }""", {"bc": bias(8), "w": conv_w(8, 3), "w2": conv_w(8, 8)})
    _, rec = compile_(model, "prune(mode=channels,sparsity=0.5)")
    assert not rec.modified
