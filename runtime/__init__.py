"""opc.runtime: execute ONNX graphs with kernels written once against ``xp`` (NumPy or CuPy).

    from opc.runtime import Session
    sess = Session("model.onnx", backend="auto")   # CuPy when a GPU is usable, else NumPy
    (logits,) = sess.run(None, {"input": x})
"""

from __future__ import annotations

from opc.runtime import k_control, k_elementwise, k_nn, k_quant, k_resize, k_rnn, k_tensor  # noqa: F401  (register kernels)
from opc.runtime import k_attention, k_misc, k_ml, k_signal, k_vision  # noqa: F401,E402  (register kernels)
from opc.runtime import k_sequence, k_string  # noqa: F401,E402  (register kernels: non-tensor values)
from opc.runtime.registry import KERNELS, supported_ops
from opc.runtime.session import NodeArg, Session, weights_bytes
from opc.runtime.xp import array_module, cupy_usable


def workspace_bytes(node, input_shapes, input_dtypes) -> int:
    """Scratch bytes the kernel for ``node`` (an onnx NodeProto or runtime Node) needs for these inputs."""
    from opc.runtime.registry import Node, attr_value
    import onnx

    if isinstance(node, onnx.NodeProto):
        attrs = {a.name: attr_value(a) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH}
        node = Node(node.op_type, "" if node.domain in ("", "ai.onnx") else node.domain, node.name,
                    list(node.input), list(node.output), attrs, 0)
    spec = KERNELS.get((node.domain, node.op_type))
    if spec is None or spec.workspace is None:
        return 0
    shapes = [tuple(s) if s is not None else None for s in input_shapes]
    return int(spec.workspace(node, shapes, list(input_dtypes)))


__all__ = ["Session", "NodeArg", "workspace_bytes", "supported_ops", "array_module", "cupy_usable",
           "weights_bytes", "KERNELS"]
