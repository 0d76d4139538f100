"""opc.memory: lifetimes, aliasing, in-place, workspaces, strategies, checker, storage."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opc.ir import load_model, save_model, set_metadata
from opc.memory import (
    META_KEY, MemoryPlan, PlanError, Slot, _Buffer, assign_offsets, check_slots, graph_fingerprint,
    load_plan, load_plan_with_reason, no_workspace, plan_model, store_plan,
)

A = 256  # alignment


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'

# x -> a -> b -> c -> y: each a float[1,1024] (4096 bytes), Softmax is not element-wise
CHAIN = HEADER + """
chain (float[1,1024] x) => (float[1,1024] y) {
  a = Softmax(x)
  b = Softmax(a)
  c = Softmax(b)
  y = Softmax(c)
}
"""

# a feeds two branches that meet in an Add, which writes in place over b
DIAMOND = HEADER + """
diamond (float[1,1024] x) => (float[1,1024] y) {
  a = Softmax(x)
  b = Softmax(a)
  c = LogSoftmax(a)
  d = Add(b, c)
  y = Softmax(d)
}
"""

SIZE = 4096


def test_chain_reaches_the_lower_bound():
    plan = plan_model(parse(CHAIN), workspace_fn=no_workspace)
    plan.check()
    assert set(plan.tensors) == {"a", "b", "c"}  # x is a graph input, y a graph output
    assert plan.lower_bound == 2 * SIZE  # the input and output of one step
    assert plan.arena_size == plan.lower_bound
    assert plan.naive_total == 3 * SIZE
    a, b, c = (plan.tensors[n] for n in "abc")
    assert (a.first_use, a.last_use, b.first_use, b.last_use, c.first_use, c.last_use) == (0, 1, 1, 2, 2, 3)
    assert a.offset == c.offset != b.offset  # a's bytes are reused by c
    assert all(s.alias_of is None and s.kind == "tensor" for s in plan.tensors.values())
    assert (a.shape, a.dtype, a.size) == ((1, 1024), "float32", SIZE)
    assert plan.order == [0, 1, 2, 3]
    assert plan.live_bytes == [SIZE, 2 * SIZE, 2 * SIZE, SIZE]


def test_diamond_reaches_the_lower_bound_with_in_place_add():
    plan = plan_model(parse(DIAMOND), workspace_fn=no_workspace)
    plan.check()
    d = plan.tensors["d"]
    assert (d.alias_of, d.kind, d.offset) == ("b", "inplace", plan.tensors["b"].offset)
    assert plan.lower_bound == 3 * SIZE  # a, b and c alive when c is computed
    assert plan.arena_size == plan.lower_bound
    assert plan.naive_total == 4 * SIZE


def test_views_alias_arena_tensors_only():
    model = parse(HEADER + """
views (float[2,512] x) => (float[1,1024] y, float[4,256] z)
    <int64[1] zero = {0}, int64[2] four = {4, 256}, int64[2] s = {1, 1024}> {
  r = Reshape(x, s)
  a = Softmax(x)
  f = Flatten<axis = 0>(a)
  u = Unsqueeze(f, zero)
  q = Squeeze(u, zero)
  i = Identity(q)
  t = Softmax(i)
  y = Add(r, t)
  z = Reshape(a, four)
}
""")
    plan = plan_model(model, workspace_fn=no_workspace)
    plan.check()
    ts = plan.tensors
    assert set(ts) == {"r", "a", "f", "u", "q", "i", "t"}  # y, z: graph outputs
    assert ts["r"].alias_of is None  # a view of a graph input gets its own bytes
    for name in ("f", "u", "q", "i"):
        assert (ts[name].alias_of, ts[name].kind, ts[name].offset) == ("a", "view", ts["a"].offset)
    assert (ts["f"].shape, ts["u"].shape, ts["q"].shape) == ((1, 1024), (1, 1, 1024), (1, 1024))
    assert ts["a"].last_use == 8  # read again by the Reshape to the output z
    assert ts["t"].offset != ts["a"].offset  # so t cannot take a's bytes
    assert plan.lower_bound == 3 * SIZE and plan.arena_size == plan.lower_bound


def test_in_place_only_when_the_input_dies_and_sizes_match():
    model = parse(HEADER + """
inplace (float[4,256] x, float[1,256] w) => (float[4,256] y) {
  a = Softmax(x)
  r = Relu(a)
  b = Softmax(r)
  c = Add(w, b)
  d = Sigmoid(a)
  e = Mul(c, d)
  y = Softmax(e)
}
""")
    plan = plan_model(model, workspace_fn=no_workspace)
    plan.check()
    ts = plan.tensors
    assert ts["r"].alias_of is None  # a is still read by Sigmoid later
    assert (ts["c"].alias_of, ts["c"].kind) == ("b", "inplace")  # w broadcasts: c takes b's bytes
    assert (ts["d"].alias_of, ts["d"].kind) == ("a", "inplace")  # a dies at Sigmoid
    assert ts["e"].alias_of == "b"  # first input that dies with the same size (c, which is b's)
    assert plan.arena_size == plan.lower_bound


def test_in_place_needs_the_same_dtype():
    model = parse(HEADER + """
cmp (float[1,1024] x) => (bool[1,1024] y) {
  a = Softmax(x)
  b = Softmax(x)
  e = Equal(a, b)
  y = Not(e)
}
""")
    plan = plan_model(model, workspace_fn=no_workspace)
    assert plan.tensors["e"].alias_of is None and plan.tensors["e"].size == 1024


def test_workspaces_are_one_step_slots_in_the_bound():
    def ws(node, shapes, dtypes):
        assert shapes == [(1, 1024)] and dtypes == ["float32"]
        return 1000 if node.op_type == "Softmax" and node.output[0] == "b" else 0

    plan = plan_model(parse(CHAIN), workspace_fn=ws)
    plan.check()
    assert list(plan.workspaces) == [1]
    w = plan.workspaces[1]
    assert (w.first_use, w.last_use, w.size, w.kind) == (1, 1, 1000, "workspace")
    assert plan.lower_bound == 2 * SIZE + 1024  # aligned to 256
    assert plan.arena_size == plan.lower_bound
    assert plan.naive_total == 3 * SIZE + 1024


def test_symbolic_dims_planned_as_one_or_as_given():
    text = HEADER + """
sym (float[N,1024] x) => (float[N,1024] y) {
  a = Softmax(x)
  y = Softmax(a)
}
"""
    plan1 = plan_model(parse(text), workspace_fn=no_workspace)
    assert plan1.input_shapes == {"x": (1, 1024)}
    assert any("planned as 1" in n and "x[N]" in n for n in plan1.notes)
    plan8 = plan_model(parse(text), {"x": (8, 1024)}, workspace_fn=no_workspace)
    assert plan8.tensors["a"].size == 8 * SIZE and not plan8.notes
    with pytest.raises(Exception, match="unknown inputs: z"):
        plan_model(parse(text), {"z": (1,)}, workspace_fn=no_workspace)


def test_data_dependent_shapes_come_from_onnx_runtime():
    model = parse(HEADER + """
nz (float[3,4] x) => (float[1,1] y) {
  p = Relu(x)
  i = NonZero(p)
  t = Transpose(i)
  c = Cast<to = 1>(t)
  y = ReduceSum<keepdims = 1>(c)
}
""")
    plan = plan_model(model, workspace_fn=no_workspace)
    plan.check()
    assert any("ONNX Runtime" in n for n in plan.notes)
    nnz = plan.tensors["i"].shape[1]
    assert plan.tensors["i"].shape == (2, nnz) and plan.tensors["t"].shape == (nnz, 2)
    assert plan.tensors["i"].size == 2 * nnz * 8


def test_subgraph_reads_keep_outer_tensors_alive():
    model = parse(HEADER + """
sub (float[1,1024] x, bool c) => (float[1,1024] y) {
  a = Softmax(x)
  b = Softmax(x)
  z = Softmax(b)
  y = If(c) <then_branch = t () => (float[1,1024] o) { o = Identity(a) },
              else_branch = e () => (float[1,1024] o) { o = Identity(z) }>
}
""")
    plan = plan_model(model, workspace_fn=no_workspace)
    plan.check()
    assert plan.tensors["a"].last_use == 3 and plan.tensors["z"].last_use == 3
    assert plan.lower_bound == 3 * SIZE


def test_reordering_lowers_the_peak_only_when_asked():
    # the file computes both big branches before consuming them; interleaving them is cheaper
    model = parse(HEADER + """
branches (float[1,1024] x) => (float[1,1] y) {
  a = Softmax(x)
  b = LogSoftmax(x)
  ra = ReduceSum<keepdims = 1>(a, one)
  rb = ReduceSum<keepdims = 1>(b, one)
  y = Add(ra, rb)
}
""".replace("(float[1,1024] x) => (float[1,1] y) {", "(float[1,1024] x) => (float[1,1] y) <int64[1] one = {1}> {"))
    plain = plan_model(model, workspace_fn=no_workspace)
    assert plain.order == [0, 1, 2, 3, 4] and plain.lower_bound == 2 * SIZE + 256
    better = plan_model(model, workspace_fn=no_workspace, reorder=True)
    better.check()
    assert better.order == [0, 2, 1, 3, 4]
    assert better.lower_bound == SIZE + 512 and better.arena_size == better.lower_bound
    assert any("reordered" in n for n in better.notes)
    again = plan_model(parse(CHAIN), workspace_fn=no_workspace, reorder=True)
    assert again.order == [0, 1, 2, 3]  # nothing to gain: the file's order stays


def test_light_models_reach_the_lower_bound(light_models):
    for path in light_models:
        model = onnx.load(str(path))
        plan = plan_model(model, workspace_fn=no_workspace, reorder=True, time_limit=2.0)
        plan.check()
        assert plan.arena_size == plan.lower_bound, (path.name, plan.arena_size, plan.lower_bound)
        assert plan.lower_bound <= plan.naive_total
        # views and in-place always share bytes with their root
        for s in plan.tensors.values():
            if s.alias_of:
                assert s.offset == plan.tensors[s.alias_of].offset


def test_json_round_trip_and_file_save_load(tmp_path):
    model = parse(DIAMOND)
    plan = plan_model(model, workspace_fn=lambda n, s, d: 300 if n.op_type == "Add" else 0)
    text = plan.to_json()
    assert " " not in text and "\n" not in text
    back = MemoryPlan.from_json(text)
    assert back.to_json() == text
    assert back.tensors == plan.tensors and back.workspaces == plan.workspaces
    assert list(back.workspaces) == [3]
    store_plan(model, plan)
    path = tmp_path / "m.onnx"
    save_model(model, path)
    loaded = load_model(path)
    again = load_plan(loaded)
    assert again is not None and again.arena_size == plan.arena_size and again.matches(loaded)
    again.check()
    # ONNX Runtime ignores the metadata and still runs the model
    from opc.ort import run_model, seeded_feeds

    out = run_model(loaded, seeded_feeds(loaded))
    assert out["y"].shape == (1, 1024)


@pytest.mark.parametrize("edit", ["attribute", "rewire", "new node", "input shape", "reorder"])
def test_stale_plan_is_detected(edit):
    model = parse(DIAMOND)
    store_plan(model, plan_model(model, workspace_fn=no_workspace))
    assert load_plan(model) is not None
    g = model.graph
    if edit == "attribute":
        g.node[0].attribute.add().CopyFrom(onnx.helper.make_attribute("axis", 0))
    elif edit == "rewire":
        g.node[3].input[1] = "b"
    elif edit == "new node":
        g.node.append(onnx.helper.make_node("Relu", ["d"], ["unused"]))
    elif edit == "input shape":
        g.input[0].type.tensor_type.shape.dim[1].dim_value = 2048
    elif edit == "reorder":
        n1, n2 = onnx.NodeProto(), onnx.NodeProto()
        n1.CopyFrom(g.node[1])
        n2.CopyFrom(g.node[2])
        g.node[1].CopyFrom(n2)
        g.node[2].CopyFrom(n1)
    plan, reason = load_plan_with_reason(model)
    assert plan is None and "does not match the graph" in reason
    assert load_plan(model) is None


def test_names_and_docs_do_not_change_the_fingerprint():
    model = parse(DIAMOND)
    fp = graph_fingerprint(model)
    model.graph.node[0].name = "renamed"
    model.graph.node[0].doc_string = "doc"
    set_metadata(model, {"other": "1"})
    assert graph_fingerprint(model) == fp


def test_missing_or_broken_plans_are_not_trusted():
    model = parse(DIAMOND)
    assert load_plan_with_reason(model) == (None, "the model holds no memory plan")
    set_metadata(model, {META_KEY: "{not json"})
    plan, reason = load_plan_with_reason(model)
    assert plan is None and "unreadable memory plan" in reason
    set_metadata(model, {META_KEY: '{"version": 99}'})
    assert "version" in load_plan_with_reason(model)[1]


# --- the checker ----------------------------------------------------------------------------
def _brute_force_conflict(slots):
    for (n1, a), (n2, b) in itertools.combinations(slots, 2):
        if a.size and b.size and a.first_use <= b.last_use and b.first_use <= a.last_use \
                and a.offset < b.offset + b.size and b.offset < a.offset + a.size:
            return True
    return False


slot_lists = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 6), st.integers(0, 16), st.integers(0, 8)),
    min_size=0, max_size=14,
).map(lambda xs: [(f"t{i}", Slot(off * A, size * A // 2, (size,), "uint8", None, s, s + d))
                  for i, (s, d, off, size) in enumerate(xs)])


@settings(max_examples=300, deadline=None)
@given(slot_lists)
def test_checker_agrees_with_brute_force(slots):
    conflict = _brute_force_conflict(slots)
    if conflict:
        with pytest.raises(PlanError, match="overlap"):
            check_slots(slots)
    else:
        check_slots(slots)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 8), st.integers(1, 40)), min_size=1, max_size=40),
       st.sampled_from([("size",), ("inorder",), ("breadth",), ("size", "inorder", "breadth", "search")]))
def test_every_strategy_gives_a_valid_plan(intervals, strategies):
    buffers = [_Buffer(f"t{i}", i, s, s + d, size * A, [f"t{i}"]) for i, (s, d, size) in enumerate(intervals)]
    steps = max(b.end for b in buffers) + 1
    live = [sum(b.size for b in buffers if b.start <= t <= b.end) for t in range(steps)]
    offsets, arena, _, results = assign_offsets(buffers, live, strategies, time_limit=0.02)
    slots = [(b.root, Slot(o, b.size, (), "uint8", None, b.start, b.end)) for b, o in zip(buffers, offsets)]
    check_slots(slots, arena)
    assert max(live) <= arena <= sum(b.size for b in buffers)
    assert arena == min(results.values())


def test_checker_catches_bad_aliases_and_layout():
    root = Slot(0, 512, (), "uint8", None, 0, 3)
    view = Slot(0, 512, (), "uint8", "r", 1, 5, "view")
    check_slots([("r", root), ("v", view)], 512)
    clobber = Slot(0, 512, (), "uint8", "r", 2, 4, "inplace")  # r and v still read later
    with pytest.raises(PlanError, match="written in place over"):
        check_slots([("r", root), ("v", view), ("w", clobber)])
    with pytest.raises(PlanError, match="not a multiple"):
        check_slots([("r", Slot(100, 4, (), "uint8", None, 0, 0))])
    with pytest.raises(PlanError, match="exceed the arena"):
        check_slots([("r", root)], 256)
    with pytest.raises(PlanError, match="does not sit on the bytes"):
        check_slots([("r", root), ("v", Slot(256, 256, (), "uint8", "r", 1, 1, "view"))])
    with pytest.raises(PlanError, match="unknown tensor"):
        check_slots([("v", view)])
    plan = plan_model(parse(CHAIN), workspace_fn=no_workspace)
    plan.tensors["c"].offset = plan.tensors["b"].offset  # b and c are both alive at step 2
    with pytest.raises(PlanError, match="'b' and 'c'|'c' and 'b'"):
        plan.check()


def test_random_graphs_give_valid_plans():
    rng = np.random.default_rng(0)
    for trial in range(25):
        lines, names = [], ["x"]
        for k in range(int(rng.integers(3, 14))):
            op = rng.choice(["Softmax", "Relu", "Add", "Reshape", "Sigmoid", "Mul"])
            a = names[int(rng.integers(len(names)))]
            if op in ("Add", "Mul"):
                b = names[int(rng.integers(len(names)))]
                lines.append(f"  v{k} = {op}({a}, {b})")
            elif op == "Reshape":
                lines.append(f"  v{k} = Reshape({a}, shp)")
            else:
                lines.append(f"  v{k} = {op}({a})")
            names.append(f"v{k}")
        lines.append(f"  y = Identity({names[-1]})")
        text = HEADER + "rnd (float[4,256] x) => (float[4,256] y) <int64[2] shp = {4, 256}> {\n" + "\n".join(lines) + "\n}\n"
        model = parse(text)
        ws = lambda n, s, d: 700 if n.op_type == "Softmax" else 0  # noqa: E731
        for reorder in (False, True):
            plan = plan_model(model, workspace_fn=ws, reorder=reorder, time_limit=0.05, seed=trial)
            plan.check()
            assert plan.lower_bound <= plan.arena_size <= plan.naive_total
            assert sorted(plan.order) == list(range(len(model.graph.node)))


def test_shape_arithmetic_is_folded_without_onnx_runtime():
    # pads computed from the input's shape through Cast/Div/Ceil, which onnx's data
    # propagation does not follow: the planner evaluates that small constant subgraph
    model = parse(HEADER + """
pad (float[N,3,8,8] x) => (float[N,3,11,11] out)
    <int64[1] two = {2}, float three = {3.0}, int64[6] z6 = {0, 0, 0, 0, 0, 0}, int64[1] ax = {0}> {
  s = Shape(x)
  h = Gather<axis = 0>(s, two)
  hf = Cast<to = 1>(h)
  q = Div(hf, three)
  c = Ceil(q)
  ci = Cast<to = 7>(c)
  pads = Concat<axis = 0>(z6, ci, ci)
  y = Pad(x, pads)
  r = Relu(y)
  out = Softmax(r)
}
""")
    plan = plan_model(model, {"x": (2, 3, 8, 8)}, workspace_fn=no_workspace)
    assert not any("ONNX Runtime" in n for n in plan.notes)
    assert plan.tensors["y"].shape == (2, 3, 11, 11) and plan.tensors["r"].alias_of == "y"
    # the shape arithmetic depends on the input, so it stays in the arena as ordinary tensors
    assert (plan.tensors["s"].shape, plan.tensors["pads"].shape, plan.tensors["pads"].dtype) == ((4,), (8,), "int64")
    plan.check()


def test_planned_shapes_match_onnx_runtime(light_models):
    from opc.memory import _fix_inputs
    from opc.ort import make_session, seeded_feeds

    path = next(p for p in light_models if "inception_v2" in p.name)
    model = onnx.load(str(path))
    plan = plan_model(model, workspace_fn=no_workspace)
    full, _, _ = _fix_inputs(model, plan.input_shapes)
    names = list(plan.tensors)
    del full.graph.output[:]
    for n in names:
        full.graph.output.add().name = n
    outs = make_session(full, threads=1, optimize=False).run(names, seeded_feeds(full, plan.input_shapes))
    for name, arr in zip(names, outs):
        assert (tuple(arr.shape), arr.nbytes) == (plan.tensors[name].shape, plan.tensors[name].size), name


def test_a_plan_for_other_input_shapes_is_not_used():
    text = HEADER + "sym (float[N,1024] x) => (float[N,1024] y) {\n  a = Softmax(x)\n  y = Softmax(a)\n}\n"
    model = parse(text)
    store_plan(model, plan_model(model, {"x": (4, 1024)}, workspace_fn=no_workspace))
    assert load_plan(model, {"x": (4, 1024)}) is not None
    plan, reason = load_plan_with_reason(model, {"x": [2, 1024]})
    assert plan is None and reason == "the stored memory plan is for other input shapes (x: [4, 1024])"


def test_the_runtime_workspace_function_is_used_and_guarded(monkeypatch):
    import types

    calls = []

    def workspace_bytes(node, shapes, dtypes):
        calls.append(node.op_type)
        if node.output[0] == "c":
            raise ValueError("no estimate")
        return 512 if node.output[0] == "b" else 0

    fake = types.ModuleType("opc.runtime")
    fake.workspace_bytes = workspace_bytes
    monkeypatch.setitem(__import__("sys").modules, "opc.runtime", fake)
    plan = plan_model(parse(CHAIN))
    assert calls == ["Softmax"] * 4
    assert list(plan.workspaces) == [1] and plan.workspaces[1].size == 512
    plan.check()


def test_sequences_are_not_planned():
    model = parse(HEADER + """
seq (float[2,4] x) => (float[4,4] y) {
  a = Relu(x)
  b = Sigmoid(x)
  s = SequenceConstruct(a, b)
  y = ConcatFromSequence<axis = 0>(s)
}
""")
    plan = plan_model(model, workspace_fn=no_workspace)
    plan.check()
    assert set(plan.tensors) == {"a", "b"} and plan.tensors["a"].last_use == 2
