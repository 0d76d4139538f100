"""Elementwise fusion (runtime/fuse.py): which steps merge, that the fused step computes what the
unfused steps compute (NumPy executor, on seeded random trees), and that the CUDA code it
generates for CuPy means the same (its body is evaluated here by a tiny Python translator, and
compiled by NVRTC when the library is installed; running it needs a GPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import opc.runtime as rt
from opc.ort import compare, make_session
from opc.runtime import fuse
from opc.runtime.fuse import CUDA_PREAMBLE, FUSED_OP, cuda_source

from runtime_helpers import make_model

F32 = TensorProto.FLOAT


def _vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _fused_steps(sess):
    return [st for st in sess.program.steps if st.node.op_type == FUSED_OP]


def _both(model, feeds):
    """Outputs with and without fusion (NumPy), each run twice: traced, then in the arena."""
    a = rt.Session(model, backend="numpy", fuse=True)
    b = rt.Session(model, backend="numpy", fuse=False)
    for _ in range(2):
        got, ref = a.run(None, feeds), b.run(None, feeds)
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype and g.shape == r.shape
            np.testing.assert_array_equal(g, r)
    return a, b


# -- which steps fuse ---------------------------------------------------------------------

def _gelu_model(dtype=np.float32):
    elem = TensorProto.DOUBLE if dtype == np.float64 else F32
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Div", ["h", "s2"], ["a"]), helper.make_node("Erf", ["a"], ["b"]),
             helper.make_node("Add", ["b", "one"], ["c"]), helper.make_node("Mul", ["h", "c"], ["d"]),
             helper.make_node("Mul", ["d", "half"], ["y"])]
    inits = [_const("w", np.random.default_rng(0).standard_normal((8, 16)), dtype), _const("s2", 1.4142135, dtype),
             _const("one", 1.0, dtype), _const("half", 0.5, dtype)]
    return make_model(nodes, [_vi("x", [2, 8], elem)], [_vi("y", None, elem)], inits)


def test_gelu_chain_is_one_step_with_constants_inlined():
    model = _gelu_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    a, b = _both(model, feeds)
    (st,) = _fused_steps(a)
    assert [m.op for m in st.node.group.members] == ["Div", "Erf", "Add", "Mul", "Mul"]
    assert a.program.fused_elementwise == 4 and b.program.fused_elementwise == 0
    assert len(a.program.steps) == 2 and len(b.program.steps) == 6
    assert [a.program.names[s] for s in st.ins] == ["h"]  # the scalar constants became literals
    ort = make_session(model, threads=1).run(None, feeds)[0]
    assert compare(ort, a.run(None, feeds)[0])["max_rel"] <= 1e-5


def test_what_does_not_fuse():
    # t1 is a graph output; t2 has two readers; the Softmax is not elementwise
    nodes = [helper.make_node("Add", ["x", "y"], ["t1"]), helper.make_node("Relu", ["t1"], ["t2"]),
             helper.make_node("Exp", ["t2"], ["t3"]), helper.make_node("Tanh", ["t2"], ["t4"]),
             helper.make_node("Softmax", ["t3"], ["t5"]), helper.make_node("Mul", ["t5", "t4"], ["out"])]
    model = make_model(nodes, [_vi("x", [3, 4]), _vi("y", [3, 4])], [_vi("t1", None), _vi("out", None)])
    rng = np.random.default_rng(2)
    a, _ = _both(model, {"x": rng.standard_normal((3, 4)).astype(np.float32),
                         "y": rng.standard_normal((3, 4)).astype(np.float32)})
    assert a.program.fused_elementwise == 1  # only Tanh -> Mul
    (st,) = _fused_steps(a)
    assert [m.op for m in st.node.group.members] == ["Tanh", "Mul"]


def test_tree_with_shared_input_and_a_value_read_twice():
    # (x*y + exp(x)) * (x*y + exp(x)) with a broadcast y: a tree, x read three times, t read twice
    nodes = [helper.make_node("Mul", ["x", "y"], ["p"]), helper.make_node("Exp", ["x"], ["e"]),
             helper.make_node("Add", ["p", "e"], ["t"]), helper.make_node("Mul", ["t", "t"], ["out"])]
    model = make_model(nodes, [_vi("x", [2, 3, 4]), _vi("y", [3, 1])], [_vi("out", None)])
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32),
             "y": rng.standard_normal((3, 1)).astype(np.float32)}
    a, _ = _both(model, feeds)
    assert a.program.fused_elementwise == 3 and len(a.program.steps) == 1
    assert sorted(a.program.names[s] for s in a.program.steps[0].ins) == ["x", "y"]


def test_shape_arithmetic_is_left_to_the_session():
    # Shape -> Mul -> Add: computed once per signature, never fused
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "two"], ["s2"]),
             helper.make_node("Add", ["s2", "one"], ["s3"]), helper.make_node("Expand", ["x", "s3"], ["e"]),
             helper.make_node("Relu", ["e"], ["r"]), helper.make_node("Neg", ["r"], ["out"])]
    inits = [_const("two", [1, 1], np.int64), _const("one", [0, 0], np.int64)]
    model = make_model(nodes, [_vi("x", [1, 3])], [_vi("out", None)], inits)
    a, _ = _both(model, {"x": np.arange(3, dtype=np.float32).reshape(1, 3) - 1})
    (st,) = _fused_steps(a)
    assert [m.op for m in st.node.group.members] == ["Relu", "Neg"]


def test_fusion_statistics_on_the_zoo(zoo):
    from opc.ir import load_model
    from opc.ort import seeded_feeds

    for name, groups in (("resnet18", {"Add+Relu": 8}), ("bert-tiny", {"Div+Erf+Add+Mul+Mul": 2})):
        model = load_model(zoo(name, dynamic_batch=True))
        sess = rt.Session(model, backend="numpy", threads=1, fuse=True)
        labels = ["+".join(m.op for m in st.node.group.members) for st in _fused_steps(sess)]
        for label, n in groups.items():
            assert labels.count(label) == n, (name, labels)
        assert sess.program.fused_elementwise == sum(len(st.node.group.members) - 1 for st in _fused_steps(sess))
        shapes = {i.name: tuple([2] + [d if isinstance(d, int) else 1 for d in i.shape[1:]]) for i in sess.get_inputs()}
        feeds = seeded_feeds(model, shapes, seed=0)
        ref = make_session(model, threads=1).run(None, feeds)
        for _ in range(2):
            for r, g in zip(ref, sess.run(None, feeds)):
                assert compare(r, g)["max_rel"] <= 1e-4, name


def test_numpy_default_is_off_and_cupy_default_is_on():
    model = _gelu_model()
    assert rt.Session(model, backend="numpy").program.fused_elementwise == 0
    assert rt.Session(model, backend="numpy", fuse=True).program.fused_elementwise == 4


# -- random trees: fused == unfused ---------------------------------------------------------

UNARY = ["Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Log", "Reciprocal", "Floor", "Ceil",
         "Sin", "Cos", "LeakyRelu", "HardSigmoid", "HardSwish", "Clip", "Cast"]
BINARY = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"]
SHAPES = [(2, 3, 4), (3, 4), (1, 4), (3, 1), (2, 1, 1), (4,), (1,)]  # () trips the unfused Sigmoid (0-d out=None)


def _random_tree(rng, dtype, depth=4):
    """A random expression tree over a few inputs of broadcastable shapes (and scalar
    constants), every intermediate read once: the whole tree is one fusion group."""
    elem = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE, np.float16: TensorProto.FLOAT16}[dtype]
    nodes, inits, inputs, feeds = [], [], [], {}
    count = [0]

    def new(prefix):
        count[0] += 1
        return f"{prefix}{count[0]}"

    def leaf():
        if rng.random() < 0.25:
            name = new("c")
            # shape (1,): a 0-d constant under Sigmoid trips the member kernel itself (0-d out=None)
            inits.append(_const(name, [rng.uniform(0.5, 1.5)], dtype))
            return name
        name = new("x")
        shape = SHAPES[rng.integers(len(SHAPES))]
        inputs.append(_vi(name, list(shape), elem))
        feeds[name] = (rng.standard_normal(shape) * 2).astype(dtype)
        return name

    def gen(d):
        if d == 0:
            return leaf()
        op = (UNARY + BINARY)[rng.integers(len(UNARY) + len(BINARY))]
        out = new("t")
        if op in BINARY:
            a = gen(d - 1)
            if op == "Pow":
                b = new("e")
                inits.append(_const(b, rng.choice([2.0, 3.0, 0.5]), dtype))
                a_abs = new("t")
                nodes.append(helper.make_node("Abs", [a], [a_abs]))
                a = a_abs
            else:
                b = gen(rng.integers(d))
            if op == "Where":
                cond = new("m")
                inputs.append(_vi(cond, [3, 4], TensorProto.BOOL))
                feeds[cond] = rng.random((3, 4)) < 0.5
                nodes.append(helper.make_node("Where", [cond, a, b], [out]))
                return out
            nodes.append(helper.make_node(op, [a, b], [out]))
            return out
        a = gen(d - 1)
        if op == "Clip":
            lo, hi = new("lo"), new("hi")
            inits.extend([_const(lo, -0.5, dtype), _const(hi, 1.25, dtype)])
            nodes.append(helper.make_node("Clip", [a, lo, hi] if rng.random() < 0.7 else [a, lo], [out]))
        elif op == "Cast":  # to double and back: both casts fuse
            mid = new("t")
            nodes.append(helper.make_node("Cast", [a], [mid], to=TensorProto.DOUBLE))
            nodes.append(helper.make_node("Cast", [mid], [out], to=elem))
        elif op == "LeakyRelu":
            nodes.append(helper.make_node(op, [a], [out], alpha=0.125))
        else:
            nodes.append(helper.make_node(op, [a], [out]))
        return out

    root = gen(depth)
    if not nodes or nodes[-1].output[0] != root:
        nodes.append(helper.make_node("Neg", [root], [new("t")]))
    nodes[-1].output[0] = "out"
    if not inputs:  # all constants would be folded at load: give it one input
        inputs.append(_vi("xin", [3, 4], elem))
        feeds["xin"] = rng.standard_normal((3, 4)).astype(dtype)
        nodes.append(helper.make_node("Add", ["out", "xin"], ["out2"]))
        nodes[-2].output[0] = "pre"
        nodes[-1].input[0] = "pre"
        nodes[-1].output[0] = "out"
    return make_model(nodes, inputs, [_vi("out", None, elem)], inits), feeds


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_random_trees_fused_equal_unfused(dtype):
    rng = np.random.default_rng({np.float32: 10, np.float64: 11, np.float16: 12}[dtype])
    fused_steps = 0
    with np.errstate(all="ignore"):
        for _ in range(40):
            model, feeds = _random_tree(rng, dtype, depth=int(rng.integers(2, 6)))
            a, b = _both(model, feeds)
            # every intermediate is read once and is no graph output: the tree is one step
            assert len(a.program.steps) == 1
            assert a.program.fused_elementwise == len(b.program.steps) - 1
            fused_steps += a.program.fused_elementwise
    assert fused_steps > 60


def test_random_trees_against_onnxruntime():
    rng = np.random.default_rng(20)
    checked = 0
    for _ in range(15):
        model, feeds = _random_tree(rng, np.float32, depth=3)
        sess = rt.Session(model, backend="numpy", fuse=True)
        with np.errstate(all="ignore"):
            got = sess.run(None, feeds)[0]
        ref = make_session(model, threads=1).run(None, feeds)[0]
        ok = np.isfinite(ref) & (np.abs(ref) < 1e4)
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        checked += 1
    assert checked == 15


def test_integer_chains_fall_back_to_the_members():
    # int64 Div truncates, float Div does not: the fused step must run the members' own kernels
    nodes = [helper.make_node("Div", ["x", "y"], ["q"]), helper.make_node("Mul", ["q", "y"], ["out"])]
    model = make_model(nodes, [_vi("x", [5], TensorProto.INT64), _vi("y", [5], TensorProto.INT64)],
                       [_vi("out", None, TensorProto.INT64)])
    feeds = {"x": np.array([7, -7, 9, 1, 0]), "y": np.array([2, 2, -4, 3, 5])}
    a, _ = _both(model, feeds)
    assert a.program.fused_elementwise == 1
    np.testing.assert_array_equal(a.run(None, feeds)[0], [6, -6, 8, 0, 0])
    assert fuse.infer(_fused_steps(a)[0].node.group, [np.int64, np.int64]) is None


def test_output_view_over_an_input_is_not_clobbered():
    # the arena may place the output over an input of the same shape (an in-place plan);
    # writing intermediates into it first would destroy that input
    a = rt.Session(_gelu_model(), backend="numpy", fuse=True)
    (st,) = _fused_steps(a)
    h = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    want = st.fn([h.copy()], None, None)
    buf = h.copy()
    got = st.fn([buf], [buf], None)
    np.testing.assert_array_equal(got, want)


def test_workspace_holds_the_smaller_intermediates():
    # sqrt(v + eps) is (B, S, 1), the rest (B, S, H): one scratch buffer of the small shape
    nodes = [helper.make_node("Add", ["v", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["out"])]
    model = make_model(nodes, [_vi("v", [2, 5, 1]), _vi("d", [2, 5, 8])], [_vi("out", None)], [_const("eps", 1e-5)])
    rng = np.random.default_rng(6)
    feeds = {"v": rng.random((2, 5, 1)).astype(np.float32), "d": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    a, _ = _both(model, feeds)
    (st,) = _fused_steps(a)
    assert st.spec.workspace(st.node, [(2, 5, 1), (2, 5, 8)], [np.dtype(np.float32)] * 2) == 64  # 40 B, aligned
    lay = a.layout(feeds)
    assert any(isinstance(b.key, tuple) and b.key[0] == "ws" for b in lay.blocks)


# -- the CUDA code ------------------------------------------------------------------------

def _translate(src, ext):
    """Evaluate the generated ElementwiseKernel body with NumPy: the statements are C++ that is
    also Python (calls, arithmetic, functional casts); anything else fails here."""
    in_params, out_params, body = src
    types = {"float32": np.float32, "float64": np.float64, "bool": np.bool_}
    params = [p.split() for p in in_params.split(", ")]
    assert [n for _, n in params] == [f"x{k}" for k in range(len(ext))]
    env = {f"x{k}": np.asarray(v, dtype=types[t]) for k, ((t, _), v) in enumerate(zip(params, ext))}

    def cast(dt):
        return lambda v: np.asarray(v).astype(dt)

    from scipy.special import erf

    ns = {"float": cast(np.float32), "double": cast(np.float64), "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
          "tanh": np.tanh, "erf": erf, "fabs": np.abs, "floor": np.floor, "ceil": np.ceil, "sin": np.sin,
          "cos": np.cos, "pow": np.power,
          "opc_max": lambda a, b: np.where((a > b) | (a != a), a, b),
          "opc_min": lambda a, b: np.where((a < b) | (a != a), a, b),
          "opc_where": lambda c, a, b: np.where(c, a, b),
          "opc_leaky": lambda x, al: np.where(x >= 0, x, x * al),
          "opc_inf": lambda: np.inf, "opc_nan": lambda: np.nan, "__builtins__": {}}
    lines = body.splitlines()
    for line in lines[:-1]:
        m = re.fullmatch(r"const (float|double) (t\d+) = (.+);", line)
        assert m, line
        val = eval(m.group(3), ns, env)  # noqa: S307 - our own generated text
        assert val.dtype == {"float": np.float32, "double": np.float64}[m.group(1)], line
        env[m.group(2)] = val
    m = re.fullmatch(r"y = (t\d+);", lines[-1])
    assert m
    out_type, _ = out_params.split()
    return env[m.group(1)].astype(types[out_type])


def _op_model(op, attrs=None, dtype=np.float32):
    """op(x[, y]) -> Neg: a two-member group, so every op appears in a fused step."""
    elem = TensorProto.DOUBLE if dtype == np.float64 else F32
    ins = ["x", "y"][:2 if op in ("Add", "Sub", "Mul", "Div", "Max", "Min") else 1]
    inits = []
    if op == "Pow":
        ins = ["x", "e"]
        inits.append(_const("e", 3.0, dtype))
    if op == "Clip":
        ins = ["x", "lo", "hi"]
        inits += [_const("lo", -0.5, dtype), _const("hi", 0.75, dtype)]
    if op == "Where":
        ins = ["m", "x", "y"]
    nodes = [helper.make_node(op, ins, ["t"], **(attrs or {})),
             helper.make_node("Neg" if op != "Cast" else "Exp", ["t"], ["out"])]
    inputs = [_vi("x", [3, 4], elem), _vi("y", [4], elem), _vi("m", [3, 1], TensorProto.BOOL)]
    inputs = [i for i in inputs if i.name in ins]
    out_elem = TensorProto.DOUBLE if op == "Cast" else elem
    return make_model(nodes, inputs, [_vi("out", None, out_elem)], inits)


OP_CASES = [(op, None) for op in fuse.OPS if op not in ("Cast", "LeakyRelu", "HardSigmoid", "Clip")] + [
    ("Cast", {"to": TensorProto.DOUBLE}), ("LeakyRelu", {"alpha": 0.2}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
    ("Clip", None)]


@pytest.mark.parametrize("op,attrs", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_cuda_body_means_what_the_kernels_compute(op, attrs):
    model = _op_model(op, attrs)
    rng = np.random.default_rng(7)
    all_feeds = {"x": (rng.standard_normal((3, 4)) * 2).astype(np.float32),
                 "y": rng.standard_normal(4).astype(np.float32), "m": rng.random((3, 1)) < 0.5}
    sess = rt.Session(model, backend="numpy", fuse=True)
    feeds = {i.name: all_feeds[i.name] for i in sess.get_inputs()}
    (st,) = _fused_steps(sess)
    ext = [feeds[sess.program.names[s]] for s in st.ins]
    src = cuda_source(st.node.group, [e.dtype for e in ext])
    assert src is not None
    with np.errstate(all="ignore"):
        want = rt.Session(model, backend="numpy", fuse=False).run(None, feeds)[0]
        got = _translate(src, ext)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7, equal_nan=True)


def test_cuda_source_per_signature():
    def group(dtype):
        return _fused_steps(rt.Session(_gelu_model(dtype), backend="numpy", fuse=True))[0].node.group
    f32 = cuda_source(group(np.float32), [np.float32])
    f64 = cuda_source(group(np.float64), [np.float64])
    assert f32[0] == "float32 x0" and f32[1] == "float32 y" and "const float t4 =" in f32[2]
    assert f64[0] == "float64 x0" and f64[1] == "float64 y" and "const double t1 = erf(t0);" in f64[2]
    assert "double(1.0)" in f64[2] and "float(0.5)" in f32[2]  # inlined constants, typed per signature
    assert cuda_source(group(np.float32), [np.float64]) is None  # float32 constants: not a valid signature
    assert cuda_source(group(np.float32), [np.float16]) is None
    assert cuda_source(group(np.float32), [np.int64]) is None


def _nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:
        pytest.skip(f"NVRTC is not installed ({type(exc).__name__}); pip install nvidia-cuda-nvrtc")


_C = {"float32": "float", "float64": "double", "bool": "bool"}


def _compile(nvrtc, src):
    """Compile the body inside a kernel shaped like the one ElementwiseKernel generates
    (parameters read per element as plain names, ``y`` written), to PTX."""
    in_params, out_params, body = src
    params = [p.split() for p in in_params.split(", ")] + [out_params.split()]
    args = ", ".join(f"{'const ' if n != 'y' else ''}{_C[t]}* {n}_p" for t, n in params)
    loads = "\n".join(f"  const {_C[t]} {n} = {n}_p[i];" for t, n in params[:-1])
    yt = _C[params[-1][0]]
    text = (f"{CUDA_PREAMBLE}\nextern \"C\" __global__ void opc_fused({args}, long long n) {{\n"
            f"  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n  if (i >= n) return;\n"
            f"{loads}\n  {yt} y;\n{body}\n  y_p[i] = y;\n}}\n")
    prog = nvrtc.createProgram(text, "opc_fused.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--gpu-architecture=compute_80", "-std=c++17"])
    except Exception:
        raise AssertionError(nvrtc.getProgramLog(prog) + "\n" + text) from None
    return nvrtc.getPTX(prog)


def test_cuda_bodies_compile_with_nvrtc():
    nvrtc = _nvrtc()
    compiled = 0
    for op, attrs in OP_CASES:
        for dtype in (np.float32, np.float64):
            sess = rt.Session(_op_model(op, attrs, dtype), backend="numpy", fuse=True)
            (st,) = _fused_steps(sess)
            dts = [np.dtype(bool) if sess.program.names[s] == "m" else np.dtype(dtype) for s in st.ins]
            assert "opc_fused" in _compile(nvrtc, cuda_source(st.node.group, dts)).decode()
            compiled += 1
    assert compiled == 2 * len(OP_CASES)
    with pytest.raises(AssertionError, match="undefined"):  # the harness does reject bad text
        _compile(nvrtc, ("float32 x0", "float32 y", "const float t0 = no_such_fn(x0);\ny = t0;"))


def test_literals():
    assert fuse.literal(0.5, "float") == "float(0.5)"
    assert fuse.literal(float("inf"), "double") == "double(opc_inf())"
    assert fuse.literal(-float("inf"), "float") == "float(-opc_inf())"
    assert fuse.literal(float("nan"), "float") == "float(opc_nan())"
    v = np.float32(0.1)
    assert np.float32(eval(fuse.literal(v, "float")[6:-1])) == v  # round-trips the float32 value


# -- the CuPy runner, driven by a stand-in for cupy.ElementwiseKernel ---------------------------

class FakeElementwiseKernel:
    """cupy.ElementwiseKernel's calling convention (inputs broadcast, optional output argument
    written in place), computing the body with the Python translator above."""

    made = []
    calls = []  # the output argument of every launch

    def __init__(self, in_params, out_params, operation, name, preamble=""):
        assert preamble == CUDA_PREAMBLE and name == "opc_fused"
        self.src = (in_params, out_params, operation)
        FakeElementwiseKernel.made.append(self.src)

    def __call__(self, *args):
        n_in = len(self.src[0].split(", "))
        ins, out = args[:n_in], args[n_in:]
        assert len(out) in (0, 1)
        # as cupy/_core/_kernel.pyx: inputs and outputs broadcast together, and an output must
        # have exactly the broadcast shape ("Out shape is mismatched")
        shape = np.broadcast_shapes(*[np.shape(a) for a in args])
        if out and out[0].shape != shape:
            raise ValueError("Out shape is mismatched")
        FakeElementwiseKernel.calls.append(out[0] if out else None)
        res = np.broadcast_to(_translate(self.src, [np.asarray(a) for a in ins]), shape)
        if out:
            np.copyto(out[0], res)
            return out[0]
        return np.array(res)


class FakeCupy:
    """Just enough of the cupy namespace for the fused runner (not NumPy: is_numpy() is False)."""

    __name__ = "cupy-fake"
    ElementwiseKernel = FakeElementwiseKernel

    def __getattr__(self, name):  # array creation etc. for compile_graph: NumPy's
        return getattr(np, name)


def test_cupy_runner_one_kernel_per_signature_output_in_place():
    model = _gelu_model()
    sess = rt.Session(model, backend="numpy", fuse=True)
    (st,) = _fused_steps(sess)
    FakeElementwiseKernel.made.clear()
    run = fuse.make_runner(st.node.group, FakeCupy())
    h = np.random.default_rng(8).standard_normal((2, 16)).astype(np.float32)
    want = st.fn([h], None, None)  # the NumPy executor (equal to the unfused steps: tests above)
    out = np.empty((2, 16), np.float32)
    got = run([h], [out], None)
    assert got is out
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(run([h], None, None), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(run([h], [np.empty((3, 3), np.float32)], None), want, rtol=2e-6, atol=1e-7)
    assert len(FakeElementwiseKernel.made) == 1  # compiled once for the float32 signature
    # float16: no kernel, the members' own kernels run (as unfused)
    h16 = h.astype(np.float16)
    np.testing.assert_array_equal(run([h16], None, None), st.fn([h16], None, None))
    assert len(FakeElementwiseKernel.made) == 1


def test_cupy_runner_output_shape_counts_the_inlined_constants():
    # a (1, 1, 1) scalar constant is inlined into the kernel body, yet it still raises the rank
    nodes = [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [_vi("x", [2, 5])], [_vi("y", None)], [_const("c", np.full((1, 1, 1), -0.25))])
    sess = rt.Session(model, backend="numpy", fuse=True)
    (st,) = _fused_steps(sess)
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    want = rt.Session(model, backend="numpy", fuse=False).run(None, {"x": x})[0]
    assert want.shape == (1, 2, 5)
    run = fuse.make_runner(st.node.group, FakeCupy())
    got = run([x], None, None)
    assert got.shape == (1, 2, 5)
    np.testing.assert_array_equal(got, want)
    out = np.empty((1, 2, 5), np.float32)
    assert run([x], [out], None) is out  # the arena's view of the right shape is written, not replaced
    np.testing.assert_array_equal(out, want)


def test_cupy_runner_output_over_an_input():
    # ElementwiseKernel does not copy inputs that overlap the output (CuPy's ufuncs do)
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Tanh", ["a"], ["y"])]
    model = make_model(nodes, [_vi("x", [4, 8]), _vi("b", [1, 8])], [_vi("y", None)])
    sess = rt.Session(model, backend="numpy", fuse=True)
    (st,) = _fused_steps(sess)
    run = fuse.make_runner(st.node.group, FakeCupy())
    rng = np.random.default_rng(4)
    x, b = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((1, 8)).astype(np.float32)
    want = np.tanh(x + b)
    # the output over the same input, element for element: written in place
    xi = x.copy()
    assert run([xi, b], [xi], None) is xi
    np.testing.assert_allclose(xi, want, rtol=1e-6)
    # the output over the broadcast input's memory: a fresh output, the view left alone
    buf = np.zeros(32, np.float32)
    bb, view = buf[:8].reshape(1, 8), buf.reshape(4, 8)
    bb[...] = b
    FakeElementwiseKernel.calls.clear()
    got = run([x, bb], [view], None)
    assert got is not view and FakeElementwiseKernel.calls[-1] is got
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(buf[:8], b.reshape(-1))
    # an output shifted by one row over the same-shaped input: fresh as well
    buf2 = np.zeros(40, np.float32)
    xs, shifted = buf2[:32].reshape(4, 8), buf2[8:].reshape(4, 8)
    xs[...] = x
    got = run([xs, b], [shifted], None)
    assert got is not shifted
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not fuse._unsafe_alias(np.empty((4, 8)), [x, b])


def test_cupy_runner_on_random_trees():
    rng = np.random.default_rng(30)
    made = runs = 0
    with np.errstate(all="ignore"):
        for _ in range(20):
            model, feeds = _random_tree(rng, np.float32, depth=3)
            sess = rt.Session(model, backend="numpy", fuse=True)
            (st,) = sess.program.steps
            if st.node.op_type != FUSED_OP:  # one step left after folding: nothing to fuse
                continue
            runs += 1
            ins = [feeds[sess.program.names[s]] if sess.program.names[s] in feeds else sess.program.consts[s]
                   for s in st.ins]
            FakeElementwiseKernel.made.clear()
            got = fuse.make_runner(st.node.group, FakeCupy())(ins, None, None)
            want = rt.Session(model, backend="numpy", fuse=False).run(None, feeds)[0]
            np.testing.assert_allclose(got, want, rtol=5e-6, atol=1e-6, equal_nan=True)
            made += len(FakeElementwiseKernel.made)
    assert made == runs >= 15


@pytest.mark.parametrize("name", ["light_densenet121", "light_inception_v2"])
def test_light_models_fused_equal_unfused(name):
    """onnx's light models whose graphs have elementwise chains (decomposed normalizations):
    with and without fusion, in the arena and without it, the outputs are identical."""
    from runtime_helpers import LIGHT_MODELS, light_feeds, light_model

    if name not in LIGHT_MODELS:
        pytest.skip(f"this onnx ships no {name}")
    model = light_model(name)
    feeds = light_feeds(model)
    a, _ = _both(model, feeds)
    assert a.program.fused_elementwise > 100
    plain = rt.Session(model, backend="numpy", fuse=True, use_arena=False)
    for g, r in zip(plain.run(None, feeds), a.run(None, feeds)):
        np.testing.assert_array_equal(g, r)


def test_no_workspace_on_cupy():
    # the CUDA kernel keeps intermediates in registers: no arena bytes for them on CuPy
    from opc.runtime.program import compile_graph, opset_map

    nodes = [helper.make_node("Add", ["v", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["out"])]
    model = make_model(nodes, [_vi("v", [2, 5, 1]), _vi("d", [2, 5, 8])], [_vi("out", None)], [_const("eps", 1e-5)])
    on_np = compile_graph(model.graph, np, opset_map(model))
    on_gpu = compile_graph(model.graph, FakeCupy(), opset_map(model))
    assert on_np.fused_elementwise == on_gpu.fused_elementwise == 2
    assert on_np.steps[0].spec.workspace is not None and on_gpu.steps[0].spec.workspace is None
