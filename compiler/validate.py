"""Reading and validating untrusted model files.

Everything here raises ``ModelError`` with one line naming the file, node or tensor.
The checks run on the raw ModelProto, before onnx-graphsurgeon sees the graph (it
imports cycles and duplicate outputs without complaint), in this order:

1. the file itself: exists, a regular file, not empty, under 2 GB, parses as a ModelProto
   with a graph and an opset_import (``onnx.load`` accepts an empty file);
2. subgraph nesting depth, counted without recursion (also on the raw bytes when
   protobuf refuses to parse a deeply nested file), so no RecursionError is possible;
3. every tensor's data type, dims and data size, before any external data is read or any
   array is allocated for it;
4. opset / ir_version ranges, then graph structure per (sub)graph: unknown ops in the
   default domain, undefined inputs, duplicate node outputs, graph outputs listed twice,
   dangling outputs, cycles (an acyclic graph whose nodes are merely out of order is
   sorted), then ``onnx.checker`` for everything else.

Non-finite (NaN/Inf) weights are allowed but reported as an ``OpcWarning``.
"""

from __future__ import annotations

import functools
import heapq
import os
import stat
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from opc.errors import ModelError

MIN_OPSET = 7
MIN_IR_VERSION = 3
MAX_NESTING = 30  # deepest If/Loop/Scan subgraph nesting accepted
MAX_TENSOR_BYTES = 2**40  # dims describing more than 1 TiB are refused as absurd
MAX_FILE_BYTES = 2**31 - 1  # protobuf cannot parse more; big weights belong in external data

_TENSOR = onnx.AttributeProto.TENSOR
_TENSORS = onnx.AttributeProto.TENSORS
_SPARSE = onnx.AttributeProto.SPARSE_TENSOR
_SPARSES = onnx.AttributeProto.SPARSE_TENSORS
_GRAPH = onnx.AttributeProto.GRAPH
_GRAPHS = onnx.AttributeProto.GRAPHS


class OpcWarning(UserWarning):
    """Something suspicious but allowed (the CLI prints it as one 'opc: warning:' line).

    ``detail`` is the message without the file name, so that a model validated twice
    (loaded, then compiled) is reported once."""

    def __init__(self, source: str, detail: str):
        super().__init__(f"{source}: {detail}")
        self.detail = detail


def max_opset() -> int:
    return onnx.defs.onnx_opset_version()


# ---------------------------------------------------------------------------------------
# the file


def read_model_file(path: Path) -> onnx.ModelProto:
    """Parse ``path`` into a ModelProto, check its tensors, then load its external data."""
    path = Path(path)
    try:
        if not path.exists():
            raise ModelError(f"{path}: no such file")
        if path.is_dir():
            raise ModelError(f"{path}: is a folder, not an ONNX file")
        # one open file for every check and the read: it cannot be swapped in between;
        # O_NONBLOCK so that a FIFO does not hang before fstat says what it is
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ModelError(f"{path}: not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise ModelError(f"{path}: {st.st_size} bytes is over the 2 GB protobuf limit; "
                                 "save big weights as external data")
            data = f.read(st.st_size + 1)
            if len(data) != st.st_size:
                raise ModelError(f"{path}: the file changed while being read")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    model = parse_model_bytes(data, str(path))
    check_structure_limits(model, str(path))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t, _ in iter_tensors(model)):
        from opc.external_data import load_external_data

        load_external_data(model, path)
    return model


def parse_model_bytes(data: bytes, source: str) -> onnx.ModelProto:
    if not data:
        raise ModelError(f"{source}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        depth = wire_nesting_depth(data)
        if depth > MAX_NESTING:
            raise ModelError(_depth_message(source, depth)) from None
        reason = str(exc).split(":")[-1].strip() or "truncated or corrupt"
        raise ModelError(f"{source}: not an ONNX model (protobuf parse failed: {reason})") from None
    if not model.HasField("graph"):
        raise ModelError(f"{source}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise ModelError(f"{source}: not a valid ONNX model (no opset_import)")
    return model


def check_structure_limits(model: onnx.ModelProto, source: str) -> None:
    """Nesting depth, text fields and tensor sanity: everything that must hold before
    anything recurses into the graph or allocates memory for a tensor."""
    depth = nesting_depth(model)
    if depth > MAX_NESTING:
        raise ModelError(_depth_message(source, depth))
    check_text_fields(model, source)
    for tensor, where in iter_tensors(model):
        check_tensor(tensor, where, source)


def _depth_message(source: str, depth: int) -> str:
    return (f"{source}: subgraphs (If/Loop/Scan bodies) are nested {depth} deep; "
            f"opc accepts at most {MAX_NESTING}")


# ---------------------------------------------------------------------------------------
# walking graphs without recursion


def iter_graph_scopes(model: onnx.ModelProto):
    """(graph, depth, label) for the main graph and every nested subgraph, breadth first."""
    queue = deque([(model.graph, 0, "the main graph")])
    while queue:
        graph, depth, label = queue.popleft()
        yield graph, depth, label
        for node in graph.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == _GRAPH else list(attr.graphs) if attr.type == _GRAPHS else []
                for sub in subs:
                    queue.append((sub, depth + 1, f"subgraph '{attr.name}' of node '{_node_label(node)}'"))


def nesting_depth(model: onnx.ModelProto) -> int:
    deepest = 0
    stack = [(model.graph, 0)]
    funcs = [(n, 0) for f in model.functions for n in f.node]
    while stack or funcs:
        if funcs:
            node, depth = funcs.pop()
            nodes = [node]
        else:
            graph, depth = stack.pop()
            nodes = graph.node
        deepest = max(deepest, depth)
        for node in nodes:
            for attr in node.attribute:
                if attr.type == _GRAPH:
                    stack.append((attr.g, depth + 1))
                elif attr.type == _GRAPHS:
                    stack.extend((g, depth + 1) for g in attr.graphs)
    return deepest


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("bad varint")


# field numbers leading to subgraphs: ModelProto.graph=7, ModelProto.functions=25,
# GraphProto.node=1, FunctionProto.node=7, NodeProto.attribute=5, AttributeProto.g=6/.graphs=11
_WIRE_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node"},
    "function": {7: "node"},
    "node": {5: "attr"},
    "attr": {6: "graph", 11: "graph"},
}


def wire_nesting_depth(data: bytes) -> int:
    """Subgraph nesting depth read from the protobuf wire format, without recursion.

    Used when protobuf itself refuses a file (its decoder stops at about 31 levels), so
    that the error can say what is wrong. Malformed bytes end the scan early."""
    deepest = 0
    stack = [("model", 0, len(data), -1)]  # kind, start, end, graph depth
    while stack:
        kind, pos, end, depth = stack.pop()
        if kind == "graph":
            depth += 1
            deepest = max(deepest, depth)
        children = _WIRE_CHILDREN[kind]
        try:
            while pos < end:
                key, pos = _varint(data, pos, end)
                field, wire = key >> 3, key & 7
                if wire == 0:
                    _, pos = _varint(data, pos, end)
                elif wire == 1:
                    pos += 8
                elif wire == 5:
                    pos += 4
                elif wire == 2:
                    length, pos = _varint(data, pos, end)
                    if pos + length > end:
                        break
                    if field in children:
                        stack.append((children[field], pos, pos + length, depth))
                    pos += length
                else:
                    break
        except ValueError:
            continue
    return deepest


def _repeated(fd) -> bool:
    # protobuf >= 5 has is_repeated; older versions only label
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def check_text_fields(model: onnx.ModelProto, source: str) -> None:
    """Every string field must be valid UTF-8: protobuf's proto2 parser does not check,
    and hands such a field back as ``bytes`` (or raises UnicodeDecodeError), which breaks
    code deep inside onnx and the passes. Iterative; tensors' data fields are not touched
    (no copies of large weights)."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    def bad(msg) -> None:
        raise ModelError(f"{source}: {msg.DESCRIPTOR.name} holds a name or text field that is not valid UTF-8")

    stack: list = [model]
    while stack:
        msg = stack.pop()
        try:
            if isinstance(msg, onnx.TensorProto):
                texts = [msg.name, msg.doc_string] + [x for e in msg.external_data for x in (e.key, e.value)]
                if any(not isinstance(t, str) for t in texts):
                    bad(msg)
                continue
            for fd, value in msg.ListFields():
                if fd.type == FD.TYPE_MESSAGE:
                    if _repeated(fd):
                        stack.extend(value)
                    else:
                        stack.append(value)
                elif fd.type == FD.TYPE_STRING:
                    values = list(value) if _repeated(fd) else [value]
                    if any(not isinstance(v, str) for v in values):
                        bad(msg)
        except UnicodeDecodeError:
            bad(msg)


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or (f"{node.op_type} -> {node.output[0]}" if node.output else node.op_type)


# ---------------------------------------------------------------------------------------
# tensors


def iter_tensors(model: onnx.ModelProto):
    """(TensorProto, description) for every tensor stored in the model, subgraphs and
    functions included, without recursion."""
    nodes: list[tuple[onnx.NodeProto, str]] = []
    for graph, _, label in iter_graph_scopes(model):
        for t in graph.initializer:
            yield t, f"initializer '{t.name}'"
        for s in graph.sparse_initializer:
            yield s.values, f"sparse initializer '{s.values.name}' (values)"
            yield s.indices, f"sparse initializer '{s.values.name}' (indices)"
        nodes.extend((n, label) for n in graph.node)
    for f in model.functions:
        nodes.extend((n, f"function '{f.name}'") for n in f.node)
    for node, _ in nodes:
        for attr in node.attribute:
            where = f"attribute '{attr.name}' of node '{_node_label(node)}'"
            if attr.type == _TENSOR:
                yield attr.t, where
            elif attr.type == _TENSORS:
                for i, t in enumerate(attr.tensors):
                    yield t, f"{where} [{i}]"
            elif attr.type == _SPARSE:
                yield attr.sparse_tensor.values, where
                yield attr.sparse_tensor.indices, where
            elif attr.type == _SPARSES:
                for s in attr.sparse_tensors:
                    yield s.values, where
                    yield s.indices, where


# sub-byte types: bits per element (raw_data is packed; int32_data holds one packed byte
# per entry for 2/4-bit types and one element per entry for 6-bit types)
_SUB_BYTE_BITS = {name: bits for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2),
                                                 ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
                  if hasattr(onnx.TensorProto, name)}
_TYPED_FIELD = {  # which repeated field holds the values of each type, and values per element
    "FLOAT": ("float_data", 1), "COMPLEX64": ("float_data", 2),
    "DOUBLE": ("double_data", 1), "COMPLEX128": ("double_data", 2),
    "INT64": ("int64_data", 1), "UINT32": ("uint64_data", 1), "UINT64": ("uint64_data", 1),
    "STRING": ("string_data", 1),
}


def tensor_dtype_name(data_type: int) -> str | None:
    try:
        name = onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return None
    return None if name == "UNDEFINED" else name


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of raw data the tensor's dims and type call for (Python ints: no overflow)."""
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    name = tensor_dtype_name(tensor.data_type)
    if name in _SUB_BYTE_BITS:
        return (numel * _SUB_BYTE_BITS[name] + 7) // 8
    return numel * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def check_tensor(tensor: onnx.TensorProto, where: str, source: str) -> None:
    """dtype known, dims sane, data size matching the dims: before anything is allocated."""
    name = tensor_dtype_name(tensor.data_type)
    if name is None:
        raise ModelError(f"{source}: {where} has an invalid data type {tensor.data_type}")
    try:
        onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:
        raise ModelError(f"{source}: {where} has data type {name}, which opc does not support") from None
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        raise ModelError(f"{source}: {where} has negative dims {dims}")
    numel = 1
    for d in dims:
        numel *= d
    if name != "STRING":
        nbytes = tensor_nbytes(tensor)
        if nbytes > MAX_TENSOR_BYTES:
            raise ModelError(f"{source}: {where} has absurd dims {dims} ({nbytes} bytes of {name})")
    elif numel > MAX_TENSOR_BYTES:
        raise ModelError(f"{source}: {where} has absurd dims {dims}")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        if name == "STRING":
            raise ModelError(f"{source}: {where}: STRING tensors cannot use external data")
        return  # sizes are checked against the data file in opc.external_data
    if tensor.HasField("raw_data"):
        if name == "STRING":
            raise ModelError(f"{source}: {where}: STRING tensors cannot use raw_data")
        expected = tensor_nbytes(tensor)
        if len(tensor.raw_data) != expected:
            raise ModelError(f"{source}: {where} has {len(tensor.raw_data)} bytes of data but dims {dims} "
                             f"of {name} need {expected}")
        return
    field, per = _TYPED_FIELD.get(name, ("int32_data", 1))
    stored = len(getattr(tensor, field))
    bits = _SUB_BYTE_BITS.get(name)
    if bits in (2, 4):
        expected = (numel * bits + 7) // 8
    else:
        expected = numel * per
    others = [f for f in ("float_data", "double_data", "int32_data", "int64_data", "uint64_data", "string_data")
              if f != field and len(getattr(tensor, f))]
    if others:
        raise ModelError(f"{source}: {where} of type {name} stores its values in {others[0]}")
    if stored != expected:
        raise ModelError(f"{source}: {where} holds {stored} values in {field} but dims {dims} of {name} "
                         f"need {expected}")


def non_finite_weights(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(tensor description, count) for float tensors holding NaN or Inf."""
    from onnx import numpy_helper

    found = []
    for tensor, where in iter_tensors(model):
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                    onnx.TensorProto.BFLOAT16):
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            if tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.BFLOAT16:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                values = np.frombuffer(tensor.raw_data, dtype=dtype)  # a view: no copy of big weights
            else:
                values = numpy_helper.to_array(tensor)
        except Exception:
            continue
        if values.dtype.kind != "f":
            values = values.astype(np.float32)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            found.append((where, bad))
    return found


# ---------------------------------------------------------------------------------------
# the model


def check_model(model: onnx.ModelProto, source: str = "<model>") -> None:
    """Validate opsets, IR version and graph structure; raise ModelError naming the fault."""
    if not model.HasField("graph"):
        raise ModelError(f"{source}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise ModelError(f"{source}: not a valid ONNX model (no opset_import)")
    check_versions(model, source)
    check_structure_limits(model, source)
    for tensor, where in iter_tensors(model):
        # files have theirs loaded (safely) by read_model_file; an in-memory model's would be
        # read later relative to the current directory, past every check in opc.external_data
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"{source}: {where} refers to external data that is not loaded; give opc the "
                             "model's file path instead")
    opset = default_opset(model)
    local_functions = {(f.domain, f.name) for f in model.functions}
    _check_graphs(model, source, opset, local_functions)
    try:
        onnx.checker.check_model(model)
    except ValueError as exc:  # models over 2 GB in memory cannot go through the proto checker
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise ModelError(f"{source}: {_first_line(exc)}") from None
    except Exception as exc:  # onnx.checker.ValidationError and schema errors
        raise ModelError(f"{source}: {_first_line(exc)}") from None
    bad = non_finite_weights(model)
    if bad:
        where, count = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        warnings.warn(OpcWarning(source, f"{where} holds {count} NaN/Inf values{more}"), stacklevel=2)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_versions(model: onnx.ModelProto, source: str) -> None:
    if not MIN_IR_VERSION <= model.ir_version <= onnx.IR_VERSION:
        raise ModelError(f"{source}: ir_version {model.ir_version} is outside the supported range "
                         f"{MIN_IR_VERSION} to {onnx.IR_VERSION}")
    seen: dict[str, int] = {}
    for o in model.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        if domain in seen and seen[domain] != o.version:
            raise ModelError(f"{source}: opset_import lists domain '{o.domain}' twice "
                             f"(versions {seen[domain]} and {o.version})")
        seen[domain] = o.version
    if "" not in seen:
        raise ModelError(f"{source}: no default-domain (ai.onnx) opset in opset_import")
    if not MIN_OPSET <= seen[""] <= max_opset():
        raise ModelError(f"{source}: opset {seen['']} is outside the supported range {MIN_OPSET} to {max_opset()}")
    ml = seen.get("ai.onnx.ml")
    if ml is not None:
        newest = _max_domain_version("ai.onnx.ml")
        if not 1 <= ml <= newest:
            raise ModelError(f"{source}: ai.onnx.ml opset {ml} is outside the supported range 1 to {newest}")


@functools.lru_cache(maxsize=None)
def _max_domain_version(domain: str) -> int:
    return max((s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.domain == domain), default=1)


def _subgraph_free_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read anywhere inside the node's subgraphs (their outer references
    are among these); iterative."""
    names: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for attr in n.attribute:
            subs = [attr.g] if attr.type == _GRAPH else list(attr.graphs) if attr.type == _GRAPHS else []
            for g in subs:
                for inner in g.node:
                    names.update(i for i in inner.input if i)
                    stack.append(inner)
                names.update(o.name for o in g.output)
    return names


def _check_graph_inputs(model: onnx.ModelProto, source: str) -> None:
    # the main graph's inputs are what users feed: a tensor input needs a real element type
    for value in model.graph.input:
        if value.type.WhichOneof("value") == "tensor_type":
            elem = value.type.tensor_type.elem_type
            name = tensor_dtype_name(elem)
            if name is None:
                raise ModelError(f"{source}: graph input '{value.name}' has no valid element type ({elem})")
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
            if any(d < 0 for d in dims):
                raise ModelError(f"{source}: graph input '{value.name}' has negative dims {dims}")
            numel = 1
            for d in dims:
                numel *= d
            nbytes = numel * (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
                              if name not in _SUB_BYTE_BITS and name != "STRING" else 1)
            if nbytes > MAX_TENSOR_BYTES:
                raise ModelError(f"{source}: graph input '{value.name}' has absurd dims {dims} ({nbytes} bytes)")


def _check_graphs(model: onnx.ModelProto, source: str, opset: int, local_functions: set) -> None:
    _check_graph_inputs(model, source)
    # (graph, names visible from enclosing graphs, label)
    stack = [(model.graph, frozenset(), "")]
    while stack:
        graph, outer, label = stack.pop()
        where = f"{source}{label}"
        defined = set(outer)
        own_inputs: set[str] = set()
        for value in graph.input:
            if value.name in own_inputs:
                raise ModelError(f"{where}: graph input '{value.name}' is listed twice")
            own_inputs.add(value.name)
        inits = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
        defined |= own_inputs | inits
        producer: dict[str, int] = {}
        for idx, node in enumerate(graph.node):
            _check_op(node, where, opset, local_functions)
            for out in node.output:
                if not out:
                    continue
                if out in producer:
                    first = graph.node[producer[out]]
                    raise ModelError(f"{where}: duplicate node output: tensor '{out}' is produced by node "
                                     f"'{_node_label(first)}' and node '{_node_label(node)}'")
                if out in own_inputs or out in inits:
                    raise ModelError(f"{where}: node '{_node_label(node)}' writes tensor '{out}', which is "
                                     f"already a graph input or initializer")
                producer[out] = idx
        visible = defined | set(producer)
        for node in graph.node:
            for name in node.input:
                if name and name not in visible:
                    raise ModelError(f"{where}: node '{_node_label(node)}' ({node.op_type}) reads tensor '{name}', "
                                     f"which no node, graph input or initializer defines")
        listed: set[str] = set()
        for value in graph.output:
            if value.name in listed:
                raise ModelError(f"{where}: graph output '{value.name}' is listed twice")
            listed.add(value.name)
            if not value.name or value.name not in visible:
                raise ModelError(f"{where}: graph output '{value.name}' is dangling: no node, graph input or "
                                 f"initializer produces it")
        _order_nodes(graph, producer, where)
        for node in graph.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == _GRAPH else list(attr.graphs) if attr.type == _GRAPHS else []
                for sub in subs:
                    stack.append((sub, frozenset(visible),
                                  f"{label}: subgraph '{attr.name}' of node '{_node_label(node)}'"))


def _check_op(node: onnx.NodeProto, where: str, opset: int, local_functions: set) -> None:
    if node.domain not in ("", "ai.onnx"):
        return
    if ("", node.op_type) in local_functions or (node.domain, node.op_type) in local_functions:
        return
    problem = _op_problem(node.op_type, opset)
    if problem:
        raise ModelError(f"{where}: node '{_node_label(node)}' uses {problem}")


@functools.lru_cache(maxsize=4096)
def _op_problem(op_type: str, opset: int) -> str | None:
    if not onnx.defs.has(op_type, ""):
        return f"unknown op '{op_type}' of the default ONNX domain"
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except Exception:
        since = onnx.defs.get_schema(op_type, "").since_version
        return f"op '{op_type}', which does not exist in opset {opset} (it appeared in opset {since})"
    return None


def _order_nodes(graph: onnx.GraphProto, producer: dict[str, int], where: str) -> None:
    """Refuse cycles; put acyclic but unsorted nodes into a topological order (stable)."""
    nodes = list(graph.node)
    deps: list[set[int]] = []
    for idx, node in enumerate(nodes):
        names = {i for i in node.input if i}
        if any(a.type in (_GRAPH, _GRAPHS) for a in node.attribute):
            names |= _subgraph_free_names(node)
        deps.append({producer[n] for n in names if n in producer and producer[n] != idx})
        if any(producer.get(n) == idx for n in node.input if n):
            raise ModelError(f"{where}: cycle: node '{_node_label(node)}' reads its own output")
    if all(d < i for i, ds in enumerate(deps) for d in ds):
        return
    users: list[list[int]] = [[] for _ in nodes]
    pending = [len(ds) for ds in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    ready = [i for i, p in enumerate(pending) if p == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        left = {i for i, p in enumerate(pending) if p > 0}
        # walk back along dependencies inside the leftover set until a node repeats
        path, seen = [], {}
        i = min(left)
        while i not in seen:
            seen[i] = len(path)
            path.append(i)
            i = min(d for d in deps[i] if d in left)
        cycle = path[seen[i]:][::-1]
        names = " -> ".join(f"'{_node_label(nodes[j])}'" for j in cycle + [cycle[0]])
        raise ModelError(f"{where}: the graph has a cycle through nodes {names}")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def check_custom_domains(model: onnx.ModelProto, source: str = "<model>") -> None:
    """Refuse ops of domains opc does not know, unless --allow-custom-ops."""
    known = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
    local = {(f.domain, f.name) for f in model.functions}
    for graph, _, _ in iter_graph_scopes(model):
        for node in graph.node:
            if node.domain not in known and (node.domain, node.op_type) not in local:
                raise ModelError(
                    f"{source}: node '{_node_label(node)}' uses op {node.op_type} of the custom domain "
                    f"'{node.domain}' (pass --allow-custom-ops to keep such nodes untouched)"
                )
