"""kws-lstm: keyword spotting on MFCC features (conv front end + 2-layer LSTM, 12 classes).

Shaped like the Speech Commands KWS models (49 frames of 40 MFCC coefficients, i.e. 1 s
of audio at a 20 ms hop; 10 keywords + silence + unknown). There is no speech data set
in our reach, so weights and data are seeded random and marked synthetic: the features
are smoothed along time (like real MFCC trajectories), not white noise.
"""

from __future__ import annotations

import numpy as np

SEED = 0
FRAMES, COEFFS, CLASSES, HIDDEN = 49, 40, 12, 64


def _module():
    import torch.nn as nn

    class KwsLstm(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = nn.Sequential(nn.Conv1d(COEFFS, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
                                       nn.Conv1d(64, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU())
            self.lstm = nn.LSTM(64, HIDDEN, num_layers=2, batch_first=True)
            self.head = nn.Linear(HIDDEN, CLASSES)

        def forward(self, mfcc):                     # [N, frames, coeffs]
            x = self.front(mfcc.transpose(1, 2))     # [N, 64, frames]
            y, _ = self.lstm(x.transpose(1, 2))      # [N, frames, hidden]
            return self.head(y[:, -1])

    return KwsLstm()


def build(name: str):
    import torch

    torch.manual_seed(SEED)
    module = _module()
    # BatchNorm statistics from the synthetic features, so activations are in range
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.momentum = None
    module.train()
    with torch.no_grad():
        module(torch.from_numpy(features(64, seed=SEED + 1)))
    return module.eval()


def features(n: int, seed: int) -> np.ndarray:
    """Seeded MFCC-shaped features [n, 49, 40]: random walks along time, per-coefficient scale."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((n, FRAMES, COEFFS)).astype(np.float32)
    kernel = np.ones(5, np.float32) / 5
    smooth = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), 1, steps)
    scale = (1.0 / (1.0 + np.arange(COEFFS, dtype=np.float32) / 8.0))  # higher coefficients are smaller
    return np.ascontiguousarray((smooth * scale * 3.0).astype(np.float32))


def input_names(name: str) -> list[str]:
    return ["mfcc"]


def output_names(name: str) -> list[str]:
    return ["logits"]


def sample_data(name: str, n: int, split: str) -> dict[str, np.ndarray]:
    return {"mfcc": features(n, seed=SEED + (2 if split == "calib" else 3))}


def eval_set(name: str):
    from opc.models import EvalSet

    return EvalSet({"mfcc": features(128, seed=SEED + 3)}, None, synthetic=True,
                   source="synthetic: 128 seeded MFCC-shaped feature sequences, no labels (compare against fp32)")
