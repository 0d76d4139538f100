"""Signal kernels: DFT, STFT, the Hann/Hamming/Blackman windows, MelWeightMatrix.

Complex values travel as a trailing axis of 2 (real, imaginary), as in ONNX; the transforms
go through ``xp.fft``. Window and mel-matrix sizes are input values, so those ops are
``dynamic`` (their output shape depends on values).
"""

from __future__ import annotations

import math

import numpy as np

from opc.runtime.registry import kernel, np_dtype
from opc.runtime.xp import to_host


def _scalar(a, cast=int):
    return cast(to_host(a).reshape(-1)[0])


def _complex(xp, x):
    """(..., 1 or 2) real/imaginary pairs -> complex array without the last axis."""
    if x.shape[-1] == 1:
        return x[..., 0]
    return x[..., 0] + 1j * x[..., 1]


def _pairs(xp, c, dtype):
    return xp.stack([c.real, c.imag], axis=-1).astype(dtype)


@kernel("DFT", dynamic=True)
def _dft(node, xp):
    inverse = bool(node.a("inverse", 0))
    onesided = bool(node.a("onesided", 0))

    def run(ins, outs, ws):
        x = ins[0]
        if node.opset >= 20:
            axis = _scalar(ins[2]) if len(ins) > 2 and ins[2] is not None else -2
        else:
            axis = node.a("axis", 1)
        axis %= x.ndim
        if axis == x.ndim - 1:
            node.fail("axis must not be the last (real/imaginary) axis")
        n = _scalar(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        if n is None:
            n = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
        sig = _complex(xp, x)
        if inverse:
            if onesided:
                return xp.fft.irfft(sig, n=n, axis=axis)[..., None].astype(x.dtype)
            return _pairs(xp, xp.fft.ifft(sig, n=n, axis=axis), x.dtype)
        f = xp.fft.fft(sig, n=n, axis=axis)
        if onesided:
            f = xp.take(f, xp.arange(n // 2 + 1), axis=axis)
        return _pairs(xp, f, x.dtype)
    return run


@kernel("STFT", dynamic=True)
def _stft(node, xp):
    onesided = bool(node.a("onesided", 1))

    def run(ins, outs, ws):
        x, step = ins[0], _scalar(ins[1])
        window = ins[2] if len(ins) > 2 else None
        length = _scalar(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        if length is None:
            length = window.shape[0] if window is not None else x.shape[-2]
        frames = 1 + (x.shape[1] - length) // step
        idx = (xp.arange(frames) * step).reshape(-1, 1) + xp.arange(length).reshape(1, -1)
        seg = _complex(xp, x)[:, idx]  # (B, frames, length)
        if window is not None:
            seg = seg * window.reshape(1, 1, -1)
        f = xp.fft.fft(seg, n=length, axis=-1)
        if onesided:
            f = f[..., : length // 2 + 1]
        return _pairs(xp, f, x.dtype)
    return run


def _window(kind):
    def build(node, xp):
        periodic = bool(node.a("periodic", 1))
        dtype = np_dtype(node.a("output_datatype", 1))

        def run(ins, outs, ws):
            size = _scalar(ins[0])
            n = np.arange(size, dtype=np.float64)
            denom = size if periodic else size - 1
            t = 2 * math.pi * n / denom
            if kind == "hann":
                w = np.sin(t / 2) ** 2
            elif kind == "hamming":
                a = 25.0 / 46.0
                w = a - (1 - a) * np.cos(t)
            else:
                w = 0.42 - 0.5 * np.cos(t) + 0.08 * np.cos(2 * t)
            return xp.asarray(w.astype(dtype))
        return run
    return build


kernel("HannWindow", dynamic=True)(_window("hann"))
kernel("HammingWindow", dynamic=True)(_window("hamming"))
kernel("BlackmanWindow", dynamic=True)(_window("blackman"))


@kernel("MelWeightMatrix", dynamic=True)
def _mel(node, xp):
    dtype = np_dtype(node.a("output_datatype", 1))

    def run(ins, outs, ws):
        bins, n_fft, rate = (_scalar(a) for a in ins[:3])
        lo, hi = (_scalar(a, float) for a in ins[3:5])
        mel_lo = 2595 * np.log1p(lo / 700) / np.log(10)
        mel_hi = 2595 * np.log1p(hi / 700) / np.log(10)
        # bin edges as onnx's reference computes them (a step of (hi - lo) / (bins + 2) in mel)
        mels = np.arange(bins + 2) * ((mel_hi - mel_lo) / (bins + 2)) + mel_lo
        hz = 700 * np.expm1(mels / 2595 * math.log(10))
        edges = ((n_fft + 1) * hz // rate).astype(np.int64)
        k = np.arange(n_fft // 2 + 1).reshape(-1, 1)
        left, center, right = edges[:-2], edges[1:-1], edges[2:]
        up = (k - left) / np.maximum(center - left, 1)
        down = (right - k) / np.maximum(right - center, 1)
        out = np.where((k >= left) & (k <= center), np.where(center > left, up, 1.0), 0.0)
        out = np.where((k >= center) & (k < right), down, out)
        return xp.asarray(out.astype(dtype))
    return run
