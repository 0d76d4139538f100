"""Loading external tensor data without reading anything outside the model's folder.

A location is refused when it is absolute, contains ``..``, resolves (through symlinks)
outside the allowed folders, is not a regular file, has more than one hard link (the
other name may be anywhere: ONNX Runtime follows such links out of the folder), or when
offset/length fall outside the file or disagree with the tensor's dims. Keys other than
the four the ONNX spec defines (location, offset, length, checksum) are refused.

Allowed folders: the folder holding the model path as given, and the folder of the model
file's real path. The second covers the Hugging Face cache layout, where
``snapshots/<rev>/model.onnx`` and its data file are symlinks into ``../../blobs``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx

from opc.errors import ModelError

SPEC_KEYS = ("location", "offset", "length", "checksum")


def allowed_roots(model_path: Path) -> list[Path]:
    roots = [Path(os.path.abspath(model_path)).parent.resolve()]
    real_parent = Path(model_path).resolve().parent
    if real_parent not in roots:
        roots.append(real_parent)
    return roots


def _check_location_text(location: str, where: str) -> None:
    if not location or "\x00" in location:
        raise ModelError(f"{where}: empty or invalid location")
    posix = location.replace("\\", "/")
    if os.path.isabs(location) or posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ModelError(f"{where}: absolute paths are refused")
    if ".." in posix.split("/"):
        raise ModelError(f"{where}: '..' in the path is refused")


def resolve_location(model_path: Path, location: str, tensor_name: str) -> Path:
    """The real path of a tensor's data file, after every check; raises ModelError."""
    where = f"{model_path}: tensor '{tensor_name}' external data '{location}'"
    _check_location_text(location, where)
    roots = allowed_roots(model_path)
    for root in roots:
        candidate = root / location
        if not os.path.lexists(candidate):
            continue
        try:
            real = candidate.resolve()
        except (RuntimeError, OSError):  # a symlink loop
            raise ModelError(f"{where}: the path is a symlink loop") from None
        if not any(real.is_relative_to(r) for r in roots):
            raise ModelError(f"{where}: the path leaves the model folder (it resolves to {real})")
        try:
            st = os.stat(real)
        except OSError:
            raise ModelError(f"{where}: a dangling symlink") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{where}: not a regular file")
        if st.st_nlink > 1:
            raise ModelError(f"{where}: the file has {st.st_nlink} hard links; hard-linked data files are "
                             "refused (the other link may be outside the model folder)")
        return real
    raise ModelError(f"{where}: file not found next to the model")


def _parse_entries(tensor: onnx.TensorProto, model_path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for e in tensor.external_data:
        if e.key not in SPEC_KEYS:
            raise ModelError(f"{model_path}: tensor '{tensor.name}' has an unknown external data key '{e.key}' "
                             f"(known: {', '.join(SPEC_KEYS)})")
        if e.key in entries:
            raise ModelError(f"{model_path}: tensor '{tensor.name}' lists external data key '{e.key}' twice")
        entries[e.key] = e.value
    if "location" not in entries:
        raise ModelError(f"{model_path}: tensor '{tensor.name}' has external data without a location")
    for key in ("offset", "length"):
        if key in entries:
            text = entries[key].strip()
            if not text.isdigit():
                raise ModelError(f"{model_path}: tensor '{tensor.name}' external data {key} '{entries[key]}' "
                                 "is not a non-negative integer")
    return entries


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def load_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Read every external tensor's bytes into raw_data (the tensor's dims and type must
    have been checked already: see opc.validate.check_tensor)."""
    from opc.validate import iter_tensors, tensor_nbytes

    model_path = Path(model_path)
    external = [t for t, _ in iter_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    total = sum(tensor_nbytes(t) for t in external)
    memory = physical_memory()
    if memory and total > memory:
        # e.g. many tensors pointing into one sparse file: refuse before reading anything
        raise ModelError(f"{model_path}: its external data adds up to {total} bytes, more than this machine's "
                         f"memory ({memory} bytes)")
    for tensor in external:
        entries = _parse_entries(tensor, model_path)
        location = entries["location"]
        path = resolve_location(model_path, location, tensor.name)
        expected = tensor_nbytes(tensor)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ModelError(f"{model_path}: tensor '{tensor.name}' external data '{location}': cannot open "
                             f"({exc.strerror or exc})") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # checked again on the open file: it may have changed since
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                raise ModelError(f"{model_path}: tensor '{tensor.name}' external data '{location}' changed "
                                 "while being read (not a regular, singly-linked file)")
            size = st.st_size
            offset = int(entries.get("offset", "0") or 0)
            length = int(entries["length"]) if entries.get("length") else size - offset
            if offset > size or offset + length > size:
                raise ModelError(f"{model_path}: tensor '{tensor.name}' external data offset {offset} + length "
                                 f"{length} is beyond the end of {location} ({size} bytes)")
            if length != expected:
                raise ModelError(f"{model_path}: tensor '{tensor.name}' external data length {length} does not "
                                 f"match its dims {list(tensor.dims)} ({expected} bytes)")
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ModelError(f"{model_path}: tensor '{tensor.name}' external data '{location}' is shorter than "
                             "announced (the file changed while being read)")
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
