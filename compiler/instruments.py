"""Instruments run by the pass manager around every pass (never inside a pass).

Each has ``run_before_pipeline``, ``run_before_pass``, ``run_after_pass`` and
``run_after_pipeline`` hooks. Timing, the onnx checker, ONNX Runtime verification and
per-pass IR dumps/diffs are all instruments.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import onnx

from opc.errors import ModelError, VerificationError


class Instrument:
    def run_before_pipeline(self, model, ctx) -> None:
        pass

    def run_before_pass(self, step, graph, ctx) -> None:
        pass

    def run_after_pass(self, step, before, after, ctx) -> None:
        """``step`` is the PassRecord; ``before``/``after`` are ModelProtos."""

    def run_after_pipeline(self, model, ctx, report) -> None:
        pass


class Timing(Instrument):
    def run_before_pass(self, step, graph, ctx):
        self._start = time.perf_counter()

    def run_after_pass(self, step, before, after, ctx):
        step.time_s = time.perf_counter() - self._start


class Checker(Instrument):
    """After each pass the model must pass onnx.checker."""

    def run_after_pass(self, step, before, after, ctx):
        try:
            if after.ByteSize() < 2**31 - 2**26:
                onnx.checker.check_model(after)
        except onnx.checker.ValidationError as exc:
            first = (str(exc).strip().splitlines() or ["invalid model"])[0]
            raise ModelError(f"pass '{step.name}' produced an invalid model: {first} "
                             f"(passes before it: {', '.join(step.previous) or 'none'})") from None


class Verify(Instrument):
    """Compare ONNX Runtime outputs after each pass with the step before and the input.

    Exact passes must stay within their declared tolerance of the previous step; lossy
    passes only report their error. Inputs are calibration samples when there are any,
    else seeded random data; symbolic dimensions are exercised at two sizes.
    """

    def __init__(self, feeds: list[dict] | None = None, dynamic_sizes=(2, 3)):
        self.feed_sets = feeds
        self.dynamic_sizes = dynamic_sizes

    def _outputs(self, model):
        from opc.ort import make_session, run_model

        sess = make_session(model, threads=1)
        return [run_model(model, feeds, session=sess) for feeds in self.feed_sets]

    def run_before_pipeline(self, model, ctx):
        from opc.ort import seeded_feeds

        if self.feed_sets is None and ctx.calibration is not None and not ctx.input_shapes:
            # real samples make a lossy pass's reported error meaningful (random inputs can sit
            # far outside the calibrated ranges); two batch sizes exercise a dynamic batch
            first = next(ctx.calibration.batches(3), None)
            if first is not None and len(next(iter(first.values()))) == 3:
                self.feed_sets = [{k: v[:2] for k, v in first.items()}, first]
        if self.feed_sets is None:
            if ctx.input_shapes or not _has_symbolic_inputs(model):
                self.feed_sets = [seeded_feeds(model, ctx.input_shapes, seed=ctx.seed)]
            else:
                self.feed_sets = [seeded_feeds(model, ctx.input_shapes, seed=ctx.seed + i, dynamic_dim=d)
                                  for i, d in enumerate(self.dynamic_sizes)]
        self.reference = self._outputs(model)
        self.previous = self.reference

    def run_after_pass(self, step, before, after, ctx):
        from opc.ort import compare, within

        outputs = self._outputs(after)
        vs_prev, vs_input = {}, {}
        for ref_set, prev_set, out_set in zip(self.reference, self.previous, outputs):
            for name, ref in ref_set.items():
                if name not in out_set:
                    raise VerificationError(f"pass '{step.name}': graph output '{name}' is gone")
                _worst(vs_input, name, compare(ref, out_set[name]))
                _worst(vs_prev, name, compare(prev_set[name], out_set[name]))
        step.verification = {"vs_previous": vs_prev, "vs_input": vs_input}
        if step.exact:
            rtol, atol = step.tolerance
            bad = [n for n, m in vs_prev.items() if not within(m, rtol, atol)]
            step.verified = not bad
            if bad:
                m = vs_prev[bad[0]]
                raise VerificationError(
                    f"pass '{step.name}' changed output '{bad[0]}': max abs error {m['max_abs']:.3g}, "
                    f"relative {m['max_rel']:.3g} > tolerance {rtol:g}"
                )
        self.previous = outputs


def _worst(acc: dict, name: str, metrics: dict) -> None:
    if name not in acc or metrics["max_abs"] > acc[name]["max_abs"]:
        acc[name] = metrics


def _has_symbolic_inputs(model) -> bool:
    from opc.ort import graph_inputs, input_spec

    return any(not isinstance(d, int) for v in graph_inputs(model) for d in input_spec(v)[0])


class DumpPasses(Instrument):
    """Write NN-name.onnx, NN-name.txt and NN-name.diff for every step into a folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def run_before_pipeline(self, model, ctx):
        from opc.textir import model_text

        self.folder.mkdir(parents=True, exist_ok=True)
        self._prev_text = model_text(model)
        (self.folder / "00-input.txt").write_text(self._prev_text)
        (self.folder / "00-input.onnx").write_bytes(model.SerializeToString(deterministic=True))

    def run_after_pass(self, step, before, after, ctx):
        from opc.textir import model_text, unified_diff

        stem = f"{step.index + 1:02d}-{step.name}"
        text = model_text(after)
        (self.folder / f"{stem}.onnx").write_bytes(after.SerializeToString(deterministic=True))
        (self.folder / f"{stem}.txt").write_text(text)
        (self.folder / f"{stem}.diff").write_text(unified_diff(self._prev_text, text, "before", stem))
        self._prev_text = text


class PrintChanged(Instrument):
    """Print the IR diff of every pass that changed something (MLIR's print-ir-after-change)."""

    def __init__(self, echo: Callable[[str], None] = print):
        self.echo = echo

    def run_before_pipeline(self, model, ctx):
        from opc.textir import model_text

        self._prev_text = model_text(model)

    def run_after_pass(self, step, before, after, ctx):
        from opc.textir import model_text, unified_diff

        text = model_text(after)
        if text != self._prev_text:
            self.echo(f"--- IR after {step.canonical} ---")
            self.echo(unified_diff(self._prev_text, text, "before", step.name))
        self._prev_text = text
