"""opc's runtime: latency and memory vs ONNX Runtime and onnx's ReferenceEvaluator.

    python -m benchmarks.runtime                      # CPU table (NumPy backend), then GPU table if a GPU is usable
    python -m benchmarks.runtime --quick              # fewer repeats, ReferenceEvaluator at batch 1 only
    python -m benchmarks.runtime --models resnet18 --batches 1

CPU table: opc NumPy vs ORT CPU with the same thread count (BLAS threads = ORT intra-op
threads; the two run interleaved, call by call, medians of ``--repeats``) vs
``onnx.reference.ReferenceEvaluator`` (same BLAS threads; median of 3 runs after a warm-up, in
rounds alternating with opc, whose median over those rounds is the ratio's denominator), outputs
checked against ORT, arena (planned), weights, and the measured peak: tracemalloc's peak over one
timed run (NumPy reports its allocations to it) with the arena and weights already held.
With one thread (the default) a latency is the CPU time of the calling thread, on which all
three run every kernel (``opc.ort.latency_clock``): other jobs on the shared machine stretch wall
time, not that; with more threads, wall time.
Targets (issue 8): opc <= 3x ORT, >= 20x ReferenceEvaluator.

GPU table (runs when CuPy sees a GPU; ``--gpu-only`` for just that one, needs a CUDA build of
PyTorch): opc CuPy (fused elementwise kernels, CUDA-graph replay; and without the graph) vs
PyTorch eager (same module, fp32, no_grad) at batch 32 on resnet18 and bert-tiny, wall time with a
device synchronization after every call, and peak activation memory above the weights and feeds
(CuPy pool peak plus the graph's own pool vs torch.cuda.max_memory_allocated).

    python -m benchmarks.runtime --gpu-only           # on a GPU machine: the GPU table only
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from benchmarks import common

MODELS = ["resnet18", "mobilenetv2", "bert-tiny", "kws-lstm"]
BATCHES = [1, 32]
REF_REPEATS = 3  # ReferenceEvaluator is slow: one warm-up run, then the median of three


def _feeds(model, batch: int) -> dict[str, np.ndarray]:
    from opc.ort import graph_inputs, input_spec, seeded_feeds

    shapes = {}
    for v in graph_inputs(model):
        dims, _ = input_spec(v)
        shapes[v.name] = tuple([batch] + [d if isinstance(d, int) else 1 for d in dims[1:]])
    return seeded_feeds(model, shapes, seed=0)


def _interleaved_ms(fns, repeats, warmup: int = 2, clock=time.perf_counter) -> list[float]:
    """Median latency (ms) of each function, called round-robin so that the shared machine's
    load drifts hit every contestant alike (ratios from one run, not two separate windows).
    ``repeats``: one count for all, or one per function (a slow one runs fewer times per
    round: the rounds still alternate). ``clock``: see ``opc.ort.latency_clock``."""
    counts = [repeats] * len(fns) if isinstance(repeats, int) else list(repeats)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    rounds = max(counts)
    for r in range(rounds):
        for fn, ts, n in zip(fns, times, counts):
            if r * n // rounds == (r + 1) * n // rounds:
                continue  # spread a function's n calls evenly over the rounds
            t = clock()
            fn()
            ts.append((clock() - t) * 1e3)
    return [float(np.median(ts)) for ts in times]




def cpu_row(name: str, batch: int, repeats: int, threads: int, reference: bool) -> dict:
    from opc.ir import load_model
    from opc.ort import compare, latency_clock, make_session
    from opc.runtime import Session, weights_bytes

    model = load_model(common.zoo_model(name))
    feeds = _feeds(model, batch)
    tracemalloc.start()
    sess = Session(model, backend="numpy", threads=threads)
    got = sess.run(None, feeds)  # resolves shapes, plans the arena
    sess.run(None, feeds)
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    sess.run(None, feeds)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ort = make_session(model, threads=threads)
    ref = ort.run(None, feeds)
    clock = latency_clock(threads)
    opc_ms, ort_ms = _interleaved_ms([lambda: sess.run(None, feeds), lambda: ort.run(None, feeds)], repeats,
                                     clock=clock)
    err = max(compare(r, g)["max_rel"] for r, g in zip(ref, got))
    row = {"model": name, "batch": batch, "opc_ms": opc_ms, "ort_ms": ort_ms, "opc/ort": opc_ms / ort_ms,
           "ref_ms": None, "ref/opc": None, "max_rel_vs_ort": err,
           "arena_mib": sess.arena_bytes(feeds) / 2**20, "weights_mib": weights_bytes(sess) / 2**20,
           "run_peak_mib": peak / 2**20, "held_before_run_mib": base / 2**20}
    if reference:
        from onnx.reference import ReferenceEvaluator
        from threadpoolctl import threadpool_limits

        ev = ReferenceEvaluator(model)
        # the same thread count (its NumPy calls' BLAS threads), timed in rounds alternating with
        # opc (REF_REPEATS calls, opc 3x as many) so that the ratio comes from one window
        with threadpool_limits(threads, user_api="blas"):
            ref_ms, opc_paired = _interleaved_ms([lambda: ev.run(None, feeds), lambda: sess.run(None, feeds)],
                                                 [REF_REPEATS, 3 * REF_REPEATS], warmup=1, clock=clock)
        row["ref_ms"] = ref_ms
        row["ref/opc"] = ref_ms / opc_paired
    return row


class _PeakAllocator:  # pragma: no cover - GPU only
    """CuPy's default pool, recording the peak of its used bytes (the peak is reached right
    after an allocation, so sampling there is exact)."""

    def __init__(self, pool):
        self.pool = pool
        self.peak = pool.used_bytes()

    def malloc(self, n):
        mem = self.pool.malloc(n)
        used = self.pool.used_bytes()
        if used > self.peak:
            self.peak = used
        return mem

    def reset(self):
        self.peak = self.pool.used_bytes()


def gpu_rows(models: list[str], batch: int, repeats: int) -> list[dict]:  # pragma: no cover - GPU only
    """opc (CuPy: fused elementwise kernels, CUDA-graph replay) vs PyTorch eager (fp32, no_grad)
    on one GPU, timed interleaved with a device synchronization after every call.

    Activation memory of a steady-state run: for opc, what stays held after the first runs (the
    arena, cached shape values, outputs) plus the transient peak of one more run plus the CUDA
    graph's own pool; for PyTorch, max_memory_allocated during one forward above what the module
    and the inputs hold. Weights and feeds are excluded on both sides."""
    import cupy
    import torch

    import opc.models as zoo
    from opc.ir import load_model
    from opc.ort import compare
    from opc.runtime import Session

    if not torch.cuda.is_available():
        raise SystemExit("the GPU table needs a CUDA build of PyTorch (this one is " + torch.__version__ + ")")
    pool = cupy.get_default_memory_pool()
    tracker = _PeakAllocator(pool)
    cupy.cuda.set_allocator(tracker.malloc)
    # fp32 against fp32: PyTorch convolutions use TF32 tensor cores by default on Ampere and later
    # (torch.backends.cudnn.allow_tf32 is True); CuPy's GEMMs are full fp32 (CUPY_TF32 unset)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in models:
        model = load_model(common.zoo_model(name))
        feeds = _feeds(model, batch)
        dev = {k: cupy.asarray(v) for k, v in feeds.items()}
        sess = Session(model, backend="cupy")
        plain = Session(model, backend="cupy", cuda_graphs=False)
        cupy.cuda.Device().synchronize()
        before = pool.used_bytes()  # weights of both sessions and the feeds
        for _ in range(4):  # trace (fresh allocations), warm-up in the arena, capture, replay
            got = sess.run(None, dev, to_numpy=False)
        cupy.cuda.Device().synchronize()
        held = pool.used_bytes() - before  # the arena, cached shape values, the last outputs
        tracker.reset()
        got = sess.run(None, dev, to_numpy=False)  # a steady-state run: its transient peak
        cupy.cuda.Device().synchronize()
        transient = tracker.peak - (before + held)
        state = sess.layout().graph
        graph_pool = state.captured.pool.total_bytes() if state is not None and state.captured is not None else 0
        opc_act = held + max(transient, 0) + graph_pool
        for _ in range(2):
            plain.run(None, dev, to_numpy=False)

        module = zoo.build(name).cuda()
        args = [torch.from_numpy(feeds[k]).cuda() for k in zoo.input_names(name)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            ref = module(*args)
        torch.cuda.synchronize()
        torch_act = torch.cuda.max_memory_allocated() - base
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        err = max(compare(r.float().cpu().numpy(), cupy.asnumpy(g))["max_rel"] for r, g in zip(ref, got))

        def run_opc():
            sess.run(None, dev, to_numpy=False)
            cupy.cuda.Device().synchronize()

        def run_plain():
            plain.run(None, dev, to_numpy=False)
            cupy.cuda.Device().synchronize()

        def run_torch():
            with torch.no_grad():
                module(*args)
            torch.cuda.synchronize()

        opc_ms, plain_ms, torch_ms = _interleaved_ms([run_opc, run_plain, run_torch], repeats, warmup=3)
        rows.append({"model": name, "batch": batch, "opc_cupy_ms": opc_ms, "opc_no_graph_ms": plain_ms,
                     "torch_eager_ms": torch_ms, "opc/torch": opc_ms / torch_ms,
                     "opc_activation_mib": opc_act / 2**20, "torch_activation_mib": torch_act / 2**20,
                     "opc/torch_memory": opc_act / torch_act if torch_act else None,
                     "opc_arena_mib": sess.arena_bytes(feeds) / 2**20,
                     "fused_steps": sess.program.fused_elementwise,
                     "cuda_graph": "replayed" if state is not None and state.captured is not None
                     else (state.blocked if state is not None else "off"),
                     "max_rel_vs_torch": err})
        print(f"  {name} batch {batch}: opc {opc_ms:.2f} ms (no graph {plain_ms:.2f}), torch {torch_ms:.2f} ms",
              flush=True)
        pool.free_all_blocks()
        torch.cuda.empty_cache()
    cupy.cuda.set_allocator(pool.malloc)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows


GPU_MODELS = ["resnet18", "bert-tiny"]


def main(argv=None) -> None:
    def extra(p):
        p.add_argument("--batches", type=int, nargs="*", default=BATCHES)
        p.add_argument("--reference-all", action="store_true",
                       help="time ReferenceEvaluator at every batch (slow), not only batch 1")
        p.add_argument("--no-gpu", action="store_true")
        p.add_argument("--gpu-only", action="store_true", help="only the GPU table (opc CuPy vs PyTorch eager)")

    args = common.bench_args("opc runtime vs ONNX Runtime vs ReferenceEvaluator", MODELS, argv, extra)
    if args.gpu_only:
        return _gpu_table(args)
    rows = []
    for name in args.models:
        for batch in args.batches:
            rows.append(cpu_row(name, batch, args.repeats, args.threads,
                                reference=args.reference_all or batch == 1))
            print(f"  {name} batch {batch}: opc {rows[-1]['opc_ms']:.2f} ms, ORT {rows[-1]['ort_ms']:.2f} ms",
                  flush=True)
    common.report("runtime", rows, title="opc runtime (NumPy) vs ONNX Runtime CPU vs ReferenceEvaluator",
                  settings={"threads": args.threads, "repeats": args.repeats, "batches": args.batches},
                  notes=["opc/ort target <= 3 (opc and ORT timed interleaved); ref/opc target >= 20 "
                         f"(ReferenceEvaluator: same BLAS threads, median of {REF_REPEATS} after a warm-up in "
                         "rounds alternating with opc, batch 1 unless --reference-all)",
                         "latency: CPU time of the calling thread with 1 thread (all three run every kernel "
                         "on it), wall time with more",
                         "run_peak_mib: tracemalloc peak during one run, with the arena and weights already "
                         "held (held_before_run_mib); arena + weights is the planned figure"],
                  threads=args.threads, write_json=not args.no_json)
    if not args.no_gpu:
        _gpu_table(args)


def _gpu_table(args) -> None:
    from opc.runtime import cupy_usable

    if not cupy_usable():
        print("\nGPU table skipped: no usable GPU for CuPy on this machine.")
        return
    models = [m for m in args.models if m in GPU_MODELS] or GPU_MODELS
    import cupy

    gpu = gpu_rows(models, 32, args.repeats)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    common.report("runtime_gpu", gpu, title="opc runtime (CuPy) vs PyTorch eager, batch 32",
                  settings={"repeats": args.repeats, "gpu": props["name"].decode(), "cupy": cupy.__version__},
                  notes=["targets (issue 8): opc/torch <= 1 (latency), opc/torch_memory <= 1 (activation memory)",
                         "latency: median of interleaved calls, each followed by a device synchronization",
                         "PyTorch with TF32 off (cuDNN and cuBLAS): fp32 on both sides",
                         "activation: steady-state device bytes above weights and feeds; opc: held arena + "
                         "outputs + transient peak of a run + the CUDA graph's pool; PyTorch: max_memory_allocated "
                         "over one forward"],
                  write_json=not args.no_json)


if __name__ == "__main__":
    main()
