"""Model statistics for before/after tables, `opc inspect` and benchmarks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx


def iter_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_nodes(graph: onnx.GraphProto):
    for g in iter_graphs(graph):
        yield from g.node


def _numel(dims) -> int:
    return int(np.prod(list(dims), dtype=np.int64)) if len(dims) else 1


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        itemsize = 1
    return _numel(t.dims) * itemsize


def weight_tensors(model: onnx.ModelProto):
    """Initializers and Constant-node values (in subgraphs too), as TensorProtos."""
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        yield a.t


def model_summary(model: onnx.ModelProto) -> dict:
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                  for n in iter_nodes(model.graph))
    params = 0
    weight_bytes = 0
    for t in weight_tensors(model):
        params += _numel(t.dims)
        weight_bytes += _tensor_bytes(t)
    return {
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "parameters": params,
        "weight_bytes": weight_bytes,
        "file_bytes": model.ByteSize(),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
