"""Reading and validating untrusted model files.

Everything here raises ``ModelError`` with one line naming the file, node or tensor.
Checks run on the raw ModelProto, before onnx-graphsurgeon sees the graph (it accepts
cycles and duplicate outputs without complaint).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from opc.errors import ModelError


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)

MIN_OPSET = 7


def max_opset() -> int:
    return onnx.defs.onnx_opset_version()


def read_model_file(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an ONNX file")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from None
    if not model.HasField("graph"):
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model)):
        from opc.external_data import load_external_data

        load_external_data(model, path)
    return model


def check_model(model: onnx.ModelProto, source: str = "<model>") -> None:
    """Validate opsets, IR version and graph structure; raise ModelError naming the fault."""
    if not model.HasField("graph"):
        raise ModelError(f"{source}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise ModelError(f"{source}: the model has no opset_import")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"{source}: ir_version {model.ir_version} is newer than supported (up to {onnx.IR_VERSION})")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise ModelError(f"{source}: no default-domain opset in opset_import")
    if not MIN_OPSET <= default[0] <= max_opset():
        raise ModelError(
            f"{source}: opset {default[0]} is outside the supported range {MIN_OPSET} to {max_opset()}"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelError(f"{source}: {first}") from None
    except ValueError as exc:  # > 2 GB models are checked by path; skip the proto check
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise ModelError(f"{source}: {exc}") from None


def check_custom_domains(model: onnx.ModelProto, source: str = "<model>") -> None:
    """Refuse ops of domains opc does not know, unless --allow-custom-ops."""
    from opc.summary import iter_nodes

    known = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
    local = {(f.domain, f.name) for f in model.functions}
    for node in iter_nodes(model.graph):
        if node.domain not in known and (node.domain, node.op_type) not in local:
            raise ModelError(
                f"{source}: node '{node.name or node.op_type}' uses op {node.op_type} of the custom domain "
                f"'{node.domain}' (pass --allow-custom-ops to keep such nodes untouched)"
            )
