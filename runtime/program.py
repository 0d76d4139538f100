"""A graph compiled to a flat list of kernel calls over numbered value slots.

Load time: every node becomes a ``Step`` (kernel closure, input slots, output slots); an
unsupported op fails here with one line naming it. Subgraphs (If/Loop/Scan bodies) are
compiled the same way; the names they read from enclosing scopes become extra inputs of
the node that owns them (``node.captures``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from opc.errors import ModelError
from opc.runtime import registry
from opc.runtime.k_rnn import fuse_stacked_lstm
from opc.runtime.fuse import fuse_elementwise
from opc.runtime.k_quant import FAKE_QUANT_OP, FAKE_QUANT_TYPES, fake_quant
from opc.runtime.registry import KERNELS, Node, attr_value
from opc.runtime.values import feed_value, is_host_object
from opc.runtime.xp import load_host, register_host, unregister_host

_CONTROL_GRAPH_ATTRS = ("then_branch", "else_branch", "body")


@dataclass
class Step:
    node: Node
    spec: registry.Spec
    fn: object
    ins: list[int]
    outs: list[int]
    index: int = 0  # position of the node in graph.node


@dataclass
class Program:
    xp: object
    slots: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)  # fed slots (graph inputs), in order
    input_names: list[str] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    consts: dict[int, object] = field(default_factory=dict)  # initializer slot -> device array
    captures: list[str] = field(default_factory=list)  # names read from enclosing scopes
    capture_slots: list[int] = field(default_factory=list)
    release: list[list[int]] = field(default_factory=list)  # slots dead after each step
    folded: int = 0  # steps computed once at load (constant inputs only)
    fused: int = 0  # activation steps merged into the preceding Conv
    fused_elementwise: int = 0  # elementwise steps merged into a FusedElementwise step (runtime/fuse.py)
    fused_qdq: int = 0  # QuantizeLinear -> DequantizeLinear pairs run as one fake-quant step

    def slot(self, name: str) -> int:
        s = self.slots.get(name)
        if s is None:
            s = self.slots[name] = len(self.names)
            self.names.append(name)
        return s

    def start_values(self, feeds: list) -> list:
        """One value per slot: the constants and the fed inputs in place, None elsewhere."""
        vals = [None] * len(self.names)
        for s, v in self.consts.items():
            vals[s] = v
        for s, v in zip(self.inputs, feeds):
            vals[s] = v
        return vals

    def run(self, feeds: list, captured: list | None = None) -> list:
        """Execute without preallocated outputs (subgraphs, traces)."""
        vals = self.start_values(feeds)
        for s, v in zip(self.capture_slots, captured or []):
            vals[s] = v
        for step, dead in zip(self.steps, self.release):
            res = step.fn([vals[i] if i >= 0 else None for i in step.ins], None, None)
            _store(vals, step, res)
            for s in dead:
                vals[s] = None
        return [vals[s] for s in self.outputs]


def _store(vals, step, res):
    if type(res) is not list and type(res) is not tuple:  # one output (a Sequence is one)
        res = (res,)
    for s, r in zip(step.outs, res):
        if s >= 0:
            vals[s] = np.asarray(r) if isinstance(r, (np.generic, int, float, bool)) else r


def opset_map(model_or_opsets) -> dict[str, int]:
    ops = model_or_opsets.opset_import if isinstance(model_or_opsets, onnx.ModelProto) else model_or_opsets
    m = {}
    for o in ops:
        m["" if o.domain in ("", "ai.onnx") else o.domain] = o.version
    return m


def unsupported_ops(graph: onnx.GraphProto) -> list[str]:
    bad = []

    def walk(g):
        for n in g.node:
            dom = "" if n.domain in ("", "ai.onnx") else n.domain
            if (dom, n.op_type) not in KERNELS:
                label = n.op_type if not dom else f"{dom}.{n.op_type}"
                bad.append(f"{label} (node '{n.name or n.output[0]}')")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g2 in a.graphs:
                    walk(g2)
    walk(graph)
    return bad


def compile_graph(graph: onnx.GraphProto, xp, opsets: dict[str, int], outer: set[str] | None = None,
                  overridable: frozenset = frozenset(), fuse: bool = True, fuse_qdq: bool = True) -> Program:
    """Compile ``graph``; ``outer`` holds names visible from enclosing scopes (subgraphs);
    ``fuse=False`` keeps elementwise chains as separate steps (tests, benchmarks);
    ``fuse_qdq=False`` keeps activation QuantizeLinear -> DequantizeLinear pairs as two steps."""
    bad = unsupported_ops(graph)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ModelError(f"unsupported op: {', '.join(bad[:3])}{more}")
    p = Program(xp)
    init_names = set()
    for t in graph.initializer:
        s = p.slot(t.name)
        try:
            arr = numpy_helper.to_array(t)
        except Exception as exc:
            raise ModelError(f"initializer '{t.name}': cannot be read ({exc})") from None
        p.consts[s] = feed_value(xp, arr)  # string initializers stay host object arrays
        init_names.add(t.name)
    for t in graph.sparse_initializer:
        raise ModelError(f"sparse initializer '{t.values.name}' is not supported")
    for i in graph.input:
        if i.name in init_names:
            continue
        p.inputs.append(p.slot(i.name))
        p.input_names.append(i.name)
    defined = set(init_names) | set(p.input_names)
    captured: list[str] = []

    def ref(name: str) -> int:
        if name == "":
            return -1
        if name not in defined:
            if outer is not None and name in outer:
                if name not in captured:
                    captured.append(name)
            else:
                raise ModelError(f"graph '{graph.name}': tensor '{name}' is used but never defined")
        return p.slot(name)

    for index, n in enumerate(graph.node):
        dom = "" if n.domain in ("", "ai.onnx") else n.domain
        attrs, subs = {}, {}
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                subs[a.name] = a.g
            elif a.type == onnx.AttributeProto.GRAPHS:
                raise ModelError(f"node '{n.name}': graph-list attributes are not supported")
            else:
                attrs[a.name] = attr_value(a)
        inputs = list(n.input)
        while inputs and inputs[-1] == "":
            inputs.pop()
        node = Node(n.op_type, dom, n.name, inputs, list(n.output), attrs, opsets.get(dom, 1), proto=n)
        node.captures = []
        if subs:
            visible = (outer or set()) | defined
            for key, g in subs.items():
                sub = compile_graph(g, xp, opsets, visible, fuse=fuse, fuse_qdq=fuse_qdq)
                node.subgraphs[key] = sub
                for c in sub.captures:
                    if c not in node.captures:
                        node.captures.append(c)
        spec = KERNELS[(dom, n.op_type)]
        try:
            fn = spec.build(node, xp)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{node.where()}: cannot be loaded ({type(exc).__name__}: {exc})") from None
        ins = [ref(x) for x in inputs] + [ref(c) for c in node.captures]
        outs = []
        for o in n.output:
            if o == "":
                outs.append(-1)
                continue
            outs.append(p.slot(o))
            defined.add(o)
        p.steps.append(Step(node, spec, fn, ins, outs, index))
    for o in graph.output:
        p.outputs.append(ref(o.name))
        p.output_names.append(o.name)
    p.captures = captured
    p.capture_slots = [p.slots[c] for c in captured]
    over = {p.slots[n] for n in overridable if n in p.slots}
    _fold_constants(p, over)
    for st in p.steps:
        st.node.const_ins = tuple(s >= 0 and s in p.consts and s not in over for s in st.ins)
    graph_outputs = {p.slots[o.name] for o in graph.output if o.name in p.slots}
    if fuse_qdq:
        _fuse_qdq(p, graph_outputs | set(p.capture_slots), set(p.consts) - over)
    _fuse_activations(p, graph_outputs)
    p.fused += fuse_stacked_lstm(p, graph_outputs)  # LSTM -> Squeeze -> LSTM: one wavefront step
    if fuse:
        p.fused_elementwise = fuse_elementwise(p, graph_outputs | set(p.capture_slots), set(p.consts) - over)
    _compute_release(p)
    _mirror_small_consts(p)
    return p


HOST_MIRROR_MAX = 4096  # elements: constants up to this size also keep a host copy


def _mirror_small_consts(p: Program) -> None:
    """Host copies of small constants (shapes, axes, pads, scalars), made at load: a kernel that
    reads one on the host (``xp.to_host``/``host_ints``) then never waits for the device."""
    small = [v for v in p.consts.values() if getattr(v, "size", HOST_MIRROR_MAX + 1) <= HOST_MIRROR_MAX]
    if small:
        keys = register_host(small)
        weakref.finalize(p, unregister_host, keys)


def _compute_release(p: Program) -> None:
    # last use of every slot; graph outputs and constants are never released
    keep = set(p.outputs) | set(p.consts)
    last = {}
    for i, st in enumerate(p.steps):
        for s in st.ins:
            if s >= 0:
                last[s] = i
        for s in st.outs:
            if s >= 0:
                last.setdefault(s, i)
    p.release = [[] for _ in p.steps]
    for s, i in last.items():
        if s not in keep:
            p.release[i].append(s)


_FUSABLE = {"Conv"}


def step_readers(p: Program) -> dict[int, list[int]]:
    """slot -> indices of the steps that read it."""
    readers: dict[int, list[int]] = {}
    for i, st in enumerate(p.steps):
        for s in st.ins:
            if s >= 0:
                readers.setdefault(s, []).append(i)
    return readers


def _fuse_activations(p: Program, graph_outputs: set[int]) -> None:
    """Conv followed by its only consumer Relu / Clip (constant bounds): the conv applies the
    activation in place on its output (on hot cache) and the activation step disappears."""
    readers = step_readers(p)
    drop = set()
    for i, st in enumerate(p.steps):
        if st.node.op_type not in _FUSABLE or st.node.domain or len(st.outs) != 1:
            continue
        out = st.outs[0]
        users = readers.get(out, [])
        if out < 0 or out in graph_outputs or len(users) != 1:
            continue
        act = p.steps[users[0]]
        post = None
        if act.node.op_type == "Relu" and act.ins == [out]:
            post = ("relu",)
        elif act.node.op_type == "Clip" and act.ins and act.ins[0] == out:
            bounds = []
            for k, key in ((1, "min"), (2, "max")):
                if k < len(act.ins) and act.ins[k] >= 0:
                    if act.ins[k] not in p.consts:
                        break
                    bounds.append(float(load_host(p.consts[act.ins[k]]).reshape(-1)[0]))
                else:
                    v = act.node.a(key)
                    bounds.append(None if v is None else float(v))
            else:
                post = ("clip", bounds[0], bounds[1])
        if post is None:
            continue
        st.node.post = post
        st.outs = list(act.outs)
        st.node.outputs = list(act.node.outputs)
        drop.add(users[0])
    # a conv's activation whose only reader is a stride-1 depthwise conv moves into that conv,
    # which applies it while copying its input into the padded image: one pass fewer (with
    # stride 2 the activation on strided phase copies measured slower than its own pass)
    for i, st in enumerate(p.steps):
        post = getattr(st.node, "post", None)
        if post is None or i in drop:
            continue
        users = readers.get(st.outs[0], [])
        if st.outs[0] in graph_outputs or len(users) != 1 or users[0] in drop:
            continue
        dw = p.steps[users[0]]
        w = p.consts.get(dw.ins[1]) if len(dw.ins) > 1 else None
        if dw.node.op_type != "Conv" or dw.node.domain or dw.ins[0] != st.outs[0] or st.outs[0] in dw.ins[1:] \
                or w is None or w.ndim != 4 or w.shape[1] != 1 or dw.node.a("group", 1) != w.shape[0] \
                or w.shape[0] < 2 or getattr(dw.node, "pre", None) is not None \
                or any(v != 1 for v in (dw.node.a("strides") or [1])):  # strided phase copies: slower
            continue
        dw.node.pre = post
        st.node.post = None
    # MatMul followed by its only reader adding/scaling by a constant that keeps the shape (the
    # bias of a linear layer, attention's 1/sqrt(d)): applied in place on the product
    for i, st in enumerate(p.steps):
        if st.node.op_type != "MatMul" or st.node.domain or len(st.outs) != 1 or len(st.ins) != 2 or i in drop:
            continue
        w = p.consts.get(st.ins[1])
        ops = []
        while True:
            out = st.outs[0]
            users = readers.get(out, [])
            if out < 0 or out in graph_outputs or len(users) != 1 or users[0] in drop:
                break
            nxt = p.steps[users[0]]
            op = _matmul_post(p, nxt, out, w)
            if op is None:
                break
            ops.append(op)
            st.outs = list(nxt.outs)
            st.node.outputs = list(nxt.node.outputs)
            drop.add(users[0])
        if ops:
            st.node.post_ops = tuple(ops)
    if drop:
        p.steps = [st for i, st in enumerate(p.steps) if i not in drop]
        p.fused = len(drop)


def _fuse_qdq(p: Program, keep: set[int], const: set[int]) -> None:
    """QuantizeLinear whose only reader is a DequantizeLinear with the same constant scale and
    zero point (per tensor or per axis, not blocked): one float step (``k_quant.fake_quant``)
    replaces both, at the QuantizeLinear's position, and the integer tensor is never made.
    Not fused: an integer output that is a graph output or has another reader, a scale that
    is not float32 > 0, an integer type other than (u)int8/(u)int16 (int32 bounds are not exact
    in float32), a DequantizeLinear asked for another output dtype."""
    readers = step_readers(p)
    drop = set()
    for i, st in enumerate(p.steps):
        pair = _qdq_pair(p, st, readers, keep, const)
        if pair is None:
            continue
        dq, scale, zp, dtype = pair
        q_fn, dq_fn, dq_consts = st.fn, dq.fn, [p.consts[s] for s in dq.ins[1:]]

        def fallback(ins, q_fn=q_fn, dq_fn=dq_fn, dq_consts=dq_consts):
            return dq_fn([q_fn(ins, None, None)] + dq_consts, None, None)

        n = st.node
        node = Node(FAKE_QUANT_OP, "", n.name or n.outputs[0], list(n.inputs), list(dq.node.outputs),
                    dict(n.attrs), n.opset)
        node.captures = []
        node.const_ins = getattr(n, "const_ins", ())
        node.members = [n, dq.node]
        fn = fake_quant(node, p.xp, scale, zp, dtype, fallback)
        p.steps[i] = Step(node, registry.Spec(build=None), fn, list(st.ins), list(dq.outs), st.index)
        drop.add(readers[st.outs[0]][0])
    if drop:
        p.steps = [st for i, st in enumerate(p.steps) if i not in drop]
    p.fused_qdq = len(drop)


def _qdq_pair(p: Program, st, readers, keep: set[int], const: set[int]):
    """(DequantizeLinear step, scale, zero point or None, integer dtype) when ``st`` fuses."""
    n = st.node
    if n.op_type != "QuantizeLinear" or n.domain or len(st.outs) != 1 or not 2 <= len(st.ins) <= 3:
        return None
    out = st.outs[0]
    users = readers.get(out, [])
    if out < 0 or out in keep or len(users) != 1:
        return None
    dq = p.steps[users[0]]
    d = dq.node
    if d.op_type != "DequantizeLinear" or d.domain or len(dq.ins) != len(st.ins) or dq.ins[0] != out \
            or out in dq.ins[1:] or len(dq.outs) != 1 or dq.outs[0] < 0:
        return None
    if n.a("block_size", 0) or d.a("block_size", 0) or d.a("output_dtype", 0) not in (0, onnx.TensorProto.FLOAT):
        return None
    if any(s < 0 or s not in const for s in st.ins[1:] + dq.ins[1:]):
        return None
    qs, ds = p.consts[st.ins[1]], p.consts[dq.ins[1]]
    hs = load_host(qs)
    if hs.dtype != np.float32 or not _same(hs, load_host(ds)) or not (np.isfinite(hs).all() and (hs > 0).all()):
        return None
    if hs.size > 1 and (hs.ndim != 1 or n.a("axis", 1) != d.a("axis", 1)):
        return None
    zp = None
    if len(st.ins) == 3:
        zp = p.consts[st.ins[2]]
        hz = load_host(zp)
        if not _same(hz, load_host(p.consts[dq.ins[2]])) or hz.size != hs.size:
            return None
        dtype = hz.dtype
    else:
        out_dt = n.a("output_dtype", 0)
        try:
            dtype = registry.np_dtype(out_dt) if out_dt else np.dtype(np.uint8)
        except Exception:
            return None
    if dtype.type not in FAKE_QUANT_TYPES:
        return None
    return dq, qs, zp, dtype


def _same(a, b) -> bool:
    b = np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


_MATMUL_POST = {"Add": "add", "Mul": "multiply", "Sub": "subtract", "Div": "divide"}


def _matmul_post(p: Program, st, out: int, w):
    """(ufunc name, constant) when step ``st`` is ``out (op) c`` (or ``c + out``, ``c * out``)
    with a float constant ``c`` that broadcasts without changing ``out``'s shape: a 0-d value, or
    a row vector over the columns of a constant 2-D weight ``w`` (of ``c``'s dtype)."""
    n = st.node
    if n.domain or n.op_type not in _MATMUL_POST or len(st.ins) != 2 or len(st.outs) != 1 or st.outs[0] < 0:
        return None
    if st.ins[0] == out and st.ins[1] != out:
        c = p.consts.get(st.ins[1])
    elif st.ins[1] == out and st.ins[0] != out and n.op_type in ("Add", "Mul"):
        c = p.consts.get(st.ins[0])
    else:
        return None
    if c is None or not hasattr(c, "dtype") or c.dtype.kind != "f" or (w is not None and c.dtype != w.dtype):
        return None
    if c.ndim == 0 or (c.ndim == 1 and w is not None and w.ndim == 2 and c.shape[0] == w.shape[1]):
        return (_MATMUL_POST[n.op_type], c)
    return None



_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}


def _fold_constants(p: Program, overridable: set[int]) -> None:
    """Run once, at load, every step whose inputs are all initializers or folded values
    (e.g. the ConstantOfShape weights of onnx's light models), as ORT's constant folding does."""
    const = set(p.consts) - overridable
    kept = []
    for st in p.steps:
        if st.node.op_type in _NONDETERMINISTIC or st.node.subgraphs or st.node.captures \
                or not all(s >= 0 and s in const for s in st.ins):
            kept.append(st)
            continue
        res = st.fn([p.consts[s] for s in st.ins], None, None)
        if type(res) is not list and type(res) is not tuple:
            res = (res,)
        if any(s >= 0 and (r is None or isinstance(r, list)) for s, r in zip(st.outs, res)):
            kept.append(st)  # a sequence or an optional: made at run time, never a constant
            continue
        for s, r in zip(st.outs, res):
            if s >= 0:
                p.consts[s] = r if isinstance(r, p.xp.ndarray) or is_host_object(r) else p.xp.asarray(r)  # a scalar
                const.add(s)
    p.folded = len(p.steps) - len(kept)
    p.steps = kept

