"""A stable text form of a model, for per-pass diffs.

One line per graph input/output, per initializer (name, dtype, shape, nonzero count and
a short content hash, never the values) and per node (op, name, inputs, outputs,
attributes). Subgraphs are indented under their node. No object ids, no timestamps:
the same model always prints the same text, and a value-only change (pruning,
quantization) changes an initializer's hash and nonzero count.
"""

from __future__ import annotations

import difflib
import hashlib

import numpy as np
import onnx
from onnx import numpy_helper


def _dtype_name(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _type_str(tp: onnx.TypeProto) -> str:
    if tp.HasField("tensor_type"):
        t = tp.tensor_type
        dims = []
        if t.HasField("shape"):
            for d in t.shape.dim:
                dims.append(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
            shape = "[" + ",".join(dims) + "]"
        else:
            shape = "[*]"
        return f"{_dtype_name(t.elem_type)}{shape}"
    if tp.HasField("sequence_type"):
        return f"seq({_type_str(tp.sequence_type.elem_type)})"
    if tp.HasField("optional_type"):
        return f"optional({_type_str(tp.optional_type.elem_type)})"
    return "?"


def tensor_summary(t: onnx.TensorProto) -> str:
    shape = "[" + ",".join(str(d) for d in t.dims) + "]"
    try:
        arr = numpy_helper.to_array(t)
        raw = np.ascontiguousarray(arr).tobytes()
        nnz = int(np.count_nonzero(arr))
        digest = hashlib.sha1(raw).hexdigest()[:10]
        return f"{_dtype_name(t.data_type)}{shape} nnz={nnz} hash={digest}"
    except Exception:
        digest = hashlib.sha1(t.SerializeToString(deterministic=True)).hexdigest()[:10]
        return f"{_dtype_name(t.data_type)}{shape} hash={digest}"


def _attr_str(a: onnx.AttributeProto, indent: str, lines: list[str]) -> str | None:
    v = onnx.helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.GRAPH:
        lines.append(f"{indent}  {a.name}: graph {{")
        _graph_lines(a.g, indent + "    ", lines)
        lines.append(f"{indent}  }}")
        return None
    if a.type == onnx.AttributeProto.GRAPHS:
        for i, g in enumerate(a.graphs):
            lines.append(f"{indent}  {a.name}[{i}]: graph {{")
            _graph_lines(g, indent + "    ", lines)
            lines.append(f"{indent}  }}")
        return None
    if a.type == onnx.AttributeProto.TENSOR:
        return f"{a.name}=tensor({tensor_summary(a.t)})"
    if a.type == onnx.AttributeProto.SPARSE_TENSOR:
        return f"{a.name}=sparse({tensor_summary(a.sparse_tensor.values)})"
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, list):
        v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
        if a.type == onnx.AttributeProto.TENSORS:
            v = [tensor_summary(t) for t in a.tensors]
    if isinstance(v, float):
        v = float(np.float32(v))
    return f"{a.name}={v!r}"


def _graph_lines(g: onnx.GraphProto, indent: str, lines: list[str]) -> None:
    inits = {t.name for t in g.initializer}
    for vi in g.input:
        if vi.name not in inits:
            lines.append(f"{indent}input {vi.name}: {_type_str(vi.type)}")
    for vi in g.output:
        lines.append(f"{indent}output {vi.name}: {_type_str(vi.type)}")
    for t in sorted(g.initializer, key=lambda t: t.name):
        lines.append(f"{indent}init {t.name}: {tensor_summary(t)}")
    for s in sorted(g.sparse_initializer, key=lambda s: s.values.name):
        dense = "[" + ",".join(str(d) for d in s.dims) + "]"
        lines.append(f"{indent}sparse-init {s.values.name}: {dense} values={tensor_summary(s.values)}")
    for n in g.node:
        sub: list[str] = []
        attrs = [x for x in (_attr_str(a, indent, sub) for a in sorted(n.attribute, key=lambda a: a.name)) if x]
        op = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        head = f"{indent}{op} \"{n.name}\" ({', '.join(n.input)}) -> ({', '.join(n.output)})"
        if attrs:
            head += " {" + ", ".join(attrs) + "}"
        lines.append(head)
        lines.extend(sub)


def model_text(model: onnx.ModelProto) -> str:
    lines = [f"ir_version {model.ir_version}"]
    lines.append("opsets " + ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in
                                       sorted(model.opset_import, key=lambda o: o.domain)))
    for f in model.functions:
        lines.append(f"function {f.domain}::{f.name}({', '.join(f.input)}) -> ({', '.join(f.output)})")
    _graph_lines(model.graph, "", lines)
    return "\n".join(lines) + "\n"


def unified_diff(before: str, after: str, a_name: str = "before", b_name: str = "after") -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), a_name, b_name))
