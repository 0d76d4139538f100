"""External tensor data from strangers: nothing outside the model's folder is read.

Refused: '..' paths, absolute paths, symlinks leaving the folder, hard links (link count
> 1), offset/length beyond the file or disagreeing with the dims, unknown/duplicate keys.
Accepted: plain data files, symlinks that stay inside, the Hugging Face cache layout."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hostile_helpers import Workspace, model_with, snapshot, vi
from opc.errors import ModelError
from opc.ir import load_model

WEIGHTS = np.arange(8, dtype=np.float32).reshape(2, 4)
SECRET = b"TOP-SECRET-0123456789abcdef-XYZ!"  # 32 bytes, the size of WEIGHTS


@pytest.fixture
def ws(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(SECRET)
    return Workspace(tmp_path, capsys)


def external_model(location: str, **entries) -> onnx.ModelProto:
    t = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 4])
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    for key, value in entries.items():
        t.external_data.add(key=key, value=str(value))
    node = helper.make_node("Add", ["x", "w"], ["y"], name="add")
    return model_with([node], [vi("x")], [vi("y")], initializers=[t])


def write(ws, model, name="model/model.onnx"):
    return ws.write_model(model, name)


def assert_secret_not_copied(ws):
    secret_inode = os.stat(ws.root / "outside" / "secret.bin").st_ino
    for rel, data in snapshot(ws.root).items():
        p = ws.root / rel
        if p.is_symlink() or not p.is_file() or os.stat(p).st_ino == secret_inode:
            continue  # the planted links themselves
        assert SECRET not in data, rel


# --- refused --------------------------------------------------------------------------


def test_dotdot_path(ws):
    p = write(ws, external_model("../outside/secret.bin"))
    ws.refuse(p, str(p), "tensor 'w'", "'..'")


def test_absolute_path(ws):
    p = write(ws, external_model(str(ws.root / "outside" / "secret.bin")))
    ws.refuse(p, "tensor 'w'", "absolute")


def test_windows_absolute_path(ws):
    p = write(ws, external_model("C:\\outside\\secret.bin"))
    ws.refuse(p, "tensor 'w'", "absolute")


def test_symlink_leaving_the_folder(ws):
    os.symlink("../outside/secret.bin", ws.root / "model" / "w.bin")
    p = write(ws, external_model("w.bin"))
    ws.refuse(p, "tensor 'w'", "leaves the model folder")
    assert_secret_not_copied(ws)


def test_symlinked_subfolder_leaving_the_folder(ws):
    os.symlink("../outside", ws.root / "model" / "sub")
    p = write(ws, external_model("sub/secret.bin"))
    ws.refuse(p, "tensor 'w'", "leaves the model folder")


def test_hardlink_to_a_file_outside(ws):
    os.link(ws.root / "outside" / "secret.bin", ws.root / "model" / "w.bin")
    p = write(ws, external_model("w.bin"))
    ws.refuse(p, "tensor 'w'", "hard links")
    assert_secret_not_copied(ws)


def test_symlink_to_a_hardlinked_file_inside(ws):
    (ws.root / "model" / "real.bin").write_bytes(WEIGHTS.tobytes())
    os.link(ws.root / "model" / "real.bin", ws.root / "outside" / "other-name.bin")
    os.symlink("real.bin", ws.root / "model" / "w.bin")
    p = write(ws, external_model("w.bin"))
    ws.refuse(p, "tensor 'w'", "hard links")


@pytest.mark.parametrize("entries, needles", [
    ({"offset": 1000}, ["offset 1000", "beyond the end", "32 bytes"]),
    ({"offset": 16, "length": 32}, ["offset 16 + length 32", "beyond the end"]),
    ({"length": 64}, ["length 64", "beyond the end"]),
    ({"length": 16}, ["length 16 does not match", "[2, 4]"]),
    ({"offset": "abc"}, ["offset 'abc'", "not a non-negative integer"]),
    ({"offset": -4}, ["offset '-4'"]),
    ({"basepath": "/etc"}, ["unknown external data key 'basepath'"]),
    ({"evil": "1"}, ["unknown external data key 'evil'"]),
], ids=["offset", "offset+length", "length", "length-vs-dims", "text-offset", "negative-offset",
        "basepath-key", "unknown-key"])
def test_bad_offsets_lengths_and_keys(ws, entries, needles):
    (ws.root / "model" / "w.bin").write_bytes(WEIGHTS.tobytes())
    p = write(ws, external_model("w.bin", **entries))
    ws.refuse(p, "tensor 'w'", *needles)


def test_duplicate_key(ws):
    (ws.root / "model" / "w.bin").write_bytes(WEIGHTS.tobytes())
    m = external_model("w.bin", offset=0)
    m.graph.initializer[0].external_data.add(key="offset", value="8")
    p = write(ws, m)
    ws.refuse(p, "tensor 'w'", "'offset' twice")


def test_missing_and_odd_files(ws):
    p = write(ws, external_model("absent.bin"))
    ws.refuse(p, "tensor 'w'", "'absent.bin'", "not found")
    (ws.root / "model" / "adir").mkdir()
    p = write(ws, external_model("adir"))
    ws.refuse(p, "tensor 'w'", "not a regular file")
    os.symlink("nowhere.bin", ws.root / "model" / "dangling.bin")
    p = write(ws, external_model("dangling.bin"))
    ws.refuse(p, "tensor 'w'", "dangling")
    p = write(ws, external_model(""))
    ws.refuse(p, "tensor 'w'", "empty or invalid location")
    os.symlink("loop.bin", ws.root / "model" / "loop.bin")
    p = write(ws, external_model("loop.bin"))
    ws.refuse(p, "tensor 'w'", "symlink loop")


def test_external_data_with_absurd_dims_is_refused_before_reading(ws):
    (ws.root / "model" / "w.bin").write_bytes(WEIGHTS.tobytes())
    m = external_model("w.bin")
    m.graph.initializer[0].dims[:] = [2**50, 2**50]
    p = write(ws, m)
    ws.refuse(p, "initializer 'w'", "absurd dims")


def test_external_data_larger_than_memory_is_refused_before_reading(ws, monkeypatch):
    import opc.external_data

    monkeypatch.setattr(opc.external_data, "physical_memory", lambda: 48)
    (ws.root / "model" / "w.bin").write_bytes(WEIGHTS.tobytes() * 2)
    m = external_model("w.bin", offset=0, length=32)
    second = onnx.TensorProto()
    second.CopyFrom(m.graph.initializer[0])
    second.name = "w2"
    m.graph.initializer.append(second)  # 2 x 32 bytes > 48 bytes of "memory"
    m.graph.node.append(helper.make_node("Add", ["y", "w2"], ["z"], name="add2"))
    m.graph.output[0].name = "z"
    p = write(ws, m)
    ws.refuse(p, "64 bytes", "more than this machine's memory (48 bytes)")


# --- accepted -------------------------------------------------------------------------


def _reference_model():
    node = helper.make_node("Add", ["x", "w"], ["y"], name="add")
    return model_with([node], [vi("x")], [vi("y")], initializers=[numpy_helper.from_array(WEIGHTS, "w")])


def _weights_of(path):
    return numpy_helper.to_array(load_model(path).graph.initializer[0])


def test_plain_external_data_compiles(ws):
    onnx.save_model(_reference_model(), str(ws.root / "model" / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    assert load_model(ws.root / "model" / "model.onnx").graph.initializer[0].raw_data == WEIGHTS.tobytes()
    rc, out, err = ws.run("compile", "model/model.onnx", "-o", "out.onnx")
    assert rc == 0, err
    np.testing.assert_array_equal(_weights_of(ws.root / "out.onnx"), WEIGHTS)


def test_symlink_staying_inside_is_accepted(ws):
    (ws.root / "model" / "data").mkdir()
    (ws.root / "model" / "data" / "real.bin").write_bytes(WEIGHTS.tobytes())
    os.symlink("data/real.bin", ws.root / "model" / "w.bin")
    p = write(ws, external_model("w.bin", offset=0, length=32))
    rc, out, err = ws.run("compile", p, "-o", "out.onnx")
    assert rc == 0, err
    np.testing.assert_array_equal(_weights_of(ws.root / "out.onnx"), WEIGHTS)


def _hf_cache(ws):
    """models--org--net/{blobs/<hash>, snapshots/<rev>/model.onnx -> ../../blobs/<hash>}"""
    repo = ws.root / "hub" / "models--org--net"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    staging = ws.root / "hub" / "staging"
    staging.mkdir()
    onnx.save_model(_reference_model(), str(staging / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    for name, blob in (("model.onnx", "aaa111"), ("model.onnx.data", "bbb222")):
        os.replace(staging / name, blobs / blob)
        os.symlink(f"../../blobs/{blob}", snap / name)
    staging.rmdir()
    return snap


def test_hugging_face_cache_layout_is_accepted(ws):
    snap = _hf_cache(ws)
    rc, out, err = ws.run("compile", snap / "model.onnx", "-o", "out.onnx")
    assert rc == 0, err
    np.testing.assert_array_equal(_weights_of(ws.root / "out.onnx"), WEIGHTS)


def test_hugging_face_cache_symlink_leaving_the_cache_is_refused(ws):
    snap = _hf_cache(ws)
    os.unlink(snap / "model.onnx.data")
    os.symlink("../../../../outside/secret.bin", snap / "model.onnx.data")
    assert (snap / "model.onnx.data").read_bytes() == SECRET
    ws.refuse(snap / "model.onnx", "tensor 'w'", "leaves the model folder")
    assert_secret_not_copied(ws)


def test_api_refuses_the_same(ws):
    os.link(ws.root / "outside" / "secret.bin", ws.root / "model" / "w.bin")
    p = write(ws, external_model("w.bin"))
    with pytest.raises(ModelError, match="hard links"):
        load_model(p)


def test_output_over_a_symlinked_cache_file_leaves_the_blob(ws):
    snap = _hf_cache(ws)
    blob = snap.parent.parent / "blobs" / "aaa111"
    before = blob.read_bytes()
    rc, out, err = ws.run("compile", snap / "model.onnx", "-o", snap / "model.onnx")
    assert rc == 0, err
    assert blob.read_bytes() == before  # the shared cache blob is not written through
    assert not (snap / "model.onnx").is_symlink()
    np.testing.assert_array_equal(_weights_of(snap / "model.onnx"), WEIGHTS)


def test_in_memory_model_with_unloaded_external_data_is_refused(ws):
    # onnx.load(..., load_external_data=False) then opc.compile(model): the data would be read
    # relative to the current directory, past the checks above
    import opc

    os.symlink("outside/secret.bin", ws.root / "w.bin")  # in the working directory
    model = external_model("w.bin")
    with pytest.raises(ModelError, match="initializer 'w' refers to external data that is not loaded"):
        opc.compile(model)
    onnx.save_model(_reference_model(), str(ws.root / "model" / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    opc.compile(str(ws.root / "model" / "model.onnx"))  # by path: loaded safely, fine
