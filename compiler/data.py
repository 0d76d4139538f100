"""Calibration and evaluation data: .npz files or folders of .npz/.npy files.

Arrays are keyed by model input name; the first axis is the sample axis. Data is read
lazily and handed out batch by batch so that memory does not grow with the number of
samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from opc.errors import DataError


class CalibrationData:
    """Samples for a model's inputs, validated against the model and served in batches."""

    def __init__(self, source: Path, arrays: dict[str, np.ndarray], synthetic: bool = False):
        self.source = source
        self.arrays = arrays
        self.synthetic = synthetic
        for name, value in arrays.items():
            if np.ndim(value) == 0:
                raise DataError(f"{source}: input '{name}' is a single value; samples must be stacked on the "
                                "first axis")
        counts = {k: len(v) for k, v in arrays.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"{source}: inputs have different sample counts {counts}")
        self.num_samples = next(iter(counts.values())) if counts else 0

    @classmethod
    def load(cls, path: str | Path, model: onnx.ModelProto | None = None, *, min_samples: int = 1) -> "CalibrationData":
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such calibration data file or folder")
        arrays: dict[str, np.ndarray] = {}
        try:
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
                if not files:
                    raise DataError(f"{path}: the folder holds no .npz or .npy files")
                parts: dict[str, list[np.ndarray]] = {}
                for f in files:
                    for k, v in _read_file(f).items():
                        parts.setdefault(k, []).append(v)
                arrays = {k: np.concatenate(v) for k, v in parts.items()}
            else:
                arrays = _read_file(path)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: cannot read calibration data ({exc})") from None
        data = cls(path, arrays)
        if model is not None:
            data.check_against(model, min_samples=min_samples)
        return data

    def check_against(self, model: onnx.ModelProto, *, min_samples: int = 1) -> None:
        from opc.ort import graph_inputs, input_spec

        inputs = graph_inputs(model)
        names = [i.name for i in inputs]
        for name in self.arrays:
            if name not in names:
                raise DataError(f"{self.source}: '{name}' is not a model input (inputs: {', '.join(names)})")
        for value in inputs:
            if value.name not in self.arrays:
                raise DataError(f"{self.source}: no data for model input '{value.name}'")
            try:
                dims, dtype = input_spec(value)
            except Exception:
                raise DataError(f"{self.source}: model input '{value.name}' is not a plain tensor; "
                                "opc cannot feed it calibration data") from None
            arr = self.arrays[value.name]
            if arr.dtype != dtype:
                raise DataError(f"{self.source}: input '{value.name}' has dtype {arr.dtype}, the model wants {np.dtype(dtype)}")
            if arr.ndim != len(dims):
                raise DataError(
                    f"{self.source}: input '{value.name}' has shape {list(arr.shape)}; expected samples stacked "
                    f"on the first axis, rank {len(dims)} like {dims}"
                )
            for axis, (got, want) in enumerate(zip(arr.shape[1:], dims[1:]), start=1):
                if isinstance(want, int) and got != want:
                    raise DataError(
                        f"{self.source}: input '{value.name}' axis {axis} is {got}, the model wants {want}"
                    )
        if self.num_samples < min_samples:
            names = ", ".join(f"'{n}'" for n in self.arrays)
            raise DataError(f"{self.source}: {self.num_samples} samples for input {names}, at least {min_samples} "
                            "needed")

    def batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        step = batch_size or n or 1
        for start in range(0, n, step):
            stop = min(start + step, n)
            yield {k: np.ascontiguousarray(v[start:stop]) for k, v in self.arrays.items()}


def read_arrays(path: str | Path, what: str = "data") -> dict[str, np.ndarray]:
    """The arrays of one .npz (or .npy) file, with the size checks; DataError naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such {what} file")
    try:
        return _read_file(path)
    except DataError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read {what} ({first})") from None


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.suffix == ".npy":
        return {path.stem: np.load(path, allow_pickle=False, mmap_mode="r")}
    _check_npz_sizes(path)
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _check_npz_sizes(path: Path) -> None:
    """Refuse an .npz whose arrays would not fit in memory, from the array headers alone
    (a compressed .npz of zeros is a zip bomb: 10 GB can take 10 MB on disk)."""
    import zipfile

    from opc.external_data import physical_memory

    memory = physical_memory()
    if not memory or not zipfile.is_zipfile(path):
        return  # np.load reports what it is not
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                except Exception:
                    continue  # np.load reports it
            total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    if total > memory:
        raise DataError(f"{path}: its arrays add up to {total} bytes, more than this machine's memory "
                        f"({memory} bytes)")
