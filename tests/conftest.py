"""Shared fixtures.

light_models   paths of the "light" ONNX models shipped in the onnx package (weights
               replaced by constants; real graph structure: resnet50, inception, ...)
digits_assets  the three shipped digits files: {"model", "calib", "eval"} -> Path
zoo            session-scoped factory: zoo("resnet18") exports the model once per test
               run (torch needed; skips otherwise) and returns the cached path.
               zoo("resnet18", batch=2, dynamic_batch=True, exporter="dynamo") caches per
               argument set (exporter: "torchscript", the default, or "dynamo").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.fixture(scope="session")
def light_models() -> list[Path]:
    paths = sorted(_light_dir().glob("*.onnx"))
    if not paths:
        pytest.skip("this onnx install ships no backend/test/data/light models")
    return paths


@pytest.fixture(scope="session")
def digits_assets() -> dict[str, Path]:
    import opc

    folder = Path(opc.__file__).resolve().parent / "data"
    assets = {"model": folder / "digits_cnn.onnx", "calib": folder / "digits_calib.npz",
              "eval": folder / "digits_eval.npz"}
    missing = [str(p) for p in assets.values() if not p.is_file()]
    assert not missing, f"shipped digits assets missing: {missing}"
    return assets


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    pytest.importorskip("torch")
    import torch

    torch.set_num_threads(2)
    from opc.models import export

    folder = tmp_path_factory.mktemp("zoo")
    cache: dict[tuple, Path] = {}

    def get(name: str, *, opset: int | None = None, batch: int = 1, dynamic_batch: bool = False,
            exporter: str = "torchscript") -> Path:
        key = (name, opset, batch, dynamic_batch, exporter)
        if key not in cache:
            stem = f"{name}-o{opset or 'd'}-b{batch}{'-dyn' if dynamic_batch else ''}-{exporter}"
            cache[key] = export(name, folder / f"{stem}.onnx", opset=opset, batch=batch, dynamic_batch=dynamic_batch,
                                exporter=exporter)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS thread for a module: on a shared machine multi-threaded BLAS under contention is 10x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn (a dev dependency) brings it; without it run as is
        yield
        return
    with threadpool_limits(1):
        yield


# lines a test module wants printed after the run (test_runtime_nodes.py: passes per op);
# printed from this hook because output written during a test run is captured
SUMMARY_KEY = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(SUMMARY_KEY, None)
    if lines:
        terminalreporter.write_line("")
        for line in lines:
            terminalreporter.write_line(line)
