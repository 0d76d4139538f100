"""`opc run` and `opc bench`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from opc.cli import main

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) { y = Log (x) }
"""


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "log.onnx"
    onnx.save(onnx.parser.parse_model(MODEL), path)
    return path


def test_run_saves_outputs_and_matches_ort(model_path, tmp_path, capsys):
    x = np.random.default_rng(0).uniform(0.5, 2, (3, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    out = tmp_path / "out.npz"
    rc = main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz"), "--backend", "numpy",
               "--save-outputs", str(out), "--compare-to", "ort", "--validate"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "vs ORT y:" in text and "ok" in text and "every output is finite" in text
    with np.load(out) as z:
        np.testing.assert_allclose(z["y"], np.log(x), rtol=1e-6)


def test_run_validate_fails_on_nan(model_path, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=-np.ones((2, 4), np.float32))
    rc = main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz"), "--validate"])
    assert rc == 1
    assert "output 'y' holds 8 NaN and 0 Inf values" in capsys.readouterr().err
    # without --validate the same run succeeds
    assert main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz")]) == 0


def test_run_rejects_inputs_that_do_not_fit(model_path, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", z=np.ones((2, 4), np.float32))
    assert main(["run", str(model_path), "--inputs", str(tmp_path / "in.npz")]) == 1
    err = capsys.readouterr().err
    assert "no array for input 'x'" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert main(["run", str(model_path), "--inputs", str(tmp_path / "bad.npz")]) == 1
    assert "bad.npz: cannot read input data" in capsys.readouterr().err


def test_run_with_seeded_inputs_and_bad_option(model_path, capsys):
    assert main(["run", str(model_path), "--input-shapes", "x:2,4"]) == 0
    assert "y: shape (2, 4)" in capsys.readouterr().out
    assert main(["run", str(model_path), "--compare-to", "tf"]) == 2


SEQUENCE_MODEL = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[2, 6] x) => (seq(float[2, ?]) parts, optional(seq(float[2, ?])) none)
{
    three = Constant<value = int64 {3}>()
    parts = SplitToSequence<axis = 1>(x, three)
    none = Optional<type = seq(float)>()
}
"""


def test_run_saves_sequence_outputs_element_by_element(tmp_path, capsys):
    path = tmp_path / "seq.onnx"
    onnx.save(onnx.parser.parse_model(SEQUENCE_MODEL), path)
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.savez(tmp_path / "in.npz", x=x)
    out = tmp_path / "out.npz"
    rc = main(["run", str(path), "--inputs", str(tmp_path / "in.npz"), "--save-outputs", str(out),
               "--compare-to", "ort", "--validate"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "parts: sequence of 2 tensors, saved as parts.0 ... parts.1" in text
    assert "none: empty optional (not saved)" in text and "vs ORT parts.1:" in text
    with np.load(out) as z:
        assert sorted(z.files) == ["parts.0", "parts.1"]
        np.testing.assert_array_equal(z["parts.0"], x[:, :3])
        np.testing.assert_array_equal(z["parts.1"], x[:, 3:])


def test_bench_reports_opc_and_ort(model_path, capsys):
    rc = main(["bench", str(model_path), "--backend", "numpy", "--batch", "8", "--vs", "ort", "--repeats", "3"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "batch 8: median" in text and "opc/ORT =" in text
