"""Detection, sampling and image-geometry kernels: GridSample, NonMaxSuppression, RoiAlign,
AffineGrid, Col2Im, MaxUnpool, DeformConv.

GridSample is separable: each spatial axis gives its taps (1 nearest, 2 linear, 4 cubic) and
weights per output point; their outer product gives flat tap indices, and each tap is one
gather of whole channel rows. NonMaxSuppression computes the IoU test for all box pairs at
once; only the greedy walk over candidates (inherently sequential) runs on the host.
RoiAlign's average is separable too (bin matrices on each box's crop). Where onnx's reference
and ONNX Runtime disagree (GridSample cubic with border padding, MaxUnpool with output_shape),
these kernels follow ONNX Runtime and PyTorch, whose models they run.
"""

from __future__ import annotations

import math

import numpy as np

from opc.runtime.registry import kernel
from opc.runtime.xp import host_ints, to_host

CUBIC_A = -0.75


def _reflect(xp, x, lo, hi):
    """Fold ``x`` back into [lo, hi] by reflecting at the borders (any number of times)."""
    rng = hi - lo
    if rng <= 0:
        return xp.full(x.shape, lo, dtype=x.dtype)
    below, above = x < lo, x > hi
    dx = xp.where(below, lo - x, x - hi)
    n = xp.trunc(dx / rng)
    r = dx - n * rng
    even = (n % 2) == 0
    from_lo, from_hi = lo + r, hi - r
    folded = xp.where(below, xp.where(even, from_lo, from_hi), xp.where(even, from_hi, from_lo))
    return xp.where(below | above, folded, x).astype(x.dtype)


def _cubic_weights(xp, t):
    a = CUBIC_A
    t1, u, u1 = t + 1, 1 - t, 2 - t
    return [((a * t1 - 5 * a) * t1 + 8 * a) * t1 - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * u - (a + 3)) * u * u + 1,
            ((a * u1 - 5 * a) * u1 + 8 * a) * u1 - 4 * a]


@kernel("GridSample")
def _grid_sample(node, xp):
    mode = node.a("mode", "linear" if node.opset >= 20 else "bilinear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    padding = node.a("padding_mode", "zeros")
    align = bool(node.a("align_corners", 0))
    if mode not in ("nearest", "linear", "cubic") or padding not in ("zeros", "border", "reflection"):
        node.fail(f"mode '{mode}' / padding_mode '{padding}' is not supported")

    def axis_taps(g, size):
        """Tap indices (P, T) and weights (P, T) along one axis of length ``size``."""
        x = ((g + 1) / 2 * (size - 1) if align else ((g + 1) * size - 1) / 2).astype(xp.float32)
        lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
        if mode == "nearest":
            x = xp.rint(x)
        if padding == "border" and mode != "cubic":
            # cubic keeps the coordinate and clamps each tap (as PyTorch and ONNX Runtime do;
            # onnx's reference clamps the coordinate first, which changes the weights)
            x = xp.where((x < lo) | (x > hi), xp.clip(x, 0, size - 1), x)
        elif padding == "reflection":
            x = _reflect(xp, x, lo, hi)
        if mode == "nearest":
            idx = xp.trunc(x)[..., None]
            w = xp.ones(idx.shape, dtype=xp.float32)
        else:
            x0 = xp.floor(x)
            t = x - x0
            if mode == "linear":
                idx = xp.stack([x0, x0 + 1], axis=-1)
                w = xp.stack([1 - t, t], axis=-1)
            else:
                idx = xp.stack([x0 - 1, x0, x0 + 1, x0 + 2], axis=-1)
                w = xp.stack(_cubic_weights(xp, t), axis=-1)
        if padding == "zeros":
            w = xp.where((idx >= 0) & (idx <= size - 1), w, 0)
        elif padding == "reflection":
            idx = xp.trunc(_reflect(xp, idx, lo, hi))
        idx = xp.clip(idx, 0, size - 1).astype(xp.int64)
        return idx, w

    def run(ins, outs, ws):
        x, grid = ins
        n, c = x.shape[:2]
        dims = x.shape[2:]
        nd = len(dims)
        out_sp = grid.shape[1:-1]
        p = int(math.prod(out_sp))
        g = grid.reshape(n, p, nd)
        flat = xp.zeros((n, p, 1), dtype=xp.int64)
        weight = xp.ones((n, p, 1), dtype=xp.float32)
        stride = 1
        for d in range(nd - 1, -1, -1):  # the grid's last coordinate indexes the first spatial axis
            idx, w = axis_taps(g[..., nd - 1 - d], dims[d])
            flat = (flat[..., :, None] + idx[..., None, :] * stride).reshape(n, p, -1)
            weight = (weight[..., :, None] * w[..., None, :]).reshape(n, p, -1)
            stride *= dims[d]
        taps = flat.shape[-1]
        flat = xp.ascontiguousarray(flat.transpose(0, 2, 1))  # (N, T, P): one contiguous row per tap
        weight = xp.ascontiguousarray(weight.transpose(0, 2, 1)).astype(x.dtype)
        xf = x.reshape(n, c, -1)
        y = xp.zeros((n, c, p), dtype=x.dtype)
        for b in range(n):  # per image and tap, one gather of whole channel rows (contiguous reads)
            for t in range(taps):
                y[b] += xp.take(xf[b], flat[b, t], axis=1) * weight[b, t]
        return y.reshape((n, c) + tuple(out_sp))
    return run


def _suppression_matrix(xp, boxes, center, thr):
    """(B, N, N) bool: box j is suppressed by box i (IoU > thr, positive areas), in float32."""
    b = boxes.astype(xp.float32)
    if center:
        half_w, half_h = b[..., 2] / 2, b[..., 3] / 2
        x0, x1, y0, y1 = b[..., 0] - half_w, b[..., 0] + half_w, b[..., 1] - half_h, b[..., 1] + half_h
    else:  # [y1, x1, y2, x2], corners in either order
        y0, y1 = xp.minimum(b[..., 0], b[..., 2]), xp.maximum(b[..., 0], b[..., 2])
        x0, x1 = xp.minimum(b[..., 1], b[..., 3]), xp.maximum(b[..., 1], b[..., 3])
    inter = xp.minimum(x1[:, :, None], x1[:, None, :])
    inter -= xp.maximum(x0[:, :, None], x0[:, None, :])
    xp.maximum(inter, 0, out=inter)
    ih = xp.minimum(y1[:, :, None], y1[:, None, :])
    ih -= xp.maximum(y0[:, :, None], y0[:, None, :])
    xp.maximum(ih, 0, out=ih)
    inter *= ih  # overlap area, 0 where the boxes do not overlap
    area = (x1 - x0) * (y1 - y0)
    union = area[:, :, None] + area[:, None, :]
    union -= inter
    ok = inter > 0
    ok &= (area > 0)[:, :, None] & (area > 0)[:, None, :]
    union[~ok] = 1
    inter /= union
    return ok & (inter > thr)


@kernel("NonMaxSuppression", dynamic=True)
def _nms(node, xp):
    center = int(node.a("center_point_box", 0))

    def scalar(ins, i, default, cast):
        if len(ins) > i and ins[i] is not None and ins[i].size:
            return cast(to_host(ins[i]).reshape(-1)[0])
        return default

    def run(ins, outs, ws):
        boxes, scores = ins[:2]
        max_out = max(scalar(ins, 2, 0, int), 0)
        iou_thr = scalar(ins, 3, 0.0, float)
        score_thr = scalar(ins, 4, None, float)
        nb, nc, n = scores.shape
        if max_out == 0 or n == 0:
            return xp.zeros((0, 3), dtype=xp.int64)
        sup = to_host(_suppression_matrix(xp, boxes, center, iou_thr))
        sc = to_host(scores)
        picked = []
        for bi in range(nb):
            # who suppresses whom, as short lists: pairs over the IoU threshold are few
            rows, cols = np.nonzero(sup[bi])
            starts = np.searchsorted(rows, np.arange(n + 1)).tolist()
            cols = cols.tolist()
            orders = np.argsort(-sc[bi], axis=1, kind="stable")  # equal scores: lower box index first
            for ci in range(nc):
                s, order = sc[bi, ci], orders[ci]
                if score_thr is not None:
                    order = order[s[order] > score_thr]
                dead = bytearray(n)
                kept = 0
                for j in order.tolist():
                    if dead[j]:
                        continue
                    picked.append((bi, ci, j))
                    kept += 1
                    if kept >= max_out:
                        break
                    for i in cols[starts[j]:starts[j + 1]]:
                        dead[i] = 1
        res = np.array(picked, dtype=np.int64).reshape(-1, 3)
        return xp.asarray(res)
    return run


@kernel("RoiAlign")
def _roi_align(node, xp):
    mode = node.a("mode", "avg")
    ph, pw = int(node.a("output_height", 1)), int(node.a("output_width", 1))
    ratio = int(node.a("sampling_ratio", 0))
    scale = float(node.a("spatial_scale", 1.0))
    half = node.a("coordinate_transformation_mode", "half_pixel" if node.opset >= 16 else "output_half_pixel") \
        == "half_pixel"
    if mode not in ("avg", "max"):
        node.fail(f"mode '{mode}' is not avg/max")

    def axis(start, bin_size, pooled, grid, size):
        """Sample positions of R boxes along one axis: low/high indices and the weights of each
        (zero outside [-1, size]), all (R, pooled*grid)."""
        k = np.arange(pooled * grid)
        pos = start[:, None] + (k // grid) * bin_size[:, None] + ((k % grid) + 0.5) * (bin_size / grid)[:, None]
        valid = (pos >= -1.0) & (pos <= size)
        pos = np.maximum(pos, 0)
        low = pos.astype(np.int64)
        edge = low >= size - 1
        low = np.where(edge, size - 1, low)
        high = np.where(edge, size - 1, low + 1)
        frac = np.where(edge, 0.0, pos - low)
        return low, high, np.where(valid, 1 - frac, 0), np.where(valid, frac, 0)

    def run(ins, outs, ws):
        x, rois, bidx = ins
        n_roi = rois.shape[0]
        c, h, w = x.shape[1:]
        box = to_host(rois).astype(np.float64) * scale - (0.5 if half else 0.0)
        b_host = np.asarray(host_ints(bidx), dtype=np.int64)
        rw, rh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
        if not half:
            rw, rh = np.maximum(rw, 1.0), np.maximum(rh, 1.0)
        gh = np.full(n_roi, ratio) if ratio > 0 else np.ceil(rh / ph).astype(np.int64)
        gw = np.full(n_roi, ratio) if ratio > 0 else np.ceil(rw / pw).astype(np.int64)
        res = xp.zeros((n_roi, c, ph, pw), dtype=x.dtype)
        for r in range(n_roi):
            sh, sw = int(gh[r]), int(gw[r])
            if sh * sw == 0:
                continue  # an empty grid averages nothing: zeros
            yl, yh, wyl, wyh = (a[0] for a in axis(box[r:r + 1, 1], rh[r:r + 1] / ph, ph, sh, h))
            xl, xh, wxl, wxh = (a[0] for a in axis(box[r:r + 1, 0], rw[r:r + 1] / pw, pw, sw, w))
            y0, y1, x0, x1 = int(yl.min()), int(yh.max()) + 1, int(xl.min()), int(xh.max()) + 1
            crop = x[b_host[r], :, y0:y1, x0:x1]
            if mode == "avg":
                # bilinear weights are separable: the bin averages are Ay @ crop @ Ax^T
                ay, ax = _bin_matrix(yl - y0, yh - y0, wyl, wyh, ph, sh, y1 - y0), \
                    _bin_matrix(xl - x0, xh - x0, wxl, wxh, pw, sw, x1 - x0)
                v = xp.matmul(xp.matmul(xp.asarray(ay.astype(x.dtype)), crop), xp.asarray(ax.T.astype(x.dtype)))
            else:  # the largest weighted corner of each sample, then the largest sample
                terms = []
                for yi, wy in ((yl - y0, wyl), (yh - y0, wyh)):
                    for xi, wx in ((xl - x0, wxl), (xh - x0, wxh)):
                        wgt = xp.asarray((wy[:, None] * wx[None, :]).astype(x.dtype))
                        terms.append(crop[:, xp.asarray(yi)[:, None], xp.asarray(xi)[None, :]] * wgt)
                v = xp.maximum(xp.maximum(terms[0], terms[1]), xp.maximum(terms[2], terms[3]))
                v = v.reshape(c, ph, sh, pw, sw).max(axis=(2, 4))
            res[r] = v
        return res
    return run


def _bin_matrix(low, high, w_low, w_high, pooled, grid, size):
    """(pooled, size) host matrix: row p averages the bilinear weights of bin p's samples."""
    m = np.zeros((pooled, size))
    bins = np.arange(pooled * grid) // grid
    np.add.at(m, (bins, low), w_low)
    np.add.at(m, (bins, high), w_high)
    return m / grid


@kernel("AffineGrid", dynamic=True)
def _affine_grid(node, xp):
    align = bool(node.a("align_corners", 0))

    def base(size):
        if align:
            return np.linspace(-1.0, 1.0, size) if size > 1 else np.full(1, -1.0)
        return (2 * np.arange(size) + 1) / size - 1

    def run(ins, outs, ws):
        theta = ins[0]
        sizes = host_ints(ins[1])[2:]
        nd = len(sizes)
        axes = np.meshgrid(*[base(s) for s in sizes], indexing="ij")  # D, H, W order
        # homogeneous points (x, y[, z], 1): the first coordinate indexes the last axis
        pts = np.stack([a.reshape(-1) for a in axes[::-1]] + [np.ones(axes[0].size)], axis=0)
        pts = xp.asarray(pts.astype(theta.dtype))
        grid = xp.matmul(theta, pts)  # (N, nd, P)
        return xp.ascontiguousarray(grid.transpose(0, 2, 1)).reshape((theta.shape[0],) + tuple(sizes) + (nd,))
    return run


@kernel("Col2Im", dynamic=True)
def _col2im(node, xp):
    def run(ins, outs, ws):
        x = ins[0]
        image = host_ints(ins[1])
        block = host_ints(ins[2])
        nd = len(image)
        dil = list(node.a("dilations") or [1] * nd)
        pads = list(node.a("pads") or [0] * (2 * nd))
        strides = list(node.a("strides") or [1] * nd)
        n = x.shape[0]
        k = int(math.prod(block))
        c = x.shape[1] // k
        cols = [(image[i] + pads[i] + pads[i + nd] - dil[i] * (block[i] - 1) - 1) // strides[i] + 1
                for i in range(nd)]
        if int(math.prod(cols)) != x.shape[2]:
            node.fail(f"{x.shape[2]} blocks given, the geometry makes {int(math.prod(cols))}")
        padded = xp.zeros((n, c) + tuple(image[i] + pads[i] + pads[i + nd] for i in range(nd)), dtype=x.dtype)
        blocks = x.reshape((n, c, k) + tuple(cols))
        # each kernel offset hits a strided sub-grid of the padded image once: no collisions
        for t, off in enumerate(np.ndindex(*block)):
            sl = tuple(slice(off[i] * dil[i], off[i] * dil[i] + strides[i] * (cols[i] - 1) + 1, strides[i])
                       for i in range(nd))
            padded[(slice(None), slice(None)) + sl] += blocks[:, :, t]
        crop = tuple(slice(pads[i], pads[i] + image[i]) for i in range(nd))
        return xp.ascontiguousarray(padded[(slice(None), slice(None)) + crop])
    return run


@kernel("MaxUnpool", dynamic=True)
def _max_unpool(node, xp):
    kernel_shape = list(node.a("kernel_shape"))
    nd = len(kernel_shape)
    pads = list(node.a("pads") or [0] * (2 * nd))
    strides = list(node.a("strides") or [1] * nd)

    def run(ins, outs, ws):
        x, idx = ins[:2]
        inferred = list(x.shape[:2]) + [(x.shape[i + 2] - 1) * strides[i] - pads[i] - pads[i + nd] + kernel_shape[i]
                                        for i in range(nd)]
        shape = host_ints(ins[2]) if len(ins) > 2 and ins[2] is not None else inferred
        # MaxPool's indices are flat over the whole tensor it pooled, which is the output here
        res = xp.zeros(int(math.prod(shape)), dtype=x.dtype)
        res[idx.reshape(-1)] = x.reshape(-1)
        return res.reshape(shape)
    return run


@kernel("DeformConv")
def _deform_conv(node, xp):
    group = int(node.a("group", 1))
    off_groups = int(node.a("offset_group", 1))

    def run(ins, outs, ws):
        x, w, offset = ins[:3]
        bias, mask = (ins[i] if len(ins) > i else None for i in (3, 4))
        if x.ndim != 4:
            node.fail("only 2-D deformable convolution is supported")
        n, ic, ih, iw = x.shape
        oc = w.shape[0]
        kh, kw = node.a("kernel_shape") or w.shape[2:]
        sh, sw = node.a("strides") or (1, 1)
        dh, dw = node.a("dilations") or (1, 1)
        pads = node.a("pads") or (0, 0, 0, 0)
        oh, ow = offset.shape[2:]
        want = ((ih + pads[0] + pads[2] - (kh - 1) * dh - 1) // sh + 1,
                (iw + pads[1] + pads[3] - (kw - 1) * dw - 1) // sw + 1)
        if (oh, ow) != want:
            node.fail(f"offset's spatial shape {(oh, ow)} is not the output's {want}")
        g, k, p = off_groups, kh * kw, oh * ow
        off = offset.reshape(n, g, kh, kw, 2, oh, ow).astype(xp.float64)
        base_h = (xp.arange(kh) * dh).reshape(kh, 1, 1, 1) + (xp.arange(oh) * sh - pads[0]).reshape(1, 1, oh, 1)
        base_w = (xp.arange(kw) * dw).reshape(1, kw, 1, 1) + (xp.arange(ow) * sw - pads[1]).reshape(1, 1, 1, ow)
        ys = (off[:, :, :, :, 0] + base_h).reshape(n, g, k * p)  # sampling rows, (N, G, K*P)
        xs = (off[:, :, :, :, 1] + base_w).reshape(n, g, k * p)
        y0, x0 = xp.floor(ys), xp.floor(xs)
        xt = x.reshape(n, g, ic // g, ih * iw).transpose(0, 1, 3, 2)  # (N, G, HW, C/G)
        ni, gi = xp.arange(n).reshape(n, 1, 1), xp.arange(g).reshape(1, g, 1)
        cols = 0
        for dy in (0, 1):
            for dx in (0, 1):
                yy, xx = y0 + dy, x0 + dx
                wgt = (1 - xp.abs(ys - yy)) * (1 - xp.abs(xs - xx))
                ok = (yy >= 0) & (yy < ih) & (xx >= 0) & (xx < iw)
                flat = (xp.clip(yy, 0, ih - 1) * iw + xp.clip(xx, 0, iw - 1)).astype(xp.int64)
                cols = cols + xt[ni, gi, flat] * xp.where(ok, wgt, 0).astype(x.dtype)[..., None]
        if mask is not None:
            cols = cols * mask.reshape(n, g, k * p, 1)
        # (N, G, K*P, C/G) -> (N, C, K, P) -> per conv group (N, group, C/group*K, P)
        cols = cols.reshape(n, g, k, p, ic // g).transpose(0, 1, 4, 2, 3).reshape(n, group, ic // group * k, p)
        wg = w.reshape(group, oc // group, -1)
        y = xp.matmul(wg, cols).reshape(n, oc, oh, ow)
        if bias is not None:
            y = y + bias.reshape(1, oc, 1, 1)
        return y.astype(x.dtype)
    return run
