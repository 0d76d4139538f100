"""Fake-quant fusion (runtime/program.py ``_fuse_qdq``, runtime/k_quant.py ``fake_quant``): an
activation QuantizeLinear -> DequantizeLinear pair runs as one float step, bit for bit what the
two kernels give (``fuse_qdq=False``), and QDQ models still match ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import opc.runtime as rt
from opc.ort import make_session, seeded_feeds
from opc.runtime.k_quant import FAKE_QUANT_OP
from opc.runtime.program import compile_graph, opset_map


def _model(body: str, x_type: str = "float", shape: str = "[2, 3, 4, 5]", out: str = "y",
           outs: str | None = None, opset: int = 19) -> onnx.ModelProto:
    outs = outs or f"{x_type}{shape} {out}"
    text = f"""<ir_version: 9, opset_import: ["" : {opset}]>
    g ({x_type}{shape} x) => ({outs}) {{
        {body}
    }}"""
    m = onnx.parser.parse_model(text)
    onnx.checker.check_model(m)
    return m


def _qdq(scale: str, zp: str | None, axis: int | None = None, dq_scale: str | None = None,
         dq_zp: str | None = None) -> str:
    ax = "" if axis is None else f"<axis = {axis}>"
    zps = f", zp" if zp is not None else ""
    dzp = "" if zp is None else (", zp2" if dq_zp is not None else ", zp")
    lines = [f"s = Constant<value = {scale}>()"]
    if zp is not None:
        lines.append(f"zp = Constant<value = {zp}>()")
    if dq_scale is not None:
        lines.append(f"s2 = Constant<value = {dq_scale}>()")
    if dq_zp is not None:
        lines.append(f"zp2 = Constant<value = {dq_zp}>()")
    lines.append(f"q = QuantizeLinear{ax}(x, s{zps})")
    lines.append(f"y = DequantizeLinear{ax}(q, {'s2' if dq_scale else 's'}{dzp})")
    return "\n".join(lines)


def _hostile(shape, scale, lo, hi, zp, seed=0):
    """Seeded values plus rounding ties (k + 0.5) * s, values past both saturation bounds,
    +-inf, -0.0 and tiny negatives (rint gives -0.0 there; q - zp gives +0.0)."""
    rng = np.random.default_rng(seed)
    s = np.float32(np.max(scale))
    span = (hi - lo) * s
    x = rng.uniform(-1.5 * span, 1.5 * span, size=shape).astype(np.float32).reshape(-1)
    ks = np.arange(lo - zp - 3, hi - zp + 3, dtype=np.float32)
    special = np.concatenate([(ks + 0.5) * s, (ks - 0.5) * s, ks * s,
                              [np.inf, -np.inf, 1e30, -1e30, -0.0, 0.0, -0.3 * s, -0.5 * s, 0.5 * s,
                               np.float32(np.finfo(np.float32).max), np.float32(np.finfo(np.float32).tiny)]])
    special = special.astype(np.float32)
    tail = special[-11:]  # always all of these
    pick = np.concatenate([tail, rng.permutation(special[:-11])])[:x.size]
    x[:pick.size] = pick
    return x[rng.permutation(x.size)].reshape(shape)


def _pair(model):
    fused = rt.Session(model, backend="numpy", threads=1)
    plain = rt.Session(model, backend="numpy", threads=1, fuse_qdq=False)
    return fused, plain


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _check_same(model, feeds, runs=2):
    fused, plain = _pair(model)
    for _ in range(runs):  # shapes resolved, then inside the arena (preallocated outputs)
        for a, b in zip(fused.run(None, feeds), plain.run(None, feeds)):
            assert _bits_equal(a, b), np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))[:10]
    return fused, plain


CASES = {
    "uint8_zp": ("float {0.0625}", "uint8 {128}", 0, 255, 128),
    "uint8_zp_odd": ("float {0.0371}", "uint8 {3}", 0, 255, 3),
    "int8_zp": ("float {0.05}", "int8 {-7}", -128, 127, -7),
    "int8_symmetric": ("float {0.1}", "int8 {0}", -128, 127, 0),
    "uint8_default_zp": ("float {0.02}", None, 0, 255, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_tensor_bit_identical(case):
    scale, zp, lo, hi, z = CASES[case]
    m = _model(_qdq(scale, zp), shape="[2, 3, 16, 32]")  # room for every tie and bound
    s = float(scale.split("{")[1].rstrip("}"))
    x = _hostile((2, 3, 16, 32), np.float32(s), lo, hi, z, seed=len(case))
    fused, plain = _check_same(m, {"x": x})
    assert fused.program.fused_qdq == 1 and plain.program.fused_qdq == 0
    assert [st.node.op_type for st in fused.program.steps] == [FAKE_QUANT_OP]
    assert [st.node.op_type for st in plain.program.steps] == ["QuantizeLinear", "DequantizeLinear"]
    y = fused.run(None, {"x": x})[0]
    assert not np.signbit(y[y == 0]).any()  # -0.0 from rint comes out as +0.0, as q - zp gives
    assert np.isfinite(y).all()  # +-inf and 1e30 saturate


@pytest.mark.parametrize("zp_type,lo,hi", [("int8", -128, 127), ("uint8", 0, 255)])
@pytest.mark.parametrize("axis", [1, -3])
def test_per_axis_bit_identical(zp_type, lo, hi, axis):
    zps = [0, 5, -3] if zp_type == "int8" else [128, 0, 255]
    scales = [0.05, 0.0123, 0.2]
    m = _model(_qdq(f"float[3] {{{', '.join(map(str, scales))}}}", f"{zp_type}[3] {{{', '.join(map(str, zps))}}}",
                    axis=axis))
    x = _hostile((2, 3, 4, 5), np.float32(min(scales)), lo, hi, 0, seed=axis + 7)
    # ties and saturation on every channel's own scale too
    for c, (s, z) in enumerate(zip(scales, zps)):
        ks = np.arange(lo - z - 2, hi - z + 2, dtype=np.float32)
        vals = np.concatenate([(ks + 0.5) * np.float32(s), (ks - 0.5) * np.float32(s)]).astype(np.float32)
        flat = x[:, c].reshape(-1)
        flat[:] = vals[np.random.default_rng(c).integers(0, vals.size, flat.size)]
        x[:, c] = flat.reshape(x[:, c].shape)
    fused, _ = _check_same(m, {"x": x})
    assert fused.program.fused_qdq == 1


@pytest.mark.parametrize("zp_type,lo,hi", [("int16", -32768, 32767), ("uint16", 0, 65535)])
def test_16_bit_bit_identical(zp_type, lo, hi):
    z = -100 if zp_type == "int16" else 30000
    m = _model(_qdq("float {0.001}", f"{zp_type} {{{z}}}"), opset=21)
    x = _hostile((2, 3, 4, 5), np.float32(0.001), lo, hi, z, seed=3)
    fused, _ = _check_same(m, {"x": x})
    assert fused.program.fused_qdq == 1


def test_matches_ort_on_ties_and_saturation():
    """The reference itself: ORT's QuantizeLinear -> DequantizeLinear on the same hostile inputs."""
    m = _model(_qdq("float {0.0625}", "uint8 {128}"))
    x = _hostile((2, 3, 4, 5), np.float32(0.0625), 0, 255, 128, seed=11)
    x[~np.isfinite(x)] = 0  # ORT's float -> int cast of inf is its own
    ref = make_session(m, threads=1).run(None, {"x": x})[0]
    got = rt.Session(m, backend="numpy", threads=1).run(None, {"x": x})[0]
    assert np.array_equal(ref, got)


def test_not_fused_when_int_output_has_another_reader():
    body = _qdq("float {0.05}", "int8 {0}") + "\nz = Identity(q)"
    m = _model(body, outs="float[2, 3, 4, 5] y, int8[2, 3, 4, 5] z")
    x = _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 0)
    fused, _ = _check_same(m, {"x": x})
    assert fused.program.fused_qdq == 0
    assert [st.node.op_type for st in fused.program.steps] == ["QuantizeLinear", "DequantizeLinear", "Identity"]


def test_not_fused_when_int_output_is_graph_output():
    m = _model(_qdq("float {0.05}", "int8 {0}"), outs="float[2, 3, 4, 5] y, int8[2, 3, 4, 5] q")
    x = _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 0)
    fused, _ = _check_same(m, {"x": x})
    assert fused.program.fused_qdq == 0


def test_not_fused_when_two_dequantize_readers():
    body = _qdq("float {0.05}", "int8 {0}") + "\nw = DequantizeLinear(q, s, zp)"
    m = _model(body, outs="float[2, 3, 4, 5] y, float[2, 3, 4, 5] w")
    fused, _ = _check_same(m, {"x": _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 0)})
    assert fused.program.fused_qdq == 0


@pytest.mark.parametrize("other", [dict(dq_scale="float {0.06}"), dict(dq_zp="int8 {1}")])
def test_not_fused_when_dequantize_params_differ(other):
    m = _model(_qdq("float {0.05}", "int8 {0}", **other))
    fused, _ = _check_same(m, {"x": _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 0)})
    assert fused.program.fused_qdq == 0


@pytest.mark.parametrize("x_type,to", [("float16", 10), ("bfloat16", 16)])
def test_half_types_left_unfused(x_type, to):
    body = f"""s32 = Constant<value = float {{0.05}}>()
        s = Cast<to = {to}>(s32)
        zp = Constant<value = int8 {{0}}>()
        q = QuantizeLinear(x, s, zp)
        y = DequantizeLinear(q, s, zp)"""
    m = _model(body, x_type=x_type)
    x = _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 0)
    if x_type == "float16":
        with np.errstate(over="ignore"):  # 1e30 -> inf, on purpose
            x = x.astype(np.float16)
    else:
        import ml_dtypes

        x = x.astype(ml_dtypes.bfloat16)
    fused, plain = _pair(m)
    assert fused.program.fused_qdq == 0
    for _ in range(2):
        assert _bits_equal(fused.run(None, {"x": x})[0], plain.run(None, {"x": x})[0])


def test_non_float32_feed_runs_the_two_kernels():
    """A float32-declared pair fed float64 (Program.run, no feed checks): the fused step falls
    back to the two kernels, so the result is still theirs."""
    m = _model(_qdq("float {0.05}", "int8 {3}"))
    x = _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 3).astype(np.float64)
    fused = compile_graph(m.graph, np, opset_map(m))
    plain = compile_graph(m.graph, np, opset_map(m), fuse_qdq=False)
    assert fused.fused_qdq == 1
    a, b = fused.run([x])[0], plain.run([x])[0]
    assert _bits_equal(a, b)


def test_pair_inside_a_subgraph_is_fused():
    then = """then_b () => (float[2, 3, 4, 5] ty) {
            s = Constant<value = float {0.05}>()
            zp = Constant<value = int8 {0}>()
            tq = QuantizeLinear(x, s, zp)
            ty = DequantizeLinear(tq, s, zp)
        }"""
    other = """else_b () => (float[2, 3, 4, 5] ey) { ey = Identity(x) }"""
    body = f"c = Constant<value = bool {{1}}>()\ny = If(c) <then_branch = {then}, else_branch = {other}>"
    m = _model(body)
    x = _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 0)
    fused, _ = _check_same(m, {"x": x})
    (if_step,) = [st for st in fused.program.steps if st.node.op_type == "If"]
    assert if_step.node.subgraphs["then_branch"].fused_qdq == 1


def test_digits_qdq_model(digits_assets):
    """The demo's quantized digits CNN: every activation pair fused, bit for bit the unfused
    runtime, and within one quantization step of ORT."""
    import opc

    q, _ = opc.compile(digits_assets["model"], passes="quantize", calibration=digits_assets["calib"])
    n_q = sum(n.op_type == "QuantizeLinear" for n in q.graph.node)
    with np.load(digits_assets["eval"]) as z:
        feeds = {k: z[k][:32] for k in z.files}
    fused, plain = _pair(q)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in fused.get_inputs()}}
    assert n_q > 0 and fused.program.fused_qdq == n_q
    ref = make_session(q, threads=1).run(None, feeds)
    step = _last_step(q)
    for _ in range(2):
        got, want = fused.run(None, feeds), plain.run(None, feeds)
        for r, g, w in zip(ref, got, want):
            assert _bits_equal(g, w)
            assert np.max(np.abs(r - g)) <= step * 1.001


def _last_step(model):
    from onnx import numpy_helper

    scales = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [float(scales[n.input[1]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[1] in scales and scales[n.input[1]].size == 1][-1]


def test_zoo_resnet18_quantized(zoo, tmp_path, one_blas_thread):
    """An opc-quantized zoo model: fused == unfused bit for bit, and ORT within one step."""
    import opc

    path = zoo("resnet18")
    model = onnx.load(str(path))
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", **{name: rng.standard_normal((4, 3, 224, 224)).astype(np.float32)})
    q, _ = opc.compile(path, passes="fold,quantize", calibration=tmp_path / "calib.npz")
    fused, plain = _pair(q)
    assert fused.program.fused_qdq >= 10
    assert fused.program.fused_qdq == sum(n.op_type == "QuantizeLinear" for n in q.graph.node
                                          if not n.input[0] in {t.name for t in q.graph.initializer})
    feeds = seeded_feeds(q, {name: (1, 3, 224, 224)}, seed=1)
    ref = make_session(q, threads=1).run(None, feeds)
    got, want = fused.run(None, feeds), plain.run(None, feeds)
    for r, g, w in zip(ref, got, want):
        assert _bits_equal(g, w)
        assert np.max(np.abs(r - g)) <= _last_step(q) * 1.001


def test_cupy_names_only():
    """The fused kernel calls only names CuPy also has (see test_runtime_portability)."""
    cupy = pytest.importorskip("cupy", reason="cupy gives the list of CuPy names")
    from opc.runtime.xp import RestrictedNumpy

    xp = RestrictedNumpy(dir(cupy))
    for scale, zp, axis in (("float {0.05}", "int8 {2}", None), ("float[3] {0.05, 0.1, 0.2}", "uint8[3] {1, 128, 9}", 1)):
        m = _model(_qdq(scale, zp, axis=axis))
        x = _hostile((2, 3, 4, 5), np.float32(0.05), -128, 127, 0)
        ref = rt.Session(m, backend="numpy", fuse_qdq=False).run(None, {"x": x})[0]
        sess = rt.Session(m, backend=xp)
        assert sess.program.fused_qdq == 1
        for _ in range(2):
            assert _bits_equal(sess.run(None, {"x": x})[0], ref)
    assert not xp.missing
