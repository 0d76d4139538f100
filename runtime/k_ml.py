"""Classic-ML and training-optimizer kernels: ai.onnx.ml Binarizer, ArrayFeatureExtractor,
TreeEnsemble; TfIdfVectorizer (integer n-grams; every window is compared with every pool n-gram
of its length, fine for small pools); ai.onnx.preview.training Adagrad, Adam, Momentum.

TreeEnsemble walks every (sample, tree) pair one level per step, all pairs at once, so the
number of steps is the depth of the deepest tree (found at load), not the number of nodes.
"""

from __future__ import annotations

import numpy as np

from opc.runtime.registry import kernel
from opc.runtime.xp import to_host

ML = "ai.onnx.ml"
TRAINING = "ai.onnx.preview.training"


@kernel("Binarizer", domain=ML)
def _binarizer(node, xp):
    thr = float(node.a("threshold", 0.0))
    return lambda ins, outs, ws: (ins[0] > thr).astype(ins[0].dtype)


@kernel("ArrayFeatureExtractor", domain=ML)
def _array_feature_extractor(node, xp):
    def run(ins, outs, ws):
        x, idx = ins
        idx = idx.reshape(-1).astype(xp.int64)
        y = xp.take(x, idx, axis=-1)
        return y.reshape((1, idx.size) if x.ndim == 1 else x.shape[:-1] + (idx.size,))
    return run


_MODES = {0: "leq", 1: "lt", 2: "gte", 3: "gt", 4: "eq", 5: "neq", 6: "member"}


@kernel("TreeEnsemble", domain=ML)
def _tree_ensemble(node, xp):
    modes = np.asarray(node.a("nodes_modes"), dtype=np.int64).reshape(-1)
    feature = np.asarray(node.a("nodes_featureids"), dtype=np.int64)
    splits = np.asarray(node.a("nodes_splits"), dtype=np.float64).reshape(-1)
    true_id, false_id = (np.asarray(node.a(k), dtype=np.int64) for k in ("nodes_truenodeids", "nodes_falsenodeids"))
    true_leaf, false_leaf = (np.asarray(node.a(k), dtype=bool) for k in ("nodes_trueleafs", "nodes_falseleafs"))
    missing = node.a("nodes_missing_value_tracks_true")
    missing = np.zeros(len(modes), bool) if missing is None else np.asarray(missing, dtype=bool)
    leaf_target = np.asarray(node.a("leaf_targetids"), dtype=np.int64)
    leaf_weight = np.asarray(node.a("leaf_weights"), dtype=np.float64).reshape(-1)
    roots = np.asarray(node.a("tree_roots"), dtype=np.int64)
    n_targets = int(node.a("n_targets"))
    agg = int(node.a("aggregate_function", 1))
    post = int(node.a("post_transform", 0))
    if post != 0:
        node.fail(f"post_transform {post} is not supported (only NONE)")
    if agg not in (0, 1, 2, 3) or any(m not in _MODES for m in modes.tolist()):
        node.fail("unknown aggregate_function or node mode")
    # set-membership nodes: their members, NaN-separated in membership_values, as a padded table
    members = np.full((len(modes), 1), np.nan)
    if (modes == 6).any():
        vals = np.asarray(node.a("membership_values"), dtype=np.float64).reshape(-1)
        groups, cur = [], []
        for v in vals.tolist():
            if np.isnan(v):
                groups.append(cur)
                cur = []
            else:
                cur.append(v)
        width = max([len(g) for g in groups] + [1])
        members = np.full((len(modes), width), np.nan)
        for i, g in zip(np.nonzero(modes == 6)[0], groups):
            members[i, :len(g)] = g
    # a root whose two branches are the same leaf is itself that leaf
    root_leaf = true_leaf[roots] & false_leaf[roots] & (true_id[roots] == false_id[roots])
    start = np.where(root_leaf, true_id[roots], roots)
    depth, frontier = 0, start[~root_leaf].tolist()  # levels to walk, known at load: no host syncs
    while frontier:
        depth += 1
        if depth > len(modes):
            node.fail("the trees have a cycle")
        frontier = [int(c) for i in frontier for c, leaf in ((true_id[i], true_leaf[i]), (false_id[i], false_leaf[i]))
                    if not leaf]
    dev = {k: xp.asarray(a) for k, a in dict(modes=modes, feature=feature, splits=splits, true_id=true_id,
                                              false_id=false_id, true_leaf=true_leaf, false_leaf=false_leaf,
                                              missing=missing, members=members, leaf_target=leaf_target,
                                              leaf_weight=leaf_weight).items()}

    def run(ins, outs, ws):
        x = ins[0]
        n = x.shape[0]
        xd = x.reshape(n, -1).astype(xp.float64)
        cur = xp.broadcast_to(xp.asarray(start), (n, len(roots))).copy()
        done = xp.broadcast_to(xp.asarray(root_leaf), (n, len(roots))).copy()
        rows = xp.arange(n).reshape(n, 1)
        for _ in range(depth):
            idx = xp.where(done, 0, cur)
            v = xd[rows, dev["feature"][idx]]
            sp, m = dev["splits"][idx], dev["modes"][idx]
            go = xp.where(m == 0, v <= sp, xp.where(m == 1, v < sp, xp.where(m == 2, v >= sp, xp.where(
                m == 3, v > sp, xp.where(m == 4, v == sp, xp.where(m == 5, v != sp, False))))))
            go = go | ((m == 6) & (dev["members"][idx] == v[..., None]).any(axis=-1))
            go = go | (dev["missing"][idx] & xp.isnan(v))
            nxt = xp.where(go, dev["true_id"][idx], dev["false_id"][idx])
            leaf = xp.where(go, dev["true_leaf"][idx], dev["false_leaf"][idx])
            cur = xp.where(done, cur, nxt)
            done = done | leaf
        w, t = dev["leaf_weight"][cur], dev["leaf_target"][cur]  # (N, trees)
        onehot = t[..., None] == xp.arange(n_targets)  # (N, trees, targets)
        if agg in (0, 1):
            y = xp.where(onehot, w[..., None], 0).sum(axis=1)
            if agg == 0:
                y = y / len(roots)
        else:
            info = np.finfo(x.dtype)
            fill = info.max if agg == 2 else info.min
            vals = xp.where(onehot, w[..., None], fill)
            y = vals.min(axis=1) if agg == 2 else vals.max(axis=1)
        return y.astype(x.dtype)
    return run


@kernel("TfIdfVectorizer")
def _tfidf(node, xp):
    if node.a("pool_strings") is not None:
        node.fail("string pools are not supported (tensors of strings are out of scope)")
    lo, hi = int(node.a("min_gram_length")), int(node.a("max_gram_length"))
    skips = int(node.a("max_skip_count"))
    mode = node.a("mode")
    counts = list(node.a("ngram_counts"))
    out_index = np.asarray(node.a("ngram_indexes"), dtype=np.int64)
    pool = np.asarray(node.a("pool_int64s"), dtype=np.int64)
    weights = node.a("weights")
    size = int(out_index.max()) + 1
    grams = {}  # n -> (pool n-grams (G, n), one-hot (G, size) to their output columns)
    first_id = 0
    for k, begin in enumerate(counts):  # pool segment k holds the (k+1)-grams
        n = k + 1
        end = counts[k + 1] if k + 1 < len(counts) else len(pool)
        g = pool[begin:end].reshape(-1, n)
        ids = np.arange(first_id, first_id + len(g))
        first_id += len(g)
        if lo <= n <= hi and len(g):
            onehot = (out_index[ids][:, None] == np.arange(size)).astype(np.float32)
            grams[n] = (xp.asarray(g), xp.asarray(onehot))
    w = None
    if weights is not None:  # weights[i] belongs to pool n-gram i, i.e. to output column ngram_indexes[i]
        cols = np.zeros(size, np.float32)
        cols[out_index] = np.asarray(weights, dtype=np.float32)
        w = xp.asarray(cols)

    def run(ins, outs, ws):
        x = ins[0]
        rows = x.reshape(1, -1) if x.ndim == 1 else x
        freq = xp.zeros((rows.shape[0], size), dtype=xp.float32)
        for d in range(1, skips + 2):
            for n, (g, onehot) in grams.items():
                if n == 1 and d > 1:
                    continue  # a unigram has no gaps: counted once, at skip distance 1
                span = rows.shape[1] - (n - 1) * d
                if span <= 0:
                    continue
                idx = xp.arange(span).reshape(-1, 1) + xp.arange(n).reshape(1, -1) * d
                win = rows[:, idx].astype(xp.int64)  # (B, P, n)
                hits = (win[:, :, None, :] == g[None, None]).all(axis=-1).sum(axis=1)  # (B, G)
                freq += xp.matmul(hits.astype(xp.float32), onehot)
        if mode == "IDF":
            y = xp.where(freq > 0, w if w is not None else 1, 0).astype(xp.float32)
        elif mode == "TFIDF" and w is not None:
            y = freq * w
        elif mode in ("TF", "TFIDF"):
            y = freq
        else:
            node.fail(f"mode '{mode}' is not TF/IDF/TFIDF")
        return y.reshape(size) if x.ndim == 1 else y
    return run


def _scalar(a):
    return float(to_host(a).reshape(-1)[0])


def _optimizer(step_arity, update):
    """Adagrad/Adam/Momentum: inputs R, T, then the tensors grouped by role (X1..Xn, G1..Gn, ...);
    outputs grouped by role likewise."""
    def build(node, xp):
        def run(ins, outs, ws):
            r, t = _scalar(ins[0]), _scalar(ins[1])
            n = (len(ins) - 2) // step_arity
            groups = [ins[2 + k * n: 2 + (k + 1) * n] for k in range(step_arity)]
            res = [update(node, r, t, *vals) for vals in zip(*groups)]
            return [out for role in zip(*res) for out in role]
        return run
    return build


def _adagrad(node, r, t, x, g, h):
    decay, eps, norm = (float(node.a(k, d)) for k, d in (("decay_factor", 0.0), ("epsilon", 0.0),
                                                           ("norm_coefficient", 0.0)))
    g = norm * x + g
    h_new = h + g * g
    return (x - (r / (1 + t * decay)) * g / (h_new ** 0.5 + eps)).astype(x.dtype), h_new.astype(h.dtype)


def _adam(node, r, t, x, g, v, h):
    alpha, beta, eps, norm, post = (float(node.a(k, d)) for k, d in (
        ("alpha", 0.9), ("beta", 0.999), ("epsilon", 0.0), ("norm_coefficient", 0.0), ("norm_coefficient_post", 0.0)))
    g = norm * x + g
    v_new = alpha * v + (1 - alpha) * g
    h_new = beta * h + (1 - beta) * (g * g)
    rate = r * np.sqrt(1 - beta ** t) / (1 - alpha ** t) if t > 0 else r
    x_new = (1 - post) * (x - rate * (v_new / (h_new ** 0.5 + eps)))
    return x_new.astype(x.dtype), v_new.astype(v.dtype), h_new.astype(h.dtype)


def _momentum(node, r, t, x, g, v):
    alpha, beta, norm = (float(node.a(k, d)) for k, d in (("alpha", 0.0), ("beta", 0.0), ("norm_coefficient", 0.0)))
    g = norm * x + g
    v_new = alpha * v + (beta if t > 0 else 1.0) * g
    step = g + alpha * v_new if node.a("mode", "standard") == "nesterov" else v_new
    return (x - r * step).astype(x.dtype), v_new.astype(v.dtype)


kernel("Adagrad", domain=TRAINING)(_optimizer(3, _adagrad))
kernel("Adam", domain=TRAINING)(_optimizer(4, _adam))
kernel("Momentum", domain=TRAINING)(_optimizer(3, _momentum))
