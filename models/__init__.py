"""opc.models: the PyTorch model zoo, exported to ONNX on demand.

Three families that inference optimization serves: image classification (digits-cnn,
resnet18, mobilenetv2, efficientnet-lite0), speech (kws-lstm) and language (bert-tiny,
minilm-l6). Every model comes with calibration/evaluation data: real where we have it
(scikit-learn digits, foolbox's 20 labelled ImageNet images, real sentences), else
seeded random data marked ``synthetic``.

Names and data (``list_models``, ``describe``, ``sample_data``, ``eval_set``) work without
torch; building or exporting a model needs the ``torch`` extra and raises a one-line
``OpcError`` otherwise.

    export(name, path, opset=None, batch=1, dynamic_batch=False) -> Path
    sample_data(name, n, split="calib") -> {input name: array}   (model inputs only)
    eval_set(name, n=None) -> EvalSet(inputs, labels, synthetic, source)
    torch_outputs(name, feeds) -> {output name: array}           (the PyTorch reference)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path

import numpy as np

from opc.errors import OpcError, UsageError

DEFAULT_OPSET = 17


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str            # "vision" | "speech" | "language"
    summary: str
    module: str            # opc.models.<module> implementing the model
    data: str              # where its calibration/evaluation data comes from
    synthetic: bool        # True when that data is seeded random, not real


_RANDOM_VISION_DATA = ("real images: foolbox's 40 CIFAR images upscaled (calibration), its 20 ImageNet images "
                       "(eval; the weights are random, so compare against fp32, not labels)")
_ZOO = [
    ModelInfo("digits-cnn", "vision", "LeNet-style CNN trained at export time on sklearn digits (1x8x8)",
              "digits_model", "real: scikit-learn digits (train split for calibration, 360 held out)", False),
    ModelInfo("resnet18", "vision", "ResNet-18, ImageNet-shaped (3x224x224), seeded weights",
              "vision", _RANDOM_VISION_DATA, False),
    ModelInfo("mobilenetv2", "vision", "MobileNetV2, ImageNet-shaped (3x224x224), seeded weights",
              "vision", _RANDOM_VISION_DATA, False),
    ModelInfo("efficientnet-lite0", "vision", "EfficientNet-Lite0 with its pretrained ImageNet weights (3x224x224)",
              "vision", ("real: foolbox's 20 labelled ImageNet images (eval), "
               "its 40 CIFAR images upscaled (calibration)"), False),
    ModelInfo("kws-lstm", "speech", "keyword spotting: conv front end + 2-layer LSTM on 49x40 MFCC frames, 12 classes",
              "kws", "synthetic: seeded MFCC-shaped random features", True),
    ModelInfo("bert-tiny", "language", "transformer encoder, 2 layers, hidden 128, 2 heads, seq 32, seeded weights",
              "text", "real sentences tokenized with MiniLM's vocabulary (weights seeded random)", False),
    ModelInfo("minilm-l6", "language",
              "all-MiniLM-L6-v2 with its real weights, mean-pooled sentence embeddings, seq 32",
              "text", "real: 32 sentence pairs (16 paraphrases, 16 unrelated)", False),
]
MODELS = {m.name: m for m in _ZOO}


@dataclasses.dataclass
class EvalSet:
    """Evaluation inputs with their labels (None when there are none) and provenance."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    synthetic: bool
    source: str
    metric: str = "top1"   # "top1": argmax vs labels; "pairs": cosine of sentence pairs vs 0/1 labels


def list_models() -> list[str]:
    return list(MODELS)


def describe(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model '{name}' (models: {', '.join(MODELS)})") from None


def require_torch():
    try:
        import torch
    except ImportError:
        raise OpcError("this needs PyTorch: pip install 'opc[torch]'") from None
    return torch


def _impl(name: str):
    # the model modules import torch only inside the functions that build modules, so
    # names and data (sample_data, eval_set) work without torch
    return importlib.import_module(f"opc.models.{describe(name).module}")


@functools.lru_cache(maxsize=None)
def build(name: str):
    """The PyTorch module in eval mode (cached: training/loading happens once per process)."""
    require_torch()
    module = _impl(name).build(name)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def input_names(name: str) -> list[str]:
    return list(_impl(name).input_names(name))


def output_names(name: str) -> list[str]:
    return list(_impl(name).output_names(name))


def sample_data(name: str, n: int, split: str = "calib") -> dict[str, np.ndarray]:
    """``n`` samples of the model's inputs keyed by ONNX input name (ready for np.savez / ORT).

    split "calib" draws from training/calibration data, "eval" from held-out data (the
    same rows as ``eval_set``); where the set is smaller than ``n`` it repeats.
    """
    if split not in ("calib", "eval"):
        raise UsageError(f"split must be 'calib' or 'eval', not {split!r}")
    if n < 1:
        raise UsageError(f"need at least 1 sample, not {n}")
    arrays = _impl(name).sample_data(name, n, split)
    return {k: _take(v, n) for k, v in arrays.items()}


def eval_set(name: str, n: int | None = None) -> EvalSet:
    es = _impl(name).eval_set(name)
    if n is not None:
        es.inputs = {k: v[:n] for k, v in es.inputs.items()}
        if es.labels is not None:
            es.labels = es.labels[: n // 2 if es.metric == "pairs" else n]
    return es


def _take(arr: np.ndarray, n: int) -> np.ndarray:
    if len(arr) >= n:
        return np.ascontiguousarray(arr[:n])
    reps = -(-n // len(arr))
    return np.ascontiguousarray(np.concatenate([arr] * reps)[:n])


def torch_outputs(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the PyTorch module on ``feeds``; the reference the ONNX export must match."""
    torch = require_torch()
    module = build(name)
    args = [torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in input_names(name)]
    with torch.no_grad():
        out = module(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {k: v.numpy() for k, v in zip(output_names(name), outs)}


EXPORTERS = ("torchscript", "dynamo")


def export(name: str, path: str | Path, opset: int | None = None, batch: int = 1,
           dynamic_batch: bool = False, exporter: str = "torchscript") -> Path:
    """Export model ``name`` to ONNX at ``path`` (atomically) and return the path.

    exporter "torchscript" (default): torch.onnx.export(dynamo=False). It handles every
    model here at opsets 11-20 with no extra dependency and leaves the graph as traced
    (BatchNorm folded into Conv, shape arithmetic kept), what most deployed models
    look like. "dynamo": torch.onnx.export(dynamo=True) through torch.export (needs
    onnxscript; opset >= 18, default 18); it runs onnxscript's optimizer, so the graph
    is already smaller (e.g. efficientnet-lite0 93 nodes instead of 244).
    The batch axis is ``batch`` or, with ``dynamic_batch``, a symbolic "batch" dim.
    """
    import onnx

    from opc.ir import save_model, set_metadata

    torch = require_torch()
    info = describe(name)
    if exporter not in EXPORTERS:
        raise UsageError(f"--exporter {exporter}: choose one of {', '.join(EXPORTERS)}")
    low = 18 if exporter == "dynamo" else 11
    opset = (DEFAULT_OPSET if exporter == "torchscript" else 18) if opset is None else int(opset)
    if not low <= opset <= 20:
        raise UsageError(f"--opset {opset}: the {exporter} exporter supports opsets {low} to 20")
    if batch < 1:
        raise UsageError(f"--batch {batch}: must be >= 1")
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"-o {path}: is a folder")
    ins, outs = input_names(name), output_names(name)
    # torch.export specializes axes of size 1, so a dynamic batch is traced with 2 samples
    example = sample_data(name, 2 if dynamic_batch and exporter == "dynamo" and batch == 1 else batch, "calib")
    args = tuple(torch.from_numpy(example[k]) for k in ins)
    dynamic_axes = {k: {0: "batch"} for k in ins + outs} if dynamic_batch else None
    module = build(name)
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                model = _export_dynamo(torch, module, args, ins, outs, opset, dynamic_batch)
            else:
                buf = io.BytesIO()
                torch.onnx.export(module, args, buf, input_names=ins, output_names=outs, opset_version=opset,
                                  dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False)
                model = onnx.load_from_string(buf.getvalue())
    except OpcError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OpcError(f"torch.onnx.export ({exporter}) failed for {name}: {first}") from None
    if dynamic_batch:
        fixed = [v.name for v in list(model.graph.input) + list(model.graph.output)
                 if not v.type.tensor_type.shape.dim[0].dim_param]
        if fixed:
            raise OpcError(f"{exporter} export of {name} fixed the batch axis of {', '.join(fixed)}")
    model.producer_name = "opc.models"
    set_metadata(model, {"opc.model": name, "opc.model.data": info.data,
                         "opc.model.exporter": f"torch.onnx.export(dynamo={exporter == 'dynamo'}) "
                                               f"torch {torch.__version__}"})
    onnx.checker.check_model(model)
    return save_model(model, path)


def _export_dynamo(torch, module, args, ins, outs, opset, dynamic_batch):
    import importlib.util
    import logging

    if importlib.util.find_spec("onnxscript") is None:  # the dynamo exporter's dependency
        raise OpcError("--exporter dynamo needs onnxscript: pip install onnxscript")
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in ins)  # by position: the forward() argument names differ
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    program = torch.onnx.export(module, args, None, input_names=ins, output_names=outs, opset_version=opset,
                                dynamic_shapes=shapes, dynamo=True, optimize=True, verbose=False)
    return program.model_proto
