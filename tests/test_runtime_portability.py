"""CuPy portability without a GPU: the NumPy backend runs through a module that exposes only
the names ``cupy`` also has (``dir(cupy)``, taken from the installed CuPy at test time; importing
cupy needs no GPU), so a kernel calling a NumPy-only function fails here, on a CPU machine.

Every onnx node case of a claimed op and a light model run through it. (What this cannot see:
keyword arguments CuPy's version of a function lacks, and host syncs; those need a GPU.)
"""

from __future__ import annotations


import numpy as np
import pytest

import opc.runtime as rt
from opc.runtime.onnx_backend import OpcRep
from opc.runtime.xp import RestrictedNumpy

from runtime_helpers import light_feeds, light_model

cupy = pytest.importorskip("cupy", reason="cupy (the dev extra's cupy-cuda13x) gives the list of CuPy names")


@pytest.fixture(scope="module")
def xp():
    return RestrictedNumpy(dir(cupy))


def test_wrapper_hides_numpy_only_names():
    xp = RestrictedNumpy(dir(cupy))  # not the shared one: this test records a miss on purpose
    assert xp.add is np.add and xp.float32 is np.float32
    only_numpy = sorted(n for n in dir(np) if not n.startswith("_") and n not in set(dir(cupy)))
    assert only_numpy, "expected NumPy to have names CuPy lacks"
    with pytest.raises(AttributeError, match="CuPy does not"):
        getattr(xp, only_numpy[0])


def test_node_cases_run_with_cupy_names_only(xp):
    from test_runtime_nodes import CASES, EXCLUDED, _compare

    failures = []
    for case in CASES:
        if case.name in EXCLUDED:
            continue
        try:
            rep = OpcRep(rt.Session(case.model, backend=xp))
            for inputs, expected in case.data_sets:
                _compare(case, expected, rep.run(inputs))
        except AttributeError as exc:
            failures.append(f"{case.name}: {exc}")
    assert not failures, f"{len(failures)} cases call NumPy-only names {sorted(xp.missing)}: {failures[:5]}"
    assert not xp.missing


def test_light_model_runs_with_cupy_names_only(xp):
    model = light_model("light_shufflenet")
    feeds = light_feeds(model)
    ref = rt.Session(model, backend="numpy").run(None, feeds)[0]
    sess = rt.Session(model, backend=xp)
    for _ in range(2):  # shape resolution, then the arena
        got = sess.run(None, feeds)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
