"""CUDA-graph capture and replay of a session's steady-state run (CuPy only).

Once an input signature has its arena layout and has run once in it (kernels compiled, cuBLAS
plans made), the next run with that signature is captured on a side stream into a CUDA graph:
the feeds are first copied into fixed input buffers, and every allocation made while capturing
comes from a memory pool owned by the graph (memory that a replay writes must never be handed
to anyone else). Later runs copy the feeds into those buffers, launch the graph, and copy the
outputs out. A capture that fails (a kernel that needs the host in the middle of a run, an
operation CUDA cannot capture) is ended, the reason kept, and that signature runs plainly from
then on.

The decisions and the bookkeeping are backend-neutral: ``GraphCache`` talks to the GPU only
through an adapter (``CupyAdapter`` here; the tests drive the same logic with a fake one on a
machine without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def capture_blocker(program, layout) -> str | None:
    """Why this layout's run cannot be a CUDA graph (None: it can). A graph replays fixed
    kernels on fixed addresses, so output shapes that depend on values (NonZero, dynamic
    Reshape inputs) and control flow decided on the host (If, Loop) rule it out."""
    for i in layout.run_steps:
        st = program.steps[i]
        if st.spec.dynamic:
            return f"{st.node.where()} has output shapes that depend on input values"
        if st.node.subgraphs:
            return f"{st.node.where()} decides its control flow on the host"
    return None


@dataclass
class GraphState:
    """Per input signature."""

    plain_runs: int = 0
    captured: object = None  # a Captured
    blocked: str | None = None  # why this signature runs plainly


@dataclass
class Captured:
    graph: object
    stream: object
    inputs: list  # fixed buffers the feeds are copied into before each launch
    outputs: list  # arrays the graph writes the model's outputs into
    pool: object  # the memory every capture-time allocation came from
    keep: list = field(default_factory=list)


class GraphCache:
    """``run(state, values, execute)``: ``execute(values) -> outputs`` is the plain steady-state
    run; the first ``warmup`` calls of a signature run it plainly, the next one captures it."""

    def __init__(self, adapter, warmup: int = 1):
        self.adapter = adapter
        self.warmup = warmup
        self.captures = 0
        self.replays = 0

    def run(self, state: GraphState, values, execute):
        if state.captured is not None:
            return self._replay(state.captured, values)
        if state.blocked is not None or state.plain_runs < self.warmup:
            state.plain_runs += 1
            return execute(values)
        try:
            state.captured = self._capture(values, execute)
        except Exception as exc:  # capture is an optimization: fall back, remember why
            state.blocked = f"capture failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
            state.plain_runs += 1
            return execute(values)
        self.captures += 1
        return self._replay(state.captured, values)

    def _capture(self, values, execute) -> Captured:
        a = self.adapter
        inputs = [a.copy(v) for v in values]  # outside the capture: ordinary memory
        stream = a.new_stream()
        pool = a.new_pool()
        holder = {}

        def work():
            holder["outs"] = execute(inputs)
            return holder["outs"]
        graph = a.capture(stream, pool, work)
        outs = holder["outs"]
        return Captured(graph, stream, inputs, list(outs), pool)

    def _replay(self, cap: Captured, values):
        a = self.adapter
        self.replays += 1
        return a.replay(cap.graph, cap.stream, list(zip(cap.inputs, values)), cap.outputs)


class CupyAdapter:  # pragma: no cover - needs a GPU
    """The CuPy calls behind ``GraphCache``."""

    def __init__(self, cupy):
        self.cp = cupy

    def copy(self, v):
        return v.copy()

    def new_stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def new_pool(self):
        return self.cp.cuda.MemoryPool()

    def capture(self, stream, pool, work):
        cp = self.cp
        _after_current(cp, stream)  # the capture-time copies of the feeds come first
        with cp.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                work()
            except BaseException:
                try:
                    stream.end_capture()
                except Exception:
                    pass
                raise
            graph = stream.end_capture()
        graph.upload(stream)  # instantiate now, not on the first replay
        return graph

    def replay(self, graph, stream, copies, outputs):
        cp = self.cp
        _after_current(cp, stream)  # the feeds were written on the caller's stream
        with stream:
            for buf, v in copies:
                if buf is not v:
                    cp.copyto(buf, v)
            graph.launch(stream)
            res = [o.copy() for o in outputs]  # the next replay overwrites the graph's outputs
        cp.cuda.get_current_stream().wait_event(stream.record())
        return res


def _after_current(cp, stream):  # pragma: no cover - needs a GPU
    stream.wait_event(cp.cuda.get_current_stream().record())
