"""The mask file: which entries of which weights to fine-tune.

A safetensors file any training stack can read:

* one ``bool`` tensor per selectable weight, True = fine-tune this entry, in
  PyTorch layout: [out_features, in_features] for MatMul/Gemm weights (transposed
  back when ONNX stores them [in, out]), [out, in/groups, kh, kw] for Conv;
* key: the ONNX initializer name the weight traces back to (or, after mapping,
  the PyTorch parameter name);
* ``__metadata__`` (all strings): ``format`` = "fps-mask", ``format_version`` = "1",
  ``method``, ``norm``, ``level``, ``budget`` (JSON), ``num_samples``,
  ``model_sha256`` (SHA-256 of the ONNX file and its external data), ``tool``,
  ``true_means`` = "trainable" and ``layout`` = "torch" (both optional, written
  since they were added; readers ignore unknown keys) and ``tensors``:
  JSON object key -> {"onnx_initializer", "onnx_layout" ("out_in", "in_out" or
  "conv"), "op", "shape", "selected"}; a shard's run (``--shard``) adds
  ``shard`` = "K/N", method "random" its ``seed``, method "fps" its ``act_power``
  (e.g. "1.0") and a capped selection its ``column_cap`` (e.g. "2.0").

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
are mask keys (a mask without an entry has no description; readers use
``.get``), each entry an object whose ``shape`` and ``selected`` agree with
its mask and whose other documented fields have their documented types.
Unknown keys are ignored, at file and at entry level. Saving writes ``shape``
and ``selected`` from the masks themselves, so a saved file always reads back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
import json
import os

import numpy as np

from .._io import Outputs, read_safetensors, write_safetensors
from .._limits import read_json, shown
from .._version import __version__
from ..errors import MaskError
from ..onnx.sites import WeightSite

FORMAT = "fps-mask"
FORMAT_VERSION = "1"
LAYOUTS = ("out_in", "in_out", "conv")


@dataclass
class MaskFile:
    """Masks plus the metadata that travels with them."""

    masks: dict[str, np.ndarray]
    tensors: dict[str, dict]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def selected(self) -> int:
        return int(sum(np.count_nonzero(m) for m in self.masks.values()))

    @property
    def total(self) -> int:
        return int(sum(m.size for m in self.masks.values()))

    def save(self, path: str | os.PathLike, outputs: Outputs | None = None) -> None:
        """Write atomically (temporary file, then rename; or stage it in the
        transaction ``outputs``); ``shape`` and ``selected``
        of each entry of ``tensors`` are those of its mask."""
        arrays = {k: np.ascontiguousarray(v, dtype=bool) for k, v in self.masks.items()}
        counts = {k: int(np.count_nonzero(m)) for k, m in arrays.items()}
        tensors = {
            k: {**self.tensors.get(k, {}), "shape": list(m.shape), "selected": counts[k]}
            for k, m in arrays.items()
        }
        check_tensors(tensors, arrays, "mask metadata", counts)
        meta = {
            **self.meta,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "true_means": "trainable",
            "layout": "torch",
            "tool": f"fps-onnx {__version__}",
            "tensors": json.dumps(tensors, sort_keys=True),
        }
        write_safetensors(path, arrays, meta, outputs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskFile:
        """Read and check a mask file."""
        arrays, meta = read_safetensors(path, FORMAT, FORMAT_VERSION, MaskError, "mask")
        if "tensors" not in meta:
            raise MaskError(f"{path}: metadata 'tensors' is missing")
        tensors = read_json(meta.pop("tensors"), f"{path}: metadata 'tensors'", MaskError)
        if "budget" in meta and not isinstance(
                read_json(meta["budget"], f"{path}: metadata 'budget'", MaskError), dict):
            raise MaskError(f"{path}: metadata 'budget' must be a JSON object")
        for key, value in arrays.items():
            if value.dtype != np.bool_:
                raise MaskError(f"{path}: mask {key!r} is {value.dtype}, not bool")
        check_tensors(tensors, arrays, path)
        return cls({k: arrays[k] for k in arrays}, tensors, meta)


def load_masks(path: str | os.PathLike) -> MaskFile:
    """Read and check a mask file (:meth:`MaskFile.load`)."""
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


def save_masks(masks: MaskFile, path: str | os.PathLike) -> None:
    """Write ``masks`` atomically (:meth:`MaskFile.save`)."""
    masks.save(path)


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
}


def check_tensors(tensors: object, masks: Mapping[str, np.ndarray], source: object,
                  counts: Mapping[str, int] | None = None) -> None:
    """Raise MaskError unless ``tensors`` (the decoded ``tensors`` metadata) describes ``masks``.

    An object keyed by mask keys; each entry an object with ``shape`` (the
    mask's shape) and ``selected`` (its count of True entries), and the
    documented optional fields with their types. Unknown fields are allowed.
    ``counts``: the masks' counts of True entries, where already known.
    """
    where = f"{source}: metadata 'tensors'"
    if not isinstance(tensors, dict):
        raise MaskError(f"{where} must be a JSON object, not {type(tensors).__name__}")
    for key, entry in tensors.items():
        if key not in masks:
            raise MaskError(f"{where} describes {shown(key)}, which is not a mask of the file")
        if not isinstance(entry, dict):
            raise MaskError(f"{where}: the entry of {key!r} must be a JSON object")
        mask = masks[key]
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise MaskError(f"{where}: shape of {key!r} must be a list of non-negative integers")
        if tuple(shape) != tuple(mask.shape):
            raise MaskError(f"{where}: shape of {key!r} is {shown(shape)}, the mask's {list(mask.shape)}")
        selected = entry.get("selected")
        if not _is_int(selected):
            raise MaskError(f"{where}: selected of {key!r} must be an integer")
        count = counts[key] if counts is not None else int(np.count_nonzero(mask))
        if selected != count:
            raise MaskError(f"{where}: selected of {key!r} is {selected}, the mask selects {count}")
        for name, (ok, what) in _FIELDS.items():
            if name in entry and not ok(entry[name]):
                raise MaskError(f"{where}: {name} of {key!r} must be {what}")


def build(
    masks: Mapping[str, np.ndarray],
    sites: list[WeightSite] | tuple[WeightSite, ...],
    meta: Mapping[str, object],
) -> MaskFile:
    """A MaskFile for ``masks`` of ``sites`` with the run's metadata."""
    tensors = {
        s.key: {
            "onnx_initializer": s.key,
            "onnx_layout": s.layout,
            "op": s.op,
            "shape": list(s.shape),
            "selected": int(np.count_nonzero(masks[s.key])),
        }
        for s in sites
    }
    return MaskFile(dict(masks), tensors, {k: str(v) for k, v in meta.items()})
