"""prune (unstructured, N:M, reconstruction): masks against NumPy oracles, ORT outputs
against a NumPy-masked model, statistics, idempotence, and accuracy on the digits data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import opc
from opc.data import CalibrationData
from opc.errors import DataError, PipelineError
from opc.ort import make_session
from opc.passes._prune import calib, masks


pytestmark = pytest.mark.usefixtures("one_blas_thread")


RNG = np.random.default_rng(0)

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 16] x) => (float[N, 6] y) {
    h1 = Gemm<transB = 1>(x, w1, b1)
    r1 = Relu(h1)
    h2 = MatMul(r1, w2)
    r2 = Relu(h2)
    h3 = Gemm(r2, w3, b3)
    r3 = Relu(h3)
    y = MatMul(r3, w4)
}
"""

CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N, 4, 8, 8] x) => (float[N, 5] y) {
    c1 = Conv<pads = [1, 1, 1, 1]>(x, k1, kb1)
    r1 = Relu(c1)
    c2 = Conv<pads = [1, 1, 1, 1], strides = [2, 2]>(r1, k2)
    r2 = Relu(c2)
    c3 = Conv<group = 8, pads = [1, 1, 1, 1]>(r2, k3, kb3)
    r3 = Relu(c3)
    g = GlobalAveragePool(r3)
    f = Flatten(g)
    y = Gemm<transB = 1>(f, w4, b4)
}
"""


def build(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_model() -> onnx.ModelProto:
    return build(MLP, {"w1": RNG.standard_normal((32, 16)), "b1": RNG.standard_normal(32),
                       "w2": RNG.standard_normal((32, 24)) / 4, "w3": RNG.standard_normal((24, 12)) / 4,
                       "b3": RNG.standard_normal(12), "w4": RNG.standard_normal((12, 6))})


def cnn_model() -> onnx.ModelProto:
    return build(CNN, {"k1": RNG.standard_normal((8, 4, 3, 3)), "kb1": RNG.standard_normal(8),
                       "k2": RNG.standard_normal((16, 8, 3, 3)) / 8, "k3": RNG.standard_normal((16, 2, 3, 3)) / 4,
                       "kb3": RNG.standard_normal(16), "w4": RNG.standard_normal((5, 16)),
                       "b4": RNG.standard_normal(5)})


def calib_data(model, n=64, seed=1) -> CalibrationData:
    """Correlated inputs (like real data): a few shared patterns plus a little noise."""
    from opc.ort import graph_inputs, input_spec

    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(99)
    arrays = {}
    for value in graph_inputs(model):
        dims, _ = input_spec(value)
        shape = tuple(dims[1:])
        basis = patterns.standard_normal((6, int(np.prod(shape))))
        x = rng.standard_normal((n, 6)) @ basis + 0.1 * rng.standard_normal((n, basis.shape[1]))
        x = x.reshape((n,) + shape)
        for axis in range(2, x.ndim):  # images are smooth: neighbouring pixels correlate
            x = np.cumsum(x, axis=axis) / np.sqrt(np.arange(1, shape[axis - 1] + 1)).reshape(
                (-1,) + (1,) * (x.ndim - axis - 1))
        arrays[value.name] = x.astype(np.float32)
    return CalibrationData(None, arrays)


def compile_(model, passes, calibration=None):
    out, report = opc.compile(model, passes=passes, calibration=calibration)
    return out, report.passes[-1]


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def run(model, feeds):
    sess = make_session(model, threads=1)
    return sess.run(None, feeds)[0]


# --- masks against NumPy oracles --------------------------------------------------------------

def test_layer_mask_prunes_exactly_the_smallest():
    scores = RNG.random((7, 13))
    for s in (0.0, 0.3, 0.5, 0.77, 0.99):
        mask = masks.layer_mask(scores, s)
        k = round(s * scores.size)
        assert (~mask).sum() == k
        if 0 < k < scores.size:
            assert scores[~mask].max() < scores[mask].min()


def test_global_masks_share_one_threshold():
    scores = [RNG.random((4, 9)), RNG.random((10, 3)) * 0.5, RNG.random(50) * 2]
    got = masks.global_masks(scores, 0.6)
    flat = np.concatenate([s.ravel() for s in scores])
    threshold = np.sort(flat)[round(0.6 * flat.size) - 1]
    for s, m in zip(scores, got):
        np.testing.assert_array_equal(m, s > threshold)
    assert sum((~m).sum() for m in got) == round(0.6 * flat.size)


def test_nm_mask_keeps_n_best_of_every_group():
    scores = RNG.random((6, 16))
    mask = masks.nm_mask(scores, 2, 4)
    groups = scores.reshape(6, 4, 4)
    oracle = groups >= np.sort(groups, axis=-1)[..., 2:3]
    np.testing.assert_array_equal(mask, oracle.reshape(6, 16))
    assert (mask.reshape(6, 4, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError):
        masks.nm_mask(RNG.random((2, 6)), 2, 4)


# --- the pass: unstructured ----------------------------------------------------------------------

def test_layer_scope_matches_numpy_masked_model():
    model = mlp_model()
    out, rec = compile_(model, "prune(sparsity=0.6,scope=layer,keep_ends=false,reconstruct=false)")
    before, after = weights(model), weights(out)
    oracle = {}
    for name in ("w1", "w2", "w3", "w4"):
        w = before[name]
        k = round(0.6 * w.size)
        order = np.argsort(np.abs(w).ravel(), kind="stable")
        masked = w.copy().ravel()
        masked[order[:k]] = 0
        oracle[name] = masked.reshape(w.shape)
        np.testing.assert_array_equal(after[name], oracle[name])
        assert (after[name] == 0).sum() == k
    np.testing.assert_array_equal(after["b1"], before["b1"])  # biases are not pruned
    assert rec.modified
    assert rec.stats["weights_pruned"] == sum(round(0.6 * before[n].size) for n in ("w1", "w2", "w3", "w4"))
    assert rec.stats["layers_pruned"] == 4
    table = {row["node"]: row for row in rec.details["layers"]}
    assert table["h2"]["sparsity"] == pytest.approx(round(0.6 * 768) / 768, abs=1e-6)
    assert table["h2"]["params_before"] == 768 and table["h2"]["params_after"] == 768 - round(0.6 * 768)
    # ORT outputs equal those of the NumPy-masked model
    masked_model = onnx.ModelProto()
    masked_model.CopyFrom(model)
    for t in masked_model.graph.initializer:
        if t.name in oracle:
            t.CopyFrom(numpy_helper.from_array(oracle[t.name], t.name))
    x = {"x": RNG.standard_normal((5, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(out, x), run(masked_model, x), rtol=1e-6, atol=1e-6)


def test_default_keeps_first_and_last_layers_dense_and_global_threshold():
    model = mlp_model()
    out, rec = compile_(model, "prune(sparsity=0.5,reconstruct=false)")
    before, after = weights(model), weights(out)
    np.testing.assert_array_equal(after["w1"], before["w1"])
    np.testing.assert_array_equal(after["w4"], before["w4"])
    pooled = np.concatenate([np.abs(before["w2"]).ravel(), np.abs(before["w3"]).ravel()])
    zeros = (after["w2"] == 0).sum() + (after["w3"] == 0).sum()
    assert zeros == round(0.5 * pooled.size)
    kept = np.concatenate([np.abs(after[n][after[n] != 0]) for n in ("w2", "w3")])
    pruned = np.concatenate([np.abs(before[n][after[n] == 0]) for n in ("w2", "w3")])
    assert pruned.max() <= kept.min()
    assert rec.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [row["node"] for row in rec.details["layers"]] == ["h2", "h3"]


def test_overrides_and_exclusions():
    model = mlp_model()
    out, rec = compile_(model, "prune(sparsity=0.5,scope=layer,layers={h1:0.25,h2:0.75},exclude=[Gemm],"
                               "reconstruct=false)")
    before, after = weights(model), weights(out)
    np.testing.assert_array_equal(after["w1"], before["w1"])  # Gemm excluded wins over the override
    np.testing.assert_array_equal(after["w3"], before["w3"])
    assert (after["w2"] == 0).sum() == round(0.75 * 768)
    np.testing.assert_array_equal(after["w4"], before["w4"])  # last layer stays dense
    out, _ = compile_(model, "prune(sparsity=0.5,scope=layer,layers={y:0.25},exclude=[h2],reconstruct=false)")
    after = weights(out)
    assert (after["w4"] == 0).sum() == round(0.25 * 72)  # an override names an end layer: pruned
    np.testing.assert_array_equal(after["w2"], before["w2"])
    assert (after["w3"] == 0).sum() == round(0.5 * after["w3"].size)


def test_second_run_changes_nothing():
    model = mlp_model()
    data = calib_data(model)
    for opts in ("sparsity=0.5,reconstruct=false", "sparsity=0.5", "mode=nm"):
        once, rec1 = compile_(model, f"prune({opts})", data)
        twice, rec2 = compile_(once, f"prune({opts})", data)
        assert rec1.modified and not rec2.modified, opts
        assert rec2.stats["weights_pruned"] == 0
        for name, w in weights(once).items():
            np.testing.assert_array_equal(weights(twice)[name], w)


def test_nothing_prunable_is_not_modified():
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }""", {})
    _, rec = compile_(model, "prune(sparsity=0.5)")
    assert not rec.modified and rec.stats["weights_pruned"] == 0


def test_nm_pattern_along_input_channels():
    model = cnn_model()
    out, rec = compile_(model, "prune(mode=nm,n=2,m=4,keep_ends=false,reconstruct=false)")
    after = weights(out)
    k1 = after["k1"]  # [8, 4, 3, 3]: every 4 input channels at a kernel position keep 2
    assert ((k1 != 0).reshape(8, 1, 4, 9).sum(axis=2) == 2).all()
    k2 = after["k2"]  # [16, 8, 3, 3]
    assert ((k2 != 0).reshape(16, 2, 4, 9).sum(axis=2) == 2).all()
    w4 = after["w4"]  # Gemm transB [5, 16]: runs along the reduction axis 1
    assert ((w4 != 0).reshape(5, 4, 4).sum(-1) == 2).all()
    np.testing.assert_array_equal(after["k3"], weights(model)["k3"])  # 2 channels per group: skipped
    assert any("'c3' skipped" in w for w in rec.warnings)
    assert rec.stats["layers_pruned"] == 3


def test_activation_importance_uses_input_scale():
    model = mlp_model()
    data = calib_data(model)
    data.arrays["x"][:, :8] *= 100.0  # the first 8 inputs dominate the output
    out, _ = compile_(model, "prune(sparsity=0.5,scope=layer,importance=activation,keep_ends=false,"
                             "reconstruct=false)", data)
    w1 = weights(out)["w1"]
    assert (w1[:, :8] != 0).mean() > 0.9 and (w1[:, 8:] != 0).mean() < 0.1
    assert (w1 == 0).sum() == 256


def test_errors():
    model = mlp_model()
    with pytest.raises(PipelineError, match="no prunable node named nope"):
        compile_(model, "prune(layers={nope:0.5})")
    with pytest.raises(PipelineError, match="n must be smaller"):
        compile_(model, "prune(mode=nm,n=4,m=4)")
    with pytest.raises(DataError, match="calibration"):
        compile_(model, "prune(importance=activation)")
    out, rec = compile_(model, "prune(sparsity=0.5)")  # reconstruction without data: warned, skipped
    assert rec.modified and rec.stats["layers_reconstructed"] == 0
    assert any("no calibration data" in w for w in rec.warnings)


# --- reconstruction -------------------------------------------------------------------------------

def _layer_outputs(model, names, feeds):
    sess = make_session(calib.with_outputs(model, names), threads=1)
    return dict(zip(names, sess.run(names, feeds)))


def test_reconstruction_lowers_each_layer_error_on_held_out_data():
    model = cnn_model()
    data = calib_data(model, n=96, seed=2)
    held_out = calib_data(model, n=32, seed=3).arrays
    plain, _ = compile_(model, "prune(sparsity=0.7,scope=layer,keep_ends=false,reconstruct=false)", data)
    fitted, rec = compile_(model, "prune(sparsity=0.7,scope=layer,keep_ends=false)", data)
    outputs = ["c1", "c2", "c3", "y"]
    ref = _layer_outputs(model, outputs, held_out)
    a = _layer_outputs(plain, outputs, held_out)
    b = _layer_outputs(fitted, outputs, held_out)
    for name in outputs:
        err_plain = np.linalg.norm(a[name] - ref[name])
        err_fit = np.linalg.norm(b[name] - ref[name])
        assert err_fit < 0.8 * err_plain, name
    assert rec.stats["layers_reconstructed"] == 4
    for row in rec.details["reconstruction"]:
        assert row["error_after"] <= row["error_before"]
    # masks are kept: refitting never revives a pruned weight
    for name in ("k1", "k2", "k3", "w4"):
        np.testing.assert_array_equal(weights(fitted)[name] == 0, weights(plain)[name] == 0)


def test_reconstruction_keeps_nm_pattern_and_adds_a_bias():
    model = cnn_model()
    out, rec = compile_(model, "prune(mode=nm,keep_ends=false)", calib_data(model))
    k2 = weights(out)["k2"]
    assert ((k2 != 0).reshape(16, 2, 4, 9).sum(axis=2) <= 2).all()
    conv2 = next(n for n in out.graph.node if n.output[0] == "c2")
    assert len(conv2.input) == 3 and conv2.input[2] in weights(out)  # c2 had no bias; now it has one


# --- digits accuracy (shipped assets) -------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(digits_assets):
    model = onnx.load(str(digits_assets["model"]))
    data = CalibrationData.load(digits_assets["calib"], model)
    ev = np.load(digits_assets["eval"])

    def top1(m):
        return float((run(m, {"input": ev["input"]}).argmax(1) == ev["labels"]).mean())

    return model, data, top1


@pytest.mark.parametrize("sparsity,max_drop", [(0.5, 0.005), (0.8, 0.02)])
def test_digits_accuracy_with_reconstruction(digits, sparsity, max_drop):
    model, data, top1 = digits
    base = top1(model)
    out, rec = compile_(model, f"prune(sparsity={sparsity})", data)
    assert rec.stats["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert top1(out) >= base - max_drop


def test_digits_reconstruction_beats_plain_magnitude_per_layer(digits):
    model, data, top1 = digits
    plain, _ = compile_(model, "prune(sparsity=0.8,scope=layer,reconstruct=false)", data)
    fitted, _ = compile_(model, "prune(sparsity=0.8,scope=layer)", data)
    assert top1(fitted) >= top1(model) - 0.02
    assert top1(fitted) > top1(plain) + 0.05


def test_sparse_storage_shrinks_the_file_and_keeps_outputs():
    model = mlp_model()
    dense, _ = compile_(model, "prune(sparsity=0.8,scope=layer,keep_ends=false,reconstruct=false)")
    sparse, rec = compile_(model, "prune(sparsity=0.8,scope=layer,keep_ends=false,reconstruct=false,"
                                  "sparse_storage=true)")
    assert rec.stats["weights_sparse_stored"] == 4
    assert sparse.ByteSize() < dense.ByteSize()
    stored_bytes = sum(v.nbytes for v in weights(sparse).values())
    assert stored_bytes < 0.5 * sum(v.nbytes for v in weights(dense).values())  # 8 bytes per nonzero
    scatter = [n for n in sparse.graph.node if n.op_type == "ScatterElements"]
    assert len(scatter) == 4
    stored = weights(sparse)
    assert stored["w2_sparse_val"].size == 768 - round(0.8 * 768) and stored["w2_sparse_idx"].dtype == np.int32
    x = {"x": RNG.standard_normal((5, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run(sparse, x), run(dense, x))
    _, again = compile_(sparse, "prune(sparsity=0.8,scope=layer,keep_ends=false,reconstruct=false)")
    assert not again.modified  # stored weights are no longer plain constants: left alone
