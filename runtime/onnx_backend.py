"""``onnx.backend.base.Backend`` for opc's runtime, so onnx's backend test suite can drive it.

    from opc.runtime.onnx_backend import OpcBackend
    rep = OpcBackend.prepare(model)          # NumPy backend unless device="CUDA"
    outputs = rep.run([x])                   # positional inputs, or a dict
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from opc.runtime.program import unsupported_ops
from opc.runtime.session import Session


class OpcRep(BackendRep):
    def __init__(self, session: Session):
        self.session = session

    def run(self, inputs, **kwargs):
        names = [i.name for i in self.session.get_inputs()]
        if isinstance(inputs, dict):
            feeds = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            feeds = dict(zip(names, inputs))
        return self.session.run(None, feeds)


class OpcBackend(Backend):
    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> bool:
        return not unsupported_ops(model.graph)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> OpcRep:
        backend = "cupy" if device.upper().startswith("CUDA") else "numpy"
        return OpcRep(Session(model, backend=backend, **kwargs))

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        if device.upper().startswith("CUDA"):
            from opc.runtime.xp import cupy_usable

            return cupy_usable()
        return device.upper() == "CPU"


prepare = OpcBackend.prepare
run_model = OpcBackend.run_model
supports_device = OpcBackend.supports_device
