"""Every CLI command and its exit codes, run in-process through opc.cli.main."""

import glob
import json
import os

import onnx
import onnx.parser
import pytest

from opc.cli import main

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
    w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
    h = MatMul (x, w)
    d = Dropout (h)
    y = Relu (d)
}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(onnx.parser.parse_model(TEXT), str(path))
    return path


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compile_dump_and_print_changed(tmp_path, capsys):
    src = os.path.join(LIGHT, "light_squeezenet.onnx")
    before = open(src, "rb").read()
    out = tmp_path / "out.onnx"
    dump = tmp_path / "dump"
    report = tmp_path / "report.json"
    rc, stdout, err = run(capsys, "compile", src, "-o", out, "--passes", "fold", "--dump-passes", dump,
                          "--print-changed", "--verify", "--report", report)
    assert rc == 0, err
    assert open(src, "rb").read() == before
    assert stdout.strip().splitlines()[-1].startswith("PASSED")
    assert "-Dropout" in stdout and "Dropout" in stdout  # the diff and the table
    assert sorted(os.listdir(dump)) == ["00-input.onnx", "00-input.txt", "01-fold.diff", "01-fold.onnx", "01-fold.txt"]
    assert "-Dropout" in (dump / "01-fold.diff").read_text()
    rep = json.loads(report.read_text())
    assert rep["passes"][0]["stats"]["dropout_removed"] == 1
    onnx.checker.check_model(onnx.load(str(out)))


def test_dump_is_identical_across_runs(tmp_path, capsys, tiny):
    texts = []
    for i in range(2):
        assert run(capsys, "compile", tiny, "-o", tmp_path / f"o{i}.onnx", "-p", "fold",
                   "--dump-passes", tmp_path / f"d{i}")[0] == 0
        texts.append((tmp_path / f"d{i}" / "01-fold.txt").read_text())
    assert texts[0] == texts[1]
    assert (tmp_path / "o0.onnx").read_bytes() == (tmp_path / "o1.onnx").read_bytes()


def test_usage_errors_exit_2(tmp_path, capsys, tiny):
    rc, _, err = run(capsys, "compile", tiny, "-o", tmp_path / "o.onnx", "--passes", "fold(bogus=1)")
    assert rc == 2 and "no option 'bogus'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
    rc, _, err = run(capsys, "compile", tiny, "-o", tmp_path / "o.onnx", "--input-shapes", "x=1,4")
    assert rc == 2 and "NAME:D1,D2" in err
    rc, _, err = run(capsys, "compile", tiny, "-o", tmp_path / "o.onnx", "--input-shapes", "nope:1,4")
    assert rc == 2 and "'nope' is not an input" in err
    rc, _, err = run(capsys, "compile", tiny)
    assert rc == 2 and "-o" in err


def test_failure_mid_compile_leaves_nothing(tmp_path, capsys, tiny, monkeypatch):
    from opc import registry

    monkeypatch.setitem(registry.PASSES, "explode", "hostile_helpers:Explode")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    rc, _, err = run(capsys, "compile", tiny, "-o", out, "--passes", "fold,explode")
    assert rc == 1
    assert "pass 'explode' failed (RuntimeError: injected fault)" in err and "Traceback" not in err
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "tiny.onnx"]


def test_passes_lists_options(capsys):
    rc, out, _ = run(capsys, "passes")
    assert rc == 0
    assert "fold (exact):" in out and "max_rounds: int = 20" in out and "default pipeline:" in out
    assert "quantize (lossy" in out and "prune (lossy" in out and "plan (exact" in out
    rc, out, _ = run(capsys, "passes", "--json")
    listing = json.loads(out)
    assert "fold" in listing["passes"]


def test_diff_inspect_verify(tmp_path, capsys, tiny):
    out = tmp_path / "o.onnx"
    assert run(capsys, "compile", tiny, "-o", out, "-q")[0] == 0
    rc, text, _ = run(capsys, "diff", tiny, out)
    assert rc == 0 and "nodes: 4 -> 2" in text and "removed: Constant x1, Dropout x1" in text
    rc, text, _ = run(capsys, "diff", tiny, out, "--json")
    assert json.loads(text)["nodes"]["removed_by_op"] == {"Constant": 1, "Dropout": 1}
    rc, text, _ = run(capsys, "inspect", out)
    assert rc == 0 and "opc pipeline:" in text and "MatMul 1" in text
    info = json.loads(run(capsys, "inspect", out, "--json")[1])
    assert info["inputs"] == {"x": "float32[N,4]"} and info["parameters"] == 12
    rc, text, _ = run(capsys, "verify", tiny, out)
    assert rc == 0 and text.strip().endswith("rtol=0.0001 atol=1e-05")


def test_verify_mismatch_exits_3(tmp_path, capsys, tiny):
    other = tmp_path / "other.onnx"
    onnx.save(onnx.parser.parse_model(TEXT.replace("{1, 2, 3,", "{9, 2, 3,")), str(other))
    rc, text, _ = run(capsys, "verify", tiny, other)
    assert rc == 3 and "MISMATCH" in text and "FAILED" in text


def test_compile_every_light_model_with_dumps(tmp_path, capsys):
    for path in sorted(glob.glob(os.path.join(LIGHT, "*.onnx"))):
        name = os.path.basename(path)
        rc, out, err = run(capsys, "compile", path, "-o", tmp_path / name, "--verify", "-q",
                           "--dump-passes", tmp_path / (name + ".d"), "--print-changed")
        assert rc == 0, (name, err)
        assert out.strip().splitlines()[-1].startswith("PASSED")
