"""Recurrent layers: LSTM, GRU, RNN (ONNX layouts, both directions, sequence_lens, clip).

The input projection of all time steps is one GEMM; each step then does one (batch, H) x
(H, gates) GEMM and the gate maths. Stacked forward LSTMs joined by Squeeze (PyTorch's export
of a multi-layer nn.LSTM) are fused at load (``fuse_stacked_lstm``, called by
``compile_graph``) into one step that runs the layers as a wavefront: seq + L - 1 steps of the
combined state instead of L * seq.
"""

from __future__ import annotations

import numpy as np

from opc.runtime.registry import const_input, kernel
from opc.runtime.xp import is_numpy, load_host, to_host


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
    lens_h = np.full(batch, seq) if lens is None else to_host(lens)
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


def _lstm_fast(node, xp, x, weights, h0, c0, seq, batch, dirs, H, layout, ys=None, xw_buf=None, bufs=None,
               xg_buf=None):
    """Default activations, no clip/peepholes/lengths: the input projection of all steps is one
    GEMM; each step is one (batch, H) x (H, 4H) GEMM and eight element-wise calls on
    preallocated buffers (``_lstm_steps``; the step loop is Python-bound at small batch).
    ``ys`` (seq, dirs, batch, H), ``xw_buf`` and ``xg_buf`` (seq * batch * 4H values; the
    second holds the gate-major copy) and ``bufs``: given buffers."""
    direction = node.a("direction", "forward")
    dt = x.dtype
    ys = xp.empty((seq, dirs, batch, H), dtype=dt) if ys is None else ys
    bufs = _step_buffers(xp, batch, H, dt) if bufs is None else bufs
    c = bufs[-1]
    gm = _gate_major(batch)
    x2 = x.reshape(seq * batch, x.shape[2])
    hs, cs = [], []
    for d in range(dirs):
        wt, rt, bs = weights[d]
        xw = xp.matmul(x2, wt, out=xw_buf).reshape(seq, batch, 4 * H)
        xw += bs
        if gm:  # (seq, 4, batch, H): one transposing pass, then every gate block is contiguous
            xg = xp.empty((seq, 4, batch, H), dtype=dt) if xg_buf is None else xg_buf.reshape(seq, 4, batch, H)
            xg[...] = xw.reshape(seq, batch, 4, H).transpose(0, 2, 1, 3)
            xw, rt = xg, _gate_major_matrix(xp, rt)  # a small copy per run: not held between runs
        h = h0[d].astype(dt) if h0 is not None else xp.zeros((batch, H), dtype=dt)
        if c0 is not None:
            c[...] = c0[d]
        else:
            c[...] = 0
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        order = range(seq - 1, -1, -1) if reverse else range(seq)
        h = _lstm_steps(xp, bufs, rt, xw, h, [(t, ys[t, d]) for t in order])
        hs.append(h)
        cs.append(c.copy())
    return _outputs(node, xp, ys, [(h, c) for h, c in zip(hs, cs)], layout, 2)


def _gate_major(batch) -> bool:
    """Batches of more than one row keep the gates gate-major, (gate, batch, H): every gate
    group is then one contiguous block (row-major (batch, 5H) makes them strided 2-D views,
    about 25% slower per step); one row keeps (1, 5H), whose GEMV NumPy's dot does fastest."""
    return batch > 1


def _gate_major_matrix(xp, rt):
    """(K, 4H) -> (4, K, H): the recurrent GEMM as four (batch, K) x (K, H) products writing
    the gate-major buffer."""
    K, H4 = rt.shape
    return xp.ascontiguousarray(rt.reshape(K, 4, H4 // 4).transpose(1, 0, 2))


def _step_buffers(xp, batch, H, dt, store=None):
    """The gates (o, i, f, g) followed by the cell state c (gate-major (5, batch, H) or one row
    (1, 5H)), the products and a tanh(c) scratch, from ``store`` (8 * batch * H values) when
    given; the first item says gate-major, the last is the cell state."""
    if store is None:
        store = xp.empty((8 * batch * H,), dtype=dt)
    gm = _gate_major(batch)
    zz = store[:5 * batch * H].reshape((5, batch, H) if gm else (batch, 5 * H))
    prod = store[5 * batch * H:7 * batch * H].reshape((2, batch, H) if gm else (batch, 2 * H))
    tmp = store[7 * batch * H:8 * batch * H].reshape(batch, H)
    return gm, zz, prod, tmp, xp.asarray(0.5, dtype=dt), zz[4] if gm else zz[:, 4 * H:]


def _lstm_steps(xp, bufs, rt, xw, h, steps):
    """Run LSTM steps ``(t, out)`` from state ``h`` (and the cell state in ``bufs``): gates
    z = h @ rt + xw[t], then h -> ``out`` (returned: the last step's h).

    sigmoid(v) = 0.5 * tanh(v / 2) + 0.5: with the o, i, f columns pre-halved, one tanh over all
    four gates serves the three sigmoids and the cell candidate. As the gates sit as (o, i, f, g)
    followed by c, [i, f] * [g, c] is one multiply and c = i*g + f*c one add. The constant 0.5 is
    a 0-d array: a Python or NumPy scalar operand costs NumPy twice the call time."""
    gm, zz, prod, tmp, half, c = bufs
    H = tmp.shape[1]
    if gm:  # rt is (4, K, H), xw[t] (4, batch, H)
        z, s, o, fi, gc = zz[:4], zz[:3], zz[0], zz[1:3], zz[3:]
        p_ig, p_fc = prod[0], prod[1]
    else:  # rt is (K, 4H), xw[t] (1, 4H)
        z, s, o, fi, gc = zz[:, :4 * H], zz[:, :3 * H], zz[:, :H], zz[:, H:3 * H], zz[:, 3 * H:]
        p_ig, p_fc = prod[:, :H], prod[:, H:]
    mul, add, tanh, matmul = xp.multiply, xp.add, xp.tanh, xp.matmul
    if not gm and is_numpy(xp):
        matmul = xp.dot  # one row counts as contiguous: NumPy's dot (GEMV) costs about half of matmul
    for t, out in steps:  # outputs passed positionally: NumPy parses an out= keyword slower
        matmul(h, rt, out=z)
        add(z, xw[t], z)
        tanh(z, z)
        mul(s, half, s)
        add(s, half, s)
        mul(fi, gc, prod)
        add(p_ig, p_fc, c)
        tanh(c, tmp)
        mul(o, tmp, out)
        h = out
    return h


# ---------------------------------------------------------------- stacked layers
_DEFAULT_ACTS = ([], ["sigmoid", "tanh", "tanh"])
WAVEFRONT_MAX_BATCH = 8  # larger batches run the fused layers one after the other (equal at 16, faster at 32)


def _plain_lstm(st, consts) -> bool:
    """An LSTM the wavefront kernel runs: forward, default activations, no clip, peepholes,
    sequence lengths or batch-major layout, constant weights."""
    n = st.node
    if n.op_type != "LSTM" or n.domain or len(st.ins) < 3:
        return False
    if [a.lower() for a in n.a("activations") or []] not in _DEFAULT_ACTS or n.a("clip") is not None \
            or n.a("input_forget", 0) or n.a("layout", 0) or n.a("direction", "forward") != "forward":
        return False
    ins = st.ins + [-1] * (8 - len(st.ins))
    if ins[4] >= 0 or ins[7] >= 0:
        return False
    c = getattr(n, "const_ins", ())
    for k in (1, 2, 3):
        if ins[k] >= 0 and not (k < len(c) and c[k]):
            return False
    return consts[ins[1]].shape[0] == 1


def fuse_stacked_lstm(p, graph_outputs: set[int]) -> int:
    """LSTM -> Squeeze(axis 1) -> LSTM -> ... chains (stacked forward layers whose inner outputs
    feed only the next layer) become one step running the layers as a wavefront
    (``_stacked_lstm``). Returns the number of steps removed."""
    from opc.runtime.program import Step, step_readers
    from opc.runtime.registry import KERNELS, Node, Spec

    readers = step_readers(p)

    def unused(s):
        return s < 0 or (s not in graph_outputs and not readers.get(s))

    def next_layer(i):
        """The index of the LSTM fed by step i's sequence output through a Squeeze, or None."""
        st = p.steps[i]
        y = st.outs[0]
        if y < 0 or y in graph_outputs or not all(unused(s) for s in st.outs[1:]):
            return None
        users = readers.get(y, [])
        if len(users) != 1:
            return None
        sq = p.steps[users[0]]
        if sq.node.op_type != "Squeeze" or sq.node.domain or sq.ins[0] != y or len(sq.outs) != 1:
            return None
        if len(sq.ins) > 1 and sq.ins[1] >= 0:
            if sq.ins[1] not in p.consts:
                return None
            axes = [int(a) for a in load_host(p.consts[sq.ins[1]]).reshape(-1)]
        else:
            axes = list(sq.node.a("axes") or [])
        q = sq.outs[0]
        if axes not in ([1], [-3]) or q < 0 or q in graph_outputs or len(readers.get(q, [])) != 1:
            return None
        k = readers[q][0]
        nxt = p.steps[k]
        if not _plain_lstm(nxt, p.consts) or nxt.ins[0] != q or nxt.ins.count(q) != 1:
            return None
        return users[0], k

    drop, replace = set(), {}
    for i, st in enumerate(p.steps):
        if i in drop or not _plain_lstm(st, p.consts):
            continue
        chain, squeezes = [i], []
        while (nx := next_layer(chain[-1])) is not None:
            squeezes.append(nx[0])
            chain.append(nx[1])
        if len(chain) < 2:
            continue
        layers = [p.steps[j] for j in chain]
        ins, const = [], []
        for li, lst in enumerate(layers):
            lins = (lst.ins + [-1] * 7)[:7]
            if li:
                lins[0] = -1  # the Squeeze of the previous layer's output: internal
            ins += lins
            c = tuple(getattr(lst.node, "const_ins", ())) + (False,) * 7
            const += [False if li and k == 0 else c[k] for k in range(7)]
        last = layers[-1]
        node = Node("LSTM", "", " + ".join(lst.node.name or lst.node.outputs[0] for lst in layers),
                    [p.names[s] if s >= 0 else "" for s in ins], list(last.node.outputs), dict(last.node.attrs),
                    last.node.opset)
        node.captures, node.const_ins = [], tuple(const)
        spec = Spec(KERNELS[("", "LSTM")].build, workspace=stacked_lstm_workspace)
        fused = Step(node, spec, _stacked_lstm(node, p.xp, len(layers)), ins, list(last.outs), last.index)
        replace[chain[-1]] = fused
        drop.update(chain[:-1])
        drop.update(squeezes)
    if not replace:
        return 0
    p.steps = [replace.get(i, st) for i, st in enumerate(p.steps) if i not in drop]
    return len(drop)



def _stacked_lstm(node, xp, L):
    """``L`` stacked forward LSTM layers as one LSTM whose state is all layers' states side by
    side, run as a wavefront: at step k layer l computes its time step k - l, its input being
    layer l-1's h from step k-1, which is in the combined state. The combined recurrent matrix
    is block upper-triangular (R_l on the diagonal, layer l's input weights W_l right of the
    diagonal), so a step is one GEMM and the eight gate calls of ``_lstm_steps`` for all layers
    together: seq + L - 1 steps instead of L * seq. Before layer l starts (k < l) its state is
    reset to its initial one after each step; layer 0's extra steps at the end are discarded."""
    cache = {}

    def weights(ins, dt):
        key = tuple(id(ins[7 * li + k]) for li in range(L) for k in (1, 2, 3))
        hit = cache.get("w")
        if hit is not None and hit[0] == key:
            return hit[1]
        Hs = [int(ins[7 * li + 2].shape[2]) for li in range(L)]
        offs = [sum(Hs[:li]) for li in range(L)]
        HS = sum(Hs)
        D = int(ins[1].shape[2])
        order = (1, 0, 2, 3)  # our gates (o, i, f, g) in ONNX's (i, o, f, c)

        def cols(q, li):
            return slice(q * HS + offs[li], q * HS + offs[li] + Hs[li])

        wc = xp.zeros((D, 4 * Hs[0]), dtype=dt)  # layer 0's input weights, gates (o, i, f, g)
        rc = xp.zeros((HS, 4 * HS), dtype=dt)
        bc = xp.zeros((4 * HS,), dtype=dt)
        for li in range(L):
            H = Hs[li]
            w, r, b = ins[7 * li + 1][0], ins[7 * li + 2][0], ins[7 * li + 3]
            rows = slice(offs[li], offs[li] + H)
            for q, g in enumerate(order):
                blk = slice(g * H, (g + 1) * H)
                if li == 0:
                    wc[:, q * H:(q + 1) * H] = w[blk].T
                else:  # the previous layer's h is this layer's input
                    rc[offs[li - 1]:offs[li - 1] + Hs[li - 1], cols(q, li)] = w[blk].T
                rc[rows, cols(q, li)] = r[blk].T
                if b is not None:
                    bc[cols(q, li)] = b[0, blk] + b[0, 4 * H:][blk]
        wc[:, :3 * Hs[0]] *= dt.type(0.5)
        for a in (rc, bc):
            a[..., :3 * HS] *= dt.type(0.5)
        res = [Hs, offs, wc, rc, bc, None]  # the gate-major rc: made when a batch > 1 first runs
        cache["w"] = (key, res)
        return res

    def frame(seq, batch, D, dt, Hs, ws):
        """Every buffer of a run and the step schedule; carved from the workspace (the same
        view every run of a planned signature) and then kept, else allocated for this run."""
        key = (seq, batch, D, dt, tuple(Hs))
        hit = cache.get("frame")
        if ws is not None and hit is not None and hit[0] == key and hit[1] is ws:
            return hit[2]
        HS, H0, n = sum(Hs), Hs[0], seq + L - 1
        off = 0
        views = []
        for shape in _stacked_shapes(seq, batch, Hs, L):
            v, off = _carve(xp, ws, off, shape, dt)
            views.append(v)
        xw, proj, hbuf, st, init_h, init_c = views
        bufs = _step_buffers(xp, batch, HS, dt, st)
        if _gate_major(batch):  # xw[k] is (4, batch, HS); layer 0's projection lands transposed
            xw = xw.reshape(n, 4, batch, HS)
            blocks = xw[:seq, :, :, :H0]
            proj3 = proj.reshape(seq, batch, 4, H0).transpose(0, 2, 1, 3)
        else:
            blocks = xw.reshape(n * batch, 4, HS)[:seq * batch, :, :H0]
            proj3 = proj.reshape(seq * batch, 4, H0)
        schedule, k = [], 0
        while k < n:
            # steps where no layer starts or ends run as one batch of steps
            stop = k + 1 if k < L - 1 or k >= seq - 1 else seq - 1
            schedule.append((k, stop, [(j, hbuf[j]) for j in range(k, stop)]))
            k = stop
        fr = (xw, proj, proj3, blocks, hbuf, bufs, init_h, init_c, schedule)
        if ws is not None:
            cache["frame"] = (key, ws, fr)
        return fr

    layer_caches = [{} for _ in range(L)]
    ws_now = [None]

    def layer_by_layer(ins, outs, seq, batch):
        # large batches: the per-step GEMM and gate work dominate the per-call cost, and the
        # combined step's zero block (layer l's input columns of later layers' rows) costs more
        # than the calls saved
        h = ins[0]
        dt = h.dtype
        Hs = [int(ins[7 * li + 2].shape[2]) for li in range(L)]
        y = _out(xp, outs, 0, (seq, 1, batch, Hs[-1]), dt)
        views = _carve_all(xp, ws_now[0], _layer_shapes(seq, batch, Hs), dt)
        for li in range(L):
            w, r, b = ins[7 * li + 1], ins[7 * li + 2], ins[7 * li + 3]
            H = Hs[li]
            # inner layers' sequences alternate between two buffers; the last one's is the output
            ys = y if li == L - 1 else views[li % 2].reshape(-1)[:seq * batch * H].reshape(seq, 1, batch, H)
            xw = views[2].reshape(-1)[:seq * batch * 4 * H].reshape(seq * batch, 4 * H)
            bufs = _step_buffers(xp, batch, H, dt, views[3].reshape(-1)[:8 * batch * H])
            xg = views[4].reshape(-1)[:seq * batch * 4 * H]
            res = _lstm_fast(node, xp, h, _lstm_weights(xp, layer_caches[li], w, r, b, H), ins[7 * li + 5],
                             ins[7 * li + 6], seq, batch, 1, H, 0, ys=ys, xw_buf=xw, bufs=bufs, xg_buf=xg)
            h = ys[:, 0]
        return [y] + list(res[1:])

    def run(ins, outs, ws):
        ins = list(ins) + [None] * (7 * L - len(ins))
        x = ins[0]
        dt = x.dtype
        seq, batch = int(x.shape[0]), int(x.shape[1])
        if batch > WAVEFRONT_MAX_BATCH:
            ws_now[0] = ws
            return layer_by_layer(ins, outs, seq, batch)
        wts = weights(ins, dt)
        Hs, offs, wc, rc, bc = wts[:5]
        gm = _gate_major(batch)
        if gm and wts[5] is None:
            wts[5] = _gate_major_matrix(xp, rc)
        rc4 = wts[5]
        HS = sum(Hs)
        last = slice(offs[-1], HS)
        y = _out(xp, outs, 0, (seq, 1, batch, Hs[-1]), dt)
        xw, proj, proj3, blocks, hbuf, bufs, init_h, init_c, schedule = frame(seq, batch, int(x.shape[2]), dt, Hs,
                                                                               ws)
        for init, k in ((init_h, 5), (init_c, 6)):
            if any(ins[7 * li + k] is None for li in range(L)):
                init[...] = 0
            for li in range(L):
                if ins[7 * li + k] is not None:
                    init[:, offs[li]:offs[li] + Hs[li]] = ins[7 * li + k][0]
        if seq == 0:
            return [y, init_h[None, :, last].copy(), init_c[None, :, last].copy()]
        n = seq + L - 1
        # all steps' gate inputs: the biases, plus layer 0's input projection (one GEMM over its
        # own columns only, added into the four gate blocks through one strided view)
        xw[...] = bc.reshape(4, 1, HS) if gm else bc
        xp.matmul(x.reshape(seq * batch, x.shape[2]), wc, out=proj)
        xp.add(blocks, proj3, out=blocks)
        c = bufs[-1]
        c[...] = init_c
        finals = [None] * L
        h = init_h
        for k, stop, steps in schedule:
            h = _lstm_steps(xp, bufs, rc4 if gm else rc, xw, h, steps)
            if stop == k + 1:  # (the batch in the middle holds no such step)
                for li in range(1, L):
                    if k < li:  # layer li has not started: back to its initial state
                        part = slice(offs[li], offs[li] + Hs[li])
                        hbuf[k][:, part] = init_h[:, part]
                        c[:, part] = init_c[:, part]
                for li in range(L):
                    if k == seq - 1 + li:
                        finals[li] = c[:, offs[li]:offs[li] + Hs[li]].copy()
        y[:, 0] = hbuf[L - 1:, :, last]
        yh = _out(xp, outs, 1, (1, batch, Hs[-1]), dt)
        yh[0] = hbuf[n - 1][:, last]
        yc = _out(xp, outs, 2, (1, batch, Hs[-1]), dt)
        yc[0] = finals[-1]
        return [y, yh, yc]
    return run


def _stacked_shapes(seq, batch, Hs, L):
    """Buffers of the wavefront kernel: gate inputs, layer 0's projection, the h of every step,
    gates + cell state, products, tanh(c), initial h and c."""
    HS, n = sum(Hs), max(seq + L - 1, 1)
    return [(n, batch, 4 * HS), (max(seq, 1) * batch, 4 * Hs[0]), (n, batch, HS), (8 * batch * HS,),
            (batch, HS), (batch, HS)]


def stacked_lstm_workspace(node, shapes, dtypes) -> int:
    """Scratch bytes of a fused stack (inputs: 7 per layer, R at 7 * layer + 2)."""
    if not shapes or shapes[0] is None:
        return 0
    L = len(shapes) // 7
    try:
        Hs = [int(shapes[7 * li + 2][2]) for li in range(L)]
    except (TypeError, IndexError):
        return 0
    item = np.dtype(dtypes[0]).itemsize if dtypes and dtypes[0] is not None else 4
    seq, batch = int(shapes[0][0]), int(shapes[0][1])
    parts = _stacked_shapes(seq, batch, Hs, L) if batch <= WAVEFRONT_MAX_BATCH else _layer_shapes(seq, batch, Hs)
    return sum(_align(int(np.prod(s)) * item) for s in parts)


def _layer_shapes(seq, batch, Hs):
    """Buffers of the layer-by-layer run: two inner sequences (alternating), the input
    projection and the step buffers, each sized for the widest layer."""
    H = max(Hs)
    return [(seq * batch * H,), (seq * batch * H,), (seq * batch * 4 * H,), (batch * 8 * H,), (seq * batch * 4 * H,)]


def _carve_all(xp, ws, shapes, dt):
    off, views = 0, []
    for shape in shapes:
        v, off = _carve(xp, ws, off, shape, dt)
        views.append(v)
    return views


def _align(n):
    return (n + 63) // 64 * 64


def _carve(xp, ws, off, shape, dt):
    nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
    if ws is not None and off + nbytes <= ws.size:
        return ws[off:off + nbytes].view(dt).reshape(shape), off + _align(nbytes)
    return xp.empty(shape, dtype=dt), off


def _out(xp, outs, i, shape, dt):
    if outs is not None and i < len(outs) and outs[i] is not None and outs[i].shape == shape \
            and outs[i].dtype == dt:
        return outs[i]
    return xp.empty(shape, dtype=dt)
