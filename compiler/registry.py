"""The pass registry: a literal mapping from pipeline names to pass classes.

Written out by hand (no registration as an import side effect). Entries are
"module:Class" strings so that `opc --help` does not import every pass.
"""

from __future__ import annotations

import importlib

from opc.errors import PipelineError

PASSES: dict[str, str] = {
    "fold": "opc.passes.fold:Fold",
    "prune": "opc.passes.prune_weights:Prune",
    "quantize": "opc.passes.insert_qdq:Quantize",
    "plan": "opc.passes.plan_memory:Plan",
}

# The passes that never change values; what `opc compile` runs without --passes.
DEFAULT_PIPELINE = "fold,plan"


def get_pass_class(name: str):
    if name not in PASSES:
        raise PipelineError(f"unknown pass {name!r} (known passes: {', '.join(PASSES)})")
    module_name, _, class_name = PASSES[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def all_pass_classes():
    return {name: get_pass_class(name) for name in PASSES}
