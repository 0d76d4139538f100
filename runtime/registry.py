"""Kernel registry: ONNX (domain, op_type) -> a builder called once per node at load.

A builder ``build(node, xp)`` parses attributes and returns ``run(inputs, outs, ws)``:
``inputs`` are arrays (None for an omitted optional input); ``outs`` is None or a list
with one preallocated view per output (None where there is none); ``ws`` is a uint8
scratch buffer of ``workspace(node, shapes, dtypes)`` bytes, or None. ``run`` returns
the outputs (one array or a list). A kernel may write into ``outs[i]`` when its shape
and dtype match what it computes; otherwise the session copies the result in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from opc.errors import ModelError


@dataclass
class Spec:
    build: Callable
    alias: bool = False  # output 0 may be a view of input 0 (Reshape, Squeeze, Identity...)
    workspace: Callable | None = None  # (node, shapes, dtypes) -> bytes
    dynamic: bool = False  # output shapes depend on input values, not only input shapes


KERNELS: dict[tuple[str, str], Spec] = {}


def kernel(*ops: str, domain: str = "", alias: bool = False, workspace=None, dynamic: bool = False):
    def deco(build):
        for op in ops:
            KERNELS[(domain, op)] = Spec(build, alias, workspace, dynamic)
        return build
    return deco


@dataclass
class Node:
    op_type: str
    domain: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    proto: Any = None
    subgraphs: dict[str, Any] = field(default_factory=dict)

    def a(self, key, default=None):
        return self.attrs.get(key, default)

    def where(self) -> str:
        return f"node '{self.name or self.outputs[0]}' ({self.op_type})"

    def fail(self, what: str):
        raise ModelError(f"{self.where()}: {what}")


def attr_value(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if attr.type == onnx.AttributeProto.GRAPH:
        return attr.g
    if attr.type == onnx.AttributeProto.STRING:
        return attr.s.decode("utf-8", "replace")
    if attr.type == onnx.AttributeProto.STRINGS:
        return [s.decode("utf-8", "replace") for s in attr.strings]
    if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        raise ModelError(f"attribute '{attr.name}': sparse tensors are not supported")
    return onnx.helper.get_attribute_value(attr)


def out_if(outs, i: int, shape, dtype):
    """The preallocated output view ``i`` if it has exactly this shape and dtype."""
    if outs is None or i >= len(outs):
        return None
    o = outs[i]
    if o is not None and o.shape == tuple(shape) and o.dtype == dtype:
        return o
    return None


def const_input(node, i: int) -> bool:
    """True when input ``i`` of ``node`` is a load-time constant (an initializer or a folded
    value that no feed can override): a kernel may cache what it derives from it across runs.
    Set by ``compile_graph`` (``node.const_ins``); False before that or for a missing input."""
    c = getattr(node, "const_ins", ())
    return i < len(c) and c[i]


def np_dtype(elem_type: int):
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def supported_ops() -> list[str]:
    return sorted(op if not d else f"{d}.{op}" for d, op in KERNELS)
