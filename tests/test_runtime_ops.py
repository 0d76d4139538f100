"""opc.runtime kernels against ONNX Runtime beyond onnx's node cases: larger random shapes,
attribute combinations the node cases skip, and data-dependent outputs whose size changes
between runs of one session (each model runs twice: shape resolution, then in the arena)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import opc.runtime as rt
from opc.ort import make_session


def _model(op, opset, inputs, outputs, domain="", **attrs):
    """One-node model; ``inputs`` maps names to example arrays ("" entries are omitted inputs)."""
    names = list(inputs)
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
           for n, a in inputs.items() if n]
    outs = [helper.make_value_info(o, onnx.TypeProto()) for o in outputs if o]
    m = helper.make_model(helper.make_graph([node], op, vis, outs),
                          opset_imports=[helper.make_opsetid(domain, opset)])
    m.ir_version = 10
    return m


def _check(model, *feed_sets, rtol=1e-5, atol=1e-6):
    ref = make_session(model, threads=1)
    sess = rt.Session(model, backend="numpy")
    for feeds in feed_sets:
        feeds = {k: v for k, v in feeds.items() if k}
        want = ref.run(None, feeds)
        for _ in range(2):
            got = sess.run(None, feeds)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
                np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def _rand(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- Attention
ATTENTION = {
    "mha": dict(q=(2, 4, 5, 8), kv=(2, 4, 6, 8)),
    "gqa_causal": dict(q=(2, 8, 5, 16), kv=(2, 2, 7, 16), attrs=dict(is_causal=1)),
    "mqa_scaled": dict(q=(1, 6, 4, 8), kv=(1, 1, 9, 8), attrs=dict(scale=0.3)),
    "3d_gqa": dict(q=(2, 5, 32), kv=(2, 6, 16), v=(2, 6, 24), attrs=dict(q_num_heads=4, kv_num_heads=2)),
    "float_mask": dict(q=(2, 4, 5, 8), kv=(2, 4, 6, 8), mask=(2, 1, 5, 6)),
    "bool_mask": dict(q=(2, 4, 5, 8), kv=(2, 2, 6, 8), mask=(4, 5, 6), bool_mask=True),
    "softcap": dict(q=(2, 4, 5, 8), kv=(2, 4, 6, 8), attrs=dict(softcap=2.0)),
    "past": dict(q=(2, 4, 3, 8), kv=(2, 2, 3, 8), past=4, mask=(3, 7)),
    "past_3d": dict(q=(2, 3, 32), kv=(2, 3, 16), past=5, attrs=dict(q_num_heads=4, kv_num_heads=2)),
}


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_matches_ort(case):
    c = ATTENTION[case]
    rng = np.random.default_rng(len(case))
    ins = {"q": _rand(rng, *c["q"]), "k": _rand(rng, *c["kv"]), "v": _rand(rng, *c.get("v", c["kv"]))}
    outputs = ["y"]
    if "mask" in c or "past" in c:
        if "mask" not in c:
            ins[""] = None  # past without a mask: the mask input is omitted
        elif c.get("bool_mask"):
            m = rng.random(c["mask"]) > 0.4
            m[..., 0] = True  # every query sees a key: fully masked rows are a spec corner ORT differs on
            ins["mask"] = m
        else:
            ins["mask"] = _rand(rng, *c["mask"])
    if "past" in c:
        heads, d = (c["kv"][1], c["kv"][3]) if len(c["kv"]) == 4 else (2, c["kv"][2] // 2)
        ins["past_k"] = _rand(rng, c["q"][0], heads, c["past"], d)
        ins["past_v"] = _rand(rng, c["q"][0], heads, c["past"], d)
        outputs += ["present_k", "present_v"]
    model = _model("Attention", 23, ins, outputs, **c.get("attrs", {}))
    _check(model, ins, rtol=1e-4, atol=1e-5)


def test_attention_scores_live_in_the_planned_arena():
    """The (B, H, Sq, Skv) scores, the largest temporary, are workspace in the arena; the second
    run (inside the arena) gives the same output; the model's own memory plan counts them too."""
    from opc import memory

    rng = np.random.default_rng(2)
    ins = {"q": _rand(rng, 2, 8, 16, 8), "k": _rand(rng, 2, 2, 24, 8), "v": _rand(rng, 2, 2, 24, 8)}
    model = _model("Attention", 23, ins, ["y"], is_causal=1)
    sess = rt.Session(model, backend="numpy")
    first = sess.run(None, ins)[0]
    scores = 2 * 8 * 16 * 24 * 4
    assert sess.arena_bytes(ins) >= scores
    assert rt.workspace_bytes(model.graph.node[0], [a.shape for a in ins.values()],
                              [a.dtype for a in ins.values()]) >= scores
    plan = memory.plan_model(model, {k: a.shape for k, a in ins.items()}, rt.workspace_bytes)
    assert plan.arena_size >= scores
    np.testing.assert_array_equal(sess.run(None, ins)[0], first)


def test_attention_qk_output_modes_match_ort():
    rng = np.random.default_rng(1)
    ins = {"q": _rand(rng, 2, 4, 5, 8), "k": _rand(rng, 2, 4, 6, 8), "v": _rand(rng, 2, 4, 6, 8),
           "mask": _rand(rng, 5, 6)}
    for mode in (0, 1, 2, 3):
        model = _model("Attention", 23, ins, ["y", "", "", "qk"], qk_matmul_output_mode=mode, softcap=3.0)
        _check(model, ins, rtol=1e-4, atol=1e-5)


def test_attention_and_rotary_fp16_match_ort():
    rng = np.random.default_rng(19)
    ins = {"q": _rand(rng, 2, 8, 5, 16, dtype=np.float16), "k": _rand(rng, 2, 2, 7, 16, dtype=np.float16),
           "v": _rand(rng, 2, 2, 7, 16, dtype=np.float16)}
    _check(_model("Attention", 23, ins, ["y"], is_causal=1), ins, rtol=2e-3, atol=2e-3)
    ins = {"x": _rand(rng, 2, 4, 6, 16, dtype=np.float16), "cos": _rand(rng, 2, 6, 8, dtype=np.float16),
           "sin": _rand(rng, 2, 6, 8, dtype=np.float16)}
    _check(_model("RotaryEmbedding", 23, ins, ["y"]), ins, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- RotaryEmbedding
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("layout", ["4d", "3d_positions", "partial"])
def test_rotary_embedding_matches_ort(layout, interleaved):
    rng = np.random.default_rng(3)
    attrs = dict(interleaved=interleaved)
    if layout == "4d":
        ins = {"x": _rand(rng, 2, 4, 6, 16), "cos": _rand(rng, 2, 6, 8), "sin": _rand(rng, 2, 6, 8)}
    else:
        half = 8 if layout == "3d_positions" else 4
        ins = {"x": _rand(rng, 2, 6, 64), "cos": _rand(rng, 10, half), "sin": _rand(rng, 10, half),
               "pos": rng.integers(0, 10, (2, 6)).astype(np.int64)}
        attrs["num_heads"] = 4
        if layout == "partial":
            attrs["rotary_embedding_dim"] = 8
    _check(_model("RotaryEmbedding", 23, ins, ["y"], **attrs), ins)


# ---------------------------------------------------------------- GridSample
@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_matches_ort(mode, padding, align):
    rng = np.random.default_rng(4)
    ins = {"x": _rand(rng, 2, 3, 5, 7), "grid": rng.uniform(-1.4, 1.4, (2, 4, 6, 2)).astype(np.float32)}
    model = _model("GridSample", 20, ins, ["y"], mode=mode, padding_mode=padding, align_corners=align)
    _check(model, ins, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- detection
def _boxes(rng, b, n, center):
    if center:
        xy = rng.uniform(0, 10, (b, n, 2))
        wh = rng.uniform(0.5, 4, (b, n, 2))
        return np.concatenate([xy, wh], -1).astype(np.float32)
    a, c = rng.uniform(0, 10, (b, n, 2)), rng.uniform(0, 10, (b, n, 2))
    return np.concatenate([a, c], -1).astype(np.float32)  # corners in either order


@pytest.mark.parametrize("center", [0, 1])
def test_nms_matches_ort_and_output_size_follows_values(center):
    rng = np.random.default_rng(5 + center)
    feeds = []
    for _ in range(3):  # same shapes, different values: the number of kept boxes changes
        feeds.append({"boxes": _boxes(rng, 2, 40, center), "scores": rng.random((2, 3, 40)).astype(np.float32),
                      "max": np.array([30], np.int64), "iou": np.array([0.3], np.float32),
                      "thr": np.array([rng.uniform(0.2, 0.8)], np.float32)})
    model = _model("NonMaxSuppression", 11, feeds[0], ["sel"], center_point_box=center)
    _check(model, *feeds)
    counts = {rt.Session(model, backend="numpy").run(None, f)[0].shape[0] for f in feeds}
    assert len(counts) > 1


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ctm", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("ratio", [0, 2])
def test_roi_align_matches_ort(mode, ctm, ratio):
    rng = np.random.default_rng(6)
    lo = rng.uniform(0, 14, (5, 2))
    rois = np.concatenate([lo, lo + rng.uniform(1, 8, (5, 2))], 1).astype(np.float32)
    ins = {"x": _rand(rng, 2, 3, 10, 12), "rois": rois, "idx": rng.integers(0, 2, 5).astype(np.int64)}
    model = _model("RoiAlign", 16, ins, ["y"], mode=mode, coordinate_transformation_mode=ctm,
                   output_height=3, output_width=4, sampling_ratio=ratio, spatial_scale=0.5)
    _check(model, ins, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- Unique
@pytest.mark.parametrize("keep_sorted", [0, 1])
def test_unique_matches_ort_across_runs(keep_sorted):
    rng = np.random.default_rng(7)
    feeds = [{"x": rng.integers(0, k, 30).astype(np.int64)} for k in (5, 12, 3)]
    _check(_model("Unique", 11, feeds[0], ["y", "first", "inverse", "counts"], sorted=keep_sorted), *feeds)


@pytest.mark.parametrize("axis", [0, 1])
def test_unique_with_axis_matches_ort(axis):
    rng = np.random.default_rng(8)
    x = rng.integers(0, 3, (3, 3)).astype(np.float32)
    x = np.repeat(x, 3, axis=axis)[tuple(slice(None) if a == axis else slice(0, 3) for a in range(2))]
    x = np.take(x, rng.permutation(x.shape[axis]), axis=axis)
    ins = {"x": np.ascontiguousarray(x)}
    _check(_model("Unique", 11, ins, ["y", "first", "inverse", "counts"], axis=axis, sorted=1), ins)


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
def test_losses_match_ort(op, reduction, weighted):
    rng = np.random.default_rng(9)
    ins = {"x": _rand(rng, 4, 5, 3, 2), "t": rng.integers(0, 5, (4, 3, 2)).astype(np.int64)}
    ins["t"][0, 0, 0] = -1  # the ignored class: outside [0, C)
    if weighted:
        ins["w"] = rng.random(5).astype(np.float32)
    outs = ["loss", "log_prob"] if op == "SoftmaxCrossEntropyLoss" else ["loss"]
    opset = 22 if op.startswith("Negative") else 13
    _check(_model(op, opset, ins, outs, reduction=reduction, ignore_index=-1), ins, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- signal
@pytest.mark.parametrize("kind", ["real", "complex", "onesided", "inverse", "irfft", "length"])
def test_dft_matches_ort(kind):
    rng = np.random.default_rng(10)
    x = _rand(rng, 2, 16, 3, 1 if kind in ("real", "onesided", "length") else 2)
    attrs = {}
    ins = {"x": x}
    if kind == "onesided":
        attrs["onesided"] = 1
    if kind in ("inverse", "irfft"):
        attrs["inverse"] = 1
    if kind == "irfft":
        attrs["onesided"] = 1
        ins["x"] = _rand(rng, 2, 9, 3, 2)
    ins["n"] = np.array(20 if kind == "length" else ins["x"].shape[1] if kind != "irfft" else 16, np.int64)
    ins["axis"] = np.array(1, np.int64)
    _check(_model("DFT", 20, ins, ["y"], **attrs), ins, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("onesided", [0, 1])
def test_stft_and_windows_match_ort(onesided):
    rng = np.random.default_rng(11)
    ins = {"x": _rand(rng, 2, 64, 1), "step": np.array(6, np.int64), "w": np.hanning(16).astype(np.float32)}
    _check(_model("STFT", 17, ins, ["y"], onesided=onesided), ins, rtol=1e-4, atol=1e-4)
    for op in ("HannWindow", "HammingWindow", "BlackmanWindow"):
        for size in (1, 10, 33):
            ins = {"n": np.array(size, np.int64)}
            _check(_model(op, 17, ins, ["y"], periodic=onesided), ins, rtol=1e-5, atol=1e-6)


def test_mel_weight_matrix_matches_ort():
    ins = {"bins": np.array(8, np.int64), "n": np.array(64, np.int64), "rate": np.array(16000, np.int64),
           "lo": np.array(20.0, np.float32), "hi": np.array(6000.0, np.float32)}
    _check(_model("MelWeightMatrix", 17, ins, ["y"]), ins)


# ---------------------------------------------------------------- the rest
def test_col2im_matches_ort():
    rng = np.random.default_rng(12)
    # image 9x8, block 3x2, dilation (1,2), stride (2,1), pads (1,0,1,1): 5 x 7 blocks
    ins = {"x": _rand(rng, 2, 3 * 6, 5 * 7), "image": np.array([9, 8], np.int64), "block": np.array([3, 2], np.int64)}
    model = _model("Col2Im", 18, ins, ["y"], dilations=[1, 2], strides=[2, 1], pads=[1, 0, 1, 1])
    _check(model, ins)


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("size", [(2, 3, 5, 7), (2, 1, 3, 4, 6)])
def test_affine_grid_matches_ort(size, align):
    rng = np.random.default_rng(13)
    nd = len(size) - 2
    ins = {"theta": _rand(rng, 2, nd, nd + 1), "size": np.array(size, np.int64)}
    _check(_model("AffineGrid", 20, ins, ["grid"], align_corners=align), ins)


def test_center_crop_pad_matches_ort():
    rng = np.random.default_rng(14)
    ins = {"x": _rand(rng, 5, 8, 3), "shape": np.array([7, 5], np.int64)}
    _check(_model("CenterCropPad", 18, ins, ["y"], axes=[0, 1]), ins)


def test_max_unpool_of_max_pool_matches_ort():
    rng = np.random.default_rng(15)
    x = _rand(rng, 2, 3, 7, 9)
    pool = helper.make_node("MaxPool", ["x"], ["p", "i"], kernel_shape=[2, 3], strides=[2, 2])
    unpool = helper.make_node("MaxUnpool", ["p", "i", "shape"], ["y"], kernel_shape=[2, 3], strides=[2, 2])
    g = helper.make_graph([pool, unpool], "u", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape),
                                                helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [4])],
                          [helper.make_value_info("y", onnx.TypeProto())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 10
    _check(m, {"x": x, "shape": np.array([2, 3, 7, 9], np.int64)})


def test_det_deform_conv_tensor_scatter_bitcast_match_ort():
    rng = np.random.default_rng(16)
    ins = {"a": _rand(rng, 3, 2, 4, 4)}
    _check(_model("Det", 22, ins, ["d"]), ins, rtol=1e-5, atol=1e-5)
    ins = {"x": _rand(rng, 2, 4, 7, 8), "w": _rand(rng, 6, 2, 3, 3), "off": _rand(rng, 2, 2 * 2 * 9, 3, 3),
           "b": _rand(rng, 6), "mask": rng.random((2, 2 * 9, 3, 3)).astype(np.float32)}
    _check(_model("DeformConv", 22, ins, ["y"], group=2, offset_group=2, strides=[2, 2], pads=[1, 1, 0, 1],
                  dilations=[1, 2]), ins, rtol=1e-4, atol=1e-4)
    for mode in ("linear", "circular"):
        ins = {"cache": _rand(rng, 3, 2, 8, 4), "upd": _rand(rng, 3, 2, 3, 4),
               "at": np.array([0, 5, 6 if mode == "circular" else 4], np.int64)}
        _check(_model("TensorScatter", 24, ins, ["y"], mode=mode), ins)
    ins = {"x": _rand(rng, 3, 5)}
    _check(_model("BitCast", 26, ins, ["y"], to=onnx.TensorProto.INT32), ins)


# ---------------------------------------------------------------- kernels ORT lacks
def test_linear_attention_linear_rule_equals_causal_attention_without_softmax():
    """With the plain 'linear' rule the recurrence is causal attention with raw q.k weights:
    y_i = scale * sum_{j<=i} (q_i . k_j) v_j, plus q_i . past_state (GQA: head h reads kv head h // group)."""
    rng = np.random.default_rng(17)
    b, t, hq, hk, dk, dv = 2, 6, 4, 2, 8, 5
    ins = {"q": _rand(rng, b, t, hq * dk), "k": _rand(rng, b, t, hk * dk), "v": _rand(rng, b, t, hk * dv),
           "past": _rand(rng, b, hk, dk, dv)}
    model = _model("LinearAttention", 1, ins, ["y", "state"], q_num_heads=hq, kv_num_heads=hk,
                   update_rule="linear", scale=0.5)
    model.opset_import[0].version = max(24, onnx.defs.onnx_opset_version())
    sess = rt.Session(model, backend="numpy")
    q = ins["q"].reshape(b, t, hq, dk).transpose(0, 2, 1, 3).astype(np.float64)
    k = ins["k"].reshape(b, t, hk, dk).transpose(0, 2, 1, 3).astype(np.float64)
    v = ins["v"].reshape(b, t, hk, dv).transpose(0, 2, 1, 3).astype(np.float64)
    kk, vv, past = (np.repeat(a, hq // hk, axis=1) for a in (k, v, ins["past"].astype(np.float64)))
    scores = np.tril(q @ kk.transpose(0, 1, 3, 2))
    want = 0.5 * (scores @ vv + q @ past)
    want = want.transpose(0, 2, 1, 3).reshape(b, t, hq * dv)
    state = ins["past"] + k.transpose(0, 1, 3, 2) @ v
    for _ in range(2):
        y, st = sess.run(None, ins)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(st, state, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- a real export
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export internals
@pytest.mark.parametrize("masked", [False, True])
def test_pytorch_sdpa_export_runs_as_one_attention_node(tmp_path, masked):
    """torch.onnx's dynamo exporter turns scaled_dot_product_attention (grouped-query, causal or
    with a boolean padding mask) into one opset-23 Attention node: opc matches PyTorch, and ORT
    where ORT accepts the model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    torch.set_num_threads(2)

    class Block(torch.nn.Module):
        def __init__(self, d=64, hq=8, hk=2):
            super().__init__()
            self.hq, self.hk, self.dh = hq, hk, d // hq
            self.q, self.kv, self.o = (torch.nn.Linear(d, d), torch.nn.Linear(d, 2 * hk * self.dh),
                                       torch.nn.Linear(d, d))

        def forward(self, x, keep=None):
            b, t, _ = x.shape
            q = self.q(x).view(b, t, self.hq, self.dh).transpose(1, 2)
            k, v = self.kv(x).view(b, t, 2, self.hk, self.dh).permute(2, 0, 3, 1, 4)
            mask = None if keep is None else keep[:, None, None, :]
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=keep is None,
                                                                 enable_gqa=True)
            return self.o(y.transpose(1, 2).reshape(b, t, -1))

    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 10, 64)
    args = (x,)
    if masked:
        keep = torch.ones(2, 10, dtype=torch.bool)
        keep[1, 7:] = False  # the second sequence is padded
        args = (x, keep)
    path = tmp_path / "block.onnx"
    torch.onnx.export(block, args, str(path), opset_version=23, dynamo=True)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("Attention") == 1
    with torch.no_grad():
        want = block(*args).numpy()
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args)}
    got = rt.Session(model, backend="numpy").run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if not masked:  # ORT 1.31 rejects a (B, 1, 1, S) mask (it wants the query length spelled out)
        _check(model, feeds, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- classic ML
def _forest_model(forest):
    """A fitted sklearn forest of regression trees as one ai.onnx.ml TreeEnsemble node (double)."""
    keys = ("nodes_featureids", "nodes_splits", "nodes_modes", "nodes_truenodeids", "nodes_falsenodeids",
            "nodes_trueleafs", "nodes_falseleafs", "leaf_targetids", "leaf_weights", "tree_roots")
    a = {k: [] for k in keys}
    for est in forest.estimators_:
        t = est.tree_
        inner = [i for i in range(t.node_count) if t.children_left[i] != -1]
        leaves = [i for i in range(t.node_count) if t.children_left[i] == -1]
        node_of = {n: len(a["nodes_modes"]) + k for k, n in enumerate(inner)}
        leaf_of = {n: len(a["leaf_weights"]) + k for k, n in enumerate(leaves)}
        a["tree_roots"].append(node_of[0])
        for n in inner:
            a["nodes_featureids"].append(int(t.feature[n]))
            a["nodes_splits"].append(float(t.threshold[n]))
            a["nodes_modes"].append(0)  # sklearn goes left when x <= threshold
            for side, child in (("true", t.children_left[n]), ("false", t.children_right[n])):
                is_leaf = t.children_left[child] == -1
                a[f"nodes_{side}leafs"].append(int(is_leaf))
                a[f"nodes_{side}nodeids"].append(leaf_of[child] if is_leaf else node_of[child])
        for n in leaves:
            a["leaf_targetids"].append(0)
            a["leaf_weights"].append(float(t.value[n].reshape(-1)[0]))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [None, forest.n_features_in_])
    attrs = {k: v for k, v in a.items() if k not in ("nodes_splits", "leaf_weights", "nodes_modes")}
    for key, name in (("nodes_splits", "s"), ("leaf_weights", "w")):
        attrs[key] = helper.make_tensor(name, onnx.TensorProto.DOUBLE, [len(a[key])], a[key])
    attrs["nodes_modes"] = helper.make_tensor("m", onnx.TensorProto.UINT8, [len(a["nodes_modes"])], a["nodes_modes"])
    node = helper.make_node("TreeEnsemble", ["x"], ["y"], domain="ai.onnx.ml", n_targets=1,
                            aggregate_function=0, **attrs)
    m = helper.make_model(helper.make_graph([node], "forest", [x], [helper.make_value_info("y", onnx.TypeProto())]),
                          opset_imports=[helper.make_opsetid("ai.onnx.ml", 5), helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_tree_ensemble_of_a_random_forest_on_digits_matches_sklearn_and_ort():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestRegressor

    del sklearn
    x, y = load_digits(return_X_y=True)
    forest = RandomForestRegressor(n_estimators=6, max_depth=7, random_state=0).fit(x[:1200], y[:1200])
    model = _forest_model(forest)
    feeds = {"x": x[1200:].astype(np.float64)}
    got = rt.Session(model, backend="numpy").run(None, feeds)[0]
    np.testing.assert_allclose(got.reshape(-1), forest.predict(feeds["x"]), rtol=1e-12, atol=1e-12)
    _check(model, feeds, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
@pytest.mark.parametrize("rank", [1, 2])
def test_tfidf_vectorizer_matches_ort(mode, rank):
    rng = np.random.default_rng(18)
    # 4 unigrams, 3 bigrams, 2 trigrams over the tokens 0..5
    pool = [1, 3, 4, 5, 1, 2, 2, 3, 4, 4, 1, 2, 3, 5, 5, 5]
    attrs = dict(mode=mode, min_gram_length=1, max_gram_length=3, max_skip_count=2, ngram_counts=[0, 4, 10],
                 ngram_indexes=[8, 0, 2, 4, 6, 1, 3, 5, 7], pool_int64s=pool)
    if mode != "TF":
        attrs["weights"] = rng.uniform(0.5, 2, 9).tolist()
    x = rng.integers(0, 6, (3, 12) if rank == 2 else (12,)).astype(np.int64)
    _check(_model("TfIdfVectorizer", 9, {"x": x}, ["y"], **attrs), {"x": x})


def test_image_decoder_without_pillow_fails_at_load_naming_the_node(monkeypatch):
    import sys

    from opc.errors import ModelError

    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # makes "import PIL.Image" raise ImportError
    model = _model("ImageDecoder", 20, {"data": np.zeros(8, np.uint8)}, ["img"])
    with pytest.raises(ModelError, match=r"node 'img' \(ImageDecoder\).*Pillow"):
        rt.Session(model, backend="numpy")


def test_float32_erf_rational_fit_accuracy_edges_and_chunks():
    """The NumPy float32 erf (a rational fit, not SciPy): within 5e-7 of erf in double over
    the whole range, never above 1 in magnitude, NaN kept, across chunk boundaries, in place, into a
    strided view, and with a short workspace."""
    from scipy.special import erf

    from opc.runtime.k_elementwise import ERF_CHUNK, erf_f32, erf_workspace

    x = np.linspace(-7, 7, 2 * ERF_CHUNK + 1004, dtype=np.float32)  # 3 chunks, the last one short
    want = erf(x.astype(np.float64))
    got = erf_f32(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.abs(got - want).max() < 5e-7 and np.abs(got).max() <= 1
    tiny = np.array([1e-30, -1e-20, 1e-8, 0.0], np.float32)  # relative accuracy near 0
    np.testing.assert_allclose(erf_f32(tiny), erf(tiny.astype(np.float64)), rtol=1e-6, atol=0)
    edge = erf_f32(np.array([np.inf, -np.inf, np.nan, 100.0], np.float32))
    assert 1 - 5e-7 < edge[0] <= 1 and edge[1] == -edge[0] and np.isnan(edge[2]) and edge[3] == edge[0]
    y = x.reshape(4, -1).copy()
    erf_f32(y, y, np.empty(16, np.uint8))  # in place, workspace too short: allocated
    np.testing.assert_array_equal(y.reshape(-1), got)
    strided = np.zeros((x.size, 2), np.float32)[:, 0]
    assert erf_f32(x, strided) is strided
    np.testing.assert_array_equal(strided, got)
    assert erf_workspace(None, [(3, 5)], [np.dtype(np.float32)]) == 2 * 4 * 15
    assert erf_workspace(None, [(3, 5)], [np.dtype(np.float64)]) == 0
    assert erf_workspace(None, [None], [None]) == 0


def test_erf_and_gelu_match_ort_in_the_arena():
    from scipy.special import erf

    x = (np.random.default_rng(3).standard_normal((4, 40, 700)) * 3).astype(np.float32)
    _check(_model("Erf", 13, {"x": x}, ["y"]), {"x": x}, rtol=1e-5, atol=1e-6)
    _check(_model("Gelu", 20, {"x": x}, ["y"]), {"x": x}, rtol=1e-5, atol=1e-6)
    xd = x.astype(np.float64)  # ORT has no double Erf: SciPy's, which the runtime keeps for float64
    sess = rt.Session(_model("Erf", 13, {"x": xd}, ["y"]), backend="numpy")
    for _ in range(2):
        np.testing.assert_allclose(sess.run(None, {"x": xd})[0], erf(xd), rtol=1e-14, atol=0)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [[2, 3], [-1], [3, 2], [1]])
def test_sum_and_mean_over_trailing_axes_as_gemv_match_ort(op, keepdims, axes):
    """Trailing axes go through a GEMV with a ones (1/n) column; others ([1]) through NumPy."""
    x = np.random.default_rng(4).standard_normal((2, 40, 7, 7)).astype(np.float32)
    a = np.array(axes, np.int64)
    model = _model(op, 18, {"x": x, "axes": a}, ["y"], keepdims=keepdims)
    _check(model, {"x": x, "axes": a}, rtol=1e-5, atol=1e-5)
