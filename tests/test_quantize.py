"""The quantize pass: QDQ structure per operator, parameters, coverage, errors, accuracy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import opc
from opc import calibrate as cal
from opc.data import CalibrationData
from opc.errors import DataError, PipelineError
from opc.ort import make_session

DATA = Path(__file__).resolve().parents[1] / "compiler" / "data"
INTEGER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger",
               "ConvInteger", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool"}


def build(text: str, inits: dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text)
    m.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    onnx.checker.check_model(m)
    return m


def calib(model, n=64, seed=0, shapes=None):
    rng = np.random.default_rng(seed)
    arrays = {}
    for v in model.graph.input:
        if v.name in {i.name for i in model.graph.initializer}:
            continue
        dims = [d.dim_value if d.dim_value else n for d in v.type.tensor_type.shape.dim]
        dims[0] = n
        arrays[v.name] = rng.standard_normal(dims).astype(np.float32)
    return CalibrationData(Path("<test>"), arrays)


def ops(model):
    return [n.op_type for n in model.graph.node]


def optimized_ops(model, tmp_path) -> Counter:
    import onnxruntime as ort

    path = str(tmp_path / "opt.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = path
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def init(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def node_by_output(model, name):
    return next(n for n in model.graph.node if name in n.output)


def quantize(model, passes="quantize", data=None, **kw):
    return opc.compile(model, passes, calibration=data if data is not None else calib(model), **kw)


def cnn():
    rng = np.random.default_rng(0)
    return build("""
    g (float[N, 3, 8, 8] x) => (float[N, 5] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu(c1)
        p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
        c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
        r2 = Relu(c2)
        s = Add(r2, p1)
        g1 = GlobalAveragePool(s)
        f = Flatten(g1)
        y = Gemm <transB = 1> (f, w3, b3)
    }""", {"w1": rng.standard_normal((4, 3, 3, 3)) * 0.3, "b1": rng.standard_normal(4) * 0.1,
           "w2": rng.standard_normal((4, 4, 3, 3)) * 0.3, "b2": rng.standard_normal(4) * 0.1,
           "w3": rng.standard_normal((5, 4)), "b3": rng.standard_normal(5) * 0.1})


def test_cnn_structure_stats_and_ort_fusion(tmp_path):
    m = cnn()
    q, report = quantize(m)
    rec = report.passes[0]
    assert rec.modified
    st = rec.stats
    assert st["quantized_conv"] == 2 and st["quantized_gemm"] == 1 and st["quantized_nodes"] == 3
    assert st["eligible_nodes"] == 3 and st["coverage"] == 1.0
    assert st["activations_fused"] == 2 and st["weights_quantized"] == 3 and st["biases_quantized"] == 3
    # tensors quantized: x, c1->r1 (fused), p1 (shared), c2->r2 (fused), s, g1, f (shared)
    assert st["qdq_pairs"] == 7
    assert st["calibration_samples"] == 64
    c = Counter(ops(q))
    assert c["Relu"] == 0 and c["QuantizeLinear"] == 7
    assert c["DequantizeLinear"] == 7 + 3 + 3  # activations, weights, biases
    # the Conv writes the Relu's output name directly, followed by its Q
    conv1 = node_by_output(q, "r1")
    assert conv1.op_type == "Conv"
    # weights: int8 per channel, biases int32 with scale = x_scale * w_scale
    wdq = node_by_output(q, conv1.input[1])
    assert wdq.op_type == "DequantizeLinear" and wdq.attribute[0].i == 0
    qw, ws = init(q, wdq.input[0]), init(q, wdq.input[1])
    assert qw.dtype == np.int8 and ws.shape == (4,)
    w1 = init(m, "w1")
    np.testing.assert_allclose(ws, np.abs(w1).reshape(4, -1).max(axis=1) / 127, rtol=1e-6)
    bdq = node_by_output(q, conv1.input[2])
    xdq = node_by_output(q, conv1.input[0])
    x_scale = init(q, xdq.input[1])
    assert init(q, bdq.input[0]).dtype == np.int32
    np.testing.assert_allclose(init(q, bdq.input[1]), x_scale * ws, rtol=1e-6)
    # MaxPool output shares its input's parameters; the graph output stays float
    mp = next(n for n in q.graph.node if n.op_type == "MaxPool")
    mp_q = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == mp.output[0])
    r1_q = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1")
    assert mp_q.input[1:] == r1_q.input[1:] or (
        init(q, mp_q.input[1]) == init(q, r1_q.input[1]) and init(q, mp_q.input[2]) == init(q, r1_q.input[2]))
    assert node_by_output(q, "y").op_type == "Gemm"
    assert q.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # after ONNX Runtime's optimizations every Conv/Gemm runs as an integer kernel
    opt = optimized_ops(q, tmp_path)
    assert opt["QLinearConv"] == 2 and opt["QGemm"] == 1
    assert opt["Conv"] == 0 and opt["Gemm"] == 0 and opt["FusedConv"] == 0
    assert opt["QLinearAdd"] == 1 and opt["QLinearGlobalAveragePool"] == 1
    # the quantized model stays close to float
    feeds = {"x": np.random.default_rng(9).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    ref = make_session(m).run(None, feeds)[0]
    out = make_session(q).run(None, feeds)[0]
    assert cal.LayerError(float((ref**2).sum()), float(((ref - out) ** 2).sum())).sqnr_db > 20


def test_activation_scales_match_numpy_oracle():
    m = cnn()
    data = calib(m, n=48, seed=3)
    q, _ = quantize(m, data=data)
    x = data.arrays["x"]
    xq = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale, zp = cal.activation_params(float(x.min()), float(x.max()), "uint8")
    assert float(init(q, xq.input[1])) == scale
    assert int(init(q, xq.input[2])) == zp and init(q, xq.input[2]).dtype == np.uint8
    # r1 = relu(conv(x)): its range from a NumPy/ORT float run
    probe = cal.with_outputs(m, ["r1"])
    r1 = make_session(probe).run(["r1"], {"x": x})[0]
    r1q = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r1")
    scale, zp = cal.activation_params(0.0, float(r1.max()), "uint8")
    assert float(init(q, r1q.input[1])) == pytest.approx(scale, rel=1e-6) and int(init(q, r1q.input[2])) == 0


def test_int8_symmetric_activations():
    q, report = quantize(cnn(), "quantize(activation_type=int8,symmetric=true)")
    st = report.passes[0].stats
    assert st["activation_type"] == "int8" and st["activations_fused"] == 0
    zps = [init(q, n.input[2]) for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)
    assert Counter(ops(q))["Relu"] == 2


def test_second_run_quantizes_nothing_and_says_so(caplog):
    q, _ = quantize(cnn())
    q2, report = quantize(q)
    rec = report.passes[0]
    assert not rec.modified
    assert rec.stats["quantized_nodes"] == 0 and rec.stats["coverage"] == 0.0
    assert rec.stats["already_quantized"] == 3
    assert any("NOTHING was quantized" in w for w in rec.warnings)
    assert Counter(ops(q2)) == Counter(ops(q))


def test_exclude_by_name_and_op_type():
    m = cnn()
    q, report = quantize(m, "quantize(exclude=[Gemm])")
    st = report.passes[0].stats
    assert st["quantized_nodes"] == 2 and "quantized_gemm" not in st and st["excluded_nodes"] == 1
    assert st["coverage"] == pytest.approx(2 / 3, abs=1e-4)
    gemm = node_by_output(q, "y")
    assert list(gemm.input[1:]) == ["w3", "b3"]  # float weights, untouched
    # nothing quantized follows the Add any more, so it and the pooling stay float
    assert node_by_output(q, gemm.input[0]).op_type == "Flatten"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("s", "g1", "f") for n in q.graph.node)
    m.graph.node[3].name = "second_conv"
    q, report = quantize(m, "quantize(exclude=[second_conv])")
    assert report.passes[0].stats["quantized_conv"] == 1
    assert list(node_by_output(q, "c2").input[1:]) == ["w2", "b2"]


def test_excluding_everything_warns_loudly():
    q, report = quantize(cnn(), "quantize(exclude=[Conv,Gemm])")
    rec = report.passes[0]
    assert not rec.modified and rec.stats["quantized_nodes"] == 0 and rec.stats["coverage"] == 0.0
    assert any("NOTHING was quantized" in w for w in report.warnings)
    assert "QuantizeLinear" not in ops(q)


MATMUL = """
g (float[N, 6, 8] x) => (float[N, 6, 6] y) {
    w = Constant <value = float[8, 8] {%s}> ()
    h = MatMul(x, w)
    t = Transpose <perm = [0, 2, 1]> (h)
    y = MatMul(h, t)
}"""


def matmul_model():
    vals = ",".join(f"{v:.4f}" for v in np.random.default_rng(1).standard_normal(64))
    return build(MATMUL % vals, {})


def test_constant_node_weights_and_batched_matmul(tmp_path):
    m = matmul_model()
    q, report = quantize(m)
    st = report.passes[0].stats
    # the weight lives in a Constant node (as in Paddle/TensorFlow exports): still quantized
    assert st["quantized_matmul"] == 2 and st["coverage"] == 1.0 and st["weights_quantized"] == 1
    first = node_by_output(q, "h")
    wdq = node_by_output(q, first.input[1])
    assert wdq.op_type == "DequantizeLinear" and init(q, wdq.input[0]).dtype == np.int8
    assert init(q, wdq.input[1]).shape == (8,)  # per output column
    second = node_by_output(q, "y")
    assert all(node_by_output(q, i).op_type == "DequantizeLinear" for i in second.input)
    opt = optimized_ops(q, tmp_path)
    assert opt["MatMul"] == 0 and sum(opt[k] for k in INTEGER_OPS) == 2
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 6, 8)).astype(np.float32)}
    ref = make_session(m).run(None, feeds)[0]
    out = make_session(q).run(None, feeds)[0]
    assert opc.ort.compare(ref, out)["cosine"] > 0.999


def test_residual_add_feeding_float_ops_stays_float():
    rng = np.random.default_rng(12)
    m = build("""
    g (float[N, 16] x) => (float[N, 16] y) {
        h = MatMul(x, w1)
        r = Add(h, x)
        n = LayerNormalization <axis = -1> (r, gamma, beta)
        y = MatMul(n, w2)
    }""", {"w1": rng.standard_normal((16, 16)), "w2": rng.standard_normal((16, 16)),
           "gamma": np.ones(16), "beta": np.zeros(16)}, opset=17)
    q, report = quantize(m, "quantize(smoothquant=false)")  # placement alone, no SmoothQuant Mul
    st = report.passes[0].stats
    assert st["quantized_matmul"] == 2
    # the Add feeds a float LayerNorm: quantizing it would add error and no integer kernel
    add = node_by_output(q, "r")
    assert [node_by_output(q, i).op_type for i in add.input] == ["MatMul", "DequantizeLinear"]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in ("h", "r") for n in q.graph.node)
    assert st["qdq_pairs"] == 2  # x and n


def test_opset11_per_channel_gives_a_valid_model():
    m = cnn()
    m.opset_import[0].version = 11
    onnx.checker.check_model(m)
    q, report = quantize(m)
    assert report.passes[0].stats["opset_upgraded_to"] == 13
    assert q.opset_import[0].version >= 13
    onnx.checker.check_model(q, full_check=True)
    axes = [a.i for n in q.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes  # per-channel weights survived
    make_session(q).run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_opset11_without_conversion_falls_back_to_per_tensor(monkeypatch):
    from onnx import version_converter

    def refuse(model, version):
        raise RuntimeError("no adapter for this model")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    m = cnn()
    m.opset_import[0].version = 11
    q, report = quantize(m)
    assert report.passes[0].stats["quantized_nodes"] == 3 and "opset_upgraded_to" not in report.passes[0].stats
    assert any("per tensor" in w for w in report.warnings)
    assert q.opset_import[0].version == 11
    onnx.checker.check_model(q, full_check=True)
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert not any(a.name == "axis" for n in dq for a in n.attribute)  # no per-axis DQ before opset 13
    make_session(q).run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_old_light_model_ir3_fixed_batch_constant_of_shape_weights(tmp_path):
    # ONNX's light squeezenet: IR 3 (initializers listed as inputs), opset 9, batch fixed
    # at 1, weights built by ConstantOfShape nodes
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    m = onnx.load(str(path))
    q, report = opc.compile(m, "quantize(calibration=random,samples=3,sensitivity_samples=1)")
    st = report.passes[0].stats
    assert st["opset_upgraded_to"] == 13 and st["coverage"] == 1.0 and st["quantized_conv"] == 26
    assert st["calibration_samples"] == 3
    onnx.checker.check_model(q)
    opt = optimized_ops(q, tmp_path)
    assert opt["QLinearConv"] == 26
    feeds = opc.ort.seeded_feeds(q)
    assert make_session(q).run(None, feeds)[0].shape == make_session(m).run(None, feeds)[0].shape


def test_conv_transpose_and_concat():
    rng = np.random.default_rng(4)
    m = build("""
    g (float[N, 4, 5, 5] x) => (float[N, 6, 10, 10] y) {
        u = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (x, w, b)
        v = Relu(u)
        z = Conv (v, w2)
        k = Concat <axis = 1> (v, z)
        y = Mul(k, k)
    }""", {"w": rng.standard_normal((4, 3, 2, 2)), "b": rng.standard_normal(3),
           "w2": rng.standard_normal((3, 3, 1, 1))})
    q, report = quantize(m)
    st = report.passes[0].stats
    assert st["quantized_convtranspose"] == 1 and st["quantized_conv"] == 1
    ct = node_by_output(q, "v")
    assert ct.op_type == "ConvTranspose"
    wdq = node_by_output(q, ct.input[1])
    assert [a.i for a in wdq.attribute if a.name == "axis"] == [1]
    cat = node_by_output(q, "k")
    assert all(node_by_output(q, i).op_type == "DequantizeLinear" for i in cat.input)
    mul = node_by_output(q, "y")  # graph output: its producer keeps a float output
    assert mul.op_type == "Mul"
    feeds = {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)}
    ref = make_session(m).run(None, feeds)[0]
    out = make_session(q).run(None, feeds)[0]
    assert opc.ort.compare(ref, out)["cosine"] > 0.99


def test_sensitivity_table_details_metadata_and_inspect(tmp_path):
    from opc.inspect_model import format_inspect, inspect_model

    q, report = quantize(cnn())
    rec = report.passes[0]
    table = rec.details["sensitivity"]
    assert [r["op"] for r in table] == ["Conv", "Conv", "Gemm"]
    assert all(isinstance(r["sqnr_db"], float) and 10 < r["sqnr_db"] < 99 for r in table)
    assert rec.stats["min_layer_sqnr_db"] == min(r["sqnr_db"] for r in table)
    meta = {p.key: p.value for p in q.metadata_props}
    stored = json.loads(meta["opc.quantize.sensitivity"])
    assert [row[0] for row in stored["layers"]] == [r["node"] for r in table]
    text = format_inspect(inspect_model(q))
    assert "quantization sensitivity" in text and f"{table[0]['sqnr_db']:.2f} dB" in text


def test_bias_correction_and_methods_run():
    m = cnn()
    data = calib(m, n=64, seed=5)
    base = quantize(m, "quantize", data=data)[1].passes[0].stats["output_sqnr_db"]
    for passes in ("quantize(bias_correction=false)", "quantize(calibration=entropy,bins=512)",
                   "quantize(calibration=percentile)", "quantize(calibration=mse)"):
        q, report = quantize(m, passes, data=data)
        st = report.passes[0].stats
        assert st["quantized_nodes"] == 3 and st["output_sqnr_db"] > base - 6, passes


def test_bias_correction_removes_the_mean_shift():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 16)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    m = build("""
    g (float[N, 16] x) => (float[N, 6] y) {
        y = Gemm <transB = 1> (x, w, b)
    }""", {"w": w, "b": b})
    x = (rng.standard_normal((128, 16)) + 3.0).astype(np.float32)  # inputs with a large mean
    data = CalibrationData(Path("<test>"), {"x": x})
    on, report_on = quantize(m, "quantize(smoothquant=false)", data=data)
    off, report_off = quantize(m, "quantize(bias_correction=false,smoothquant=false)", data=data)
    gemm = node_by_output(on, "y")
    bdq = node_by_output(on, gemm.input[2])
    b_on = init(on, bdq.input[0]) * init(on, bdq.input[1]).astype(np.float64)
    wdq = node_by_output(on, gemm.input[1])
    w_deq = init(on, wdq.input[0]) * init(on, wdq.input[1])[:, None]
    expected = b - x.mean(axis=0) @ (w_deq - w).T
    np.testing.assert_allclose(b_on, expected, atol=float(init(on, bdq.input[1]).max()))
    y_ref = x @ w.T + b
    err_on = (make_session(on).run(None, {"x": x})[0] - y_ref).mean(axis=0)
    err_off = (make_session(off).run(None, {"x": x})[0] - y_ref).mean(axis=0)
    assert np.abs(err_on).mean() < np.abs(err_off).mean()


def test_weight_only_int8_and_int4(tmp_path):
    rng = np.random.default_rng(7)
    m = build("""
    g (float[N, 64] x) => (float[N, 16] y) {
        h = MatMul(x, w1)
        y = Gemm <transB = 1> (h, w2, b2)
    }""", {"w1": rng.standard_normal((64, 32)), "w2": rng.standard_normal((16, 32)), "b2": rng.standard_normal(16)})
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float32)}
    ref = make_session(m).run(None, feeds)[0]
    q8, report = opc.compile(m, "quantize(weight_only=true)")
    st = report.passes[0].stats
    assert st["quantized_nodes"] == 2 and st["weight_bits"] == 8 and "QuantizeLinear" not in ops(q8)
    assert opc.ort.compare(ref, make_session(q8).run(None, feeds)[0])["cosine"] > 0.9999
    q4, report = opc.compile(m, "quantize(weight_only=true,weight_bits=4,block_size=16)")
    assert report.passes[0].stats["quantized_nodes"] == 2 and q4.opset_import[0].version >= 21
    dq = [n for n in q4.graph.node if n.op_type == "DequantizeLinear"]
    assert all(any(a.name == "block_size" and a.i == 16 for a in n.attribute) for n in dq)
    int4 = [t for t in q4.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= 2
    assert optimized_ops(q4, tmp_path)["MatMulNBits"] >= 1  # ORT fuses DQ(int4 blocks) -> MatMul
    assert opc.ort.compare(ref, make_session(q4).run(None, feeds)[0])["cosine"] > 0.98
    # the int4 values are round(w / block scale) on 16-row blocks of w1 (K axis 0)
    dq1 = next(n for n in dq if n.output[0] == node_by_output(q4, "h").input[1])
    q1 = numpy_helper.to_array(next(t for t in int4 if t.name == dq1.input[0])).astype(np.float32)
    s1 = init(q4, dq1.input[1])
    w1 = init(m, "w1")
    assert s1.shape == (4, 32)
    np.testing.assert_allclose(s1, np.abs(w1.reshape(4, 16, 32)).max(axis=1) / 7, rtol=1e-6)
    np.testing.assert_array_equal(q1, np.round(w1 / np.repeat(s1, 16, axis=0)))


def test_smoothquant_moves_outlier_channels_into_weights():
    rng = np.random.default_rng(8)
    m = build("""
    g (float[N, 32] x) => (float[N, 16] y, float[N, 8] z) {
        y = MatMul(x, w)
        z = Gemm <transB = 1> (x, w2)
    }""", {"w": rng.standard_normal((32, 16)) * 0.2, "w2": rng.standard_normal((8, 32)) * 0.2})
    x = rng.standard_normal((256, 32)).astype(np.float32)
    x[:, 3] *= 60.0  # one outlier channel, as in transformer activations
    data = CalibrationData(Path("<test>"), {"x": x})
    plain = quantize(m, "quantize(smoothquant=false)", data=data)[1].passes[0].stats
    q, report = quantize(m, "quantize(smoothquant=true)", data=data)
    smooth = report.passes[0].stats
    assert smooth["smoothed_nodes"] == 2
    assert Counter(ops(q))["Mul"] == 1  # one scale per activation, shared by both consumers
    assert smooth["output_sqnr_db"] > plain["output_sqnr_db"] + 3
    # X / s through the Mul and s * W in the weights: the float function is unchanged
    mul = next(n for n in q.graph.node if n.op_type == "Mul")
    inv = init(q, mul.input[1])
    w_dq = node_by_output(q, node_by_output(q, "y").input[1])
    wscale = init(q, w_dq.input[1])
    w_smoothed = init(q, w_dq.input[0]).astype(np.float32) * wscale
    # within half a quantization step of the smoothed weight, mapped back through 1/s
    bound = 0.5 * wscale[None, :] * inv[:, None] * (1 + 1e-4) + 1e-7
    assert np.all(np.abs(w_smoothed * inv[:, None] - init(m, "w")) <= bound)
    assert smooth["smoothquant_alpha_mean"] in (0.4, 0.5, 0.6, 0.7, 0.8)


def test_random_calibration_is_reported():
    q, report = opc.compile(cnn(), "quantize(calibration=random,samples=16)")
    st = report.passes[0].stats
    assert st["calibration_synthetic"] == 1 and st["quantized_nodes"] == 3 and st["calibration_samples"] == 16
    assert any("SYNTHETIC" in w for w in report.warnings)


def test_calibration_data_errors(tmp_path):
    m = cnn()
    with pytest.raises(DataError, match="calibration-data"):
        opc.compile(m, "quantize")
    with pytest.raises(DataError, match="samples=100"):
        quantize(m, "quantize(samples=100)", data=calib(m, n=10))
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match="'image' is not a model input"):
        opc.compile(m, "quantize", calibration=bad)
    np.savez(bad, x=np.zeros((4, 3, 8, 8), np.float64))
    with pytest.raises(DataError, match="dtype float64"):
        opc.compile(m, "quantize", calibration=bad)
    np.savez(bad, x=np.zeros((4, 3, 7, 8), np.float32))
    with pytest.raises(DataError, match="axis 2"):
        opc.compile(m, "quantize", calibration=bad)
    with pytest.raises(PipelineError):
        opc.compile(m, "quantize(calibration=kl)")
    with pytest.raises(PipelineError, match="weight_only"):
        opc.compile(m, "quantize(weight_bits=4)", calibration=calib(m))
    with pytest.raises(PipelineError, match="must be 4 or 8"):
        opc.compile(m, "quantize(weight_only=true,weight_bits=6)")


def test_digits_int8_accuracy_within_half_a_point(tmp_path):
    model = onnx.load(str(DATA / "digits_cnn.onnx"))
    ev = np.load(DATA / "digits_eval.npz")

    def top1(mm):
        return float((make_session(mm, threads=1).run(None, {"input": ev["input"]})[0].argmax(1)
                      == ev["labels"]).mean())

    fp32 = top1(model)
    for passes in ("quantize", "quantize(calibration=entropy)"):
        q, report = opc.compile(model, passes, calibration=DATA / "digits_calib.npz")
        assert report.passes[0].stats["coverage"] == 1.0
        assert top1(q) >= fp32 - 0.005, passes
    opt = optimized_ops(q, tmp_path)
    assert opt["QLinearConv"] == 3 and opt["QGemm"] == 2


def test_smoothquant_is_on_by_default_only_where_matmul_dominates():
    rng = np.random.default_rng(9)
    m = build("""
    g (float[N, 32] x) => (float[N, 16] y) {
        y = MatMul(x, w)
    }""", {"w": rng.standard_normal((32, 16)) * 0.2})
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 5] *= 40.0
    data = CalibrationData(Path("<test>"), {"x": x})
    auto = quantize(m, data=data)[1].passes[0].stats
    assert auto["smoothed_nodes"] == 1
    assert quantize(m, "quantize(smoothquant=false)", data=data)[1].passes[0].stats.get("smoothed_nodes", 0) == 0
    conv = quantize(cnn())[1].passes[0].stats  # a CNN: Conv outnumbers MatMul/Gemm
    assert conv.get("smoothed_nodes", 0) == 0 and conv["quantized_conv"] > 0
