"""Streaming calibration statistics and range search for post-training quantization.

Calibration runs a copy of the float model in ONNX Runtime with the observed tensors
added as graph outputs, one batch at a time, and folds each batch into fixed-size
statistics: exact min/max, a histogram, and optional per-channel sums/abs-max. Nothing
grows with the number of samples, and an outlier in any batch stays in the statistics.

The histogram has a fixed number of bins whose width is a power of two (``2**exp``)
and whose edges are multiples of that width, symmetric around zero. When a batch holds
a value outside the current range, the width doubles (neighbouring bins merge exactly),
so merging batch by batch gives the same counts as one histogram of all the data with
the final width (``test_quantize_calibrate`` checks this).

Range search (``compute_range``): ``minmax``, ``percentile`` (tails cut on each side),
``entropy`` (the TensorRT-style KL-divergence search between the clipped distribution
and its quantized version) and ``mse`` (expected squared quantization error, clipping
plus rounding noise). The sensitivity helpers (``LayerError``, ``compare_tensors``)
measure SQNR of a quantized model's tensors against the float model's and are shared
with the ``tune`` pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

METHODS = ("minmax", "percentile", "entropy", "mse")


class Histogram:
    """A fixed-size signed histogram with power-of-two bin width; mergeable exactly.

    Bin ``k`` (0 <= k < bins) covers ``[(k - bins/2) * 2**exp, (k - bins/2 + 1) * 2**exp)``.
    """

    def __init__(self, bins: int = 2048):
        if bins < 16 or bins % 2:
            raise ValueError("bins must be an even number >= 16")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.exp: int | None = None  # None until the first non-empty update
        self.zeros = 0  # exact zeros (inside bin bins/2): always exactly representable

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exp) if self.exp is not None else 0.0

    def _exp_for(self, absmax: float) -> int:
        # smallest exp with absmax < (bins/2) * 2**exp, so every value has a bin
        half = self.bins // 2
        if absmax <= 0 or not math.isfinite(absmax):
            return -126 if absmax <= 0 else 1000
        e = math.ceil(math.log2(absmax / half))
        while absmax >= half * math.ldexp(1.0, e):
            e += 1
        return e

    def _regrid(self, new_exp: int) -> None:
        shift = new_exp - self.exp
        if shift <= 0:
            return
        half = self.bins // 2
        idx = np.arange(self.bins, dtype=np.int64) - half
        target = np.floor_divide(idx, 2**min(shift, 62)) + half
        merged = np.zeros_like(self.counts)
        np.add.at(merged, target, self.counts)
        self.counts = merged
        self.exp = new_exp

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        absmax = float(max(-x.min(), x.max()))
        if not math.isfinite(absmax):
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            absmax = float(max(-x.min(), x.max()))
        need = self._exp_for(absmax)
        if self.exp is None:
            self.exp = need
        elif need > self.exp:
            self._regrid(need)
        # scaling by a power of two is exact, so bin indices nest exactly across widths
        idx = np.floor(np.ldexp(x, -self.exp)).astype(np.int64) + self.bins // 2
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)
        self.zeros += int(np.count_nonzero(x == 0))

    def merge(self, other: "Histogram") -> None:
        if other.exp is None:
            return
        if other.bins != self.bins:
            raise ValueError("cannot merge histograms with different bin counts")
        other = other.copy()
        if self.exp is None:
            self.exp, self.counts, self.zeros = other.exp, other.counts, other.zeros
            return
        target = max(self.exp, other.exp)
        self._regrid(target)
        other._regrid(target)
        self.counts = self.counts + other.counts
        self.zeros += other.zeros

    def copy(self) -> "Histogram":
        h = Histogram(self.bins)
        h.counts = self.counts.copy()
        h.exp = self.exp
        h.zeros = self.zeros
        return h

    def edges(self) -> np.ndarray:
        half = self.bins // 2
        return (np.arange(self.bins + 1, dtype=np.float64) - half) * self.width


@dataclass
class TensorStats:
    """Streaming statistics of one tensor over all calibration batches."""

    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    hist: Histogram | None = None
    channel_axis: int | None = None
    channel_sum: np.ndarray | None = None
    channel_absmax: np.ndarray | None = None
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    channel_count: int = 0
    # a uniform sample of at most ``reservoir`` rows (channel axis last): bounded memory
    reservoir: int = 0
    rows: np.ndarray | None = None
    rows_seen: int = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # rare: only then pay for a filtered copy
            x = np.where(np.isfinite(x), x, 0).astype(x.dtype)
            lo, hi = float(x.min()), float(x.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)
        if self.hist is not None:
            self.hist.update(x)
        if self.channel_axis is not None and x.ndim > 0:
            axis = self.channel_axis % x.ndim
            other = tuple(a for a in range(x.ndim) if a != axis)
            s = x.sum(axis=other, dtype=np.float64)
            cmin = x.min(axis=other).astype(np.float64)
            cmax = x.max(axis=other).astype(np.float64)
            if self.channel_sum is None:
                self.channel_sum, self.channel_min, self.channel_max = s, cmin, cmax
            elif self.channel_sum.shape == s.shape:
                self.channel_sum = self.channel_sum + s
                self.channel_min = np.minimum(self.channel_min, cmin)
                self.channel_max = np.maximum(self.channel_max, cmax)
            self.channel_absmax = np.maximum(self.channel_max, -self.channel_min)
            self.channel_count += int(x.size // max(x.shape[axis], 1))
            if self.reservoir:
                self._sample_rows(np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]))

    def _sample_rows(self, rows: np.ndarray) -> None:
        """Reservoir sampling (algorithm R), seeded: every row seen is kept with equal odds."""
        rng = np.random.default_rng(self.rows_seen)
        if self.rows is None:
            self.rows = np.empty((0, rows.shape[1]), np.float32)
        if rows.shape[1] != self.rows.shape[1]:
            return
        free = self.reservoir - len(self.rows)
        if free > 0:
            self.rows = np.concatenate([self.rows, rows[:free].astype(np.float32)])
        rest = rows[max(free, 0):]
        if len(rest):
            t = self.rows_seen + max(free, 0) + np.arange(len(rest))
            j = (rng.random(len(rest)) * (t + 1)).astype(np.int64)
            keep = j < self.reservoir
            self.rows[j[keep]] = rest[keep]
        self.rows_seen += len(rows)

    @property
    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or self.channel_count == 0:
            return None
        return self.channel_sum / self.channel_count


# --- range search ----------------------------------------------------------------------

def compute_range(stats: TensorStats, method: str = "minmax", *, percentile: float = 99.99,
                  levels: int = 256, symmetric: bool = False) -> tuple[float, float]:
    """The (lo, hi) clipping range to quantize a tensor with; always contains 0."""
    lo, hi = (stats.min, stats.max) if stats.count else (0.0, 0.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if method != "minmax" and stats.hist is not None and stats.hist.exp is not None and hi > lo:
        h = stats.hist
        if method == "percentile":
            lo, hi = _percentile_range(h, percentile, lo, hi)
        elif method == "entropy":
            lo, hi = _entropy_range(h, lo, hi, levels)
        elif method == "mse":
            lo, hi = _mse_range(h, lo, hi, levels)
        else:
            raise ValueError(f"unknown calibration method {method!r}")
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        m = max(-lo, hi)
        lo, hi = -m, m
    return float(lo), float(hi)


def _percentile_range(h: Histogram, p: float, lo: float, hi: float) -> tuple[float, float]:
    total = h.counts.sum()
    if total == 0:
        return lo, hi
    tail = (100.0 - p) / 100.0 * total
    edges = h.edges()
    cdf = np.cumsum(h.counts)

    def value_at(rank: float) -> float:
        k = int(np.searchsorted(cdf, rank, side="left"))
        k = min(k, h.bins - 1)
        before = cdf[k - 1] if k > 0 else 0
        frac = (rank - before) / h.counts[k] if h.counts[k] else 0.0
        return float(edges[k] + frac * (edges[k + 1] - edges[k]))

    new_hi = min(hi, value_at(total - tail)) if hi > 0 else hi
    new_lo = max(lo, value_at(tail)) if lo < 0 else lo
    return new_lo, new_hi


def _candidate_windows(h: Histogram, lo: float, hi: float, n: int = 96) -> list[tuple[int, int]]:
    """Bin windows [a, b) shrinking the observed range by a common factor."""
    half = h.bins // 2
    w = h.width
    a_full = int(math.floor(lo / w)) + half
    b_full = min(int(math.floor(hi / w)) + half + 1, h.bins)
    out = []
    for t in np.geomspace(1.0, 0.02, n):
        a = min(half, half + int(math.floor((a_full - half) * t)))
        b = max(half + 1, half + int(math.ceil((b_full - half) * t)))
        if not out or out[-1] != (a, b):
            out.append((a, b))
    return out


def _entropy_range(h: Histogram, lo: float, hi: float, levels: int) -> tuple[float, float]:
    counts = h.counts.astype(np.float64)
    # exact zeros (Relu outputs, padding) quantize without error: leave them out of the KL,
    # or their spike decides the threshold
    counts[h.bins // 2] -= h.zeros
    edges = h.edges()
    best, best_kl = None, math.inf
    for a, b in _candidate_windows(h, lo, hi):
        nb = b - a
        if nb < 2:
            continue
        sliced = counts[a:b]
        p = sliced.copy()
        p[0] += counts[:a].sum()
        p[-1] += counts[b:].sum()
        # quantize the window into `levels` groups; spread each group's mass over its non-empty bins
        groups = np.minimum((np.arange(nb) * levels) // nb, levels - 1)
        nonzero = sliced > 0
        gsum = np.bincount(groups, weights=sliced, minlength=levels)
        gnz = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, gsum[groups] / np.maximum(gnz[groups], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl - 1e-12:
            best_kl, best = kl, (a, b)
    if best is None:
        return lo, hi
    a, b = best
    return max(lo, float(edges[a])), min(hi, float(edges[b]))


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    ps, qs = p.sum(), q.sum()
    if ps == 0 or qs == 0:
        return math.inf
    p = p / ps
    q = q / qs
    # q is zero where p has only clipped mass: smooth so that clipping costs, never divides by 0
    zero_q = (q == 0) & (p > 0)
    if zero_q.any():
        q = np.where(q == 0, eps, q)
        q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _mse_range(h: Histogram, lo: float, hi: float, levels: int) -> tuple[float, float]:
    counts = h.counts.astype(np.float64)
    edges = h.edges()
    centers = 0.5 * (edges[:-1] + edges[1:])
    nz = counts > 0
    c, n = centers[nz], counts[nz]
    cands = np.array([(max(lo, edges[a]), min(hi, edges[b])) for a, b in _candidate_windows(h, lo, hi)])
    a = np.minimum(cands[:, :1], 0.0)
    b = np.maximum(cands[:, 1:], 0.0)
    s = np.maximum((b - a) / (levels - 1), 1e-30)
    clip_err = np.maximum(a - c[None, :], 0.0) + np.maximum(c[None, :] - b, 0.0)
    inside = clip_err == 0
    err = (clip_err**2 + inside * (s**2) / 12.0) @ n
    k = int(np.argmin(err))
    return float(a[k, 0]), float(b[k, 0])


# --- quantization parameters (the NumPy oracle the tests use too) -----------------------

QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
NP_QTYPE = {"uint8": np.uint8, "int8": np.int8}


def activation_params(lo: float, hi: float, qtype: str = "uint8", symmetric: bool = False) -> tuple[float, int]:
    """Scale and zero point for an activation range (ONNX QuantizeLinear semantics)."""
    qmin, qmax = QRANGE[qtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        m = max(-lo, hi)
        if qtype == "int8":
            scale, zp = m / 127.0, 0
        else:
            scale, zp = 2 * m / 255.0, 128
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = int(np.clip(np.round(qmin - lo / scale), qmin, qmax)) if scale > 0 else 0
    if not scale > 0 or not math.isfinite(scale):
        scale = 1.0
    return float(np.float32(scale)), zp


def weight_params(w: np.ndarray, axis: int | None, bits: int = 8) -> np.ndarray:
    """Symmetric scales (zero point 0, range +-(2**(bits-1)-1)); per channel along ``axis``."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        absmax = np.array(float(np.abs(w).max()) if w.size else 0.0)
    else:
        other = tuple(a for a in range(w.ndim) if a != axis)
        absmax = np.abs(w).max(axis=other) if other else np.abs(w)
    scale = (absmax / qmax).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int | None, bits: int = 8) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    s = scale if axis is None else np.expand_dims(scale, [a for a in range(w.ndim) if a != axis])
    return np.clip(np.round(w / s), -qmax, qmax).astype(np.int8)


def quantize_bias(b: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, int]:
    """int32 bias with the given (input scale * weight scale); returns (values, count clipped)."""
    q = np.round(np.asarray(b, dtype=np.float64) / np.asarray(scale, dtype=np.float64))
    lim = 2**31 - 1
    clipped = int(np.count_nonzero(np.abs(q) > lim))
    return np.clip(q, -lim, lim).astype(np.int32), clipped


def fake_quantize(x: np.ndarray, scale: float, zp: int, qtype: str = "uint8") -> np.ndarray:
    qmin, qmax = QRANGE[qtype]
    return ((np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale).astype(np.float32)


# --- running a model to observe tensors ----------------------------------------------

def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (float tensors)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in names:
        if name not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return m


def _progress(iterable, enabled: bool, total: int | None, label: str):
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, description=label, total=total, transient=True)


def collect(model: onnx.ModelProto, names: list[str], batches: Iterable[dict[str, np.ndarray]], *,
            histogram: bool = True, bins: int = 2048, channel_axes: dict[str, int] | None = None,
            reservoir: int = 0,
            session_factory: Callable | None = None, progress: bool = False,
            total_batches: int | None = None, observe: Callable | None = None) -> dict[str, TensorStats]:
    """Run ``model`` batch by batch and return streaming stats of the named tensors."""
    from opc.ort import make_session

    channel_axes = channel_axes or {}
    stats = {n: TensorStats(hist=Histogram(bins) if histogram else None, channel_axis=channel_axes.get(n),
                            reservoir=reservoir if n in channel_axes else 0)
             for n in names}
    probe = with_outputs(model, names)
    sess = (session_factory or make_session)(probe)
    inputs = {i.name for i in sess.get_inputs()}
    for batch in _progress(batches, progress, total_batches, "calibrating"):
        outs = sess.run(names, {k: v for k, v in batch.items() if k in inputs})
        for n, arr in zip(names, outs):
            stats[n].update(arr)
        if observe is not None:
            observe(batch)
        del outs
    return stats


# --- sensitivity: SQNR of quantized tensors against float ------------------------------

@dataclass
class LayerError:
    """Accumulated signal and noise power of one tensor (float reference vs quantized)."""

    signal: float = 0.0
    noise: float = 0.0

    def update(self, ref: np.ndarray, act: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float32).ravel()
        a = np.asarray(act, dtype=np.float32).ravel()
        if r.shape != a.shape:
            self.noise = math.inf
            return
        d = r - a
        # BLAS dot products: fast, and float32 accumulation is ample for a dB figure
        with np.errstate(over="ignore", invalid="ignore"):
            signal, noise = float(np.dot(r, r)), float(np.dot(d, d))
        if not (math.isfinite(signal) and math.isfinite(noise)):  # float32 overflow: redo in float64
            r64, d64 = r.astype(np.float64), d.astype(np.float64)
            signal, noise = float(np.dot(r64, r64)), float(np.dot(d64, d64))
        self.signal += signal
        self.noise += noise

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return 99.0 if self.signal > 0 else 0.0
        if self.signal == 0 or not math.isfinite(self.noise):
            return -99.0
        return round(10.0 * math.log10(self.signal / self.noise), 3)


def compare_tensors(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                    pairs: dict[str, tuple[str, str]], batches: Iterable[dict[str, np.ndarray]], *,
                    session_factory: Callable | None = None) -> dict[str, LayerError]:
    """SQNR per label of ``pairs`` = {label: (float tensor name, quantized tensor name)}."""
    from opc.ort import make_session

    factory = session_factory or make_session
    fnames = sorted({f for f, _ in pairs.values()})
    qnames = sorted({q for _, q in pairs.values()})
    fs = factory(with_outputs(float_model, fnames))
    qs = factory(with_outputs(quant_model, qnames))
    fin = {i.name for i in fs.get_inputs()}
    qin = {i.name for i in qs.get_inputs()}
    errors = {label: LayerError() for label in pairs}
    for batch in batches:
        fo = dict(zip(fnames, fs.run(fnames, {k: v for k, v in batch.items() if k in fin})))
        qo = dict(zip(qnames, qs.run(qnames, {k: v for k, v in batch.items() if k in qin})))
        for label, (f, q) in pairs.items():
            errors[label].update(fo[f], qo[q])
    return errors


def random_batches(model: onnx.ModelProto, samples: int, batch: int, input_shapes: dict | None,
                   seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Synthetic calibration batches (``calibration=random``): seeded standard normals."""
    from opc.ort import seeded_feeds

    done = 0
    i = 0
    while done < samples:
        n = min(batch, samples - done)
        shapes = {}
        for value in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            given = (input_shapes or {}).get(value.name)
            if given is not None:
                dims = list(given)
            if dims:
                dims[0] = n
            shapes[value.name] = tuple(d if d else 1 for d in dims)
        yield seeded_feeds(model, shapes, seed + i)
        done += n
        i += 1


__all__ = [
    "METHODS", "Histogram", "TensorStats", "compute_range", "activation_params", "weight_params",
    "quantize_weight", "quantize_bias", "fake_quantize", "with_outputs", "collect", "LayerError",
    "compare_tensors", "random_batches",
]
