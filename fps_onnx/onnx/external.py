"""External-data references of an ONNX model, checked before any of their bytes is read.

A tensor stored as external data names a file (``location``), an ``offset``
and a ``length``; a model downloaded from elsewhere can name anything. Every
reference of a model (main graph, subgraphs of If/Loop/Scan, node attributes,
sparse tensors, functions and their attribute defaults) must name a regular file inside the model's folder
(after resolving symlinks), with integer offset and length whose bytes lie in
the file, and dims that ask for exactly those bytes. :func:`resolve` checks
them all and rewrites each location to the real file, so that ONNX Runtime,
:func:`read_bytes` and :func:`map_bytes` read only what was checked.
:func:`model_sha256` is the digest of a model's weights: the ONNX file and
the external files it names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
import hashlib
import json
import mmap
import os
import re
import stat
import threading

import onnx
from onnx import TensorProto

from .._io import open_regular
from ..errors import ModelError
from . import protofile

__all__ = [
    "ExternalRef", "HashStopped", "check_tensor", "iter_graphs", "iter_tensors", "map_bytes",
    "model_roots", "model_sha256", "open_inside", "read_bytes", "resolve", "subgraphs", "tensor_nbytes",
]

#: Bits per element of the types a tensor can hold as raw bytes (no STRING).
_BITS = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128, TensorProto.BFLOAT16: 16,
    17: 8, 18: 8, 19: 8, 20: 8,  # FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ
    21: 4, 22: 4, 23: 4,  # UINT4, INT4, FLOAT4E2M1
    24: 8,  # FLOAT8E8M0
    25: 2, 26: 2,  # UINT2, INT2
    27: 6, 28: 6,  # FLOAT6E2M3, FLOAT6E3M2
}
_DIGITS = re.compile(r"[0-9]+")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExternalRef:
    """One checked reference: ``tensor``'s bytes [offset, offset + length) of the
    regular file ``path`` (a real path), named ``location`` in the model."""

    tensor: str
    location: str
    path: str
    offset: int
    length: int


class HashStopped(Exception):
    """:func:`model_sha256` was asked to stop before it finished."""


# --------------------------------------------------------------------------- walk


def subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The graphs an attribute holds (If branches, Loop and Scan bodies)."""
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _walk(model: onnx.ModelProto) -> Iterator[onnx.GraphProto | onnx.AttributeProto]:
    """Every graph and every attribute of ``model``, once each: the main graph,
    the training graphs, the attributes of every node of them and of the
    functions, the functions' attribute defaults, and every subgraph those
    attributes hold, at any depth (a protobuf message is a tree: the walk ends)."""
    graphs: list[onnx.GraphProto] = [model.graph]
    for info in model.training_info:
        graphs += [info.initialization, info.algorithm]
    attributes = [a for f in model.functions for a in f.attribute_proto]
    attributes += [a for f in model.functions for n in f.node for a in n.attribute]
    while graphs or attributes:
        if graphs:
            g = graphs.pop()
            yield g
            attributes += [a for n in g.node for a in n.attribute]
        else:
            a = attributes.pop()
            yield a
            graphs += subgraphs(a)


def iter_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, the training graphs and every subgraph (node attributes
    of graphs and functions, functions' attribute defaults), at any depth."""
    return (g for g in _walk(model) if isinstance(g, onnx.GraphProto))


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers, sparse initializers, node
    attributes (dense and sparse) and functions' attribute defaults, in every
    graph and function."""
    for item in _walk(model):
        if isinstance(item, onnx.GraphProto):
            yield from item.initializer
            for sparse in item.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            continue
        if item.HasField("t"):
            yield item.t
        yield from item.tensors
        for sparse in [item.sparse_tensor] if item.HasField("sparse_tensor") else []:
            yield from (sparse.values, sparse.indices)
        for sparse in item.sparse_tensors:
            yield from (sparse.values, sparse.indices)


# --------------------------------------------------------------------------- check


def model_roots(folder: str, model_path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The real folders external data may lie in: that of ``folder`` and the one
    holding the file ``model_path`` really is (a Hugging Face cache links
    ``model.onnx`` and its data file to blobs in one folder)."""
    roots = [os.path.realpath(folder or ".")]
    if model_path is not None:
        real = os.path.dirname(os.path.realpath(model_path))
        if real not in roots:
            roots.append(real)
    return tuple(roots)


def check_tensor(tensor: TensorProto, folder: str, roots: Sequence[str] | None = None) -> ExternalRef:
    """The checked external-data reference of ``tensor`` (locations relative to
    ``folder``), or ModelError saying what is wrong with it. Nothing is opened
    or allocated: the file is only looked at (``stat``)."""
    name = tensor.name or "(unnamed)"

    def fail(why: str) -> ModelError:
        return ModelError(f"external data of tensor {name!r}: {why}")

    info: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in info:
            raise fail(f"key {entry.key!r} is given twice")
        info[entry.key] = entry.value
    location = info.get("location", "")
    if not location:
        raise fail("no file is named (location is missing)")
    if "\0" in location:
        raise fail(f"location {location!r} holds a NUL character")
    if os.path.isabs(location) or location.startswith("\\"):
        raise fail(f"location {location!r} is an absolute path; it must be relative to the model's folder")
    roots = tuple(roots) if roots is not None else model_roots(folder)
    real = os.path.realpath(os.path.join(roots[0] if not folder else folder, location))
    if not any(_inside(real, root) for root in roots):
        raise fail(f"location {location!r} leads outside the model's folder {roots[0]}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise fail(f"file {location!r} does not exist in {os.path.dirname(real)}") from None
    except OSError as exc:
        raise fail(f"cannot read {location!r}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise fail(f"{location!r} is not a regular file")
    offset = _count(info.get("offset", "0"), "offset", fail)
    length = _count(info["length"], "length", fail) if "length" in info else None

    dims = list(tensor.dims)
    nbytes = tensor_nbytes(tensor)
    if nbytes is None:
        raise fail(f"element type {tensor.data_type} cannot be stored as external data")
    if length is not None and length != nbytes:
        raise fail(f"dims {dims} take {nbytes} bytes, but its length is {length}")
    if offset + nbytes > st.st_size:
        raise fail(f"bytes {offset}..{offset + nbytes} lie past the end of {location!r} "
                   f"({st.st_size} bytes)")
    return ExternalRef(name, location, real, offset, nbytes)


def tensor_nbytes(tensor: TensorProto) -> int | None:
    """The bytes ``tensor``'s dims and element type take as raw data (None for
    types that have no raw form); ModelError for negative dims."""
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelError(f"tensor {tensor.name or '(unnamed)'!r} has dims {dims}: a size is negative")
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        return None
    elements = 1
    for d in dims:
        elements *= d
    return -(-elements * bits // 8)


def resolve(model: onnx.ModelProto, folder: str, model_path: str | os.PathLike | None = None
            ) -> tuple[list[ExternalRef], str]:
    """Check every external-data reference of ``model`` (locations relative to
    ``folder``) and point each at the real file it names.

    Returns the references and the folder the rewritten locations are relative
    to (the real model folder that holds them all). Raises ModelError on the
    first reference that names a file outside the model's folders (see
    :func:`model_roots`), a file that is missing or not a regular file, or bytes
    that are not there.
    """
    roots = model_roots(folder, model_path)
    found = []
    for tensor in iter_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            found.append((tensor, check_tensor(tensor, folder, roots)))
    if not found:
        return [], folder
    used = [r for r in roots if any(_inside(ref.path, r) for _, ref in found)]
    base = used[0] if len(used) == 1 else os.path.commonpath(used)
    for tensor, ref in found:
        entries = [(e.key, e.value) for e in tensor.external_data if e.key not in ("location", "offset")]
        del tensor.external_data[:]
        for key, value in [("location", os.path.relpath(ref.path, base)), ("offset", str(ref.offset)),
                           *entries]:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return [ref for _, ref in found], base


def read_bytes(ref: ExternalRef) -> bytearray:
    """The ``ref.length`` bytes ``ref`` names, read from a file opened without
    blocking and checked again once open (a regular file, long enough)."""
    with open_regular(ref.path, ModelError, ref.tensor, follow_links=False, buffering=0) as fh:
        if ref.offset + ref.length > os.fstat(fh.fileno()).st_size:
            raise ModelError(f"external data of tensor {ref.tensor!r}: {ref.location!r} is shorter "
                             "than when it was checked")
        out = bytearray(ref.length)
        view = memoryview(out)
        fh.seek(ref.offset)
        done = 0
        while done < ref.length:
            got = fh.readinto(view[done:])
            if not got:
                raise ModelError(f"external data of tensor {ref.tensor!r}: {ref.location!r} ended early")
            done += got
        return out


def map_bytes(ref: ExternalRef) -> memoryview | bytearray:
    """The ``ref.length`` bytes ``ref`` names as a read-only memory map (page
    cache pages: nothing is copied or zeroed), from a file opened and checked
    as :func:`read_bytes` opens and checks it; where the file cannot be mapped,
    the bytes read. The map lives as long as the view (or an array on it).

    As for the weights ONNX Runtime maps, the file must not shrink while the
    view is in use (reading a page past its new end raises SIGBUS).
    """
    with open_regular(ref.path, ModelError, ref.tensor, follow_links=False, buffering=0) as fh:
        if ref.offset + ref.length > os.fstat(fh.fileno()).st_size:
            raise ModelError(f"external data of tensor {ref.tensor!r}: {ref.location!r} is shorter "
                             "than when it was checked")
        start = ref.offset - ref.offset % mmap.ALLOCATIONGRANULARITY
        if ref.length == 0:
            return bytearray()
        try:
            mapped = mmap.mmap(fh.fileno(), ref.offset + ref.length - start, offset=start, **_MAP_READ)
        except (OSError, ValueError, OverflowError):
            mapped = None
    if mapped is None:  # a file system that cannot map files
        return read_bytes(ref)
    return memoryview(mapped)[ref.offset - start:]


#: Read-only, shared, page tables filled at once (one fault per map, not per page).
_MAP_READ = (
    {"flags": mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), "prot": mmap.PROT_READ}
    if hasattr(mmap, "MAP_SHARED") else {"access": mmap.ACCESS_READ}
)


# --------------------------------------------------------------------------- digest


def model_sha256(path: str | os.PathLike, refs: Iterable[ExternalRef] | None = None,
                 stop: threading.Event | None = None) -> str:
    """Hex SHA-256 of what a model's weights are.

    The SHA-256 of the ONNX file's bytes when it names no other file; otherwise
    the SHA-256 of a manifest: that digest, then the name (as the model writes
    it) and SHA-256 of each external-data file, sorted by name. ``refs`` are
    the model's checked references (:func:`resolve`); without them the file's
    graph is read and checked here. ``stop`` set: HashStopped at the next chunk.
    """
    if refs is None:
        try:
            model, folder = protofile.load_graph(path)
        except (protofile.MalformedProto, OSError):
            try:
                model = onnx.load(str(path), load_external_data=False)
            except Exception as exc:  # noqa: BLE001 - protobuf raises several types
                raise ModelError(f"cannot read ONNX model {path}: {exc}") from exc
            folder = os.path.dirname(os.path.abspath(path))
        refs, _ = resolve(model, folder, path)
    own = os.path.realpath(path)
    files = {os.path.normpath(r.location): r for r in refs if r.path != own}
    digest = _sha256_file(own, "model", stop)
    if not files:
        return digest
    entries = sorted((name, _sha256_file(r.path, f"data of {r.tensor}", stop)) for name, r in files.items())
    manifest = json.dumps({"onnx": digest, "external_data": entries}, sort_keys=True)
    return hashlib.sha256(manifest.encode()).hexdigest()


def _sha256_file(path: str, tensor: str, stop: threading.Event | None) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)  # one buffer read into again and again: no allocation per chunk
    view = memoryview(buf)
    with open_regular(path, ModelError, tensor, follow_links=False, buffering=0) as fh:
        while True:
            if stop is not None and stop.is_set():
                raise HashStopped(path)
            got = fh.readinto(buf)
            if not got:
                return digest.hexdigest()
            digest.update(view[:got])


# --------------------------------------------------------------------------- helpers


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def _count(text: str, key: str, fail) -> int:
    if len(text) > 20 or not _DIGITS.fullmatch(text):
        raise fail(f"{key} {text!r} is not a whole number of bytes")
    return int(text)


def open_inside(path: str | os.PathLike, roots: Sequence[str], what: str):
    """``path`` opened for reading (unbuffered) when it really lies, symlinks
    followed, inside one of the real folders ``roots`` and is a regular file;
    ModelError otherwise, before any byte is read."""
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in roots):
        raise ModelError(f"{os.fspath(path)!r} ({what}) leads outside the model's folder {roots[0]}")
    return open_regular(real, ModelError, what, follow_links=False, buffering=0)
