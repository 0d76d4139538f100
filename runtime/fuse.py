"""Elementwise fusion: chains and trees of broadcasting elementwise steps become one step.

A load-time pass over a compiled ``Program`` (``fuse_elementwise``, called by
``compile_graph``). A step joins the step that reads its output when that output is read by
that one step only, is not a graph output, and both ops are in ``OPS``; the groups are trees
(every intermediate has one reader), rooted at the step whose output leaves the group. The
fused step runs at the root's position: its inputs are computed earlier than any member, and
no one else reads the intermediates, so the move keeps the meaning.

Backends, chosen per dtype signature of the fused step's inputs (checked at run time, since
dtypes are known only then):
- CuPy: one ``cupy.ElementwiseKernel`` whose body is generated from the tree (one C++
  statement per member, temporaries in registers, scalar constants inlined as literals;
  ``cuda_source`` gives the text). The body is written with function calls, arithmetic and
  functional casts only, so it is also valid Python: the tests evaluate it with NumPy.
- NumPy: the members' ufuncs with ``out=``, intermediates kept in the output buffer where the
  shape allows (a chain runs in place, on hot cache) and in the step's workspace otherwise.
- Any other signature (integer arithmetic, float16 on CuPy, mixed dtypes): the members' own
  kernels one after another, exactly as unfused.

Values computed from shapes only (Shape/Size and arithmetic on them) are not fused: the
session computes them once per input signature and never runs those steps again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from opc.runtime import registry
from opc.runtime.arena import align
from opc.runtime.registry import Node
from opc.runtime.xp import is_numpy, load_host

FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
FUSED_OP = "FusedElementwise"
MAX_SIGNATURES = 32  # per fused step; a session sees one or two input signatures


# -- what can be fused ----------------------------------------------------------------

# op -> number of value inputs (None: checked by _arity)
OPS = {
    "Add": 2, "Sub": 2, "Mul": 2, "Div": 2, "Pow": 2, "Max": 2, "Min": 2,
    "Relu": 1, "LeakyRelu": 1, "Sigmoid": 1, "Tanh": 1, "Erf": 1, "Exp": 1, "Log": 1, "Sqrt": 1,
    "Neg": 1, "Abs": 1, "Reciprocal": 1, "Floor": 1, "Ceil": 1, "Sin": 1, "Cos": 1,
    "HardSigmoid": 1, "HardSwish": 1, "Clip": None, "Cast": 1, "Where": 3,
}


def _candidate(st) -> bool:
    n = st.node
    if n.domain or n.op_type not in OPS or n.subgraphs or getattr(n, "captures", None):
        return False
    if len(st.outs) != 1 or st.outs[0] < 0 or any(s < 0 for s in st.ins):
        return False
    want = OPS[n.op_type]
    if want is None:  # Clip: x, optional min, optional max (an omitted middle one is -1: refused above)
        return 1 <= len(st.ins) <= 3
    if n.op_type == "Cast":
        to = n.a("to")
        try:
            return len(st.ins) == 1 and registry.np_dtype(to) in FLOATS
        except Exception:
            return False
    return len(st.ins) == want


# -- the tree of one fused step -----------------------------------------------------------

@dataclass
class Member:
    op: str
    node: Node
    fn: object  # the member's own kernel (the fallback)
    args: list  # ("x", k) external input k | ("t", j) member j | ("c", array) scalar constant
    outs_slot: int


@dataclass
class Group:
    members: list[Member]  # topological order; the last is the root
    n_ext: int
    names: list[str]  # external input names (for messages)
    cache: dict = field(default_factory=dict)  # signature -> executor


def fuse_elementwise(p, graph_outputs: set[int], const_slots: set[int]) -> int:
    """Fuse in place; return the number of steps that disappeared. ``const_slots``: slots whose
    value is fixed at load (scalars among them are inlined into the fused code)."""
    readers: dict[int, set[int]] = {}
    for i, st in enumerate(p.steps):
        for s in st.ins:
            if s >= 0:
                readers.setdefault(s, set()).add(i)
    shape_only = _shape_derived(p, const_slots)
    cand = [_candidate(st) and st.outs[0] not in shape_only for st in p.steps]
    parent: dict[int, int] = {}
    for i, st in enumerate(p.steps):
        if not cand[i]:
            continue
        s = st.outs[0]
        r = readers.get(s, set())
        if s in graph_outputs or len(r) != 1:
            continue
        (j,) = r
        if j > i and cand[j]:
            parent[i] = j
    if not parent:
        return 0
    children: dict[int, list[int]] = {}
    for i, j in parent.items():
        children.setdefault(j, []).append(i)
    roots = [j for j in children if j not in parent]
    replace: dict[int, object] = {}
    drop: set[int] = set()
    for r in roots:
        tree = []

        def collect(i):
            for c in children.get(i, ()):
                collect(c)
            tree.append(i)
        collect(r)
        tree.sort()  # step order is a topological order
        replace[r] = _make_step(p, [p.steps[i] for i in tree], const_slots)
        drop.update(i for i in tree if i != r)
    p.steps = [replace.get(i, st) for i, st in enumerate(p.steps) if i not in drop]
    return len(drop)


def _shape_derived(p, const_slots) -> set[int]:
    """Slots computed from input shapes and constants only (not worth fusing: the session
    resolves them once per signature)."""
    known = set(const_slots)
    derived = set()
    for st in p.steps:
        if st.node.op_type in ("Shape", "Size") and not st.node.domain or \
                (st.ins and all(s < 0 or s in known for s in st.ins)):
            for s in st.outs:
                if s >= 0:
                    known.add(s)
                    derived.add(s)
    return derived


def _make_step(p, steps, const_slots):
    from opc.runtime.program import Step  # program imports this module

    index = {st.outs[0]: k for k, st in enumerate(steps)}
    ext: list[int] = []
    members = []
    for st in steps:
        args = []
        for s in st.ins:
            if s in index:
                args.append(("t", index[s]))
            elif s in const_slots and getattr(p.consts[s], "size", 0) == 1:
                args.append(("c", p.consts[s]))
            else:
                if s not in ext:
                    ext.append(s)
                args.append(("x", ext.index(s)))
        members.append(Member(st.node.op_type, st.node, st.fn, args, st.outs[0]))
    root = steps[-1]
    names = [p.names[s] for s in ext]
    label = "+".join(m.op for m in members)
    node = Node(FUSED_OP, "", f"{root.node.name or root.node.outputs[0]} [{label}]", names,
                list(root.node.outputs), {}, root.node.opset)
    node.captures = []
    node.const_ins = tuple(False for _ in ext)
    node.members = [st.node for st in steps]
    group = Group(members, len(ext), names)
    # scratch for the NumPy executor's smaller intermediates; a CUDA kernel keeps them in registers
    ws = (lambda nd, shapes, dtypes: workspace_bytes(group, shapes, dtypes)) if is_numpy(p.xp) else None
    spec = registry.Spec(build=None, workspace=ws)
    fn = make_runner(group, p.xp)
    node.group = group
    return Step(node, spec, fn, ext, list(root.outs), root.index)


# -- dtype signature ------------------------------------------------------------------

def infer(group: Group, dtypes) -> list | None:
    """Output dtype of every member for these external dtypes, or None when the signature is
    not one the fused code handles (then the members' own kernels run)."""
    out = []

    def dt(a):
        kind, v = a
        if kind == "x":
            return np.dtype(dtypes[v])
        if kind == "t":
            return out[v]
        return np.dtype(v.dtype)

    for m in group.members:
        ds = [dt(a) for a in m.args]
        if m.op == "Where":
            if ds[0] != np.dtype(bool) or ds[1] not in FLOATS or ds[1] != ds[2]:
                return None
            out.append(ds[1])
            continue
        if ds[0] not in FLOATS:
            return None
        if m.op == "Pow":
            if ds[1].kind not in "fiu":
                return None
        elif any(d != ds[0] for d in ds[1:]):
            return None
        out.append(registry.np_dtype(m.node.a("to")) if m.op == "Cast" else ds[0])
    return out


def _signature_ok_for_cuda(dtypes_out, ext_dtypes) -> bool:
    # float16 has no arithmetic in plain C++: those signatures run unfused
    return all(d != np.float16 for d in dtypes_out) and all(np.dtype(d) != np.float16 for d in ext_dtypes)


# -- CUDA source ------------------------------------------------------------------------

CUDA_PREAMBLE = r"""
template <typename T> __device__ __forceinline__ T opc_max(T a, T b) { return (a > b || a != a) ? a : b; }
template <typename T> __device__ __forceinline__ T opc_min(T a, T b) { return (a < b || a != a) ? a : b; }
template <typename T> __device__ __forceinline__ T opc_where(bool c, T a, T b) { return c ? a : b; }
template <typename T> __device__ __forceinline__ T opc_leaky(T x, T alpha) { return x >= T(0) ? x : x * alpha; }
__device__ __forceinline__ double opc_inf() { return __longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ double opc_nan() { return __longlong_as_double(0x7ff8000000000000LL); }
"""

_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(bool): "bool"}
_CUPY_TYPE = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(bool): "bool",
              np.dtype(np.int64): "int64", np.dtype(np.int32): "int32"}
# op -> CUDA expression: {0}, {1}, {2} are the operands, {ct} the member's C type. Ops with
# attributes (LeakyRelu, HardSigmoid, Clip) are written in _cuda_expr.
_EXPR_C = {
    "Add": "({0} + {1})", "Sub": "({0} - {1})", "Mul": "({0} * {1})", "Div": "({0} / {1})",
    "Pow": "pow({0}, {ct}({1}))", "Max": "opc_max({0}, {1})", "Min": "opc_min({0}, {1})",
    "Tanh": "tanh({0})", "Erf": "erf({0})", "Exp": "exp({0})", "Log": "log({0})",
    "Sqrt": "sqrt({0})", "Abs": "fabs({0})", "Floor": "floor({0})", "Ceil": "ceil({0})",
    "Sin": "sin({0})", "Cos": "cos({0})",
    "Relu": "opc_max({0}, {ct}(0))", "Neg": "(-{0})", "Reciprocal": "({ct}(1) / {0})",
    "Sigmoid": "({ct}(1) / ({ct}(1) + exp(-{0})))",
    "HardSwish": "({0} * opc_min(opc_max({0} / {ct}(6) + {ct}(0.5), {ct}(0)), {ct}(1)))",
    "Cast": "{ct}({0})", "Where": "opc_where({0}, {1}, {2})",
}


def literal(v: float, ct: str) -> str:
    v = float(v)
    if math.isnan(v):
        return f"{ct}(opc_nan())"
    if math.isinf(v):
        return f"{ct}({'-' if v < 0 else ''}opc_inf())"
    return f"{ct}({v!r})"


def cuda_source(group: Group, ext_dtypes) -> tuple[str, str, str] | None:
    """(in_params, out_params, operation) of the ElementwiseKernel for these input dtypes, or
    None when the signature runs unfused. Inputs are ``x0, x1, ...``; the output is ``y``."""
    outs = infer(group, ext_dtypes)
    if outs is None or not _signature_ok_for_cuda(outs, ext_dtypes):
        return None
    ext_dtypes = [np.dtype(d) for d in ext_dtypes]
    if any(d not in _CUPY_TYPE for d in ext_dtypes):
        return None
    lines = []
    for j, m in enumerate(group.members):
        ct = _CTYPE[outs[j]]

        def a(k, ct=ct):
            kind, v = m.args[k]
            if kind == "x":
                return f"x{v}"
            if kind == "t":
                return f"t{v}"
            return literal(load_host(v).reshape(-1)[0], ct)
        lines.append(f"const {ct} t{j} = {_cuda_expr(m, a, ct)};")
    lines.append(f"y = t{len(group.members) - 1};")
    in_params = ", ".join(f"{_CUPY_TYPE[d]} x{k}" for k, d in enumerate(ext_dtypes))
    out_params = f"{_CUPY_TYPE[outs[-1]]} y"
    return in_params, out_params, "\n".join(lines)


def _cuda_expr(m: Member, a, ct: str) -> str:
    op = m.op
    if op in _EXPR_C:
        return _EXPR_C[op].format(*(a(k) for k in range(len(m.args))), ct=ct)
    if op == "LeakyRelu":
        return f"opc_leaky({a(0)}, {literal(m.node.a('alpha', 0.01), ct)})"
    if op == "HardSigmoid":
        alpha, beta = literal(m.node.a("alpha", 0.2), ct), literal(m.node.a("beta", 0.5), ct)
        return f"opc_min(opc_max({a(0)} * {alpha} + {beta}, {ct}(0)), {ct}(1))"
    if op == "Clip":
        x = a(0)
        for k, key, f in ((1, "min", "opc_max"), (2, "max", "opc_min")):
            if k < len(m.args):
                x = f"{f}({x}, {a(k)})"
            elif m.node.a(key) is not None:
                x = f"{f}({x}, {literal(m.node.a(key), ct)})"
        return x
    raise AssertionError(op)



# -- NumPy executor ---------------------------------------------------------------------

def _np_shapes(group: Group, shapes) -> list[tuple]:
    from opc.runtime.k_elementwise import broadcast_shapes

    out = []
    for m in group.members:
        ss = []
        for kind, v in m.args:
            ss.append(tuple(shapes[v]) if kind == "x" else out[v] if kind == "t" else tuple(v.shape))
        out.append(broadcast_shapes(*ss))
    return out


@dataclass
class NpPlan:
    shapes: list
    dtypes: list
    where: list  # per member: "out" | ("ws", k) scratch buffer k | "new" (fresh, the root only)
    buffers: list  # (shape, dtype) per scratch buffer
    offsets: list
    ws_bytes: int


def np_plan(group: Group, shapes, dtypes, out_usable: bool) -> NpPlan | None:
    """Buffer assignment: a member writes into a buffer of its shape and dtype freed by one of
    its inputs (in place) or by earlier members, the output buffer first; the root writes the
    output. Every intermediate has one reader, so a buffer frees when that reader runs."""
    outs = infer(group, dtypes)
    if outs is None:
        return None
    shp = _np_shapes(group, shapes)
    n = len(group.members)
    root_key = (shp[-1], outs[-1])
    free: dict = {}
    if out_usable:
        free.setdefault(root_key, []).append("out")
    where, buffers = [None] * n, []
    for j, m in enumerate(group.members):
        key = (shp[j], outs[j])
        mine = []
        for kind, v in m.args:
            if kind == "t" and where[v] != "new":
                k2 = (shp[v], outs[v])
                if where[v] not in free.get(k2, []):
                    free.setdefault(k2, []).append(where[v])
                if k2 == key:
                    mine.append(where[v])
        if j == n - 1:
            where[j] = "out" if out_usable else "new"
            continue
        pool = free.get(key, [])
        pick = next((b for b in mine if b in pool), None)
        if pick is None and pool:
            pick = "out" if "out" in pool else pool[0]
        if pick is None:
            pick = ("ws", len(buffers))
            buffers.append(key)
        else:
            pool.remove(pick)
        where[j] = pick
    offsets, total = [], 0
    for shape, dt in buffers:
        offsets.append(total)
        total += align(int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
    return NpPlan(shp, outs, where, buffers, offsets, total)


def workspace_bytes(group: Group, shapes, dtypes) -> int:
    if any(s is None for s in shapes) or any(d is None for d in dtypes):
        return 0
    try:
        plan = np_plan(group, shapes, dtypes, out_usable=True)
    except Exception:  # shapes that do not broadcast: the kernel reports it at run time
        return 0
    return plan.ws_bytes if plan is not None else 0


def _np_op(xp, m: Member, args, o):
    """Member ``m`` on NumPy, written into ``o`` (which may be one of ``args``); the same ufuncs
    as the member's own kernel, so results match it bit for bit."""
    op = m.op
    x = args[0]
    if op in _NP_BINARY:
        return getattr(xp, _NP_BINARY[op])(x, args[1], out=o)
    if op in _NP_UNARY:
        return getattr(xp, _NP_UNARY[op])(x, out=o)
    if op == "Pow":
        b = args[1]
        return xp.power(x, b.astype(x.dtype) if b.dtype != x.dtype else b, out=o)
    if op == "Relu":
        return xp.maximum(x, x.dtype.type(0), out=o)
    if op == "Sigmoid":
        xp.negative(x, out=o)
        xp.exp(o, out=o)
        xp.add(o, o.dtype.type(1), out=o)
        return xp.reciprocal(o, out=o)
    if op == "Erf":
        if x.dtype == np.float32 and o.dtype == np.float32:
            from opc.runtime.k_elementwise import erf_f32

            return erf_f32(x, o)
        erf = _np_erf()
        if erf is not None:
            return erf(x, out=o)
    if op == "Clip":
        y = x
        for k, key, f in ((1, "min", xp.maximum), (2, "max", xp.minimum)):
            b = args[k] if k < len(args) else m.node.a(key)
            if b is not None:
                y = f(y, xp.asarray(b, dtype=x.dtype), out=o)
        if y is x:
            xp.copyto(o, x)
        return o
    if op == "Cast":
        xp.copyto(o, x, casting="unsafe")
        return o
    if op == "HardSigmoid":
        xp.multiply(x, x.dtype.type(m.node.a("alpha", 0.2)), out=o)
        xp.add(o, x.dtype.type(m.node.a("beta", 0.5)), out=o)
        xp.maximum(o, 0, out=o)
        return xp.minimum(o, 1, out=o)
    # the member's own kernel for the rest (LeakyRelu, HardSwish, Where, Erf without scipy)
    r = m.fn(list(args), None, None)
    xp.copyto(o, r)
    return o


_NP_BINARY = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Div": "divide", "Max": "maximum",
              "Min": "minimum"}
_NP_UNARY = {"Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Abs": "absolute", "Neg": "negative",
             "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil", "Sin": "sin", "Cos": "cos"}
_ERF = []


def _np_erf():
    if not _ERF:
        try:
            from scipy.special import erf
        except Exception:
            erf = None
        _ERF.append(erf)
    return _ERF[0]


def _overlaps(xp, a, ins) -> bool:
    return any(x is not None and x.size and xp.may_share_memory(a, x) for x in ins)


def make_runner(group: Group, xp):
    """The fused step's ``run(ins, outs, ws)``."""
    members = group.members
    root = len(members) - 1

    def fallback(ins, outs, ws):
        vals = []
        for j, m in enumerate(members):
            args = [ins[v] if kind == "x" else vals[v] if kind == "t" else v for kind, v in m.args]
            r = m.fn(args, outs if j == root else None, None)
            if isinstance(r, (list, tuple)):
                r = r[0]
            vals.append(r)
        return vals[-1]

    if not is_numpy(xp):
        return _cupy_runner(group, xp, fallback)

    cache = group.cache
    views: dict = {}  # (id of the workspace, signature) -> scratch views (the arena's views persist)

    def run(ins, outs, ws):
        key = tuple([(x.shape, x.dtype) for x in ins])
        plan = cache.get(key, False)
        if plan is False:
            try:
                plan = np_plan(group, [x.shape for x in ins], [x.dtype for x in ins], out_usable=True)
            except ValueError:  # not broadcastable: let the member kernel say so
                plan = None
            if len(cache) >= MAX_SIGNATURES:
                cache.clear()
                views.clear()
            cache[key] = plan
        if plan is None:
            return fallback(ins, outs, ws)
        o = outs[0] if outs is not None else None
        if o is None or o.shape != plan.shapes[-1] or o.dtype != plan.dtypes[-1] or _overlaps(xp, o, ins) or \
                (plan.ws_bytes and (ws is None or ws.size < plan.ws_bytes)):
            # no output view (tracing, subgraphs) or one over an input: fresh buffers throughout
            plan = np_plan(group, [x.shape for x in ins], [x.dtype for x in ins], out_usable=False)
            bufs = [xp.empty(s, d) for s, d in plan.buffers]
            o = xp.empty(plan.shapes[-1], plan.dtypes[-1])
        elif plan.buffers:
            vkey = (id(ws), key)
            bufs = views.get(vkey)
            if bufs is None or bufs[0] is not ws:
                bufs = views[vkey] = [ws] + [
                    ws[off:off + int(np.prod(s, dtype=np.int64)) * d.itemsize].view(d).reshape(s)
                    for off, (s, d) in zip(plan.offsets, plan.buffers)]
            bufs = bufs[1:]
        else:
            bufs = ()
        vals = [None] * len(members)
        for j, m in enumerate(members):
            w = plan.where[j]
            dst = o if w == "out" or w == "new" else bufs[w[1]]
            vals[j] = _np_op(xp, m, [ins[v] if kind == "x" else vals[v] if kind == "t" else v for kind, v in m.args],
                             dst)
        return vals[-1]
    return run


def _cupy_runner(group: Group, xp, fallback):
    cache = group.cache

    from opc.runtime.k_elementwise import broadcast_shapes

    # the inlined scalar constants still take part in broadcasting: a (1, 1, 1) constant makes
    # the output 3-D even when every input is 2-D, so the output shape counts them
    const_shapes = [tuple(v.shape) for m in group.members for kind, v in m.args if kind == "c"]

    def run(ins, outs, ws):
        key = tuple(x.dtype for x in ins)
        hit = cache.get(key)
        if hit is None:
            src = cuda_source(group, key)
            kern = None if src is None else xp.ElementwiseKernel(
                src[0], src[1], src[2], "opc_fused", preamble=CUDA_PREAMBLE)
            hit = cache[key] = (kern, infer(group, key))
        kern, dtypes = hit
        if kern is None:
            return fallback(ins, outs, ws)
        shape = broadcast_shapes(*[x.shape for x in ins], *const_shapes)
        o = outs[0] if outs is not None else None
        # ElementwiseKernel broadcasts inputs and outputs together and, unlike CuPy's ufuncs, does
        # not copy an input that overlaps the output: an output over an input is safe only when it
        # is that very input's memory read at the same index (same address, shape and strides)
        if o is None or o.dtype != dtypes[-1] or tuple(o.shape) != shape or _unsafe_alias(o, ins):
            o = xp.empty(shape, dtypes[-1])
        return kern(*ins, o)
    return run


def _byte_span(a) -> tuple[int, int]:
    """[lo, hi) of the bytes ``a`` can touch, from its metadata only (no device access)."""
    from opc.runtime.xp import data_ptr

    lo = hi = data_ptr(a)
    for n, st in zip(a.shape, a.strides):
        if n == 0:
            return lo, lo
        if st < 0:
            lo += (n - 1) * st
        else:
            hi += (n - 1) * st
    return lo, hi + a.dtype.itemsize


def _unsafe_alias(o, ins) -> bool:
    olo, ohi = _byte_span(o)
    for x in ins:
        if not getattr(x, "size", 0) or olo >= ohi:
            continue
        lo, hi = _byte_span(x)
        if lo < ohi and olo < hi and not (lo == olo and x.shape == o.shape and x.strides == o.strides):
            return True
    return False
