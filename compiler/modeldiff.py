"""`opc diff`: what changed between two models.

Nodes are matched by name (falling back to op type + position among unnamed nodes);
initializers by name, with value statistics for those whose content changed.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from opc.summary import iter_graphs


def _node_key(node: onnx.NodeProto, counters: Counter) -> str:
    if node.name:
        return node.name
    counters[node.op_type] += 1
    return f"<{node.op_type}#{counters[node.op_type]}>"


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    counters: Counter = Counter()
    out = {}
    for g in iter_graphs(model.graph):
        for n in g.node:
            key = _node_key(n, counters)
            while key in out:
                key += "'"
            out[key] = n
    return out


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for g in iter_graphs(model.graph) for t in g.initializer}


def _io(values) -> dict[str, str]:
    from opc.textir import _type_str

    return {v.name: _type_str(v.type) for v in values}


def value_stats(a: np.ndarray, b: np.ndarray) -> dict:
    out = {"shape_before": list(a.shape), "shape_after": list(b.shape),
           "dtype_before": str(a.dtype), "dtype_after": str(b.dtype),
           "nonzero_before": int(np.count_nonzero(a)), "nonzero_after": int(np.count_nonzero(b))}
    if a.shape == b.shape and np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number):
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        out["max_abs_diff"] = float(d.max()) if d.size else 0.0
        out["mean_abs_diff"] = float(d.mean()) if d.size else 0.0
        out["changed_elements"] = int(np.count_nonzero(d))
    return out


def diff_models(a: onnx.ModelProto, b: onnx.ModelProto) -> dict:
    na, nb = _nodes(a), _nodes(b)
    added = [k for k in nb if k not in na]
    removed = [k for k in na if k not in nb]
    changed = []
    for k in na.keys() & nb.keys():
        x, y = na[k], nb[k]
        if (x.op_type, list(x.input), list(x.output)) != (y.op_type, list(y.input), list(y.output)) or \
                sorted(a_.SerializeToString(deterministic=True) for a_ in x.attribute) != \
                sorted(b_.SerializeToString(deterministic=True) for b_ in y.attribute):
            changed.append(k)
    ia, ib = _inits(a), _inits(b)
    init_changed = {}
    for k in sorted(ia.keys() & ib.keys()):
        if ia[k].SerializeToString(deterministic=True) != ib[k].SerializeToString(deterministic=True):
            init_changed[k] = value_stats(numpy_helper.to_array(ia[k]), numpy_helper.to_array(ib[k]))
    ins_a, ins_b = _io(a.graph.input), _io(b.graph.input)
    outs_a, outs_b = _io(a.graph.output), _io(b.graph.output)
    return {
        "nodes": {
            "before": len(na), "after": len(nb),
            "added_by_op": dict(Counter(nb[k].op_type for k in added)),
            "removed_by_op": dict(Counter(na[k].op_type for k in removed)),
            "changed_by_op": dict(Counter(nb[k].op_type for k in changed)),
            "added": sorted(added), "removed": sorted(removed), "changed": sorted(changed),
        },
        "initializers": {
            "added": sorted(ib.keys() - ia.keys()), "removed": sorted(ia.keys() - ib.keys()),
            "changed": init_changed,
        },
        "inputs": {"added": sorted(ins_b.keys() - ins_a.keys()), "removed": sorted(ins_a.keys() - ins_b.keys()),
                   "changed": {k: [ins_a[k], ins_b[k]] for k in ins_a.keys() & ins_b.keys() if ins_a[k] != ins_b[k]}},
        "outputs": {"added": sorted(outs_b.keys() - outs_a.keys()), "removed": sorted(outs_a.keys() - outs_b.keys()),
                    "changed": {k: [outs_a[k], outs_b[k]] for k in outs_a.keys() & outs_b.keys()
                                if outs_a[k] != outs_b[k]}},
    }


def format_diff(d: dict) -> str:
    lines = [f"nodes: {d['nodes']['before']} -> {d['nodes']['after']}"]
    for label in ("added", "removed", "changed"):
        by_op = d["nodes"][f"{label}_by_op"]
        if by_op:
            lines.append(f"  {label}: " + ", ".join(f"{op} x{n}" for op, n in sorted(by_op.items())))
    inits = d["initializers"]
    if inits["added"]:
        lines.append(f"initializers added: {len(inits['added'])}")
    if inits["removed"]:
        lines.append(f"initializers removed: {len(inits['removed'])}")
    for name, s in inits["changed"].items():
        extra = f", max |diff| {s['max_abs_diff']:.4g}, {s['changed_elements']} elements changed" \
            if "max_abs_diff" in s else ""
        lines.append(f"initializer {name}: {s['dtype_before']}{s['shape_before']} -> {s['dtype_after']}"
                     f"{s['shape_after']}, nonzero {s['nonzero_before']} -> {s['nonzero_after']}{extra}")
    for kind in ("inputs", "outputs"):
        for label in ("added", "removed"):
            if d[kind][label]:
                lines.append(f"{kind} {label}: {', '.join(d[kind][label])}")
        for k, (x, y) in d[kind]["changed"].items():
            lines.append(f"{kind[:-1]} {k}: {x} -> {y}")
    if len(lines) == 1 and d["nodes"]["before"] == d["nodes"]["after"]:
        lines.append("no differences")
    return "\n".join(lines)
