"""Neural-network kernels: Conv, ConvTranspose, pooling, normalizations, Gemm, MatMul, Softmax.

Conv keeps NCHW between ops. Its fast path (2-D, stride 1) gathers patches on the padded
width: for kernel offset (i, j) the patch row of channel c is the contiguous run
``xpad[c].flat[i*Wp + j : i*Wp + j + Ho*Wp]``, so the gather is kh*kw contiguous block copies
and one GEMM gives (M, Ho, Wp); the Wp - Wo junk columns are dropped while adding the bias.
Large 3x3 stride-1 convs run as Winograd F(2x2, 3x3) (16 GEMMs with 2.25x fewer multiply-adds;
only where the transformed weights, held across runs, stay small); narrow images and strided
convs gather exact patches (im2col), 1x1 convs are a GEMM on the input itself, depthwise
convs are kh*kw multiply-adds. Scratch lives in the planner's workspace when one is given.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from opc.runtime.registry import const_input, kernel, out_if

CHUNK_BYTES = 8 << 20  # target size of one batch chunk's im2col buffer
GATHER_MAX_L = 1024  # depthwise: output rows (Ho * Wq) up to this gather taps for a matmul
COLS_BLOCK_BYTES = 1 << 20  # depthwise gather block (stays in cache)
WINO_CHUNK_BYTES = 16 << 20  # Winograd: target scratch of one batch chunk
WINO_MIN_MACS = 8_000_000  # Winograd only for convs this large (its ~40 calls cost more on small ones)
WINO_MIN_TILES = 32  # fewer tiles: the GEMMs stream U (16/9 of the weights) for too little work
# U (16/9 of the conv's weights) is held across runs beyond the arena and the weights: only
# convs whose U is at most this large use Winograd (resnet18: layer1-2, 4.1 MiB in all)
WINO_MAX_U_BYTES = 1 << 20


# ---------------------------------------------------------------- geometry
def _pads(node, spatial, kernel_shape, strides, dilations, ceil_mode=False):
    n = len(spatial)
    auto = node.a("auto_pad", "NOTSET")
    pads = list(node.a("pads") or [0] * (2 * n))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * n)
        for i in range(n):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel_shape[i] - 1) * dilations[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + n] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * n)
    outs = []
    for i in range(n):
        span = spatial[i] + pads[i] + pads[i + n] - ((kernel_shape[i] - 1) * dilations[i] + 1)
        if ceil_mode:
            o = -(-span // strides[i]) + 1
            if (o - 1) * strides[i] >= spatial[i] + pads[i]:
                o -= 1
        else:
            o = span // strides[i] + 1
        outs.append(max(o, 0))
    return pads, outs


def _geom(node, x_shape, kernel_shape, ceil_mode=False):
    n = len(x_shape) - 2
    strides = list(node.a("strides") or [1] * n)
    dil = list(node.a("dilations") or [1] * n)
    pads, outs = _pads(node, list(x_shape[2:]), kernel_shape, strides, dil, ceil_mode)
    return strides, dil, pads, outs


def _window(k, d, s, o):
    return slice(k * d, k * d + s * (o - 1) + 1, s)


def _take(ws, offset, shape, dtype, xp):
    """A view of ``shape`` from workspace bytes at ``offset`` (or a fresh array)."""
    nbytes = int(math.prod(shape)) * np.dtype(dtype).itemsize
    if ws is not None and offset + nbytes <= ws.size:
        return ws[offset:offset + nbytes].view(dtype).reshape(shape), offset + _align(nbytes)
    return xp.empty(shape, dtype=dtype), offset


def _align(n):
    return (n + 63) // 64 * 64


# ---------------------------------------------------------------- Conv
def _conv_plan(node, x_shape, w_shape, itemsize):
    """How a conv runs for these shapes, and the scratch bytes it needs."""
    N, C = x_shape[:2]
    M = w_shape[0]
    K = list(w_shape[2:])
    g = node.a("group", 1)
    strides, dil, pads, outs = _geom(node, x_shape, K)
    nsp = len(K)
    padded = any(pads)
    prodO = int(math.prod(outs))
    if g == C and M == C and g > 1:
        if nsp == 2:
            sh, sw = strides
            Hp, Wp = x_shape[2] + pads[0] + pads[2], x_shape[3] + pads[1] + pads[3]
            Hq, Wq = -(-Hp // sh), -(-Wp // sw)  # one phase image per (row, column) offset mod stride
            P = sh * sw
            R = Hq * Wq + ((w_shape[3] - 1) * dil[1]) // sw
            L = outs[0] * Wq
            per_img = C * (P * R + 2 * L) * itemsize
            chunk = max(1, min(N, CHUNK_BYTES // max(1, per_img)))
            taps = int(math.prod(w_shape[2:]))
            # small images: gather the taps of a cache-sized block of channels and let one
            # batched (1 x taps) @ (taps x L) matmul do the multiply-adds (fewer passes)
            rb = max(1, min(chunk * C, COLS_BLOCK_BYTES // max(1, taps * L * itemsize))) \
                if L <= GATHER_MAX_L else 0
            return dict(kind="depthwise_wide", strides=strides, dil=dil, pads=pads, outs=outs, Hp=Hp, Wp=Wp,
                        Hq=Hq, Wq=Wq, R=R, L=L, chunk=chunk, rb=rb,
                        ws=_align(chunk * C * P * R * itemsize) + (1 if rb else 2) * _align(chunk * C * L * itemsize)
                        + _align(rb * (taps + 1) * L * itemsize))  # + a ones row for the bias
        padn = N * C * int(math.prod([x_shape[2 + i] + pads[i] + pads[i + nsp] for i in range(nsp)])) if padded else 0
        return dict(kind="depthwise", strides=strides, dil=dil, pads=pads, outs=outs,
                    ws=_align(padn * itemsize) + _align(N * C * prodO * itemsize))
    if all(k == 1 for k in K) and not padded and g == 1:
        sub = 0 if all(s == 1 for s in strides) else N * C * prodO
        return dict(kind="gemm", strides=strides, dil=dil, pads=pads, outs=outs, ws=_align(sub * itemsize))
    Cg = C // g
    prodK = int(math.prod(K))
    th, tw = (-(-outs[0] // 2), -(-outs[1] // 2)) if nsp == 2 else (0, 0)  # Winograd tiles
    if nsp == 2 and K == [3, 3] and strides == [1, 1] and dil == [1, 1] and g == 1 and itemsize == 4 \
            and C >= 16 and M >= 16 and min(outs) >= 2 and M * C * 9 * prodO >= WINO_MIN_MACS \
            and N * th * tw >= WINO_MIN_TILES and 16 * M * C * itemsize <= WINO_MAX_U_BYTES:
        per_img = (2 * C * (th + 1) * 2 * (tw + 1) + 4 * C * th * 2 * (tw + 1) + 16 * C * th * tw
                   + 16 * M * th * tw + 8 * M * th * tw) * itemsize
        chunk = max(1, min(N, WINO_CHUNK_BYTES // per_img))
        sizes = [2 * C * (th + 1) * 2 * (tw + 1), 4 * C * th * 2 * (tw + 1), 16 * C * th * tw, 16 * M * th * tw,
                 8 * M * th * tw]
        return dict(kind="winograd", strides=strides, dil=dil, pads=pads, outs=outs, th=th, tw=tw, chunk=chunk,
                    ws=sum(_align(chunk * n * itemsize) for n in sizes))
    # on the padded width the GEMM also computes Wp - Wo junk columns: not worth it on narrow images
    if nsp == 2 and strides == [1, 1] and (K[1] - 1) * dil[1] * 8 <= outs[1]:
        Hp, Wp = x_shape[2] + pads[0] + pads[2], x_shape[3] + pads[1] + pads[3]
        slack = (K[1] - 1) * dil[1]
        per_img = _align((C * Hp * Wp + slack) * itemsize) + _align(Cg * prodK * outs[0] * Wp * itemsize) \
            + _align(M * outs[0] * Wp * itemsize)
        return dict(kind="wide", strides=strides, dil=dil, pads=pads, outs=outs, ws=per_img, Hp=Hp, Wp=Wp)
    spatial_p = [x_shape[2 + i] + pads[i] + pads[i + nsp] for i in range(nsp)]
    per_img = (C * int(math.prod(spatial_p)) if padded else 0)
    chunk = max(1, min(N, CHUNK_BYTES // max(1, Cg * prodK * prodO * itemsize)))
    ws = _align(chunk * per_img * itemsize) + _align(chunk * Cg * prodK * prodO * itemsize)
    # the index tuples of every kernel offset's window and of the padding, made once per shape
    win = [(slice(None), slice(None)) + tuple(_window(kk[i], dil[i], strides[i], outs[i]) for i in range(nsp))
           for kk in itertools.product(*[range(k) for k in K])]
    return dict(kind="im2col", strides=strides, dil=dil, pads=pads, outs=outs, ws=ws, chunk=chunk, win=win,
                pad_slices=_pad_slices(list(x_shape[2:]), pads) if padded else None, sp=spatial_p)


def conv_workspace(node, shapes, dtypes):
    if len(shapes) < 2 or shapes[0] is None or shapes[1] is None:
        return 0
    itemsize = np.dtype(dtypes[0]).itemsize if dtypes and dtypes[0] is not None else 4
    return _conv_plan(node, shapes[0], shapes[1], itemsize)["ws"]


def _pad_slices(spatial, pads):
    """(border index tuples, centre index tuple) of an (N, C, *spatial) image padded by ``pads``."""
    n = len(spatial)
    centre = (slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + spatial[i]) for i in range(n))
    borders = []
    for i in range(n):
        if pads[i]:
            borders.append((slice(None),) * (2 + i) + (slice(0, pads[i]),))
        if pads[i + n]:
            borders.append((slice(None),) * (2 + i) + (slice(pads[i] + spatial[i], None),))
    return borders, centre


def _pad_into(xp, dst, x, pads, value=0, pre=None):
    """Write ``x`` into the centre of ``dst`` (N, C, *padded) and fill the border with ``value``;
    ``pre``: an activation (``node.post`` form) applied to ``x`` on the way."""
    n = x.ndim - 2
    centre = (slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(n))
    for i in range(n):
        lo = (slice(None),) * (2 + i) + (slice(0, pads[i]),)
        hi = (slice(None),) * (2 + i) + (slice(pads[i] + x.shape[2 + i], None),)
        if pads[i]:
            dst[lo] = value
        if dst.shape[2 + i] > pads[i] + x.shape[2 + i]:
            dst[hi] = value
    if pre is None:
        dst[centre] = x
    else:
        _activate(xp, pre, x, dst[centre])
    return dst


def _activate(xp, post, x, out):
    """``out = act(x)`` for an activation in ``node.post`` form (``out`` may be ``x``)."""
    if post[0] == "relu":
        return xp.maximum(x, x.dtype.type(0), out=out)
    lo, hi = post[1], post[2]
    if lo is not None and hi is not None:  # one pass, not two
        return xp.clip(x, x.dtype.type(lo), x.dtype.type(hi), out=out)
    if lo is not None:
        x = xp.maximum(x, x.dtype.type(lo), out=out)
    if hi is not None:
        x = xp.minimum(x, x.dtype.type(hi), out=out)
    if x is not out:
        out[...] = x
    return out


@kernel("Conv", workspace=conv_workspace)
def _conv(node, xp):
    cache = {}
    wcache = {}

    def run(ins, outs, ws):
        x, w = ins[0], ins[1]
        b = ins[2] if len(ins) > 2 else None
        key = (x.shape, w.shape)
        p = cache.get(key)
        if p is None:
            p = cache[key] = _conv_plan(node, x.shape, w.shape, x.dtype.itemsize)
        N, C = x.shape[:2]
        M = w.shape[0]
        oshape = (N, M, *p["outs"])
        y = out_if(outs, 0, oshape, x.dtype)
        if y is None:
            y = xp.empty(oshape, dtype=x.dtype)
        kind = p["kind"]
        pre = getattr(node, "pre", None)  # the producer's activation, moved here at load (program.py)
        if pre is not None and kind != "depthwise_wide":
            x = _activate(xp, pre, x, xp.empty_like(x))
        if kind == "gemm":
            src = x
            if any(s != 1 for s in p["strides"]):
                sub, _ = _take(ws, 0, (N, C, *p["outs"]), x.dtype, xp)
                sub[...] = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in p["strides"])]
                src = sub
            xp.matmul(w.reshape(M, C), src.reshape(N, C, -1), out=y.reshape(N, M, -1))
            if b is not None:
                y += b.reshape((M,) + (1,) * len(p["outs"]))
            return apply_post(xp, node, y)
        if kind == "depthwise":
            y = _depthwise(xp, x, w, b, y, p, ws)
        elif kind == "depthwise_wide":
            return _depthwise_wide(xp, node, x, w, b, y, p, ws, wcache)
        elif kind == "wide":
            return _conv_wide(xp, node, x, w, b, y, p, ws)
        elif kind == "winograd":
            return _conv_winograd(xp, node, x, _winograd_weights(xp, node, w, wcache), b, y, p, ws)
        else:
            y = _conv_im2col(xp, node, x, w, b, y, p, ws)
        return apply_post(xp, node, y)
    return run


def apply_post(xp, node, y):
    """The activation fused into this node at load (``node.post``), in place."""
    post = getattr(node, "post", None)
    if post is None:
        return y
    return _activate(xp, post, y, y)


def _depthwise_wide(xp, node, x, w, b, y, p, ws, cache):
    """2-D depthwise conv without im2col. The padded image is split into its stride phases
    (phase (a, b) holds the pixels at rows a::sh, columns b::sw; stride 1: one phase, the padded
    image itself), each flattened per channel with its own width Wq. Kernel tap (i, j) then reads
    phase (i*dh % sh, j*dw % sw) at the contiguous offset (i*dh // sh) * Wq + j*dw // sw, so every
    tap is one (rows, Ho*Wq) multiply-add of a shifted slice with a per-row weight column; the
    Wq - Wo junk columns are dropped while adding the bias. Small images gather the taps and
    run one batched matmul instead, the bias being one more tap over a row of ones: the copy
    that drops the junk columns then also applies the fused activation."""
    N, C = x.shape[:2]
    kh, kw = w.shape[2:]
    sh, sw = p["strides"]
    Hq, Wq, R, L, chunk = p["Hq"], p["Wq"], p["R"], p["L"], p["chunk"]
    dh, dw = p["dil"]
    Ho, Wo = p["outs"]
    pads = p["pads"]
    pre = getattr(node, "pre", None)
    P = sh * sw
    src_b, off = _take(ws, 0, (P, chunk * C, R), x.dtype, xp)
    acc_b, off = _take(ws, off, (chunk * C, L), x.dtype, xp)
    rb = p["rb"]
    fold = bool(rb) and b is not None  # the bias as one more tap over a row of ones
    kb = kh * kw + fold
    if rb:  # gathered taps and one matmul: no per-tap temporary
        cols_b, off = _take(ws, off, (rb, kb, L), x.dtype, xp)
        tmp_b = acc_b
    else:
        tmp_b, off = _take(ws, off, (chunk * C, L), x.dtype, xp)
    # one entry per chunk size (i.e. per batch size), never dropped for another: a CUDA graph
    # captured for one input signature reads its entry's arrays on every replay, so a run of
    # another signature must not free them (the pool would hand their memory out again)
    key = ("rows", chunk, fold)
    hit = cache.get(key)
    if hit is None or hit[0] is not w or hit[1] is not b or not const_input(node, 1) \
            or (b is not None and not const_input(node, 2)):
        # per-row weights and bias for a chunk of images, built once per constant weight
        wt = w.reshape(1, C, kh * kw)
        if fold:
            wt = xp.concatenate([wt, b.reshape(1, C, 1).astype(wt.dtype)], axis=2)
        wt = xp.ascontiguousarray(xp.broadcast_to(wt, (chunk, C, kb)).reshape(chunk * C, kb))
        bias = None if b is None or fold else xp.ascontiguousarray(
            xp.broadcast_to(b.reshape(1, C, 1, 1), (chunk, C, 1, 1)))
        hit = cache[key] = (w, b, wt, bias)
    wt_b, bias_b = hit[2], hit[3]
    taps = []
    for i in range(kh):
        for j in range(kw):
            ph = (i * dh % sh) * sw + j * dw % sw
            taps.append((i * kw + j, ph, (i * dh // sh) * Wq + j * dw // sw))
    tail = R - Hq * Wq
    for n0 in range(0, N, chunk):
        nb = min(chunk, N - n0)
        rows = nb * C
        src, acc, tmp, wt = src_b[:, :rows], acc_b[:rows], tmp_b[:rows], wt_b[:rows]
        pd = [pads[0], pads[1], pads[2], pads[3]]
        if P == 1:
            _pad_into(xp, src[0, :, :Hq * Wq].reshape(nb, C, Hq, Wq), x[n0:n0 + nb], pd, pre=pre)
        else:  # phase (a, c) pixel (u, v) is x[sh*u + a - top, sw*v + c - left], zero outside x
            xs = x[n0:n0 + nb]
            H, W = x.shape[2:]
            for a in range(sh):
                u0, r0 = _phase_range(a, pads[0], sh, H)
                for c in range(sw):
                    v0, c0 = _phase_range(c, pads[1], sw, W)
                    part = xs[:, :, r0::sh, c0::sw]
                    img = src[a * sw + c, :, :Hq * Wq].reshape(nb, C, Hq, Wq)
                    if not part.size:
                        img[...] = 0
                        continue
                    u1, v1 = u0 + part.shape[2], v0 + part.shape[3]
                    img[:, :, :u0] = 0  # zero only the border the copy leaves
                    img[:, :, u1:] = 0
                    img[:, :, u0:u1, :v0] = 0
                    img[:, :, u0:u1, v1:] = 0
                    dst = img[:, :, u0:u1, v0:v1]
                    if pre is None:
                        dst[...] = part
                    else:
                        _activate(xp, pre, part, dst)
        if tail:
            src[:, :, Hq * Wq:] = 0
        if rb:
            for r0 in range(0, rows, rb):
                r1 = min(rows, r0 + rb)
                cols = cols_b[:r1 - r0]
                for k, ph, o in taps:
                    cols[:, k] = src[ph, r0:r1, o:o + L]
                if fold:
                    cols[:, kh * kw] = 1
                xp.matmul(wt[r0:r1].reshape(r1 - r0, 1, kb), cols, out=acc[r0:r1].reshape(r1 - r0, 1, L))
        for t, (k, ph, o) in enumerate(() if rb else taps):
            if t == 0:
                xp.multiply(src[ph, :, o:o + L], wt[:, k:k + 1], out=acc)
            else:
                xp.multiply(src[ph, :, o:o + L], wt[:, k:k + 1], out=tmp)
                acc += tmp
        a4 = acc.reshape(nb, C, Ho, Wq)[:, :, :, :Wo]
        dst = y[n0:n0 + nb]
        if bias_b is not None:
            xp.add(a4, bias_b[:nb], out=dst)
        elif getattr(node, "post", None) is not None:  # the activation is the copy: one pass
            _activate(xp, node.post, a4, dst)
            continue
        else:
            dst[...] = a4
        apply_post(xp, node, dst)
    return y


def _phase_range(a, pad, s, size):
    """First phase index u with 0 <= s*u + a - pad, and the input index it reads."""
    u0 = max(0, -(-(pad - a) // s))
    return u0, s * u0 + a - pad


def _conv_wide(xp, node, x, w, b, y, p, ws):
    N, C, H, W = x.shape
    M, Cg, kh, kw = w.shape
    g = node.a("group", 1)
    Mg = M // g
    Ho, Wo = p["outs"]
    Hp, Wp = p["Hp"], p["Wp"]
    dh, dw = p["dil"]
    pads = p["pads"]
    L = Ho * Wp
    slack = (kw - 1) * dw
    flat, off = _take(ws, 0, (C * Hp * Wp + slack,), x.dtype, xp)
    cols, off = _take(ws, off, (Cg, kh * kw, L), x.dtype, xp)
    acc, off = _take(ws, off, (Mg, Ho, Wp), x.dtype, xp)
    if slack:
        flat[C * Hp * Wp:] = 0
    xpad = flat[:C * Hp * Wp].reshape(1, C, Hp, Wp)
    src = flat[:C * Hp * Wp].reshape(C, Hp * Wp)
    wg = w.reshape(g, Mg, Cg * kh * kw)
    bias = b.reshape(M, 1, 1) if b is not None else None
    for n in range(N):
        _pad_into(xp, xpad, x[n:n + 1], [pads[0], pads[1], pads[2], pads[3]])
        for gi in range(g):
            s = src[gi * Cg:(gi + 1) * Cg]
            for i in range(kh):
                for j in range(kw):
                    o = i * dh * Wp + j * dw
                    if o + L <= Hp * Wp:
                        cols[:, i * kw + j, :] = s[:, o:o + L]
                    else:  # the last rows run into the next channel / slack: junk columns only
                        base = gi * Cg * Hp * Wp + o
                        for c in range(Cg):
                            cols[c, i * kw + j, :] = flat[base + c * Hp * Wp: base + c * Hp * Wp + L]
            xp.matmul(wg[gi], cols.reshape(Cg * kh * kw, L), out=acc.reshape(Mg, L))
            dst = y[n, gi * Mg:(gi + 1) * Mg]
            if bias is not None:
                xp.add(acc[:, :, :Wo], bias[gi * Mg:(gi + 1) * Mg], out=dst)
            else:
                dst[...] = acc[:, :, :Wo]
            apply_post(xp, node, dst)  # while the image's output is still in cache
    return y


_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_weights(xp, node, w, cache):
    """U = G w G^T per (input, output) channel pair as (16, M, C): the 16 transformed-domain
    GEMM operands; kept across runs for a constant weight."""
    hit = cache.get("wino")
    if hit is not None and hit[0] is w and const_input(node, 1):
        return hit[1]
    G = xp.asarray(np.array(_WINO_G, dtype=np.float64))
    u = xp.matmul(xp.matmul(G, w.astype(xp.float64)), G.T)  # (M, C, 4, 4)
    u = xp.ascontiguousarray(u.transpose(2, 3, 0, 1).reshape(16, w.shape[0], w.shape[1]).astype(w.dtype))
    cache["wino"] = (w, u)
    return u


def _conv_winograd(xp, node, x, u, b, y, p, ws):
    """3x3 stride-1 conv as Winograd F(2x2, 3x3): every 2x2 output tile is A^T [(G w G^T) * (B^T d B)] A
    over its 4x4 input tile d, so the multiply-adds become 16 GEMMs (M, C) x (C, tiles), 2.25x fewer
    than direct. The padded input is stored split into its four (row, column) parity phases, so
    that the input transform reads, for every tile element, a shifted contiguous window of one
    phase rather than a stride-2 view; channels lead (C, images, ...) so that the transformed
    tiles are already the GEMM's (C, tiles) operand. The bias is added once in the transformed
    domain at (1, 1), whose output transform puts it on all four outputs of the tile."""
    N, C, H, W = x.shape
    M = u.shape[1]
    Ho, Wo = p["outs"]
    th, tw, chunk = p["th"], p["tw"], p["chunk"]
    pt, pl = p["pads"][0], p["pads"][1]
    dt = x.dtype
    e_b, off = _take(ws, 0, (2, C, chunk, th + 1, 2, tw + 1), dt, xp)
    t_b, off = _take(ws, off, (4, C, chunk, th, 2, tw + 1), dt, xp)
    v_b, off = _take(ws, off, (4, 4, C, chunk * th * tw), dt, xp)
    m_b, off = _take(ws, off, (16, M, chunk * th * tw), dt, xp)
    s_b, off = _take(ws, off, (2, 4, M, chunk * th * tw), dt, xp)
    sub, add = xp.subtract, xp.add
    phases = []
    for rp in range(2):
        u0, r0 = _phase_range(rp, pt, 2, H)
        for cp in range(2):
            v0, c0 = _phase_range(cp, pl, 2, W)
            phases.append((rp, cp, u0, r0, v0, c0))
    for n0 in range(0, N, chunk):
        nb = min(chunk, N - n0)
        P = nb * th * tw
        e, t = e_b[:, :, :nb], t_b[:, :, :nb]
        v, m, sm = v_b[..., :P], m_b[..., :P], s_b[..., :P]
        if nb < chunk:  # contiguous operands for the GEMM
            v = v_b.reshape(-1)[:16 * C * P].reshape(4, 4, C, P)
            m = m_b.reshape(-1)[:16 * M * P].reshape(16, M, P)
            sm = s_b.reshape(-1)[:8 * M * P].reshape(2, 4, M, P)
        e[...] = 0
        xs = x[n0:n0 + nb].transpose(1, 0, 2, 3)
        for rp, cp, u0, r0, v0, c0 in phases:
            part = xs[:, :, r0::2, c0::2]
            e[rp, :, :, u0:u0 + part.shape[2], cp, v0:v0 + part.shape[3]] = part
        # B^T d: rows i of the tile are row phase i % 2 shifted by i // 2
        d = [e[i % 2, :, :, i // 2:i // 2 + th] for i in range(4)]
        sub(d[0], d[2], out=t[0])
        add(d[1], d[2], out=t[1])
        sub(d[2], d[1], out=t[2])
        sub(d[1], d[3], out=t[3])
        # (B^T d) B: the same over columns, into the GEMM operand
        v6 = v.reshape(4, 4, C, nb, th, tw)
        for a in range(4):
            c = [t[a, :, :, :, j % 2, j // 2:j // 2 + tw] for j in range(4)]
            sub(c[0], c[2], out=v6[a, 0])
            add(c[1], c[2], out=v6[a, 1])
            sub(c[2], c[1], out=v6[a, 2])
            sub(c[1], c[3], out=v6[a, 3])
        xp.matmul(u, v.reshape(16, C, P), out=m)
        if b is not None:
            add(m[5], b.reshape(M, 1), out=m[5])
        # A^T m A: rows (0: m0 + m1 + m2, 1: m1 - m2 - m3), then columns, into the output's parities
        add(m[0:4], m[4:8], out=sm[0])
        add(sm[0], m[8:12], out=sm[0])
        sub(m[4:8], m[8:12], out=sm[1])
        sub(sm[1], m[12:16], out=sm[1])
        yt = y[n0:n0 + nb].transpose(1, 0, 2, 3)
        for r in range(2):
            s5 = sm[r].reshape(4, M, nb, th, tw)
            for cc in range(2):
                dst = yt[:, :, r::2, cc::2]
                hh, ww = dst.shape[2], dst.shape[3]
                q = [s5[k, :, :, :hh, :ww] for k in range(4)]
                if cc == 0:
                    add(q[0], q[1], out=dst)
                    add(dst, q[2], out=dst)
                else:
                    sub(q[1], q[2], out=dst)
                    sub(dst, q[3], out=dst)
        apply_post(xp, node, y[n0:n0 + nb])
    return y


def _conv_im2col(xp, node, x, w, b, y, p, ws):
    N, C = x.shape[:2]
    M = w.shape[0]
    K = w.shape[2:]
    nsp = len(K)
    g = node.a("group", 1)
    Cg, Mg = C // g, M // g
    outs = p["outs"]
    prodK, prodO = int(math.prod(K)), int(math.prod(outs))
    chunk = p["chunk"]
    pad_slices = p["pad_slices"]
    if g == 1 and N <= chunk and pad_slices is not None and ws is not None:
        return _conv_im2col_planned(xp, x, w, b, y, p, ws)
    off = 0
    if pad_slices is not None:
        xpad_buf, off = _take(ws, 0, (chunk, C, *p["sp"]), x.dtype, xp)
    cols_buf, off = _take(ws, off, (chunk, Cg, prodK, prodO), x.dtype, xp)
    wg = w.reshape(g, Mg, Cg * prodK)
    yv = y.reshape(N, M, prodO)
    for n0 in range(0, N, chunk):
        nb = min(chunk, N - n0)
        xs = x[n0:n0 + nb]
        if pad_slices is not None:
            xpad = xpad_buf[:nb]
            for sl in pad_slices[0]:
                xpad[sl] = 0
            xpad[pad_slices[1]] = xs
            xs = xpad
        cols = cols_buf[:nb]
        cv = cols.reshape(nb, Cg, prodK, *outs)
        for gi in range(g):
            xg = xs[:, gi * Cg:(gi + 1) * Cg] if g > 1 else xs
            for ki, sl in enumerate(p["win"]):
                cv[:, :, ki] = xg[sl]
            xp.matmul(wg[gi], cols.reshape(nb, Cg * prodK, prodO), out=yv[n0:n0 + nb, gi * Mg:(gi + 1) * Mg])
    if b is not None:
        xp.add(yv, b.reshape(M, 1), out=yv)
    return y


def _conv_im2col_planned(xp, x, w, b, y, p, ws):
    """One batch chunk, padded, workspace given (the arena loop): the padded image, its borders,
    and every (column block, window) copy pair are views into the workspace, made at the first
    run with this workspace and kept, so a run is the copies, the GEMM and the bias (small convs
    such as kws-lstm's 1-D front spent as long building views as in the GEMM)."""
    hit = p.get("views")
    if hit is None or hit[0] is not ws or hit[1] != x.dtype:
        N, C = x.shape[:2]
        prodK, prodO = len(p["win"]), int(math.prod(p["outs"]))
        xpad, off = _take(ws, 0, (N, C, *p["sp"]), x.dtype, xp)
        cols, off = _take(ws, off, (N, C, prodK, prodO), x.dtype, xp)
        cv = cols.reshape(N, C, prodK, *p["outs"])
        borders = [xpad[sl] for sl in p["pad_slices"][0]]
        pairs = [(cv[:, :, ki], xpad[sl]) for ki, sl in enumerate(p["win"])]
        hit = p["views"] = (ws, x.dtype, borders, xpad[p["pad_slices"][1]], pairs, cols.reshape(N, C * prodK, prodO))
    _, _, borders, centre, pairs, cols = hit
    for v in borders:
        v.fill(0)
    centre[...] = x
    for dst, src in pairs:
        dst[...] = src
    M = w.shape[0]
    yv = y.reshape(y.shape[0], M, -1)
    xp.matmul(w.reshape(M, -1), cols, out=yv)
    if b is not None:
        xp.add(yv, b.reshape(M, 1), out=yv)
    return y


def _depthwise(xp, x, w, b, y, p, ws):
    N, C = x.shape[:2]
    K = w.shape[2:]
    nsp = len(K)
    outs, strides, dil, pads = p["outs"], p["strides"], p["dil"], p["pads"]
    off = 0
    if any(pads):
        sp = [x.shape[2 + i] + pads[i] + pads[i + nsp] for i in range(nsp)]
        xpad, off = _take(ws, 0, (N, C, *sp), x.dtype, xp)
        x = _pad_into(xp, xpad, x, pads)
    tmp, off = _take(ws, off, y.shape, x.dtype, xp)
    first = True
    for kk in itertools.product(*[range(k) for k in K]):
        sl = tuple(_window(kk[i], dil[i], strides[i], outs[i]) for i in range(nsp))
        wk = w[(slice(None), 0) + kk].reshape((1, C) + (1,) * nsp)
        v = x[(slice(None), slice(None)) + sl]
        if first:
            xp.multiply(v, wk, out=y)
            first = False
        else:
            xp.multiply(v, wk, out=tmp)
            y += tmp
    if b is not None:
        y += b.reshape((C,) + (1,) * nsp)
    return y


# ---------------------------------------------------------------- ConvTranspose
@kernel("ConvTranspose")
def _conv_transpose(node, xp):
    def run(ins, outs, ws):
        x, w = ins[0], ins[1]
        b = ins[2] if len(ins) > 2 else None
        N, C = x.shape[:2]
        g = node.a("group", 1)
        Mg = w.shape[1]
        K = list(w.shape[2:])
        n = len(K)
        S = list(x.shape[2:])
        strides = list(node.a("strides") or [1] * n)
        dil = list(node.a("dilations") or [1] * n)
        opad = list(node.a("output_padding") or [0] * n)
        pads = list(node.a("pads") or [0] * (2 * n))
        oshape = node.a("output_shape")
        auto = node.a("auto_pad", "NOTSET")
        full = [(S[i] - 1) * strides[i] + (K[i] - 1) * dil[i] + 1 + opad[i] for i in range(n)]
        if oshape is not None:
            oshape = list(oshape)[-n:]
            for i in range(n):
                total = full[i] - oshape[i]
                if total < 0:  # asked for more than the kernels cover: zeros at the end
                    full[i] -= total
                    total = 0
                if auto == "SAME_UPPER":
                    pads[i], pads[i + n] = total // 2, total - total // 2
                else:
                    pads[i], pads[i + n] = total - total // 2, total // 2
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            for i in range(n):
                total = max(0, full[i] - S[i] * strides[i])
                if auto == "SAME_UPPER":
                    pads[i], pads[i + n] = total // 2, total - total // 2
                else:
                    pads[i], pads[i + n] = total - total // 2, total // 2
        # col2im: one GEMM per group, then scatter-add of each kernel offset
        Cg = C // g
        buf = xp.zeros((N, g * Mg, *full), dtype=x.dtype)
        xr = x.reshape(N, g, Cg, -1)
        for gi in range(g):
            wg = w[gi * Cg:(gi + 1) * Cg].reshape(Cg, -1)  # (Cg, Mg*prodK)
            cols = xp.matmul(wg.T, xr[:, gi])  # (N, Mg*prodK, prodS)
            cols = cols.reshape(N, Mg, *K, *S)
            for kk in itertools.product(*[range(k) for k in K]):
                sl = tuple(slice(kk[i] * dil[i], kk[i] * dil[i] + strides[i] * (S[i] - 1) + 1, strides[i])
                           for i in range(n))
                buf[(slice(None), slice(gi * Mg, (gi + 1) * Mg)) + sl] += cols[(slice(None), slice(None)) + kk]
        crop = tuple(slice(pads[i], full[i] - pads[i + n]) for i in range(n))
        y = buf[(slice(None), slice(None)) + crop]
        if b is not None:
            y = y + b.reshape((-1,) + (1,) * n)
        return xp.ascontiguousarray(y)
    return run


# ---------------------------------------------------------------- pooling
def _pool(xp, node, x, kind, K, p_norm=2):
    nsp = x.ndim - 2
    ceil_mode = bool(node.a("ceil_mode", 0))
    strides, dil, pads, outs = _geom(node, x.shape, K, ceil_mode)
    sp = []
    for i in range(nsp):
        need = (outs[i] - 1) * strides[i] + (K[i] - 1) * dil[i] + 1
        sp.append(max(x.shape[2 + i] + pads[i] + pads[i + nsp], need))
    pads_ext = list(pads)
    for i in range(nsp):
        pads_ext[i + nsp] = sp[i] - x.shape[2 + i] - pads[i]
    if kind == "max":
        fill = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    else:
        fill = 0
    if any(pads_ext):
        xp_ = xp.empty((*x.shape[:2], *sp), dtype=x.dtype)
        _pad_into(xp, xp_, x, pads_ext, fill)
    else:
        xp_ = x
    if kind == "lp":
        xp_ = xp.absolute(xp_) ** p_norm
    y = None
    for kk in itertools.product(*[range(k) for k in K]):
        sl = (slice(None), slice(None)) + tuple(_window(kk[i], dil[i], strides[i], outs[i]) for i in range(nsp))
        v = xp_[sl]
        if y is None:
            y = v.copy()
        elif kind == "max":
            xp.maximum(y, v, out=y)
        else:
            y += v
    if kind == "lp":
        return (y ** (1.0 / p_norm)).astype(x.dtype, copy=False)
    if kind == "avg":
        include = bool(node.a("count_include_pad", 0))
        # the divisors depend on the shape only: copied to the device once per shape and kept
        # (never evicted: a CUDA graph captured for this shape reads them on every replay; a copy
        # from the host inside a capture would replay from CuPy's reused pinned staging buffer)
        dev = node.__dict__.setdefault("_opc_avg_divisors", {})
        hit = dev.get((x.shape, x.dtype))
        if hit is not None:
            y /= hit
            return y
        mask = np.zeros(sp, dtype=np.float64)
        if include:
            inner = tuple(slice(0, min(sp[i], pads[i] + x.shape[2 + i] + pads[i + nsp])) for i in range(nsp))
        else:
            inner = tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(nsp))
        mask[inner] = 1
        cnt = None
        for kk in itertools.product(*[range(k) for k in K]):
            v = mask[tuple(_window(kk[i], dil[i], strides[i], outs[i]) for i in range(nsp))]
            cnt = v.copy() if cnt is None else cnt + v
        div = xp.asarray(np.maximum(cnt, 1).astype(x.dtype))
        if len(dev) < 64:
            dev[(x.shape, x.dtype)] = div
        y /= div
    return y


def _max_indices(xp, node, x, K):
    nsp = x.ndim - 2
    ceil_mode = bool(node.a("ceil_mode", 0))
    strides, dil, pads, outs = _geom(node, x.shape, K, ceil_mode)
    spatial = x.shape[2:]
    n_sp = int(math.prod(spatial))
    if node.a("storage_order", 0):  # column-major numbering of the spatial positions
        sflat = np.arange(n_sp, dtype=np.int64).reshape(spatial[::-1]).transpose()
    else:
        sflat = np.arange(n_sp, dtype=np.int64).reshape(spatial)
    base = (np.arange(x.shape[0] * x.shape[1], dtype=np.int64) * int(math.prod(spatial))) \
        .reshape(x.shape[:2] + (1,) * nsp)
    idx = xp.asarray(base + sflat)
    sp = [max(x.shape[2 + i] + pads[i] + pads[i + nsp], (outs[i] - 1) * strides[i] + (K[i] - 1) * dil[i] + 1)
          for i in range(nsp)]
    pe = list(pads)
    for i in range(nsp):
        pe[i + nsp] = sp[i] - x.shape[2 + i] - pads[i]
    fill = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    xpad = _pad_into(xp, xp.empty((*x.shape[:2], *sp), dtype=x.dtype), x, pe, fill)
    ipad = _pad_into(xp, xp.empty((*x.shape[:2], *sp), dtype=np.int64), idx, pe, -1)
    best = bi = None
    for kk in itertools.product(*[range(k) for k in K]):
        sl = (slice(None), slice(None)) + tuple(_window(kk[i], dil[i], strides[i], outs[i]) for i in range(nsp))
        v, iv = xpad[sl], ipad[sl]
        if best is None:
            best, bi = v.copy(), iv.copy()
        else:
            upd = v > best
            best = xp.where(upd, v, best)
            bi = xp.where(upd, iv, bi)
    return best, bi


def _maxpool_nopad(xp, node, x, K, outs):
    """Max pooling without a padded copy: each kernel tap updates only the outputs whose
    window position falls inside the input (padding is -inf, so it never wins)."""
    nsp = x.ndim - 2
    strides, dil, pads, osz = _geom(node, x.shape, K, bool(node.a("ceil_mode", 0)))
    shape = x.shape[:2] + tuple(osz)
    y = out_if(outs, 0, shape, x.dtype)
    if y is None:
        y = xp.empty(shape, dtype=x.dtype)
    y[...] = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    for kk in itertools.product(*[range(k) for k in K]):
        ysl, xsl = [slice(None)] * 2, [slice(None)] * 2
        for i in range(nsp):
            S, s, off = x.shape[2 + i], strides[i], kk[i] * dil[i] - pads[i]
            lo = max(0, -(-(-off) // s))  # first o with o*s + off >= 0
            hi = min(osz[i] - 1, (S - 1 - off) // s)  # last o with o*s + off <= S-1
            if hi < lo:
                break
            ysl.append(slice(lo, hi + 1))
            xsl.append(slice(lo * s + off, hi * s + off + 1, s))
        else:
            yv = y[tuple(ysl)]
            xp.maximum(yv, x[tuple(xsl)], out=yv)
    return y


@kernel("MaxPool")
def _maxpool(node, xp):
    K = list(node.a("kernel_shape"))

    def run(ins, outs, ws):
        if len(node.outputs) > 1 and node.outputs[1]:
            return list(_max_indices(xp, node, ins[0], K))
        if ins[0].dtype.kind == "f":
            return apply_post(xp, node, _maxpool_nopad(xp, node, ins[0], K, outs))
        return _pool(xp, node, ins[0], "max", K)
    return run


@kernel("AveragePool")
def _avgpool(node, xp):
    K = list(node.a("kernel_shape"))
    return lambda ins, outs, ws: _pool(xp, node, ins[0], "avg", K)


@kernel("LpPool")
def _lppool(node, xp):
    K = list(node.a("kernel_shape"))
    p = node.a("p", 2)
    return lambda ins, outs, ws: _pool(xp, node, ins[0], "lp", K, p)


@kernel("GlobalAveragePool")
def _gap(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        axes = tuple(range(2, x.ndim))
        shape = x.shape[:2] + (1,) * len(axes)
        o = out_if(outs, 0, shape, x.dtype)
        return xp.mean(x, axis=axes, keepdims=True, out=o)
    return run


@kernel("GlobalMaxPool")
def _gmp(node, xp):
    return lambda ins, outs, ws: xp.max(ins[0], axis=tuple(range(2, ins[0].ndim)), keepdims=True)


@kernel("GlobalLpPool")
def _glp(node, xp):
    p = node.a("p", 2)
    return lambda ins, outs, ws: (xp.sum(xp.absolute(ins[0]) ** p, axis=tuple(range(2, ins[0].ndim)),
                                         keepdims=True) ** (1.0 / p)).astype(ins[0].dtype, copy=False)


# ---------------------------------------------------------------- normalization
@kernel("BatchNormalization")
def _bn(node, xp):
    eps = node.a("epsilon", 1e-5)
    cache = {}

    training = bool(node.a("training_mode", 0))
    momentum = node.a("momentum", 0.9)

    def run(ins, outs, ws):
        x, scale, bias, mean, var = ins[:5]
        if training:
            axes = (0,) + tuple(range(2, x.ndim))
            bm, bv = x.mean(axis=axes), x.var(axis=axes)
            shp = (1, -1) + (1,) * (x.ndim - 2)
            y = (x - bm.reshape(shp)) / xp.sqrt(bv.reshape(shp) + eps) * scale.reshape(shp) + bias.reshape(shp)
            res = [y.astype(x.dtype, copy=False)]
            if len(node.outputs) > 1:
                res.append((mean * momentum + bm * (1 - momentum)).astype(mean.dtype))
                res.append((var * momentum + bv * (1 - momentum)).astype(var.dtype))
            return res
        key = (id(scale), id(bias), id(mean), id(var))
        ent = cache.get(key)
        if ent is None or ent[0] is not scale:
            s = scale / xp.sqrt(var + eps)
            t = bias - mean * s
            shp = (1, -1) + (1,) * (x.ndim - 2)
            ent = cache[key] = (scale, s.astype(x.dtype).reshape(shp), t.astype(x.dtype).reshape(shp))
        o = out_if(outs, 0, x.shape, x.dtype)
        y = xp.multiply(x, ent[1], out=o)
        y += ent[2]
        return y
    return run


@kernel("InstanceNormalization")
def _instnorm(node, xp):
    eps = node.a("epsilon", 1e-5)

    def run(ins, outs, ws):
        x, s, b = ins
        axes = tuple(range(2, x.ndim))
        m = x.mean(axis=axes, keepdims=True)
        v = ((x - m) ** 2).mean(axis=axes, keepdims=True)
        shp = (1, -1) + (1,) * (x.ndim - 2)
        return ((x - m) / xp.sqrt(v + eps) * s.reshape(shp) + b.reshape(shp)).astype(x.dtype, copy=False)
    return run


@kernel("LayerNormalization")
def _layernorm(node, xp):
    """Rows of n = prod(shape[axis:]) values: mean and variance are GEMVs with a (n, 1) column of
    1/n (NumPy's keepdims sums cost several times more on small or many rows), the normalized
    rows written straight into the output view."""
    eps = node.a("epsilon", 1e-5)
    axis0 = node.a("axis", -1)
    cache = {}

    def run(ins, outs, ws):
        x, s = ins[0], ins[1]
        b = ins[2] if len(ins) > 2 else None
        axis = axis0 % x.ndim
        xf = x.astype(xp.float32) if x.dtype != np.float32 and x.dtype != np.float64 else x
        dt = xf.dtype
        n = math.prod(x.shape[axis:])
        rows = math.prod(x.shape[:axis])
        hit = cache.get((n, dt))
        if hit is None:
            hit = cache[(n, dt)] = (xp.full((n, 1), 1.0 / n, dtype=dt), xp.asarray(eps, dtype=dt),
                                    xp.asarray(1, dtype=dt))
        col, eps_a, one = hit
        x2 = xf.reshape(rows, n)
        o = out_if(outs, 0, x.shape, x.dtype) if dt == x.dtype else None
        m = xp.matmul(x2, col)  # (rows, 1)
        d = xp.subtract(x2, m, out=None if o is None else o.reshape(rows, n))
        sq = xp.multiply(d, d)
        v = xp.matmul(sq, col)
        xp.add(v, eps_a, out=v)
        xp.sqrt(v, out=v)
        inv = xp.divide(one, v, out=v)
        xp.multiply(d, inv, out=d)
        y = d.reshape(x.shape)
        xp.multiply(y, s, out=y)
        if b is not None:
            xp.add(y, b, out=y)
        res = [o if o is not None else y.astype(x.dtype, copy=False)]  # the view itself: no copy-back
        stat = x.shape[:axis] + (1,) * (x.ndim - axis)
        if len(node.outputs) > 1:
            res.append(m.reshape(stat))
        if len(node.outputs) > 2:
            res.append(inv.reshape(stat))
        return res
    return run


@kernel("LRN")
def _lrn(node, xp):
    size = node.a("size")
    alpha, beta, bias = node.a("alpha", 1e-4), node.a("beta", 0.75), node.a("bias", 1.0)

    def run(ins, outs, ws):
        x = ins[0]
        C = x.shape[1]
        lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
        sq = x * x
        acc = xp.zeros_like(x)
        for d in range(-lo, hi + 1):
            a0, a1 = max(0, -d), min(C, C - d)
            if a1 > a0:
                acc[:, a0:a1] += sq[:, a0 + d:a1 + d]
        acc *= alpha / size
        acc += bias
        return (x / acc ** beta).astype(x.dtype, copy=False)
    return run


@kernel("LpNormalization")
def _lpnorm(node, xp):
    axis, p = node.a("axis", -1), node.a("p", 2)

    def run(ins, outs, ws):
        x = ins[0]
        n = xp.sum(xp.absolute(x) ** p, axis=axis, keepdims=True) ** (1.0 / p)
        return (x / xp.where(n == 0, 1, n)).astype(x.dtype, copy=False)
    return run


@kernel("MeanVarianceNormalization")
def _mvn(node, xp):
    axes = tuple(node.a("axes", [0, 2, 3]))

    def run(ins, outs, ws):
        x = ins[0]
        m = x.mean(axis=axes, keepdims=True)
        v = ((x - m) ** 2).mean(axis=axes, keepdims=True)
        return ((x - m) / (xp.sqrt(v) + 1e-9)).astype(x.dtype, copy=False)
    return run


# ---------------------------------------------------------------- GEMM family
@kernel("Gemm")
def _gemm(node, xp):
    ta, tb = node.a("transA", 0), node.a("transB", 0)
    alpha, beta = node.a("alpha", 1.0), node.a("beta", 1.0)

    def run(ins, outs, ws):
        a, b = ins[0], ins[1]
        c = ins[2] if len(ins) > 2 else None
        a = a.T if ta else a
        b = b.T if tb else b
        shape = (a.shape[0], b.shape[1])
        o = out_if(outs, 0, shape, a.dtype)
        y = xp.matmul(a, b, out=o)
        if alpha != 1.0:
            y *= a.dtype.type(alpha)
        if c is not None and beta != 0:
            if beta == 1.0:
                y += c
            else:
                y += c * a.dtype.type(beta)
        return y
    return run


@functools.lru_cache(maxsize=4096)
def _matmul_shape(a, b):
    return np.broadcast_shapes(a[:-2], b[:-2]) + (a[-2], b[-1])


@kernel("MatMul")
def _matmul(node, xp):
    def run(ins, outs, ws):
        a, b = ins
        if a.ndim >= 2 and b.ndim >= 2:
            shape = _matmul_shape(a.shape, b.shape)
            y = xp.matmul(a, b, out=out_if(outs, 0, shape, a.dtype))
        else:
            y = xp.matmul(a, b)
        post = getattr(node, "post_ops", None)  # bias / scale steps merged at load (program.py)
        if post is None:
            return y
        if not isinstance(y, xp.ndarray):
            y = xp.asarray(y)
        for name, c in post:
            getattr(xp, name)(y, c, out=y)
        return y
    return run


# ---------------------------------------------------------------- softmax family
def _softmax_axis(node, x):
    default = -1 if node.opset >= 13 else 1
    return node.a("axis", default) % max(x.ndim, 1)


@kernel("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node, xp):
    op = node.op_type

    def run(ins, outs, ws):
        x = ins[0]
        axis = _softmax_axis(node, x)
        if node.opset < 13:  # coerced to 2-D at `axis`
            x2 = x.reshape(int(math.prod(x.shape[:axis])), -1)
            return _sm(xp, op, x2, 1, None).reshape(x.shape)
        return _sm(xp, op, x, axis, out_if(outs, 0, x.shape, x.dtype))
    return run


def _sm(xp, op, x, axis, o):
    if op == "Hardmax":
        idx = xp.argmax(x, axis=axis)
        y = xp.zeros_like(x)
        xp.put_along_axis(y, xp.expand_dims(idx, axis), 1, axis=axis)
        return y
    m = xp.max(x, axis=axis, keepdims=True)
    e = xp.subtract(x, m, out=o)
    if op == "LogSoftmax":
        s = xp.log(xp.sum(xp.exp(e), axis=axis, keepdims=True))
        e -= s
        return e
    xp.exp(e, out=e)
    if axis == x.ndim - 1 and e.flags.c_contiguous and e.dtype.kind == "f":
        # the row sums as one GEMV with a column of ones (NumPy's keepdims sum costs more)
        n = e.shape[-1]
        s = xp.matmul(e.reshape(-1, n), xp.ones((n, 1), dtype=e.dtype)).reshape(e.shape[:-1] + (1,))
    else:
        s = xp.sum(e, axis=axis, keepdims=True)
    e /= s
    return e


@kernel("RMSNormalization")
def _rmsnorm(node, xp):
    eps = node.a("epsilon", 1e-5)
    axis0 = node.a("axis", -1)

    def run(ins, outs, ws):
        x, s = ins[0], ins[1]
        axes = tuple(range(axis0 % x.ndim, x.ndim))
        xf = x.astype(xp.float32) if x.dtype != np.float64 else x
        inv = 1.0 / xp.sqrt(xp.mean(xf * xf, axis=axes, keepdims=True) + eps)
        return (xf * inv * s).astype(x.dtype, copy=False)
    return run


@kernel("GroupNormalization")
def _groupnorm(node, xp):
    eps = node.a("epsilon", 1e-5)
    groups = node.a("num_groups")

    def run(ins, outs, ws):
        x, s, b = ins
        N, C = x.shape[:2]
        xg = x.reshape(N, groups, -1).astype(xp.float32 if x.dtype != np.float64 else x.dtype)
        m = xg.mean(axis=2, keepdims=True)
        v = ((xg - m) ** 2).mean(axis=2, keepdims=True)
        y = ((xg - m) / xp.sqrt(v + eps)).reshape(x.shape)
        shp = (1, C) + (1,) * (x.ndim - 2)
        if s.shape[0] != C:  # opset 18: one scale/bias per group
            s, b = xp.repeat(s, C // groups), xp.repeat(b, C // groups)
        return (y * s.reshape(shp) + b.reshape(shp)).astype(x.dtype, copy=False)
    return run
