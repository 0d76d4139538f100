"""Helpers for the fold tests: run the pass on a tiny model and compare ORT outputs."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from opc.ort import compare, make_session, run_model, seeded_feeds
from opc.pass_api import PassContext
from opc.passes.fold import Fold


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def fold(model: onnx.ModelProto | str, input_shapes=None, **options):
    """(folded ModelProto, PassResult); the input model is not changed."""
    if isinstance(model, str):
        model = parse(model)
    # compared by parts: graphsurgeon's exporter sets an empty name on attribute tensors it
    # shares with the imported proto, which changes the bytes but not the model
    before = _snapshot(model)
    graph = gs.import_onnx(model)
    ctx = PassContext(input_shapes=dict(input_shapes or {}), template=model)
    result = Fold(**options).run(graph, ctx)
    out = ctx.to_model(result.graph or graph)
    onnx.checker.check_model(out)
    assert _snapshot(model) == before, "the input model was modified"
    return out, result


def _snapshot(model: onnx.ModelProto):
    nodes = [(n.op_type, n.domain, tuple(n.input), tuple(n.output),
              tuple((a.name, a.SerializeToString()) for a in n.attribute if a.type != onnx.AttributeProto.TENSOR))
             for n in model.graph.node]
    return (nodes, [t.SerializeToString() for t in model.graph.initializer],
            [v.SerializeToString() for v in list(model.graph.input) + list(model.graph.output)])


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(ops(model)))


def nonzero(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if v}


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    raise KeyError(name)


def assert_idempotent(model: onnx.ModelProto, **options) -> None:
    again, result = fold(model, **options)
    assert result.modified is False, nonzero(result.stats)
    assert not nonzero(result.stats)
    assert ops(again) == ops(model)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, sizes=(2, 3), tol=1e-5,
                        input_shapes=None, optimize_modes=(False, True)) -> float:
    """ORT outputs equal within tol * max|reference|, at every size for dynamic dims; worst ratio."""
    worst = 0.0
    for seed, size in enumerate(sizes):
        feeds = seeded_feeds(a, input_shapes, seed=seed, dynamic_dim=size)
        for optimize in optimize_modes:
            ra = run_model(a, feeds, make_session(a, threads=1, optimize=optimize))
            rb = run_model(b, feeds, make_session(b, threads=1, optimize=optimize))
            assert list(ra) == list(rb), "graph outputs changed"
            for name in ra:
                assert ra[name].dtype == rb[name].dtype and ra[name].shape == rb[name].shape, name
                m = compare(ra[name], rb[name])
                assert m["max_abs"] <= tol or m["max_rel"] <= tol, (name, size, optimize, m)
                worst = max(worst, m["max_rel"])
    return worst


def io_signature(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}

    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return sig([i for i in model.graph.input if i.name not in inits]), sig(model.graph.output)
