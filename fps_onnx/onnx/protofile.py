"""The protobuf wire format of ONNX files: reading a graph without its weights'
bytes, and writing a model whose weights are streamed in from elsewhere.

``onnx.load`` copies every embedded weight into the parsed message (ViT-B/16:
346 MB read, then copied again by the parser). Selection needs the graph, and
ONNX Runtime and the scoring can read each weight from the file themselves.
:func:`load_graph` walks the protobuf wire format of the file (memory-mapped,
nothing copied) down to ``ModelProto.graph.initializer[*].raw_data`` and
parses a copy of the file in which each large ``raw_data`` is replaced by an
external-data reference to where its bytes already lie in the file
(``location`` = the file's name, ``offset``, ``length``). Everything else,
subgraphs and their weights included, is kept byte for byte.

:func:`save_streamed` is the reverse: it writes a model exactly as
``onnx.save`` would, each named initializer's ``raw_data`` written straight
from a buffer the caller holds (a PyTorch tensor's memory), never copied into
the message.
"""

from __future__ import annotations

from collections.abc import Mapping
import mmap
import os

import onnx

from .._io import open_regular

__all__ = ["MIN_REFERENCED_BYTES", "MalformedProto", "load_graph"]

#: Embedded weights at least this large become references into the file.
MIN_REFERENCED_BYTES = 4096

# Field numbers of onnx.proto3 that the walk follows or writes.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_LENGTH_DELIMITED = 2


class MalformedProto(ValueError):
    """The bytes are not a protobuf message the walk understands."""


def load_graph(path: str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    """The model in ``path`` with large embedded weights referenced in place, and
    the folder its external-data locations are relative to.

    The references name the file a symlink points to (the Hugging Face cache
    links ``model.onnx`` to a blob named by hash), in that file's folder: ONNX
    Runtime refuses locations that resolve outside the folder. A model with
    external data of its own keeps its folder (that of ``path`` as given); if the
    link leads elsewhere, its embedded weights then stay embedded.

    Raises MalformedProto when the file is not a well-formed protobuf message
    (the caller then reads it with ``onnx.load``, which says what is wrong).
    """
    given = os.path.dirname(os.path.abspath(path))
    real = os.path.realpath(path)
    with open_regular(real, MalformedProto, follow_links=False) as fh:  # a FIFO is never waited on
        if os.fstat(fh.fileno()).st_size == 0:
            raise MalformedProto("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                light, own_external = _model(view, os.path.basename(real), MIN_REFERENCED_BYTES)
                folder = os.path.dirname(real)
                if own_external:
                    folder = given
                    if os.path.dirname(real) != os.path.realpath(given):
                        light, _ = _model(view, "", None)
            finally:
                view.release()
    try:
        return onnx.ModelProto.FromString(light), folder
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise MalformedProto(str(exc)) from exc


def _model(buf: memoryview, location: str, min_bytes: int | None) -> tuple[bytes, bool]:
    """(the rewritten model, whether it has external data of its own)."""
    own_external = []

    def tensor(pos: int, end: int) -> bytes:
        out, external = _tensor(buf, pos, end, location, min_bytes)
        own_external.append(external)
        return out

    def graph(pos: int, end: int) -> bytes:
        return _rewrite_field(buf, pos, end, _GRAPH_INITIALIZER, tensor)

    return _rewrite_field(buf, 0, len(buf), _MODEL_GRAPH, graph), any(own_external)


def _rewrite_field(buf: memoryview, pos: int, end: int, number: int, rewrite) -> bytes:
    """The message in buf[pos:end] with every message field ``number`` replaced by
    ``rewrite(start, end)`` of its value; all other fields byte for byte."""
    out = bytearray()
    for field, wire, start, value, stop in _fields(buf, pos, end):
        if field == number and wire == _LENGTH_DELIMITED:
            out += _delimited(field, rewrite(value, stop))
        else:
            out += buf[start:stop]
    return bytes(out)


def _tensor(buf: memoryview, pos: int, end: int, location: str, min_bytes: int | None
            ) -> tuple[bytes, bool]:
    """(the tensor, its raw_data referenced in place if large; whether it was external already)."""
    out = bytearray()
    raw = None
    external = False
    for field, wire, start, value, stop in _fields(buf, pos, end):
        if (field == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED and min_bytes is not None
                and stop - value >= min_bytes):
            raw = (value, stop - value)
            continue
        if field == _TENSOR_DATA_LOCATION and wire == 0:
            external = _varint(buf, value)[0] == onnx.TensorProto.EXTERNAL
        out += buf[start:stop]
    if raw is not None:
        for key, text in (("location", location), ("offset", raw[0]), ("length", raw[1])):
            entry = _delimited(1, str(key).encode()) + _delimited(2, str(text).encode())
            out += _delimited(_TENSOR_EXTERNAL_DATA, entry)
        # A later scalar field wins in protobuf: this overrides any DEFAULT.
        out += _varint_bytes(_TENSOR_DATA_LOCATION << 3) + _varint_bytes(onnx.TensorProto.EXTERNAL)
    return bytes(out), external


def _fields(buf: memoryview, pos: int, end: int):
    """(field, wire type, start of the field, start of its value, end) of each field."""
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        value = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            size, value = _varint(buf, pos)
            pos = value + size
        else:
            raise MalformedProto(f"unsupported wire type {wire} at byte {start}")
        if field == 0 or pos > end:
            raise MalformedProto(f"field at byte {start} runs past its message")
        yield field, wire, start, value, pos


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedProto(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _delimited(field: int, payload: bytes) -> bytes:
    return _key(field) + _varint_bytes(len(payload)) + payload


# --------------------------------------------------------------------------- writing


def save_streamed(proto: onnx.ModelProto, raw: Mapping[str, memoryview], path: str | os.PathLike) -> None:
    """Write ``proto`` to ``path`` exactly as ``onnx.save`` would with each initializer
    named in ``raw`` holding those bytes as its raw_data, written straight from the
    buffers. Fields are serialized in field-number order, so the model is split
    around the graph (field 7), the graph around its initializers (5) and each
    initializer around raw_data (9)."""
    g = proto.graph
    model_head, model_tail = _split(proto, _MODEL_GRAPH)
    graph_head, graph_tail = _split(g, _GRAPH_INITIALIZER)
    parts = []  # per initializer: (bytes before raw_data, data or None, bytes after)
    for tensor in g.initializer:
        if tensor.name in raw:
            head, tail = _split(tensor, _TENSOR_RAW_DATA)
            parts.append((head, memoryview(raw[tensor.name]).cast("B"), tail))
        else:
            parts.append((tensor.SerializeToString(), None, b""))
    sizes = [len(head) + len(tail) + (0 if data is None else _field_size(_TENSOR_RAW_DATA, data.nbytes))
             for head, data, tail in parts]
    graph_size = len(graph_head) + len(graph_tail) + sum(_field_size(_GRAPH_INITIALIZER, n) for n in sizes)
    with open(path, "wb") as out:
        out.write(model_head + _key(_MODEL_GRAPH) + _varint_bytes(graph_size) + graph_head)
        for (head, data, tail), size in zip(parts, sizes):
            out.write(_key(_GRAPH_INITIALIZER) + _varint_bytes(size) + head)
            if data is not None:
                out.write(_key(_TENSOR_RAW_DATA) + _varint_bytes(data.nbytes))
                out.write(data)
            out.write(tail)
        out.write(graph_tail + model_tail)


def _split(message, number: int) -> tuple[bytes, bytes]:
    """``message`` serialized as (its fields numbered below ``number``, those above)."""
    halves = []
    for keep_low in (True, False):
        half = type(message)()
        half.CopyFrom(message)
        for fd in message.DESCRIPTOR.fields:
            if fd.number == number or (fd.number > number) == keep_low:
                half.ClearField(fd.name)
        halves.append(half.SerializeToString())
    return halves[0], halves[1]


def _key(number: int) -> bytes:
    return _varint_bytes(number << 3 | _LENGTH_DELIMITED)


def _field_size(number: int, length: int) -> int:
    return len(_key(number)) + len(_varint_bytes(length)) + length
