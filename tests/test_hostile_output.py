"""The output side: atomic writes, -o equal to the input, symlinks at OUT and at its
data file, Ctrl-C and injected faults leaving nothing behind, byte-identical repeat
compiles, and the CLI's one-line errors (tracebacks only with --debug)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import opc
import opc.ir
from hostile_helpers import SENTINEL, Workspace, model_with, snapshot, tiny_model, vi
from opc.ir import load_model, save_model
from opc.ort import make_session


@pytest.fixture
def ws(tmp_path, capsys, monkeypatch):
    from opc import registry

    monkeypatch.setitem(registry.PASSES, "explode", "hostile_helpers:Explode")
    monkeypatch.chdir(tmp_path)
    return Workspace(tmp_path, capsys)


def rich_model(hidden: int = 8) -> onnx.ModelProto:
    """Something for fold to do (Identity, Dropout, dead code) plus real weights."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "w2")
    dead = numpy_helper.from_array(rng.standard_normal((3,)).astype(np.float32), "dead_w")
    nodes = [helper.make_node("Identity", ["x"], ["xi"], name="id"),
             helper.make_node("MatMul", ["xi", "w1"], ["h"], name="mm1"),
             helper.make_node("Dropout", ["h"], ["hd"], name="drop"),
             helper.make_node("Relu", ["hd"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
             helper.make_node("Add", ["y", "dead_w"], ["unused"], name="dead")]
    return model_with(nodes, [vi("x")], [vi("y", (2, 3))], initializers=[w1, w2, dead])


def run_tiny(path: Path) -> np.ndarray:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return make_session(load_model(path), threads=1).run(None, {"x": x})[0]


# --- where the output goes --------------------------------------------------------------


def test_output_equal_to_input_is_safe(ws):
    p = ws.write_model(rich_model())
    expected = run_tiny(p)
    rc, out, err = ws.run("compile", p, "-o", p)
    assert rc == 0, err
    assert sorted(snapshot(ws.root)) == ["model.onnx"]
    result = load_model(p)
    assert "Identity" not in {n.op_type for n in result.graph.node}
    np.testing.assert_allclose(run_tiny(p), expected, rtol=1e-6)


def test_failure_with_output_equal_to_input_leaves_the_input(ws):
    p = ws.write_model(rich_model())
    before = p.read_bytes()
    rc, out, err = ws.run("compile", p, "-o", p, "--passes", "fold,explode")
    assert rc == 1 and "injected fault" in err
    assert p.read_bytes() == before
    assert sorted(snapshot(ws.root)) == ["model.onnx"]


def test_symlink_at_out_is_replaced_not_written_through(ws):
    p = ws.write_model(tiny_model())
    victim = ws.path("victim.txt")
    victim.write_bytes(SENTINEL)
    os.symlink("victim.txt", ws.path("out.onnx"))
    rc, out, err = ws.run("compile", p, "-o", "out.onnx")
    assert rc == 0, err
    assert victim.read_bytes() == SENTINEL
    assert not ws.path("out.onnx").is_symlink()
    load_model(ws.path("out.onnx"))
    assert sorted(snapshot(ws.root)) == ["model.onnx", "out.onnx", "victim.txt"]


def test_dangling_symlink_at_out(ws):
    p = ws.write_model(tiny_model())
    os.symlink("somewhere/else.onnx", ws.path("out.onnx"))
    rc, out, err = ws.run("compile", p, "-o", "out.onnx")
    assert rc == 0, err
    assert not ws.path("out.onnx").is_symlink() and not ws.path("somewhere").exists()


def test_symlink_at_out_data_file_is_not_written_through(ws, monkeypatch):
    monkeypatch.setattr(opc.ir, "EXTERNAL_DATA_THRESHOLD", 0)  # force the >2 GB layout on a tiny model
    p = ws.write_model(rich_model(hidden=128))
    victim = ws.path("victim.bin")
    victim.write_bytes(SENTINEL)
    os.symlink("victim.bin", ws.path("out.onnx.data"))
    rc, out, err = ws.run("compile", p, "-o", "out.onnx", "--passes", "fold")
    assert rc == 0, err
    assert victim.read_bytes() == SENTINEL
    assert not ws.path("out.onnx.data").is_symlink() and ws.path("out.onnx.data").stat().st_size > 0
    result = onnx.load(str(ws.path("out.onnx")), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in result.graph.initializer) == 2
    np.testing.assert_allclose(run_tiny(ws.path("out.onnx")), run_tiny(p), rtol=1e-6)
    assert sorted(snapshot(ws.root)) == ["model.onnx", "out.onnx", "out.onnx.data", "victim.bin"]


def test_existing_output_keeps_its_permissions(ws):
    p = ws.write_model(tiny_model())
    out = ws.path("out.onnx")
    out.write_bytes(SENTINEL)
    os.chmod(out, 0o640)
    assert ws.run("compile", p, "-o", out)[0] == 0
    assert out.stat().st_mode & 0o777 == 0o640 and out.read_bytes() != SENTINEL


def test_missing_output_folder(ws):
    p = ws.write_model(tiny_model())
    rc, out, err = ws.run("compile", p, "-o", ws.path("no/such/dir/out.onnx"))
    assert rc == 1 and err.count("\n") == 1 and "does not exist" in err
    assert sorted(snapshot(ws.root)) == ["model.onnx"]


# --- faults and interrupts --------------------------------------------------------------


def test_fault_in_the_last_pass_leaves_nothing(ws):
    p = ws.write_model(rich_model())
    ws.refuse(p, "pass 'explode' failed", "injected fault", "fold", extra=["--passes", "fold,explode"])


def _interrupt_mid_write(path, data):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_ctrl_c_while_saving_leaves_nothing(ws, monkeypatch, where):
    p = ws.write_model(rich_model())
    if where == "mid-write":
        monkeypatch.setattr(opc.ir, "_write_synced", _interrupt_mid_write)
    else:
        def interrupted_replace(src, dst):
            raise KeyboardInterrupt

        monkeypatch.setattr(opc.ir.os, "replace", interrupted_replace)
    for existing in (False, True):
        if existing:
            ws.path("out.onnx").write_bytes(SENTINEL)
        before = snapshot(ws.root)
        rc, out, err = ws.run("compile", p, "-o", "out.onnx")
        assert rc == 130 and err == "opc: interrupted\n", err
        assert snapshot(ws.root) == before


def test_disk_full_while_saving(ws, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(opc.ir, "_write_synced", full)
    p = ws.write_model(tiny_model())
    ws.refuse(p, "out.onnx", "cannot write the output", "No space left on device")


_SLEEPY = """
import sys, time
from dataclasses import dataclass
from typing import ClassVar
from opc import registry
from opc.pass_api import Pass

@dataclass
class Sleepy(Pass):
    name: ClassVar[str] = "sleepy"

    def run(self, graph, ctx):
        print("READY", flush=True)
        time.sleep(60)

registry.PASSES["sleepy"] = "__main__:Sleepy"
from opc.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, rc, line", [(signal.SIGINT, 130, "opc: interrupted\n"),
                                           (signal.SIGTERM, 143, "opc: terminated\n")], ids=["SIGINT", "SIGTERM"])
def test_real_signal_exits_cleanly_and_leaves_nothing(tmp_path, sig, rc, line):
    (tmp_path / "model.onnx").write_bytes(rich_model().SerializeToString())
    (tmp_path / "out.onnx").write_bytes(SENTINEL)
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPY, "compile", "model.onnx", "-o", "out.onnx",
                             "--passes", "fold,sleepy"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == rc, err
    assert err == line
    assert snapshot(tmp_path) == before


# --- the CLI's error lines --------------------------------------------------------------


def test_tracebacks_only_with_debug_in_a_real_process(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    cmd = [sys.executable, "-m", "opc.cli", "compile", "junk.onnx", "-o", "out.onnx"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("opc: error: junk.onnx: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = subprocess.run(cmd + ["--debug"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "opc: error: junk.onnx" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]


def test_internal_error_is_one_line_without_debug(ws, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug\nspanning lines")

    monkeypatch.setattr("opc.validate.check_model", bug)
    p = ws.write_model(tiny_model())
    rc, out, err = ws.run("compile", p, "-o", "out.onnx")
    assert rc == 1 and err == ("opc: internal error: ZeroDivisionError: a bug spanning lines "
                               "(rerun with --debug for the traceback)\n")
    rc, out, err = ws.run("compile", p, "-o", "out.onnx", "--debug")
    assert rc == 1 and "Traceback" in err and "ZeroDivisionError" in err
    assert sorted(snapshot(ws.root)) == ["model.onnx"]


def test_usage_errors_exit_2(ws):
    p = ws.write_model(tiny_model())
    rc, out, err = ws.run("compile", p)
    assert rc == 2 and err.count("\n") == 1 and "-o" in err
    ws.refuse(p, "unknown pass 'nosuch'", rc=2, extra=["--passes", "nosuch"])


# --- determinism --------------------------------------------------------------------------


def _compile_twice(ws, passes: str | None):
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    sources = [ws.write_model(rich_model(), "a/model.onnx")]
    if light.is_file():
        sources.append(light)
    extra = ["--passes", passes] if passes else []
    for src in sources:
        outputs = []
        for folder in ("first", "second-run"):
            (ws.root / folder).mkdir(exist_ok=True)
            out = ws.root / folder / (src.stem + ".opt.onnx")
            rc, _, err = ws.run("compile", src, "-o", out, *extra)
            assert rc == 0, err
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1], src
        api = [opc.compile(str(src), passes)[0].SerializeToString(deterministic=True) for _ in range(2)]
        assert api[0] == api[1]


def test_compiling_twice_gives_identical_bytes_fold(ws):
    _compile_twice(ws, "fold")


def test_compiling_twice_gives_identical_bytes_default_pipeline(ws):
    _compile_twice(ws, None)


def test_save_model_leaves_no_temporaries(tmp_path):
    save_model(tiny_model(), tmp_path / "m.onnx")
    save_model(tiny_model(), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
