"""The textual pipeline: ``fold,prune(sparsity=0.5,exclude=[fc1,fc2]),quantize,plan``.

Grammar::

    pipeline := pass ("," pass)*
    pass     := NAME ["(" [option ("," option)*] ")"]
    option   := KEY "=" value
    value    := scalar | "[" [scalar ("," scalar)*] "]" | "{" [scalar ":" scalar ("," ...)*] "}"
    scalar   := bare word (no , ( ) [ ] { } = : quotes or spaces) | 'quoted' | "quoted"

``format_pipeline(parse_pipeline(s))`` is the canonical form: options in declaration
order, defaults left out, so equal pipelines print equal strings and any run can be
reproduced from the string stored in its output model.
"""

from __future__ import annotations

import re

from opc.errors import PipelineError

_SPECIAL = set(",()[]{}=:'\"")
_SAFE = re.compile(r"^[A-Za-z0-9_./+\-]+$")


class _Lexer:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def error(self, what: str) -> PipelineError:
        return PipelineError(f"pipeline {self.text!r}: {what} at position {self.pos}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = self.peek() or "end of text"
            raise self.error(f"expected {ch!r}, found {found!r}")
        self.pos += 1

    def scalar(self) -> str:
        ch = self.peek()
        if ch in ("'", '"'):
            quote = ch
            self.pos += 1
            out = []
            while self.pos < len(self.text):
                c = self.text[self.pos]
                if c == "\\" and self.pos + 1 < len(self.text):
                    out.append(self.text[self.pos + 1])
                    self.pos += 2
                    continue
                if c == quote:
                    self.pos += 1
                    return "".join(out)
                out.append(c)
                self.pos += 1
            raise self.error("unterminated quoted string")
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _SPECIAL and not self.text[self.pos].isspace():
            self.pos += 1
        if start == self.pos:
            raise self.error(f"expected a value, found {ch or 'end of text'!r}")
        return self.text[start : self.pos]

    def value(self):
        ch = self.peek()
        if ch == "[":
            self.pos += 1
            items = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.scalar())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        if ch == "{":
            self.pos += 1
            mapping = {}
            if self.peek() == "}":
                self.pos += 1
                return mapping
            while True:
                key = self.scalar()
                self.expect(":")
                if key in mapping:
                    raise self.error(f"key {key!r} given twice")
                mapping[key] = self.scalar()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("}")
                return mapping
        return self.scalar()


def parse_pipeline_raw(text: str) -> list[tuple[str, dict]]:
    """Split a pipeline string into (pass name, {option: raw value}) without validation."""
    lx = _Lexer(text)
    if not text.strip():
        raise PipelineError("the pipeline is empty (give passes like 'fold,plan')")
    steps = []
    while True:
        name = lx.scalar()
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_\-]*$", name):
            raise lx.error(f"bad pass name {name!r}")
        opts: dict = {}
        if lx.peek() == "(":
            lx.pos += 1
            if lx.peek() != ")":
                while True:
                    key = lx.scalar()
                    lx.expect("=")
                    if key in opts:
                        raise lx.error(f"option {key!r} of {name} given twice")
                    opts[key] = lx.value()
                    if lx.peek() == ",":
                        lx.pos += 1
                        continue
                    break
            lx.expect(")")
        steps.append((name, opts))
        nxt = lx.peek()
        if nxt == "":
            return steps
        lx.expect(",")


def parse_pipeline(text: str, registry=None) -> list:
    """Parse and validate a pipeline string into pass instances."""
    from opc.registry import get_pass_class

    passes = []
    for name, opts in parse_pipeline_raw(text):
        cls = get_pass_class(name) if registry is None else _lookup(registry, name)
        passes.append(cls.from_options(opts))
    return passes


def _lookup(registry, name):
    if name not in registry:
        raise PipelineError(f"unknown pass {name!r} (known passes: {', '.join(sorted(registry))})")
    return registry[name]


def format_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        text = repr(value)
        return text
    text = str(value)
    if _SAFE.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{format_scalar(k)}:{format_scalar(v)}" for k, v in value.items()) + "}"
    return format_scalar(value)


def format_pass(p) -> str:
    opts = p.non_default_options()
    if not opts:
        return p.name
    return p.name + "(" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + ")"


def format_pipeline(passes) -> str:
    return ",".join(format_pass(p) for p in passes)


def canonicalize(text: str) -> str:
    return format_pipeline(parse_pipeline(text))
