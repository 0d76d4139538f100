"""Transformer and sequence-mixing kernels: Attention (opset 23-25), RotaryEmbedding, SwiGLU,
LinearAttention, CausalConvWithState.

Attention keeps grouped-query heads grouped: Q's heads are viewed as (kv_heads, group) so one
batched GEMM per KV head serves its whole group, with no repeated copy of K and V. Masks
(boolean, additive, causal, sliding window, padded KV lengths) are combined into one additive
bias; a query row with no visible key gives zeros, as the spec asks, not NaN.
"""

from __future__ import annotations

import math

import numpy as np

from opc.runtime.k_nn import _align, _take
from opc.runtime.registry import kernel, np_dtype, out_if


def _heads(x, n):
    """(B, S, n*D) -> (B, n, S, D)."""
    b, s = x.shape[:2]
    return x.reshape(b, s, n, -1).transpose(0, 2, 1, 3)


def _attention_bias(xp, dt, mask, causal, left, right, nonpad, past_len, sq, skv):
    """The additive bias (broadcastable to (B, H, Sq, Skv)) in ``dt``, or None when nothing masks."""
    allowed = None  # boolean visibility, broadcastable
    add = None  # a float mask's values
    if mask is not None:
        short = skv - mask.shape[-1]
        if short > 0:  # a mask shorter than the keys hides the keys past its end
            fill = xp.zeros if mask.dtype == bool else (lambda shape, dtype: xp.full(shape, -np.inf, dtype))
            mask = xp.concatenate([mask, fill(mask.shape[:-1] + (short,), mask.dtype)], axis=-1)
        if mask.dtype == bool:
            allowed = mask
        else:
            add = mask.astype(dt)
    if causal or left >= 0 or right >= 0:
        # query i sits at absolute position i + offset: after the past cache, or (external cache)
        # at nonpad_kv_seqlen - Sq for each batch entry
        i = xp.arange(sq, dtype=xp.int64).reshape(sq, 1)
        j = xp.arange(skv, dtype=xp.int64).reshape(1, skv)
        if past_len is None and nonpad is not None:
            off = (nonpad.astype(xp.int64).reshape(-1) - sq).reshape(-1, 1, 1, 1)
        else:
            off = past_len or 0
        d = i + off - j
        vis = None
        if causal:
            vis = d >= 0
        if left >= 0:
            vis = d <= left if vis is None else vis & (d <= left)
        if right >= 0:
            vis = -d <= right if vis is None else vis & (-d <= right)
        allowed = vis if allowed is None else allowed & vis
    if nonpad is not None:
        j = xp.arange(skv, dtype=xp.int64).reshape(1, skv)
        vis = (j < nonpad.astype(xp.int64).reshape(-1, 1)).reshape(-1, 1, 1, skv)
        allowed = vis if allowed is None else allowed & vis
    if allowed is None:
        return add
    zero = xp.zeros((), dtype=dt) if add is None else add
    return xp.where(allowed, zero, xp.asarray(-np.inf, dtype=dt)).astype(dt)


def _attention_dims(node, q, k, past_k):
    """(batch, q_heads, kv_heads, q_len, kv_len incl. the past, head_size) from input shapes."""
    if len(q) == 3:
        hq, hk = int(node.a("q_num_heads") or 1), int(node.a("kv_num_heads") or 1)
        return q[0], hq, hk, q[1], k[1] + (past_k[2] if past_k else 0), q[2] // hq
    return q[0], q[1], k[1], q[2], k[2] + (past_k[2] if past_k else 0), q[3]


def _attention_workspace(node, shapes, dtypes):
    """Scratch for the scaled Q, the scaled contiguous K^T and the (B, H, Sq, Skv) scores, so
    the largest temporary of attention lives in the planned arena."""
    if any(s is None for s in shapes[:3]) or dtypes[0] is None:
        return 0
    b, hq, hk, sq, skv, d = _attention_dims(node, shapes[0], shapes[1], shapes[4] if len(shapes) > 4 else None)
    it = np.dtype(dtypes[0]).itemsize
    return _align(b * hq * sq * d * it) + _align(b * hk * d * skv * it) + _align(b * hq * sq * skv * it)


@kernel("Attention", workspace=_attention_workspace)
def _attention(node, xp):
    scale_attr = node.a("scale")
    causal = bool(node.a("is_causal", 0))
    q_heads, kv_heads = node.a("q_num_heads"), node.a("kv_num_heads")
    softcap = float(node.a("softcap", 0.0) or 0.0)
    mode = int(node.a("qk_matmul_output_mode", 0))
    precision = node.a("softmax_precision")
    left, right = int(node.a("left_window_size", -1)), int(node.a("right_window_size", -1))
    outs_wanted = [bool(o) for o in node.outputs] + [False] * (4 - len(node.outputs))
    if mode not in (0, 1, 2, 3):
        node.fail(f"qk_matmul_output_mode {mode} is not 0-3")

    def run(ins, outs, ws):
        q, k, v = ins[:3]
        mask, past_k, past_v, nonpad = (ins[i] if len(ins) > i else None for i in range(3, 7))
        dt = q.dtype
        three_d = q.ndim == 3
        if three_d:
            if not q_heads or not kv_heads:
                node.fail("3-D inputs need q_num_heads and kv_num_heads")
            q, k, v = _heads(q, q_heads), _heads(k, kv_heads), _heads(v, kv_heads)
        past_len = None
        if past_k is not None:
            past_len = past_k.shape[2]
            k = xp.concatenate([past_k, k], axis=2)
            v = xp.concatenate([past_v, v], axis=2)
        b, hq, sq, d = q.shape
        hk, skv, dv = k.shape[1], k.shape[2], v.shape[3]
        if hq % hk:
            node.fail(f"{hq} query heads are not a multiple of {hk} key/value heads")
        group = hq // hk
        s = dt.type(math.sqrt(scale_attr if scale_attr is not None else 1.0 / math.sqrt(d)))
        # (B, Hq, Sq, D) viewed as (B, Hk, group*Sq, D): head h = kv*group + g uses KV head kv
        qs, off = _take(ws, 0, (b, hq, sq, d), dt, xp)
        xp.multiply(q, s, out=qs)
        # K^T is written contiguous while it is scaled anyway; scaling into a GEMM on the transposed
        # view instead took 0.5-1.3x this path's time (NumPy, 2 shared CPU cores, (b,h,s,d) from
        # (1,2,64,64) to (1,12,384,64)): neither layout is clearly faster
        kt, off = _take(ws, off, (b, hk, d, skv), dt, xp)
        xp.multiply(k.transpose(0, 1, 3, 2), s, out=kt)
        scores, off = _take(ws, off, (b, hk, group * sq, skv), dt, xp)
        xp.matmul(qs.reshape(b, hk, group * sq, d), kt, out=scores)
        scores = scores.reshape(b, hq, sq, skv)
        snap = (lambda: scores.copy()) if outs_wanted[3] else (lambda: None)  # the qk output, by mode
        qk = snap() if mode == 0 else None
        if softcap > 0:
            scores /= dt.type(softcap)
            xp.tanh(scores, out=scores)
            scores *= dt.type(softcap)
        if mode == 1:
            qk = snap()
        bias = _attention_bias(xp, dt, mask, causal, left, right, nonpad, past_len, sq, skv)
        if bias is not None:
            scores += bias
        if mode == 2:
            qk = snap()
        if precision is not None:
            scores = scores.astype(np_dtype(int(precision)), copy=False)
        # softmax in place; a row whose keys are all masked gives zeros, not NaN
        m = scores.max(axis=-1, keepdims=True)
        scores -= xp.where(xp.isneginf(m), 0, m).astype(scores.dtype)
        xp.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        scores *= (1 / xp.where(total == 0, 1, total)).astype(scores.dtype)
        if bias is not None:  # decided on the bias, so +inf/NaN scores cannot leak into such rows
            xp.copyto(scores, xp.zeros((), dtype=scores.dtype),
                      where=xp.broadcast_to(xp.isneginf(bias.max(axis=-1, keepdims=True)), scores.shape))
        p = scores.astype(dt, copy=False)
        if mode == 3:
            qk = p
        o = None if three_d else out_if(outs, 0, (b, hq, sq, dv), dt)
        y = xp.matmul(p.reshape(b, hk, group * sq, skv), v,
                      out=None if o is None else o.reshape(b, hk, group * sq, dv)).reshape(b, hq, sq, dv)
        if three_d:
            y = xp.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(b, sq, hq * dv)
        res = [y]
        if outs_wanted[1] or outs_wanted[2]:
            res += [k.copy() if past_k is None else k, v.copy() if past_v is None else v]
        elif outs_wanted[3]:
            res += [None, None]
        if outs_wanted[3]:
            res.append(qk.astype(dt))
        return res
    return run


@kernel("RotaryEmbedding")
def _rotary(node, xp):
    interleaved = bool(node.a("interleaved", 0))
    rot_dim = int(node.a("rotary_embedding_dim", 0) or 0)
    num_heads = int(node.a("num_heads", 0) or 0)

    def run(ins, outs, ws):
        x, cos, sin = ins[:3]
        pos = ins[3] if len(ins) > 3 else None
        if pos is not None:
            cos, sin = cos[pos], sin[pos]  # (B, S, R/2)
        if x.ndim == 4:  # (B, H, S, D): the caches broadcast over heads
            xs = x
            cos, sin = cos[:, None], sin[:, None]
        else:  # (B, S, H*D) -> (B, S, H, D)
            if not num_heads:
                node.fail("3-D input needs num_heads")
            xs = x.reshape(x.shape[0], x.shape[1], num_heads, -1)
            cos, sin = cos[:, :, None], sin[:, :, None]
        r = rot_dim or xs.shape[-1]
        if interleaved:
            x1, x2 = xs[..., 0:r:2], xs[..., 1:r:2]
        else:
            x1, x2 = xs[..., : r // 2], xs[..., r // 2: r]
        out = xs.copy()
        if interleaved:
            out[..., 0:r:2] = cos * x1 - sin * x2
            out[..., 1:r:2] = sin * x1 + cos * x2
        else:
            out[..., : r // 2] = cos * x1 - sin * x2
            out[..., r // 2: r] = sin * x1 + cos * x2
        return out.reshape(x.shape)
    return run


@kernel("SwiGLU")
def _swiglu(node, xp):
    alpha = float(node.a("alpha", 1.0))

    def run(ins, outs, ws):
        a, g = ins
        dt = a.dtype
        gate = (1 / (1 + xp.exp(-dt.type(alpha) * a))).astype(dt)
        return (a * gate * g).astype(dt)
    return run


@kernel("LinearAttention")
def _linear_attention(node, xp):
    rule = node.a("update_rule", "gated_delta")
    q_heads, kv_heads = node.a("q_num_heads"), node.a("kv_num_heads")
    scale_attr = float(node.a("scale", 0.0) or 0.0)
    if rule not in ("linear", "gated", "delta", "gated_delta"):
        node.fail(f"update_rule '{rule}' is not linear/gated/delta/gated_delta")
    if not q_heads or not kv_heads or q_heads % kv_heads:
        node.fail("q_num_heads must be a positive multiple of kv_num_heads")
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")

    def run(ins, outs, ws):
        q, k, v = ins[:3]
        past, decay, beta = (ins[i] if len(ins) > i else None for i in range(3, 6))
        if (decay is None) == gated or (beta is None) == delta:
            node.fail(f"update_rule '{rule}' needs decay {'given' if gated else 'omitted'} "
                      f"and beta {'given' if delta else 'omitted'}")
        f32 = xp.float32
        b, t = q.shape[:2]
        group = q_heads // kv_heads
        q4 = _heads(q, q_heads).astype(f32).reshape(b, kv_heads, group, t, -1)
        k4, v4 = _heads(k, kv_heads).astype(f32), _heads(v, kv_heads).astype(f32)
        dk, dv = k4.shape[-1], v4.shape[-1]
        if gated:  # per head (B, T, Hkv) or per key channel (B, T, Hkv*dk): a decay of the state rows
            g = xp.exp(_heads(decay, kv_heads).astype(f32))  # (B, Hkv, T, 1 or dk)
        if delta:
            bt = beta.reshape(b, t, beta.shape[-1]).transpose(0, 2, 1).astype(f32)  # (B, Hkv or 1, T)
        state = past.astype(f32) if past is not None else xp.zeros((b, kv_heads, dk, dv), dtype=f32)
        scale = scale_attr or 1.0 / math.sqrt(dk)
        y = xp.empty((b, kv_heads, group, t, dv), dtype=f32)
        for i in range(t):  # the recurrence: state_i = decay_i * state_(i-1) + k_i (x) v_i
            ki, vi = k4[:, :, i], v4[:, :, i]
            if gated:
                state = state * g[:, :, i][..., None]
            if delta:  # write only what the state does not already predict for k_i
                vi = bt[:, :, i][..., None] * (vi - xp.matmul(ki[:, :, None, :], state)[:, :, 0])
            state = state + ki[..., :, None] * vi[..., None, :]
            y[:, :, :, i] = xp.matmul(q4[:, :, :, i], state) * f32(scale)
        out = y.reshape(b, q_heads, t, dv).transpose(0, 2, 1, 3).reshape(b, t, q_heads * dv)
        res = out.astype(q.dtype)
        return [res, state.astype(past.dtype if past is not None else q.dtype)]
    return run


@kernel("CausalConvWithState")
def _causal_conv(node, xp):
    act = node.a("activation", "none")
    if act not in ("none", "silu", "swish"):
        node.fail(f"activation '{act}' is not none/silu/swish")

    def run(ins, outs, ws):
        x, w = ins[:2]
        bias, past = (ins[i] if len(ins) > i else None for i in (2, 3))
        n, c, length = x.shape
        k = w.shape[2]
        if past is None:
            past = xp.zeros((n, c, k - 1), dtype=x.dtype)
        padded = xp.concatenate([past, x], axis=2)
        # depthwise causal conv: one multiply-add per tap over the whole sequence
        acc = xp.float32 if x.dtype.itemsize < 4 else x.dtype  # fp16 sums in fp32, as a GEMM would
        y = xp.zeros((n, c, length), dtype=acc)
        for j in range(k):
            y += w[:, 0, j].reshape(1, c, 1).astype(acc) * padded[:, :, j:j + length]
        y = y.astype(x.dtype)
        if bias is not None:
            y += bias.reshape(1, c, 1)
        if act != "none":
            y32 = y.astype(xp.float32)
            y = (y32 / (1 + xp.exp(-y32))).astype(x.dtype)
        return [y, xp.ascontiguousarray(padded[:, :, padded.shape[2] - (k - 1):])]
    return run


@kernel("FlexAttention", domain="ai.onnx.preview")
def _flex_attention(node, xp):
    from opc.runtime.k_control import _captured

    scale_attr = node.a("scale")
    precision = node.a("softmax_precision")
    score_mod, prob_mod = node.subgraphs.get("score_mod"), node.subgraphs.get("prob_mod")

    def run(ins, outs, ws):
        q, k, v = ins[:3]
        cap = _captured(node, ins)
        b, hq, sq, d = q.shape
        hk, skv, dv = k.shape[1], k.shape[2], v.shape[3]
        if hq % hk:
            node.fail(f"{hq} query heads are not a multiple of {hk} key/value heads")
        group = hq // hk
        scale = scale_attr if scale_attr is not None else 1.0 / math.sqrt(d)
        s = q.dtype.type(math.sqrt(np.float32(scale)))
        kt = xp.ascontiguousarray((k * s).transpose(0, 1, 3, 2))
        scores = xp.matmul((q * s).reshape(b, hk, group * sq, d), kt).reshape(b, hq, sq, skv)
        # softmax runs in softmax_precision, else at least float32
        cdt = np_dtype(int(precision)) if precision is not None else \
            (np.dtype(np.float32) if q.dtype.itemsize < 4 else q.dtype)
        scores = scores.astype(cdt)
        if score_mod is not None:
            scores = xp.asarray(score_mod.run([scores], cap(score_mod))[0]).astype(cdt)
        scores = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        if prob_mod is not None:
            probs = xp.asarray(prob_mod.run([probs], cap(prob_mod))[0]).astype(cdt)
        y = xp.matmul(probs.reshape(b, hk, group * sq, skv), v.astype(cdt)).reshape(b, hq, sq, dv)
        return y.astype(v.dtype)
    return run
