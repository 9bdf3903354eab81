"""The mask file: which entries of which weights to fine-tune.

A safetensors file any training stack can read. Two versions exist; readers
read both (:meth:`MaskFile.load`), writers write version 2 unless told
otherwise (:data:`DEFAULT_VERSION`; ``select --mask-format v1``,
``save_masks(..., version="1")``).

Version 2 (index-coded; ``format_version`` = "2"): per selectable weight one
unsigned integer tensor naming the selected entries, in PyTorch layout
([out_features, in_features] for MatMul/Gemm weights, transposed back when ONNX
stores them [in, out]; [out, in/groups, kh, kw] for Conv), with ``encoding``:

* "rows", when every row (output neuron, ``weight[j]``) selects the same count K
  (neuron level): an array [out, K] of each row's selected positions within the
  row (0 to row length - 1, the row read row-major: for Conv over
  in/groups * kh * kw), strictly increasing along each row, in the smallest of
  uint16 / uint32 / uint64 that holds the row length (uint16 up to 65,536);
* "flat", otherwise (layer level, ``--shira-r``, rows that differ in count,
  weights of one dimension): the strictly increasing flat (row-major) indices
  into the weight, uint32 (uint64 above 2^32 entries).

An empty selection is an [out, 0] "rows" array (or an empty "flat" one). The
weight's own shape is the entry's ``shape`` (below); it bounds every index.
The file holds nothing but the indices and the header: its bytes are the
indices' bytes plus the JSON header (padded to 8 bytes) and 8 bytes of length.

Version 1 (dense; ``format_version`` = "1"): one ``bool`` tensor per weight,
shaped like the weight, True = fine-tune this entry. 200x the bytes of version
2 at 0.5% selected; kept for readers older than version 2. Reading one turns
each tensor into its indices as it is read, so about one dense mask is held at
a time.

Both versions:

* key: the ONNX initializer name the weight traces back to (or, after mapping,
  the PyTorch parameter name);
* ``__metadata__`` (all strings): ``format`` = "fps-mask", ``format_version``,
  ``method``, ``norm``, ``level``, ``budget`` (JSON), ``num_samples``,
  ``model_sha256`` (SHA-256 of the ONNX file and its external data), ``tool``,
  ``true_means`` = "trainable" and ``layout`` = "torch" (both optional, written
  since they were added; readers ignore unknown keys) and ``tensors``:
  JSON object key -> {"onnx_initializer", "onnx_layout" ("out_in", "in_out" or
  "conv"), "op", "shape" (the weight's), "selected" (its count), and in version
  2 "encoding" ("rows" or "flat")}; a shard's run (``--shard``) adds
  ``shard`` = "K/N", method "random" its ``seed``, method "fps" its ``act_power``
  (e.g. "1.0"), a capped selection its ``column_cap`` (e.g. "2.0") and a low-rank one
  its ``low_rank`` (e.g. "16").

Mapping onto PyTorch names (:mod:`fps_onnx.torch.mapping`) adds, per tensor,
``torch_name``, ``match`` ("name", "exact", "close", "quantized", "scaled" or
"order") and where relevant ``torch_transposed``, ``torch_rows``,
``tied_onnx_initializers`` and ``torch_aliases``; at file level
``torch_mapping`` and ``unmapped``. After mapping, each mask has its
parameter's shape: ``torch_transposed`` = true when the parameter is stored
[in, out] (GPT-2's Conv1D) and the mask was transposed to it;
``torch_rows`` = [start, stop] when the mask is those rows of the [out, in]
mask of a packed ONNX weight (``onnx_initializer``, e.g. a qkv projection). Masks of
``method`` = "gps" (gradients of a PyTorch model) are keyed by parameter name
from the start, with ``onnx_initializer`` null, ``loss`` and ``labels``.

Reading checks the metadata's schema (JSON within the limits of
:func:`fps_onnx._limits.read_json`): ``budget``, where present, is a JSON
object; ``tensors`` is a JSON object whose keys
are mask keys (a version 1 mask without an entry has no description; readers use
``.get``; in version 2 every tensor has one), each entry an object whose ``shape`` and ``selected`` agree with
its mask and whose other documented fields have their documented types.
Version 2 is checked before any tensor is read: each entry's shape holds at
most :data:`fps_onnx._limits.MAX_WEIGHT_ENTRIES` entries, and the header's
dtype and shape of its tensor are those its ``encoding``, ``shape`` and
``selected`` prescribe; then the indices are checked in range and strictly
increasing (per row, or overall). So the work and memory of a read are bounded
by the file's size, whatever its metadata claims.
Unknown keys are ignored, at file and at entry level. Saving writes ``shape``,
``selected`` (and ``encoding``) from the masks themselves, so a saved file always reads back.

Readers without fps-onnx expand a version 2 tensor with NumPy (see README.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import json
import math
import os

import numpy as np

from .._io import Outputs, read_safetensors, write_safetensors
from .._limits import MAX_WEIGHT_ENTRIES, physical_memory, read_json, shown
from .._version import __version__
from ..errors import MaskError
from ..onnx.sites import WeightSite

FORMAT = "fps-mask"
#: The versions :meth:`MaskFile.load` reads.
VERSIONS = ("1", "2")
#: The version every writer writes unless told otherwise (``select --mask-format``, ``save_masks``).
DEFAULT_VERSION = "2"
FORMAT_VERSION = DEFAULT_VERSION  # the name version 1 had
ENCODINGS = ("rows", "flat")
LAYOUTS = ("out_in", "in_out", "conv")

# safetensors' names of the dtypes a mask file holds
_DTYPE_NAMES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32",
                np.dtype(np.uint64): "U64"}


def rows_dtype(row_length: int) -> np.dtype:
    """The dtype of a "rows" array: the smallest unsigned one holding positions 0 .. ``row_length`` - 1."""
    for dtype in (np.uint16, np.uint32):
        if row_length <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def flat_dtype(size: int) -> np.dtype:
    """The dtype of a "flat" array of a weight of ``size`` entries: uint32, uint64 above 2^32."""
    return np.dtype(np.uint32 if size <= 1 << 32 else np.uint64)


def _row_split(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, row length) of a weight that "rows" can encode: two or more dimensions, none empty."""
    if len(shape) < 2 or shape[0] == 0:
        return None
    length = math.prod(shape[1:])
    return (shape[0], length) if length else None


class WeightMask:
    """The selection of one weight, held as it came: a dense bool array, the sorted flat
    indices, or each row's sorted positions ([out, K]); converted on request."""

    __slots__ = ("shape", "_dense", "_flat", "_rows")

    def __init__(self, shape: Iterable[int], *, dense: np.ndarray | None = None,
                 flat: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
        self.shape = tuple(int(d) for d in shape)
        self._dense, self._flat, self._rows = dense, flat, rows

    @classmethod
    def of_dense(cls, mask: object) -> WeightMask:
        """A bool array, kept as it is (other arrays are read as nonzero = selected)."""
        array = np.asarray(mask)
        return cls(array.shape, dense=array if array.dtype == np.bool_ else array.astype(bool))

    @classmethod
    def of_indices(cls, shape: Iterable[int], indices: np.ndarray, where: str = "indices") -> WeightMask:
        """From sorted flat indices (1-D) or each row's sorted positions ([out, K]) into a weight
        of ``shape``; MaskError unless in range and strictly increasing."""
        shape = _checked_shape(shape, where)
        array = np.asarray(indices)
        if array.dtype.kind not in "ui":
            raise MaskError(f"{where} are {array.dtype}, not integers")
        if array.ndim == 1:
            _check_flat(array, math.prod(shape), where)
            return cls(shape, flat=array)
        split = _row_split(shape)
        if array.ndim != 2 or split is None or array.shape[0] != split[0]:
            raise MaskError(f"{where}: {list(array.shape)} are neither flat indices nor the positions "
                            f"of each row of a {list(shape)} weight")
        _check_rows(array, split[1], where)
        return cls(shape, rows=array)

    @classmethod
    def compact(cls, mask: np.ndarray) -> WeightMask:
        """The indices of the bool array ``mask`` (which may then be reused): each row's
        positions where every row selects as many, else the flat indices."""
        held = cls(mask.shape, dense=mask)
        rows = held.rows()
        if rows is not None:
            return cls(mask.shape, rows=rows)
        return cls(mask.shape, flat=held.indices().astype(flat_dtype(mask.size)))

    @property
    def count(self) -> int:
        if self._dense is not None:
            return int(np.count_nonzero(self._dense))
        return int((self._flat if self._flat is not None else self._rows).size)

    def indices(self) -> np.ndarray:
        """The sorted flat (row-major) int64 indices of the selected entries (a new array)."""
        if self._flat is not None:
            return self._flat.astype(np.int64)
        if self._rows is not None:
            out, length = self._rows.shape[0], math.prod(self.shape[1:])
            starts = np.arange(out, dtype=np.int64)[:, None] * length
            return (starts + self._rows.astype(np.int64)).reshape(-1)
        return np.flatnonzero(self._dense)

    def rows(self) -> np.ndarray | None:
        """Each row's selected positions, [out, K], where every row selects K (else None)."""
        if self._rows is not None:
            return self._rows
        split = _row_split(self.shape)
        if split is None:
            return None
        out, length = split
        flat = self.indices()
        row = flat // length
        counts = np.bincount(row, minlength=out)
        if np.any(counts != counts[0]):
            return None
        return (flat - row * length).astype(rows_dtype(length)).reshape(out, int(counts[0]))

    def dense(self) -> np.ndarray:
        """The bool array (built on each call unless the mask is held dense)."""
        if self._dense is not None:
            return self._dense
        size = math.prod(self.shape)
        memory = physical_memory()
        if memory is not None and size > memory:
            raise MaskError(f"a dense mask of {list(self.shape)} ({size:,} entries) does not fit in "
                            f"this machine's memory; read its indices instead")
        mask = np.zeros(size, bool)
        mask[self.indices()] = True
        return mask.reshape(self.shape)

    def encoded(self) -> tuple[str, np.ndarray]:
        """(encoding, array) as version 2 writes them."""
        rows = self.rows()
        if rows is not None:
            return "rows", np.ascontiguousarray(rows, dtype=rows_dtype(math.prod(self.shape[1:])))
        return "flat", self.indices().astype(flat_dtype(math.prod(self.shape)))


class _Dense(Mapping):
    """key -> dense bool mask, each built when asked for (:meth:`MaskFile.dense`)."""

    def __init__(self, masks: Mapping[str, WeightMask]) -> None:
        self._masks = masks

    def __getitem__(self, key: str) -> np.ndarray:
        return self._masks[key].dense()

    def __contains__(self, key: object) -> bool:  # without building the mask
        return key in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)


class MaskFile:
    """Masks plus the metadata that travels with them.

    Per key: :meth:`shape`, :meth:`count`, :meth:`indices` (sorted flat int64
    indices), :meth:`rows` and :meth:`dense` (a bool array, built on demand).
    Built from dense bool arrays (``MaskFile(masks, tensors, meta)``), from
    indices (:meth:`from_indices`) or read from a file of either version
    (:meth:`load`).
    """

    def __init__(self, masks: Mapping[str, object] | None = None, tensors: Mapping[str, dict] | None = None,
                 meta: Mapping[str, str] | None = None) -> None:
        self._masks: dict[str, WeightMask] = {
            k: m if isinstance(m, WeightMask) else WeightMask.of_dense(m) for k, m in (masks or {}).items()}
        self.tensors: dict[str, dict] = dict(tensors or {})
        self.meta: dict[str, str] = dict(meta or {})

    @classmethod
    def from_indices(cls, indices: Mapping[str, tuple[Iterable[int], np.ndarray]],
                     tensors: Mapping[str, dict] | None = None, meta: Mapping[str, str] | None = None) -> MaskFile:
        """Masks given as key -> (weight shape, sorted flat indices or [out, K] row positions)."""
        return cls({k: WeightMask.of_indices(shape, array, f"the indices of {k!r}")
                    for k, (shape, array) in indices.items()}, tensors, meta)

    def keys(self) -> list[str]:
        return list(self._masks)

    def __contains__(self, key: object) -> bool:
        return key in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    def mask(self, key: str) -> WeightMask:
        return self._masks[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._masks[key].shape

    def count(self, key: str) -> int:
        return self._masks[key].count

    def indices(self, key: str) -> np.ndarray:
        """The sorted flat int64 indices of the entries selected in ``key`` (row-major, PyTorch layout)."""
        return self._masks[key].indices()

    def rows(self, key: str) -> np.ndarray | None:
        """Each row's selected positions [out, K], where every row of ``key`` selects K; else None."""
        return self._masks[key].rows()

    def dense(self, key: str) -> np.ndarray:
        """The bool mask of ``key``, built now (not kept)."""
        return self._masks[key].dense()

    @property
    def masks(self) -> Mapping[str, np.ndarray]:
        """Read-only key -> dense bool mask, each built when read: the slow path, for callers
        that need dense arrays; prefer :meth:`indices`."""
        return _Dense(self._masks)

    @property
    def selected(self) -> int:
        return sum(m.count for m in self._masks.values())

    @property
    def total(self) -> int:
        return sum(math.prod(m.shape) for m in self._masks.values())

    def subset(self, keys: Iterable[str]) -> MaskFile:
        """The masks of ``keys`` (in that order), with their entries and the file's metadata."""
        keys = list(keys)
        return MaskFile({k: self._masks[k] for k in keys},
                        {k: self.tensors[k] for k in keys if k in self.tensors}, self.meta)

    def renamed(self, names: Mapping[str, str]) -> MaskFile:
        """The same masks, each key ``k`` as ``names.get(k, k)``."""
        return MaskFile({names.get(k, k): m for k, m in self._masks.items()},
                        {names.get(k, k): e for k, e in self.tensors.items()}, self.meta)

    def save(self, path: str | os.PathLike, outputs: Outputs | None = None, *,
             version: str | None = None) -> None:
        """Write in format ``version`` ("1" or "2"; :data:`DEFAULT_VERSION` when None)
        atomically (temporary file, then rename; or stage it in the transaction
        ``outputs``); ``shape``, ``selected`` (and ``encoding``) of each entry of
        ``tensors`` are those of its mask."""
        version = check_version(version)
        tensors, arrays = {}, {}
        for key, mask in self._masks.items():
            entry = {k: v for k, v in self.tensors.get(key, {}).items() if k != "encoding"}
            entry.update(shape=list(mask.shape), selected=mask.count)
            if version == "1":
                arrays[key] = np.ascontiguousarray(mask.dense(), dtype=bool)
            else:
                entry["encoding"], arrays[key] = mask.encoded()
            tensors[key] = entry
        check_tensors(tensors, {k: m.shape for k, m in self._masks.items()}, "mask metadata",
                      {k: e["selected"] for k, e in tensors.items()})
        meta = {
            **self.meta,
            "format": FORMAT,
            "format_version": version,
            "true_means": "trainable",
            "layout": "torch",
            "tool": f"fps-onnx {__version__}",
            "tensors": json.dumps(tensors, sort_keys=True),
        }
        write_safetensors(path, arrays, meta, outputs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskFile:
        """Read and check a mask file of either version."""
        read: dict = {}

        def check_header(header: dict, meta: dict) -> None:
            read["tensors"] = _tensors_of(meta, path)
            if meta["format_version"] == "1":
                for key, (dtype, _) in header.items():
                    if dtype != "BOOL":
                        raise MaskError(f"{path}: mask {key!r} is {_numpy_name(dtype)}, not bool")
            else:
                _check_header(read["tensors"], header, path)

        def held(key: str, array: np.ndarray, meta: dict) -> WeightMask:
            """Each tensor as its indices as soon as it is read: a version 1 file's peak is
            about one dense mask, not all of them."""
            if meta["format_version"] == "1":
                return WeightMask.compact(array)
            return WeightMask.of_indices(read["tensors"][key]["shape"], array, f"{path}: mask {key!r}")

        masks, meta = read_safetensors(path, FORMAT, VERSIONS, MaskError, "mask", check=check_header,
                                       convert=held)
        meta.pop("tensors")
        tensors = read["tensors"]
        if meta["format_version"] == "1":
            check_tensors(tensors, {k: m.shape for k, m in masks.items()}, path,
                          {k: m.count for k, m in masks.items()})
        return cls(masks, tensors, meta)


def check_version(version: str | None) -> str:
    """``version`` as written ("1" or "2", "v1" or "v2"), :data:`DEFAULT_VERSION` for None."""
    if version is None:
        return DEFAULT_VERSION
    plain = str(version).removeprefix("v")
    if plain not in VERSIONS:
        raise MaskError(f"mask format version must be one of {', '.join(VERSIONS)}, not {shown(version)}")
    return plain


def _numpy_name(dtype: str) -> str:
    names = {v: k.name for k, v in _DTYPE_NAMES.items()}
    return names.get(dtype, {"U8": "uint8", "I8": "int8", "F32": "float32"}.get(dtype, dtype))


def _tensors_of(meta: dict, path) -> object:
    if "tensors" not in meta:
        raise MaskError(f"{path}: metadata 'tensors' is missing")
    tensors = read_json(meta["tensors"], f"{path}: metadata 'tensors'", MaskError)
    if "budget" in meta and not isinstance(
            read_json(meta["budget"], f"{path}: metadata 'budget'", MaskError), dict):
        raise MaskError(f"{path}: metadata 'budget' must be a JSON object")
    return tensors


def _checked_shape(shape: object, where: str) -> tuple[int, ...]:
    """A weight's shape: non-negative integers of at most MAX_WEIGHT_ENTRIES entries in all."""
    if not isinstance(shape, (list, tuple)) or not all(_is_int(d) and d >= 0 for d in shape):
        raise MaskError(f"{where}: the shape must be a list of non-negative integers, not {shown(shape)}")
    size = 1
    for d in shape:
        size *= d
        if size > MAX_WEIGHT_ENTRIES:
            raise MaskError(f"{where}: the shape {shown(list(shape))} claims more than "
                            f"{MAX_WEIGHT_ENTRIES:,} entries")
    return tuple(shape)


def _check_header(tensors: object, header: Mapping[str, tuple[str, list[int]]], path) -> None:
    """Version 2, before any tensor is read: each tensor's dtype and shape in the header are
    those its entry's encoding, shape and selected prescribe."""
    where = f"{path}: metadata 'tensors'"
    if not isinstance(tensors, dict):
        raise MaskError(f"{where} must be a JSON object, not {type(tensors).__name__}")
    shapes, counts = {}, {}
    for key, (dtype, stored) in header.items():
        entry = tensors.get(key)
        if not isinstance(entry, dict):
            raise MaskError(f"{where}: mask {key!r} has no entry (version 2 describes every mask)")
        shape = _checked_shape(entry.get("shape"), f"{where}: mask {key!r}")
        size = math.prod(shape)
        selected = entry.get("selected")
        if not _is_int(selected) or not 0 <= selected <= size:
            raise MaskError(f"{where}: selected of {key!r} must be an integer from 0 to {size:,}, "
                            f"not {shown(selected)}")
        encoding = entry.get("encoding")
        split = _row_split(shape)
        if encoding == "rows" and split is not None and selected % split[0] == 0:
            want = (_DTYPE_NAMES[rows_dtype(split[1])], [split[0], selected // split[0]])
        elif encoding == "flat":
            want = (_DTYPE_NAMES[flat_dtype(size)], [selected])
        elif encoding == "rows":
            raise MaskError(f"{where}: mask {key!r} is encoded by rows, which a {list(shape)} weight "
                            f"selecting {selected:,} entries cannot be")
        else:
            raise MaskError(f"{where}: encoding of {key!r} must be one of {', '.join(ENCODINGS)}, "
                            f"not {shown(encoding)}")
        if (dtype, list(stored)) != want:
            raise MaskError(f"{path}: mask {key!r} is {_numpy_name(dtype)} {shown(list(stored))}; "
                            f"its entry ({encoding}, shape {list(shape)}, {selected:,} selected) makes it "
                            f"{_numpy_name(want[0])} {want[1]}")
        shapes[key], counts[key] = shape, selected
    check_tensors(tensors, shapes, path, counts)


def _check_flat(flat: np.ndarray, size: int, where: str) -> None:
    if flat.size > 1 and not np.all(flat[1:] > flat[:-1]):
        raise MaskError(f"{where}: the flat indices are not strictly increasing")
    if flat.size and (int(flat[0]) < 0 or int(flat[-1]) >= size):
        raise MaskError(f"{where}: an index lies outside the weight's {size:,} entries")


def _check_rows(rows: np.ndarray, length: int, where: str) -> None:
    if rows.shape[1] > 1 and not np.all(rows[:, 1:] > rows[:, :-1]):
        raise MaskError(f"{where}: the positions of a row are not strictly increasing")
    if rows.size and (int(rows[:, 0].min()) < 0 or int(rows[:, -1].max()) >= length):
        raise MaskError(f"{where}: a position lies outside the row length {length:,}")


def load_masks(path: str | os.PathLike) -> MaskFile:
    """Read and check a mask file of either version (:meth:`MaskFile.load`)."""
    return MaskFile.load(path)


def mask_file_of(masks: Mapping[str, object] | MaskFile | str | os.PathLike) -> MaskFile:
    """The masks a trainer or integration is given, as a MaskFile: a MaskFile as it is,
    a path read (:meth:`MaskFile.load`), or a mapping of name -> bool array (NumPy, or a
    tensor with ``.detach()`` such as torch's) without metadata. MaskError for anything
    else, or for a mask that is not bool."""
    if isinstance(masks, MaskFile):
        return masks
    if isinstance(masks, (str, os.PathLike)):
        return MaskFile.load(masks)
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a mapping of name to bool array, a MaskFile or a path, "
                        f"not {type(masks).__name__}")
    out = {}
    for key, mask in masks.items():
        if hasattr(mask, "detach"):  # a torch tensor, without importing torch
            mask = mask.detach().cpu().numpy()
        array = np.asarray(mask)
        if array.dtype != np.bool_:
            raise MaskError(f"mask {key!r} is {array.dtype}, not bool")
        out[key] = array
    return MaskFile(out, {})


def save_masks(masks: MaskFile, path: str | os.PathLike, *, version: str | None = None) -> None:
    """Write ``masks`` atomically in format ``version`` (:meth:`MaskFile.save`)."""
    masks.save(path, version=version)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value, null: bool = False) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) or (null and v is None) for v in value)


# Documented optional fields of an entry: (check, what it must be).
_FIELDS = {
    "onnx_initializer": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "onnx_layout": (lambda v: v in LAYOUTS, "one of " + ", ".join(LAYOUTS)),
    "op": (lambda v: isinstance(v, str), "a string"),
    "torch_name": (lambda v: isinstance(v, str), "a string"),
    "match": (lambda v: isinstance(v, str), "a string"),
    "torch_transposed": (lambda v: isinstance(v, bool), "true or false"),
    "tied_onnx_initializers": (lambda v: _is_str_list(v, null=True), "a list of strings"),
    "torch_aliases": (_is_str_list, "a list of strings"),
    "encoding": (lambda v: v in ENCODINGS, "one of " + ", ".join(ENCODINGS)),
}


def check_tensors(tensors: object, shapes: Mapping[str, tuple[int, ...]], source: object,
                  counts: Mapping[str, int]) -> None:
    """Raise MaskError unless ``tensors`` (the decoded ``tensors`` metadata) describes masks
    of ``shapes`` selecting ``counts`` entries (key -> shape, key -> count).

    An object keyed by mask keys; each entry an object with ``shape`` (the
    mask's shape) and ``selected`` (its count of selected entries), and the
    documented optional fields with their types. Unknown fields are allowed.
    """
    where = f"{source}: metadata 'tensors'"
    if not isinstance(tensors, dict):
        raise MaskError(f"{where} must be a JSON object, not {type(tensors).__name__}")
    for key, entry in tensors.items():
        if key not in shapes:
            raise MaskError(f"{where} describes {shown(key)}, which is not a mask of the file")
        if not isinstance(entry, dict):
            raise MaskError(f"{where}: the entry of {key!r} must be a JSON object")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise MaskError(f"{where}: shape of {key!r} must be a list of non-negative integers")
        if tuple(shape) != tuple(shapes[key]):
            raise MaskError(f"{where}: shape of {key!r} is {shown(shape)}, the mask's {list(shapes[key])}")
        selected = entry.get("selected")
        if not _is_int(selected):
            raise MaskError(f"{where}: selected of {key!r} must be an integer")
        if selected != counts[key]:
            raise MaskError(f"{where}: selected of {key!r} is {selected}, the mask selects {counts[key]}")
        for name, (ok, what) in _FIELDS.items():
            if name in entry and not ok(entry[name]):
                raise MaskError(f"{where}: {name} of {key!r} must be {what}")


def build(
    masks: Mapping[str, np.ndarray | WeightMask],
    sites: list[WeightSite] | tuple[WeightSite, ...],
    meta: Mapping[str, object],
) -> MaskFile:
    """A MaskFile for ``masks`` (bool arrays, or :class:`WeightMask`) of ``sites`` with the run's metadata."""
    held = MaskFile(masks)
    tensors = {
        s.key: {
            "onnx_initializer": s.key,
            "onnx_layout": s.layout,
            "op": s.op,
            "shape": list(s.shape),
            "selected": held.count(s.key),
        }
        for s in sites
    }
    return MaskFile({s.key: held.mask(s.key) for s in sites}, tensors, {k: str(v) for k, v in meta.items()})
