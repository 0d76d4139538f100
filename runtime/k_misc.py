"""Data-dependent and small numeric kernels: Unique, NegativeLogLikelihoodLoss,
SoftmaxCrossEntropyLoss, BitCast, Det, TensorScatter, CenterCropPad, ImageDecoder (Pillow, on
the host; a load-time error names the node when Pillow is missing).

Unique's output size depends on the values (``dynamic``) and it stays on the device; an
ignored loss target may lie outside [0, C), so targets are clipped before the gather and
their terms zeroed.
"""

from __future__ import annotations

import io

import numpy as np

from opc.runtime.registry import kernel, np_dtype
from opc.runtime.xp import host_ints, to_host


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


def _nll(xp, logp, target, weight, ignore, reduction, node):
    """Negative log-likelihood of ``logp`` (N, C, ...) at ``target`` (N, ...)."""
    n, c = logp.shape[:2]
    lp = logp.reshape(n, c, -1)
    t = target.reshape(n, -1).astype(xp.int64)
    safe = xp.clip(t, 0, c - 1)  # an ignored target may lie outside [0, C)
    picked = xp.take_along_axis(lp, safe[:, None, :], axis=1)[:, 0, :]
    w = weight[safe].astype(logp.dtype) if weight is not None else xp.ones(t.shape, dtype=logp.dtype)
    if ignore is not None:
        keep = t != ignore
        w = xp.where(keep, w, 0).astype(logp.dtype)
        picked = xp.where(keep, picked, 0).astype(logp.dtype)
    loss = -picked * w
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum().astype(logp.dtype)
    if reduction == "mean":
        return (loss.sum() / w.sum()).astype(logp.dtype)
    node.fail(f"reduction '{reduction}' is not none/sum/mean")


@kernel("NegativeLogLikelihoodLoss")
def _nll_loss(node, xp):
    ignore, reduction = node.a("ignore_index"), node.a("reduction", "mean")

    def run(ins, outs, ws):
        weight = ins[2] if len(ins) > 2 else None
        return _nll(xp, ins[0], ins[1], weight, ignore, reduction, node)
    return run


@kernel("SoftmaxCrossEntropyLoss")
def _sce_loss(node, xp):
    ignore, reduction = node.a("ignore_index"), node.a("reduction", "mean")

    def run(ins, outs, ws):
        x, target = ins[:2]
        weight = ins[2] if len(ins) > 2 else None
        shifted = x - x.max(axis=1, keepdims=True)
        logp = (shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))).astype(x.dtype)
        loss = _nll(xp, logp, target, weight, ignore, reduction, node)
        return [loss, logp] if len(node.outputs) > 1 else loss
    return run


@kernel("BitCast")
def _bitcast(node, xp):
    to = np_dtype(node.a("to"))

    def run(ins, outs, ws):
        x = ins[0]
        if x.dtype.itemsize != to.itemsize:
            node.fail(f"{x.dtype} and {to} differ in width")
        return x.copy().view(to)  # a copy is C-contiguous (0-d stays 0-d)
    return run


@kernel("Det")
def _det(node, xp):
    return lambda ins, outs, ws: xp.asarray(xp.linalg.det(ins[0])).astype(ins[0].dtype)


@kernel("TensorScatter")
def _tensor_scatter(node, xp):
    circular = node.a("mode", "linear") == "circular"
    axis0 = node.a("axis", -2)

    def run(ins, outs, ws):
        cache, update = ins[:2]
        b = cache.shape[0]
        axis = axis0 % cache.ndim
        if axis == 0:
            node.fail("axis must not be the batch axis")
        start = ins[2].astype(xp.int64) if len(ins) > 2 and ins[2] is not None else xp.zeros(b, dtype=xp.int64)
        pos = start.reshape(b, 1) + xp.arange(update.shape[axis], dtype=xp.int64).reshape(1, -1)
        if circular:
            pos = pos % cache.shape[axis]
        res = cache.copy()
        moved = xp.moveaxis(res, axis, 1)  # a view: (B, max_len, ...)
        moved[xp.arange(b).reshape(b, 1), pos] = xp.moveaxis(update, axis, 1)
        return res
    return run


@kernel("CenterCropPad", dynamic=True)
def _center_crop_pad(node, xp):
    axes0 = node.a("axes")

    def run(ins, outs, ws):
        x = ins[0]
        shape = host_ints(ins[1])
        axes = list(range(x.ndim)) if axes0 is None else [a % x.ndim for a in axes0]
        out_shape = list(x.shape)
        src, dst = [slice(None)] * x.ndim, [slice(None)] * x.ndim
        for a, want in zip(axes, shape):
            have = x.shape[a]
            out_shape[a] = want
            lo = abs(have - want) // 2  # an odd difference puts the extra element at the end
            if want < have:
                src[a] = slice(lo, lo + want)
            elif want > have:
                dst[a] = slice(lo, lo + have)
        res = xp.zeros(out_shape, dtype=x.dtype)
        res[tuple(dst)] = x[tuple(src)]
        return res
    return run


@kernel("ImageDecoder", dynamic=True)
def _image_decoder(node, xp):
    fmt = node.a("pixel_format", "RGB")
    if fmt not in ("RGB", "BGR", "Grayscale"):
        node.fail(f"pixel_format '{fmt}' is not RGB/BGR/Grayscale")
    try:
        import PIL.Image
    except ImportError:
        node.fail("decoding images needs Pillow (pip install pillow)")

    def run(ins, outs, ws):
        img = PIL.Image.open(io.BytesIO(to_host(ins[0]).tobytes()))  # a host codec: the bytes go to the CPU
        if fmt == "Grayscale":
            pixels = np.asarray(img.convert("L"))[:, :, None]
        else:
            pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
            if fmt == "BGR":
                pixels = pixels[:, :, ::-1]
        return xp.asarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    return run
