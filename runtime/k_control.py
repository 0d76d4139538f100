"""Control flow: If, Loop, Scan. Bodies are compiled Programs run without an arena; values
they read from enclosing scopes arrive as the node's extra inputs (``node.captures``)."""

from __future__ import annotations

import numpy as np

from opc.runtime.registry import kernel
from opc.runtime.xp import to_host


def _captured(node, ins):
    vals = dict(zip(node.captures, ins[len(node.inputs):]))
    return lambda sub: [vals[c] for c in sub.captures]


@kernel("If", dynamic=True)
def _if(node, xp):
    then_b, else_b = node.subgraphs["then_branch"], node.subgraphs["else_branch"]

    def run(ins, outs, ws):
        cap = _captured(node, ins)
        branch = then_b if bool(to_host(ins[0]).reshape(-1)[0]) else else_b
        return branch.run([], cap(branch))
    return run


@kernel("Loop", dynamic=True)
def _loop(node, xp):
    body = node.subgraphs["body"]
    n_in = len(node.inputs)

    def run(ins, outs, ws):
        cap = _captured(node, ins)(body)
        regular = ins[:n_in]
        trip = regular[0] if len(regular) > 0 else None
        cond = regular[1] if len(regular) > 1 else None
        state = list(regular[2:])
        max_trip = int(to_host(trip).reshape(-1)[0]) if trip is not None else None
        keep = cond is None or bool(to_host(cond).reshape(-1)[0])
        n_state = len(state)
        scans: list[list] = [[] for _ in range(len(body.outputs) - 1 - n_state)]
        i = 0
        while keep and (max_trip is None or i < max_trip):
            res = body.run([xp.asarray(np.array(i, np.int64)), xp.asarray(np.array(keep))] + state, cap)
            keep = bool(to_host(res[0]).reshape(-1)[0])
            state = list(res[1:1 + n_state])
            for k, v in enumerate(res[1 + n_state:]):
                scans[k].append(v)
            i += 1
        out = state
        for k, vs in enumerate(scans):
            if vs:
                out.append(xp.stack(vs))
            else:
                out.append(xp.zeros((0,), dtype=np.float32))
        return out
    return run


@kernel("Scan", dynamic=True)
def _scan(node, xp):
    body = node.subgraphs["body"]
    n_scan = node.a("num_scan_inputs")
    n_in = len(node.inputs)
    if node.opset < 9 and len(node.inputs) < len(node.proto.input):
        n_in = len(node.proto.input)

    def run(ins, outs, ws):
        if node.opset < 9:  # Scan-8: [sequence_lens,] states and scan inputs with a batch axis 0
            regular = ins[1:n_in]
            per = [run_one([v[bi] for v in regular], ins) for bi in range(regular[0].shape[0])]
            return [xp.stack([p[k] for p in per]) for k in range(len(per[0]))]
        return run_one(ins[:n_in], ins)

    def run_one(regular, ins):
        cap = _captured(node, ins)(body)
        n_state = len(regular) - n_scan
        state = list(regular[:n_state])
        xs = regular[n_state:]
        in_axes = list(node.a("scan_input_axes") or [0] * n_scan)
        in_dirs = list(node.a("scan_input_directions") or [0] * n_scan)
        n_out = len(body.outputs) - n_state
        out_axes = list(node.a("scan_output_axes") or [0] * n_out)
        out_dirs = list(node.a("scan_output_directions") or [0] * n_out)
        xs = [xp.moveaxis(x, a % x.ndim, 0) for x, a in zip(xs, in_axes)]
        steps = xs[0].shape[0] if xs else 0
        ys: list[list] = [[] for _ in range(n_out)]
        for t in range(steps):
            sl = [x[steps - 1 - t] if d else x[t] for x, d in zip(xs, in_dirs)]
            res = body.run(state + sl, cap)
            state = list(res[:n_state])
            for k, v in enumerate(res[n_state:]):
                ys[k].append(v)
        out = state
        for k, vs in enumerate(ys):
            if out_dirs[k]:
                vs = vs[::-1]
            y = xp.stack(vs)
            out.append(xp.moveaxis(y, 0, out_axes[k] % y.ndim))
        return out
    return run
