"""quantize: static post-training int8 quantization in QDQ form.

Rewrite cases (each counted in ``stats``):
- Conv / ConvTranspose / Gemm / MatMul (``quantized_<op>``): activation inputs get a
  QuantizeLinear -> DequantizeLinear pair; constant weights (initializers or Constant
  nodes) become int8 symmetric, per output channel by default, behind a
  DequantizeLinear; biases become int32 with scale = input scale x weight scale. Conv
  outputs are always quantized (ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv);
  Gemm/MatMul outputs only when a quantized consumer reads them (float outputs fuse into
  QGemm / MatMulIntegerToFloat), never when they are graph outputs.
- Add / Mul / Concat / AveragePool / GlobalAveragePool / Softmax whose inputs are
  quantized (or come from a quantizable producer): inputs and output quantized with
  their own ranges (QLinearAdd, QLinearConcat, ...).
- MaxPool / Reshape / Transpose / Flatten / Squeeze / Unsqueeze / Resize after a
  quantized tensor: the output shares the input's scale and zero point, so ONNX Runtime
  drops the pair and runs the op on int8.
- Relu / Clip after a quantized producer with one consumer (``activations_fused``): the
  node is removed and the producer's output is quantized with the activation's range,
  which clamps exactly as the activation did (asymmetric activations only).
- ``weight_only``: only MatMul/Gemm weights are quantized (int8 per channel, or int4
  block-wise with DequantizeLinear ``block_size`` at opset 21).
- ``bias_correction``: the mean output shift caused by weight rounding, from per-channel
  means of the calibration inputs, is subtracted from the bias.
- ``smoothquant``: for MatMul/Gemm with a constant weight, per input channel scales
  s = max|X|^alpha / max|W|^(1-alpha) move range from the activation to the weight
  (X / s through a Mul, W * s), then calibration runs again.
Graph outputs stay float. Models below opset 13 are converted to 13 for per-channel
weights; when that fails, weights are quantized per tensor (opset >= 10).

The sensitivity table (SQNR of each quantized layer's output against the float model on
calibration data) is in ``details["sensitivity"]`` and in metadata
``opc.quantize.sensitivity``.
"""

from __future__ import annotations

import json
import math
import platform
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from opc import calibrate as cal
from opc.errors import DataError, ModelError, PipelineError
from opc.pass_api import Pass, PassContext, PassResult, option

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
OWN_RANGE = ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Softmax")
SHARED_RANGE = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Pad")
ACTIVATIONS = ("Relu", "Clip")
META_KEY = "opc.quantize.sensitivity"


def _default_activation_type() -> str:
    # x86 integer kernels (VNNI/AVX2 u8s8) are fastest with uint8 activations; ARM prefers s8s8
    return "int8" if platform.machine().lower() in ("arm64", "aarch64") else "uint8"


def const_array(t) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output; None for activations."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        value = t.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "ConstantOfShape":
        # weights filled from a constant shape (as in ONNX's "light" test models)
        node = t.inputs[0]
        shape = node.inputs[0] if node.inputs else None
        if isinstance(shape, gs.Constant):
            value = node.attrs.get("value")
            fill = np.asarray(value.values).reshape(-1)[:1] if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
            dims = [int(d) for d in np.asarray(shape.values).reshape(-1)]
            if int(np.prod(dims, dtype=np.int64)) <= 1 << 28:
                return np.full(dims, fill[0], dtype=fill.dtype)
    return None


def _is_float(t) -> bool:
    if t is None or (isinstance(t, gs.Variable) and t.name == ""):
        return False
    dtype = t.dtype
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return dtype == onnx.TensorProto.FLOAT


@dataclass
class _Plan:
    own: dict          # tensor name -> gs.Variable needing its own calibrated range
    shared: dict       # tensor name -> name of the tensor whose range it shares
    tensors: dict      # tensor name -> gs.Variable (every quantized activation)
    weighted: list     # (node, weight input index or None, axis, bias index or None)
    quantizable: set   # outputs of Gemm/MatMul that may be quantized if a consumer wants it


@dataclass
class Quantize(Pass):
    """Static post-training int8 quantization (QDQ), calibrated on --calibration-data."""

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "static int8 QDQ quantization, calibrated (ORT fuses it into integer kernels)"
    exact: ClassVar[bool] = False
    tolerance: ClassVar[tuple[float, float]] = (0.1, 0.1)

    calibration: Literal["minmax", "percentile", "entropy", "mse", "random"] = option(
        "minmax", "activation range method; random = synthetic data (reported as such)")
    samples: int = option(0, "calibration samples to use (0 = all)", low=0)
    percentile: float = option(99.99, "percentile kept by calibration=percentile", low=50.0, high=100.0)
    bins: int = option(2048, "histogram bins (percentile/entropy/mse)", low=16, high=1 << 16)
    batch: int = option(32, "calibration batch size", low=1)
    per_channel: bool = option(True, "per-output-channel weight scales")
    activation_type: Literal["auto", "uint8", "int8"] = option(
        "auto", "activation integer type (auto: uint8 on x86, int8 on ARM)")
    symmetric: bool = option(False, "symmetric activation ranges (zero point at the middle)")
    exclude: tuple[str, ...] = option((), "node names or op types to keep in float")
    bias_correction: bool = option(True, "remove the mean output shift of quantized weights through the bias")
    smoothquant: bool | None = option(
        None, "SmoothQuant scale migration for MatMul/Gemm (none: on when MatMul/Gemm outnumber Conv, as in transformers)")
    alpha: float = option(0.5, "SmoothQuant migration strength (when alpha_search=false)", low=0.0, high=1.0)
    alpha_search: bool = option(True, "SmoothQuant: pick alpha per activation by the output error on "
                                      "sampled calibration rows")
    weight_only: bool = option(False, "quantize only MatMul/Gemm weights (no calibration)")
    weight_bits: int = option(8, "weight bits for weight_only (8 or 4)", low=4, high=8)
    block_size: int = option(32, "block size along K for weight_only int4", low=16)
    sensitivity_samples: int = option(32, "samples for the per-layer SQNR table (0 = skip)", low=0)

    # --- entry ---------------------------------------------------------------------
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.weight_bits not in (4, 8):
            raise PipelineError(f"quantize(weight_bits={self.weight_bits}): must be 4 or 8")
        if self.weight_bits == 4 and not self.weight_only:
            raise PipelineError("quantize(weight_bits=4) needs weight_only=true (int4 activations are not supported)")
        if not self.weight_only and self.calibration != "random" and ctx.calibration is None:
            raise DataError("quantize needs --calibration-data (an .npz keyed by input name, samples on the "
                            "first axis), or calibration=random for synthetic data")
        stats: dict = {}
        warnings: list[str] = []
        graph, per_channel = self._prepare(graph, ctx, stats, warnings)
        eligible = [n for n in graph.nodes if n.op in WEIGHTED and _is_float(n.outputs[0])]
        stats["eligible_nodes"] = len(eligible)
        if self.weight_only:
            result = self._weight_only(graph, ctx, stats, warnings, per_channel)
        else:
            result = self._static(graph, ctx, stats, warnings, per_channel)
        quantized = int(stats.get("quantized_nodes", 0))
        stats["coverage"] = round(quantized / len(eligible), 4) if eligible else 0.0
        for w in warnings:
            ctx.warn(w)
        if quantized == 0:
            already = sum(1 for n in eligible if any(
                isinstance(t, gs.Variable) and t.inputs and t.inputs[0].op == "DequantizeLinear" for t in n.inputs))
            stats["already_quantized"] = already
            ctx.warn(f"quantize: NOTHING was quantized ({len(eligible)} eligible Conv/Gemm/MatMul nodes"
                     + (f", {already} already quantized" if already else "")
                     + (f", excluded: {', '.join(self.exclude)}" if self.exclude else "") + ")")
            return PassResult(modified=False, stats=stats, details=result.details)
        result.stats = stats
        return result

    # --- preparation: opset and types ------------------------------------------------
    def _prepare(self, graph: gs.Graph, ctx: PassContext, stats: dict, warnings: list) -> tuple[gs.Graph, bool]:
        from opc.ir import import_graph

        model = ctx.to_model(graph)
        inits = {t.name for t in model.graph.initializer}
        if any(i.name in inits for i in model.graph.input):
            # before IR version 4 every initializer is also listed as an input; here they are
            # weights (constants), not inputs a user overrides
            keep = [i for i in model.graph.input if i.name not in inits]
            del model.graph.input[:]
            model.graph.input.extend(keep)
            model.ir_version = max(model.ir_version, 4)
        opset = graph.opset
        need = 21 if (self.weight_only and self.weight_bits == 4) else (13 if self.per_channel else 10)
        per_channel = self.per_channel
        if opset < need:
            try:
                from onnx import version_converter

                model = version_converter.convert_version(model, need)
                model.ir_version = max(model.ir_version, {10: 5, 13: 7, 21: 10}[need])
                onnx.checker.check_model(model)
                stats["opset_upgraded_to"] = need
            except Exception as exc:
                if need == 13 and opset >= 10:
                    per_channel = False
                    warnings.append(f"quantize: cannot convert opset {opset} to 13 ({str(exc).splitlines()[0][:120]});"
                                    " weights are quantized per tensor")
                else:
                    raise ModelError(f"quantize needs opset >= {need}; the model has opset {opset} and cannot "
                                     f"be converted ({str(exc).splitlines()[0][:120]})") from None
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # types are still known for initializers and many outputs
            pass
        new = import_graph(model)
        return new, per_channel

    def _excluded(self, node: gs.Node) -> bool:
        return node.name in self.exclude or node.op in self.exclude

    @property
    def qtype(self) -> str:
        return _default_activation_type() if self.activation_type == "auto" else self.activation_type

    # --- planning -----------------------------------------------------------------------
    def _weight_axis(self, node: gs.Node, w: np.ndarray, per_channel: bool) -> int | None:
        if not per_channel or w.ndim < 2:
            return None
        if node.op == "Conv":
            return 0
        if node.op == "ConvTranspose":
            return 1 if int(node.attrs.get("group", 1)) == 1 else None
        if node.op == "Gemm":
            return 0 if int(node.attrs.get("transB", 0)) else 1
        if node.op == "MatMul":
            return 1 if w.ndim == 2 else None
        return None

    def _plan(self, graph: gs.Graph, per_channel: bool, stats: dict) -> _Plan:
        outputs = {t.name for t in graph.outputs}
        own: dict = {}
        shared: dict = {}
        tensors: dict = {}
        weighted: list = []
        quantizable: set = set()

        def add_own(t):
            if t.name in outputs or not _is_float(t) or const_array(t) is not None:
                return False
            if t.name not in tensors:
                own[t.name] = t
                tensors[t.name] = t
            return True

        def from_dq(t):
            return isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "DequantizeLinear"

        def ready(t):
            return t.name in tensors or t.name in quantizable

        wanted: dict[str, bool] = {}

        def feeds_quantized(t, depth=0) -> bool:
            """Does some chain of quantizable ops lead from ``t`` to a Conv/Gemm/MatMul?

            Add/Mul/Concat/Relu... are quantized only then: a residual Add that feeds a
            float LayerNorm gains no integer kernel and loses accuracy (transformers).
            """
            if t.name in wanted:
                return wanted[t.name]
            wanted[t.name] = False  # cycles and depth guard
            found = False
            for c in t.outputs:
                if self._excluded(c) or depth > 200:
                    continue
                if c.op in WEIGHTED:
                    found = True
                elif c.op in OWN_RANGE + SHARED_RANGE + ACTIVATIONS and c.outputs:
                    found = feeds_quantized(c.outputs[0], depth + 1)
                if found:
                    break
            wanted[t.name] = found
            return found

        for node in _topo(graph):
            if self._excluded(node):
                if node.op in WEIGHTED:
                    stats["excluded_nodes"] = stats.get("excluded_nodes", 0) + 1
                continue
            op = node.op
            if op in WEIGHTED:
                if not node.outputs or not _is_float(node.outputs[0]):
                    continue
                ins = node.inputs
                if len(ins) < 2 or any(from_dq(t) for t in ins):
                    continue  # already quantized (a second run must not quantize twice)
                w = const_array(ins[1])
                if op in ("Conv", "ConvTranspose") and w is None:
                    continue
                if const_array(ins[0]) is not None or not _is_float(ins[0]):
                    continue
                if w is not None and w.dtype != np.float32:
                    continue
                acts = [ins[0]] if w is not None else [ins[0], ins[1]]
                if w is None and not _is_float(ins[1]):
                    continue
                if not all(add_own(a) for a in acts):
                    continue
                axis = self._weight_axis(node, w, per_channel) if w is not None else None
                bias = None
                if len(ins) > 2 and w is not None:
                    b = const_array(ins[2])
                    gemm_ok = op != "Gemm" or (float(node.attrs.get("alpha", 1.0)) == 1.0
                                                and float(node.attrs.get("beta", 1.0)) == 1.0
                                                and b is not None and b.ndim == 1)
                    if b is not None and b.dtype == np.float32 and gemm_ok:
                        bias = 2
                weighted.append((node, 1 if w is not None else None, axis, bias))
                out = node.outputs[0]
                if op in ("Conv", "ConvTranspose"):
                    add_own(out)
                else:
                    quantizable.add(out.name)
            elif op in OWN_RANGE:
                ins = [t for t in node.inputs if not (isinstance(t, gs.Variable) and t.name == "")]
                if op == "Softmax" and graph.opset < 13:
                    continue
                if op in ("AveragePool", "GlobalAveragePool"):
                    ins = ins[:1]
                if not ins or any(const_array(t) is not None or not _is_float(t) or from_dq(t) for t in ins):
                    continue
                if not any(ready(t) for t in ins) or node.outputs[0].name in outputs:
                    continue
                if not feeds_quantized(node.outputs[0]):
                    continue
                for t in ins:
                    add_own(t)
                add_own(node.outputs[0])
            elif op in SHARED_RANGE:
                src = node.inputs[0] if node.inputs else None
                out = node.outputs[0] if node.outputs else None
                if src is None or out is None or src.name not in tensors or out.name in outputs:
                    continue
                if not _is_float(out) and out.dtype is not None:
                    continue
                if out.name not in tensors:
                    shared[out.name] = src.name
                    tensors[out.name] = out
            elif op in ACTIVATIONS:
                src = node.inputs[0] if node.inputs else None
                out = node.outputs[0] if node.outputs else None
                if src is None or out is None or not ready(src) or out.name in outputs or from_dq(src):
                    continue
                if src.name not in tensors and not feeds_quantized(out):
                    continue
                if op == "Clip" and any(const_array(t) is None for t in node.inputs[1:] if t.name):
                    continue
                add_own(src)
                add_own(out)
        return _Plan(own, shared, tensors, weighted, quantizable)

    def _fuse_activations(self, graph: gs.Graph, plan: _Plan) -> int:
        """Remove Relu/Clip whose input is quantized by its only consumer (the clamp is in Q)."""
        if self.symmetric:
            return 0
        outputs = {t.name for t in graph.outputs}
        fused = 0
        for node in list(graph.nodes):
            if node.op not in ACTIVATIONS or self._excluded(node) or not node.inputs or not node.outputs:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if src.name not in plan.own or out.name not in plan.own or src.name in outputs:
                continue
            if len(src.outputs) != 1 or len(src.inputs) != 1:
                continue
            producer = src.inputs[0]
            if producer.op not in WEIGHTED + OWN_RANGE or self._excluded(producer):
                continue
            if node.op == "Clip":
                lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
                lo = lo if lo is not None else node.attrs.get("min")
                if lo is None or float(np.asarray(lo)) > 0.0:
                    continue  # the quantized range always contains 0, so min > 0 would not clamp
            producer.outputs[producer.outputs.index(src)] = out
            node.inputs.clear()
            node.outputs.clear()
            del plan.own[src.name]
            del plan.tensors[src.name]
            fused += 1
        graph.nodes = [n for n in graph.nodes if n.inputs or n.outputs]
        return fused

    # --- calibration --------------------------------------------------------------------
    def _batch_size(self, model: onnx.ModelProto) -> int:
        """``batch``, unless an input has a fixed leading dimension (then that size)."""
        from opc.ort import graph_inputs

        for value in graph_inputs(model):
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
        return self.batch

    def _batches(self, ctx: PassContext, model: onnx.ModelProto, limit: int | None = None):
        n = self.samples or None
        if limit is not None:
            n = min(n, limit) if n else limit
        batch = self._batch_size(model)
        if self.calibration == "random":
            return cal.random_batches(model, n or 128, batch, ctx.input_shapes, ctx.seed)
        data = ctx.calibration
        if batch != self.batch and batch > 1:  # a fixed batch dimension: whole batches only
            n = max(batch, ((n or data.num_samples) // batch) * batch)
        if self.samples and self.samples > data.num_samples:
            raise DataError(f"{data.source}: quantize(samples={self.samples}) but the data holds "
                            f"{data.num_samples} samples")
        if data.num_samples < 1:
            raise DataError(f"{data.source}: no calibration samples")
        return data.batches(batch, limit=n)

    def _num_batches(self, ctx: PassContext) -> int | None:
        if self.calibration == "random":
            return math.ceil((self.samples or 128) / self.batch)
        n = self.samples or ctx.calibration.num_samples
        return math.ceil(n / self.batch)

    def _calibrate(self, model, names, ctx, channel_axes=None, counter=None):
        method = "minmax" if self.calibration == "random" else self.calibration

        def observe(batch):
            if counter is not None:
                counter["samples"] += len(next(iter(batch.values()))) if batch else 0

        try:
            return cal.collect(model, names, self._batches(ctx, model), histogram=method != "minmax",
                               bins=self.bins, channel_axes=channel_axes, progress=ctx.progress,
                               total_batches=self._num_batches(ctx), observe=observe)
        except DataError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime") or "onnxruntime" in repr(type(exc)):
                raise DataError(f"calibration run failed in ONNX Runtime: {str(exc).splitlines()[0][:200]}") from None
            raise

    def _use_smoothquant(self, graph: gs.Graph) -> bool:
        if self.smoothquant is not None:
            return self.smoothquant
        # activation outliers that SmoothQuant migrates are a transformer trait; CNNs lose by it
        ops = Counter(n.op for n in graph.nodes)
        return ops["MatMul"] + ops["Gemm"] > ops["Conv"] + ops["ConvTranspose"]

    # --- static quantization ------------------------------------------------------------
    def _static(self, graph: gs.Graph, ctx: PassContext, stats: dict, warnings: list, per_channel: bool) -> PassResult:
        if self.calibration == "random":
            warnings.append("quantize: calibration=random uses SYNTHETIC data; ranges do not reflect real inputs")
            stats["calibration_synthetic"] = 1
        if self._use_smoothquant(graph):
            graph = self._smooth(graph, ctx, stats)
        float_model = ctx.to_model(graph)
        plan = self._plan(graph, per_channel, stats)
        if not plan.weighted:
            stats["quantized_nodes"] = 0
            return PassResult(modified=False)
        channel_axes = {}
        if self.bias_correction:
            for node, wi, axis, bias in plan.weighted:
                if wi is not None:
                    channel_axes[node.inputs[0].name] = 1 if node.op in ("Conv", "ConvTranspose") else -1
        names = sorted(set(plan.own) | set(channel_axes))
        counter = {"samples": 0}
        tstats = self._calibrate(float_model, names, ctx, channel_axes, counter)
        stats["calibration_samples"] = counter["samples"]
        stats["activations_fused"] = self._fuse_activations(graph, plan)
        method = "minmax" if self.calibration == "random" else self.calibration
        qtype = self.qtype
        params: dict[str, tuple[float, int]] = {}
        for name in plan.own:
            lo, hi = cal.compute_range(tstats[name], method, percentile=self.percentile, symmetric=self.symmetric)
            params[name] = cal.activation_params(lo, hi, qtype, self.symmetric)
        for name in plan.shared:
            root = name
            while root in plan.shared:
                root = plan.shared[root]
            params[name] = params[root]
        act_names = {id(node): node.inputs[0].name for node, _, _, _ in plan.weighted}
        builder = _Builder(graph, qtype)
        dq_names = {}
        for name, t in plan.tensors.items():
            dq_names[name] = builder.qdq(t, *params[name])
        stats["qdq_pairs"] = len(plan.tensors)
        counts: Counter = Counter()
        biases = clipped = 0
        for node, wi, axis, bias_index in plan.weighted:
            x_name = act_names[id(node)]
            x_scale = params[x_name][0] if x_name in params else None
            if wi is not None:
                w = const_array(node.inputs[wi]).astype(np.float32)
                w_scale = cal.weight_params(w, axis)
                has_bias = bias_index is not None and x_scale is not None
                if has_bias:
                    b = const_array(node.inputs[bias_index]).astype(np.float32)
                    # near-zero weight channels with a real bias would overflow int32: widen
                    # those channels' scales so that the bias fits (with a 2x margin)
                    need = np.abs(b) / (np.float64(x_scale) * 2.0**30)
                    need = need if axis is not None else need.max(initial=0.0)
                    if np.any(need > w_scale):
                        stats["weight_scales_widened"] = stats.get("weight_scales_widened", 0) + int(
                            np.count_nonzero(need > w_scale))
                        w_scale = np.maximum(w_scale, need).astype(np.float32)
                qw = cal.quantize_weight(w, w_scale, axis)
                node.inputs[wi] = builder.weight_dq(node.inputs[wi].name, qw, w_scale, axis)
                if has_bias:
                    if self.bias_correction:
                        b = b - self._bias_shift(node, w, qw, w_scale, axis, tstats.get(x_name))
                    b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
                    qb, c = cal.quantize_bias(b, b_scale)
                    clipped += c
                    node.inputs[bias_index] = builder.bias_dq(node.inputs[bias_index].name, qb, b_scale)
                    biases += 1
            counts[node.op] += 1
        for op, c in counts.items():
            stats[f"quantized_{op.lower()}"] = c
        stats["quantized_nodes"] = sum(counts.values())
        stats["weights_quantized"] = sum(1 for _, wi, _, _ in plan.weighted if wi is not None)
        stats["biases_quantized"] = biases
        if clipped:
            warnings.append(f"quantize: {clipped} bias values exceeded int32 and were clipped")
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        details: dict = {}
        if self.sensitivity_samples:
            qmodel = ctx.to_model(graph)
            pairs = {}
            for node, _, _, _ in plan.weighted:
                out = node.outputs[0].name
                pairs[node.name or out] = (out, dq_names.get(out, out))
            for o in graph.outputs:
                pairs[f"output:{o.name}"] = (o.name, o.name)
            errors = cal.compare_tensors(float_model, qmodel, pairs,
                                         self._batches(ctx, float_model, limit=self.sensitivity_samples))
            ops = {node.name or node.outputs[0].name: node.op for node, _, _, _ in plan.weighted}
            table = [{"node": k, "op": ops[k], "sqnr_db": errors[k].sqnr_db} for k in ops]
            details["sensitivity"] = table
            outs = {k[len("output:"):]: errors[k].sqnr_db for k in pairs if k.startswith("output:")}
            details["output_sqnr_db"] = outs
            if outs:
                stats["output_sqnr_db"] = min(outs.values())
            if table:
                stats["min_layer_sqnr_db"] = min(r["sqnr_db"] for r in table)
            ctx.metadata[META_KEY] = json.dumps(
                {"method": self.calibration, "activation_type": qtype,
                 "layers": [[r["node"], r["op"], r["sqnr_db"]] for r in table], "outputs": outs},
                separators=(",", ":"))
        stats["activation_type"] = qtype
        stats["calibration_method"] = self.calibration
        return PassResult(modified=True, graph=graph, details=details)

    def _bias_shift(self, node, w, qw, w_scale, axis, st) -> np.ndarray:
        mean = st.channel_mean if st is not None else None
        dw = (qw.astype(np.float32) * (w_scale if axis is None else
                                       np.expand_dims(w_scale, [a for a in range(w.ndim) if a != axis]))) - w
        if node.op == "ConvTranspose":  # weight [C_in, M/group, k...]
            if mean is None or int(node.attrs.get("group", 1)) != 1 or dw.shape[0] != mean.shape[0]:
                return np.zeros(w.shape[1], np.float32)
            dw2 = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2).astype(np.float64)
            # each output pixel receives about kernel_size / prod(strides) of the taps
            strides = np.prod(node.attrs.get("strides", [1])) or 1
            return (mean @ dw2 / strides).astype(np.float32)
        n_out = w.shape[0] if node.op == "Conv" else (
            w.shape[0] if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w.shape[-1])
        if mean is None:
            return np.zeros(n_out, np.float32)
        if node.op == "Conv":
            if int(node.attrs.get("group", 1)) != 1 or dw.shape[1] != mean.shape[0]:
                return np.zeros(dw.shape[0], np.float32)
            dw2 = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2).astype(np.float64)
            return (dw2 @ mean).astype(np.float32)
        if node.op == "Gemm" and int(node.attrs.get("transB", 0)):
            dw = dw.T
        if dw.ndim != 2 or dw.shape[0] != mean.shape[0]:
            return np.zeros(n_out, np.float32)
        return (mean @ dw.astype(np.float64)).astype(np.float32)

    # --- SmoothQuant -----------------------------------------------------------------------
    def _smooth(self, graph: gs.Graph, ctx: PassContext, stats: dict) -> gs.Graph:
        targets = []
        for node in _topo(graph):
            if node.op not in ("MatMul", "Gemm") or self._excluded(node) or len(node.inputs) < 2:
                continue
            w = const_array(node.inputs[1])
            if w is None or w.ndim != 2 or const_array(node.inputs[0]) is not None or not _is_float(node.inputs[0]):
                continue
            if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
                continue
            targets.append(node)
        if not targets:
            return graph
        model = ctx.to_model(graph)
        names = sorted({n.inputs[0].name for n in targets})
        st = cal.collect(model, names, self._batches(ctx, model), histogram=False,
                         channel_axes={n: -1 for n in names}, reservoir=128 if self.alpha_search else 0)
        groups: dict[str, list] = {}
        for node in targets:
            groups.setdefault(node.inputs[0].name, []).append(node)
        smoothed = 0
        alphas_used: list[float] = []
        builder = _Builder(graph, "uint8")
        for xname, nodes in groups.items():
            # one scale per activation: Q, K and V projections of one LayerNorm share it
            x = nodes[0].inputs[0]
            xmax = st[xname].channel_absmax
            kweights = []
            for node in nodes:
                w = const_array(node.inputs[1]).astype(np.float32)
                transposed = node.op == "Gemm" and int(node.attrs.get("transB", 0))
                kweights.append((node, w.T if transposed else w, transposed))  # [K, N]
            if xmax is None or any(xmax.shape[0] != wk.shape[0] for _, wk, _ in kweights):
                continue
            wmax = np.max([np.abs(wk).max(axis=1) for _, wk, _ in kweights], axis=0)
            alphas = ALPHA_GRID if self.alpha_search and st[xname].rows is not None else (self.alpha,)
            best = None
            for alpha in alphas:
                s = _smooth_scales(xmax, wmax, alpha)
                err = _smooth_error(st[xname], [wk for _, wk, _ in kweights], s, self.qtype) if len(alphas) > 1 else 0
                if best is None or err < best[0]:
                    best = (err, alpha, s)
            _, alpha, s = best
            alphas_used.append(alpha)
            for node, wk, transposed in kweights:
                wk_new = wk * s[:, None]
                w_new = wk_new.T if transposed else wk_new
                node.inputs[1] = gs.Constant(builder.unique(f"{node.inputs[1].name}_smoothed"),
                                             np.ascontiguousarray(w_new))
            mul_out = gs.Variable(builder.unique(f"{xname}_smoothed"), dtype=np.float32, shape=x.shape)
            inv = gs.Constant(builder.unique(f"{xname}_smooth_scale"), (1.0 / s).astype(np.float32))
            graph.nodes.append(gs.Node("Mul", name=builder.unique(f"{xname}_smooth"), inputs=[x, inv],
                                       outputs=[mul_out]))
            for node in nodes:
                node.inputs[0] = mul_out
            smoothed += len(nodes)
        stats["smoothed_nodes"] = smoothed
        if alphas_used:
            stats["smoothquant_alpha_mean"] = round(float(np.mean(alphas_used)), 3)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return graph

    # --- weight-only ---------------------------------------------------------------------
    def _weight_only(self, graph: gs.Graph, ctx: PassContext, stats: dict, warnings: list,
                     per_channel: bool) -> PassResult:
        builder = _Builder(graph, "int8")
        counts: Counter = Counter()
        for node in _topo(graph):
            if node.op not in ("MatMul", "Gemm") or self._excluded(node) or len(node.inputs) < 2:
                continue
            w = const_array(node.inputs[1])
            if w is None or w.dtype != np.float32 or w.ndim != 2:
                continue
            name = node.inputs[1].name
            if self.weight_bits == 8:
                axis = self._weight_axis(node, w, per_channel)
                scale = cal.weight_params(w, axis)
                node.inputs[1] = builder.weight_dq(name, cal.quantize_weight(w, scale, axis), scale, axis)
            else:
                k_axis = 1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0
                dq = builder.block_int4(name, w, k_axis, self.block_size)
                if dq is None:
                    continue
                node.inputs[1] = dq
            counts[node.op] += 1
        for op, c in counts.items():
            stats[f"quantized_{op.lower()}"] = c
        stats["quantized_nodes"] = sum(counts.values())
        stats["weight_bits"] = self.weight_bits
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(counts), graph=graph)


ALPHA_GRID = (0.4, 0.5, 0.6, 0.7, 0.8)


def _smooth_scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(xmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-2, 1e2).astype(np.float32)


def _smooth_error(st: cal.TensorStats, weights: list, s: np.ndarray, qtype: str) -> float:
    """Squared output error of fake-quantized (X / s) @ (s * W) on the sampled rows."""
    x = st.rows
    lo = float(np.min(st.channel_min / s))  # the exact per-tensor range of X / s over all data
    hi = float(np.max(st.channel_max / s))
    scale, zp = cal.activation_params(lo, hi, qtype)
    xq = cal.fake_quantize(x / s, scale, zp, qtype)
    err = 0.0
    for wk in weights:  # [K, N]
        ws = wk * s[:, None]
        wscale = cal.weight_params(ws, axis=1)
        wq = cal.quantize_weight(ws, wscale, axis=1).astype(np.float32) * wscale[None, :]
        d = x @ wk - xq @ wq
        err += float(np.dot(d.ravel(), d.ravel()))
    return err


def _topo(graph: gs.Graph) -> list:
    graph.toposort()
    return list(graph.nodes)


class _Builder:
    """Creates Q/DQ nodes and quantized constants with unique names."""

    def __init__(self, graph: gs.Graph, qtype: str):
        self.graph = graph
        self.qtype = qtype
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name

    def qdq(self, t: gs.Variable, scale: float, zp: int) -> str:
        npq = cal.NP_QTYPE[self.qtype]
        s = gs.Constant(self.unique(f"{t.name}_scale"), np.array(scale, dtype=np.float32))
        z = gs.Constant(self.unique(f"{t.name}_zero_point"), np.array(zp, dtype=npq))
        tq = gs.Variable(self.unique(f"{t.name}_quantized"), dtype=npq, shape=t.shape)
        tdq = gs.Variable(self.unique(f"{t.name}_dequantized"), dtype=np.float32, shape=t.shape)
        consumers = list(t.outputs)
        q = gs.Node("QuantizeLinear", name=self.unique(f"{t.name}_QuantizeLinear"), inputs=[t, s, z], outputs=[tq])
        dq = gs.Node("DequantizeLinear", name=self.unique(f"{t.name}_DequantizeLinear"), inputs=[tq, s, z],
                     outputs=[tdq])
        for c in consumers:
            for i, inp in enumerate(c.inputs):
                if inp is t:
                    c.inputs[i] = tdq
        self.graph.nodes.extend([q, dq])
        return tdq.name

    def weight_dq(self, name: str, qw: np.ndarray, scale: np.ndarray, axis: int | None) -> gs.Variable:
        qc = gs.Constant(self.unique(f"{name}_quantized"), np.ascontiguousarray(qw))
        s = gs.Constant(self.unique(f"{name}_scale"), np.asarray(scale, dtype=np.float32).reshape(-1 if axis is not None else ()))
        z = gs.Constant(self.unique(f"{name}_zero_point"), np.zeros(s.values.shape, dtype=np.int8))
        out = gs.Variable(self.unique(f"{name}_dequantized"), dtype=np.float32, shape=list(qw.shape))
        attrs = {"axis": int(axis)} if axis is not None else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.unique(f"{name}_DequantizeLinear"),
                                        inputs=[qc, s, z], outputs=[out], attrs=attrs))
        return out

    def bias_dq(self, name: str, qb: np.ndarray, scale: np.ndarray) -> gs.Variable:
        qc = gs.Constant(self.unique(f"{name}_quantized"), np.ascontiguousarray(qb))
        per_channel = np.asarray(scale).size > 1
        s = gs.Constant(self.unique(f"{name}_scale"),
                        np.asarray(scale, dtype=np.float32).reshape(-1 if per_channel else ()))
        z = gs.Constant(self.unique(f"{name}_zero_point"), np.zeros(s.values.shape, dtype=np.int32))
        out = gs.Variable(self.unique(f"{name}_dequantized"), dtype=np.float32, shape=list(qb.shape))
        attrs = {"axis": 0} if per_channel else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.unique(f"{name}_DequantizeLinear"),
                                        inputs=[qc, s, z], outputs=[out], attrs=attrs))
        return out

    def block_int4(self, name: str, w: np.ndarray, k_axis: int, block: int) -> gs.Variable | None:
        """int4 block-wise weight: DequantizeLinear(block_size, axis=K) at opset 21."""
        k = w.shape[k_axis]
        if k % block:
            return None
        wk = np.moveaxis(w, k_axis, 0)  # [K, N]
        blocks = wk.reshape(k // block, block, -1)
        scale = (np.abs(blocks).max(axis=1) / 7.0).astype(np.float32)  # [K/block, N]
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        q = np.clip(np.round(blocks / scale[:, None, :]), -7, 7).astype(np.int8).reshape(wk.shape)
        q = np.moveaxis(q, 0, k_axis)
        scale = np.moveaxis(scale, 0, k_axis)
        qt = onnx.helper.make_tensor(self.unique(f"{name}_quantized"), onnx.TensorProto.INT4, list(q.shape),
                                     q.flatten().tolist())
        zt = onnx.helper.make_tensor(self.unique(f"{name}_zero_point"), onnx.TensorProto.INT4, list(scale.shape),
                                     [0] * scale.size)
        qc = _proto_constant(qt)
        zc = _proto_constant(zt)
        s = gs.Constant(self.unique(f"{name}_scale"), np.ascontiguousarray(scale))
        out = gs.Variable(self.unique(f"{name}_dequantized"), dtype=np.float32, shape=list(w.shape))
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.unique(f"{name}_DequantizeLinear"),
                                        inputs=[qc, s, zc], outputs=[out],
                                        attrs={"axis": int(k_axis), "block_size": int(block)}))
        return out


def _proto_constant(tensor: onnx.TensorProto):
    """A gs.Constant backed by a TensorProto (keeps types numpy lacks, such as int4)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    return gs.Constant(tensor.name, LazyValues(tensor))
