"""The pass manager: checks the pipeline's ordering rules, runs each pass on one
onnx-graphsurgeon graph, and lets instruments time, check, verify and diff each step.

When a pass fails, the error names it and the passes before it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from opc.errors import OpcError, PipelineError
from opc.pass_api import Pass, PassContext

META_VERSION = "opc.version"
META_PIPELINE = "opc.pipeline"
META_STATS = "opc.stats"


@dataclass
class PassRecord:
    index: int
    name: str
    canonical: str
    exact: bool
    tolerance: tuple[float, float]
    previous: list[str]
    modified: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    time_s: float = 0.0
    verification: dict[str, Any] | None = None
    verified: bool | None = None


@dataclass
class Report:
    pipeline: str
    passes: list[PassRecord] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    passed: bool = True

    def to_json(self) -> dict:
        return asdict(self)


def check_order(passes: list[Pass]) -> None:
    """Enforce each pass's ``requires`` and ``position`` declarations."""
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        for needed in p.requires:
            if needed not in names[:i]:
                raise PipelineError(f"pass '{p.name}' requires '{needed}' earlier in the pipeline")
        if p.position == "last" and i != len(passes) - 1:
            raise PipelineError(f"pass '{p.name}' must be the last pass (found before '{names[i + 1]}')")
        if p.position == "first" and i != 0:
            raise PipelineError(f"pass '{p.name}' must be the first pass")


def version() -> str:
    from opc import __version__

    return __version__


class PassManager:
    def __init__(self, passes: list[Pass], instruments: list | None = None):
        from opc.instruments import Checker, Timing

        check_order(passes)
        self.passes = passes
        # timing first and checker second so that every later instrument sees a valid model
        self.instruments = [Timing(), Checker()] + list(instruments or [])

    @property
    def pipeline(self) -> str:
        from opc.pipeline import format_pipeline

        return format_pipeline(self.passes)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[onnx.ModelProto, Report]:
        from opc.ir import export_model, import_graph, set_metadata
        from opc.summary import model_summary

        ctx.template = model
        report = Report(pipeline=self.pipeline, before=model_summary(model))
        for inst in self.instruments:
            inst.run_before_pipeline(model, ctx)
        graph = import_graph(model)
        current = model
        done: list[str] = []
        for i, p in enumerate(self.passes):
            record = PassRecord(index=i, name=p.name, canonical=p.canonical(), exact=p.exact,
                                tolerance=tuple(p.tolerance), previous=list(done))
            for inst in self.instruments:
                inst.run_before_pass(record, graph, ctx)
            warnings_before = len(ctx.warnings)
            try:
                result = p.run(graph, ctx)
            except OpcError as exc:
                raise type(exc)(f"pass '{p.name}' failed: {exc}") from exc
            except Exception as exc:
                raise OpcError(
                    f"pass '{p.name}' failed ({type(exc).__name__}: {exc}) "
                    f"(passes before it: {', '.join(done) or 'none'}; rerun with --debug for the traceback)"
                ) from exc
            if result.graph is not None:
                graph = result.graph
            record.modified = bool(result.modified)
            record.stats = dict(result.stats)
            record.details = dict(result.details)
            record.warnings = list(result.warnings) + ctx.warnings[warnings_before:]
            after = export_model(graph, ctx.template)
            for inst in self.instruments:
                inst.run_after_pass(record, current, after, ctx)
            report.passes.append(record)
            current = after
            done.append(p.canonical())
        stats = {r.name if r.name not in [q.name for q in report.passes[: r.index]] else f"{r.name}#{r.index}": r.stats
                 for r in report.passes}
        meta = dict(ctx.metadata)
        meta.update({META_VERSION: version(), META_PIPELINE: self.pipeline,
                     META_STATS: json.dumps(stats, sort_keys=True, separators=(",", ":"), default=str)})
        set_metadata(current, meta)
        report.after = model_summary(current)
        report.warnings = list(ctx.warnings)
        report.passed = all(r.verified is not False for r in report.passes)
        for inst in self.instruments:
            inst.run_after_pipeline(current, ctx, report)
        return current, report
