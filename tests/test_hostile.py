"""Hostile and broken model files: `opc compile` refuses each with exit 1, one line on
stderr naming the file/node/tensor, no traceback, nothing written, an existing OUT
untouched and no stray files. Also the inputs that must be accepted (nesting 30 deep,
zero-size tensors, NaN weights with a warning, custom ops with --allow-custom-ops)."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import opc
from hostile_helpers import Workspace, model_with, nested_if_bytes, snapshot, tiny_model, vi
from opc.errors import ModelError, OpcError
from opc.ir import load_model
from opc.ort import make_session


@pytest.fixture
def ws(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stray files in the working directory show up in the snapshots
    return Workspace(tmp_path, capsys)


# --- not a model ----------------------------------------------------------------------


def test_empty_file(ws):
    p = ws.write_bytes(b"")
    ws.refuse(p, str(p), "empty file")


def test_truncated_file(ws):
    data = tiny_model().SerializeToString()
    p = ws.write_bytes(data[: len(data) * 2 // 3])
    ws.refuse(p, str(p), "not an ONNX model")


def test_random_bytes(ws):
    p = ws.write_bytes(np.random.default_rng(1).bytes(4096))
    ws.refuse(p, str(p), "not an ONNX model")


def test_text_file(ws):
    p = ws.write_bytes(b"graph(float x) => (float y) { y = Relu(x) }\nthis is a text file, not ONNX\n")
    ws.refuse(p, str(p), "not an ONNX model")


def test_model_without_graph(ws):
    p = ws.write_model(onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)]))
    ws.refuse(p, str(p), "no graph")


def test_model_without_opset_import(ws):
    m = tiny_model()
    del m.opset_import[:]
    p = ws.write_model(m)
    ws.refuse(p, str(p), "no opset_import")


def test_missing_file_and_folder(ws):
    ws.refuse(ws.path("nope.onnx"), "nope.onnx", "no such file")
    (ws.root / "adir").mkdir()
    ws.refuse(ws.root / "adir", "adir", "is a folder")


def test_onnx_load_accepts_empty_file_but_opc_does_not(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    assert not onnx.load(str(p)).HasField("graph")  # why opc must check it itself
    with pytest.raises(ModelError, match="empty file"):
        load_model(p)


# --- graph errors, caught before onnx-graphsurgeon ----------------------------------


def test_unknown_op_in_default_domain(ws):
    m = model_with([helper.make_node("Frobnicate", ["x"], ["y"], name="frob1")], [vi("x")], [vi("y")])
    p = ws.write_model(m)
    ws.refuse(p, str(p), "'frob1'", "unknown op 'Frobnicate'")


def test_terminal_escapes_in_names_are_shown_escaped(ws):
    # a node name that would recolour or retitle the user's terminal if printed raw
    evil = "n\x1b]0;owned\x07\x1b[2J"
    m = model_with([helper.make_node("Frobnicate", ["x"], ["y"], name=evil)], [vi("x")], [vi("y")])
    p = ws.write_model(m)
    line = ws.refuse(p, "unknown op 'Frobnicate'", "'n\\x1b]0;owned\\x07\\x1b[2J'")
    assert "\x1b" not in line and "\x07" not in line


def test_op_newer_than_the_opset(ws):
    m = model_with([helper.make_node("Gelu", ["x"], ["y"], name="g1")], [vi("x")], [vi("y")], opset=17)
    p = ws.write_model(m)
    ws.refuse(p, "'g1'", "Gelu", "opset 17")


def test_cycle(ws):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n_a"),
             helper.make_node("Relu", ["a"], ["b"], name="n_b"),
             helper.make_node("Relu", ["a"], ["y"], name="n_y")]
    p = ws.write_model(model_with(nodes, [vi("x")], [vi("y")]))
    ws.refuse(p, str(p), "cycle", "'n_a'", "'n_b'")


def test_self_loop(ws):
    nodes = [helper.make_node("Add", ["x", "y"], ["y"], name="selfish")]
    p = ws.write_model(model_with(nodes, [vi("x")], [vi("y")]))
    ws.refuse(p, "cycle", "'selfish'")


def test_duplicate_node_output(ws):
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="first"),
             helper.make_node("Sigmoid", ["x"], ["t"], name="second"),
             helper.make_node("Relu", ["t"], ["y"], name="last")]
    p = ws.write_model(model_with(nodes, [vi("x")], [vi("y")]))
    ws.refuse(p, "duplicate node output", "'t'", "'first'", "'second'")


def test_graph_output_listed_twice(ws):
    m = model_with([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x")], [vi("y"), vi("y")])
    p = ws.write_model(m)
    ws.refuse(p, "graph output 'y' is listed twice")


def test_dangling_output(ws):
    m = model_with([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x")], [vi("y"), vi("ghost")])
    p = ws.write_model(m)
    ws.refuse(p, "'ghost'", "dangling")


def test_undefined_input(ws):
    m = model_with([helper.make_node("Add", ["x", "nowhere"], ["y"], name="adder")], [vi("x")], [vi("y")])
    p = ws.write_model(m)
    ws.refuse(p, "'adder'", "'nowhere'")


def test_undefined_input_inside_a_subgraph(ws):
    then_g = helper.make_graph([helper.make_node("Relu", ["missing_outer"], ["t"], name="inner")], "then", [],
                               [vi("t")])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="inner2")], "else", [], [vi("e")])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    m = model_with([node], [vi("c", [], TensorProto.BOOL), vi("x")], [vi("y")])
    p = ws.write_model(m)
    ws.refuse(p, "subgraph 'then_branch' of node 'branch'", "'inner'", "'missing_outer'")


def test_unsorted_but_acyclic_graph_is_sorted_and_compiles(ws):
    nodes = [helper.make_node("Relu", ["h"], ["y"], name="second"),
             helper.make_node("Neg", ["x"], ["h"], name="first")]
    p = ws.write_model(model_with(nodes, [vi("x")], [vi("y")]))
    rc, out, err = ws.run("compile", p, "-o", ws.path("out.onnx"))
    assert rc == 0, err
    assert [n.name for n in onnx.load(str(ws.path("out.onnx"))).graph.node] == ["first", "second"]


def test_custom_domain_refused_then_passed_through(ws):
    node = helper.make_node("Mystery", ["x"], ["y"], name="custom1", domain="com.example", depth=3)
    m = model_with([node], [vi("x")], [vi("y")], domains=["com.example"])
    p = ws.write_model(m)
    ws.refuse(p, "'custom1'", "com.example", "--allow-custom-ops")
    with pytest.raises(ModelError, match="custom domain"):
        opc.compile(m)
    rc, out, err = ws.run("compile", p, "-o", ws.path("out.onnx"), "--allow-custom-ops")
    assert rc == 0, err
    result = onnx.load(str(ws.path("out.onnx")))
    (kept,) = [n for n in result.graph.node if n.domain == "com.example"]
    assert kept == node  # untouched: same name, inputs, outputs and attributes


# --- versions ------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [6, 1000])
def test_opset_out_of_range(ws, opset):
    m = tiny_model()
    m.opset_import[0].version = opset
    p = ws.write_model(m)
    ws.refuse(p, str(p), f"opset {opset}", f"supported range {opc.validate.MIN_OPSET} to "
                                           f"{onnx.defs.onnx_opset_version()}")


@pytest.mark.parametrize("ir", [1, 99])
def test_ir_version_out_of_range(ws, ir):
    m = tiny_model()
    m.ir_version = ir
    p = ws.write_model(m)
    ws.refuse(p, str(p), f"ir_version {ir}", f"supported range 3 to {onnx.IR_VERSION}")


# --- tensors: checked before anything is allocated -----------------------------------


def _with_initializer(tensor: onnx.TensorProto) -> onnx.ModelProto:
    node = helper.make_node("Add", ["x", tensor.name], ["y"], name="add")
    return model_with([node], [vi("x")], [vi("y")], initializers=[tensor])


def test_initializer_dims_do_not_match_data(ws):
    t = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    t.dims[:] = [3, 4]
    p = ws.write_model(_with_initializer(t))
    ws.refuse(p, "initializer 'w'", "32 bytes", "[3, 4]", "48")


def test_initializer_typed_data_count_mismatch(ws):
    t = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 4], float_data=[1.0] * 5)
    p = ws.write_model(_with_initializer(t))
    ws.refuse(p, "initializer 'w'", "5 values")


def test_absurd_dims_refused_before_any_allocation(ws):
    t = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    t.dims[:] = [2**40, 2**40, 2**40]  # the product wraps to 0 in int64: must not fool the check
    p = ws.write_model(_with_initializer(t))
    tracemalloc.start()
    try:
        ws.refuse(p, "initializer 'w'", "absurd dims")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_negative_dims(ws):
    t = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    t.dims[:] = [-2, -4]
    p = ws.write_model(_with_initializer(t))
    ws.refuse(p, "initializer 'w'", "negative dims")


@pytest.mark.parametrize("dtype", [0, 999])
def test_bad_dtype(ws, dtype):
    t = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    t.data_type = dtype
    p = ws.write_model(_with_initializer(t))
    ws.refuse(p, "initializer 'w'", "invalid data type")


def test_bad_constant_attribute_tensor(ws):
    t = numpy_helper.from_array(np.ones((2, 4), np.float32), "cval")
    t.dims[:] = [4, 4]
    nodes = [helper.make_node("Constant", [], ["c"], name="const1", value=t),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    p = ws.write_model(model_with(nodes, [vi("x")], [vi("y")]))
    ws.refuse(p, "attribute 'value' of node 'const1'", "[4, 4]")


@pytest.mark.parametrize("dims, needle", [([2**62, 2**62], "absurd dims"), ([2**20, 2**20, 2**10], "absurd dims"),
                                          ([-3, 4], "negative dims")])
def test_absurd_graph_input_dims(ws, dims, needle):
    # --verify would try to allocate seeded inputs of this shape
    m = model_with([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", dims)], [vi("y")])
    p = ws.write_model(m)
    ws.refuse(p, "graph input 'x'", needle, extra=["--verify"])


# --- nesting --------------------------------------------------------------------------


def test_nesting_30_deep_compiles_and_runs(ws):
    p = ws.write_bytes(nested_if_bytes(30))
    rc, out, err = ws.run("compile", p, "-o", ws.path("out.onnx"))
    assert rc == 0, err
    result = load_model(ws.path("out.onnx"))
    assert opc.validate.nesting_depth(result) == 30
    got = make_session(result, threads=1).run(None, {"c": np.array(True), "x": np.full(1, 7, np.float32)})
    assert got[0].tolist() == [7.0]


@pytest.mark.parametrize("depth", [31, 40, 5000])
def test_deep_nesting_refused_cleanly(ws, depth):
    p = ws.write_bytes(nested_if_bytes(depth))
    ws.refuse(p, str(p), f"nested {depth} deep", "at most 30")


def test_deep_nesting_in_memory_model_refused(ws):
    m = onnx.ModelProto()
    m.ParseFromString(nested_if_bytes(31))  # protobuf still parses 31 levels
    with pytest.raises(ModelError, match="nested 31 deep"):
        opc.compile(m)


# --- accepted oddities ----------------------------------------------------------------


def test_zero_size_tensors_compile_and_run(ws):
    empty = numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty")
    nodes = [helper.make_node("Concat", ["x", "empty"], ["y"], name="cat", axis=0)]
    m = model_with(nodes, [vi("x")], [vi("y")], initializers=[empty])
    p = ws.write_model(m)
    rc, out, err = ws.run("compile", p, "-o", ws.path("out.onnx"))
    assert rc == 0, err
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (y,) = make_session(load_model(ws.path("out.onnx")), threads=1).run(None, {"x": x})
    np.testing.assert_array_equal(y, x)


def test_nan_and_inf_weights_compile_with_a_warning(ws):
    w = numpy_helper.from_array(np.array([[1, np.nan, np.inf, -np.inf]] * 2, np.float32), "w")
    p = ws.write_model(_with_initializer(w))
    rc, out, err = ws.run("compile", p, "-o", ws.path("out.onnx"))
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("opc: warning:")]
    assert len(warnings) == 1 and "initializer 'w'" in warnings[0] and "6 NaN/Inf" in warnings[0], err
    assert "Traceback" not in err
    assert ws.path("out.onnx").exists()


# --- calibration data -----------------------------------------------------------------


@pytest.mark.parametrize("arrays, needles", [
    ({"z": np.zeros((4, 4), np.float32)}, ["'z' is not a model input"]),
    ({"x": np.zeros((4, 5), np.float32)}, ["input 'x'", "axis 1 is 5"]),
    ({"x": np.zeros((4, 4), np.float64)}, ["input 'x'", "float64"]),
    ({"x": np.zeros((0, 4), np.float32)}, ["input 'x'", "0 samples"]),
    ({"x": np.zeros((4,), np.float32)}, ["input 'x'", "rank"]),
    ({"x": np.float32(3.0)}, ["input 'x'"]),
], ids=["name", "shape", "dtype", "too-few", "rank", "scalar"])
def test_bad_calibration_data(ws, arrays, needles):
    p = ws.write_model(tiny_model())
    data = ws.path("calib.npz")
    np.savez(data, **arrays)
    ws.refuse(p, str(data), *needles, extra=["--passes", "fold", "--calibration-data", data])


def test_calibration_data_not_npz(ws):
    p = ws.write_model(tiny_model())
    data = ws.write_bytes(b"not a zip file", "calib.npz")
    ws.refuse(p, str(data), "cannot read calibration data", extra=["--calibration-data", data])


# --- memory: ConstantOfShape of 10^10 elements must not be materialized -------------


def test_huge_constant_of_shape_does_not_exhaust_memory(tmp_path):
    shape = numpy_helper.from_array(np.array([100000, 100000], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="huge",
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    m = model_with(nodes, [vi("x", [1])], [vi("y", [1])], initializers=[shape])
    src, out = tmp_path / "huge.onnx", tmp_path / "out.onnx"
    src.write_bytes(m.SerializeToString())
    # 3 GiB of address space: far below the 40 GB the tensor would need
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from opc.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "compile", str(src), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size < 2**20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.onnx", "out.onnx"]


# --- API --------------------------------------------------------------------------------


def test_api_raises_opc_errors_only(tmp_path):
    m = model_with([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Relu", ["x"], ["t"])],
                   [vi("x")], [vi("t")])
    with pytest.raises(OpcError, match="duplicate node output"):
        opc.compile(m)
    before = snapshot(tmp_path)
    with pytest.raises(OpcError, match="no such file"):
        opc.compile(tmp_path / "missing.onnx")
    assert snapshot(tmp_path) == before


# --- odd paths and the other commands ---------------------------------------------------


def test_device_and_fifo_are_not_read(ws):
    os.symlink("/dev/zero", ws.path("zero.onnx"))  # reading it would never end
    ws.refuse(ws.path("zero.onnx"), "zero.onnx", "not a regular file")
    os.mkfifo(ws.path("pipe.onnx"))  # opening it would block
    ws.refuse(ws.path("pipe.onnx"), "pipe.onnx", "not a regular file")


def test_file_over_2gb_is_refused_before_reading(ws):
    big = ws.path("big.onnx")
    with open(big, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: no disk space used
    ws.refuse(big, "big.onnx", "over the 2 GB protobuf limit")


@pytest.mark.parametrize("command", ["inspect", "diff", "verify"])
def test_other_commands_refuse_the_same_way(ws, command):
    bad = ws.write_bytes(b"", "bad.onnx")
    good = ws.write_model(tiny_model(), "good.onnx")
    before = snapshot(ws.root)
    args = [command, bad] if command == "inspect" else [command, good, bad]
    rc, out, err = ws.run(*args)
    assert rc == 1 and err == f"opc: error: {bad}: empty file, not an ONNX model\n"
    assert snapshot(ws.root) == before


def test_calibration_zip_bomb_refused_from_headers(ws, monkeypatch):
    import opc.external_data

    p = ws.write_model(tiny_model())
    data = ws.path("calib.npz")
    np.savez_compressed(data, x=np.zeros((2**16, 4), np.float32))  # 1 MiB of zeros, a few KiB on disk
    assert data.stat().st_size < 2**16
    monkeypatch.setattr(opc.external_data, "physical_memory", lambda: 2**20 - 1)
    ws.refuse(p, str(data), "1048576 bytes", "more than this machine's memory",
              extra=["--calibration-data", data])


def test_calibration_fifo_is_not_read(ws):
    p = ws.write_model(tiny_model())
    os.mkfifo(ws.path("calib.npz"))
    ws.refuse(p, "calib.npz", "not a regular file", extra=["--calibration-data", ws.path("calib.npz")])


def test_run_validate_exits_nonzero_on_non_finite_outputs(ws):
    pytest.importorskip("opc.runtime.cli_impl")  # `opc run` belongs to the runtime part
    w = numpy_helper.from_array(np.array([[1, np.nan, np.inf, 2]] * 2, np.float32), "w")
    src = ws.write_model(_with_initializer(w))
    assert ws.run("compile", src, "-o", "out.onnx")[0] == 0
    rc, out, err = ws.run("run", "out.onnx", "--validate", "--backend", "numpy")
    errors = [line for line in err.splitlines() if not line.startswith("opc: warning:")]
    assert rc == 1 and len(errors) == 1 and "output 'y'" in errors[0] and "2 NaN" in errors[0], (rc, out, err)
    rc, out, err = ws.run("run", "out.onnx", "--backend", "numpy")
    assert rc == 0, err
    finite = ws.write_model(tiny_model(), "finite.onnx")
    rc, out, err = ws.run("run", finite, "--validate", "--backend", "numpy")
    assert rc == 0 and "every output is finite" in out, err
