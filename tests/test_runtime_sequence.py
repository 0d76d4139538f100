"""Sequences, optionals and strings in opc.runtime, against ONNX Runtime.

Small ONNX text models run on seeded inputs, several runs per session: the first resolves
shapes and plans the arena, the later ones run inside it (with new values of the same
signature), so a sequence holding a tensor that lived in the arena is caught if its memory
is reused. Non-tensor values must never be given arena memory.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import opc.runtime as rt
from opc.errors import OpcError
from opc.ort import make_session


def _model(text: str) -> onnx.ModelProto:
    m = onnx.parser.parse_model(text)
    onnx.checker.check_model(m, full_check=True)
    return m


def _same(ref, got):
    if isinstance(ref, list):
        assert isinstance(got, list) and len(got) == len(ref)
        for r, g in zip(ref, got):
            _same(r, g)
        return
    if ref is None:
        assert got is None
        return
    ref, got = np.asarray(ref), np.asarray(got)
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    if ref.dtype.kind in "OUSb":
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def _check_vs_ort(model, feeds_list):
    ort = make_session(model, threads=1)
    sess = rt.Session(model, backend="numpy")
    for feeds in feeds_list:
        ref = ort.run(None, feeds)
        _same(ref, sess.run(None, feeds))
    return sess


SEQUENCE_OPS = """
<ir_version: 9, opset_import: ["" : 18]>
seqs (float[3,6] x, float[3,4] y, int64 pos) => (float[3,?] last, int64 n, float[?,?] cat, float[?,3,?] stacked,
                                                  seq(float[3,?]) s)
{
    r = Relu(x)
    sizes = Constant<value = int64[2] {2, 4}>()
    parts = SplitToSequence<axis = 1>(r, sizes)
    t = Tanh(y)
    ins = SequenceInsert(parts, t, pos)
    zero = Constant<value = int64 {0}>()
    s = SequenceErase(ins, zero)
    minus1 = Constant<value = int64 {-1}>()
    a = SequenceAt(s, minus1)
    last = Mul(a, a)
    n = SequenceLength(s)
    cat = ConcatFromSequence<axis = 1>(s)
    four = Constant<value = int64 {4}>()
    sq = SplitToSequence<axis = 1>(x, four)
    first = SequenceAt(sq, zero)
    square = Mul(first, first)
    built = SequenceConstruct(square, first, square)
    stacked = ConcatFromSequence<axis = 0, new_axis = 1>(built)
}
"""


def _seq_feeds(seed, pos=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((3, 6)).astype(np.float32),
            "y": rng.standard_normal((3, 4)).astype(np.float32), "pos": np.array(pos, np.int64)}


def test_sequence_ops_match_ort_across_arena_runs():
    model = _model(SEQUENCE_OPS)
    sess = _check_vs_ort(model, [_seq_feeds(0), _seq_feeds(1), _seq_feeds(2), _seq_feeds(3, pos=-1),
                                 _seq_feeds(4, pos=0), _seq_feeds(5, pos=2)])
    lay = sess.layout()
    assert lay is not None and lay.arena_size > 0  # Relu/Tanh/Mul outputs are in the arena
    names = sess.program.names
    seq_values = {"parts", "ins", "s", "sq", "built"}
    placed = {names[b.key] for b in lay.blocks if not isinstance(b.key, tuple)}
    assert placed and not placed & seq_values
    assert {"r", "t"} <= placed  # the tensors that go into sequences do live in the arena


def test_split_to_sequence_scalar_split_and_keepdims():
    model = _model("""
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[5,4] x) => (seq(float[?,4]) a, seq(float[4]) b, seq(float[5,1]) c)
    {
        two = Constant<value = int64 {2}>()
        a = SplitToSequence(x, two)
        b = SplitToSequence<keepdims = 0>(x)
        c = SplitToSequence<axis = -1>(x)
    }
    """)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    _check_vs_ort(model, [{"x": x}, {"x": x + 1}])
    got = rt.Session(model, backend="numpy").run(None, {"x": x})
    assert [p.shape for p in got[0]] == [(2, 4), (2, 4), (1, 4)] and len(got[1]) == 5 and len(got[2]) == 4


def test_sequence_input_and_output_match_ort():
    model = _model("""
    <ir_version: 9, opset_import: ["" : 18]>
    g (seq(float[?]) s, float[?] x) => (seq(float[?]) out, float[?] total)
    {
        one = Constant<value = int64 {1}>()
        out = SequenceInsert(s, x, one)
        total = ConcatFromSequence<axis = 0>(out)
    }
    """)
    rng = np.random.default_rng(0)
    feeds = [{"s": [rng.standard_normal(n).astype(np.float32) for n in (2, 3)],
              "x": rng.standard_normal(4).astype(np.float32)} for _ in range(3)]
    sess = _check_vs_ort(model, feeds)
    out = sess.run(None, feeds[0])[0]
    assert type(out) is list and len(out) == 3
    out[0][:] = 99  # the caller's copy: the fed sequence is untouched
    assert not np.any(feeds[0]["s"][0] == 99)


def test_empty_sequence_grown_in_a_loop_matches_ort():
    model = _model("""
    <ir_version: 9, opset_import: ["" : 18]>
    g (float[4] x, int64 n) => (float[?,4] y, int64 len)
    {
        e = SequenceEmpty<dtype = 1>()
        t = Constant<value = bool {1}>()
        s = Loop(n, t, e) <body = step (int64 i, bool c, seq(float[4]) acc) => (bool co, seq(float[4]) acc2) {
            co = Identity(c)
            fi = Cast<to = 1>(i)
            v = Mul(x, fi)
            acc2 = SequenceInsert(acc, v)
        }>
        y = ConcatFromSequence<axis = 0, new_axis = 1>(s)
        len = SequenceLength(s)
    }
    """)
    x = np.array([1, 2, 3, 4], np.float32)
    _check_vs_ort(model, [{"x": x, "n": np.array(3, np.int64)}, {"x": -x, "n": np.array(5, np.int64)}])


def test_sequence_map_matches_ort():
    model = _model("""
    <ir_version: 9, opset_import: ["" : 18]>
    g (seq(float[?]) s, float[1] b) => (seq(float[?]) y, seq(int64[1]) shapes)
    {
        y, shapes = SequenceMap(s, b) <body = f (float[?] e, float[1] k) => (float[?] o, int64[1] sh) {
            o = Add(e, k)
            sh = Shape(e)
        }>
    }
    """)
    rng = np.random.default_rng(1)
    feeds = [{"s": [rng.standard_normal(n).astype(np.float32) for n in (1, 3, 2)],
              "b": np.array([0.5], np.float32)} for _ in range(2)]
    _check_vs_ort(model, feeds)


OPTIONAL = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[3] x, optional(float[3]) maybe) => (bool has_x, bool has_maybe, float[3] y, bool has_none)
{
    o = Optional(x)
    has_x = OptionalHasElement(o)
    has_maybe = OptionalHasElement(maybe)
    v = OptionalGetElement(o)
    y = Add(v, x)
    has_none = OptionalHasElement(none)
}
"""


def _optional_model(text=OPTIONAL):
    """``none`` is an empty Optional (its ``type`` attribute has no ONNX text syntax)."""
    m = onnx.parser.parse_model(text)
    empty = onnx.helper.make_node("Optional", [], ["none"],
                                  type=onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [3]))
    m.graph.node.insert(0, empty)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_optional_ops():
    model = _optional_model()
    x = np.array([1, -2, 3], np.float32)
    sess = rt.Session(model, backend="numpy")
    for maybe, has in ((x, True), (None, False), (x * 2, True)):
        for _ in range(2):
            has_x, has_maybe, y, has_none = sess.run(None, {"x": x, "maybe": maybe})
            assert has_x.dtype == np.bool_ and bool(has_x) and not bool(has_none)
            assert bool(has_maybe) is has
            np.testing.assert_array_equal(y, 2 * x)
    ort = make_session(model, threads=1)
    _same(ort.run(None, {"x": x, "maybe": x}), sess.run(None, {"x": x, "maybe": x}))


def test_strings_match_ort():
    model = onnx.parser.parse_model("""
    <ir_version: 9, opset_import: ["" : 20, "ai.onnx.ml" : 3]>
    g (string[4] words, string[1] suffix) => (string[?] norm, string[4] joined, string[4,?] parts, int64[4] counts,
                                               bool[4] match, int64[4] ids)
    {
        norm = StringNormalizer<case_change_action = "UPPER", locale = "C.UTF-8", stopwords = ["the", "a"]>(words)
        joined = StringConcat(words, suffix)
        parts, counts = StringSplit<delimiter = "-">(words)
        match = RegexFullMatch<pattern = "[a-z]+(-[a-z]+)*">(words)
        ids = ai.onnx.ml.LabelEncoder<keys_strings = ["cat", "dog-house"], values_int64s = [3, 7],
                                      default_int64 = -5>(words)
    }
    """)
    onnx.checker.check_model(model, full_check=True)
    feeds = [{"words": np.array(["The", "cat", "dog-house", "a-b-C"], dtype=object),
              "suffix": np.array(["!"], dtype=object)},
             {"words": np.array(["x", "", "A", "--"], dtype=object), "suffix": np.array(["é"], dtype=object)}]
    _check_vs_ort(model, feeds)
    # str (U) arrays are accepted as strings too
    got = rt.Session(model, backend="numpy").run(["joined"], {"words": np.array(["a", "b", "c", "d"]),
                                                            "suffix": np.array(["1"])})[0]
    assert got.dtype == object and list(got) == ["a1", "b1", "c1", "d1"]


def test_label_encoder_numeric_and_tensor_attributes_match_ort():
    model = onnx.parser.parse_model("""
    <ir_version: 9, opset_import: ["" : 18, "ai.onnx.ml" : 4]>
    g (int64[5] k, float[3] f) => (string[5] names, float[3] g)
    {
        names = ai.onnx.ml.LabelEncoder<keys_int64s = [1, 2, 3], values_strings = ["one", "two", "three"]>(k)
        g = ai.onnx.ml.LabelEncoder<keys_floats = [0.5, 1.5], values_floats = [10.0, 20.0], default_float = 7.0>(f)
    }
    """)
    onnx.checker.check_model(model, full_check=True)
    _check_vs_ort(model, [{"k": np.array([1, 2, 5, 3, 1], np.int64), "f": np.array([1.5, 0.5, 2.0], np.float32)}])


def test_errors_name_the_node():
    model = _model(SEQUENCE_OPS)
    sess = rt.Session(model, backend="numpy")
    with pytest.raises(OpcError, match=r"SequenceInsert.*position 7 is out of range for a sequence of 2"):
        sess.run(None, _seq_feeds(0, pos=7))
    opt = _optional_model(OPTIONAL.replace("v = OptionalGetElement(o)", "v = OptionalGetElement(maybe)"))
    with pytest.raises(OpcError, match=r"OptionalGetElement.*optional input is empty"):
        rt.Session(opt, backend="numpy").run(None, {"x": np.zeros(3, np.float32), "maybe": None})


def test_sequence_ops_with_cupy_names_only():
    cupy = pytest.importorskip("cupy", reason="the list of CuPy names comes from dir(cupy)")
    from opc.runtime.xp import RestrictedNumpy

    xp = RestrictedNumpy(dir(cupy))
    model = _model(SEQUENCE_OPS)
    ref = rt.Session(model, backend="numpy")
    sess = rt.Session(model, backend=xp)
    for seed in range(3):
        _same(ref.run(None, _seq_feeds(seed)), sess.run(None, _seq_feeds(seed)))
    assert not xp.missing


def test_inputs_and_outputs_are_typed_like_ort():
    model = _model("""
    <ir_version: 9, opset_import: ["" : 18]>
    g (seq(float[?]) s, string[2] w, optional(int64[2]) o, float[2] x) => (seq(float[?]) out, bool has)
    {
        out = Identity(s)
        has = OptionalHasElement(o)
    }
    """)
    sess = rt.Session(model, backend="numpy")
    ort = make_session(model, threads=1)
    assert [(a.name, a.type) for a in sess.get_inputs()] == [(a.name, a.type) for a in ort.get_inputs()]
    assert [(a.name, a.type) for a in sess.get_outputs()] == [(a.name, a.type) for a in ort.get_outputs()]
    feeds = {"s": [np.ones(2, np.float32)], "w": np.array(["a", "b"], dtype=object), "o": None,
             "x": [1.0, 2.0]}  # a Python list for a tensor input is still a tensor
    out, has = sess.run(None, dict(feeds, x=np.array([1, 2], np.float32)))
    assert isinstance(out, list) and not bool(has)
    with pytest.raises(OpcError, match="input 's': expected a sequence"):
        sess.run(None, dict(feeds, s=np.ones(2, np.float32)))
    with pytest.raises(OpcError, match="input 'x': None is a value of optional inputs only"):
        sess.run(None, dict(feeds, x=None))
    with pytest.raises(OpcError, match="input 'x': expected float32, got float64"):
        sess.run(None, feeds)  # the list became a float64 array, as np.asarray makes it


def test_torchscript_export_with_a_list_loop_matches_ort_and_torch():
    """torch.split + a Python loop over the pieces, scripted: the export is SplitToSequence,
    a Loop that grows a SequenceEmpty with SequenceAt/SequenceInsert, and ConcatFromSequence."""
    torch = pytest.importorskip("torch")
    import io
    import warnings

    torch.set_num_threads(1)

    class Pieces(torch.nn.Module):
        def forward(self, x):
            out = []
            for i, p in enumerate(torch.split(x, 2, dim=1)):
                out.append(torch.relu(p) * float(i + 1))
            return torch.cat(out, dim=0)

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(Pieces()), (torch.randn(3, 6),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {1: "n"}})
    model = onnx.load_from_string(buf.getvalue())
    from opc.summary import iter_nodes

    ops = {n.op_type for n in iter_nodes(model.graph)}
    assert {"SplitToSequence", "SequenceAt", "SequenceInsert", "ConcatFromSequence", "Loop"} <= ops
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((3, n)).astype(np.float32)} for n in (6, 6, 4, 8)]
    _check_vs_ort(model, feeds)
    sess = rt.Session(model, backend="numpy")
    for f in feeds:
        want = Pieces()(torch.from_numpy(f["x"])).numpy()
        np.testing.assert_allclose(sess.run(None, f)[0], want, rtol=1e-6, atol=1e-6)


def test_sequences_and_strings_with_cupy_like_arrays():
    """With arrays that behave like CuPy's (test_runtime_gpu.DeviceNumpy): sequences hold device
    arrays, strings stay host object arrays, numeric string-op results come back as device arrays."""
    cupy = pytest.importorskip("cupy", reason="the list of CuPy names comes from dir(cupy)")
    from test_runtime_gpu import Device, DeviceNumpy

    xp = DeviceNumpy(dir(cupy))
    model = _model(SEQUENCE_OPS)
    ref = rt.Session(model, backend="numpy")
    sess = rt.Session(model, backend=xp)
    for seed in range(3):
        feeds = {k: np.asarray(v).view(Device) for k, v in _seq_feeds(seed).items()}
        got = sess.run(None, feeds, to_numpy=False)
        assert isinstance(got[4], list) and all(isinstance(t, Device) for t in got[4])
        _same(ref.run(None, _seq_feeds(seed)), [[np.asarray(t) for t in g] if isinstance(g, list) else np.asarray(g)
                                                for g in got])
    strings = onnx.parser.parse_model("""
    <ir_version: 9, opset_import: ["" : 20]>
    g (string[3] w) => (string[3] up, bool[3] m, int64[3] n)
    {
        up = StringNormalizer<case_change_action = "UPPER">(w)
        m = RegexFullMatch<pattern = "a.*">(w)
        parts, n = StringSplit(w)
    }
    """)
    sess = rt.Session(strings, backend=xp)
    w = np.array(["ab c", "b", "a"], dtype=object)
    for _ in range(2):
        up, m, n = sess.run(None, {"w": w}, to_numpy=False)
        assert type(up) is np.ndarray and list(up) == ["AB C", "B", "A"]
        assert isinstance(m, Device) and m.tolist() == [True, False, True]
        assert isinstance(n, Device) and n.tolist() == [2, 1, 1]


def test_label_encoder_v1_classes_strings_matches_ort():
    for text, feeds in (
            ("string[4] x) => (int64[4] y", {"x": np.array(["b", "zz", "a", "c"], dtype=object)}),
            ("int64[4] x) => (string[4] y", {"x": np.array([2, 0, 7, 1], np.int64)})):
        model = onnx.parser.parse_model(f"""
        <ir_version: 9, opset_import: ["" : 18, "ai.onnx.ml" : 1]>
        g ({text})
        {{
            y = ai.onnx.ml.LabelEncoder<classes_strings = ["a", "b", "c"], default_int64 = -3,
                                        default_string = "none">(x)
        }}
        """)
        onnx.checker.check_model(model, full_check=True)
        _check_vs_ort(model, [feeds])
