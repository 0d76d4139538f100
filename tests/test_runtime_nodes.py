"""ONNX backend node tests for every op opc.runtime claims.

The cases come from onnx's own generators (``onnx.backend.test.case.node.collect_testcases``:
models and expected outputs built in this test run, nothing shipped); a case runs when every
op in its graph has an opc kernel. Cases are compared as onnx's backend runner does
(dtype, shape, ``assert_allclose`` with the case's rtol/atol; strings exactly; a sequence as
a list compared element by element; an empty optional as None). Passes per op are printed at
the end of the module.
"""

from __future__ import annotations

import collections
import re
import warnings

import numpy as np
import pytest

from opc.runtime.onnx_backend import OpcBackend
from opc.runtime.program import unsupported_ops

from conftest import SUMMARY_KEY

# Cases not run, each with the reason. Exotic element types are out of scope: NumPy/CuPy have
# no arithmetic for them (they arrive as object arrays of ml_dtypes values).
EXOTIC = re.compile(r"bfloat16|bf16|float8|FLOAT8|BFLOAT16|INT4|UINT4|int4|uint4|FLOAT4|float4|INT2|UINT2|"
                    r"e4m3|e5m2|e2m1")
EXCLUDED = {
    "test_training_dropout": "random mask: the expected output depends on onnx's own RNG",
    "test_training_dropout_default": "random mask: the expected output depends on onnx's own RNG",
    "test_training_dropout_mask": "random mask: the expected output depends on onnx's own RNG",
    "test_training_dropout_default_mask": "random mask: the expected output depends on onnx's own RNG",
    "test_maxunpool_export_with_output_shape": (
        "the expected data scatters the indices into the inferred (smaller) shape and pads after; "
        "ONNX Runtime and the MaxPool round trip index the output_shape tensor, which opc follows "
        "(test_runtime_ops.py checks MaxPool -> MaxUnpool against ORT)"),
    "test_causal_conv_with_state_silu_fp16_expanded": (
        "float16 end to end with rtol 1e-3: the expansion's fp16 rounding differs from the reference's"),
}


def _collect():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    runnable = []
    for c in cases:
        if unsupported_ops(c.model.graph):
            continue
        if EXOTIC.search(c.name) or not all(_plain_data(a) for ins, outs in c.data_sets
                                             for a in list(ins) + list(outs)):
            continue
        runnable.append(c)
    return runnable


def _plain_data(a) -> bool:
    """Arrays, strings, sequences (lists) and empty optionals (None) run; object arrays of
    other things (TensorProtos, ml_dtypes scalars of exotic types) do not."""
    if a is None:
        return True
    if isinstance(a, list):
        return all(_plain_data(x) for x in a)
    a = np.asarray(a)
    return a.dtype != object or all(isinstance(x, (str, bytes)) for x in a.flat)


CASES = _collect()
RESULTS: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


def _op(case) -> str:
    return case.model.graph.node[0].op_type


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    # printed by conftest's pytest_terminal_summary (output written here would be captured)
    lines = [f"opc.runtime node tests: {sum(v[0] for v in RESULTS.values())} passed, "
             f"{sum(v[1] for v in RESULTS.values())} failed, {len(EXCLUDED)} excluded, "
             f"over {len(RESULTS)} ops (first node's op: passed/failed)"]
    ops = [f"{op} {RESULTS[op][0]}/{RESULTS[op][1]}" for op in sorted(RESULTS)]
    lines += ["  " + ", ".join(ops[i:i + 8]) for i in range(0, len(ops), 8)]
    request.config.stash[SUMMARY_KEY] = lines


def _compare(case, expected, got):
    assert len(got) == len(expected)
    for r, g in zip(expected, got):
        if r is None:
            assert g is None, f"expected an empty optional, got {type(g).__name__}"
            continue
        if isinstance(r, list):
            assert isinstance(g, list), f"expected a sequence, got {type(g).__name__}"
            _compare(case, r, g)
            continue
        assert g is not None and not isinstance(g, list), f"expected a tensor, got {type(g).__name__}"
        r, g = np.asarray(r), np.asarray(g)
        assert g.dtype == r.dtype, f"dtype {g.dtype}, expected {r.dtype}"
        assert g.shape == r.shape, f"shape {g.shape}, expected {r.shape}"
        if r.dtype.kind in "OUSb":
            np.testing.assert_array_equal(g, r)
        else:
            np.testing.assert_allclose(g, r, rtol=case.rtol, atol=case.atol)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node(case):
    if case.name in EXCLUDED:
        pytest.skip(EXCLUDED[case.name])
    op = _op(case)
    ok = False
    try:
        rep = OpcBackend.prepare(case.model)
        for inputs, expected in case.data_sets:
            _compare(case, expected, rep.run(inputs))  # resolves shapes, plans the arena
            _compare(case, expected, rep.run(inputs))  # runs inside the arena
        ok = True
    finally:
        RESULTS[op][0 if ok else 1] += 1


def test_every_claimed_op_has_node_tests_or_is_listed():
    """Ops with kernels but no runnable node case are named here, so the gap is visible."""
    from opc.runtime import KERNELS

    from opc.summary import iter_nodes

    covered = {n.op_type for c in CASES for n in iter_nodes(c.model.graph)}  # If/Loop bodies included
    untested = sorted(op for dom, op in KERNELS if not dom and op not in covered)
    assert set(untested) <= UNTESTED_OK, untested


# ops with kernels whose node tests all need something out of scope (listed, with why)
UNTESTED_OK = {
    "GlobalLpPool",  # onnx generates no node case for it: test_runtime.py checks it against ORT
    # no onnx node case: test_runtime_sequence.py checks them against ORT
    "ConcatFromSequence", "SequenceErase",
}
