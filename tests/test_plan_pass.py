"""The plan pass: stored plan, statistics, reordering, idempotence, ORT outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import opc
from opc.errors import PipelineError
from opc.ir import get_metadata
from opc.memory import META_KEY, load_plan, load_plan_with_reason
from opc.ort import make_session, run_model, seeded_feeds

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# the file computes both big branches before reducing them; interleaving is cheaper
BRANCHES = HEADER + """
branches (float[N,1024] x) => (float[N,1] y) <int64[1] one = {1}> {
  a = Softmax(x)
  b = LogSoftmax(x)
  ra = ReduceSum<keepdims = 1>(a, one)
  rb = ReduceSum<keepdims = 1>(b, one)
  y = Add(ra, rb)
}
"""

CHAIN = HEADER + """
chain (float[2,1024] x) => (float[2,1024] y) {
  a = Softmax(x)
  i = Identity(a)
  r = Relu(i)
  y = Softmax(r)
}
"""


def _model(text):
    return onnx.parser.parse_model(text)


def _outputs(model, shapes=None):
    feeds = seeded_feeds(model, shapes, seed=3)
    return run_model(model, feeds, session=make_session(model, threads=1))


def _stats(report, name="plan"):
    return next(r for r in report.passes if r.name == name)


def test_plan_stores_a_matching_plan_and_keeps_outputs():
    model = _model(CHAIN)
    out, report = opc.compile(model, "plan(workspaces=false)", verify=True)
    rec = _stats(report)
    assert rec.modified is False
    assert rec.stats == {"arena_bytes": 8192, "lower_bound_bytes": 8192, "naive_bytes": 3 * 8192,
                         "tensors_planned": 3, "views": 1, "inplace": 1, "workspaces": 0,
                         "nodes_reordered": 0}
    assert rec.verified is not False
    plan = load_plan(out)
    assert plan is not None and plan.matches(out)
    plan.check()
    assert plan.tensors["i"].alias_of == "a" and plan.tensors["r"].alias_of == "a"
    assert [n.op_type for n in out.graph.node] == ["Softmax", "Identity", "Relu", "Softmax"]
    for k, v in _outputs(model).items():
        np.testing.assert_array_equal(_outputs(out)[k], v)
    assert model.metadata_props == [] or META_KEY not in get_metadata(model)  # input untouched


def test_fold_then_plan_is_the_default_pipeline():
    from opc.registry import DEFAULT_PIPELINE

    assert DEFAULT_PIPELINE == "fold,plan"
    out, report = opc.compile(_model(CHAIN))
    assert [r.name for r in report.passes] == ["fold", "plan"]
    plan = load_plan(out)
    assert plan is not None and "i" not in plan.tensors  # fold removed the Identity
    assert plan.tensors["r"].alias_of == "a"


def test_reordering_rewrites_the_node_order_when_it_lowers_the_peak():
    model = _model(BRANCHES)
    out, report = opc.compile(model, "plan(workspaces=false)", input_shapes={"x": (4, 1024)}, verify=True)
    rec = _stats(report)
    assert rec.modified is True and rec.stats["nodes_reordered"] == 2
    assert [n.output[0] for n in out.graph.node] == ["a", "ra", "b", "rb", "y"]
    plan = load_plan(out)
    assert plan.order == [0, 1, 2, 3, 4]  # the stored order is the file's order
    assert plan.input_shapes == {"x": (4, 1024)}
    assert rec.stats["lower_bound_bytes"] == 4 * 4096 + 512 == rec.stats["arena_bytes"]
    np.testing.assert_allclose(_outputs(out, {"x": (4, 1024)})["y"], _outputs(model, {"x": (4, 1024)})["y"],
                               rtol=1e-6)
    # the plan made without reordering needs two big tensors at once
    _, plain = opc.compile(model, "plan(workspaces=false,reorder=false)", input_shapes={"x": (4, 1024)})
    assert _stats(plain).modified is False
    assert _stats(plain).stats["lower_bound_bytes"] == 2 * 4 * 4096 + 256


def test_planning_again_is_idempotent():
    once, _ = opc.compile(_model(BRANCHES), "plan(workspaces=false)")
    twice, report = opc.compile(once, "plan(workspaces=false)")
    assert _stats(report).modified is False and _stats(report).stats["nodes_reordered"] == 0
    assert get_metadata(twice)[META_KEY] == get_metadata(once)[META_KEY]


def test_symbolic_dims_warn_and_plan_as_one():
    _, report = opc.compile(_model(BRANCHES), "plan(workspaces=false)")
    assert any("planned as 1" in w for w in _stats(report).warnings)
    assert _stats(report).stats["lower_bound_bytes"] == 4096 + 512


def test_plan_must_be_last():
    with pytest.raises(PipelineError, match="must be the last pass"):
        opc.compile(_model(CHAIN), "plan,fold")


def test_bad_strategy_is_a_clear_error():
    with pytest.raises(opc.errors.OpcError, match="unknown memory planning strategy"):
        opc.compile(_model(CHAIN), "plan(strategies=[best])")


def test_a_later_edit_makes_the_stored_plan_stale():
    out, _ = opc.compile(_model(CHAIN), "plan")
    out.graph.node[2].op_type = "Sigmoid"
    plan, reason = load_plan_with_reason(out)
    assert plan is None and "does not match" in reason


def test_light_model_plan_through_the_pipeline(light_models):
    path = next(p for p in light_models if "squeezenet" in p.name)
    out, report = opc.compile(path, "fold,plan(workspaces=false)")
    rec = _stats(report)
    assert rec.stats["arena_bytes"] == rec.stats["lower_bound_bytes"] > 0
    assert rec.stats["naive_bytes"] > rec.stats["arena_bytes"]
    plan = load_plan(out)
    assert plan is not None
    plan.check()
    # ONNX Runtime still loads the model that carries the plan
    make_session(out, threads=1)


def test_unknowable_shapes_compile_without_a_plan():
    # a custom op that neither onnx nor ONNX Runtime knows: no shapes, so no plan, but no failure
    text = ('<ir_version: 8, opset_import: ["" : 17, "acme" : 1]>\n'
            "c (float[2,8] x) => (float[2,8] y) {\n  a = acme.Magic(x)\n  y = Relu(a)\n}\n")
    from opc.pass_api import PassContext
    from opc.passes.plan_memory import Plan
    from opc.ir import import_graph

    model = _model(text)
    ctx = PassContext(template=model)
    result = Plan().run(import_graph(model), ctx)
    assert result.modified is False and result.stats == {"tensors_planned": 0}
    assert "no memory plan stored" in result.warnings[0] and "'a'" in result.warnings[0]
    assert META_KEY not in ctx.metadata


def test_bad_alignment_is_a_usage_error():
    from opc.errors import UsageError

    with pytest.raises(UsageError, match="alignment 100 is not a power of two"):
        opc.compile(_model(CHAIN), "plan(alignment=100)")
