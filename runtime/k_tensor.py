"""Shape and data-movement kernels: Reshape, Transpose, Concat, Split, Slice, Gather, Pad,
Expand, Tile, reductions, and the small shape arithmetic ops.

Values that decide a shape (Reshape's shape, Slice's starts...) are read on the host.
"""

from __future__ import annotations

import math
import numpy as np

from opc.runtime.registry import const_input, kernel, np_dtype, out_if
from opc.runtime.xp import host_ints, is_numpy, to_host


def _axes_arg(node, ins, idx=1, attr="axes"):
    if node.opset >= 13 and len(ins) > idx and ins[idx] is not None:
        return host_ints(ins[idx])
    if len(ins) > idx and ins[idx] is not None and attr == "axes" and node.op_type.startswith("Reduce") \
            and node.opset >= 18:
        return host_ints(ins[idx])
    a = node.a(attr)
    return list(a) if a is not None else None


@kernel("Identity", alias=True)
def _identity(node, xp):
    return lambda ins, outs, ws: ins[0]


@kernel("Dropout", alias=True)
def _dropout(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        res = [x]
        if len(node.outputs) > 1 and node.outputs[1]:
            res.append(xp.ones(x.shape, dtype=bool))
        return res
    return run


@kernel("Reshape", alias=True)
def _reshape(node, xp):
    allowzero = node.a("allowzero", 0)

    def run(ins, outs, ws):
        x = ins[0]
        shape = host_ints(ins[1]) if len(ins) > 1 else list(node.a("shape"))
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    return run


@kernel("Flatten", alias=True)
def _flatten(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        axis = node.a("axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(math.prod(x.shape[:axis])), -1) if x.size else \
            x.reshape(int(math.prod(x.shape[:axis])), int(math.prod(x.shape[axis:])))
    return run


@kernel("Squeeze", alias=True)
def _squeeze(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        axes = _axes_arg(node, ins)
        if axes is None:
            return x.reshape([d for d in x.shape if d != 1])
        axes = {a % x.ndim for a in axes}
        return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])
    return run


@kernel("Unsqueeze", alias=True)
def _unsqueeze(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        axes = _axes_arg(node, ins)
        r = x.ndim + len(axes)
        axes = sorted(a % r for a in axes)
        shape = list(x.shape)
        for a in axes:
            shape.insert(a, 1)
        return x.reshape(shape)
    return run


@kernel("Transpose")
def _transpose(node, xp):
    perm0 = node.a("perm")

    def run(ins, outs, ws):
        x = ins[0]
        perm = list(perm0) if perm0 is not None else list(range(x.ndim))[::-1]
        shape = tuple(x.shape[p] for p in perm)
        o = out_if(outs, 0, shape, x.dtype)
        if o is None:
            return xp.ascontiguousarray(x.transpose(perm))
        o[...] = x.transpose(perm)
        return o
    return run


@kernel("Concat")
def _concat(node, xp):
    axis0 = node.a("axis")

    def run(ins, outs, ws):
        xs = [x for x in ins if x is not None]
        axis = axis0 % xs[0].ndim
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        o = out_if(outs, 0, shape, xs[0].dtype)
        if o is None or any(x.dtype != o.dtype for x in xs):
            return xp.concatenate(xs, axis=axis)
        pos = 0
        for x in xs:
            o[(slice(None),) * axis + (slice(pos, pos + x.shape[axis]),)] = x
            pos += x.shape[axis]
        return o
    return run


@kernel("Split")
def _split(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        axis = node.a("axis", 0) % x.ndim
        n = len(node.outputs)
        if len(ins) > 1 and ins[1] is not None:
            sizes = host_ints(ins[1])
        elif node.a("split") is not None:
            sizes = list(node.a("split"))
        else:
            num = node.a("num_outputs", n)
            chunk = -(-x.shape[axis] // num)
            sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
        res, pos = [], 0
        for s in sizes:
            res.append(xp.ascontiguousarray(x[(slice(None),) * axis + (slice(pos, pos + s),)]))
            pos += s
        return res
    return run


@kernel("Slice")
def _slice(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        if node.opset < 10:
            starts, ends = list(node.a("starts")), list(node.a("ends"))
            axes = list(node.a("axes") or range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts, ends = host_ints(ins[1]), host_ints(ins[2])
            axes = host_ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
            steps = host_ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        sl = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            a %= x.ndim
            dim = x.shape[a]
            # clamp like ONNX (also keeps int64 sentinels away from Python slicing corner cases)
            if st > 0:
                s = min(max(s + dim if s < 0 else s, 0), dim)
                e = min(max(e + dim if e < 0 else e, 0), dim)
            else:
                s = min(max(s + dim if s < 0 else s, -1), dim - 1)
                e = min(max(e + dim if e < 0 else e, -1), dim - 1)
                e = None if e < 0 else e
            sl[a] = slice(s, e, st)
        return xp.ascontiguousarray(x[tuple(sl)])
    return run


@kernel("Gather")
def _gather(node, xp):
    axis0 = node.a("axis", 0)
    cache = {}

    def run(ins, outs, ws):
        x, idx = ins
        axis = axis0 % x.ndim
        n = x.shape[axis]
        hit = cache.get("i")
        if hit is not None and hit[0] is idx and hit[1] == n:
            # constant indices, wrapped and checked once: take into the arena view unbuffered
            shape = x.shape[:axis] + hit[2].shape + x.shape[axis + 1:]
            o = out_if(outs, 0, shape, x.dtype)
            if o is not None:
                return xp.take(x, hit[2], axis=axis, out=o, mode="clip")
            return xp.take(x, hit[2], axis=axis)
        i = idx.astype(xp.int64, copy=False)
        i = xp.where(i < 0, i + n, i)
        if const_input(node, 1) and is_numpy(xp) and (i.size == 0 or (0 <= int(i.min()) and int(i.max()) < n)):
            cache["i"] = (idx, n, i)
        return xp.take(x, i, axis=axis)
    return run


@kernel("GatherElements")
def _gather_el(node, xp):
    def run(ins, outs, ws):
        x, idx = ins
        axis = node.a("axis", 0) % x.ndim
        idx = xp.where(idx < 0, idx + x.shape[axis], idx)
        return xp.take_along_axis(x, idx.astype(xp.int64), axis=axis)
    return run


@kernel("GatherND")
def _gather_nd(node, xp):
    def run(ins, outs, ws):
        x, idx = ins
        b = node.a("batch_dims", 0)
        idx = to_host(idx).astype(np.int64)
        k = idx.shape[-1]
        bshape = x.shape[:b]
        xb = x.reshape((int(math.prod(bshape)),) + x.shape[b:])
        ib = idx.reshape((int(math.prod(bshape)), -1, k))
        res = []
        for i in range(xb.shape[0]):
            cols = tuple(ib[i, :, j] for j in range(k))
            res.append(xb[i][cols])
        out = xp.stack(res) if res else xp.empty((0,), dtype=x.dtype)
        return out.reshape(idx.shape[:-1] + x.shape[b + k:])
    return run


def _scatter_reduce(xp, data, idx, upd, red):
    if red == "none":
        data[idx] = upd
    elif red == "add":
        xp.add.at(data, idx, upd)
    elif red == "mul":
        try:
            xp.multiply.at(data, idx, upd)
        except NotImplementedError:
            # CuPy scatters only add/subtract/maximum/minimum (cupy.multiply.at raises): on the host
            h = to_host(data).copy()
            np.multiply.at(h, tuple(to_host(i) for i in idx), to_host(upd))
            xp.copyto(data, xp.asarray(h))
    elif red == "max":
        xp.maximum.at(data, idx, upd)
    elif red == "min":
        xp.minimum.at(data, idx, upd)


@kernel("ScatterElements", "Scatter")
def _scatter_el(node, xp):
    red = node.a("reduction", "none")

    def run(ins, outs, ws):
        x, idx, upd = ins
        axis = node.a("axis", 0) % x.ndim
        y = x.copy()
        idx = xp.where(idx < 0, idx + x.shape[axis], idx).astype(xp.int64)
        # the open grids of np.indices(..., sparse=True), built by hand: cupy.indices has no sparse=
        nd = idx.ndim
        full = [xp.broadcast_to(xp.arange(n).reshape((1,) * k + (n,) + (1,) * (nd - k - 1)), idx.shape)
                for k, n in enumerate(idx.shape)]
        full[axis] = idx
        _scatter_reduce(xp, y, tuple(full), upd, red)
        return y
    return run


@kernel("ScatterND")
def _scatter_nd(node, xp):
    red = node.a("reduction", "none")

    def run(ins, outs, ws):
        x, idx, upd = ins
        y = x.copy()
        idx = to_host(idx).astype(np.int64)
        k = idx.shape[-1]
        flat = idx.reshape(-1, k)
        u = upd.reshape((flat.shape[0],) + x.shape[k:])
        for i in range(flat.shape[0]):
            key = tuple(int(v) for v in flat[i])
            if red == "none":
                y[key] = u[i]
            elif red == "add":
                y[key] += u[i]
            elif red == "mul":
                y[key] *= u[i]
            elif red == "max":
                y[key] = xp.maximum(y[key], u[i])
            elif red == "min":
                y[key] = xp.minimum(y[key], u[i])
        return y
    return run


@kernel("Pad")
def _pad(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        mode = node.a("mode", "constant")
        if node.opset < 11:
            pads, value, axes = list(node.a("pads")), node.a("value", 0.0), None
        else:
            pads = host_ints(ins[1])
            value = to_host(ins[2]).reshape(-1)[0] if len(ins) > 2 and ins[2] is not None and ins[2].size else 0
            axes = host_ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        axes = [a % x.ndim for a in axes] if axes is not None else list(range(x.ndim))
        n = len(axes)
        width = [(0, 0)] * x.ndim
        for i, a in enumerate(axes):
            width[a] = (pads[i], pads[i + n])
        # negative pads crop
        crop = tuple(slice(-b if b < 0 else 0, x.shape[d] + e if e < 0 else None) for d, (b, e) in enumerate(width))
        x = x[crop]
        width = [(max(b, 0), max(e, 0)) for b, e in width]
        if mode == "constant":
            return xp.pad(x, width, mode="constant", constant_values=value)
        return xp.pad(x, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])
    return run


@kernel("Expand")
def _expand(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        shape = np.broadcast_shapes(x.shape, tuple(host_ints(ins[1])))
        o = out_if(outs, 0, shape, x.dtype)
        if o is None:
            return xp.ascontiguousarray(xp.broadcast_to(x, shape))
        o[...] = x
        return o
    return run


@kernel("Tile")
def _tile(node, xp):
    return lambda ins, outs, ws: xp.tile(ins[0], host_ints(ins[1]))


@kernel("Shape")
def _shape(node, xp):
    def run(ins, outs, ws):
        shape = list(ins[0].shape)
        r = len(shape)
        start = node.a("start", 0)
        end = node.a("end", r)
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        return xp.asarray(np.array(shape[start:end], dtype=np.int64))
    return run


@kernel("Size")
def _size(node, xp):
    return lambda ins, outs, ws: xp.asarray(np.array(ins[0].size, dtype=np.int64))


@kernel("ConstantOfShape", dynamic=True)
def _cos(node, xp):
    value = node.a("value")
    v = np.zeros(1, np.float32) if value is None else value.reshape(-1)

    def run(ins, outs, ws):
        shape = host_ints(ins[0])
        return xp.full(shape, v[0], dtype=v.dtype)
    return run


@kernel("Constant")
def _constant(node, xp):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            v = node.attrs[key]
            dtype = np.float32 if "float" in key else np.int64 if "int" in key else None
            arr = np.asarray(v, dtype=dtype)
            break
    else:
        node.fail("only tensor/float/int Constant values are supported")
    const = xp.asarray(arr)
    return lambda ins, outs, ws: const


@kernel("Range", dynamic=True)
def _range(node, xp):
    def run(ins, outs, ws):
        s, l, d = (to_host(i).reshape(()) for i in ins)
        return xp.asarray(np.arange(s, l, d).astype(ins[0].dtype))
    return run


_REDUCE = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min",
           "ReduceProd": "prod"}


@kernel(*_REDUCE, "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
def _reduce(node, xp):
    op = node.op_type
    keep = bool(node.a("keepdims", 1))
    noop_empty = bool(node.a("noop_with_empty_axes", 0))
    from_input = (op == "ReduceSum" and node.opset >= 13) or node.opset >= 18
    sumlike = op in ("ReduceSum", "ReduceMean")
    cols = {}

    def run(ins, outs, ws):
        x = ins[0]
        if from_input:
            axes = host_ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        else:
            axes = list(node.a("axes")) if node.a("axes") is not None else None
        if not axes:
            if noop_empty and axes is not None or (noop_empty and from_input):
                return x.copy()
            axes = None
        ax = tuple(a % x.ndim for a in axes) if axes is not None else None
        if sumlike and ax and x.dtype.kind == "f" and x.dtype.itemsize >= 4 and x.flags.c_contiguous \
                and sorted(ax) == list(range(x.ndim - len(ax), x.ndim)) and len(ax) < x.ndim:
            # trailing axes: one GEMV with a column of ones (1/n for the mean); NumPy's keepdims
            # reductions over many short rows cost ~10x more (mobilenetv2's global pool)
            n = math.prod(x.shape[x.ndim - len(ax):])
            if n > 1:
                col = cols.get((n, x.dtype))
                if col is None:
                    col = cols[(n, x.dtype)] = xp.full((n, 1), 1.0 / n if op == "ReduceMean" else 1.0, dtype=x.dtype)
                lead = x.shape[:x.ndim - len(ax)]
                shape = lead + (1,) * len(ax) if keep else lead
                o = out_if(outs, 0, shape, x.dtype)
                o = o if o is not None and o.flags.c_contiguous else None
                y = xp.matmul(x.reshape(-1, n), col, out=None if o is None else o.reshape(-1, 1))
                return o if o is not None else y.reshape(shape)
        if op in _REDUCE:
            if op in ("ReduceMax", "ReduceMin") and x.size == 0:
                shape = [1 if (ax is None or i in ax) else d for i, d in enumerate(x.shape)]
                fill = -np.inf if op == "ReduceMax" else np.inf
                if x.dtype == np.bool_:
                    fill = op == "ReduceMin"
                elif x.dtype.kind != "f":
                    fill = np.iinfo(x.dtype).min if op == "ReduceMax" else np.iinfo(x.dtype).max
                y = xp.full(shape, fill, dtype=x.dtype)
                return y if keep else y.reshape([d for i, d in enumerate(shape) if not (ax is None or i in ax)])
            return getattr(xp, _REDUCE[op])(x, axis=ax, keepdims=keep).astype(x.dtype, copy=False)
        if op == "ReduceL1":
            y = xp.sum(xp.absolute(x), axis=ax, keepdims=keep)
        elif op == "ReduceL2":
            y = xp.sqrt(xp.sum(x * x, axis=ax, keepdims=keep))
        elif op == "ReduceSumSquare":
            y = xp.sum(x * x, axis=ax, keepdims=keep)
        elif op == "ReduceLogSum":
            y = xp.log(xp.sum(x, axis=ax, keepdims=keep))
        elif x.size == 0:
            y = xp.log(xp.sum(xp.exp(x), axis=ax, keepdims=keep))
        else:
            m = xp.max(x, axis=ax, keepdims=True)
            m = xp.where(xp.isfinite(m), m, 0)
            y = xp.log(xp.sum(xp.exp(x - m), axis=ax, keepdims=True)) + m
            if not keep:
                y = y.reshape([d for i, d in enumerate(x.shape) if not (ax is None or i in ax)])
        return y.astype(x.dtype, copy=False)
    return run


@kernel("ArgMax", "ArgMin")
def _argmax(node, xp):
    is_max = node.op_type == "ArgMax"

    def run(ins, outs, ws):
        x = ins[0]
        axis = node.a("axis", 0) % x.ndim
        keep = node.a("keepdims", 1)
        if node.a("select_last_index", 0):
            xr = xp.flip(x, axis=axis)
            i = (xp.argmax if is_max else xp.argmin)(xr, axis=axis)
            i = x.shape[axis] - 1 - i
        else:
            i = (xp.argmax if is_max else xp.argmin)(x, axis=axis)
        i = i.astype(xp.int64)
        return xp.expand_dims(i, axis) if keep else i
    return run


@kernel("TopK")
def _topk(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        k = host_ints(ins[1])[0] if node.opset >= 10 else node.a("k")
        axis = node.a("axis", -1) % x.ndim
        largest = node.a("largest", 1)
        # stable sort on (-x) keeps the lower index first among equal values, as ONNX requires
        if largest:  # descending, ties by lower index: sort the reversed array ascending, reverse back
            n = x.shape[axis]
            idx = xp.argsort(xp.flip(x, axis=axis), axis=axis, kind="stable")
            idx = xp.flip(n - 1 - idx, axis=axis)
        else:
            idx = xp.argsort(x, axis=axis, kind="stable")
        idx = xp.take(idx, xp.arange(k), axis=axis)
        return [xp.take_along_axis(x, idx, axis=axis), idx.astype(xp.int64)]
    return run


@kernel("NonZero", dynamic=True)
def _nonzero(node, xp):
    return lambda ins, outs, ws: xp.stack(xp.nonzero(ins[0])).astype(xp.int64).reshape(ins[0].ndim, -1) \
        if ins[0].ndim else xp.zeros((0, int(bool(to_host(ins[0])))), dtype=xp.int64)


@kernel("OneHot")
def _onehot(node, xp):
    def run(ins, outs, ws):
        idx, depth, values = ins
        d = int(to_host(depth).reshape(-1)[0])
        axis = node.a("axis", -1)
        idx = idx.astype(xp.int64)
        idx = xp.where(idx < 0, idx + d, idx)
        eye = xp.expand_dims(idx, -1) == xp.arange(d)
        y = xp.where(eye, values[1], values[0])
        r = y.ndim
        axis = axis % r
        return xp.moveaxis(y, -1, axis).astype(values.dtype)
    return run


@kernel("CumSum")
def _cumsum(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        axis = host_ints(ins[1])[0] % x.ndim
        rev, excl = node.a("reverse", 0), node.a("exclusive", 0)
        y = xp.flip(x, axis=axis) if rev else x
        c = xp.cumsum(y, axis=axis).astype(x.dtype)
        if excl:
            c = c - y
        return xp.ascontiguousarray(xp.flip(c, axis=axis) if rev else c)
    return run


@kernel("Trilu")
def _trilu(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        k = host_ints(ins[1])[0] if len(ins) > 1 and ins[1] is not None else 0
        return xp.triu(x, k) if node.a("upper", 1) else xp.tril(x, k)
    return run


@kernel("DepthToSpace")
def _d2s(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        b = node.a("blocksize")
        N, C, H, W = x.shape
        if node.a("mode", "DCR") == "DCR":
            y = x.reshape(N, b, b, C // (b * b), H, W).transpose(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(N, C // (b * b), b, b, H, W).transpose(0, 1, 4, 2, 5, 3)
        return xp.ascontiguousarray(y).reshape(N, C // (b * b), H * b, W * b)
    return run


@kernel("SpaceToDepth")
def _s2d(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        b = node.a("blocksize")
        N, C, H, W = x.shape
        y = x.reshape(N, C, H // b, b, W // b, b)
        y = y.transpose(0, 1, 3, 5, 2, 4) if node.a("mode", "DCR") == "CRD" else y.transpose(0, 3, 5, 1, 2, 4)
        return xp.ascontiguousarray(y).reshape(N, C * b * b, H // b, W // b)
    return run


@kernel("EyeLike")
def _eyelike(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        dt = np_dtype(node.a("dtype")) if node.a("dtype") is not None else x.dtype
        return xp.eye(x.shape[0], x.shape[1], k=node.a("k", 0), dtype=dt)
    return run


@kernel("Compress", dynamic=True)
def _compress(node, xp):
    def run(ins, outs, ws):
        x, cond = ins
        axis = node.a("axis")
        c = xp.nonzero(cond)[0]
        if axis is None:
            return xp.take(x.reshape(-1), c)
        return xp.take(x, c, axis=axis % x.ndim)
    return run


@kernel("Einsum")
def _einsum(node, xp):
    eq = node.a("equation").replace(" ", "")
    return lambda ins, outs, ws: xp.einsum(eq, *ins)


@kernel("CumProd")
def _cumprod(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        axis = host_ints(ins[1])[0] % x.ndim
        rev, excl = node.a("reverse", 0), node.a("exclusive", 0)
        y = xp.flip(x, axis=axis) if rev else x
        if excl:
            ones = xp.ones_like(xp.take(y, xp.arange(1), axis=axis))
            y = xp.concatenate([ones, xp.take(y, xp.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
        c = xp.cumprod(y, axis=axis).astype(x.dtype)
        return xp.ascontiguousarray(xp.flip(c, axis=axis) if rev else c)
    return run


@kernel("ReverseSequence")
def _revseq(node, xp):
    def run(ins, outs, ws):
        x, lens = ins
        b_ax, t_ax = node.a("batch_axis", 1), node.a("time_axis", 0)
        y = x.copy()
        for b, n in enumerate(host_ints(lens)):
            src = [slice(None)] * x.ndim
            src[b_ax] = b
            src[t_ax] = slice(n - 1, None, -1) if n > 0 else slice(0, 0)
            dst = [slice(None)] * x.ndim
            dst[b_ax] = b
            dst[t_ax] = slice(0, n)
            y[tuple(dst)] = x[tuple(src)]
        return y
    return run
