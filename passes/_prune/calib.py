"""Running a model on calibration batches and fetching intermediate tensors.

ONNX Runtime returns only graph outputs, so the tensors of interest are added as extra
outputs on a copy of the model. Tensors that are graph inputs come from the feeds.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A model whose outputs are exactly ``names`` (graph inputs skipped), holding only the
    nodes and initializers those tensors depend on: each calibration run then computes
    only up to the layers of interest, and large models are not copied whole."""
    src = model.graph
    inputs = {i.name for i in src.input}
    wanted = list(dict.fromkeys(n for n in names if n not in inputs))
    needed = set(wanted)
    keep = []
    for node in reversed(src.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # outer names used inside subgraphs
                for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    needed.update(i for n in g.node for i in n.input)
    out = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    graph = out.graph
    graph.name = src.name
    graph.input.extend(src.input)
    graph.node.extend(reversed(keep))
    graph.initializer.extend(t for t in src.initializer if t.name in needed)
    graph.sparse_initializer.extend(t for t in src.sparse_initializer if t.values.name in needed)
    # an output without a type: ORT infers it
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted)
    return out


class Tap:
    """A session that yields the named tensors of ``model`` for each calibration batch."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str], make_session):
        self.names = list(dict.fromkeys(names))
        self.inputs = {i.name for i in model.graph.input}
        fetched = [n for n in self.names if n not in self.inputs]
        self.fetched = fetched
        self.session = make_session(with_outputs(model, fetched)) if fetched else None
        self.feed_names = {i.name for i in self.session.get_inputs()} if self.session else self.inputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        if self.session is not None:
            values = self.session.run(self.fetched, {k: v for k, v in feeds.items() if k in self.feed_names})
            out.update(zip(self.fetched, values))
        for n in self.names:
            if n in self.inputs:
                out[n] = feeds[n]
        return out


def batches(ctx, batch: int, samples: int) -> Iterator[dict[str, np.ndarray]]:
    """At most ``samples`` calibration samples in batches of ``batch``."""
    seen = 0
    for feeds in ctx.calibration_batches(batch):
        if seen >= samples:
            break
        take = min(samples - seen, len(next(iter(feeds.values()))))
        seen += take
        yield {k: v[:take] for k, v in feeds.items()}
