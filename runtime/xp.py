"""The array module behind the runtime: NumPy, or CuPy when a GPU is usable.

Kernels receive the module as ``xp`` and call only names that NumPy and CuPy share, so the
same code runs on both; ``tests/test_runtime_portability.py`` enforces that on a CPU-only
machine. Host-side metadata (shapes, attribute values) is plain NumPy.
"""

from __future__ import annotations

import functools

import numpy as np

from opc.errors import UsageError

BACKENDS = ("auto", "numpy", "cupy")


@functools.lru_cache(maxsize=1)
def cupy_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def array_module(backend="auto"):
    """Return the array module for ``backend`` ("auto" picks CuPy when a GPU is usable); an
    array module object passes through (tests run the kernels through a restricted NumPy)."""
    if not isinstance(backend, str):
        return backend
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "numpy" or (backend == "auto" and not cupy_usable()):
        return np
    if not cupy_usable():
        raise UsageError("backend 'cupy' needs CuPy and a usable GPU; use --backend numpy")
    import cupy

    return cupy


def is_numpy(xp) -> bool:
    return getattr(xp, "__name__", "") == "numpy" or getattr(xp, "_opc_numpy", False)


# Host copies of device values fixed for a session or an input signature (small constants,
# shape arithmetic), so that kernels reading them (a Reshape's shape) never wait on the device
# during a run. Keyed by id(); the entry holds the array, so the id is not reused meanwhile.
_HOST_MIRRORS: dict[int, tuple] = {}
_SYNC_HOOK = None  # tests: called with every array ``to_host`` must really convert


def register_host(arrays) -> list[int]:
    """Remember host copies of ``arrays`` (made now, at load or signature time); returns the
    keys for ``unregister_host``."""
    keys = []
    for a in arrays:
        if isinstance(a, np.ndarray):
            host = np.asarray(a)  # the array itself (a plain view of an ndarray subclass)
        else:
            host = to_host(a)
            host.flags.writeable = False
        _HOST_MIRRORS[id(a)] = (a, host)
        keys.append(id(a))
    return keys


def unregister_host(keys) -> None:
    for k in keys:
        _HOST_MIRRORS.pop(k, None)


def set_sync_hook(fn) -> None:
    """``fn(array)`` is called for every conversion to the host that is not a remembered one
    (None: off). Tests use it to catch device-host synchronization inside a run."""
    global _SYNC_HOOK
    _SYNC_HOOK = fn


def load_host(a) -> np.ndarray:
    """A host copy made while loading or planning (a constant's value), outside any run: not
    reported to the sync hook and not looked up among the run-time host mirrors."""
    get = getattr(a, "get", None)
    return np.asarray(get() if get is not None else a)


def to_host(a) -> np.ndarray:
    """An array as NumPy (a copy from the device for CuPy arrays; the remembered host copy for
    values registered with ``register_host``)."""
    m = _HOST_MIRRORS.get(id(a))
    if m is not None and m[0] is a:
        return m[1]
    if _SYNC_HOOK is not None:
        _SYNC_HOOK(a)
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    return get() if get is not None else np.asarray(a)


def host_ints(a) -> list[int]:
    return [int(v) for v in to_host(a).reshape(-1)]


def data_ptr(a) -> int:
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return int(a.data.ptr)


class RestrictedNumpy:
    """NumPy showing only the names in ``allowed`` (e.g. ``dir(cupy)``): a kernel calling a
    NumPy-only function fails with AttributeError on a machine without a GPU."""

    _opc_numpy = True
    __name__ = "numpy-restricted"

    def __init__(self, allowed):
        self._allowed = frozenset(allowed)
        self.missing: set[str] = set()

    def __getattr__(self, name):
        if name.startswith("__") or name in self._allowed:
            return getattr(np, name)
        self.missing.add(name)
        raise AttributeError(f"xp.{name}: NumPy has it, CuPy does not")
