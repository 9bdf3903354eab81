"""Where an export's weights go: embedded in the ``.onnx``, or in one data file beside it.

The exporter's own files are rewritten into that layout by
:func:`to_one_data_file` / :func:`embed`; weights the legacy exporter left out
(each a graph input named by its state_dict key) are written from the model's
own tensors by :func:`weights_to_data_file` / :func:`save_streamed`, so they
exist once. Both give the same file: page-aligned tensors, those the light
graph references first (:data:`fps_onnx.onnx.protofile.MIN_REFERENCED_BYTES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx

from ..errors import ExportError
from ..onnx import external, protofile
from .models import require as _require

__all__ = ["MIN_EXTERNAL_BYTES", "embed", "external_locations", "input_weights", "inputs_to_initializers",
    "save_streamed", "tensor_bytes", "to_one_data_file", "total_bytes", "weights_to_data_file"]

MIN_EXTERNAL_BYTES = 1024  # embedded tensors this large move to the data file (smaller stay inline)
_COPY_CHUNK = 64 << 20


# --------------------------------------------------------------------------- the exporter's weights


def _external_tensors(proto: onnx.ModelProto):
    return [t for t in external.iter_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]


def total_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the model with every weight embedded."""
    return proto.ByteSize() + sum(external.tensor_nbytes(t) or 0 for t in _external_tensors(proto))


def embed(proto: onnx.ModelProto, base: str) -> None:
    """Read every externally stored weight into ``proto``, one tensor at a time."""
    for tensor in _external_tensors(proto):
        data = external.read_bytes(external.check_tensor(tensor, base))
        tensor.raw_data = bytes(data)
        del data
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # embedded, as the exporter writes it


def to_one_data_file(proto: onnx.ModelProto, base: str, path: Path, location: str) -> None:
    """Copy every externally stored weight, and every embedded initializer of at least
    ``MIN_EXTERNAL_BYTES``, into the one file ``path`` (named ``location`` beside the
    model), a chunk at a time, and point the references there."""
    offset = 0
    with open(path, "wb") as out:
        for tensor in _external_tensors(proto):  # what the exporter wrote aside
            ref = external.check_tensor(tensor, base)
            pad = -offset % 4096  # page-aligned, so the runtime may map the weights
            out.write(b"\0" * pad)
            offset += pad
            with open(ref.path, "rb") as src:
                src.seek(ref.offset)
                left = ref.length
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise ExportError(f"the exporter's data for {tensor.name!r} ended early")
                    out.write(chunk)
                    left -= len(chunk)
            _point(tensor, location, offset, ref.length)
            offset += ref.length
        for tensor in proto.graph.initializer:  # what it left inline (node attributes stay)
            if tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) >= MIN_EXTERNAL_BYTES:
                length = len(tensor.raw_data)
                offset += _write_aligned(out, offset, tensor.raw_data)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                _point(tensor, location, offset - length, length)


def _write_aligned(out, offset: int, data: bytes) -> int:
    """Write ``data`` at the next page boundary after ``offset``; the bytes written."""
    pad = -offset % 4096
    out.write(b"\0" * pad)
    out.write(data)
    return pad + len(data)


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# --------------------------------------------------------------------------- weights streamed from the model

#: ONNX element type of each torch dtype (by name: some builds lack the float8 types).
_ONNX_TYPES = {
    "float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE,
    "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16,
    "int8": onnx.TensorProto.INT8, "int16": onnx.TensorProto.INT16, "int32": onnx.TensorProto.INT32,
    "int64": onnx.TensorProto.INT64, "uint8": onnx.TensorProto.UINT8, "bool": onnx.TensorProto.BOOL,
    "float8_e4m3fn": onnx.TensorProto.FLOAT8E4M3FN, "float8_e5m2": onnx.TensorProto.FLOAT8E5M2,
}


def _onnx_type(tensor) -> int | None:
    return _ONNX_TYPES.get(str(tensor.dtype).removeprefix("torch."))


def input_weights(proto: onnx.ModelProto, state: Mapping, inputs: Mapping) -> dict | None:
    """Graph input name -> state_dict tensor, for every input of a graph exported
    without its parameters that is not one of ``inputs``; None when an input is
    neither (or has a dtype without an ONNX type), so the graph cannot be completed
    from the state_dict."""
    found = {}
    for value in proto.graph.input:
        if value.name in inputs:
            continue
        tensor = state.get(value.name)
        if tensor is None or getattr(tensor, "is_quantized", False) or _onnx_type(tensor) is None:
            return None
        found[value.name] = tensor
    return found


def inputs_to_initializers(proto: onnx.ModelProto, weights: Mapping) -> None:
    """Turn the graph inputs named in ``weights`` into initializers (in input order,
    as the exporter orders them) that give dims, type and name but no data yet."""
    g = proto.graph
    for value in g.input:
        tensor = weights.get(value.name)
        if tensor is not None:
            init = g.initializer.add()
            init.dims.extend(tensor.shape)
            init.data_type = _onnx_type(tensor)
            init.name = value.name
    kept = [value for value in g.input if value.name not in weights]
    del g.input[:]
    g.input.extend(kept)


def tensor_bytes(tensor):
    """The bytes of a CPU tensor as ONNX raw_data holds them, without a copy (a
    non-contiguous tensor is copied, alone)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(_require("torch", "exporting").uint8).numpy()


def weights_to_data_file(proto: onnx.ModelProto, weights: Mapping, path: Path, location: str) -> None:
    """Write each initializer named in ``weights`` of at least ``MIN_EXTERNAL_BYTES``
    into the one file ``path`` (named ``location`` beside the model), page-aligned,
    straight from its tensor, and point the initializer there; smaller ones are
    embedded. The layout is that :func:`to_one_data_file` gives a file the exporter
    wrote with the weights inside (those the light graph references first)."""
    inits = [t for t in proto.graph.initializer if t.name in weights]
    offset = 0
    with open(path, "wb") as out:
        for low, high in ((protofile.MIN_REFERENCED_BYTES, None), (MIN_EXTERNAL_BYTES, protofile.MIN_REFERENCED_BYTES)):
            for tensor in inits:
                size = weights[tensor.name].nbytes
                if size < low or (high is not None and size >= high):
                    continue
                data = tensor_bytes(weights[tensor.name])
                offset += _write_aligned(out, offset, data)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                _point(tensor, location, offset - data.nbytes, data.nbytes)
    for tensor in inits:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            tensor.raw_data = tensor_bytes(weights[tensor.name]).tobytes()


def external_locations(path: Path) -> set[str]:
    """The external-data file names an existing ONNX file refers to (none if it is unreadable)."""
    try:
        model, _ = protofile.load_graph(path)
    except Exception:  # noqa: BLE001 - no readable old model: nothing of it to keep
        return set()
    return {e.value for t in external.iter_tensors(model) for e in t.external_data
            if e.key == "location"}


def save_streamed(proto: onnx.ModelProto, weights: Mapping, path: Path) -> None:
    """Write ``proto`` to ``path`` as ``onnx.save`` would with each initializer named in
    ``weights`` holding its tensor's bytes, written straight from the tensors
    (:func:`fps_onnx.onnx.protofile.save_streamed`)."""
    protofile.save_streamed(proto, {name: tensor_bytes(t) for name, t in weights.items()}, path)
