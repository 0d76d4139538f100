"""benchmarks/plan.py helpers: constant folding for onnxsim, the table row, the ORT probe."""

from __future__ import annotations

import numpy as np
import onnx

from benchmarks.plan import bench_model, fold_constants
from opc.memory import no_workspace, plan_model
from opc.ort import make_session, run_model, seeded_feeds


def _light(light_models, name):
    return next(p for p in light_models if name in p.name)


def test_fold_constants_keeps_outputs_and_removes_constant_nodes(light_models):
    model = onnx.load(str(_light(light_models, "squeezenet")))
    plan = plan_model(model, workspace_fn=no_workspace)
    folded = fold_constants(model, plan.constants)
    assert not any(n.op_type == "ConstantOfShape" for n in folded.graph.node)
    assert len(folded.graph.node) == len(model.graph.node) - len(
        [n for n in model.graph.node if all(o in set(plan.constants) for o in n.output)])
    feeds = seeded_feeds(model)
    ref = run_model(model, feeds, session=make_session(model, threads=1))
    got = run_model(folded, feeds, session=make_session(folded, threads=1))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)
    # folding changes nothing for our planner (constants are outside the arena anyway)
    again = plan_model(folded, workspace_fn=no_workspace)
    assert again.arena_size == plan.arena_size and again.lower_bound == plan.lower_bound


def test_bench_row_without_ort(light_models):
    row = bench_model("squeezenet", "light", _light(light_models, "squeezenet"), repeats=1, with_ort=False,
                      with_onnxsim=False)  # importing onnxsim takes seconds
    assert row["arena/LB"] == 1.0 and row["arena_bytes"] == row["lower_bound_bytes"] > 0
    assert row["naive_bytes"] > row["arena_bytes"]
    assert "ORT pattern MiB" not in row and row["onnxsim_bytes"] is None
