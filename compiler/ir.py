"""Model I/O and the onnx-graphsurgeon bridge.

``load_model`` reads and validates a file (never modifying it); ``save_model`` writes
atomically (a temporary file in the same folder, then ``os.replace``), so a failure or
Ctrl-C leaves no partial file and an existing output untouched. ``import_graph`` and
``export_model`` move between ModelProto and ``gs.Graph`` keeping model-level fields.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from opc.errors import ModelError, OpcError

TWO_GB = 2**31 - 1


def load_model(path: str | os.PathLike, *, validate: bool = True) -> onnx.ModelProto:
    """Read an ONNX file into a ModelProto, with external data, and validate it."""
    from opc import validate as validation

    path = Path(path)
    model = validation.read_model_file(path)
    if validate:
        validation.check_model(model, source=str(path))
    return model


def as_model(model_or_path, *, validate: bool = True) -> tuple[onnx.ModelProto, Path | None]:
    """Accept a ModelProto or a path; return (a private copy of the model, its folder).

    ``validate=False`` skips the checks for a ModelProto that ``load_model`` already checked.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        from opc import validate as validation

        model = copy.deepcopy(model_or_path)
        if validate:
            validation.check_model(model, source="<model>")
        return model, None
    path = Path(model_or_path)
    return load_model(path), path.resolve().parent


EXTERNAL_DATA_THRESHOLD = TWO_GB - 64 * 2**20  # serialized size above which weights go to <name>.data


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically; models over 2 GB get ``<name>.data`` beside it.

    Everything is written (and fsynced) inside a temporary folder next to ``path`` and
    renamed into place, so nothing partial is ever visible and a failure or Ctrl-C leaves
    an existing file untouched and no temporary behind. A symlink sitting at ``path`` (or
    at its data file) is replaced, never written through. ``path`` may be the model's
    own input file: the model is in memory by then.
    """
    path = Path(path)
    folder = Path(os.path.abspath(path)).parent
    if not folder.is_dir():
        raise OpcError(f"{path}: the output folder {folder} does not exist")
    if os.path.isdir(path) and not os.path.islink(path):
        raise OpcError(f"{path}: is a folder")
    mode = None
    if os.path.isfile(path) and not os.path.islink(path):
        mode = os.stat(path).st_mode & 0o777  # keep an existing output's permissions
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
        staged = staging / path.name
        data_name = path.name + ".data"
        external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
        if not external:
            _write_synced(staged, _serialize(model, path))
        else:
            _write_with_external_data(model, staged, staging / data_name, path)
        if mode is not None:
            os.chmod(staged, mode)
        if external:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staged, folder / path.name)
        _fsync_path(folder)
        return path
    except OSError as exc:
        raise OpcError(f"{path}: cannot write the output ({exc.strerror or exc})") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _serialize(model: onnx.ModelProto, path: Path) -> bytes:
    try:
        return model.SerializeToString(deterministic=True)
    except ValueError as exc:  # over protobuf's 2 GB even after moving weights out
        raise OpcError(f"{path}: the model cannot be serialized ({exc})") from None


def _write_with_external_data(model: onnx.ModelProto, staged: Path, data_path: Path, path: Path) -> None:
    """Move every raw initializer of 1 KiB or more into ``data_path`` (64-byte aligned),
    write the model, then put the model's tensors back as they were. Written here rather
    than with onnx.save_model, which checks for an existing data file relative to the
    current directory and appends to whatever file is there."""
    from opc.summary import iter_graphs

    moved = []
    try:
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            offset = 0
            for graph in iter_graphs(model.graph):
                for tensor in graph.initializer:
                    if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < 1024:
                        continue
                    pad = -offset % 64
                    f.write(b"\0" * pad)
                    offset += pad
                    raw = tensor.raw_data
                    f.write(raw)
                    moved.append((tensor, raw))
                    tensor.ClearField("raw_data")
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", data_path.name), ("offset", str(offset)),
                                       ("length", str(len(raw)))):
                        tensor.external_data.add(key=key, value=value)
                    offset += len(raw)
            f.flush()
            os.fsync(f.fileno())
        _write_synced(staged, _serialize(model, path))
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _quiet_graphsurgeon():
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    # its [W] lines go to stdout; opc reports problems itself
    G_LOGGER.severity = G_LOGGER.ERROR
    return gs


def import_graph(model: onnx.ModelProto):
    gs = _quiet_graphsurgeon()

    try:
        return gs.import_onnx(model)
    except OpcError:
        raise
    except Exception as exc:  # graphsurgeon's own errors carry no file name
        raise ModelError(f"cannot import the graph: {exc}") from exc


def export_model(graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a gs.Graph, keeping the template model's ir_version, opsets and metadata."""
    gs = _quiet_graphsurgeon()

    kwargs = {}
    if template is not None:
        opsets = {o.domain: o.version for o in template.opset_import}
        # the graph's own default-domain opset wins (a pass may have upgraded it)
        opsets[""] = graph.opset
        for domain, version in getattr(graph, "import_domains", None) and [
            (o.domain, o.version) for o in graph.import_domains
        ] or []:
            opsets.setdefault(domain, version)
        kwargs["opset_imports"] = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    model = gs.export_onnx(graph, do_type_check=False, **kwargs)
    if template is not None:
        model.ir_version = max(template.ir_version, model.ir_version if graph.ir_version else 0)
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
        model.domain = template.domain
        model.model_version = template.model_version
        model.doc_string = template.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    if model.ir_version < 4:
        _initializers_as_inputs(model.graph)
    return model


def _initializers_as_inputs(graph: onnx.GraphProto) -> None:
    # before IR version 4 every initializer must also be listed as a graph input
    listed = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
