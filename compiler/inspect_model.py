"""`opc inspect`: what a model holds, and what opc stored in it."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from opc.ir import get_metadata
from opc.summary import iter_graphs, iter_nodes, model_summary

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
             "ConvInteger", "DynamicQuantizeLinear", "MatMulNBits", "QGemm"}


def inspect_model(model: onnx.ModelProto) -> dict:
    from opc.textir import _type_str

    s = model_summary(model)
    inits = {t.name: t for g in iter_graphs(model.graph) for t in g.initializer}
    sparsity = {}
    quantized = []
    for name, t in inits.items():
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                           onnx.TensorProto.UINT4, onnx.TensorProto.INT32) and len(t.dims) >= 1:
            quantized.append({"name": name, "dtype": onnx.TensorProto.DataType.Name(t.data_type).lower(),
                              "shape": list(t.dims)})
        if len(t.dims) >= 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                onnx.TensorProto.INT8, onnx.TensorProto.DOUBLE):
            arr = numpy_helper.to_array(t)
            sparsity[name] = round(1.0 - np.count_nonzero(arr) / max(arr.size, 1), 6)
    meta = get_metadata(model)
    info = {
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": {v.name: _type_str(v.type) for v in model.graph.input if v.name not in inits},
        "outputs": {v.name: _type_str(v.type) for v in model.graph.output},
        **s,
        "sparsity": sparsity,
        "quantized_tensors": quantized,
        "quant_nodes": sum(1 for n in iter_nodes(model.graph) if n.op_type in QUANT_OPS),
        "pipeline": meta.get("opc.pipeline"),
        "opc_version": meta.get("opc.version"),
        "stats": json.loads(meta["opc.stats"]) if "opc.stats" in meta else None,
        "quantize_sensitivity": _json_or_none(meta.get("opc.quantize.sensitivity")),
        "metadata_keys": sorted(meta),
    }
    from opc.memory import memory_report

    info["memory"] = memory_report(model)
    return info


def format_inspect(info: dict) -> str:
    from opc.summary import human_bytes

    lines = [
        f"ir_version {info['ir_version']}, opsets " + ", ".join(f"{k}={v}" for k, v in info["opsets"].items()),
        f"producer: {info['producer'] or '-'}",
        "inputs:  " + ", ".join(f"{k}: {v}" for k, v in info["inputs"].items()),
        "outputs: " + ", ".join(f"{k}: {v}" for k, v in info["outputs"].items()),
        f"nodes: {info['nodes']}  parameters: {info['parameters']:,}  weights: {human_bytes(info['weight_bytes'])}"
        f"  file: {human_bytes(info['file_bytes'])}",
        "ops: " + ", ".join(f"{k} {v}" for k, v in sorted(info["ops"].items(), key=lambda kv: (-kv[1], kv[0]))),
    ]
    sparse = {k: v for k, v in info["sparsity"].items() if v > 0}
    if sparse:
        lines.append("sparsity per weight:")
        lines.extend(f"  {k}: {v:.1%}" for k, v in sorted(sparse.items()))
    if info["quantized_tensors"] or info["quant_nodes"]:
        lines.append(f"quantized: {len(info['quantized_tensors'])} integer tensors, {info['quant_nodes']} Q/DQ/integer nodes")
    sens = info.get("quantize_sensitivity")
    if sens and sens.get("layers"):
        lines.append(f"quantization sensitivity (SQNR vs float, calibration={sens.get('method')}, "
                     f"activations {sens.get('activation_type')}; lowest first):")
        width = max(len(str(row[0])) for row in sens["layers"])
        for node, op, db in sorted(sens["layers"], key=lambda r: r[2]):
            lines.append(f"  {str(node):<{width}}  {op:<13} {db:7.2f} dB")
        for out, db in (sens.get("outputs") or {}).items():
            lines.append(f"  output {out}: {db:.2f} dB")
    if info["pipeline"]:
        lines.append(f"opc pipeline: {info['pipeline']} (opc {info['opc_version']})")
    if info["stats"]:
        for name, st in info["stats"].items():
            changed = {k: v for k, v in st.items() if v not in (0, 0.0, "", None)}
            lines.append(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "no change"))
    if info.get("memory"):
        from opc.memory import format_memory

        lines.extend(format_memory(info["memory"]))
    return "\n".join(lines)


def _json_or_none(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
