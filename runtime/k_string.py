"""String ops, on the host: StringConcat, StringSplit, StringNormalizer, RegexFullMatch and
ai.onnx.ml LabelEncoder.

CuPy has no strings, so a tensor of strings is a NumPy object array of ``str`` on either
backend (``runtime/values.py``) and these kernels run in Python on the host. A numeric input
on CuPy is copied to the host and a numeric result back to the device: on the GPU every one of
these ops synchronizes with the device. All are ``dynamic`` (never in the arena, never in a
CUDA graph). RegexFullMatch uses Python's ``re`` (ONNX names RE2: the syntax both share, i.e.
everything but backreferences and lookaround, behaves the same).
"""

from __future__ import annotations

import math
import re

import numpy as np

from opc.runtime.registry import kernel
from opc.runtime.xp import to_host


def _text(s) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else str(s)


def _strings(node, x) -> np.ndarray:
    """A host object array of ``str``."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "OUS":
        node.fail(f"expected a tensor of strings, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dtype.kind == "O" and all(isinstance(s, str) for s in x.flat):
        return x
    return _objects([_text(s) for s in x.flat], x.shape)


def _objects(items, shape) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


@kernel("StringConcat", dynamic=True)
def _string_concat(node, xp):
    def run(ins, outs, ws):
        a, b = (_strings(node, v) for v in ins)
        a2, b2 = np.broadcast_arrays(a, b)
        return _objects([x + y for x, y in zip(a2.flat, b2.flat)], a2.shape)
    return run


@kernel("StringSplit", dynamic=True)
def _string_split(node, xp):
    sep = node.a("delimiter") or None  # unset or "": runs of whitespace, ends trimmed
    maxsplit = node.a("maxsplit")
    maxsplit = -1 if maxsplit is None else int(maxsplit)

    def run(ins, outs, ws):
        x = _strings(node, ins[0])
        parts = [s.split(sep, maxsplit) if s else [] for s in x.flat]  # "": no substrings (as ONNX Runtime)
        width = max((len(p) for p in parts), default=0)
        y = _objects([q for p in parts for q in p + [""] * (width - len(p))], x.shape + (width,))
        counts = np.array([len(p) for p in parts], dtype=np.int64).reshape(x.shape)
        return [y, xp.asarray(counts)]
    return run


@kernel("StringNormalizer", dynamic=True)
def _string_normalizer(node, xp):
    action = node.a("case_change_action", "NONE")
    if action not in ("NONE", "LOWER", "UPPER"):
        node.fail(f"case_change_action '{action}' is not NONE, LOWER or UPPER")
    sensitive = bool(node.a("is_case_sensitive", 0))
    stops = list(node.a("stopwords") or [])
    stop_set = set(stops) if sensitive else {s.lower() for s in stops}
    change = {"LOWER": str.lower, "UPPER": str.upper}.get(action, lambda s: s)

    def run(ins, outs, ws):
        x = _strings(node, ins[0])
        if not (x.ndim == 1 or (x.ndim == 2 and x.shape[0] == 1)):
            node.fail(f"input must have shape [C] or [1, C], got {list(x.shape)}")
        kept = [change(s) for s in x.reshape(-1) if (s if sensitive else s.lower()) not in stop_set]
        if not kept:
            kept = [""]  # ONNX: everything removed leaves one empty string
        return _objects(kept, (len(kept),) if x.ndim == 1 else (1, len(kept)))
    return run


@kernel("RegexFullMatch", dynamic=True)
def _regex_full_match(node, xp):
    pattern = node.a("pattern")
    if pattern is None:
        node.fail("attribute 'pattern' is required")
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        node.fail(f"pattern {pattern!r} is not a valid regular expression ({exc})")

    def run(ins, outs, ws):
        x = _strings(node, ins[0])
        hits = np.array([rx.fullmatch(s) is not None for s in x.flat], dtype=bool).reshape(x.shape)
        return xp.asarray(hits)
    return run


def _attr_list(node, kind: str):
    """keys_*/values_* of LabelEncoder: (list of Python values, numpy dtype) or None."""
    for suffix, dtype in (("strings", np.dtype(object)), ("int64s", np.dtype(np.int64)),
                          ("floats", np.dtype(np.float32))):
        v = node.a(f"{kind}_{suffix}")
        if v is not None:
            return [float(a) if suffix == "floats" else a for a in v], dtype
    t = node.a(f"{kind}_tensor")
    if t is not None:
        t = np.asarray(t)
        if t.dtype.kind in "OUS":
            return [_text(a) for a in t.reshape(-1)], np.dtype(object)
        return [a.item() for a in t.reshape(-1)], t.dtype
    return None


def _default(node, dtype):
    t = node.a("default_tensor")
    if t is not None:
        v = np.asarray(t).reshape(-1)[0]
        return _text(v) if dtype.kind == "O" else v.item()
    if dtype.kind == "O":
        return node.a("default_string", "_Unused")
    if dtype.kind in "iu":
        return node.a("default_int64", -1)
    return node.a("default_float", -0.0)


@kernel("LabelEncoder", domain="ai.onnx.ml", dynamic=True)
def _label_encoder(node, xp):
    classes = node.a("classes_strings")
    if classes is not None:  # LabelEncoder-1: strings <-> their index in classes_strings
        by_string = ({s: i for i, s in enumerate(classes)}, node.a("default_int64", -1), np.dtype(np.int64))
        by_index = (dict(enumerate(classes)), node.a("default_string", "_Unused"), np.dtype(object))
    else:
        keys, values = _attr_list(node, "keys"), _attr_list(node, "values")
        if keys is None or values is None:
            node.fail("needs one keys_* and one values_* attribute")
        if len(keys[0]) != len(values[0]):
            node.fail(f"{len(keys[0])} keys but {len(values[0])} values")
        table = dict(zip(keys[0], values[0]))
        # NaN != NaN: a NaN key is looked up by hand
        nan_key = [v for k, v in zip(keys[0], values[0]) if isinstance(k, float) and math.isnan(k)]
        mapping = (table, _default(node, values[1]), values[1])

    def run(ins, outs, ws):
        x = ins[0]
        if isinstance(x, np.ndarray) and x.dtype.kind in "OUS":
            items, is_str = list(_strings(node, x).flat), True
        else:
            items, is_str = to_host(x).reshape(-1).tolist(), False  # Python ints / floats
        if classes is not None:
            table, default, out_dtype = by_string if is_str else by_index
            nan = []
        else:
            table, default, out_dtype = mapping
            nan = nan_key
        got = [nan[0] if nan and isinstance(k, float) and k != k else table.get(k, default) for k in items]
        if out_dtype.kind == "O":
            return _objects(got, tuple(x.shape))
        return xp.asarray(np.array(got, dtype=out_dtype).reshape(tuple(x.shape)))
    return run
