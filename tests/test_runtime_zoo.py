"""The runtime on the zoo (PyTorch exports) and on quantized (QDQ) models, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

import opc.runtime as rt
from opc.ir import load_model
from opc.ort import compare, make_session, seeded_feeds

ZOO = ["resnet18", "mobilenetv2", "bert-tiny", "kws-lstm", "efficientnet-lite0", "minilm-l6"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_ort(zoo, name):
    model = load_model(zoo(name, dynamic_batch=True))
    sess = rt.Session(model, backend="numpy", threads=1)
    ort = make_session(model, threads=1)
    for batch in (1, 2):
        shapes = {i.name: tuple([batch] + [d if isinstance(d, int) else 1 for d in i.shape[1:]])
                  for i in sess.get_inputs()}
        feeds = seeded_feeds(model, shapes, seed=batch)
        ref = ort.run(None, feeds)
        for _ in range(2):  # shapes resolved, then inside the arena
            for r, g in zip(ref, sess.run(None, feeds)):
                m = compare(r, g)
                assert m["max_rel"] <= 1e-4, (name, batch, m)


def test_quantized_model_within_one_step(digits_assets):
    """A QDQ model from opc's quantize pass: outputs within one quantization step of ORT's."""
    import opc

    qmodel, _ = opc.compile(digits_assets["model"], passes="quantize", calibration=digits_assets["calib"])
    ops = {n.op_type for n in qmodel.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    with np.load(digits_assets["eval"]) as z:
        feeds = {k: z[k][:64] for k in z.files}
    sess = rt.Session(qmodel, backend="numpy")
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    ref = make_session(qmodel, threads=1).run(None, feeds)
    # one step = the scale of the last activation (per-tensor) DequantizeLinear before the output
    from onnx import numpy_helper

    scales = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    steps = [float(scales[n.input[1]]) for n in qmodel.graph.node
             if n.op_type == "DequantizeLinear" and n.input[1] in scales and scales[n.input[1]].size == 1]
    step = steps[-1]
    for _ in range(2):
        for r, g in zip(ref, sess.run(None, feeds)):
            assert np.max(np.abs(r - g)) <= step * 1.001
            assert (np.argmax(r, 1) == np.argmax(g, 1)).mean() >= 0.98
