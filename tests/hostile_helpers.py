"""Shared helpers for the hostile-input tests (tests/test_hostile*.py).

``Workspace`` runs `opc` in-process inside a fresh working directory and checks what the
issue asks of every refused input: the exit code, exactly one line on stderr naming the
culprit, no traceback, no output file, an existing OUT untouched and no stray files
anywhere in the workspace (the working directory included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
import onnx.parser
from onnx import TensorProto, helper

from opc.cli import main
from opc.pass_api import Pass

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
    w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
    h = MatMul (x, w)
    y = Relu (h)
}
"""

SENTINEL = b"existing output: must stay as it is\n"


def tiny_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(TINY)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file (and link) under root, with its bytes (a link: its target)."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                files[rel] = b"->" + os.readlink(p).encode()
            elif p.is_file():
                st = p.stat()
                # big (sparse) files: identity and size stand in for the bytes
                files[rel] = (p.read_bytes() if st.st_size < 2**24
                              else f"<{st.st_size} bytes, ino {st.st_ino}, mtime {st.st_mtime_ns}>".encode())
            elif p.is_dir():
                files[rel + "/"] = b""
    return files


class Workspace:
    def __init__(self, root: Path, capsys):
        self.root = root
        self.capsys = capsys

    def path(self, name: str) -> Path:
        return self.root / name

    def write_model(self, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(model.SerializeToString())
        return p

    def write_bytes(self, data: bytes, name: str = "model.onnx") -> Path:
        p = self.root / name
        p.write_bytes(data)
        return p

    def run(self, *args) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def refuse(self, model_path: Path, *needles: str, rc: int = 1, extra=(), out_name: str = "out.onnx") -> str:
        """Compile must fail the same way with and without an existing OUT; returns the
        error line."""
        out = self.root / out_name
        lines = []
        for existing in (False, True):
            if existing:
                out.write_bytes(SENTINEL)
            elif out.exists():
                out.unlink()
            before = snapshot(self.root)
            code, stdout, err = self.run("compile", model_path, "-o", out, *extra)
            assert code == rc, (code, stdout, err)
            lines_err = err.strip("\n").splitlines()
            assert len(lines_err) == 1, err
            line = lines_err[0]
            assert line.startswith("opc: error:") or line.startswith("opc: usage error:"), line
            assert "Traceback" not in err + stdout
            assert "internal error" not in line, line
            for needle in needles:
                assert needle in line, (needle, line)
            assert snapshot(self.root) == before, "files were written, changed or left behind"
            if existing:
                assert out.read_bytes() == SENTINEL
            else:
                assert not out.exists()
            lines.append(line)
        assert lines[0] == lines[1]
        return lines[0]


def model_with(nodes, inputs, outputs, initializers=(), opset=17, ir_version=8, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version
    return model


def vi(name: str, shape=(2, 4), dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def nested_if_bytes(depth: int) -> bytes:
    """A model whose If nodes nest ``depth`` deep, serialized by hand (protobuf itself
    refuses to build or parse more than about 31 levels). Graph inputs: c (bool), x.
    Built as prefix/suffix pieces around the innermost graph, so it is linear in depth."""
    def leaf(tag: str) -> bytes:
        return helper.make_graph([helper.make_node("Identity", ["x"], [f"y_{tag}"])], f"leaf_{tag}", [],
                                 [vi(f"y_{tag}", [1])]).SerializeToString()

    def head(number: int, length: int) -> bytes:
        return _varint((number << 3) | 2) + _varint(length)

    prefixes, suffixes = [], []
    inner_len = len(leaf("deep"))
    then_b = onnx.AttributeProto(name="then_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
    else_b = onnx.AttributeProto(name="else_branch", type=onnx.AttributeProto.GRAPH).SerializeToString()
    for level in range(depth, 0, -1):
        out = "out" if level == 1 else f"o{level}"
        graph = onnx.GraphProto(name=f"g{level}", output=[vi(out, [1])])
        if level == 1:
            graph.input.extend([vi("c", [], TensorProto.BOOL), vi("x", [1])])
        node = onnx.NodeProto(op_type="If", input=["c"], output=[out], name=f"if{level}").SerializeToString()
        # GraphProto.node = 1 > NodeProto.attribute = 5 > AttributeProto.g = 6 > inner graph
        then_head = then_b + head(6, inner_len)
        then_len = len(then_head) + inner_len
        else_attr = else_b + _field(6, leaf(str(level)))
        else_part = _field(5, else_attr)
        node_len = len(node) + len(head(5, then_len)) + then_len + len(else_part)
        prefix = graph.SerializeToString() + head(1, node_len) + node + head(5, then_len) + then_head
        prefixes.append(prefix)
        suffixes.append(else_part)
        inner_len = len(prefix) + inner_len + len(else_part)
    model = onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)])
    return b"".join([model.SerializeToString(), head(7, inner_len), *reversed(prefixes), leaf("deep"), *suffixes])


@dataclass
class Explode(Pass):
    """A pass that raises: register it as ``hostile_helpers:Explode`` to test failure paths."""

    name: ClassVar[str] = "explode"

    def run(self, graph, ctx):
        raise RuntimeError("injected fault")
