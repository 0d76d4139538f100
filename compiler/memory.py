"""Memory planning: where every intermediate tensor lives inside one arena.

The plan is made for concrete shapes (``input_shapes``; a symbolic dimension that is not
given is planned as 1 and the plan says so in ``notes``) over one execution order.

What lives in the arena (``MemoryPlan.tensors``)
    Every node output of the main graph except: graph outputs, tensors computed from
    initializers/Constant nodes alone (``MemoryPlan.constants``: weights such as the
    ConstantOfShape outputs of onnx's "light" models; the runtime computes them once, outside
    the arena, as ONNX Runtime's constant folding does), string tensors and non-tensor values
    (sequences, maps, optionals); tensors of size 0 get size 0. Graph inputs, initializers
    and graph outputs are not in the arena (the runtime holds them itself). Nodes
    inside subgraphs (If/Loop/Scan bodies) are not planned; tensors of the outer graph that a
    subgraph reads are kept alive until the node that owns the subgraph has run.

Steps
    ``order`` lists node indices (positions in ``model.graph.node``) in execution order; a
    slot's ``first_use`` and ``last_use`` are positions in ``order`` (steps), inclusive: the
    step that writes the tensor and the last step that reads it. A tensor nobody reads lives
    for its own step. Two slots may share bytes only if their step ranges are disjoint,
    except aliases (below).

Aliases (``Slot.alias_of`` names the tensor that owns the bytes, ``Slot.kind`` says why)
    ``kind == "view"``: the outputs of Reshape, Flatten, Squeeze, Unsqueeze and Identity
    whose data input is an arena tensor share its bytes (same offset, same size). The runtime
    must not copy: the output *is* the input reinterpreted with another shape. A view of a
    graph input or a constant is an ordinary arena tensor (the runtime copies into it); a
    view that is a graph output is outside the arena (the runtime copies out).
    ``kind == "inplace"``: the output of an element-wise op (``INPLACE_OPS``) is written over
    one of its inputs when that input (and every view of it) is last read at this node and
    has the same size and dtype as the output. The runtime computes that op with ``out``
    placed exactly over that input, which is safe for element-wise maths (each output element
    depends only on the same input element and on broadcast operands).
    ``alias_of`` is always the owner of the bytes (the root), never another alias.

Workspaces
    ``workspace_fn(node, input_shapes, input_dtypes) -> bytes`` (by default
    ``opc.runtime.workspace_bytes`` when that is importable, else 0) gives per-node scratch
    memory (e.g. an im2col buffer); it lives for that node's step only
    (``MemoryPlan.workspaces[node_index]``).

Offsets
    Every size is rounded up to ``alignment`` (256 bytes) and every offset is a multiple of
    it. Several strategies place the buffers (greedy by size, in-order best fit, greedy by
    breadth, and a seeded improvement search bounded in time) and the smallest arena wins.
    ``lower_bound`` is the largest total of aligned live bytes at any step (after aliasing,
    in-place and workspaces); no placement can beat it. ``naive_total`` is the arena without
    any reuse: every tensor and workspace in its own memory.

Storage
    ``MemoryPlan.to_json()`` is compact JSON, stored in the model's metadata_props under
    ``opc.memory_plan``; it carries a fingerprint of the graph structure (ops, attributes,
    tensor names, input/initializer types and dims, node order) so that a plan whose graph
    has been edited afterwards is detected (``matches``, ``load_plan``) and never trusted.
    ``load_plan(model, input_shapes)`` also refuses a plan made for other input shapes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from opc.errors import ModelError, OpcError, UsageError

log = logging.getLogger("opc")

META_KEY = "opc.memory_plan"
PLAN_VERSION = 1
ALIGNMENT = 256

VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
# element-wise ops that may write their output over an input that dies at them
INPLACE_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Exp", "Log", "Neg", "Abs", "Sqrt",
    "Reciprocal", "Erf", "Ceil", "Floor", "Round", "Sign", "Sin", "Cos", "Tan", "Not", "Clip",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor",
    "BatchNormalization", "Dropout", "ThresholdedRelu", "Shrink",
})
# never treated as constants even when their inputs are
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                                  "RandomUniformLike", "Multinomial", "Bernoulli"})

STRATEGIES = ("size", "inorder", "breadth", "search")


class PlanError(OpcError):
    """A plan that is inconsistent (overlapping live tensors) or cannot be made."""


def align(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-int(n) // alignment) * alignment


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------
@dataclass
class Slot:
    """Where one tensor (or one node's workspace) lives: bytes [offset, offset + size)."""

    offset: int
    size: int
    shape: tuple = ()
    dtype: str = "float32"
    alias_of: str | None = None
    first_use: int = 0
    last_use: int = 0
    kind: str = "tensor"  # "tensor", "view", "inplace" or "workspace"

    def to_list(self) -> list:
        return [self.offset, self.size, list(self.shape), self.dtype, self.alias_of,
                self.first_use, self.last_use, self.kind]

    @classmethod
    def from_list(cls, v: list) -> "Slot":
        return cls(int(v[0]), int(v[1]), tuple(int(d) for d in v[2]), str(v[3]), v[4],
                   int(v[5]), int(v[6]), str(v[7]))


@dataclass
class MemoryPlan:
    """One arena for every intermediate tensor of a graph, for ``input_shapes``.

    ``arena_size`` bytes (a multiple of ``alignment``); ``order``: node indices in execution
    order; ``tensors``: name -> ``Slot`` (bytes [offset, offset + size), shape, dtype, the
    steps it is alive, and for aliases ``alias_of`` = the tensor owning the bytes with
    ``kind`` "view" (Reshape/Flatten/Squeeze/Unsqueeze/Identity: no copy) or "inplace"
    (element-wise op written over an input that dies there)); ``workspaces``: node index ->
    one-step scratch ``Slot``; ``constants``: node outputs computed from weights alone (outside
    the arena); ``lower_bound``: max aligned live bytes over the steps; ``naive_total``: no
    reuse at all. Tensors not listed (graph inputs/outputs, constants, strings, sequences)
    live outside the arena.
    """

    arena_size: int
    alignment: int
    input_shapes: dict[str, tuple]
    order: list[int]
    tensors: dict[str, Slot]
    workspaces: dict[int, Slot]
    lower_bound: int
    naive_total: int
    fingerprint: str = ""
    strategy: str = ""
    constants: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # live aligned bytes at each step (for charts); not stored in the model
    live_bytes: list[int] = field(default_factory=list, repr=False)
    plan_time_s: float = 0.0
    strategy_sizes: dict[str, int] = field(default_factory=dict)

    # --- checks -------------------------------------------------------------------------
    def slots(self) -> list[tuple[str, Slot]]:
        out = list(self.tensors.items())
        out.extend((f"<workspace of node {i}>", s) for i, s in self.workspaces.items())
        return out

    def check(self) -> None:
        """Raise PlanError if the plan is inconsistent; see ``check_slots``."""
        check_slots(self.slots(), self.arena_size, self.alignment)

    def matches(self, model: onnx.ModelProto) -> bool:
        return bool(self.fingerprint) and self.fingerprint == graph_fingerprint(model)

    def steps(self) -> int:
        return len(self.order)

    def live_at(self) -> list[int]:
        """Bytes in use at each step (aligned; each alias group counted once)."""
        diff = [0] * (len(self.order) + 1)
        groups = self.alias_groups()
        for name, s in self.slots():
            if s.alias_of is not None or s.size == 0:
                continue
            end = max([s.last_use] + [self.tensors[m].last_use for m in groups.get(name, [])])
            diff[s.first_use] += align(s.size, self.alignment)
            diff[end + 1] -= align(s.size, self.alignment)
        out, acc = [], 0
        for d in diff[:-1]:
            acc += d
            out.append(acc)
        return out

    def alias_groups(self) -> dict[str, list[str]]:
        """root tensor -> the tensors that alias it (views and in-place outputs)."""
        groups: dict[str, list[str]] = {}
        for name, s in self.tensors.items():
            if s.alias_of is not None:
                groups.setdefault(s.alias_of, []).append(name)
        return groups

    # --- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "fingerprint": self.fingerprint,
            "arena_size": self.arena_size,
            "alignment": self.alignment,
            "lower_bound": self.lower_bound,
            "naive_total": self.naive_total,
            "strategy": self.strategy,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "order": list(self.order),
            # [offset, size, shape, dtype, alias_of, first_use, last_use, kind]
            "tensors": {k: s.to_list() for k, s in self.tensors.items()},
            "workspaces": {str(k): s.to_list() for k, s in self.workspaces.items()},
            "constants": list(self.constants),
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "MemoryPlan":
        try:
            d = json.loads(text)
            if d.get("version") != PLAN_VERSION:
                raise PlanError(f"memory plan version {d.get('version')!r} is not {PLAN_VERSION}")
            return cls(
                arena_size=int(d["arena_size"]),
                alignment=int(d["alignment"]),
                input_shapes={k: tuple(int(x) for x in v) for k, v in d["input_shapes"].items()},
                order=[int(i) for i in d["order"]],
                tensors={k: Slot.from_list(v) for k, v in d["tensors"].items()},
                workspaces={int(k): Slot.from_list(v) for k, v in d["workspaces"].items()},
                lower_bound=int(d["lower_bound"]),
                naive_total=int(d["naive_total"]),
                fingerprint=str(d.get("fingerprint", "")),
                strategy=str(d.get("strategy", "")),
                constants=list(d.get("constants", [])),
                notes=list(d.get("notes", [])),
            )
        except PlanError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise PlanError(f"unreadable memory plan ({type(exc).__name__}: {exc})") from None


def check_slots(slots: Iterable[tuple[str, Slot]], arena_size: int | None = None,
                alignment: int = ALIGNMENT) -> None:
    """Raise PlanError when two slots alive at a common step share a byte.

    An alias may share its root's bytes; an in-place alias written at step s is legal only
    if every other member of its group that was written before s is last read at s or
    earlier (otherwise it would overwrite a value still needed). Also checked: offsets are
    multiples of ``alignment``, everything fits in ``arena_size``, aliases fit their root.
    Sweep over steps: O(n log n + overlaps).
    """
    slots = list(slots)
    by_name = {name: s for name, s in slots}
    groups: dict[str, list[tuple[str, Slot]]] = {}
    for name, s in slots:
        if s.offset < 0 or s.size < 0:
            raise PlanError(f"tensor '{name}': negative offset or size")
        if s.first_use > s.last_use:
            raise PlanError(f"tensor '{name}': first use {s.first_use} after last use {s.last_use}")
        if alignment and s.offset % alignment:
            raise PlanError(f"tensor '{name}': offset {s.offset} is not a multiple of {alignment}")
        if arena_size is not None and s.offset + s.size > arena_size:
            raise PlanError(f"tensor '{name}': bytes [{s.offset}, {s.offset + s.size}) exceed the arena ({arena_size})")
        if s.alias_of is not None:
            root = by_name.get(s.alias_of)
            if root is None:
                raise PlanError(f"tensor '{name}': alias of unknown tensor '{s.alias_of}'")
            if root.alias_of is not None:
                raise PlanError(f"tensor '{name}': alias of '{s.alias_of}', which is itself an alias")
            if s.offset != root.offset or s.size > root.size:
                raise PlanError(f"tensor '{name}': alias does not sit on the bytes of '{s.alias_of}'")
            if s.first_use < root.first_use:
                raise PlanError(f"tensor '{name}': alias written before its root '{s.alias_of}'")
        groups.setdefault(s.alias_of or name, []).append((name, s))
    # within a group: an in-place write must not clobber a value still to be read
    for root, members in groups.items():
        for name, s in members:
            if s.kind != "inplace":
                continue
            for other, o in members:
                if other != name and o.first_use < s.first_use and o.last_use > s.first_use:
                    raise PlanError(f"tensor '{name}' is written in place over '{other}', "
                                    f"which is still read at step {o.last_use}")
    # across groups: sweep the group intervals (group life = union of its members' lives)
    spans = []
    for root, members in groups.items():
        first = min(s.first_use for _, s in members)
        last = max(s.last_use for _, s in members)
        lo = min(s.offset for _, s in members)
        hi = max(s.offset + s.size for _, s in members)
        if hi > lo:
            spans.append((first, last, lo, hi, root))
    spans.sort()
    active: list[tuple[int, int, int, str]] = []  # (last, lo, hi, name)
    for first, last, lo, hi, name in spans:
        active = [a for a in active if a[0] >= first]
        for a_last, a_lo, a_hi, a_name in active:
            if lo < a_hi and a_lo < hi:
                raise PlanError(f"tensors '{a_name}' and '{name}' are alive at step {first} "
                                f"and overlap in bytes [{max(lo, a_lo)}, {min(hi, a_hi)})")
        active.append((last, lo, hi, name))


# ---------------------------------------------------------------------------------------
# Graph fingerprint
# ---------------------------------------------------------------------------------------
def graph_fingerprint(model: onnx.ModelProto) -> str:
    """A hash of what the plan depends on: node order, ops, attributes, tensor names, and
    the types and dims of graph inputs and initializers (not weight values, names of nodes,
    doc strings or metadata)."""
    h = hashlib.sha256()
    g = model.graph

    def put(*parts):
        for p in parts:
            h.update(str(p).encode())
            h.update(b"\x00")

    def value_type(v):
        t = v.type.tensor_type
        return (t.elem_type, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim))

    for v in g.input:
        put("in", v.name, value_type(v))
    for v in g.output:
        put("out", v.name)
    for t in g.initializer:
        put("init", t.name, t.data_type, tuple(t.dims))
    for n in g.node:
        put("node", n.domain, n.op_type, tuple(n.input), tuple(n.output))
        for a in sorted(n.attribute, key=lambda a: a.name):
            if a.doc_string:
                a = copy.copy(a)
                a.ClearField("doc_string")
            h.update(a.SerializeToString(deterministic=True))
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _dtype_info(elem_type: int) -> tuple[str, float] | None:
    """(numpy-style name, bytes per element) or None for types that cannot be planned."""
    if elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (onnx.TensorProto.DataType.Name(elem_type).lower(), 0.5)
    try:
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        return (dt.name, dt.itemsize)
    except Exception:
        return None


# initializers up to this many elements keep their values for shape inference (shapes,
# axes, ...); bigger ones (weights) are replaced by typed inputs so nothing large is copied
_SMALL_INIT = 4096


def _copy_without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    src = model.graph
    g = onnx.GraphProto()
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    listed = {v.name for v in src.input}
    for t in src.initializer:
        numel = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if numel <= _SMALL_INIT:
            g.initializer.append(t)
        elif t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    out = onnx.ModelProto()
    out.ir_version = max(model.ir_version, 4)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.CopyFrom(g)
    return out


def _fix_inputs(model: onnx.ModelProto, input_shapes: dict | None,
                with_weights: bool = True) -> tuple[onnx.ModelProto, dict, list[str]]:
    """A copy of the model whose graph inputs have concrete dims; the dims used; notes.
    Without weights, large initializers become typed graph inputs (enough for shapes)."""
    inits = {t.name for t in model.graph.initializer}
    model = copy.deepcopy(model) if with_weights else _copy_without_weights(model)
    given = dict(input_shapes or {})
    used: dict[str, tuple] = {}
    notes: list[str] = []
    defaulted: list[str] = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim
        if v.name in given:
            shape = tuple(int(x) for x in given.pop(v.name))
            if v.type.tensor_type.HasField("shape") and len(dims) != len(shape):
                raise ModelError(f"input '{v.name}': shape {list(shape)} has {len(shape)} dims, "
                                 f"the model says {len(dims)}")
        else:
            shape = []
            for d in dims:
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                else:
                    shape.append(1)
                    defaulted.append(f"{v.name}[{d.dim_param or '?'}]")
            shape = tuple(shape)
        used[v.name] = shape
        v.type.tensor_type.ClearField("shape")
        for x in shape:
            v.type.tensor_type.shape.dim.add().dim_value = x
    if given:
        raise ModelError(f"input shapes given for unknown inputs: {', '.join(sorted(given))}")
    if defaulted:
        notes.append("symbolic dimensions planned as 1: " + ", ".join(defaulted))
    return model, used, notes


def _infer(model: onnx.ModelProto, notes: list[str]) -> tuple[dict, dict]:
    """(name -> (shape, elem_type) for concrete shapes, name -> elem_type) by onnx inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference errors are not fatal: ORT may still know
        notes.append(f"onnx shape inference failed ({type(exc).__name__})")
        inferred = model
    info: dict[str, tuple[tuple, int]] = {}
    g = inferred.graph
    for t in g.initializer:
        info[t.name] = (tuple(t.dims), t.data_type)
    for v in list(g.input) + list(g.value_info) + list(g.output):
        tt = v.type.tensor_type
        if v.type.WhichOneof("value") not in (None, "tensor_type"):
            info[v.name] = ((), onnx.TensorProto.UNDEFINED)  # sequence, map, optional: not planned
            continue
        if not v.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        if all(d.HasField("dim_value") for d in tt.shape.dim):
            info[v.name] = (tuple(d.dim_value for d in tt.shape.dim), tt.elem_type)
    elem_types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output)}
    return info, elem_types


def _fold_small_constants(model: onnx.ModelProto, info: dict) -> bool:
    """Evaluate, with onnx's reference implementation, the nodes whose inputs are small known
    values (small initializers, Constant nodes, Shape of a tensor of known shape), and make
    their small results initializers of ``model`` (a weight-free copy), so that shape
    inference sees computed pads, slice ends and reshape targets. True if anything folded."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    folded: dict[str, np.ndarray] = {}
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or _has_subgraph(n) or n.op_type in NONDETERMINISTIC_OPS:
            continue
        outs = [o for o in n.output if o]
        if not outs or any(o in values for o in outs):
            continue
        try:
            if n.op_type == "Shape" and n.input[0] in info:
                shape = np.array(info[n.input[0]][0], dtype=np.int64)
                attrs = {a.name: a.i for a in n.attribute}
                start, end = attrs.get("start", 0), attrs.get("end", len(shape))
                results = [shape[start:end] if "end" in attrs else shape[start:]]
            elif all((not i) or i in values for i in n.input):
                if any(values[i].size > _SMALL_INIT for i in n.input if i):
                    continue
                ev = ReferenceEvaluator(n, opsets={"": opset} if opset else None)
                results = ev.run(None, {i: values[i] for i in n.input if i})
            else:
                continue
        except Exception:  # an op the reference cannot run: leave it to inference
            continue
        for o, r in zip(n.output, results):
            r = np.asarray(r)
            if o and r.size <= _SMALL_INIT and r.dtype != object:
                values[o] = r
                folded[o] = r
    if not folded:
        return False
    keep = [n for n in g.node if not all((not o) or o in folded for o in n.output)]
    del g.node[:]
    g.node.extend(keep)
    # outputs of kept nodes that were folded stay computed by their node; only drop duplicates
    produced = {o for n in keep for o in n.output}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items() if k not in produced)
    return True


def infer_concrete_shapes(model: onnx.ModelProto, input_shapes: dict | None = None
                          ) -> tuple[dict[str, tuple[tuple, int]], dict, list[str]]:
    """name -> (shape, elem_type) for every tensor of the main graph; the input shapes used; notes.

    onnx shape inference with data propagation on a weight-free copy whose inputs have
    concrete dims; where that leaves node outputs unknown, small constant subgraphs (shape
    arithmetic) are evaluated and inference runs again; if shapes are still unknown,
    ONNX Runtime runs the model on seeded inputs with those tensors as extra outputs and
    their real shapes are taken.
    """
    fixed, used, notes = _fix_inputs(model, input_shapes, with_weights=False)
    info, elem_types = _infer(fixed, notes)
    _dropout_masks(model, info)
    outputs = [o for n in model.graph.node for o in n.output if o]
    for _ in range(3):
        if all(o in info for o in outputs) or not _fold_small_constants(fixed, info):
            break
        more, elem_types = _infer(fixed, [])
        info.update(more)
        _dropout_masks(model, info)
    missing = [o for o in outputs if o not in info]
    if missing:
        notes.append(f"{len(missing)} shapes taken from an ONNX Runtime run")
        full, _, _ = _fix_inputs(model, input_shapes)
        info.update(_shapes_from_ort(full, missing, used, elem_types))
    return info, used, notes


def _dropout_masks(model: onnx.ModelProto, info: dict) -> None:
    # onnx leaves the shape of Dropout's mask unknown in old opsets; it is the data's shape
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    for n in model.graph.node:
        if n.op_type == "Dropout" and len(n.output) > 1 and n.output[1] and n.output[1] not in info \
                and n.input[0] in info:
            shape, elem = info[n.input[0]]
            info[n.output[1]] = (shape, onnx.TensorProto.BOOL if opset >= 10 else elem)


def _shapes_from_ort(model: onnx.ModelProto, names: list[str], input_shapes: dict, elem_types: dict):
    from opc.ort import make_session, run_model, seeded_feeds

    m = copy.deepcopy(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            vi = m.graph.output.add()
            vi.name = name
            if elem_types.get(name):
                vi.type.tensor_type.elem_type = elem_types[name]
    try:
        sess = make_session(m, threads=1, optimize=False)
        out = run_model(m, seeded_feeds(m, input_shapes), session=sess)
    except Exception as exc:
        raise ModelError(f"cannot find the shapes of {len(names)} tensors (e.g. '{names[0]}'): "
                         f"shape inference left them unknown and ONNX Runtime failed: {exc}") from None
    info = {}
    for name in names:
        if name in out and not isinstance(out[name], np.ndarray):
            info[name] = ((), onnx.TensorProto.UNDEFINED)  # a sequence or map: not planned
        elif name in out:
            arr = np.asarray(out[name])
            info[name] = (tuple(arr.shape), onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
                          if arr.dtype != object else onnx.TensorProto.STRING)
    return info


# ---------------------------------------------------------------------------------------
# Lifetimes and buffers
# ---------------------------------------------------------------------------------------
def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer names that a node's subgraphs read (implicit inputs)."""
    reads: set[str] = set()

    def visit(g: onnx.GraphProto, defined: set[str]):
        defined = set(defined) | {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            for i in n.input:
                if i and i not in defined:
                    reads.add(i)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g, defined)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        visit(sg, defined)
            defined |= set(n.output)
        for o in g.output:
            if o.name not in defined:
                reads.add(o.name)

    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            visit(a.g, set())
        elif a.type == onnx.AttributeProto.GRAPHS:
            for sg in a.graphs:
                visit(sg, set())
    return reads


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


@dataclass(frozen=True)
class _Node:
    """The fields of a NodeProto that planning reads, extracted once (protobuf access is slow)."""

    op_type: str
    domain: str
    name: str
    input: tuple
    output: tuple
    sub: bool  # has subgraphs
    sub_reads: tuple  # outer names its subgraphs read
    proto: Any


def node_table(model: onnx.ModelProto) -> list[_Node]:
    out = []
    for n in model.graph.node:
        sub = _has_subgraph(n)
        out.append(_Node(n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output), sub,
                         tuple(sorted(_subgraph_reads(n))) if sub else (), n))
    return out


@dataclass
class _Buffer:
    root: str | None  # tensor name, or None for a workspace
    node: int  # producing node index (workspace: its node)
    start: int
    end: int
    size: int  # aligned
    members: list[str] = field(default_factory=list)


@dataclass
class Liveness:
    """Everything the offset assignment needs, and what the plan reports per tensor."""

    order: list[int]
    tensors: dict[str, Slot]  # offsets still 0
    workspaces: dict[int, Slot]
    buffers: list[_Buffer]
    constants: list[str]
    live: list[int]
    alignment: int

    @property
    def lower_bound(self) -> int:
        return max(self.live, default=0)

    @property
    def naive_total(self) -> int:
        return sum(align(s.size, self.alignment) for s in self.tensors.values()) + \
            sum(align(s.size, self.alignment) for s in self.workspaces.values())


def _default_workspace_fn():
    """opc.runtime.workspace_bytes when the runtime provides it; a node it fails on gets
    no workspace (the runtime then allocates that scratch memory itself)."""
    try:
        from opc.runtime import workspace_bytes  # type: ignore[attr-defined]
    except Exception:
        return None

    def guarded(node, input_shapes, input_dtypes):
        try:
            return int(workspace_bytes(node, input_shapes, input_dtypes) or 0)
        except Exception as exc:  # noqa: BLE001 - the runtime's estimate must not stop planning
            log.debug("workspace_bytes failed on %s '%s': %s", node.op_type, node.name, exc)
            return 0

    return guarded


def no_workspace(node, input_shapes, input_dtypes) -> int:
    """A workspace function for plans without per-node scratch memory."""
    return 0


def topological_order(model: onnx.ModelProto, nodes: list[_Node] | None = None) -> list[int]:
    """The node order of the file, checked to be topological."""
    g = model.graph
    nodes = nodes if nodes is not None else node_table(model)
    known = {v.name for v in g.input} | {t.name for t in g.initializer} | {""}
    for i, n in enumerate(nodes):
        for x in n.input + n.sub_reads:
            if x not in known:
                raise ModelError(f"node {i} ({n.op_type} '{n.name}') reads '{x}' before it is written; "
                                 "the graph is not topologically sorted")
        known.update(n.output)
    return list(range(len(nodes)))


def liveness(model: onnx.ModelProto, shapes: dict[str, tuple[tuple, int]], order: list[int] | None = None,
             workspace_fn: Callable | None = None, alignment: int = ALIGNMENT,
             nodes: list[_Node] | None = None) -> Liveness:
    """Lifetimes, alias groups (views and in-place) and workspaces over ``order``."""
    g = model.graph
    nodes = nodes if nodes is not None else node_table(model)
    if order is None:
        order = topological_order(model, nodes)
    inits = {t.name for t in g.initializer}
    graph_inputs = {v.name for v in g.input}
    graph_outputs = {v.name for v in g.output}
    step_of = {n: s for s, n in enumerate(order)}

    # constants: computed from initializers / Constant nodes alone
    constants: set[str] = set(inits)
    for idx in order:
        n = nodes[idx]
        if n.op_type in NONDETERMINISTIC_OPS or n.sub or n.domain not in ("", "ai.onnx"):
            continue
        if all((not i) or i in constants for i in n.input):
            constants.update(o for o in n.output if o)

    tensors: dict[str, Slot] = {}
    for idx in order:
        n = nodes[idx]
        for o in n.output:
            if not o or o in graph_outputs or o in constants or o in graph_inputs:
                continue
            if o not in shapes:
                raise ModelError(f"tensor '{o}' (output of {n.op_type} node {idx} '{n.name}'): unknown shape")
            shape, elem = shapes[o]
            dt = _dtype_info(elem)
            if dt is None:
                continue  # strings: not in the arena
            size = int(math.ceil(int(np.prod(shape, dtype=np.int64)) * dt[1])) if shape else int(math.ceil(dt[1]))
            s = step_of[idx]
            tensors[o] = Slot(0, size, tuple(int(d) for d in shape), dt[0], None, s, s, "tensor")

    for idx in order:
        n = nodes[idx]
        reads = [i for i in n.input if i] + list(n.sub_reads)
        s = step_of[idx]
        for i in reads:
            if i in tensors:
                if tensors[i].first_use > s:
                    raise ModelError(f"node {idx} ({n.op_type}) reads '{i}' before it is written")
                tensors[i].last_use = max(tensors[i].last_use, s)

    # alias groups, in step order
    owner: dict[str, str] = {}  # tensor -> root tensor
    members: dict[str, list[str]] = {}
    for idx in order:
        n = nodes[idx]
        s = step_of[idx]
        outs = [o for o in n.output if o in tensors]
        for o in outs:
            owner[o] = o
            members[o] = [o]
        if len(outs) != 1 or n.output[0] != outs[0] or n.domain not in ("", "ai.onnx"):
            continue
        o = outs[0]
        out_slot = tensors[o]
        if n.op_type in VIEW_OPS and n.input and n.input[0] in tensors:
            src = n.input[0]
            if tensors[src].size == out_slot.size:
                root = owner[src]
                owner[o] = root
                members[root].append(o)
                del members[o]
                out_slot.alias_of, out_slot.kind = root, "view"
            continue
        if n.op_type in INPLACE_OPS:
            for i in n.input:
                if i not in tensors or tensors[i].size != out_slot.size or tensors[i].dtype != out_slot.dtype:
                    continue
                root = owner[i]
                if all(tensors[m].last_use <= s for m in members[root]):
                    owner[o] = root
                    members[root].append(o)
                    del members[o]
                    out_slot.alias_of, out_slot.kind = root, "inplace"
                    break

    buffers: list[_Buffer] = []
    for root, ms in members.items():
        r = tensors[root]
        buffers.append(_Buffer(root, order[r.first_use], r.first_use, max(tensors[m].last_use for m in ms),
                               align(r.size, alignment), list(ms)))

    workspaces: dict[int, Slot] = {}
    if workspace_fn is None:
        workspace_fn = _default_workspace_fn() or no_workspace
    for idx in order if workspace_fn is not no_workspace else ():
        n = nodes[idx]
        in_shapes = [tuple(shapes[i][0]) if i in shapes else None for i in n.input]
        in_types = []
        for i in n.input:
            dt = _dtype_info(shapes[i][1]) if i in shapes else None
            in_types.append(dt[0] if dt else None)
        ws = int(workspace_fn(n.proto, in_shapes, in_types) or 0)
        if ws > 0:
            s = step_of[idx]
            workspaces[idx] = Slot(0, ws, (ws,), "uint8", None, s, s, "workspace")
            buffers.append(_Buffer(None, idx, s, s, align(ws, alignment), []))

    diff = [0] * (len(order) + 1)
    for b in buffers:
        diff[b.start] += b.size
        diff[b.end + 1] -= b.size
    live, acc = [], 0
    for d in diff[:-1]:
        acc += d
        live.append(acc)
    const_outputs = [o for idx in order for o in nodes[idx].output if o in constants]
    return Liveness(list(order), tensors, workspaces, buffers, const_outputs, live, alignment)


def memory_aware_order(model: onnx.ModelProto, lv: Liveness, nodes: list[_Node] | None = None) -> list[int]:
    """A topological order that greedily runs, among the ready nodes, the one whose step
    adds the fewest live bytes (new outputs + workspace - inputs it frees); constant nodes
    run as soon as they are ready. Ties keep the file's order. Used only if it lowers the
    peak (``plan_model(reorder=True)``)."""
    import heapq

    nodes = nodes if nodes is not None else node_table(model)
    n_nodes = len(nodes)
    sizes = {name: align(s.size, lv.alignment) for name, s in lv.tensors.items()}
    dtypes = {name: s.dtype for name, s in lv.tensors.items()}
    ws = {i: align(s.size, lv.alignment) for i, s in lv.workspaces.items()}
    consts = set(lv.constants)
    reads = []
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        reads.append([x for x in n.input if x] + list(n.sub_reads))
        for o in n.output:
            if o:
                producer[o] = i
    deps = [set() for _ in range(n_nodes)]
    users: list[list[int]] = [[] for _ in range(n_nodes)]
    for i, r in enumerate(reads):
        for x in r:
            p = producer.get(x)
            if p is not None and p != i and p not in deps[i]:
                deps[i].add(p)
                users[p].append(i)
    waiting = [len(d) for d in deps]
    # group (alias root) bookkeeping: remaining reads of each group
    root: dict[str, str] = {}
    refs: dict[str, int] = {}
    for i, r in enumerate(reads):
        for x in set(r):
            if x in sizes:
                refs[x] = refs.get(x, 0) + 1
    group_refs: dict[str, int] = {}

    def is_const_node(i):
        return all((not o) or o in consts for o in nodes[i].output) and any(o for o in nodes[i].output)

    def score(i):
        n = nodes[i]
        uses: dict[str, int] = {}
        for x in set(reads[i]):
            if x in root:
                uses[root[x]] = uses.get(root[x], 0) + 1
        dying = {r for r, k in uses.items() if group_refs[r] == k}
        alloc = ws.get(i, 0)
        freed = sum(sizes[r] for r in dying)
        for o in n.output:
            if o not in sizes:
                continue
            if n.op_type in VIEW_OPS and n.input and n.input[0] in root:
                continue
            reuse = None
            if n.op_type in INPLACE_OPS:
                reuse = next((root[x] for x in n.input if x in root and root[x] in dying
                              and sizes[x] == sizes[o] and dtypes[x] == dtypes[o]), None)
            if reuse is not None:
                freed -= sizes[reuse]
                dying.discard(reuse)
            else:
                alloc += sizes[o]
        return alloc - freed

    def run(i):
        n = nodes[i]
        for x in set(reads[i]):
            if x in root:
                group_refs[root[x]] -= 1
        for o in n.output:
            if o not in sizes:
                continue
            if n.op_type in VIEW_OPS and n.input and n.input[0] in root:
                r = root[n.input[0]]
                root[o] = r
                group_refs[r] += refs.get(o, 0)
            else:
                root[o] = o
                group_refs[o] = refs.get(o, 0)

    order: list[int] = []
    const_ready: list[int] = []
    ready: set[int] = set()
    for i in range(n_nodes):
        if waiting[i] == 0:
            (const_ready.append if is_const_node(i) else ready.add)(i)
    heapq.heapify(const_ready)
    while const_ready or ready:
        if const_ready:
            i = heapq.heappop(const_ready)
        else:
            i = min(ready, key=lambda j: (score(j), j))
            ready.discard(i)
        run(i)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                if is_const_node(u):
                    heapq.heappush(const_ready, u)
                else:
                    ready.add(u)
    if len(order) != n_nodes:
        raise ModelError("the graph has a cycle; cannot order its nodes")
    return order


# ---------------------------------------------------------------------------------------
# Offset assignment
# ---------------------------------------------------------------------------------------
def _conflicts(buffers: list[_Buffer]) -> list[list[int]]:
    """For each buffer, the buffers whose step ranges intersect its own."""
    idx = sorted(range(len(buffers)), key=lambda i: buffers[i].start)
    out: list[list[int]] = [[] for _ in buffers]
    active: list[int] = []
    for i in idx:
        b = buffers[i]
        if b.size == 0:
            continue
        active = [j for j in active if buffers[j].end >= b.start]
        for j in active:
            out[i].append(j)
            out[j].append(i)
        active.append(i)
    return out


def place(sizes: list[int], conflicts: list[list[int]], priority: Iterable[int],
          best_fit: bool = True) -> tuple[list[int], int]:
    """Place buffers in ``priority`` order, each at the best (smallest) or first gap left
    by the already placed buffers it conflicts with. Returns (offsets, arena size)."""
    n = len(sizes)
    offsets = [-1] * n
    top = 0
    for b in priority:
        size = sizes[b]
        if size == 0:
            offsets[b] = 0
            continue
        placed = sorted((offsets[c], offsets[c] + sizes[c]) for c in conflicts[b] if offsets[c] >= 0)
        prev = 0
        best = -1
        best_gap = None
        for lo, hi in placed:
            gap = lo - prev
            if gap >= size:
                if not best_fit:
                    best = prev
                    break
                if best_gap is None or gap < best_gap:
                    best, best_gap = prev, gap
            if hi > prev:
                prev = hi
        if best < 0:
            best = prev
        offsets[b] = best
        if best + size > top:
            top = best + size
    return offsets, top


def _breadth_priority(buffers: list[_Buffer], live: list[int]) -> list[int]:
    """TFLite's greedy by breadth: steps by live bytes, their buffers by size."""
    at_step: dict[int, list[int]] = {}
    for i, b in enumerate(buffers):
        for s in range(b.start, b.end + 1):
            at_step.setdefault(s, []).append(i)
    seen: set[int] = set()
    out = []
    for s in sorted(range(len(live)), key=lambda s: -live[s]):
        for i in sorted(at_step.get(s, []), key=lambda i: -buffers[i].size):
            if i not in seen:
                seen.add(i)
                out.append(i)
    out.extend(i for i in range(len(buffers)) if i not in seen)
    return out


SEARCH_STEPS = 4000


def assign_offsets(buffers: list[_Buffer], live: list[int], strategies: Iterable[str] = STRATEGIES,
                   time_limit: float = 0.5, seed: int = 0) -> tuple[list[int], int, str, dict[str, int]]:
    """Run the strategies; return (offsets, arena, winning strategy, arena per strategy)."""
    strategies = list(strategies)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise UsageError(f"unknown memory planning strategy {unknown[0] if unknown else '(none)'} "
                        f"(known: {', '.join(STRATEGIES)})")
    sizes = [b.size for b in buffers]
    conflicts = _conflicts(buffers)
    bound = max(live, default=0)
    results: dict[str, int] = {}
    best: tuple[list[int], int, str, list[int]] | None = None

    starts: list[tuple[list[int], int, list[int]]] = []

    def consider(name, prio, best_fit=True):
        nonlocal best
        offs, top = place(sizes, conflicts, prio, best_fit)
        starts.append((list(prio), top, offs))
        if name not in results or top < results[name]:
            results[name] = top
        if best is None or top < best[1]:
            best = (offs, top, name, list(prio))

    n = len(buffers)
    for name in strategies:
        if name == "size":
            consider(name, sorted(range(n), key=lambda i: (-sizes[i], buffers[i].start)))
            consider(name, sorted(range(n), key=lambda i: (-sizes[i], -(buffers[i].end - buffers[i].start))))
            consider(name, sorted(range(n), key=lambda i: -sizes[i] * (buffers[i].end - buffers[i].start + 1)))
        elif name == "inorder":
            consider(name, sorted(range(n), key=lambda i: (buffers[i].start, -sizes[i])))
        elif name == "breadth":
            consider(name, _breadth_priority(buffers, live))
    if "search" in strategies and (best is None or best[1] > bound) and n > 1:
        rng = random.Random(seed)
        if not starts:
            consider("search", list(range(n)))
        # local search from every strategy's order in turn (one stuck start does not stop
        # the others): move one buffer earlier in the priority list (half the time one that
        # reaches the top of the arena); keep the move if the arena does not grow
        states = [[list(prio), top, offs] for prio, top, offs in starts]
        deadline = time.perf_counter() + max(0.0, time_limit)
        step = 0
        # a step budget, not the clock, ends the search, so that the same model always gets the
        # same plan (byte-identical outputs); the time limit is only a safety cap
        while step < SEARCH_STEPS and best[1] > bound and time.perf_counter() < deadline:
            state = states[step % len(states)]
            step += 1
            prio, cur, offs = state
            cand = list(prio)
            if rng.random() < 0.5:
                tops = [b for b in range(n) if offs[b] + sizes[b] == cur]
                i = cand.index(rng.choice(tops))
            else:
                i = rng.randrange(n)
            j = rng.randrange(i + 1) if i else 0
            item = cand.pop(i)
            cand.insert(j, item)
            new_offs, top = place(sizes, conflicts, cand)
            if top <= cur:
                state[:] = [cand, top, new_offs]
                if top < best[1]:
                    best = (new_offs, top, "search", cand)
                    results["search"] = top
        results.setdefault("search", min(st[1] for st in states))
    assert best is not None
    return best[0], best[1], best[2], results


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------
def plan_model(model: onnx.ModelProto, input_shapes: dict[str, tuple] | None = None,
               workspace_fn: Callable | None = None, strategies: Iterable[str] = STRATEGIES,
               time_limit: float = 0.5, alignment: int = ALIGNMENT, seed: int = 0,
               order: list[int] | None = None, reorder: bool = False) -> MemoryPlan:
    """Plan the arena of ``model`` for ``input_shapes`` (see the module docstring)."""
    t0 = time.perf_counter()
    if alignment <= 0 or alignment & (alignment - 1):
        raise UsageError(f"plan: alignment {alignment} is not a power of two")
    shapes, used, notes = infer_concrete_shapes(model, input_shapes)
    if workspace_fn is None:
        workspace_fn = _default_workspace_fn() or no_workspace
    nodes = node_table(model)
    lv = liveness(model, shapes, order, workspace_fn, alignment, nodes)
    offsets, arena, strategy, results = assign_offsets(lv.buffers, lv.live, strategies, time_limit, seed)
    if reorder and order is None and arena > 0:
        other = liveness(model, shapes, memory_aware_order(model, lv, nodes), workspace_fn, alignment, nodes)
        if other.lower_bound < lv.lower_bound:
            placed = assign_offsets(other.buffers, other.live, strategies, time_limit, seed)
            if placed[1] < arena:  # the new order is kept only if the arena itself shrinks
                notes.append(f"nodes reordered: peak of live bytes {lv.lower_bound} -> {other.lower_bound}")
                lv = other
                offsets, arena, strategy, results = placed
    for b, off in zip(lv.buffers, offsets):
        if b.root is None:
            lv.workspaces[b.node].offset = off
        else:
            for m in b.members:
                lv.tensors[m].offset = off
    if arena > lv.lower_bound:
        notes.append(f"arena {arena} is {arena / max(lv.lower_bound, 1):.4f}x the lower bound "
                     f"{lv.lower_bound}: no strategy found a packing without gaps")
    plan = MemoryPlan(
        arena_size=arena, alignment=alignment, input_shapes=used, order=lv.order, tensors=lv.tensors,
        workspaces=lv.workspaces, lower_bound=lv.lower_bound, naive_total=lv.naive_total,
        fingerprint=graph_fingerprint(model), strategy=strategy, constants=lv.constants, notes=notes,
        live_bytes=lv.live, strategy_sizes=results,
    )
    plan.plan_time_s = time.perf_counter() - t0
    return plan


def store_plan(model: onnx.ModelProto, plan: MemoryPlan) -> None:
    """Write the plan into the model's metadata_props (in place)."""
    from opc.ir import set_metadata

    set_metadata(model, {META_KEY: plan.to_json()})


def load_plan_with_reason(model: onnx.ModelProto, input_shapes: dict | None = None
                          ) -> tuple[MemoryPlan | None, str]:
    """(plan, "") when a stored plan matches the graph (and ``input_shapes``, when given),
    else (None, why not)."""
    from opc.ir import get_metadata

    text = get_metadata(model).get(META_KEY)
    if text is None:
        return None, "the model holds no memory plan"
    try:
        plan = MemoryPlan.from_json(text)
    except PlanError as exc:
        return None, str(exc)
    if not plan.matches(model):
        return None, ("the stored memory plan does not match the graph (the model was edited "
                      "after planning); replan it")
    if input_shapes is not None:
        asked = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
        if any(plan.input_shapes.get(k) != v for k, v in asked.items()):
            planned = ", ".join(f"{k}: {list(v)}" for k, v in plan.input_shapes.items())
            return None, f"the stored memory plan is for other input shapes ({planned})"
    return plan, ""


def load_plan(model: onnx.ModelProto, input_shapes: dict | None = None) -> MemoryPlan | None:
    """The stored plan, or None (the reason is logged) when absent, unreadable, stale, or
    made for other input shapes than ``input_shapes`` (when given)."""
    plan, reason = load_plan_with_reason(model, input_shapes)
    if plan is None:
        log.info("memory plan not used: %s", reason)
    return plan


# ---------------------------------------------------------------------------------------
# Reporting: `opc inspect` (memory section, text chart, --plot)
# ---------------------------------------------------------------------------------------
def model_plan(model: onnx.ModelProto, time_limit: float = 0.5) -> tuple[MemoryPlan, str]:
    """The stored plan if it matches the graph, else one computed now (not stored), with a
    line saying which."""
    plan, reason = load_plan_with_reason(model)
    if plan is not None:
        return plan, "stored in the model, matches the graph"
    plan = plan_model(model, time_limit=time_limit)
    return plan, f"computed now, not stored ({reason})"


def memory_report(model: onnx.ModelProto) -> dict[str, Any]:
    """The memory section of `opc inspect` (JSON-friendly); {"error": ...} if no plan can be made."""
    try:
        plan, source = model_plan(model)
    except OpcError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - inspect reports; a planning failure must not stop it
        return {"error": f"planning failed ({type(exc).__name__}: {exc})"}
    kinds = [s.kind for s in plan.tensors.values()]
    return {
        "source": source,
        "input_shapes": {k: list(v) for k, v in plan.input_shapes.items()},
        "arena_bytes": plan.arena_size,
        "lower_bound_bytes": plan.lower_bound,
        "naive_bytes": plan.naive_total,
        "alignment": plan.alignment,
        "strategy": plan.strategy,
        "tensors": len(plan.tensors),
        "views": kinds.count("view"),
        "inplace": kinds.count("inplace"),
        "workspaces": len(plan.workspaces),
        "steps": len(plan.order),
        "live_bytes": plan.live_at(),
        "notes": list(plan.notes),
    }


def _mib(n: float) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{int(n)} B"


def text_chart(live: list[int], width: int = 64, height: int = 8) -> list[str]:
    """Live bytes over the steps as rows of '#' (each column: the max over its steps)."""
    if not live:
        return ["  (no steps)"]
    cols = min(width, len(live))
    per = len(live) / cols
    values = [max(live[int(c * per):max(int((c + 1) * per), int(c * per) + 1)]) for c in range(cols)]
    top = max(values) or 1
    label_w = len(_mib(top))
    rows = []
    for r in range(height, 0, -1):
        level = top * (r - 0.5) / height
        label = _mib(top) if r == height else ("0 B" if r == 1 else "")
        rows.append(f"  {label:>{label_w}} |" + "".join("#" if v >= level else " " for v in values))
    rows.append(f"  {'':>{label_w}} +" + "-" * cols)
    rows.append(f"  {'':>{label_w}}  step 0{' ' * max(1, cols - 7 - len(str(len(live) - 1)))}{len(live) - 1}")
    return rows


def format_memory(info: dict[str, Any]) -> list[str]:
    if "error" in info:
        return [f"memory plan: none ({info['error']})"]
    shapes = ", ".join(f"{k}: {'x'.join(map(str, v))}" for k, v in info["input_shapes"].items())
    lb = info["lower_bound_bytes"]
    lines = [
        f"memory plan ({info['source']}) for {shapes or 'no inputs'}:",
        f"  arena {_mib(info['arena_bytes'])} ({info['arena_bytes']:,} B), lower bound {_mib(lb)} "
        f"({info['arena_bytes'] / lb if lb else 1:.3f}x), naive {_mib(info['naive_bytes'])}; "
        f"strategy {info['strategy'] or '-'}",
        f"  {info['tensors']} tensors in the arena ({info['views']} views, {info['inplace']} in place), "
        f"{info['workspaces']} workspaces, {info['steps']} steps, alignment {info['alignment']}",
    ]
    lines.extend(f"  note: {n}" for n in info["notes"])
    lines.append("  live bytes over the steps:")
    lines.extend(text_chart(info["live_bytes"]))
    return lines


def write_plot(plan: MemoryPlan, path) -> None:
    """The arena layout (offset over steps) and live bytes over steps, as SVG (written by
    hand) or PNG (needs matplotlib)."""
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise UsageError(f"--plot {path}: the file must end in .svg or .png")
    if not path.absolute().parent.is_dir():
        raise OpcError(f"--plot {path}: the folder {path.absolute().parent} does not exist")
    live = plan.live_at()
    rects = []  # (first, last, offset, size, label, kind)
    groups = plan.alias_groups()
    for name, s in plan.tensors.items():
        if s.alias_of is None and s.size:
            group = [s] + [plan.tensors[m] for m in groups.get(name, [])]
            last = max(t.last_use for t in group)
            label = name + (f" (+{len(group) - 1} aliases)" if len(group) > 1 else "")
            rects.append((s.first_use, last, s.offset, align(s.size, plan.alignment), label, "tensor"))
    for idx, s in plan.workspaces.items():
        rects.append((s.first_use, s.last_use, s.offset, align(s.size, plan.alignment),
                      f"workspace of node {idx}", "workspace"))
    if suffix == ".png":
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise OpcError(f"--plot {path}: PNG needs matplotlib (pip install matplotlib); "
                           "an .svg file needs nothing") from None
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 1])
        for first, last, off, size, _, kind in rects:
            ax1.add_patch(plt.Rectangle((first, off / 2**20), last + 1 - first, size / 2**20,
                                        color="tab:orange" if kind == "workspace" else "tab:blue",
                                        alpha=0.6, linewidth=0.3, ec="black"))
        ax1.set_xlim(0, max(len(live), 1))
        ax1.set_ylim(0, max(plan.arena_size, 1) / 2**20)
        ax1.set_ylabel("offset (MiB)")
        ax1.set_title(f"arena {_mib(plan.arena_size)}, lower bound {_mib(plan.lower_bound)}, "
                      f"naive {_mib(plan.naive_total)}")
        ax2.step(range(len(live)), [v / 2**20 for v in live], where="post")
        ax2.axhline(plan.arena_size / 2**20, color="red", linewidth=0.8)
        ax2.set_xlabel("step")
        ax2.set_ylabel("live (MiB)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    path.write_text(_svg(plan, live, rects), encoding="utf-8")


def _svg(plan: MemoryPlan, live: list[int], rects: list) -> str:
    from xml.sax.saxutils import escape

    w, left, right = 960, 70, 20
    top_h, bottom_h, pad = 420, 140, 40
    height = pad + top_h + pad + bottom_h + pad
    steps = max(len(live), 1)
    arena = max(plan.arena_size, 1)
    peak = max(max(live, default=0), arena, 1)
    plot_w = w - left - right

    def x(step):
        return left + plot_w * step / steps

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" '
           f'viewBox="0 0 {w} {height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="{pad - 14}" font-size="14">arena {escape(_mib(plan.arena_size))}, '
           f'lower bound {escape(_mib(plan.lower_bound))}, naive {escape(_mib(plan.naive_total))} '
           f'({len(plan.tensors)} tensors, {steps} steps)</text>',
           f'<rect x="{left}" y="{pad}" width="{plot_w}" height="{top_h}" fill="none" stroke="black"/>']
    for first, last, off, size, label, kind in rects:
        y = pad + top_h - top_h * (off + size) / arena
        h = top_h * size / arena
        color = "#f28e2b" if kind == "workspace" else "#4e79a7"
        out.append(f'<rect x="{x(first):.2f}" y="{y:.2f}" width="{x(last + 1) - x(first):.2f}" '
                   f'height="{h:.2f}" fill="{color}" fill-opacity="0.7" stroke="black" stroke-width="0.3">'
                   f'<title>{escape(label)}: {size} B at {off}, steps {first}-{last}</title></rect>')
    out.append(f'<text x="{left - 6}" y="{pad + 4}" text-anchor="end">{escape(_mib(arena))}</text>')
    out.append(f'<text x="{left - 6}" y="{pad + top_h}" text-anchor="end">0</text>')
    out.append(f'<text x="14" y="{pad + top_h / 2}" transform="rotate(-90 14 {pad + top_h / 2})" '
               f'text-anchor="middle">offset</text>')
    y0 = pad + top_h + pad
    out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{bottom_h}" fill="none" stroke="black"/>')
    pts = []
    for s, v in enumerate(live):
        yy = y0 + bottom_h - bottom_h * v / peak
        pts.append(f"{x(s):.2f},{yy:.2f} {x(s + 1):.2f},{yy:.2f}")
    if pts:
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#4e79a7" stroke-width="1.5"/>')
    ya = y0 + bottom_h - bottom_h * arena / peak
    out.append(f'<line x1="{left}" y1="{ya:.2f}" x2="{left + plot_w}" y2="{ya:.2f}" stroke="#e15759" '
               f'stroke-dasharray="4 3"><title>arena size</title></line>')
    out.append(f'<text x="{left - 6}" y="{y0 + 4}" text-anchor="end">{escape(_mib(peak))}</text>')
    out.append(f'<text x="{left - 6}" y="{y0 + bottom_h}" text-anchor="end">0</text>')
    out.append(f'<text x="14" y="{y0 + bottom_h / 2}" transform="rotate(-90 14 {y0 + bottom_h / 2})" '
               f'text-anchor="middle">live</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{y0 + bottom_h + 28}" text-anchor="middle">step (0 to {steps - 1})</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
