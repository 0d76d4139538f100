"""The pipeline string: parsing, option coercion, canonical printing, errors."""

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from opc.errors import PipelineError
from opc.pass_api import Pass, option
from opc.pipeline import format_pipeline, parse_pipeline, parse_pipeline_raw


@dataclass
class Alpha(Pass):
    name: ClassVar[str] = "alpha"
    sparsity: float = option(0.5, "fraction", low=0.0, high=1.0)
    mode: Literal["unstructured", "nm", "channels"] = option("unstructured", "pattern")
    n: int = option(2, "n of n:m", low=1)
    reconstruct: bool = option(True, "refit")
    exclude: tuple[str, ...] = option((), "nodes to skip")
    layers: dict[str, float] | None = option(None, "per-layer overrides")
    label: str | None = option(None, "free text")


@dataclass
class Beta(Pass):
    name: ClassVar[str] = "beta"


REG = {"alpha": Alpha, "beta": Beta}


def parse(text):
    return parse_pipeline(text, registry=REG)


def test_defaults_print_bare_names():
    assert format_pipeline(parse("alpha,beta")) == "alpha,beta"
    assert format_pipeline(parse(" alpha ( ) , beta ")) == "alpha,beta"


@pytest.mark.parametrize(
    "text",
    [
        "alpha(sparsity=0.8,mode=nm,n=4),beta",
        "alpha(reconstruct=false)",
        "alpha(exclude=[conv1,/layer1/conv/Conv,fc.weight])",
        "alpha(exclude=['has space','a,b','q\\'uote'])",
        "alpha(layers={conv1:0.3,'x:y':0.9})",
        "alpha(label='(weird) = [text]')",
        "beta,alpha(sparsity=0.25),beta",
    ],
)
def test_round_trip(text):
    passes = parse(text)
    canonical = format_pipeline(passes)
    again = parse(canonical)
    assert format_pipeline(again) == canonical
    assert [p.options() for p in again] == [p.options() for p in passes]


def test_coercion_and_canonical_order():
    (p,) = parse("alpha(n=4,sparsity=.8,reconstruct=no,exclude=[b,a])")
    assert p.sparsity == 0.8 and isinstance(p.sparsity, float)
    assert p.n == 4 and p.reconstruct is False
    assert p.exclude == ("b", "a")
    # declaration order, defaults dropped
    assert format_pipeline([p]) == "alpha(sparsity=0.8,n=4,reconstruct=false,exclude=[b,a])"
    (q,) = parse("alpha(layers={c1:0.5},label=none)")
    assert q.layers == {"c1": 0.5} and q.label is None


def test_default_value_given_explicitly_is_dropped():
    assert format_pipeline(parse("alpha(sparsity=0.5,mode=unstructured)")) == "alpha"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("gamma", "unknown pass 'gamma'"),
        ("alpha(foo=1)", "no option 'foo' (valid options: sparsity, mode, n, reconstruct, exclude, layers, label)"),
        ("alpha(sparsity=abc)", "'abc' is not a number"),
        ("alpha(sparsity=1.5)", "outside [0.0, 1.0]"),
        ("alpha(sparsity=nan)", "not a finite number"),
        ("alpha(n=2.5)", "not an integer"),
        ("alpha(n=0)", "outside"),
        ("alpha(mode=dense)", "not one of unstructured, nm, channels"),
        ("alpha(reconstruct=maybe)", "not a boolean"),
        ("alpha(exclude={a:b})", "expected a list"),
        ("alpha(sparsity=[1,2])", "expected a single"),
        ("alpha(layers=[a])", "expected a map"),
        ("alpha(layers={a:x})", "not a number"),
        ("alpha(n=1,n=2)", "given twice"),
        ("alpha(n=1", "expected ')'"),
        ("alpha,", "expected a value"),
        ("alpha(label='open)", "unterminated"),
        ("alpha beta", "expected ','"),
        ("alpha(=1)", "expected a value"),
        ("9lives", "bad pass name"),
    ],
)
def test_errors_name_the_problem(text, message):
    with pytest.raises(PipelineError) as exc:
        parse(text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_raw_parse_keeps_structure():
    assert parse_pipeline_raw("a(x=[1,2],y={k:v}),b") == [("a", {"x": ["1", "2"], "y": {"k": "v"}}), ("b", {})]


def test_real_registry_lists_every_pass_and_rejects_unknown():
    from opc.registry import DEFAULT_PIPELINE, PASSES

    assert "fold" in PASSES
    for name in DEFAULT_PIPELINE.split(","):
        assert name in PASSES
    with pytest.raises(PipelineError, match="known passes"):
        parse_pipeline("nosuchpass")
    assert format_pipeline(parse_pipeline("fold(max_rounds=20)")) == "fold"
    assert format_pipeline(parse_pipeline("fold(max_rounds=3)")) == "fold(max_rounds=3)"
