"""Pruning masks on weight matrices ``[outputs, reduction]`` (True = keep).

Scores are importance values (|w| for magnitude, |w| * input RMS for activation); the
lowest scores are pruned. Counts are exact: ``round(sparsity * size)`` entries per layer
(or over all layers for the global scope), ties broken by position so the result is
deterministic.
"""

from __future__ import annotations

import numpy as np


def count_to_prune(size: int, sparsity: float) -> int:
    return int(min(size, max(0, round(sparsity * size))))


def layer_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep all but the ``round(sparsity * size)`` lowest-scoring entries."""
    flat = scores.ravel()
    k = count_to_prune(flat.size, sparsity)
    mask = np.ones(flat.size, dtype=bool)
    if k:
        mask[np.argsort(flat, kind="stable")[:k]] = False
    return mask.reshape(scores.shape)


def global_masks(scores: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """One threshold over all matrices together: ``round(sparsity * total)`` pruned in all."""
    flat = np.concatenate([s.ravel() for s in scores]) if scores else np.zeros(0)
    k = count_to_prune(flat.size, sparsity)
    keep = np.ones(flat.size, dtype=bool)
    if k:
        keep[np.argsort(flat, kind="stable")[:k]] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.size].reshape(s.shape))
        start += s.size
    return out


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M: in every run of ``m`` consecutive columns of a row keep the ``n`` best."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"reduction size {cols} is not a multiple of m={m}")
    groups = scores.reshape(rows, cols // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order[..., :n], True, axis=-1)
    return mask.reshape(rows, cols)
