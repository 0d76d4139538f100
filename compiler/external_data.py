"""Loading external tensor data without reading anything outside the model's folder."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

from opc.errors import ModelError

_KNOWN_KEYS = {"location", "offset", "length", "checksum", "basepath"}


def _allowed_roots(model_path: Path) -> list[Path]:
    # the model's own folder, and (Hugging Face cache layout) the folder of its real path
    roots = [model_path.absolute().parent.resolve()]
    real_parent = model_path.resolve().parent
    if real_parent not in roots:
        roots.append(real_parent)
    return roots


def resolve_location(model_path: Path, location: str, tensor_name: str) -> Path:
    where = f"{model_path}: tensor '{tensor_name}' external data '{location}'"
    if not location or "\x00" in location:
        raise ModelError(f"{where}: empty or invalid location")
    if os.path.isabs(location) or Path(location).is_absolute() or location.startswith(("/", "\\")):
        raise ModelError(f"{where}: absolute paths are refused")
    if ".." in Path(location).parts or ".." in location.replace("\\", "/").split("/"):
        raise ModelError(f"{where}: '..' in the path is refused")
    for root in _allowed_roots(model_path):
        candidate = root / location
        if not candidate.exists():
            continue
        real = candidate.resolve()
        inside = any(real.is_relative_to(r) for r in _allowed_roots(model_path)) or _is_hf_blob(real, root)
        if not inside:
            raise ModelError(f"{where}: the path leaves the model folder (resolves to {real})")
        if not real.is_file():
            raise ModelError(f"{where}: not a regular file")
        if os.stat(real).st_nlink > 1 and not candidate.is_symlink():
            raise ModelError(f"{where}: a hard link (link count > 1) is refused")
        return real
    raise ModelError(f"{where}: file not found")


def _is_hf_blob(real: Path, root: Path) -> bool:
    # huggingface_hub cache: <repo>/snapshots/<rev>/file -> ../../blobs/<hash>
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def load_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        keys = {e.key for e in tensor.external_data}
        unknown = keys - _KNOWN_KEYS
        if unknown:
            raise ModelError(f"{model_path}: tensor '{tensor.name}' has unknown external data keys {sorted(unknown)}")
        info = ExternalDataInfo(tensor)
        path = resolve_location(model_path, info.location, tensor.name)
        size = path.stat().st_size
        offset = int(info.offset or 0)
        length = int(info.length) if info.length is not None and info.length != "" else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelError(
                f"{model_path}: tensor '{tensor.name}' external data offset {offset} + length {length} is beyond "
                f"the end of {info.location} ({size} bytes)"
            )
        with open(path, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
