"""opc: an ONNX graph-rewriting compiler.

    import opc
    model, report = opc.compile("model.onnx", passes="fold,quantize,plan",
                                calibration="calib.npz")
"""

from __future__ import annotations

__version__ = "0.1.0"

from opc.errors import OpcError  # noqa: E402


def compile(model_or_path, passes: str | None = None, *, calibration=None, input_shapes=None,
            verify: bool = False, dump_passes=None, instruments=None, seed: int = 0,
            allow_custom_ops: bool = False, progress: bool = False, validate: bool = True):
    """Run a pipeline over a model; return (optimized ModelProto, Report).

    ``model_or_path`` is a ModelProto (copied, never modified) or a file path.
    ``calibration`` is a path to .npz data or a ``CalibrationData``.
    ``validate=False`` skips re-checking a ModelProto that ``opc.ir.load_model`` returned.
    """
    from opc.data import CalibrationData
    from opc.instruments import DumpPasses, Verify
    from opc.ir import as_model
    from opc.manager import PassManager
    from opc.pass_api import PassContext
    from opc.pipeline import parse_pipeline
    from opc.registry import DEFAULT_PIPELINE

    model, folder = as_model(model_or_path, validate=validate)
    if allow_custom_ops is False:
        from opc.validate import check_custom_domains

        check_custom_domains(model, source=str(model_or_path) if folder else "<model>")
    pass_list = parse_pipeline(passes or DEFAULT_PIPELINE)
    calib = calibration
    if calibration is not None and not isinstance(calibration, CalibrationData):
        calib = CalibrationData.load(calibration, model)
    elif isinstance(calibration, CalibrationData):
        calibration.check_against(model)
    ctx = PassContext(input_shapes=dict(input_shapes or {}), calibration=calib, model_dir=folder,
                      seed=seed, progress=progress, allow_custom_ops=allow_custom_ops)
    inst = list(instruments or [])
    if dump_passes:
        inst.append(DumpPasses(dump_passes))
    if verify:
        inst.append(Verify())
    return PassManager(pass_list, inst).run(model, ctx)


__all__ = ["compile", "OpcError", "__version__"]
