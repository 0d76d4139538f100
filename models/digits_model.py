"""digits-cnn: a LeNet-style CNN trained at export time on scikit-learn's bundled digits.

The 1,797 8x8 digit images ship inside scikit-learn, so this is real data with no
download. A stratified split with a fixed seed keeps 360 images held out; those are the
accuracy benchmark for the lossy passes (quantize, prune, tune). Training is full-batch
Adam with a fixed seed on one thread, a few seconds on a CPU.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SEED = 0
HELD_OUT = 360          # images in the evaluation split
CALIB_SAMPLES = 256     # training images shipped as calibration data
EPOCHS = 20
INPUT_SHAPE = (1, 8, 8)


def load_split() -> dict[str, np.ndarray]:
    """The fixed train/held-out split: float32 images in [0, 1], shape [N, 1, 8, 8], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=HELD_OUT, random_state=SEED, stratify=y)
    return {"x_train": np.ascontiguousarray(x_tr), "y_train": y_tr,
            "x_test": np.ascontiguousarray(x_te), "y_test": y_te}


def build_module():
    import torch.nn as nn

    class DigitsCNN(nn.Module):
        """conv-bn-relu x2, pool, conv-bn-relu, pool, two dense layers (BatchNorm left for fold)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            return self.classifier(self.features(x))

    return DigitsCNN()


def train(epochs: int = EPOCHS, split: dict | None = None):
    """Train the CNN on the training split; deterministic for a given torch build."""
    import torch

    split = split or load_split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        model = build_module()
        x = torch.from_numpy(split["x_train"])
        y = torch.from_numpy(split["y_train"])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(SEED)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), 64):
                idx = order[start:start + 64]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return model


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())


def calibration_arrays(split: dict, n: int = CALIB_SAMPLES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    idx = np.sort(rng.choice(len(split["x_train"]), size=min(n, len(split["x_train"])), replace=False))
    return {"input": split["x_train"][idx]}


def eval_arrays(split: dict) -> dict[str, np.ndarray]:
    return {"input": split["x_test"], "labels": split["y_test"]}


# --- the opc.models interface -------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _split() -> dict[str, np.ndarray]:
    return load_split()


def build(name: str):
    return train(split=_split())


def input_names(name: str) -> list[str]:
    return ["input"]


def output_names(name: str) -> list[str]:
    return ["logits"]


def sample_data(name: str, n: int, split: str) -> dict[str, np.ndarray]:
    s = _split()
    if split == "eval":
        return {"input": s["x_test"]}
    return calibration_arrays(s, n=max(n, 1))


def eval_set(name: str):
    from opc.models import EvalSet

    s = _split()
    return EvalSet({"input": s["x_test"]}, s["y_test"], synthetic=False,
                   source=f"scikit-learn digits, {HELD_OUT} held-out images (seed {SEED})")


def write_assets(folder: Path) -> dict:
    """Train, export and write digits_cnn.onnx, digits_calib.npz, digits_eval.npz into ``folder``."""
    import onnx

    from opc.models import export
    from opc.ort import make_session

    folder = Path(folder)
    s = _split()
    onnx_path = export("digits-cnn", folder / "digits_cnn.onnx", opset=17, batch=1, dynamic_batch=True)
    np.savez_compressed(folder / "digits_calib.npz", **calibration_arrays(s))
    np.savez_compressed(folder / "digits_eval.npz", **eval_arrays(s))
    sess = make_session(onnx.load(str(onnx_path)), threads=1)
    logits = sess.run(["logits"], {"input": s["x_test"]})[0]
    return {"path": str(onnx_path), "heldout_top1": accuracy(logits, s["y_test"]),
            "train": len(s["x_train"]), "heldout": len(s["x_test"])}


if __name__ == "__main__":  # python -m opc.models.digits_model  (regenerates the shipped assets)
    import json

    print(json.dumps(write_assets(Path(__file__).resolve().parent.parent / "compiler" / "data")))
