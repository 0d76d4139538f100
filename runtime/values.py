"""Values that are not device tensors: sequences (``Sequence``, a Python list of arrays), empty
optionals (None) and tensors of strings (NumPy object arrays, kept on the host: CuPy has no
strings).

A kernel returns one output or a plain list/tuple of outputs; a sequence is a ``Sequence`` so
that a kernel passing one through (Identity) is not read as several outputs. Callers of
``Session.run`` get plain lists.

They flow through the plan like tensors but never enter the arena, never become static
per-signature values and never go to the device. The kernels that make or read them
(``k_sequence``, ``k_string``) are marked ``dynamic`` so a signature holding one runs
without a CUDA graph.
"""

from __future__ import annotations

import numpy as np


class Sequence(list):
    """An ONNX sequence: its tensors in order. Kernels never modify one in place."""


def is_host_object(v) -> bool:
    """A sequence, an empty optional or a string tensor: a value the arena must not hold."""
    return v is None or isinstance(v, list) or (isinstance(v, np.ndarray) and v.dtype.kind in "OUS")


def is_tensor(v, xp) -> bool:
    """A numeric (or bool) array of the backend: a value the arena may hold."""
    return isinstance(v, xp.ndarray) and v.dtype.kind not in "OUS"


def feed_value(xp, v):
    """A feed on the backend: tensors to ``xp``; strings as host object arrays; a sequence
    element by element; None (an empty optional) as it is."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):  # elements copied: a sequence never holds the caller's arrays
        return Sequence(_fresh(feed_value(xp, x), x) for x in v)
    if not hasattr(v, "dtype") or not hasattr(v, "shape"):
        v = np.asarray(v)
    if v.dtype.kind in "OUS":
        return np.asarray(v).astype(object)
    return xp.asarray(v)


def _fresh(v, orig):
    return v.copy() if v is orig or (isinstance(orig, np.ndarray) and np.shares_memory(v, orig)) else v


def type_name(tp) -> str:
    """ONNX Runtime's name for a value type: ``tensor(float)``, ``seq(tensor(string))``,
    ``optional(seq(tensor(int64)))``."""
    import onnx

    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        name = onnx.TensorProto.DataType.Name(tp.tensor_type.elem_type).lower()
        return "tensor(" + {"float": "float", "undefined": "unknown"}.get(name, name) + ")"
    if kind == "sequence_type":
        return f"seq({type_name(tp.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({type_name(tp.optional_type.elem_type)})"
    return "unknown"


def signature(v):
    """What a value contributes to a run's input signature."""
    if v is None:
        return None
    if isinstance(v, list):
        return ("seq", tuple(signature(x) for x in v))
    return (tuple(v.shape), v.dtype.str)


def host_value(v, to_host):
    """A result for the caller: arrays through ``to_host``, sequences element by element."""
    if v is None:
        return None
    if isinstance(v, list):
        return [host_value(x, to_host) for x in v]
    if isinstance(v, np.ndarray) and v.dtype.kind == "O":
        return v
    return to_host(v)


def copy_value(v):
    """A copy the caller may edit (graph outputs that are weights, feeds or cached values)."""
    if v is None:
        return None
    if isinstance(v, list):
        return [copy_value(x) for x in v]
    return v.copy()
