"""Recurrent layers: LSTM, GRU, RNN (ONNX layouts, both directions, sequence_lens, clip).

The input projection of all time steps is one GEMM; each step then does one (batch, H) x
(H, gates) GEMM and the gate maths.
"""

from __future__ import annotations

import numpy as np

from opc.runtime.registry import const_input, kernel
from opc.runtime.xp import is_numpy


def _act(xp, name, alpha, beta):
    name = name.lower()
    if name == "sigmoid":
        return lambda v: 1.0 / (1.0 + xp.exp(-v))
    if name == "tanh":
        return xp.tanh
    if name == "relu":
        return lambda v: xp.maximum(v, 0)
    if name == "hardsigmoid":
        a, b = (0.2 if alpha is None else alpha), (0.5 if beta is None else beta)
        return lambda v: xp.clip(a * v + b, 0, 1)
    if name == "leakyrelu":
        a = 0.01 if alpha is None else alpha
        return lambda v: xp.where(v >= 0, v, a * v)
    if name == "thresholdedrelu":
        a = 1.0 if alpha is None else alpha
        return lambda v: xp.where(v > a, v, 0)
    if name == "scaledtanh":
        return lambda v: alpha * xp.tanh(beta * v)
    if name == "affine":
        return lambda v: alpha * v + beta
    if name == "elu":
        a = 1.0 if alpha is None else alpha
        return lambda v: xp.where(v >= 0, v, a * (xp.exp(v) - 1))
    if name == "softsign":
        return lambda v: v / (1 + xp.absolute(v))
    if name == "softplus":
        return lambda v: xp.log1p(xp.exp(v))
    raise ValueError(f"activation {name} is not supported")


def _acts(node, xp, defaults, dirs):
    names = list(node.a("activations") or defaults * dirs)
    alphas = list(node.a("activation_alpha") or [])
    betas = list(node.a("activation_beta") or [])
    res = []
    for i, n in enumerate(names):
        res.append(_act(xp, n, alphas[i] if i < len(alphas) else None, betas[i] if i < len(betas) else None))
    return res


def _common(node, ins, xp, gates):
    x, w, r = ins[0], ins[1], ins[2]
    layout = node.a("layout", 0)
    if layout:
        x = xp.swapaxes(x, 0, 1)
    seq, batch, _ = x.shape
    dirs, gh, _ = w.shape
    H = gh // gates
    b = ins[3] if len(ins) > 3 and ins[3] is not None else xp.zeros((dirs, 2 * gh), dtype=x.dtype)
    lens = ins[4] if len(ins) > 4 and ins[4] is not None else None
    h0 = ins[5] if len(ins) > 5 and ins[5] is not None else None
    if h0 is not None and layout:
        h0 = xp.swapaxes(h0, 0, 1)
    return x, w, r, b, lens, h0, seq, batch, dirs, H, layout


def _run_dirs(node, xp, x, lens, dirs, seq, batch, H, cell, layout, states):
    """Run ``cell(d, t, xw_t, state) -> state`` over time for every direction."""
    direction = node.a("direction", "forward")
    ys = xp.zeros((seq, dirs, batch, H), dtype=x.dtype)
    finals = []
    lens_h = np.full(batch, seq) if lens is None else np.asarray(lens.get() if hasattr(lens, "get") else lens)
    for d in range(dirs):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        state = states[d]
        for step in range(seq):
            t = seq - 1 - step if reverse else step
            new = cell(d, t, state)
            if lens is not None:  # rows whose sequence ended keep their state and output 0
                alive = xp.asarray((t < lens_h).reshape(-1, 1))
                new = tuple(xp.where(alive, n, s) for n, s in zip(new, state))
                ys[t, d] = xp.where(alive, new[0], 0)
            else:
                ys[t, d] = new[0]
            state = new
        finals.append(state)
    return ys, finals


def _outputs(node, xp, ys, finals, layout, n_states):
    res = []
    y = ys
    if layout:
        y = xp.transpose(ys, (2, 0, 1, 3))
    res.append(y)
    for k in range(n_states):
        s = xp.stack([f[k] for f in finals])
        res.append(xp.swapaxes(s, 0, 1) if layout else s)
    return res


@kernel("LSTM")
def _lstm(node, xp):
    clip = node.a("clip")
    input_forget = node.a("input_forget", 0)
    default_acts = [a.lower() for a in node.a("activations") or []] in ([], ["sigmoid", "tanh", "tanh"],
                                                                       ["sigmoid", "tanh", "tanh"] * 2)
    cache = {}

    def run(ins, outs, ws):
        x, w, r, b, lens, h0, seq, batch, dirs, H, layout = _common(node, ins, xp, 4)
        c0 = ins[6] if len(ins) > 6 and ins[6] is not None else None
        if c0 is not None and layout:
            c0 = xp.swapaxes(c0, 0, 1)
        p = ins[7] if len(ins) > 7 and ins[7] is not None else None
        if default_acts and clip is None and not input_forget and p is None and lens is None:
            bias = ins[3] if len(ins) > 3 else None
            keep = const_input(node, 1) and const_input(node, 2) and (bias is None or const_input(node, 3))
            return _lstm_fast(node, xp, x, _lstm_weights(xp, cache if keep else {}, w, r, bias, H),
                              h0, c0, seq, batch, dirs, H, layout)
        acts = _acts(node, xp, ["Sigmoid", "Tanh", "Tanh"], dirs)
        xw = [xp.matmul(x, w[d].T) + b[d, :4 * H] + b[d, 4 * H:] for d in range(dirs)]  # (seq, batch, 4H)
        zeros = xp.zeros((batch, H), dtype=x.dtype)
        states = [(h0[d] if h0 is not None else zeros, c0[d] if c0 is not None else zeros) for d in range(dirs)]

        def cell(d, t, state):
            h, c = state
            f_, g_, h_ = acts[3 * d], acts[3 * d + 1], acts[3 * d + 2]
            z = xw[d][t] + xp.matmul(h, r[d].T)
            if clip is not None:
                z = xp.clip(z, -clip, clip)
            zi, zo, zf, zc = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
            if p is not None:
                zi = zi + p[d, :H] * c
                zf = zf + p[d, 2 * H:] * c
            i = f_(zi)
            f = 1 - i if input_forget else f_(zf)
            c_new = f * c + i * g_(zc)
            if p is not None:
                zo = zo + p[d, H:2 * H] * c_new
            o = f_(zo)
            return (o * h_(c_new)).astype(x.dtype), c_new.astype(x.dtype)

        ys, finals = _run_dirs(node, xp, x, lens, dirs, seq, batch, H, cell, layout, states)
        return _outputs(node, xp, ys, finals, layout, 2)
    return run


@kernel("GRU")
def _gru(node, xp):
    clip = node.a("clip")
    lbr = node.a("linear_before_reset", 0)

    def run(ins, outs, ws):
        x, w, r, b, lens, h0, seq, batch, dirs, H, layout = _common(node, ins, xp, 3)
        acts = _acts(node, xp, ["Sigmoid", "Tanh"], dirs)
        xw = [xp.matmul(x, w[d].T) + b[d, :3 * H] for d in range(dirs)]
        zeros = xp.zeros((batch, H), dtype=x.dtype)
        states = [(h0[d] if h0 is not None else zeros,) for d in range(dirs)]

        def cell(d, t, state):
            (h,) = state
            f_, g_ = acts[2 * d], acts[2 * d + 1]
            rb = b[d, 3 * H:]
            xz = xw[d][t]
            if clip is not None:
                xz = xp.clip(xz, -clip, clip)
            hr = xp.matmul(h, r[d, :2 * H].T) + rb[:2 * H]
            zr = xz[:, :2 * H] + hr
            if clip is not None:
                zr = xp.clip(zr, -clip, clip)
            z, rr = f_(zr[:, :H]), f_(zr[:, H:])
            if lbr:
                hh = xz[:, 2 * H:] + rr * (xp.matmul(h, r[d, 2 * H:].T) + rb[2 * H:])
            else:
                hh = xz[:, 2 * H:] + xp.matmul(rr * h, r[d, 2 * H:].T) + rb[2 * H:]
            if clip is not None:
                hh = xp.clip(hh, -clip, clip)
            hn = (1 - z) * g_(hh) + z * h
            return (hn.astype(x.dtype),)

        ys, finals = _run_dirs(node, xp, x, lens, dirs, seq, batch, H, cell, layout, states)
        return _outputs(node, xp, ys, finals, layout, 1)
    return run


@kernel("RNN")
def _rnn(node, xp):
    clip = node.a("clip")

    def run(ins, outs, ws):
        x, w, r, b, lens, h0, seq, batch, dirs, H, layout = _common(node, ins, xp, 1)
        acts = _acts(node, xp, ["Tanh"], dirs)
        xw = [xp.matmul(x, w[d].T) + b[d, :H] + b[d, H:] for d in range(dirs)]
        zeros = xp.zeros((batch, H), dtype=x.dtype)
        states = [(h0[d] if h0 is not None else zeros,) for d in range(dirs)]

        def cell(d, t, state):
            z = xw[d][t] + xp.matmul(state[0], r[d].T)
            if clip is not None:
                z = xp.clip(z, -clip, clip)
            return (acts[d](z).astype(x.dtype),)

        ys, finals = _run_dirs(node, xp, x, lens, dirs, seq, batch, H, cell, layout, states)
        return _outputs(node, xp, ys, finals, layout, 1)
    return run


def _lstm_weights(xp, cache, w, r, b, H):
    """Per direction: W^T, R^T and the summed biases in the gate order (o, i, f, c), with the
    sigmoid gates' columns halved (see ``_lstm_fast``); kept in ``cache`` (constant weights)."""
    hit = cache.get("w")
    if hit is not None and hit[0] is w and hit[1] is r and hit[2] is b:
        return hit[3]
    dt = w.dtype
    half = dt.type(0.5)
    order = [slice(H, 2 * H), slice(0, H), slice(2 * H, 3 * H), slice(3 * H, 4 * H)]  # ONNX: i, o, f, c
    res = []
    for d in range(w.shape[0]):
        wt = xp.concatenate([w[d][o] for o in order], axis=0).T
        rt = xp.concatenate([r[d][o] for o in order], axis=0).T
        if b is not None:
            bs = b[d, :4 * H] + b[d, 4 * H:]
            bs = xp.concatenate([bs[o] for o in order])
        else:
            bs = xp.zeros((4 * H,), dtype=dt)
        wt, rt, bs = (xp.ascontiguousarray(a.astype(dt)) for a in (wt, rt, bs))
        for a in (wt, rt, bs):
            a[..., :3 * H] *= half
        res.append((wt, rt, bs))
    cache["w"] = (w, r, b, res)
    return res


def _lstm_fast(node, xp, x, weights, h0, c0, seq, batch, dirs, H, layout):
    """Default activations, no clip/peepholes/lengths: the input projection of all steps is one
    GEMM; each step is one (batch, H) x (H, 4H) GEMM and eight in-place element-wise calls on
    preallocated buffers (the step loop is Python-bound at small batch).

    sigmoid(v) = 0.5 * tanh(v / 2) + 0.5: with the o, i, f columns pre-halved, one tanh over all
    four gates serves the three sigmoids and the cell candidate. The gates sit as (o, i, f, g)
    in a (batch, 5H) buffer followed by the cell state c, so [i, f] * [g, c] is one multiply
    and c = i*g + f*c one add."""
    direction = node.a("direction", "forward")
    dt = x.dtype
    ys = xp.empty((seq, dirs, batch, H), dtype=dt)
    zz = xp.empty((batch, 5 * H), dtype=dt)
    prod = xp.empty((batch, 2 * H), dtype=dt)
    tmp = xp.empty((batch, H), dtype=dt)
    z, s, o, fi, gc, c = zz[:, :4 * H], zz[:, :3 * H], zz[:, :H], zz[:, H:3 * H], zz[:, 3 * H:], zz[:, 4 * H:]
    p_ig, p_fc = prod[:, :H], prod[:, H:]
    half = dt.type(0.5)
    mul, add, tanh, matmul = xp.multiply, xp.add, xp.tanh, xp.matmul
    x2 = x.reshape(seq * batch, x.shape[2])
    direct = batch == 1 or is_numpy(xp)  # z is a strided view for batch > 1: only NumPy's matmul takes that out=
    hs, cs = [], []
    for d in range(dirs):
        wt, rt, bs = weights[d]
        xw = matmul(x2, wt).reshape(seq, batch, 4 * H)
        xw += bs
        h = h0[d].astype(dt) if h0 is not None else xp.zeros((batch, H), dtype=dt)
        if c0 is not None:
            c[...] = c0[d]
        else:
            c[...] = 0
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        for step in range(seq):
            t = seq - 1 - step if reverse else step
            if direct:
                matmul(h, rt, out=z)
                add(z, xw[t], out=z)
            else:
                add(matmul(h, rt), xw[t], out=z)
            tanh(z, out=z)
            mul(s, half, out=s)
            add(s, half, out=s)
            mul(fi, gc, out=prod)
            add(p_ig, p_fc, out=c)
            tanh(c, out=tmp)
            h = ys[t, d]
            mul(o, tmp, out=h)
        hs.append(h)
        cs.append(c.copy())
    return _outputs(node, xp, ys, [(h, c) for h, c in zip(hs, cs)], layout, 2)
