"""The mask file: which entries of which weights to fine-tune.

A safetensors file any training stack can read:

* one ``bool`` tensor per selectable weight, True = fine-tune this entry, in
  PyTorch layout: [out_features, in_features] for MatMul/Gemm weights (transposed
  back when ONNX stores them [in, out]), [out, in/groups, kh, kw] for Conv;
* key: the ONNX initializer name the weight traces back to (or, after mapping,
  the PyTorch parameter name);
* ``__metadata__`` (all strings): ``format`` = "fps-mask", ``format_version`` = "1",
  ``method``, ``norm``, ``level``, ``budget`` (JSON), ``num_samples``,
  ``model_sha256`` (SHA-256 of the ONNX file's bytes), ``tool`` and ``tensors``:
  JSON object key -> {"onnx_initializer", "onnx_layout" ("out_in", "in_out" or
  "conv"), "op", "shape", "selected"}.

Mapping onto PyTorch names (:mod:`fps_onnx.mapping`) adds, per tensor,
``torch_name``, ``match`` ("name", "exact", "close", "scaled" or "order") and
where relevant ``torch_transposed``, ``tied_onnx_initializers`` and
``torch_aliases``; at file level ``torch_mapping`` and ``unmapped``. Masks of
``method`` = "gps" (gradients of a PyTorch model) are keyed by parameter name
from the start, with ``onnx_initializer`` null, ``loss`` and ``labels``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
import json
import os

import numpy as np

from . import __version__
from ._io import read_safetensors, write_safetensors
from .errors import MaskError
from .graph import WeightSite

FORMAT = "fps-mask"
FORMAT_VERSION = "1"


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

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, then rename)."""
        meta = {
            **self.meta,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool": f"fps-onnx {__version__}",
            "tensors": json.dumps(self.tensors, sort_keys=True),
        }
        arrays = {k: np.ascontiguousarray(v, dtype=bool) for k, v in self.masks.items()}
        write_safetensors(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskFile:
        """Read and check a mask file."""
        arrays, meta = read_safetensors(path, FORMAT, FORMAT_VERSION, MaskError, "mask")
        try:
            tensors = json.loads(meta.pop("tensors", "{}"))
        except json.JSONDecodeError as exc:
            raise MaskError(f"{path}: metadata 'tensors' is not JSON") from exc
        for key, value in arrays.items():
            if value.dtype != np.bool_:
                raise MaskError(f"{path}: mask {key!r} is {value.dtype}, not bool")
        return cls({k: arrays[k] for k in arrays}, tensors, meta)


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
