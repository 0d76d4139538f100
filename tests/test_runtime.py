"""opc.runtime.Session: outputs equal ONNX Runtime's, the arena, the ORT-like API, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import opc.runtime as rt
from opc.errors import DataError, ModelError
from opc.ort import compare, make_session
from opc.runtime.xp import data_ptr

from runtime_helpers import LIGHT_MODELS, light_feeds, light_model, make_model

RTOL = 1e-4


def _ort(model, feeds):
    return make_session(model, threads=1).run(None, feeds)


def _check(model, feeds, runs=2, rtol=RTOL):
    sess = rt.Session(model, backend="numpy", threads=1)
    ref = _ort(model, feeds)
    for _ in range(runs):  # run 1 resolves shapes, run 2 executes inside the arena
        got = sess.run(None, feeds)
        for r, g in zip(ref, got):
            m = compare(r, g)
            assert m["max_rel"] <= rtol or m["max_abs"] <= 1e-6, m
    return sess


# their fully connected weights are 100-400 MB: random ones take ~20 s to make and load into ORT,
# so these keep onnx's constant weights (every class gets the same score; still run end to end)
CONSTANT_WEIGHTS = {"light_vgg19", "light_zfnet512", "light_bvlc_alexnet"}


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_matches_ort(name):
    model = light_model(name, randomize=name not in CONSTANT_WEIGHTS)
    sess = _check(model, light_feeds(model))
    assert sess.layout().arena_size > 0


def test_light_model_with_constant_weights_folds_them():
    model = light_model("light_squeezenet", randomize=False)
    sess = _check(model, light_feeds(model))
    n_cos = sum(n.op_type == "ConstantOfShape" for n in model.graph.node)
    assert sess.program.folded == n_cos
    assert all(st.node.op_type != "ConstantOfShape" for st in sess.program.steps)


def _conv_model(x_shape, w_shape, bias=True, opset=17, act="Relu", **attrs):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(w_shape).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(w_shape[0]).astype(np.float32), "b"))
        ins.append("b")
    node = helper.make_node("Conv", ins, ["c"], **attrs)
    relu = helper.make_node(act, ["c"], ["y"])
    model = make_model([node, relu], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(len(x_shape))])],
                       inits, opset)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    return model, feeds


CONV_CASES = [
    # x shape, w shape, attributes
    ((1, 8, 12, 12), (16, 8, 3, 3), dict(pads=[1, 1, 1, 1])),
    ((2, 8, 12, 12), (16, 8, 3, 3), dict(pads=[1, 1, 1, 1])),
    ((2, 8, 12, 11), (16, 8, 3, 3), dict(pads=[0, 1, 2, 1], dilations=[2, 1])),
    ((2, 8, 13, 13), (16, 8, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
    ((2, 3, 15, 15), (8, 3, 7, 7), dict(pads=[3, 3, 3, 3], strides=[2, 2])),
    ((2, 16, 9, 9), (8, 16, 1, 1), dict()),
    ((2, 16, 9, 9), (8, 16, 1, 1), dict(strides=[2, 2])),
    ((2, 12, 9, 9), (12, 1, 3, 3), dict(group=12, pads=[1, 1, 1, 1])),
    ((2, 12, 9, 9), (12, 1, 3, 3), dict(group=12, pads=[1, 1, 1, 1], strides=[2, 2])),
    ((2, 12, 9, 9), (24, 3, 3, 3), dict(group=4, pads=[1, 1, 1, 1])),
    ((2, 12, 9, 9), (24, 3, 3, 3), dict(group=4, strides=[2, 1])),
    ((2, 8, 10, 10), (8, 8, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ((2, 8, 10, 10), (8, 8, 2, 2), dict(auto_pad="SAME_LOWER")),
    ((2, 4, 20), (6, 4, 5), dict(pads=[2, 2])),
    ((1, 4, 5, 6, 7), (6, 4, 3, 3, 3), dict(pads=[1, 1, 1, 1, 1, 1])),
    # depthwise through stride phases: stride != dilation, uneven pads, 5x5
    ((2, 12, 10, 11), (12, 1, 3, 5), dict(group=12, pads=[1, 2, 0, 1], strides=[2, 3], dilations=[2, 1])),
    ((1, 6, 12, 12), (6, 1, 5, 5), dict(group=6, pads=[2, 2, 2, 2], strides=[2, 2])),
    ((2, 4, 40, 40), (4, 1, 3, 3), dict(group=4, pads=[1, 1, 1, 1])),  # large image: per-tap multiply-adds
    ((1, 3, 71, 70), (3, 1, 3, 3), dict(group=3, pads=[1, 0, 1, 2], strides=[2, 2])),  # the same, strided
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", CONV_CASES)
def test_conv_variants_match_ort(x_shape, w_shape, attrs):
    model, feeds = _conv_model(x_shape, w_shape, **attrs)
    _check(model, feeds, runs=3)


def test_conv_without_bias():
    model, feeds = _conv_model((1, 4, 6, 6), (4, 4, 3, 3), bias=False, pads=[1, 1, 1, 1])
    _check(model, feeds)


def _mlp_model():
    rng = np.random.default_rng(2)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[N, 4] y) {
        h = Gemm <transB = 1> (x, w1, b1)
        r = Relu (h)
        s = Reshape (r, shp)
        t = Transpose <perm = [0, 2, 1]> (s)
        f = Flatten <axis = 1> (t)
        z = MatMul (f, w2)
        y = Softmax <axis = -1> (z)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(np.array([0, 4, 8], np.int64), "shp"),
        numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2"),
    ])
    return model


def test_dynamic_batch_gets_one_layout_per_shape():
    model = _mlp_model()
    sess = rt.Session(model, backend="numpy")
    ref_sess = make_session(model, threads=1)
    rng = np.random.default_rng(3)
    for n in (1, 5, 1, 5):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        got = sess.run(["y"], {"x": x})[0]
        assert compare(ref_sess.run(None, {"x": x})[0], got)["max_rel"] <= RTOL
    assert len(sess._layouts) == 2


def test_conv_activation_fusion():
    for act in ("Relu", "Clip"):
        model, feeds = _conv_model((2, 6, 9, 9), (6, 1, 3, 3), group=6, pads=[1, 1, 1, 1], act=act)
        if act == "Clip":  # ReLU6 with constant bounds, as mobilenetv2 exports it
            model.graph.node[1].input.extend(["lo", "hi"])
            model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "lo"),
                                            numpy_helper.from_array(np.array(0.5, np.float32), "hi")])
        sess = _check(model, feeds)
        assert len(sess.program.steps) == 1 and sess.program.fused == 1
    model, feeds = _conv_model((1, 4, 6, 6), (4, 4, 3, 3), pads=[1, 1, 1, 1], act="Sigmoid")
    assert _check(model, feeds).program.fused == 0


@pytest.mark.parametrize("x_shape,attrs", [
    ((2, 6, 12, 12), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
    ((1, 6, 13, 11), dict(pads=[0, 2, 1, 0], strides=[2, 2])),
    ((1, 6, 14, 15), dict(pads=[2, 2, 2, 2], strides=[3, 2], dilations=[2, 1])),
    ((2, 6, 5, 40), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
    ((1, 6, 9, 9), dict(strides=[2, 2])),
    ((2, 6, 9, 9), dict(pads=[1, 1, 1, 1])),
])
@pytest.mark.parametrize("bias,act", [(True, "Relu"), (False, "Relu"), (True, "Sigmoid"), (False, "Sigmoid")])
def test_strided_depthwise_zeroes_every_border_of_a_reused_workspace(x_shape, attrs, bias, act):
    """The phase images are zeroed only where the input copy does not reach, and the bias's
    row of ones is written every run: poisoning the arena (NaN bytes) between runs must not
    change the outputs (with and without a bias, with a fused activation and without)."""
    model, feeds = _conv_model(x_shape, (6, 1, 3, 3), bias=bias, act=act, group=6, **attrs)
    sess = _check(model, feeds)
    (lay,) = sess._layouts.values()
    want = _ort(model, feeds)[0]
    for _ in range(2):
        lay.arena[...] = 0xFF
        np.testing.assert_allclose(sess.run(None, feeds)[0], want, rtol=1e-5, atol=1e-5)


def test_activation_moves_into_the_stride1_depthwise_conv_that_reads_it():
    """Conv -> Clip -> depthwise 3x3 stride 1: the clip runs in the depthwise conv's padding
    copy; into a stride-2 depthwise conv, or with a second reader, it stays on the producer."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4, 9, 9] x) => (float[2, 6, 9, 9] y, float[2, 6, 5, 5] z, float[2, 6, 9, 9] u) {
        a = Conv(x, w1, b1)
        ac = Clip(a, lo, hi)
        y = Conv <group = 6, pads = [1, 1, 1, 1]> (ac, wd, bd)
        c = Conv(x, w1, b1)
        cc = Relu(c)
        z = Conv <group = 6, pads = [1, 1, 1, 1], strides = [2, 2]> (cc, wd, bd)
        e = Conv(x, w1)
        er = Relu(e)
        f = Conv <group = 6, pads = [1, 1, 1, 1]> (er, wd)
        u = Add(f, er)
    }
    """
    rng = np.random.default_rng(6)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((6, 4, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((6, 1, 3, 3)).astype(np.float32), "wd"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "bd"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(0.5, np.float32), "hi")])
    feeds = {"x": rng.standard_normal((2, 4, 9, 9)).astype(np.float32)}
    sess = _check(model, feeds, runs=3)
    steps = sess.program.steps
    assert [st.node.op_type for st in steps] == ["Conv"] * 6 + ["Add"] and sess.program.fused == 3
    assert [getattr(st.node, "pre", None) for st in steps[:6]] == [None, ("clip", 0.0, 0.5)] + [None] * 4
    assert [getattr(st.node, "post", None) for st in steps[:6]] == [None, None, ("relu",), None, ("relu",), None]


def test_matmul_bias_and_scale_fusion():
    """MatMul -> Add(bias) -> Mul(0-d) becomes one step (bias on either side of the Add); a
    bias that would broadcast the product to a new shape, a product read twice, and a
    non-constant addend stay separate steps."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 8] x, float[2, 5, 6] r) => (float[2, 5, 6] y, float[2, 5, 6] z, float[2, 5, 6] u) {
        m = MatMul(x, w)
        a = Add(b, m)
        y = Mul(a, s)
        n = MatMul(x, w)
        z = Add(n, r)
        k = MatMul(x, w)
        k2 = Div(k, s)
        u = Add(k, k2)
    }
    """
    rng = np.random.default_rng(5)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(0.25, np.float32), "s")])
    feeds = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32),
             "r": rng.standard_normal((2, 5, 6)).astype(np.float32)}
    sess = _check(model, feeds, runs=3)
    ops = [st.node.op_type for st in sess.program.steps]
    assert ops == ["MatMul", "MatMul", "Add", "MatMul", "Div", "Add"] and sess.program.fused == 2
    assert [name for name, _ in sess.program.steps[0].node.post_ops] == ["add", "multiply"]
    assert getattr(sess.program.steps[1].node, "post_ops", None) is None
    # a (1, 6) bias row (rank 2) or a per-row bias is left to the Add kernel
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(rng.standard_normal((5, 1)).astype(np.float32), "b"))
    sess = _check(model, feeds)
    assert [st.node.op_type for st in sess.program.steps][:3] == ["MatMul", "Add", "Mul"]


def test_intermediates_live_in_the_arena_and_outputs_do_not():
    model, feeds = _conv_model((1, 8, 12, 12), (16, 8, 3, 3), pads=[1, 1, 1, 1], act="Sigmoid")
    sess = rt.Session(model, backend="numpy")
    first = sess.run(None, feeds)[0]
    lay = sess.layout()
    lo, hi = data_ptr(lay.arena), data_ptr(lay.arena) + lay.arena.size
    conv_view = lay.outs[0][0]
    assert conv_view is not None and lo <= data_ptr(conv_view) < hi
    assert lay.ws[0] is not None and lay.ws[0].size == rt.workspace_bytes(
        model.graph.node[0], [(1, 8, 12, 12), (16, 8, 3, 3), (16,)], [np.float32] * 3)
    second = sess.run(None, feeds)[0]
    assert not (lo <= data_ptr(second) < hi)
    second[...] = -1  # the caller owns its outputs: the next run is unaffected
    third = sess.run(None, feeds)[0]
    np.testing.assert_array_equal(first, third)
    # the arena holds the conv output and the conv scratch, planned so both fit at once
    assert lay.arena_size >= conv_view.nbytes + lay.ws[0].size


def test_arena_is_smaller_than_all_intermediates_together():
    model = light_model("light_resnet50")
    feeds = light_feeds(model)
    sess = rt.Session(model, backend="numpy", threads=1)
    sess.run(None, feeds)
    lay = sess.layout()
    total = sum(b.size for b in lay.blocks)
    assert 0 < lay.arena_size < total / 4
    live_peak = max(sum(b.size for b in lay.blocks if b.start <= i <= b.end)
                    for i in range(len(model.graph.node)))
    assert lay.arena_size >= live_peak


def test_stored_memory_plan_is_used():
    memory = pytest.importorskip("opc.memory")
    model, feeds = _conv_model((1, 8, 12, 12), (16, 8, 3, 3), pads=[1, 1, 1, 1])
    plan = memory.plan_model(model, {"x": (1, 8, 12, 12)}, rt.workspace_bytes)
    memory.store_plan(model, plan)
    sess = _check(model, feeds, runs=3)
    lay = sess.layout()
    assert lay.source == "model"
    assert lay.arena_size == plan.arena_size
    # an edited graph makes the stored plan stale: the new signature is planned on the fly
    big = {"x": np.concatenate([feeds["x"]] * 3)}
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    sess2 = _check(model, big)
    assert sess2.layout().source == "planned"
    assert sess2.layout().arena_size == memory.plan_model(model, {"x": big["x"].shape}, rt.workspace_bytes).arena_size
    sess3 = rt.Session(model, backend="numpy", plan_on_the_fly=False)
    sess3.run(None, big)
    assert sess3.layout().source == "runtime"
    # the own planner knows the Conv+Relu fusion (no conv output tensor): only the conv scratch
    assert sess3.layout().arena_size == sum(b.size for b in sess3.layout().blocks) > 0


def test_unsupported_op_fails_at_load_naming_it():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[2] x) => (float[2] y) { y = com.example.Frobnicate (x) }
    """)
    with pytest.raises(ModelError, match=r"unsupported op: com.example.Frobnicate \(node"):
        rt.Session(model, backend="numpy")


def test_ort_like_api_and_feed_errors():
    model = _mlp_model()
    sess = rt.Session(model, backend="numpy")
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.shape, inp.type) == ("x", ["N", 16], "tensor(float)")
    assert [o.name for o in sess.get_outputs()] == ["y"]
    with pytest.raises(DataError, match="input 'x' is missing"):
        sess.run(None, {})
    with pytest.raises(DataError, match="expected float32, got float64"):
        sess.run(None, {"x": np.zeros((1, 16))})
    with pytest.raises(DataError, match="expected shape"):
        sess.run(None, {"x": np.zeros((1, 15), np.float32)})
    with pytest.raises(DataError, match="no output 'nope'"):
        sess.run(["nope"], {"x": np.zeros((1, 16), np.float32)})


def test_backend_choice():
    assert rt.Session(_mlp_model(), backend="numpy").backend == "numpy"
    from opc.errors import UsageError

    with pytest.raises(UsageError, match="unknown backend"):
        rt.Session(_mlp_model(), backend="tpu")
    if not rt.cupy_usable():
        assert rt.Session(_mlp_model(), backend="auto").backend == "numpy"
        with pytest.raises(UsageError, match="needs CuPy and a usable GPU"):
            rt.Session(_mlp_model(), backend="cupy")


def test_session_from_path(tmp_path):
    model, feeds = _conv_model((1, 4, 6, 6), (4, 4, 3, 3), pads=[1, 1, 1, 1])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    got = rt.Session(path, backend="numpy").run(None, feeds)[0]
    assert compare(_ort(model, feeds)[0], got)["max_rel"] <= RTOL


def test_ops_without_onnx_node_cases_match_ort():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 5, 4] x) => (float[2, 3, 1, 1] y) { y = GlobalLpPool <p = 3> (x) }
    """)
    _check(model, {"x": np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)})


@pytest.mark.parametrize("op", ["Sigmoid", "Relu", "Tanh", "Exp", "Neg"])
def test_unary_ops_on_0d_tensors_match_ort(op):
    model = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float x) => (float y) {{ y = {op} (x) }}
    """)
    got = _check(model, {"x": np.array(0.75, np.float32)}).run(None, {"x": np.array(-0.5, np.float32)})[0]
    assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == np.float32


@pytest.mark.parametrize("x_shape,w_shape,attrs", [CONV_CASES[i] for i in (3, 7, 9, -4, -2, -1)])
def test_conv_batch_chunks(monkeypatch, x_shape, w_shape, attrs):
    """Batches are gathered a chunk at a time to bound the scratch memory: one image per chunk here."""
    from opc.runtime import k_nn

    monkeypatch.setattr(k_nn, "CHUNK_BYTES", 1)
    model, feeds = _conv_model((3,) + x_shape[1:], w_shape, **attrs)
    _check(model, feeds)


def test_maxpool_without_padded_copy_matches_ort():
    for attrs in ("kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]",
                  "kernel_shape = [2, 3], strides = [2, 1], pads = [0, 1, 1, 0], ceil_mode = 1",
                  "kernel_shape = [3, 3], dilations = [2, 2], pads = [2, 2, 2, 2]"):
        model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 11, 10] x) => (float[2, 3, a, b] y) {{ y = MaxPool <{attrs}> (x) }}
        """)
        _check(model, {"x": np.random.default_rng(0).standard_normal((2, 3, 11, 10)).astype(np.float32)})


def test_kernel_failure_is_one_line_naming_the_node():
    from opc.errors import OpcError

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, int64[2] s) => (float[a, b] y) { y = Reshape (x, s) }
    """)
    sess = rt.Session(model, backend="numpy")
    x = np.ones((2, 4), np.float32)
    assert sess.run(None, {"x": x, "s": np.array([4, 2])})[0].shape == (4, 2)
    for _ in range(2):  # first run of a signature, then the arena loop
        with pytest.raises(OpcError, match=r"^node 'y' \(Reshape\) failed: ValueError: cannot reshape"):
            sess.run(None, {"x": x, "s": np.array([3, 2])})
    # a value-dependent shape on a known signature still runs (outside the arena)
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 1] x, int64[2] s) => (float[a, b] y) { e = Expand (x, s)  y = Relu (e) }
    """)
    sess = rt.Session(model, backend="numpy")
    x = np.ones((2, 1), np.float32)
    for cols in (3, 5, 3):
        assert sess.run(None, {"x": x, "s": np.array([2, cols])})[0].shape == (2, cols)


@pytest.mark.parametrize("direction,bias,states,layout", [
    # layout=1 is covered by the node tests (ORT has no batchwise LSTM)
    ("bidirectional", True, True, 0), ("reverse", False, False, 0), ("forward", True, False, 0)])
def test_lstm_fast_path_matches_ort(direction, bias, states, layout):
    """Default activations: reordered, pre-halved weights cached at the first run; the gate and
    cell buffers are reused across steps and runs."""
    rng = np.random.default_rng(1)
    seq, batch, inp, hid = 5, 3, 4, 6
    dirs = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.standard_normal((dirs, 4 * hid, inp)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((dirs, 4 * hid, hid)).astype(np.float32), "R")]
    ins = ["x", "W", "R", "B" if bias else "", "", "h0" if states else "", "c0" if states else ""]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal((dirs, 8 * hid)).astype(np.float32), "B"))
    xs = (batch, seq, inp) if layout else (seq, batch, inp)
    ss = (batch, dirs, hid) if layout else (dirs, batch, hid)
    graph_ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)]
    feeds = {"x": rng.standard_normal(xs).astype(np.float32)}
    if states:
        for n in ("h0", "c0"):
            graph_ins.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ss))
            feeds[n] = rng.standard_normal(ss).astype(np.float32)
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node("LSTM", ins, ["y", "yh", "yc"], hidden_size=hid, direction=direction, layout=layout)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "yh", "yc")]
    model = helper.make_model(helper.make_graph([node], "g", graph_ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    _check(model, feeds, runs=3)


def test_depthwise_weights_fed_at_run_time_are_not_cached():
    """Derived weights are cached only for constant inputs: a computed weight is the same arena
    view every run, with new contents."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 6, 8, 8] x, float[6, 1, 3, 3] v) => (float[2, 6, 8, 8] y) {
        w = Neg (v)
        y = Conv <group = 6, pads = [1, 1, 1, 1]> (x, w)
    }
    """)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    sess = rt.Session(model, backend="numpy")
    for _ in range(3):
        feeds = {"x": x, "v": rng.standard_normal((6, 1, 3, 3)).astype(np.float32)}
        assert compare(_ort(model, feeds)[0], sess.run(None, feeds)[0])["max_rel"] <= RTOL


def test_lstm_fast_path_without_strided_matmul_out():
    """On CuPy (not NumPy) the step GEMM does not write into the strided gate view: same result."""
    from opc.runtime.registry import KERNELS, Node

    class OtherModule:  # NumPy's functions, but not recognised as NumPy by ``is_numpy``
        __name__ = "other"

        def __getattr__(self, name):
            return getattr(np, name)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    w = rng.standard_normal((1, 24, 5)).astype(np.float32)
    r = rng.standard_normal((1, 24, 6)).astype(np.float32)
    b = rng.standard_normal((1, 48)).astype(np.float32)
    node = Node("LSTM", "", "l", ["x", "w", "r", "b"], ["y", "yh", "yc"], {"hidden_size": 6}, 14)
    want = KERNELS[("", "LSTM")].build(node, np)([x, w, r, b], None, None)
    got = KERNELS[("", "LSTM")].build(node, OtherModule())([x, w, r, b], None, None)
    for a, g in zip(want, got):
        np.testing.assert_allclose(g, a, rtol=1e-6, atol=1e-7)


def _stacked_lstm_model(hidden, batch, states=(), bias=True, extra_output=None, seq=7, inp=5):
    """LSTM -> Squeeze(axis 1) -> LSTM -> ... (PyTorch's export of a stacked nn.LSTM);
    ``states``: layers given an initial h and c; ``extra_output``: also output this tensor."""
    rng = np.random.default_rng(len(hidden) * 10 + batch)
    inits, nodes, x, size = [], [], "x", inp
    feeds = {"x": rng.standard_normal((seq, batch, inp)).astype(np.float32)}
    graph_ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, (seq, batch, inp))]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    for li, hid in enumerate(hidden):
        for name, cols in ((f"W{li}", size), (f"R{li}", hid)):
            inits.append(numpy_helper.from_array(0.5 * rng.standard_normal((1, 4 * hid, cols)).astype(np.float32), name))
        ins = [x, f"W{li}", f"R{li}", "", "", "", ""]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal((1, 8 * hid)).astype(np.float32), f"B{li}"))
            ins[3] = f"B{li}"
        if li in states:
            for k, n in ((5, f"h{li}"), (6, f"c{li}")):
                ins[k] = n
                graph_ins.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, (1, batch, hid)))
                feeds[n] = rng.standard_normal((1, batch, hid)).astype(np.float32)
        while ins[-1] == "":
            ins.pop()
        nodes.append(helper.make_node("LSTM", ins, [f"y{li}", f"yh{li}", f"yc{li}"], hidden_size=hid))
        nodes.append(helper.make_node("Squeeze", [f"y{li}", "axis1"], [f"s{li}"]))
        x, size = f"s{li}", hid
    last = len(hidden) - 1
    names = [f"s{last}", f"yh{last}", f"yc{last}"] + ([extra_output] if extra_output else [])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    model = helper.make_model(helper.make_graph(nodes, "g", graph_ins, outs, inits),
                              opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, feeds


@pytest.mark.parametrize("hidden,batch,states,bias", [
    ((6, 4), 1, (), True), ((6, 4), 3, (0, 1), True), ((3, 5, 4), 1, (1,), False), ((3, 5, 4), 2, (0, 2), True)])
def test_stacked_lstm_runs_as_one_wavefront_step(hidden, batch, states, bias):
    """Stacked forward LSTMs joined by Squeeze become one step (the Squeezes and inner layers
    disappear); outputs, final states included, equal ORT's in the arena and out of it."""
    model, feeds = _stacked_lstm_model(hidden, batch, states, bias)
    sess = _check(model, feeds, runs=3)
    ops = [st.node.op_type for st in sess.program.steps]
    assert ops == ["LSTM", "Squeeze"], ops
    assert sess.program.fused >= 2 * (len(hidden) - 1)


def test_stacked_lstm_large_batch_runs_layer_by_layer(monkeypatch):
    """Above WAVEFRONT_MAX_BATCH the fused step runs its layers one after the other: same
    outputs (final states included)."""
    from opc.runtime import k_rnn

    monkeypatch.setattr(k_rnn, "WAVEFRONT_MAX_BATCH", 2)
    model, feeds = _stacked_lstm_model((6, 5, 4), 3, (0, 2), True)
    sess = _check(model, feeds, runs=3)
    assert [st.node.op_type for st in sess.program.steps].count("LSTM") == 1


@pytest.mark.parametrize("extra", ["yh0", "y0", "s0"])
def test_stacked_lstm_not_fused_when_an_inner_output_is_used(extra):
    model, feeds = _stacked_lstm_model((6, 4), 2, (0,), True, extra_output=extra)
    sess = _check(model, feeds, runs=2)
    assert [st.node.op_type for st in sess.program.steps].count("LSTM") == 2


def test_stacked_lstm_single_step_sequence():
    """seq = 1: every wavefront step is a boundary step (a layer starts or ends)."""
    model, feeds = _stacked_lstm_model((4, 4, 4), 2, (0, 1, 2), True, seq=1)
    sess = _check(model, feeds, runs=2)
    assert [st.node.op_type for st in sess.program.steps].count("LSTM") == 1


@pytest.mark.parametrize("n,c,m,h,w,pads,act,bias", [
    (1, 32, 48, 30, 30, (1, 1, 1, 1), "Relu", True),   # even output: whole tiles
    (2, 32, 48, 31, 27, (1, 0, 1, 2), "", False),      # odd outputs, asymmetric pads, no bias
    (12, 32, 32, 30, 30, (1, 1, 1, 1), "Relu", True),  # several batch chunks, the last one partial
    (1, 16, 64, 40, 33, (0, 0, 0, 0), "", True)])      # no padding
def test_winograd_conv_matches_ort(n, c, m, h, w, pads, act, bias):
    """3x3 stride-1 convs large enough run as Winograd F(2x2, 3x3): same outputs as ORT."""
    from opc.runtime import k_nn

    rng = np.random.default_rng(n + c + h)
    wt = (rng.standard_normal((m, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    inits = [numpy_helper.from_array(wt, "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "B"))
        ins.append("B")
    nodes = [helper.make_node("Conv", ins, ["c" if act else "y"], kernel_shape=[3, 3], pads=list(pads))]
    if act:
        nodes.append(helper.make_node(act, ["c"], ["y"]))
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (n, c, h, w))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    node = rt.registry.Node("Conv", "", "c", ins, ["y"], {"kernel_shape": [3, 3], "pads": list(pads)}, 17)
    plan = k_nn._conv_plan(node, (n, c, h, w), wt.shape, 4)
    assert plan["kind"] == "winograd"
    assert (plan["chunk"] < n) == (n == 12)
    _check(model, {"x": rng.standard_normal((n, c, h, w)).astype(np.float32)}, runs=3)


def test_small_or_few_tile_convs_are_not_winograd():
    from opc.runtime import k_nn
    from opc.runtime.registry import Node

    node = Node("Conv", "", "c", ["x", "w"], ["y"], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 17)
    assert k_nn._conv_plan(node, (1, 128, 7, 7), (128, 128, 3, 3), 4)["kind"] == "im2col"  # 16 tiles
    assert k_nn._conv_plan(node, (4, 128, 14, 14), (128, 128, 3, 3), 4)["kind"] == "winograd"
    # transformed weights over WINO_MAX_U_BYTES (4 MiB here): direct, on the padded width
    assert k_nn._conv_plan(node, (1, 256, 28, 28), (256, 256, 3, 3), 4)["kind"] == "wide"
    assert k_nn._conv_plan(node, (1, 8, 32, 32), (8, 8, 3, 3), 4)["kind"] == "wide"  # few multiply-adds
    assert k_nn._conv_plan(node, (1, 64, 56, 56), (64, 64, 3, 3), 8)["kind"] == "wide"  # float64


def test_gather_constant_indices_into_the_arena():
    """Constant indices (negative ones included) are wrapped and checked once, then gathered
    straight into the arena; out-of-range constant indices still fail with the node's name."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 3] x) => (float[a, b, c, d] y) {
        i = Constant <value = int64[2, 2] {-1, 0, 4, -5}> ()
        r = Relu (x)
        t = Gather <axis = 1> (r, i)
        y = Neg (t)
    }
    """)
    x = np.random.default_rng(4).standard_normal((2, 5, 3)).astype(np.float32)
    _check(model, {"x": x}, runs=3)
    bad = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 5, 3] x) => (float[a, b, c] y) {
        i = Constant <value = int64[2] {1, 5}> ()
        y = Gather <axis = 1> (x, i)
    }
    """)
    from opc.errors import OpcError

    sess = rt.Session(bad, backend="numpy")
    for _ in range(2):
        with pytest.raises(OpcError, match=r"\(Gather\) failed: IndexError"):
            sess.run(None, {"x": x})


def test_constant_of_shape_of_a_shape_is_computed_once_per_signature():
    """ConstantOfShape's output shape depends on its input's values, but when those come from
    shapes only they are fixed for an input signature: it is not re-run in the arena loop."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 3] y) {
        s = Shape (x)
        c = ConstantOfShape <value = float[1] {2.0}> (s)
        y = Mul (x, c)
    }
    """)
    rng = np.random.default_rng(5)
    for n in (2, 4):
        sess = _check(model, {"x": rng.standard_normal((n, 3)).astype(np.float32)}, runs=3)
        lay = sess.layout()
        ops = [sess.program.steps[i].node.op_type for i in lay.run_steps]
        assert "ConstantOfShape" not in ops and "Shape" not in ops, ops


def test_small_conv_views_follow_the_workspace_across_signatures():
    """The im2col conv keeps its workspace views per workspace: alternating input signatures
    (each with its own arena) still give ORT's outputs, 1-D and strided 2-D."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "u")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["y"]),
             helper.make_node("Conv", ["z", "u"], ["v"], pads=[1, 1, 1, 1], strides=[2, 2])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ("N", 4, 9)),
                     helper.make_tensor_value_info("z", TensorProto.FLOAT, ("N", 3, 11, 10))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "v")], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = rt.Session(model, backend="numpy", threads=1)
    for n in (1, 2, 1, 2, 1):
        # x keeps its shape: its conv meets the same shapes with the other signature's workspace
        feeds = {"x": rng.standard_normal((1, 4, 9)).astype(np.float32),
                 "z": rng.standard_normal((n, 3, 11, 10)).astype(np.float32)}
        for r, g in zip(_ort(model, feeds), sess.run(None, feeds)):
            assert compare(r, g)["max_rel"] <= RTOL
    assert len(sess._layouts) == 2
