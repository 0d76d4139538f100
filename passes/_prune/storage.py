"""Sparse storage of pruned weights in plain ONNX ops.

A weight with few nonzeros is stored as its nonzero values plus their flat int32
positions and rebuilt by ``Reshape(ScatterElements(ConstantOfShape([size]), idx, vals))``.
Every input is constant, so ONNX Runtime folds the rebuild away when it loads the model
(no cost per run) while the file keeps only 8 bytes per nonzero instead of 4 per
weight: it pays off above 50% sparsity, and it is applied from 60%.

(ONNX's own SparseTensorProto initializers are not used: onnx-graphsurgeon, which every
pass works on, drops them.)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from opc.passes._prune.layers import Layer

MIN_SPARSITY = 0.6


def to_sparse_constant(graph: gs.Graph, layer: Layer) -> int:
    """Rewrite one layer's weight into the sparse form; 1 if it was rewritten."""
    w = layer.weight.values
    if w.size < 64 or w.size >= 2**31 or w.dtype.kind != "f":
        return 0
    flat = w.ravel()
    idx = np.flatnonzero(flat)
    if idx.size > (1.0 - MIN_SPARSITY) * w.size:
        return 0
    base = layer.weight.name
    size = gs.Constant(f"{base}_sparse_size", np.array([w.size], dtype=np.int64))
    positions = gs.Constant(f"{base}_sparse_idx", idx.astype(np.int32))
    values = gs.Constant(f"{base}_sparse_val", np.ascontiguousarray(flat[idx]))
    shape = gs.Constant(f"{base}_sparse_shape", np.array(w.shape, dtype=np.int64))
    zeros = gs.Variable(f"{base}_sparse_zeros", dtype=w.dtype)
    dense_flat = gs.Variable(f"{base}_sparse_flat", dtype=w.dtype)
    dense = gs.Variable(f"{base}_dense", dtype=w.dtype, shape=list(w.shape))
    fill = gs.Constant(f"{base}_sparse_fill", np.zeros(1, dtype=w.dtype))
    nodes = [
        gs.Node("ConstantOfShape", f"{base}_sparse_zeros", attrs={"value": fill}, inputs=[size], outputs=[zeros]),
        gs.Node("ScatterElements", f"{base}_sparse_scatter", attrs={"axis": 0},
                inputs=[zeros, positions, values], outputs=[dense_flat]),
        gs.Node("Reshape", f"{base}_sparse_reshape", inputs=[dense_flat, shape], outputs=[dense]),
    ]
    graph.nodes.extend(nodes)
    node = layer.node
    node.inputs[node.inputs.index(layer.weight)] = dense
    return 1
