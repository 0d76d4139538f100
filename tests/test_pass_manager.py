"""The pass manager: ordering rules, statistics, metadata, verification, failures."""

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import pytest

import opc
from opc.errors import OpcError, PipelineError, VerificationError
from opc.ir import get_metadata
from opc.manager import PassManager, check_order
from opc.pass_api import Pass, PassContext, PassResult, option

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 4] x) => (float[N, 3] y) {
    w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
    h = MatMul (x, w)
    i = Identity (h)
    y = Relu (i)
}
"""


def tiny_model():
    model = onnx.parser.parse_model(MODEL_TEXT)
    onnx.checker.check_model(model)
    return model


@dataclass
class ScaleWeights(Pass):
    """Deliberately changes values: multiplies every constant by `factor`."""

    name: ClassVar[str] = "scale"
    factor: float = option(2.0, "multiplier")

    def run(self, graph, ctx):
        n = 0
        for node in graph.nodes:
            if node.op == "Constant":
                node.attrs["value"].values = node.attrs["value"].values * self.factor
                n += 1
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                tensor.values = tensor.values * self.factor
                n += 1
        return PassResult(modified=n > 0, stats={"constants_scaled": n})


@dataclass
class LossyScale(ScaleWeights):
    name: ClassVar[str] = "lossyscale"
    exact: ClassVar[bool] = False


@dataclass
class NeedsFold(Pass):
    name: ClassVar[str] = "needsfold"
    requires: ClassVar[tuple] = ("fold",)

    def run(self, graph, ctx):
        return PassResult(modified=False)


@dataclass
class Last(Pass):
    name: ClassVar[str] = "last"
    position: ClassVar[str] = "last"

    def run(self, graph, ctx):
        ctx.metadata["test.last"] = "ran"
        return PassResult(modified=False)


@dataclass
class Crash(Pass):
    name: ClassVar[str] = "crash"

    def run(self, graph, ctx):
        raise ZeroDivisionError("boom")


@dataclass
class BreakGraph(Pass):
    """Produces an invalid model: a node with an op that does not exist."""

    name: ClassVar[str] = "breakgraph"

    def run(self, graph, ctx):
        graph.nodes[0].op = "NoSuchOp"
        return PassResult(modified=True)


@pytest.fixture(autouse=True)
def test_passes(monkeypatch):
    from opc import registry

    for cls in (ScaleWeights, LossyScale, NeedsFold, Last, Crash, BreakGraph):
        monkeypatch.setitem(registry.PASSES, cls.name, f"{__name__}:{cls.__name__}")


def test_statistics_metadata_and_input_untouched():
    model = tiny_model()
    before = model.SerializeToString()
    out, report = opc.compile(model, "fold,scale(factor=3.0)")
    assert model.SerializeToString() == before  # the caller's model is never modified
    assert [r.name for r in report.passes] == ["fold", "scale"]
    fold_stats = report.passes[0].stats
    assert fold_stats["identity_removed"] == 1 and fold_stats["constant_nodes"] == 1
    assert sum(fold_stats.values()) == 2
    assert report.passes[0].modified is True
    assert report.passes[1].stats == {"constants_scaled": 1}
    meta = get_metadata(out)
    assert meta["opc.pipeline"] == "fold,scale(factor=3.0)"
    assert meta["opc.version"] == opc.__version__
    assert json.loads(meta["opc.stats"])["scale"] == {"constants_scaled": 1}
    assert report.before["nodes"] == 4 and report.after["nodes"] == 2
    assert all(r.time_s > 0 for r in report.passes)


def test_requires_and_position_are_checked():
    with pytest.raises(PipelineError, match="requires 'fold' earlier"):
        opc.compile(tiny_model(), "needsfold")
    opc.compile(tiny_model(), "fold,needsfold")
    with pytest.raises(PipelineError, match="must be the last pass"):
        opc.compile(tiny_model(), "last,fold")
    out, _ = opc.compile(tiny_model(), "fold,last")
    assert get_metadata(out)["test.last"] == "ran"


def test_verification_catches_a_pass_that_changes_outputs():
    with pytest.raises(VerificationError) as exc:
        opc.compile(tiny_model(), "fold,scale", verify=True)
    assert "pass 'scale' changed output 'y'" in str(exc.value)
    assert exc.value.exit_code == 3


def test_verification_passes_exact_and_reports_lossy():
    _, report = opc.compile(tiny_model(), "fold", verify=True)
    assert report.passes[0].verified is True
    assert report.passes[0].verification["vs_previous"]["y"]["max_abs"] == 0.0
    _, report = opc.compile(tiny_model(), "fold,lossyscale", verify=True)
    lossy = report.passes[1]
    assert lossy.verified is None  # lossy passes report, never fail
    assert lossy.verification["vs_input"]["y"]["max_abs"] > 0
    assert report.passed


def test_verify_uses_two_sizes_for_dynamic_dims():
    from opc.instruments import Verify

    v = Verify()
    ctx = PassContext()
    v.run_before_pipeline(tiny_model(), ctx)
    assert sorted(f["x"].shape[0] for f in v.feed_sets) == [2, 3]


def test_failing_pass_names_itself_and_predecessors():
    with pytest.raises(OpcError) as exc:
        opc.compile(tiny_model(), "fold,crash")
    msg = str(exc.value)
    assert "pass 'crash' failed (ZeroDivisionError: boom)" in msg and "passes before it: fold" in msg
    assert isinstance(exc.value.__cause__, ZeroDivisionError)  # kept for --debug


def test_invalid_result_is_caught_by_the_checker():
    with pytest.raises(OpcError, match="pass 'breakgraph' produced an invalid model"):
        opc.compile(tiny_model(), "fold,breakgraph")


def test_check_order_directly():
    check_order([ScaleWeights(), Last()])
    with pytest.raises(PipelineError):
        check_order([Last(), ScaleWeights()])


def test_instrument_hooks_run_in_order():
    calls = []

    class Spy:
        def run_before_pipeline(self, model, ctx):
            calls.append("start")

        def run_before_pass(self, step, graph, ctx):
            calls.append(f"before:{step.name}")

        def run_after_pass(self, step, before, after, ctx):
            calls.append(f"after:{step.name}:{len(before.graph.node)}->{len(after.graph.node)}")

        def run_after_pipeline(self, model, ctx, report):
            calls.append("end")

    opc.compile(tiny_model(), "fold,scale", instruments=[Spy()])
    assert calls == ["start", "before:fold", "after:fold:4->2", "before:scale", "after:scale:2->2", "end"]


def test_fold_minimal_rules_and_idempotence():
    out, report = opc.compile(tiny_model(), "fold")
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu"]
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert [o.name for o in out.graph.output] == ["y"]
    again, report2 = opc.compile(out, "fold")
    assert report2.passes[0].modified is False
    assert again.graph == out.graph


def test_identity_on_graph_output_keeps_the_name():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        r = Relu (x)
        y = Identity (r)
    }
    """
    out, report = opc.compile(onnx.parser.parse_model(text), "fold", verify=True)
    assert [(n.op_type, list(n.output)) for n in out.graph.node] == [("Relu", ["y"])]
    assert report.passes[0].stats["identity_removed"] == 1


def test_graphsurgeon_graph_is_what_passes_see():
    seen = {}

    @dataclass
    class Peek(Pass):
        name: ClassVar[str] = "peek"

        def run(self, graph, ctx):
            seen["type"] = type(graph)
            return PassResult(modified=False)

    PassManager([Peek()]).run(tiny_model(), PassContext())
    assert seen["type"] is gs.Graph


def test_outputs_equal_after_fold_on_light_model(light_model_paths):
    from opc.ort import compare, run_model, seeded_feeds

    path = light_model_paths[0]
    src = onnx.load(path)
    out, _ = opc.compile(path, "fold")
    feeds = seeded_feeds(src)
    ref, got = run_model(src, feeds), run_model(out, feeds)
    for name in ref:
        assert compare(ref[name], got[name])["max_abs"] <= 1e-5 * max(1.0, float(np.abs(ref[name]).max()))


@pytest.fixture
def light_model_paths():
    import glob
    import os

    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    paths = sorted(glob.glob(os.path.join(folder, "light_squeezenet.onnx")))
    assert paths
    return paths


def test_verify_feeds_calibration_samples_when_there_are_some():
    from pathlib import Path

    from opc.data import CalibrationData
    from opc.instruments import Verify

    samples = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    ctx = PassContext(calibration=CalibrationData(Path("calib.npz"), {"x": samples}))
    v = Verify()
    v.run_before_pipeline(tiny_model(), ctx)
    assert [f["x"].tolist() for f in v.feed_sets] == [samples[:2].tolist(), samples[:3].tolist()]
