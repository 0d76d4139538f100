"""The pass interface: typed options, a context, and a result with statistics.

A pass is a dataclass whose fields are its options::

    @dataclass
    class Prune(Pass):
        name: ClassVar[str] = "prune"
        sparsity: float = option(0.5, "fraction of weights set to zero", low=0.0, high=1.0)
        mode: Literal["unstructured", "nm", "channels"] = option("unstructured", "pattern")

        def run(self, graph, ctx):
            ...
            return PassResult(modified=True, stats={"weights_pruned": n})

The pipeline parser coerces option strings through the field types (bool, int, float,
str, Literal[...] choices, tuple[str, ...] lists, dict[str, float] maps), so a pass never
parses text itself. Timing, diffs and verification are the manager's job, not the pass's.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np

from opc.errors import PipelineError

log = logging.getLogger("opc")


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None):
    """A pass option: a dataclass field with a help text and an optional numeric range."""
    meta = {"help": help, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a mapping proxy for mutable defaults")
    return field(default=default, metadata=meta)


@dataclass
class PassResult:
    """What a pass reports: whether it changed the graph, and named statistics.

    ``graph`` replaces the input graph when the pass built a new one (functional passes);
    ``details`` holds JSON-serialisable tables (e.g. a sensitivity table) for the report.
    """

    modified: bool
    stats: dict[str, int | float | str] = field(default_factory=dict)
    graph: Any = None
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may use besides the graph.

    ``metadata`` entries are written into the output model's metadata_props (the plan
    pass stores its memory plan there). ``calibration`` is a ``CalibrationData`` when the
    user gave ``--calibration-data``.
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calibration: Any = None
    metadata: dict[str, str] = field(default_factory=dict)
    model_dir: Path | None = None
    seed: int = 0
    progress: bool = False
    allow_custom_ops: bool = False
    # the ModelProto fields a graph export must keep (ir_version, opsets, producer...)
    template: Any = None
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    def to_model(self, graph):
        """Export a graph to a ModelProto with this run's model-level fields."""
        from opc.ir import export_model

        return export_model(graph, self.template)

    def ort_session(self, model_or_graph, **kwargs):
        """An ONNX Runtime session (CPU; CUDA only when a GPU is present)."""
        from opc.ort import make_session

        model = model_or_graph
        if not hasattr(model, "SerializeToString"):
            model = self.to_model(model_or_graph)
        return make_session(model, **kwargs)

    def calibration_batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        if self.calibration is None:
            from opc.errors import DataError

            raise DataError("this pass needs --calibration-data (an .npz with one array per model input)")
        return self.calibration.batches(batch_size)


class Pass:
    """Base class of every pass. Subclasses are dataclasses; their fields are options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # exact: outputs must equal the input's within `tolerance`; lossy passes only report error
    exact: ClassVar[bool] = True
    tolerance: ClassVar[tuple[float, float]] = (1e-5, 1e-5)  # (rtol, atol relative to max |y|)
    # names of passes that must appear earlier in the pipeline
    requires: ClassVar[tuple[str, ...]] = ()
    # "first", "last" or "any": where in the pipeline the pass must sit
    position: ClassVar[str] = "any"

    def run(self, graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- options ---------------------------------------------------------------------
    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_options(cls, raw: dict[str, Any]) -> "Pass":
        fields = {f.name: f for f in cls.option_fields()}
        hints = cls.option_types()
        values = {}
        for key, value in raw.items():
            if key not in fields:
                valid = ", ".join(fields) or "none"
                raise PipelineError(f"pass '{cls.name}' has no option '{key}' (valid options: {valid})")
            values[key] = coerce(cls.name, key, value, hints[key], fields[key].metadata)
        return cls(**values)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.option_fields()}

    def non_default_options(self) -> dict[str, Any]:
        out = {}
        for f in self.option_fields():
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = value
        return out

    def canonical(self) -> str:
        from opc.pipeline import format_pass

        return format_pass(self)


def type_label(tp: Any) -> str:
    """How `opc passes` shows an option's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "list[str]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"map[{type_label(k)}:{type_label(v)}]"
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_label(a) for a in typing.get_args(tp) if a is not type(None)) + "|none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(pass_name: str, key: str, value: Any, tp: Any, meta: Any) -> Any:
    """Turn a parsed option value (str, list or dict of str) into the field's type."""
    where = f"{pass_name}({key}=...)"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(pass_name, key, value, a, meta)
            except PipelineError as e:
                errors.append(str(e))
        raise PipelineError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = [str(a) for a in args]
        if str(value) not in choices:
            raise PipelineError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return args[choices.index(str(value))]
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(not isinstance(v, str) for v in items):
            raise PipelineError(f"{where}: expected a list of names like [a,b]")
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a map like {{name:value,...}}")
        kt, vt = args
        return {coerce(pass_name, key, k, kt, {}): coerce(pass_name, key, v, vt, meta) for k, v in value.items()}
    if isinstance(value, (list, dict)):
        raise PipelineError(f"{where}: expected a single {type_label(tp)}, got a {type(value).__name__}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise PipelineError(f"{where}: {value!r} is not a boolean (true or false)")
    if tp in (int, float):
        try:
            number = tp(value) if not isinstance(value, str) else (int(value, 0) if tp is int else float(value))
        except (TypeError, ValueError):
            raise PipelineError(f"{where}: {value!r} is not a{'n integer' if tp is int else ' number'}") from None
        if isinstance(number, float) and not np.isfinite(number):
            raise PipelineError(f"{where}: {value!r} is not a finite number")
        low, high = (meta or {}).get("low"), (meta or {}).get("high")
        if (low is not None and number < low) or (high is not None and number > high):
            raise PipelineError(f"{where}: {value!r} is outside [{low}, {high}]")
        return number
    if tp is str:
        return str(value)
    raise PipelineError(f"{where}: unsupported option type {tp!r}")
