"""Trial runners: where the configurations of a search are evaluated.

The search (``opc.tune``) only sees this interface::

    runner.start(task)              # ship the task (model, data, metric) to the workers once
    for result in runner.run(trials):   # results arrive in completion order
        ...
    runner.close()

``task`` is any picklable object with a ``setup()`` method that returns an evaluator:
a callable taking one ``Trial`` and returning one ``TrialResult``. Every worker calls
``setup()`` once and keeps the evaluator (loaded model, data, reference outputs), so a
trial ships only its pipeline string and returns only numbers. This is the shape a
distributed executor needs as well: a Ray runner would hold one actor per worker that
calls ``task.setup()`` in its constructor (``ray.put`` the task once), submit
``actor.evaluate.remote(trial)`` per trial, and yield results with ``ray.wait``; the
search code would not change. ``workers`` tells the search how many trials it should
offer at a time to keep every worker busy.

Two runners live here: ``SerialRunner`` (in-process) and ``ProcessPoolRunner`` (local
processes started with "spawn", so no ONNX Runtime thread pool is ever forked).
"""

from __future__ import annotations

import abc
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence


@dataclass(frozen=True)
class Trial:
    """One configuration to evaluate: a canonical pipeline string plus bookkeeping."""

    index: int
    pipeline: str
    phase: str = ""
    note: str = ""


@dataclass
class TrialResult:
    """What one trial measured. ``drop`` is the metric loss against the float model
    (larger is worse); ``error`` is set (and the numbers are None) when the trial failed."""

    index: int
    pipeline: str
    phase: str = ""
    note: str = ""
    metric: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    latency_spread_ms: float | None = None  # interquartile range of the timed repeats
    rel_latency: float | None = None  # latency / the float model's, timed in alternating rounds
    size_bytes: int | None = None
    sha256: str | None = None
    structure: str | None = None  # hash of the graph without weight values: equal = same kernels, same cost
    compile_s: float = 0.0
    time_s: float = 0.0
    error: str | None = None
    worker: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the quantize sensitivity table

    @property
    def ok(self) -> bool:
        return self.error is None and self.drop is not None

    def to_json(self) -> dict:
        return asdict(self)


def failed(trial: Trial, error: str, started: float) -> TrialResult:
    return TrialResult(index=trial.index, pipeline=trial.pipeline, phase=trial.phase, note=trial.note,
                       error=error, time_s=time.perf_counter() - started, worker=f"pid{os.getpid()}")


class TrialRunner(abc.ABC):
    """Evaluates trials of one task; see the module docstring for the contract."""

    workers: int = 1

    @abc.abstractmethod
    def start(self, task: Any) -> None:
        """Make ``task.setup()``'s evaluator available to every worker."""

    @abc.abstractmethod
    def run(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        """Evaluate ``trials``; yield one result per trial, in completion order.

        A trial that raises becomes a result with ``error`` set; it never stops the run."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _guarded(evaluate: Callable[[Trial], TrialResult], trial: Trial) -> TrialResult:
    started = time.perf_counter()
    try:
        return evaluate(trial)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failing configuration is a result, not a crash of the search
        return failed(trial, f"{type(exc).__name__}: {' '.join(str(exc).split())}", started)


class SerialRunner(TrialRunner):
    """Runs trials one after another in this process."""

    workers = 1

    def __init__(self):
        self._evaluate = None

    def start(self, task: Any) -> None:
        self._evaluate = task.setup()

    def run(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        if self._evaluate is None:
            raise RuntimeError("SerialRunner.run before start")
        for trial in trials:
            yield _guarded(self._evaluate, trial)


# --- process pool ------------------------------------------------------------------------
_WORKER_EVALUATE: Callable[[Trial], TrialResult] | None = None


def _worker_init(task: Any) -> None:
    global _WORKER_EVALUATE
    _WORKER_EVALUATE = task.setup()


def _worker_run(trial: Trial) -> TrialResult:
    assert _WORKER_EVALUATE is not None, "worker was not initialised"
    return _guarded(_WORKER_EVALUATE, trial)


class ProcessPoolRunner(TrialRunner):
    """Runs trials in ``workers`` local processes (spawned; each sets the task up once).

    On a machine shared with other jobs, latencies measured by concurrent workers
    disturb each other; ``opc tune`` therefore re-times its finalists serially.
    """

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or max(1, (os.cpu_count() or 2) - 1))
        self._pool: ProcessPoolExecutor | None = None

    def start(self, task: Any) -> None:
        import multiprocessing

        self.close()
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_init, initargs=(task,))

    def run(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        if self._pool is None:
            raise RuntimeError("ProcessPoolRunner.run before start")
        pending = {self._pool.submit(_worker_run, t): t for t in trials}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    trial = pending.pop(fut)
                    exc = fut.exception()
                    if exc is not None:  # the worker died (or failed to set up): report, go on
                        yield failed(trial, f"worker failed: {type(exc).__name__}: {exc}", time.perf_counter())
                    else:
                        yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def make_runner(workers: int) -> TrialRunner:
    """``workers`` <= 1: serial; otherwise a local process pool of that size."""
    return SerialRunner() if workers <= 1 else ProcessPoolRunner(workers)
