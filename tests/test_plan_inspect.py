"""`opc inspect`: the memory section, its text chart, and --plot (SVG by hand, PNG via matplotlib)."""

from __future__ import annotations

import builtins
import json
import xml.etree.ElementTree as ET

import onnx
import onnx.parser
import pytest

import opc
from opc.cli import main
from opc.errors import OpcError
from opc.ir import save_model
from opc.memory import memory_report, model_plan, text_chart, write_plot

MODEL = """<ir_version: 8, opset_import: ["" : 17]>
m (float[N,1024] x) => (float[N,1024] y) {
  a = Softmax(x)
  b = Softmax(a)
  c = Relu(b)
  y = Softmax(c)
}
"""


def _cli(capsys, args):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_memory_section_of_a_planned_model(tmp_path, capsys):
    out, _ = opc.compile(onnx.parser.parse_model(MODEL), "plan(workspaces=false)", input_shapes={"x": (2, 1024)})
    path = tmp_path / "p.onnx"
    save_model(out, path)
    rc, text = _cli(capsys, ["inspect", str(path)])
    assert rc == 0, text
    assert "memory plan (stored in the model, matches the graph) for x: 2x1024:" in text
    assert "arena 16.0 KiB (16,384 B), lower bound 16.0 KiB (1.000x), naive 24.0 KiB" in text
    assert "3 tensors in the arena (0 views, 1 in place), 0 workspaces, 4 steps" in text
    rc, js = _cli(capsys, ["inspect", str(path), "--json"])
    info = json.loads(js)["memory"]
    assert info["live_bytes"] == [8192, 16384, 8192, 8192]
    assert info["arena_bytes"] == info["lower_bound_bytes"] == 16384


def test_unplanned_or_stale_models_get_a_plan_computed_now():
    model = onnx.parser.parse_model(MODEL)
    info = memory_report(model)
    assert info["source"].startswith("computed now, not stored (the model holds no memory plan)")
    assert info["input_shapes"] == {"x": [1, 1024]}
    assert any("planned as 1" in n for n in info["notes"])
    out, _ = opc.compile(model, "plan")
    out.graph.node[1].op_type = "LogSoftmax"
    assert "does not match the graph" in memory_report(out)["source"]


def test_text_chart_shape():
    rows = text_chart([0, 10, 20, 40, 20, 0], width=64, height=4)
    assert len(rows) == 6
    bars = [r.split("|", 1)[1] for r in rows[:4]]
    assert bars[0] == "   #  "  # only the peak reaches the top row
    assert bars[-1] == " #### "  # everything above half a row at the bottom
    assert rows[0].strip().startswith("40 B")
    many = text_chart(list(range(1000)), width=50, height=3)
    assert all(len(r.split("|", 1)[1]) == 50 for r in many[:3])


def test_svg_plot(tmp_path, capsys):
    model = onnx.parser.parse_model(MODEL)
    path = tmp_path / "plan.svg"
    rc, text = _cli(capsys, ["inspect", str(_saved(model, tmp_path)), "--plot", str(path)])
    assert rc == 0, text
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.text for t in root.iter(f"{ns}title")]
    assert any(t.startswith("a: 4096 B at") for t in titles)
    assert any(t.startswith("b (+1 aliases): 4096 B") for t in titles)  # c is written in place over b
    assert root.find(f"{ns}polyline") is not None


def test_png_plot_needs_matplotlib(tmp_path, monkeypatch):
    plan, _ = model_plan(onnx.parser.parse_model(MODEL))
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(OpcError, match="PNG needs matplotlib"):
        write_plot(plan, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    write_plot(plan, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_plot_names_are_usage_errors(tmp_path, capsys):
    path = _saved(onnx.parser.parse_model(MODEL), tmp_path)
    rc, text = _cli(capsys, ["inspect", str(path), "--plot", str(tmp_path / "x.jpg")])
    assert rc == 2 and "must end in .svg or .png" in text
    rc, text = _cli(capsys, ["inspect", str(path), "--plot", str(tmp_path / "missing" / "x.svg")])
    assert rc == 1 and "does not exist" in text


def _saved(model, tmp_path):
    path = tmp_path / "m.onnx"
    save_model(model, path)
    return path
