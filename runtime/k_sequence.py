"""Sequence and Optional ops. A sequence is a ``values.Sequence`` (a Python list of arrays), an
empty optional is None (``runtime/values.py``); neither ever enters the arena.

Every kernel here is ``dynamic``: what it returns depends on values, not only on shapes, so
its outputs are not planned and a signature running one is not captured as a CUDA graph.
A tensor placed into a sequence is copied: it may be a view into the arena, whose memory a
later step reuses (and a fed sequence never holds the caller's arrays). Positions and split
sizes are read on the host (``host_ints``): on CuPy that waits for the device when they are
computed in the run (constants have host copies). SequenceMap runs its body once per element.
"""

from __future__ import annotations

import numpy as np

from opc.runtime.registry import kernel
from opc.runtime.values import Sequence
from opc.runtime.xp import host_ints


def _position(node, seq, pos, insert=False) -> int:
    """A position in ``seq`` (negative counts from the back); an insert may also name the end."""
    n = len(seq)
    p = host_ints(pos)[0]
    hi = n if insert else n - 1
    if not -n <= p <= hi:
        node.fail(f"position {p} is out of range for a sequence of {n} tensors")
    return p + n if p < 0 else p


def _own(x):
    """A copy that owns its memory (the input may be an arena view; a sequence outlives it)."""
    return x.copy() if x is not None and not isinstance(x, list) and hasattr(x, "copy") else x


def _seq(node, v) -> Sequence:
    if not isinstance(v, list):
        node.fail(f"expected a sequence, got {type(v).__name__}")
    return v


@kernel("SequenceEmpty", dynamic=True)
def _sequence_empty(node, xp):
    return lambda ins, outs, ws: [Sequence()]


@kernel("SequenceConstruct", dynamic=True)
def _sequence_construct(node, xp):
    def run(ins, outs, ws):
        if len({x.dtype for x in ins}) > 1:
            node.fail("the tensors of a sequence must share one element type")
        return [Sequence(_own(x) for x in ins)]
    return run


@kernel("SequenceLength", dynamic=True)
def _sequence_length(node, xp):
    return lambda ins, outs, ws: xp.asarray(np.int64(len(_seq(node, ins[0]))))


@kernel("SequenceAt", dynamic=True)
def _sequence_at(node, xp):
    def run(ins, outs, ws):
        seq = _seq(node, ins[0])
        return _own(seq[_position(node, seq, ins[1])])  # the sequence may be a graph output too
    return run


@kernel("SequenceInsert", dynamic=True)
def _sequence_insert(node, xp):
    def run(ins, outs, ws):
        seq = _seq(node, ins[0])
        x = ins[1]
        if seq and seq[0].dtype != x.dtype:
            node.fail(f"inserting a {x.dtype} tensor into a sequence of {seq[0].dtype}")
        pos = _position(node, seq, ins[2], insert=True) if len(ins) > 2 and ins[2] is not None else len(seq)
        res = Sequence(seq)
        res.insert(pos, _own(x))
        return [res]
    return run


@kernel("SequenceErase", dynamic=True)
def _sequence_erase(node, xp):
    def run(ins, outs, ws):
        seq = _seq(node, ins[0])
        if not seq:
            node.fail("cannot erase from an empty sequence")
        pos = _position(node, seq, ins[1]) if len(ins) > 1 and ins[1] is not None else len(seq) - 1
        res = Sequence(seq)
        del res[pos]
        return [res]
    return run


@kernel("SplitToSequence", dynamic=True)
def _split_to_sequence(node, xp):
    axis = node.a("axis", 0)
    keepdims = node.a("keepdims", 1)

    def run(ins, outs, ws):
        x = ins[0]
        ax = axis + x.ndim if axis < 0 else axis
        if not 0 <= ax < x.ndim:
            node.fail(f"axis {axis} is out of range for rank {x.ndim}")
        dim = x.shape[ax]
        split = ins[1] if len(ins) > 1 else None
        if split is None:
            idx = [slice(None)] * x.ndim
            res = Sequence()
            squeezed = x.shape[:ax] + x.shape[ax + 1:]
            for i in range(dim):
                idx[ax] = slice(i, i + 1)
                part = x[tuple(idx)]
                res.append(_own(part if keepdims else part.reshape(squeezed)))
            return [res]
        sizes = host_ints(split)
        if split.ndim == 0:  # chunks of one size, the last one shorter
            if sizes[0] <= 0:
                node.fail(f"split size {sizes[0]} must be positive")
            sizes = [sizes[0]] * (dim // sizes[0]) + ([dim % sizes[0]] if dim % sizes[0] else [])
        if any(s < 0 for s in sizes) or sum(sizes) != dim:
            node.fail(f"split sizes {sizes} do not add up to the axis length {dim}")
        bounds = np.cumsum([0] + sizes)
        idx = [slice(None)] * x.ndim
        res = Sequence()
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx[ax] = slice(int(a), int(b))
            res.append(_own(x[tuple(idx)]))
        return [res]
    return run


@kernel("ConcatFromSequence", dynamic=True)
def _concat_from_sequence(node, xp):
    axis = node.a("axis")
    new_axis = node.a("new_axis", 0)
    if axis is None:
        node.fail("attribute 'axis' is required")

    def run(ins, outs, ws):
        seq = _seq(node, ins[0])
        if not seq:
            node.fail("cannot concatenate an empty sequence")
        r = seq[0].ndim + (1 if new_axis else 0)
        if not -r <= axis < r:
            node.fail(f"axis {axis} is out of range for rank {r}")
        if new_axis:
            return xp.stack(list(seq), axis=axis)
        return xp.concatenate(list(seq), axis=axis)
    return run


@kernel("SequenceMap", dynamic=True)
def _sequence_map(node, xp):
    body = node.subgraphs["body"]
    n_in = len(node.inputs)
    n_out = len(node.outputs)

    def run(ins, outs, ws):
        vals = dict(zip(node.captures, ins[n_in:]))
        cap = [vals[c] for c in body.captures]
        regular = ins[:n_in]
        n = len(_seq(node, regular[0]))
        for v in regular[1:]:
            if isinstance(v, list) and len(v) != n:
                node.fail(f"the input sequences have different lengths ({n} and {len(v)})")
        res = [Sequence() for _ in range(n_out)]
        for i in range(n):
            got = body.run([v[i] if isinstance(v, list) else v for v in regular], cap)
            for k in range(n_out):
                res[k].append(_own(got[k]))
        return res
    return run


@kernel("Optional", dynamic=True)
def _optional(node, xp):
    def run(ins, outs, ws):
        return [ins[0] if ins else None]
    return run


@kernel("OptionalHasElement", dynamic=True)
def _optional_has_element(node, xp):
    return lambda ins, outs, ws: xp.asarray(np.bool_(bool(ins) and ins[0] is not None))


@kernel("OptionalGetElement", dynamic=True)
def _optional_get_element(node, xp):
    def run(ins, outs, ws):
        if not ins or ins[0] is None:
            node.fail("the optional input is empty")
        return [Sequence(ins[0]) if isinstance(ins[0], list) else _own(ins[0])]
    return run
