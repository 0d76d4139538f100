"""``Session``: load a model once, run it many times, ONNX Runtime style.

The first run with a new input-shape signature executes the plan with freshly allocated
results and records every tensor's shape, dtype and live range (shapes are resolved once
per signature). The session then lays all intermediates out in one arena (the model's own
memory plan when it has one that fits, else planned here), and later runs with that
signature hand each kernel a view into the arena to write into. Graph outputs are never
arena views: they are returned as separate arrays.

Values a kernel reads on the host (shapes, axes, pads: small constants and the shape arithmetic
of a signature) are copied there once, at load or when the signature is first seen
(``xp.register_host``), so a steady-state run on CuPy never waits for the device. On CuPy the
steady-state run of a signature is also captured as a CUDA graph and replayed
(``gpu_graph``), and chains of elementwise ops run as one generated kernel (``fuse``).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx

from opc.errors import DataError, OpcError
from opc.runtime.arena import Block, check_offsets, plan_offsets
from opc.runtime.program import compile_graph, opset_map
from opc.runtime.gpu_graph import CupyAdapter, GraphCache, GraphState, capture_blocker
from opc.runtime.values import copy_value, feed_value, host_value, is_host_object, is_tensor, signature, type_name
from opc.runtime.xp import array_module, data_ptr, is_numpy, register_host, to_host, unregister_host


def workspace_bytes(node, input_shapes, input_dtypes) -> int:
    from opc.runtime import workspace_bytes as ws

    return ws(node, input_shapes, input_dtypes)

_TYPE_NAMES = {np.dtype(v): k for k, v in {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_}.items()}


@dataclass
class NodeArg:
    """What ``get_inputs``/``get_outputs`` return (the fields of ORT's NodeArg)."""

    name: str
    shape: list
    type: str


@dataclass
class Layout:
    """Arena placement for one input-shape signature."""

    arena_size: int
    arena: object
    outs: list = field(default_factory=list)  # per step: list of views or None
    ws: list = field(default_factory=list)  # per step: uint8 view or None
    source: str = "runtime"  # "model": the stored plan; "planned": opc.memory on the fly; "runtime": own
    blocks: list = field(default_factory=list)
    static: dict = field(default_factory=dict)  # slot -> value computed once (shape arithmetic)
    run_steps: list = field(default_factory=list)  # indices of the steps a run executes
    graph: object = None  # gpu_graph.GraphState (CuPy with CUDA graphs)
    plan: list = field(default_factory=list)  # (fn, inputs, outputs, views, workspace, alias) per run step


def _value_args(values) -> list[NodeArg]:
    res = []
    for v in values:
        if not v.type.HasField("tensor_type"):  # seq(...), optional(...): ORT's type names
            res.append(NodeArg(v.name, [], type_name(v.type)))
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        try:
            ty = type_name(v.type) if t.elem_type == onnx.TensorProto.STRING else \
                _TYPE_NAMES.get(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), "tensor(unknown)")
        except Exception:
            ty = "tensor(unknown)"
        res.append(NodeArg(v.name, dims, ty))
    return res


class Session:
    """``Session(model_or_path, backend="auto"|"numpy"|"cupy")``; ``run(output_names, feeds)``."""

    def __init__(self, model_or_path, backend: str = "auto", *, threads: int | None = None,
                 use_arena: bool = True, use_model_plan: bool = True, plan_on_the_fly: bool = True,
                 fuse: bool | None = None, cuda_graphs: bool | None = None, fuse_qdq: bool = True):
        """``threads`` limits the BLAS threads during ``run`` (None: leave the library's setting);
        ``use_arena=False`` runs every time with freshly allocated results. The arena layout is
        the memory plan stored in the model when it matches the graph and fits this input
        signature; else (``plan_on_the_fly``) ``opc.memory.plan_model`` plans the signature now;
        else (or if that plan does not fit) the session's own greedy planner places the tensors.
        ``use_model_plan=False`` goes straight to the own planner. ``fuse`` merges chains of
        elementwise ops into one step (``opc.runtime.fuse``; None: on CuPy, where it saves
        kernel launches and memory traffic, off on NumPy, where it measured no faster).
        ``cuda_graphs`` (CuPy; None: on) captures a signature's steady-state run as a CUDA graph
        and replays it (``opc.runtime.gpu_graph``). ``fuse_qdq=False`` runs every activation
        QuantizeLinear -> DequantizeLinear pair as two steps (tests, benchmarks) instead of one
        fake-quant step."""
        self.xp = array_module(backend)
        self.threads = threads
        self.backend = "numpy" if is_numpy(self.xp) else "cupy"
        if isinstance(model_or_path, onnx.ModelProto):
            model = model_or_path
        else:
            from opc.ir import load_model

            model = load_model(os.fspath(model_or_path))
        self._model = model
        inits = {t.name for t in model.graph.initializer}
        # constants are folded at load; a feed that overrides an initializer (IR < 4 models
        # list them as inputs) runs an unfolded copy of the plan instead, without the arena
        self.fuse = fuse = (self.backend == "cupy") if fuse is None else bool(fuse)
        self.fuse_qdq = bool(fuse_qdq)
        self.program = compile_graph(model.graph, self.xp, opset_map(model), fuse=fuse, fuse_qdq=self.fuse_qdq)
        self._unfolded = None
        self._inputs = _value_args([i for i in model.graph.input if i.name not in inits])
        self._outputs = _value_args(model.graph.output)
        # per input: (may be None: an optional, holds a sequence)
        self._input_kinds = {a.name: (a.type.startswith("optional("), a.type.replace("optional(", "").startswith("seq("))
                             for a in self._inputs}
        self._input_dtypes = {}
        for a in self._inputs:
            v = next(i for i in model.graph.input if i.name == a.name)
            try:
                self._input_dtypes[a.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
            except Exception:
                self._input_dtypes[a.name] = None
        # IR < 4 models list initializers as inputs too; a feed may override them
        self._overridable = [i.name for i in model.graph.input if i.name in inits]
        self.use_arena = use_arena
        self.use_model_plan = use_model_plan
        self.plan_on_the_fly = plan_on_the_fly
        self._plan_source = "runtime"
        self._layouts: dict[tuple, Layout | None] = {}
        self._out_index = {n: i for i, n in enumerate(self.program.output_names)}
        self._input_slots = set(self.program.inputs)
        use_graphs = self.backend == "cupy" and use_arena and cuda_graphs is not False
        self._graphs = GraphCache(CupyAdapter(self.xp)) if use_graphs else None

    # -- ORT-like API -------------------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [f"opc-{self.backend}"]

    def run(self, output_names, feeds: dict, run_options=None, *, to_numpy: bool = True) -> list:
        names = list(output_names) if output_names else list(self.program.output_names)
        for n in names:
            if n not in self._out_index:
                raise DataError(f"the model has no output '{n}' (outputs: {', '.join(self.program.output_names)})")
        values = self._feed_values(feeds)
        sig = tuple(signature(v) for v in values)
        layout = self._layouts.get(sig, False)
        if self._overrides:
            outs = self._run_overridden(values)
        elif self.backend == "numpy":
            with np.errstate(all="ignore"), _blas_threads(self.threads):
                outs = self._execute(values, layout, sig)
        else:
            outs = self._execute(values, layout, sig)
        res = [outs[self._out_index[n]] for n in names]
        return [host_value(r, to_host) for r in res] if to_numpy else res

    # -- internals ----------------------------------------------------------------
    def _feed_values(self, feeds: dict) -> list:
        p = self.program
        known = set(p.input_names) | set(self._overridable)
        for k in feeds:
            if k not in known:
                raise DataError(f"feed '{k}' is not an input of the model (inputs: {', '.join(p.input_names)})")
        values = []
        for name in p.input_names:
            if name not in feeds:
                raise DataError(f"input '{name}' is missing from the feeds")
            v = feeds[name]
            arg = next(a for a in self._inputs if a.name == name)
            optional, sequence = self._input_kinds[name]
            if v is None:
                if not optional:
                    raise DataError(f"input '{name}': None is a value of optional inputs only ({arg.type})")
                values.append(None)  # an empty optional
                continue
            if sequence:
                if not isinstance(v, (list, tuple)):
                    raise DataError(f"input '{name}': expected a sequence (a list of arrays), got {type(v).__name__}")
                values.append(feed_value(self.xp, v))
                continue
            if not hasattr(v, "dtype") or not hasattr(v, "shape"):
                v = np.asarray(v)
            if v.dtype.kind in "US":
                v = v.astype(object)  # strings are object arrays, as onnx has them
            want = self._input_dtypes.get(name)
            if want is not None and v.dtype != want:
                raise DataError(f"input '{name}': expected {want}, got {v.dtype}")
            if arg.shape and len(arg.shape) != v.ndim:
                raise DataError(f"input '{name}': expected rank {len(arg.shape)}, got shape {tuple(v.shape)}")
            for d, s in zip(arg.shape, v.shape):
                if isinstance(d, int) and d > 0 and d != s:
                    raise DataError(f"input '{name}': expected shape {arg.shape}, got {tuple(v.shape)}")
            values.append(feed_value(self.xp, v))
        self._overrides = {k: self.xp.asarray(feeds[k]) for k in self._overridable if k in feeds}
        return values

    def _run_overridden(self, values):
        if self._unfolded is None:
            m = self._model
            self._unfolded = compile_graph(m.graph, self.xp, opset_map(m), overridable=frozenset(self._overridable),
                                           fuse=self.fuse, fuse_qdq=self.fuse_qdq)
        p = self._unfolded
        saved = dict(p.consts)
        try:
            for name, v in self._overrides.items():
                p.consts[p.slots[name]] = v
            with np.errstate(all="ignore"):
                outs = p.run(values)
        finally:
            p.consts = saved
        return [copy_value(o) for o in outs]

    def _execute(self, values, layout, sig):
        if layout:
            if self._graphs is not None:
                if layout.graph is None:
                    layout.graph = GraphState(blocked=capture_blocker(self.program, layout))
                return self._graphs.run(layout.graph, values, lambda v: self._steady(v, layout))
            return self._steady(values, layout)
        p = self.program
        xp = self.xp
        vals = p.start_values(values)
        trace = layout is False and self.use_arena
        record = {} if trace else None
        static = {} if trace else None  # slots whose value depends on input shapes only
        known = set(p.consts)
        varying = set()  # slots whose shape may change between runs of one signature (NonZero...)
        for i in range(len(p.steps)):
            step = p.steps[i]
            ins = [vals[j] if j >= 0 else None for j in step.ins]
            try:
                res = step.fn(ins, None, None)
            except OpcError:
                raise
            except Exception as exc:
                raise _kernel_error(step, exc) from exc
            if type(res) is not list and type(res) is not tuple:  # one output (a Sequence is one)
                res = (res,)
            for k, (s, r) in enumerate(zip(step.outs, res)):
                if s < 0:
                    continue
                if not isinstance(r, xp.ndarray) and not is_host_object(r):
                    r = xp.asarray(r)
                vals[s] = r
                if trace and is_tensor(r, xp):  # sequences, optionals, strings: never in the arena
                    alias = step.spec.alias and k == 0 and ins and ins[0] is not None and \
                        r.size and data_ptr(r) == data_ptr(ins[0])
                    record[s] = (tuple(r.shape), r.dtype, alias, step.ins[0] if alias else -1)
            # a value-dependent shape varies unless the values are themselves shape-derived
            # (ConstantOfShape of a computed shape: fixed per signature)
            if trace and ((step.spec.dynamic and not _shape_only(step, known)) or any(j in varying for j in step.ins)):
                varying.update(s for s in step.outs if s >= 0)
            elif trace and _shape_only(step, known) and all(
                    r is None or getattr(r, "size", 0) <= STATIC_MAX_ELEMENTS for r in res) and not any(
                    s >= 0 and vals[s] is not None and not is_tensor(vals[s], xp) for s in step.outs):
                for s, r in zip(step.outs, res):
                    if s >= 0:
                        known.add(s)
                        static[s] = vals[s]
            for s in p.release[i]:
                vals[s] = None
        outs = [vals[s] for s in p.outputs]
        if trace:
            lay = self._make_layout(values, record, static)
            lay.static = static
            # host copies of the shape arithmetic, made now: later runs read them without a sync
            keys = register_host([v for v in static.values() if v is not None])
            weakref.finalize(lay, unregister_host, keys)
            lay.run_steps = [i for i, st in enumerate(p.steps) if not all(s < 0 or s in static for s in st.outs)]
            lay.plan = [(p.steps[i].fn, tuple(p.steps[i].ins), tuple(p.steps[i].outs), lay.outs[i], lay.ws[i],
                         p.steps[i].spec.alias) for i in lay.run_steps]
            self._layouts[sig] = lay
        final = []
        for s, o in zip(p.outputs, outs):
            if s in p.consts or s in self._input_slots or (trace and s in static):
                o = copy_value(o)  # the caller must not be able to edit weights, feeds or cached values
            final.append(o)
        return final

    def _steady(self, values, layout):
        """A run inside the arena: no allocation but the outputs, no shape arithmetic."""
        p = self.program
        vals = p.start_values(values)
        for s, v in layout.static.items():
            vals[s] = v
        self._run_arena(vals, layout)
        final = []
        for s in p.outputs:
            o = vals[s]
            if o is not None and not isinstance(o, list) and o.size and _inside(o, layout.arena):
                o = o.copy()
            elif s in p.consts or s in self._input_slots or s in layout.static:
                o = copy_value(o)  # the caller must not be able to edit weights, feeds or cached values
            final.append(o)
        return final

    def _run_arena(self, vals, layout) -> None:
        """The steady-state loop: every kernel gets its arena views and workspace."""
        xp = self.xp
        nd = xp.ndarray
        lo = data_ptr(layout.arena)
        hi = lo + layout.arena.size
        n = -1
        try:
            for n, (fn, ins_idx, outs_idx, views, ws, alias) in enumerate(layout.plan):
                res = fn([vals[j] if j >= 0 else None for j in ins_idx], views, ws)
                if type(res) is not list and type(res) is not tuple:
                    res = (res,)
                for k, s in enumerate(outs_idx):
                    if s < 0:
                        continue
                    r = res[k]
                    v = views[k] if views is not None else None
                    if r is v:
                        vals[s] = r
                        continue
                    if not isinstance(r, nd):  # a NumPy scalar from a full reduction
                        if r is None or isinstance(r, list) or (isinstance(r, np.ndarray) and r.dtype.kind == "O"):
                            vals[s] = r  # an empty optional, a sequence, host strings (values.py)
                            continue
                        r = xp.asarray(r)
                    if v is not None and r.shape == v.shape and r.dtype == v.dtype:
                        xp.copyto(v, r)  # a kernel that cannot write in place: keep the slot in the arena
                        r = v
                    elif not alias and r.size and lo <= data_ptr(r) < hi:
                        r = r.copy()  # e.g. an If passing an arena tensor through: its slot may be reused
                    vals[s] = r
        except OpcError:
            raise
        except Exception as exc:
            raise _kernel_error(self.program.steps[layout.run_steps[n]], exc) from exc

    def _make_layout(self, values, record, static) -> Layout | None:
        """Plan the arena from one traced run (shapes, dtypes, live ranges in node positions)."""
        p = self.program
        steps = p.steps
        end_of_graph = len(self._model.graph.node)
        graph_outputs = set(p.outputs)
        first, last = {}, {}
        for st in steps:
            for s in st.outs:
                if s >= 0:
                    first.setdefault(s, st.index)
                    last.setdefault(s, st.index)
            for s in st.ins:
                if s >= 0:
                    last[s] = st.index
        # an alias (view) keeps its root's memory alive as long as the alias is used
        root = {}
        for st in steps:
            for s in st.outs:
                if s in record and record[s][2]:
                    src = record[s][3]
                    root[s] = root.get(src, src)
        for s, r in root.items():
            last[r] = max(last.get(r, 0), end_of_graph if s in graph_outputs else last.get(s, 0))
        planned = {}
        for st in steps:
            if st.spec.dynamic:
                continue
            for s in st.outs:
                if s < 0 or s in graph_outputs or s in root or s not in record or s in static:
                    continue
                shape, dtype, _, _ = record[s]
                size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if size:
                    planned[s] = Block(s, size, first[s], last[s])
        shapes = {s: rec[0] for s, rec in record.items()}
        dtypes = {s: rec[1] for s, rec in record.items()}
        for s, v in zip(p.inputs, values):
            if is_tensor(v, self.xp):
                shapes[s], dtypes[s] = tuple(v.shape), v.dtype
        for s, v in p.consts.items():
            shapes[s], dtypes[s] = tuple(v.shape), v.dtype
        ws_blocks = []
        for i, st in enumerate(steps):
            if st.spec.workspace is None:
                continue
            nb = st.spec.workspace(st.node, [shapes.get(j) for j in st.ins], [dtypes.get(j) for j in st.ins])
            if nb:
                ws_blocks.append(Block(("ws", i), int(nb), st.index, st.index))
        blocks = list(planned.values()) + ws_blocks
        source = "runtime"
        size = None
        if self.use_model_plan:
            size = self._model_plan(blocks, {n: tuple(v.shape) for n, v in zip(p.input_names, values)
                                             if is_tensor(v, self.xp)})
        if size is None:
            size = plan_offsets(blocks)
        else:
            source = self._plan_source
        arena = self.xp.empty(max(size, 1), dtype=self.xp.uint8)
        layout = Layout(size, arena, source=source, blocks=blocks)
        layout.outs = [None] * len(steps)
        layout.ws = [None] * len(steps)
        for b in ws_blocks:
            layout.ws[b.key[1]] = arena[b.offset:b.offset + b.size]
        for i, st in enumerate(steps):
            views = []
            for s in st.outs:
                b = planned.get(s)
                if b is None:
                    views.append(None)
                    continue
                shape, dtype = record[s][0], record[s][1]
                views.append(arena[b.offset:b.offset + b.size].view(dtype).reshape(shape))
            if any(v is not None for v in views):
                layout.outs[i] = views
        return layout

    def _model_plan(self, blocks, shapes) -> int | None:
        """Offsets from the model's stored memory plan (``opc.memory``) when it fits this run:
        same node order, a slot at least as large as every tensor and workspace needs, and no
        two tensors alive together overlapping (outputs written in place over their input,
        which the plan allows for element-wise ops, excepted)."""
        try:
            from opc import memory
        except Exception:
            return None
        try:
            plan = memory.load_plan(self._model)
            self._plan_source = "model"
            if plan is None and self.plan_on_the_fly:
                # no stored plan (or a stale one): plan this input signature now
                plan = memory.plan_model(self._model, shapes, workspace_bytes, time_limit=0.1)
                self._plan_source = "planned"
        except Exception:
            plan = None
        if plan is None or list(plan.order) != list(range(len(self._model.graph.node))):
            return None
        names = self.program.names
        steps = self.program.steps
        offsets = {}
        for b in blocks:
            if isinstance(b.key, tuple):
                ws = plan.workspaces or {}
                slot = ws.get(steps[b.key[1]].index, ws.get(str(steps[b.key[1]].index)))
            else:
                slot = plan.tensors.get(names[b.key])
            if slot is None or slot.size < b.size or (slot.alias_of and slot.kind != "inplace"):
                return None
            offsets[id(b)] = slot.offset

        def group(b):
            if isinstance(b.key, tuple):
                return b.key
            slot = plan.tensors[names[b.key]]
            return slot.alias_of or names[b.key]

        for b in blocks:
            b.offset = offsets[id(b)]
        trial = [Block(group(b), b.size, b.start, b.end, b.offset) for b in blocks]
        if check_offsets(trial, int(plan.arena_size), same_key_ok=True) is not None:
            for b in blocks:
                b.offset = -1
            return None
        return int(plan.arena_size)

    # -- introspection ---------------------------------------------------------------
    def arena_bytes(self, feeds: dict | None = None) -> int | None:
        """Arena size for the signature of ``feeds`` (or the last planned one)."""
        if feeds is not None:
            sig = tuple(signature(feed_value(np, feeds[n])) for n in self.program.input_names)
            lay = self._layouts.get(sig)
        else:
            lay = next(reversed(self._layouts.values()), None) if self._layouts else None
        return lay.arena_size if lay else None

    def layout(self, feeds: dict | None = None) -> Layout | None:
        if feeds is None:
            return next(reversed(self._layouts.values()), None) if self._layouts else None
        sig = tuple(signature(feed_value(np, feeds[n])) for n in self.program.input_names)
        return self._layouts.get(sig)


STATIC_MAX_ELEMENTS = 4096  # shape-derived values up to this size are kept per signature
_SHAPE_OPS = {"Shape", "Size"}
_NOT_STATIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _shape_only(step, known) -> bool:
    """True when the step's outputs depend on input shapes and constants only."""
    op = step.node.op_type
    if step.node.domain or op in _NOT_STATIC or step.node.subgraphs or step.node.captures:
        return False
    if op in _SHAPE_OPS:
        return True
    return bool(step.ins) and all(j < 0 or j in known for j in step.ins)


def _kernel_error(step, exc) -> OpcError:
    text = str(exc).strip().splitlines()
    return OpcError(f"{step.node.where()} failed: {type(exc).__name__}: {text[0] if text else ''}")


class _blas_threads:
    """Set the BLAS thread count inside a block and restore it after (no-op for None or
    without threadpoolctl). The library handles are looked up once per process."""

    _libs = None

    def __init__(self, n):
        self.n = n
        self.saved = None

    def __enter__(self):
        if not self.n:
            return self
        if _blas_threads._libs is None:
            try:
                from threadpoolctl import ThreadpoolController

                _blas_threads._libs = ThreadpoolController().select(user_api="blas").lib_controllers
            except Exception:
                _blas_threads._libs = []
        self.saved = []
        for lib in _blas_threads._libs:
            cur = lib.get_num_threads()
            if cur != self.n:
                lib.set_num_threads(self.n)
                self.saved.append((lib, cur))
        return self

    def __exit__(self, *exc):
        for lib, cur in self.saved or ():
            lib.set_num_threads(cur)
        return False


def _inside(a, arena) -> bool:
    lo = data_ptr(arena)
    p = data_ptr(a)
    return lo <= p < lo + arena.size


def weights_bytes(session: Session) -> int:
    """Bytes of the initializers and load-time folded constants the session holds."""
    return int(sum(v.nbytes for v in session.program.consts.values()))
