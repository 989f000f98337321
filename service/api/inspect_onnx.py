"""An uploaded ONNX model, checked from its protobuf wire format alone (no onnx, no torch).

The gateway walks the fields of the ModelProto without materialising them (the file is memory
mapped and tensor data is skipped over), and refuses what the worker would refuse anyway: bytes
that are not a ModelProto with opset imports and a graph, operator domains other than the
standard one, ONNX functions, and tensors kept in external files. The worker parses the model
again with `onnx` and converts it inside the sandbox (docs/models.md, "ONNX").
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.domain.errors import InvalidUpload

# Wire types of the protobuf encoding.
VARINT, I64, LEN, I32 = 0, 1, 2, 5
MAX_GRAPH_DEPTH = 32  # sub-graphs (If/Loop bodies) nested deeper are refused
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
MIN_IR_VERSION = 3
TENSOR_EXTERNAL = 1

# The fields of each message this check reads or accepts, with their wire types. ModelProto's
# own fields are checked strictly (this is how the bytes are recognised); the others only where
# the check looks inside them.
MODEL_FIELDS = {
    1: VARINT,  # ir_version
    2: LEN,  # producer_name
    3: LEN,  # producer_version
    4: LEN,  # domain
    5: VARINT,  # model_version
    6: LEN,  # doc_string
    7: LEN,  # graph
    8: LEN,  # opset_import
    14: LEN,  # metadata_props
    20: LEN,  # training_info
    25: LEN,  # functions
    26: LEN,  # configuration
}


class _Malformed(Exception):
    pass


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("a varint runs past its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an int for varints, (start, end) for LEN fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire in (I64, I32):
            pos += 8 if wire == I64 else 4
            if pos > end:
                raise _Malformed("a fixed-size field runs past its message")
            yield number, wire, None
        elif wire == LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("a length-delimited field runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        else:
            raise _Malformed(f"wire type {wire}")
    if pos != end:
        raise _Malformed("a field runs past its message")


def _text(buf: Any, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8", errors="replace")


class _Walk:
    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.nodes = 0
        self.initializers = 0

    def graph(self, span: tuple[int, int], depth: int) -> None:
        if depth > MAX_GRAPH_DEPTH:
            raise InvalidUpload(f"ONNX sub-graphs are nested more than {MAX_GRAPH_DEPTH} deep")
        for number, wire, value in _fields(self.buf, *span):
            if wire != LEN:
                continue
            if number == 1:  # node
                self.node(value, depth)
            elif number == 5:  # initializer
                self.initializers += 1
                self.tensor(value)
            elif number == 15:  # sparse_initializer
                self.sparse(value)

    def node(self, span: tuple[int, int], depth: int) -> None:
        self.nodes += 1
        op_type = domain = ""
        attributes = []
        for number, wire, value in _fields(self.buf, *span):
            if wire != LEN:
                continue
            if number == 4:
                op_type = _text(self.buf, value)
            elif number == 7:
                domain = _text(self.buf, value)
            elif number == 5:
                attributes.append(value)
        if domain not in STANDARD_DOMAINS:
            raise InvalidUpload(
                f"the ONNX operator {domain}::{op_type} is outside the standard domain "
                "(ai.onnx); custom operators are not accepted"
            )
        for attribute in attributes:
            for number, wire, value in _fields(self.buf, *attribute):
                if wire != LEN:
                    continue
                if number in (5, 10):  # t, tensors
                    self.tensor(value)
                elif number in (6, 11):  # g, graphs
                    self.graph(value, depth + 1)
                elif number in (22, 23):  # sparse_tensor, sparse_tensors
                    self.sparse(value)

    def sparse(self, span: tuple[int, int]) -> None:
        for number, wire, value in _fields(self.buf, *span):
            if wire == LEN and number in (1, 2):  # values, indices
                self.tensor(value)

    def tensor(self, span: tuple[int, int]) -> None:
        name = ""
        external = False
        for number, wire, value in _fields(self.buf, *span):
            if number == 8 and wire == LEN:
                name = _text(self.buf, value)
            elif (number == 13 and wire == LEN) or (
                number == 14 and wire == VARINT and value == TENSOR_EXTERNAL
            ):
                external = True
        if external:
            raise InvalidUpload(
                f"the ONNX tensor {name!r} is stored in an external file: upload one "
                "self-contained .onnx file (saved without external data)"
            )


def inspect_onnx(path: Path) -> dict[str, Any]:
    """Check an ONNX ModelProto; its facts, or InvalidUpload saying what is wrong."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _inspect(buf, len(buf))
        except _Malformed as exc:
            raise InvalidUpload(
                f"not an ONNX model: the protobuf is malformed or truncated ({exc})"
            ) from None


def _inspect(buf: Any, size: int) -> dict[str, Any]:
    ir_version: int | None = None
    graph: tuple[int, int] | None = None
    opsets: dict[str, int] = {}
    for number, wire, value in _fields(buf, 0, size):
        if MODEL_FIELDS.get(number) != wire:
            raise _Malformed(f"field {number} (wire type {wire}) is not part of an ONNX model")
        if number == 1:
            ir_version = value
        elif number == 7:
            if graph is not None:
                raise _Malformed("two graphs")
            graph = value
        elif number == 8:
            domain, version = "", 0
            for sub, sub_wire, sub_value in _fields(buf, *value):
                if sub == 1 and sub_wire == LEN:
                    domain = _text(buf, sub_value)
                elif sub == 2 and sub_wire == VARINT:
                    version = sub_value
            opsets[domain] = version
        elif number == 25:
            raise InvalidUpload(
                "the ONNX model defines functions, which are not accepted: export it with "
                "functions inlined"
            )
    if ir_version is None or graph is None or not opsets:
        raise InvalidUpload("not an ONNX model: no IR version, graph or opset imports")
    if ir_version < MIN_IR_VERSION:
        raise InvalidUpload(f"ONNX IR version {ir_version} is too old (at least {MIN_IR_VERSION})")
    other = sorted(set(opsets) - STANDARD_DOMAINS)
    if other:
        raise InvalidUpload(
            f"the ONNX model imports operator domain(s) {', '.join(other)}; only the standard "
            "domain (ai.onnx) is accepted"
        )
    walk = _Walk(buf)
    walk.graph(graph, 0)
    return {
        "ir_version": ir_version,
        "opsets": {domain or "ai.onnx": version for domain, version in opsets.items()},
        "nodes": walk.nodes,
        "initializers": walk.initializers,
    }
