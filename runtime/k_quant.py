"""Quantization kernels: QuantizeLinear/DequantizeLinear (per tensor, per axis, blocked),
DynamicQuantizeLinear, and the integer ops QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger.

Integer products are accumulated in float64 GEMMs (exact for 8- and 16-bit operands: every
partial sum stays far below 2**53), which keeps BLAS speed without an integer GEMM.
"""

from __future__ import annotations

import numpy as np

from opc.runtime import k_nn
from opc.runtime.registry import kernel, np_dtype, out_if
from opc.runtime.xp import load_host

_INT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)


def _param(xp, p, x, axis, block):
    """Scale / zero point broadcastable against ``x``."""
    if p is None:
        return None
    if p.ndim == 0 or (p.size == 1 and not block):
        return p.reshape(())
    axis %= x.ndim
    if block:
        p = xp.repeat(p, block, axis=axis)
        return p[(slice(None),) * axis + (slice(0, x.shape[axis]),)]
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def _saturate(xp, v, dtype):
    info = np.iinfo(dtype)
    return xp.clip(xp.rint(v), info.min, info.max).astype(dtype)


@kernel("QuantizeLinear")
def _quantize(node, xp):
    axis, block = node.a("axis", 1), node.a("block_size", 0)
    out_dt = node.a("output_dtype", 0)

    def run(ins, outs, ws):
        x, scale = ins[0], ins[1]
        zp = ins[2] if len(ins) > 2 else None
        dtype = zp.dtype if zp is not None else (np_dtype(out_dt) if out_dt else np.dtype(np.uint8))
        if dtype.type not in _INT_TYPES:
            node.fail(f"quantizing to {dtype} is not supported")
        s = _param(xp, scale, x, axis, block)
        v = x.astype(xp.float32 if x.dtype != np.float64 else xp.float64) / s
        if zp is not None:
            v = xp.rint(v) + _param(xp, zp, x, axis, block).astype(v.dtype)
        return _saturate(xp, v, dtype)
    return run


@kernel("DequantizeLinear")
def _dequantize(node, xp):
    axis, block = node.a("axis", 1), node.a("block_size", 0)
    out_dt = node.a("output_dtype", 0)

    def run(ins, outs, ws):
        x, scale = ins[0], ins[1]
        zp = ins[2] if len(ins) > 2 else None
        if x.dtype.type not in _INT_TYPES:
            node.fail(f"dequantizing {x.dtype} is not supported")
        s = _param(xp, scale, x, axis, block)
        v = x.astype(xp.float32 if x.dtype != np.int32 else xp.float64)
        if zp is not None:
            v = v - _param(xp, zp, x, axis, block).astype(v.dtype)
        y = v * s
        return y.astype(np_dtype(out_dt) if out_dt else scale.dtype, copy=False)
    return run


FAKE_QUANT_OP = "QuantizeDequantize"
FAKE_QUANT_TYPES = (np.int8, np.uint8, np.int16, np.uint16)  # bounds exact in float32


def fake_quant(node, xp, scale, zp, dtype, fallback):
    """One float step for QuantizeLinear -> DequantizeLinear with the same constant ``scale``
    (float32, > 0) and zero point ``zp`` (None: 0) into integer ``dtype``, bit-identical to the
    two kernels: ``(clip(rint(x / s) + zp, lo, hi) - zp) * s`` computed as
    ``clip(rint(x / s), lo - zp, hi - zp) * s + 0``, in place in the output buffer. The shifted
    bounds are exact (integers in float32), and ``rint(x / s) + zp`` only loses exactness far past
    the bounds, where both forms saturate; the final ``+ 0`` turns rint's -0.0 into the +0.0
    that ``q - zp`` gives. A float32 input only: any other (float16, bfloat16, float64) runs
    ``fallback`` (the two kernels, as unfused). NaN is the one input where the results differ:
    the two-step path casts NaN to an integer (undefined; NumPy gives a platform value), the
    fused step keeps NaN."""
    info = np.iinfo(dtype)
    axis = node.a("axis", 1)
    zpf = np.zeros((), np.float32) if zp is None else load_host(zp).astype(np.float32)
    lo_h, hi_h = np.float32(info.min) - zpf, np.float32(info.max) - zpf
    per_tensor = scale.size == 1
    if per_tensor:
        lo, hi = float(lo_h.reshape(-1)[0]), float(hi_h.reshape(-1)[0])  # exact: small integers
        s0 = scale.reshape(())
    else:
        lo, hi = xp.asarray(lo_h.reshape(scale.shape)), xp.asarray(hi_h.reshape(scale.shape))
    shaped = {}

    def run(ins, outs, ws):
        x = ins[0]
        if x.dtype != np.float32:
            return fallback(ins)
        if per_tensor:
            s, a, b = s0, lo, hi
        else:
            got = shaped.get(x.ndim)
            if got is None:
                got = shaped[x.ndim] = tuple(_param(xp, v, x, axis, 0) for v in (scale, lo, hi))
            s, a, b = got
        o = out_if(outs, 0, x.shape, x.dtype)
        o = xp.divide(x, s, out=o)
        xp.rint(o, out=o)
        xp.clip(o, a, b, out=o)
        xp.multiply(o, s, out=o)
        xp.add(o, 0.0, out=o)
        return o
    return run



@kernel("DynamicQuantizeLinear")
def _dyn_quant(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        lo = min(float(xp.min(x)), 0.0) if x.size else 0.0
        hi = max(float(xp.max(x)), 0.0) if x.size else 0.0
        scale = np.float32((hi - lo) / 255.0) if hi != lo else np.float32(1.0)
        zp = np.uint8(np.clip(np.rint(0 - lo / scale), 0, 255))
        y = xp.clip(xp.rint(x / scale) + float(zp), 0, 255).astype(xp.uint8)
        return [y, xp.asarray(np.array(scale, np.float32)), xp.asarray(np.array(zp, np.uint8))]
    return run


def _centered(xp, a, zp, per_row_axis=None):
    v = a.astype(xp.float64)
    if zp is not None:
        z = zp.astype(xp.float64)
        if z.ndim == 1 and z.size > 1 and per_row_axis is not None:
            shape = [1] * a.ndim
            shape[per_row_axis % a.ndim] = -1
            z = z.reshape(shape)
        v = v - z
    return v


@kernel("MatMulInteger")
def _matmul_integer(node, xp):
    def run(ins, outs, ws):
        a, b = ins[0], ins[1]
        azp = ins[2] if len(ins) > 2 else None
        bzp = ins[3] if len(ins) > 3 else None
        av = _centered(xp, a, azp, per_row_axis=-2)
        bv = _centered(xp, b, bzp)  # per-column zero points broadcast on the last axis
        return xp.matmul(av, bv).astype(xp.int32)
    return run


@kernel("QLinearMatMul")
def _qlinear_matmul(node, xp):
    def run(ins, outs, ws):
        a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = ins
        av = _centered(xp, a, a_zp, per_row_axis=-2)
        bv = _centered(xp, b, b_zp)
        acc = xp.matmul(av, bv)
        sa = a_s.astype(xp.float64)
        if sa.ndim == 1 and sa.size > 1:
            sa = sa.reshape(-1, 1)
        scale = sa * b_s.astype(xp.float64) / y_s.astype(xp.float64)
        return _saturate(xp, acc * scale + y_zp.astype(xp.float64), y_zp.dtype)
    return run


def _conv_float64(node, xp):
    conv = k_nn._conv(node, xp)
    return lambda x, w: conv([x, w], None, None)


@kernel("ConvInteger")
def _conv_integer(node, xp):
    conv = _conv_float64(node, xp)

    def run(ins, outs, ws):
        x, w = ins[0], ins[1]
        xzp = ins[2] if len(ins) > 2 else None
        wzp = ins[3] if len(ins) > 3 else None
        xv = _centered(xp, x, xzp, per_row_axis=None)
        wv = _centered(xp, w, wzp, per_row_axis=0)
        return xp.rint(conv(xv, wv)).astype(xp.int32)
    return run


@kernel("QLinearConv")
def _qlinear_conv(node, xp):
    conv = _conv_float64(node, xp)

    def run(ins, outs, ws):
        x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = ins[:8]
        bias = ins[8] if len(ins) > 8 else None
        xv = _centered(xp, x, x_zp)
        wv = _centered(xp, w, w_zp, per_row_axis=0)
        acc = conv(xv, wv)
        bshape = (1, -1) + (1,) * (x.ndim - 2)
        if bias is not None:
            acc += bias.astype(xp.float64).reshape(bshape)
        ws_ = w_s.astype(xp.float64)
        ws_ = ws_.reshape(bshape) if ws_.ndim == 1 and ws_.size > 1 else ws_.reshape(())
        scale = x_s.astype(xp.float64).reshape(()) * ws_ / y_s.astype(xp.float64).reshape(())
        return _saturate(xp, acc * scale + y_zp.astype(xp.float64).reshape(()), y_zp.dtype)
    return run
