"""Fuzzing load -> check -> compile -> save -> reload with hypothesis.

Inputs are valid seed models mutated at the byte level (flips, truncation, splices) and
at the proto level (op types, names, dims, dtypes, attributes, opsets, subgraphs). opc's
own ``OpcError`` counts as handled; any other exception is a bug (each one found so far
has a regression test at the bottom of this module). Bounded for CI: the example counts
come from OPC_FUZZ_EXAMPLES (default 400 per strategy, a quarter of that through the CLI); examples are derandomized unless
OPC_FUZZ_RANDOM=1, so CI runs are repeatable and a longer local hunt is one variable away.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import opc
from hostile_helpers import model_with, nested_if_bytes, tiny_model, vi
from opc.cli import main
from opc.errors import ModelError, OpcError
from opc.ir import load_model, save_model
from opc.validate import check_custom_domains

if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:  # keep hypothesis' caches out of the working tree
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "opc-hypothesis"))

EXAMPLES = int(os.environ.get("OPC_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("OPC_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck))


def _seed_models() -> list[onnx.ModelProto]:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((4,)).astype(np.float32), "b")
    shape = numpy_helper.from_array(np.array([2, 4], np.int64), "shape")
    mlp = model_with([helper.make_node("Identity", ["x"], ["xi"], name="id"),
                      helper.make_node("MatMul", ["xi", "w"], ["h"], name="mm"),
                      helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
                      helper.make_node("Dropout", ["hb"], ["d"], name="drop"),
                      helper.make_node("Reshape", ["d", "shape"], ["r"], name="reshape"),
                      helper.make_node("Relu", ["r"], ["y"], name="relu")],
                     [vi("x")], [vi("y")], initializers=[w, b, shape])
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="in_then")], "then", [], [vi("t")])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="in_else")], "else", [], [vi("e")])
    branchy = model_with([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                         [vi("c", [], TensorProto.BOOL), vi("x")], [vi("y")])
    const = model_with([helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(
                            np.ones((2, 4), np.float32))),
                        helper.make_node("Mul", ["x", "k"], ["y"], name="mul")], [vi("x")], [vi("y")])
    nested = onnx.ModelProto()
    nested.ParseFromString(nested_if_bytes(3))
    return [tiny_model(), mlp, branchy, const, nested]


SEEDS = _seed_models()
SEED_BYTES = [m.SerializeToString() for m in SEEDS]
OPS = ["Relu", "Add", "MatMul", "Identity", "Dropout", "Reshape", "Concat", "If", "Loop", "Constant", "Gemm",
       "Conv", "Frobnicate", "ConstantOfShape", "Cast", "Split", "Transpose", "Gather", ""]


def exercise(data: bytes) -> None:
    """The whole path a stranger's file takes; only OpcError may escape."""
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "in.onnx", Path(d) / "out.onnx"
        src.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = load_model(src)
                check_custom_domains(model, str(src))
                result, _ = opc.compile(model, "fold")
                save_model(result, out)
                load_model(out)
            except OpcError as exc:
                assert "\n" not in str(exc)
                return


# --- byte-level mutations ------------------------------------------------------------

byte_edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("splice"), st.integers(0, 10**6), st.integers(0, 10**6)),
    # overwrite a letter: keeps the wire format intact, changes names/op types/dtypes
    st.tuples(st.just("text"), st.integers(0, 10**6), st.integers(0, 255)),
)


def apply_bytes(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in edits:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] = arg
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos:pos + arg]
        elif kind == "text":
            letters = [i for i, c in enumerate(buf) if 0x41 <= c <= 0x7A]
            if letters:
                buf[letters[pos % len(letters)]] = arg
        elif kind == "splice":
            other = arg % len(buf)
            buf[pos:pos] = buf[other:other + 12]
    return bytes(buf)


@FUZZ
@given(seed=st.integers(0, len(SEEDS) - 1), edits=st.lists(byte_edit, min_size=1, max_size=4))
def test_fuzz_bytes(seed, edits):
    exercise(apply_bytes(SEED_BYTES[seed], edits))


# --- proto-level mutations -----------------------------------------------------------

names = st.sampled_from(["x", "y", "w", "b", "h", "k", "t", "c", "", "zz", "shape", "xi", "d", "r"])
proto_edit = st.one_of(
    st.tuples(st.just("op"), st.integers(0, 99), st.sampled_from(OPS)),
    st.tuples(st.just("input"), st.integers(0, 99), names),
    st.tuples(st.just("output"), st.integers(0, 99), names),
    st.tuples(st.just("graph_output"), st.integers(0, 99), names),
    st.tuples(st.just("dims"), st.integers(0, 99), st.lists(st.integers(-3, 2**62), max_size=4)),
    st.tuples(st.just("dtype"), st.integers(0, 99), st.integers(-1, 40)),
    st.tuples(st.just("raw"), st.integers(0, 99), st.binary(max_size=40)),
    st.tuples(st.just("attr"), st.integers(0, 99), st.one_of(
        st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=5),
        st.lists(st.integers(-5, 5), min_size=1, max_size=4))),
    st.tuples(st.just("opset"), st.integers(0, 99), st.integers(-1, 40)),
    st.tuples(st.just("ir"), st.integers(0, 99), st.integers(-1, 15)),
    st.tuples(st.just("delete_node"), st.integers(0, 99), st.just(0)),
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("domain"), st.integers(0, 99), st.sampled_from(["", "ai.onnx", "com.x", "ai.onnx.ml"])),
    st.tuples(st.just("elem_type"), st.integers(0, 99), st.integers(0, 30)),
    st.tuples(st.just("subgraph"), st.integers(0, 99), st.integers(0, len(SEEDS) - 1)),
    st.tuples(st.just("external"), st.integers(0, 99), st.sampled_from(["w.bin", "../x", "/etc/passwd", ""])),
)


def _all_nodes(model):
    from opc.validate import iter_graph_scopes

    return [n for g, _, _ in iter_graph_scopes(model) for n in g.node]


def apply_proto(model: onnx.ModelProto, edits) -> onnx.ModelProto:
    for kind, i, arg in edits:
        nodes = _all_nodes(model)
        inits = list(model.graph.initializer)
        node = nodes[i % len(nodes)] if nodes else None
        if kind == "op" and node is not None:
            node.op_type = arg
        elif kind == "input" and node is not None:
            if node.input:
                node.input[i % len(node.input)] = arg
            else:
                node.input.append(arg)
        elif kind == "output" and node is not None and node.output:
            node.output[i % len(node.output)] = arg
        elif kind == "graph_output":
            model.graph.output.append(vi(arg)) if i % 2 else (model.graph.output[0].__setattr__("name", arg)
                                                                if model.graph.output else None)
        elif kind == "dims" and inits:
            inits[i % len(inits)].dims[:] = arg
        elif kind == "dtype" and inits:
            inits[i % len(inits)].data_type = max(arg, 0)
        elif kind == "raw" and inits:
            inits[i % len(inits)].raw_data = arg
        elif kind == "attr" and node is not None:
            name = ["axis", "value", "perm", "to", "then_branch", "keepdims", "alpha"][i % 7]
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute(name, arg)])
        elif kind == "opset":
            model.opset_import[0].version = max(arg, 0)
        elif kind == "ir":
            model.ir_version = max(arg, 0)
        elif kind == "delete_node" and model.graph.node:
            del model.graph.node[i % len(model.graph.node)]
        elif kind == "swap" and len(model.graph.node) > 1:
            a, b = i % len(model.graph.node), arg % len(model.graph.node)
            na, nb = onnx.NodeProto(), onnx.NodeProto()
            na.CopyFrom(model.graph.node[a])
            nb.CopyFrom(model.graph.node[b])
            model.graph.node[a].CopyFrom(nb)
            model.graph.node[b].CopyFrom(na)
        elif kind == "domain" and node is not None:
            node.domain = arg
        elif kind == "elem_type" and model.graph.input:
            model.graph.input[i % len(model.graph.input)].type.tensor_type.elem_type = arg
        elif kind == "subgraph" and node is not None:
            node.attribute.append(helper.make_attribute(f"body{i}", SEEDS[arg].graph))
        elif kind == "external" and inits:
            t = inits[i % len(inits)]
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value=arg)
    return model


@FUZZ
@given(seed=st.integers(0, len(SEEDS) - 1), edits=st.lists(proto_edit, min_size=1, max_size=4))
def test_fuzz_proto(seed, edits):
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[seed])
    exercise(apply_proto(model, edits).SerializeToString())


@settings(FUZZ, max_examples=max(EXAMPLES // 4, 10))
@given(seed=st.integers(0, len(SEEDS) - 1), edits=st.lists(proto_edit, min_size=1, max_size=3))
def test_fuzz_cli(seed, edits):
    """Through `opc compile` itself: exit 0 or 1 with one 'opc: error:' line, never an
    internal error, never a stray file."""
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[seed])
    data = apply_proto(model, edits).SerializeToString()
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.onnx"
        src.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["compile", str(src), "-o", str(Path(d) / "out.onnx"), "--passes", "fold", "-q"])
        lines = [line for line in err.getvalue().splitlines() if not line.startswith("opc: warning:")]
        assert rc in (0, 1), (rc, err.getvalue())
        if rc:
            assert len(lines) == 1 and lines[0].startswith("opc: error:"), err.getvalue()
            assert sorted(os.listdir(d)) == ["in.onnx"]
        else:
            assert not lines and sorted(os.listdir(d)) == ["in.onnx", "out.onnx"]


array_spec = st.tuples(st.sampled_from(["x", "y", "c", "w", "x "]),
                       st.lists(st.integers(0, 5), max_size=3),
                       st.sampled_from(["float32", "float64", "int64", "bool", "U3", "object"]))


@settings(FUZZ, max_examples=max(EXAMPLES // 4, 10))
@given(seed=st.integers(0, len(SEEDS) - 1), arrays=st.lists(array_spec, max_size=3))
def test_fuzz_calibration_data(seed, arrays):
    """Calibration .npz files from strangers: a DataError or data that fits the model."""
    from opc.data import CalibrationData

    payload = {name: np.zeros(shape, dtype=dtype) for name, shape, dtype in arrays}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "calib.npz"
        np.savez(path, allow_pickle=True, **payload)
        try:
            data = CalibrationData.load(path, SEEDS[seed])
        except OpcError as exc:
            assert "\n" not in str(exc)
            return
        for batch in data.batches(2):
            assert set(batch) == set(payload)


def test_seeds_compile():
    """The seeds themselves must go all the way through (else the fuzzing proves little)."""
    for model in SEEDS:
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "in.onnx"
            src.write_bytes(model.SerializeToString())
            result, _ = opc.compile(load_model(src), "fold")
            save_model(result, Path(d) / "out.onnx")
            load_model(Path(d) / "out.onnx")


# --- regressions: inputs the fuzzer (or review) found ------------------------------------


def _refused(data: bytes, match: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.onnx"
        src.write_bytes(data)
        with pytest.raises(ModelError, match=match):
            load_model(src)


def test_regression_op_type_not_utf8():
    # protobuf hands back an invalid-UTF-8 string field as bytes: onnx.defs.has() raised TypeError
    data = tiny_model().SerializeToString()
    assert data.count(b"Relu") == 1
    _refused(data.replace(b"Relu", b"R\xfflu"), "NodeProto holds a name or text field that is not valid UTF-8")


def test_regression_value_name_not_utf8():
    # a graph input named with invalid UTF-8 reached the fold pass (UnicodeDecodeError there)
    model = tiny_model()
    model.graph.input[0].name = "xq"
    model.graph.node[1].input[0] = "xq"
    data = model.SerializeToString().replace(b"xq", b"\xc3\x28")
    _refused(data, "not valid UTF-8")


def test_regression_graph_input_without_element_type(tmp_path, capsys):
    # onnx.checker accepts elem_type 0 on a graph input; `opc compile` then hit KeyError: 0
    model = tiny_model()
    model.graph.input[0].type.tensor_type.elem_type = 0
    src = tmp_path / "in.onnx"
    src.write_bytes(model.SerializeToString())
    rc = main(["compile", str(src), "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"opc: error: {src}: graph input 'x' has no valid element type (0)\n"
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
