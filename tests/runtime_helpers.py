"""Shared helpers of the runtime tests: onnx's light models with seeded random weights."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from opc.ort import seeded_feeds

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(f[:-5] for f in os.listdir(LIGHT_DIR) if f.startswith("light_") and f.endswith(".onnx")) if os.path.isdir(LIGHT_DIR) else []


def light_model(name: str, randomize: bool = True, seed: int = 0) -> onnx.ModelProto:
    """A light model; with ``randomize`` its ConstantOfShape weights (one value repeated, which
    makes every output equal) become seeded random initializers: He-scaled signed values for
    Conv/Gemm weights, the constant times U(0.9, 1.1) for everything else (BN statistics stay positive)."""
    m = onnx.load(os.path.join(LIGHT_DIR, name + ".onnx"))
    if not randomize:
        return m
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    weight_of = set()
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 1:
            weight_of.add(n.input[1])
    keep, new_inits = [], []
    for n in m.graph.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            keep.append(n)
            continue
        shape = [int(d) for d in inits[n.input[0]]]
        value = numpy_helper.to_array(n.attribute[0].t).reshape(-1)[0] if n.attribute else np.float32(0)
        arr = rng.random(shape, dtype=np.float32)  # float32 draws: the FC weights of vgg19 are 400 MB
        if n.output[0] in weight_of:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            arr -= np.float32(0.5)
            arr *= np.float32(2 * np.sqrt(6.0 / max(fan_in, 1)))
        else:
            arr *= np.float32(0.2 * float(value))
            arr += np.float32(0.9 * float(value))
        new_inits.append(numpy_helper.from_array(arr, n.output[0]))
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.initializer.extend(new_inits)
    m.ir_version = max(m.ir_version, 4)  # IR 3 requires every initializer to be a graph input
    return m


def light_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    return seeded_feeds(model, seed=seed)  # light models: fixed-shape float32 inputs


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
