"""Data-dependent and small numeric kernels: Unique, the two losses, BitCast, Det, TensorScatter.

Unique's output size depends on the values (``dynamic``); everything stays on the device.
"""

from __future__ import annotations

import numpy as np

from opc.runtime.registry import kernel, np_dtype


@kernel("Unique", dynamic=True)
def _unique(node, xp):
    axis = node.a("axis")
    keep_sorted = bool(node.a("sorted", 1))

    def run(ins, outs, ws):
        x = ins[0]
        src = x.reshape(-1) if axis is None else x
        ax = 0 if axis is None else axis % x.ndim
        y, first, inverse, counts = xp.unique(src, return_index=True, return_inverse=True,
                                              return_counts=True, axis=None if axis is None else ax)
        inverse = inverse.reshape(-1)
        if not keep_sorted:  # order of first occurrence
            order = xp.argsort(first, kind="stable")
            rank = xp.empty_like(order)
            rank[order] = xp.arange(order.size, dtype=order.dtype)
            first, counts, inverse = first[order], counts[order], rank[inverse]
            y = xp.take(src, first, axis=ax)
        i64 = xp.int64
        return [xp.ascontiguousarray(y), first.astype(i64), inverse.astype(i64), counts.astype(i64)]
    return run
