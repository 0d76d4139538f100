"""One-shot least-squares reconstruction of a pruned layer (SparseGPT/OBS style).

For a layer with (pruned-model) inputs X and original-model outputs Y, each output row o
keeps the weights its mask allows (plus the bias) and gets

    w_o = argmin || [X_S 1] w - Y_o ||^2 + lambda ||w||^2

solved through the normal equations. Only the Gram matrix H = X^T X, X^T Y and sum Y^2
are accumulated over calibration batches, so memory does not grow with the number of
samples. Convolutions use im2col patches; grouped convolutions one system per group.
"""

from __future__ import annotations

import numpy as np

from opc.passes._prune.layers import Layer, im2col


def reconstructable(layer: Layer) -> bool:
    """2-D Conv, Gemm and MatMul with a constant (or no) bias."""
    inputs = layer.node.inputs
    if len(inputs) > 2 and inputs[2] is not None and inputs[2].name and layer.bias is None:
        return False  # a bias computed at run time cannot be refitted
    if layer.op == "Conv":
        return layer.weight.values.ndim == 4
    if layer.op == "Gemm":
        n_out = layer.to_matrix().shape[0]
        return layer.bias is None or layer.bias.values.size == n_out
    return layer.op == "MatMul"


def _gemm_scales(layer: Layer) -> tuple[float, float]:
    return float(layer.node.attrs.get("alpha", 1.0)), float(layer.node.attrs.get("beta", 1.0))


def can_fit_bias(layer: Layer) -> bool:
    """A bias column is fitted when the layer has (or can be given) a constant bias."""
    if layer.op == "MatMul":
        return False
    return not (layer.op == "Gemm" and _gemm_scales(layer)[1] == 0.0)


def _spd_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a (damped, so positive definite) normal-equation system; Cholesky when possible."""
    try:
        from scipy.linalg import cho_factor, cho_solve

        return cho_solve(cho_factor(a, check_finite=False), b, check_finite=False)
    except ImportError:
        pass
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


class Accumulator:
    """Streaming normal equations for one layer."""

    def __init__(self, layer: Layer, out_channels: int, fit_bias: bool):
        self.layer = layer
        self.groups = layer.group
        mat = layer.to_matrix()
        self.cols = mat.shape[1]
        self.fit_bias = fit_bias
        size = self.cols + (1 if fit_bias else 0)
        self.og = out_channels // self.groups
        self.h = np.zeros((self.groups, size, size))
        self.xty = np.zeros((self.groups, size, self.og))
        self.yy = np.zeros((self.groups, self.og))
        self.rows = 0

    def _matrices(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        layer = self.layer
        if layer.op == "Conv":
            k = layer.weight.values.shape[2:]
            xs = im2col(x.astype(np.float32, copy=False), layer.node, tuple(k), self.groups)
            ys = y.transpose(0, 2, 3, 1).reshape(-1, self.groups, self.og).transpose(1, 0, 2)
        else:
            xs = x.reshape(1, -1, x.shape[-1])
            ys = y.reshape(1, -1, y.shape[-1])
        return xs, ys

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        xs, ys = self._matrices(x, y)
        xs = xs.astype(np.float32, copy=False)
        ys = ys.astype(np.float32, copy=False)
        c = self.cols
        for g in range(self.groups):
            xg, yg = xs[g], ys[g]
            self.h[g, :c, :c] += xg.T @ xg
            self.xty[g, :c] += xg.T @ yg
            if self.fit_bias:  # the bias is a column of ones: its entries are plain sums
                sx = xg.sum(0, dtype=np.float64)
                self.h[g, c, :c] += sx
                self.h[g, :c, c] += sx
                self.h[g, c, c] += xg.shape[0]
                self.xty[g, c] += yg.sum(0, dtype=np.float64)
            self.yy[g] += np.square(yg, dtype=np.float64).sum(0)
        self.rows += xs.shape[1]

    # --- solving -----------------------------------------------------------------------
    def current(self) -> np.ndarray:
        """Current effective weights as [groups, size, og] (bias last when fitted)."""
        layer = self.layer
        mat = layer.to_matrix().astype(np.float64)
        if layer.op == "Gemm":
            mat = mat * _gemm_scales(layer)[0]
        w = mat.reshape(self.groups, self.og, self.cols).transpose(0, 2, 1)
        if self.fit_bias:
            b = np.zeros(mat.shape[0]) if layer.bias is None else layer.bias.values.astype(np.float64).ravel()
            if layer.op == "Gemm":
                b = b * _gemm_scales(layer)[1]
            w = np.concatenate([w, b.reshape(self.groups, 1, self.og)], axis=1)
        return w

    def error(self, w: np.ndarray) -> float:
        """Relative squared error sum||XW - Y||^2 / sum||Y||^2 on the accumulated data."""
        err = self.yy.sum()
        for g in range(self.groups):
            wg = w[g]
            err += np.einsum("ij,ij->", wg, self.h[g] @ wg) - 2.0 * np.einsum("ij,ij->", wg, self.xty[g])
        return float(max(err, 0.0) / max(self.yy.sum(), 1e-30))

    def solve(self, mask: np.ndarray, damp: float) -> np.ndarray:
        """Refitted effective weights [groups, size, og]; ``mask`` is the layer's [O, cols] mask.

        The ridge pulls toward the current (masked) weights, not toward zero: directions
        the calibration data does not excite keep their trained values instead of
        whatever fits a few samples best.
        """
        w = np.zeros((self.groups, self.h.shape[1], self.og))
        prior = self.current()
        mask = mask.reshape(self.groups, self.og, self.cols)
        for g in range(self.groups):
            h = self.h[g].copy()
            diag = np.diag(h)[: self.cols]
            lam = damp * float(diag.mean()) if diag.size and diag.mean() > 0 else 1e-8
            idx = np.arange(self.cols)
            h[idx, idx] += lam
            dead = np.diag(h) <= 0
            h[dead, dead] = 1.0
            xty = self.xty[g].copy()
            xty[: self.cols] += lam * prior[g, : self.cols]
            # rows with the same mask share one factorisation (always so in channel mode)
            patterns: dict[bytes, list[int]] = {}
            for o in range(self.og):
                patterns.setdefault(np.packbits(mask[g, o]).tobytes(), []).append(o)
            if len(patterns) <= 4:
                for rows in patterns.values():
                    keep = self._kept(mask[g, rows[0]])
                    if keep.size:
                        w[g][np.ix_(keep, rows)] = _spd_solve(h[np.ix_(keep, keep)], xty[np.ix_(keep, rows)])
            else:
                self._solve_rows(h, xty, mask[g], w[g])
        return w

    def _kept(self, row_mask: np.ndarray) -> np.ndarray:
        keep = np.flatnonzero(row_mask)
        return np.append(keep, self.cols) if self.fit_bias else keep

    def _solve_rows(self, h: np.ndarray, xty: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
        """One system per output row, solved in batches padded to the same size.

        Padding entries get an identity row and a zero right-hand side, so their solution
        is exactly zero and the kept entries solve the row's own system.
        """
        keeps = [self._kept(mask[o]) for o in range(mask.shape[0])]
        size = max(k.size for k in keeps)
        if size == 0:
            return
        chunk = max(1, int(2**27 // (size * size * 8)))
        for start in range(0, len(keeps), chunk):
            rows = range(start, min(start + chunk, len(keeps)))
            idx = np.zeros((len(rows), size), dtype=np.int64)
            valid = np.zeros((len(rows), size), dtype=bool)
            for i, o in enumerate(rows):
                idx[i, : keeps[o].size] = keeps[o]
                valid[i, : keeps[o].size] = True
            a = h[idx[:, :, None], idx[:, None, :]]
            pair = valid[:, :, None] & valid[:, None, :]
            a = np.where(pair, a, 0.0)
            diag = np.arange(size)
            a[:, diag, diag] = np.where(valid, a[:, diag, diag], 1.0)
            b = np.where(valid, xty[idx, np.asarray(list(rows))[:, None]], 0.0)
            try:
                sol = np.linalg.solve(a, b[..., None])[..., 0]
            except np.linalg.LinAlgError:
                sol = np.stack([_spd_solve(a[i], b[i]) for i in range(len(rows))])
            for i, o in enumerate(rows):
                k = keeps[o].size
                out[idx[i, :k], o] = sol[i, :k]

    def write(self, w: np.ndarray) -> None:
        """Store effective weights [groups, size, og] back into the layer's constants."""
        import onnx_graphsurgeon as gs

        layer = self.layer
        mat = w[:, : self.cols, :].transpose(0, 2, 1).reshape(self.groups * self.og, self.cols)
        if layer.op == "Gemm":
            mat = mat / _gemm_scales(layer)[0]
        layer.weight.values = layer.from_matrix(mat)
        if not self.fit_bias:
            return
        b = w[:, self.cols, :].reshape(-1)
        dtype = layer.weight.values.dtype
        if layer.op == "Gemm":
            b = b / _gemm_scales(layer)[1]
        if layer.bias is not None:
            layer.bias.values = b.reshape(layer.bias.values.shape).astype(layer.bias.values.dtype)
        else:
            bias = gs.Constant(f"{layer.weight.name}_bias", b.astype(dtype))
            while len(layer.node.inputs) < 3:
                layer.node.inputs.append(gs.Variable.empty())
            layer.node.inputs[2] = bias
            layer.bias = bias
