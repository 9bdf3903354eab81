"""Mask keys as PyTorch parameter names: matching ONNX weights to a state_dict.

Exporters and third-party tools rename weights (``onnx::MatMul_123``,
``val_13``) and store Linear weights transposed. A trainer needs to know which
of its parameters each mask belongs to, so every ONNX weight is matched to a
parameter of the PyTorch model, in this order:

1. **name**: the initializer is named like a parameter of the same shape;
2. **value**: the weight (in PyTorch layout) or its transpose equals a
   parameter of the same size, exactly or within ``MatchConfig`` tolerances;
   fp16/bf16 ONNX weights are compared after casting the parameter to the
   same precision. Candidates are found through a sorted index of abs-sums,
   so nothing is compared in full twice;
3. **scaled**: every output row is the parameter's row times one factor (a
   Conv or Gemm with a BatchNorm folded into it by the exporter);
4. **order**: several weights equal to the same several parameters (e.g.
   all-zero initial weights) are paired in graph order.

A weight that matches nothing, or several parameters equally well, is left
unmapped and reported. Masks then end in the layout of the matched parameter
(transposed when the parameter is stored [in, out]); several ONNX weights
matched to one parameter (tied weights) become one mask, their logical OR.

Neither torch nor transformers is imported here: a state_dict is any mapping
from names to arrays or tensors.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
import json
import logging

import numpy as np
import onnx
from onnx import TensorProto

from . import graph
from .errors import MaskError
from .maskfile import MaskFile

log = logging.getLogger(__name__)

HOW = ("name", "exact", "close", "scaled", "order")

_HALF = {TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class MatchConfig:
    """Tolerances of the value match (float32; half-precision weights use ``half_*``)."""

    rtol: float = 1e-5
    atol: float = 1e-7
    half_rtol: float = 2e-3
    half_atol: float = 1e-5
    scaled: bool = True  # also accept per-output-row scaled copies (folded BatchNorm)
    scaled_rtol: float = 1e-4


@dataclass(frozen=True)
class Match:
    """One ONNX weight matched to a parameter.

    ``transposed``: the parameter holds the transpose of the weight's PyTorch
    layout (e.g. a Conv1D-style [in, out] parameter), so masks are transposed.
    """

    onnx_key: str
    torch_name: str
    how: str
    transposed: bool = False
    same_values: bool = True  # False: matched by name, but the parameter holds other values


@dataclass
class MappingReport:
    """What was matched, how, and what was not."""

    matches: dict[str, Match] = field(default_factory=dict)  # ONNX key -> Match
    unmapped: dict[str, str] = field(default_factory=dict)  # ONNX key -> reason
    aliases: dict[str, list[str]] = field(default_factory=dict)  # parameter -> tied names

    @property
    def tied(self) -> dict[str, list[str]]:
        """Parameters matched by several ONNX weights: name -> ONNX keys."""
        by_param: dict[str, list[str]] = defaultdict(list)
        for key, m in self.matches.items():
            by_param[m.torch_name].append(key)
        return {k: v for k, v in by_param.items() if len(v) > 1}

    def counts(self) -> dict[str, int]:
        out = {how: 0 for how in HOW}
        for m in self.matches.values():
            out[m.how] += 1
        return {k: v for k, v in out.items() if v}

    def summary(self) -> str:
        how = ", ".join(f"{n} by {k}" for k, n in self.counts().items()) or "none"
        text = f"mapped {len(self.matches)} of {len(self.matches) + len(self.unmapped)} weights ({how})"
        if self.tied:
            text += f"; {len(self.tied)} tied parameter(s)"
        if self.unmapped:
            text += f"; unmapped: {', '.join(self.unmapped)}"
        return text

    def to_json(self) -> dict:
        return {
            "mapped": {k: {"torch_name": m.torch_name, "how": m.how, "transposed": m.transposed}
                       for k, m in self.matches.items()},
            "unmapped": dict(self.unmapped),
            "tied": self.tied,
        }


# --------------------------------------------------------------------------- matching


def match_weights(
    weights: Mapping[str, np.ndarray],
    state_dict: Mapping[str, object],
    dtypes: Mapping[str, int] | None = None,
    config: MatchConfig = MatchConfig(),
) -> MappingReport:
    """Match ONNX weights (key -> array in PyTorch layout) to ``state_dict`` parameters.

    ``dtypes`` gives the ONNX element type of each weight (default float32);
    half-precision weights compare in half precision.
    """
    params, aliases = _parameters(state_dict)
    report = MappingReport(aliases=aliases)
    index = _Index(params)
    canonical = {a: name for name, names in aliases.items() for a in names}
    dtypes = dtypes or {}
    ambiguous: dict[str, tuple[tuple[str, bool], ...]] = {}
    scaled_todo: list[str] = []
    for key, w in weights.items():
        name = canonical.get(key, key)
        p = params.get(name)
        if p is not None and p.shape in (w.shape, w.shape[::-1]):
            transposed = p.shape != w.shape
            same = index.agrees(w, p.T if transposed else p, dtypes.get(key, TensorProto.FLOAT), config)
            report.matches[key] = Match(key, name, "name", transposed, same)
            continue
        hits, how = index.find(w, dtypes.get(key, TensorProto.FLOAT), config)
        if len(hits) == 1:
            report.matches[key] = Match(key, hits[0][0], how, hits[0][1])
        elif hits:
            ambiguous[key] = tuple(hits)
        else:
            scaled_todo.append(key)

    for key in scaled_todo:
        hits = index.find_scaled(weights[key], config) if config.scaled else []
        if len(hits) == 1:
            report.matches[key] = Match(key, hits[0][0], "scaled", hits[0][1])
        elif hits:
            ambiguous[key] = tuple(hits)
        else:
            report.unmapped[key] = "no parameter of this shape holds these values"

    _pair_in_order(ambiguous, params, report)
    return report


def _pair_in_order(ambiguous, params, report: MappingReport) -> None:
    """Weights equal to the same k parameters, k of them: pair in graph / state_dict order."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for key, hits in ambiguous.items():
        groups[hits].append(key)
    order = {name: i for i, name in enumerate(params)}
    for hits, keys in groups.items():
        if len(keys) == len(hits):
            ranked = sorted(hits, key=lambda h: order[h[0]])
            for key, (name, transposed) in zip(keys, ranked):
                report.matches[key] = Match(key, name, "order", transposed)
            continue
        for key in keys:
            names = ", ".join(h[0] for h in hits[:4])
            report.unmapped[key] = f"ambiguous: equals {len(hits)} parameters ({names})"


def _parameters(state_dict: Mapping[str, object]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Parameters with at least 2 dims as float arrays; tied names folded onto the first."""
    params: dict[str, np.ndarray] = {}
    aliases: dict[str, list[str]] = {}
    seen: dict[tuple, str] = {}
    for name, value in state_dict.items():
        ident = _storage(value)
        if ident is not None and ident in seen:
            aliases.setdefault(seen[ident], [seen[ident]]).append(name)
            continue
        array = _to_numpy(value)
        if array is None or array.ndim < 2 or array.dtype.kind != "f":
            continue
        if ident is not None:
            seen[ident] = name
        params[name] = array
    return params, aliases


def _storage(value) -> tuple | None:
    ptr = getattr(value, "data_ptr", None)
    if ptr is None or not callable(ptr):
        return None
    return (ptr(), tuple(value.shape), tuple(value.stride()), str(value.dtype))


def _to_numpy(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        t = value.detach()
        if not t.is_floating_point():
            return None
        if str(t.dtype) in ("torch.bfloat16",):
            t = t.float()
        return t.cpu().numpy()
    return None


class _Index:
    """Parameters sorted by (size, abs-sum), so candidates come from a bisect."""

    def __init__(self, params: Mapping[str, np.ndarray]) -> None:
        self.params = params
        self.by_size: dict[int, tuple[list[float], list[str]]] = {}
        rows = defaultdict(list)
        for name, p in params.items():
            rows[p.size].append((float(np.abs(p, dtype=np.float64).sum()), name))
        for size, items in rows.items():
            items.sort()
            self.by_size[size] = ([s for s, _ in items], [n for _, n in items])

    def agrees(self, w: np.ndarray, p: np.ndarray, dtype: int, config: MatchConfig) -> bool:
        """Whether ``w`` equals ``p`` (same layout) within tolerance, or is a row-scaled copy."""
        half = _HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half is not None else (config.rtol, config.atol)
        cand = p.astype(half) if half is not None else p
        if np.allclose(w, cand, rtol=rtol, atol=atol):
            return True
        return config.scaled and _row_scaled(w, p, config.scaled_rtol)

    def find(self, w: np.ndarray, dtype: int, config: MatchConfig) -> tuple[list[tuple[str, bool]], str]:
        """Parameters equal to ``w`` or its transpose: [(name, transposed)], and how."""
        sums, names = self.by_size.get(w.size, ((), ()))
        if not names:
            return [], ""
        half = _HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half or dtype == TensorProto.BFLOAT16 \
            else (config.rtol, config.atol)
        target = float(np.abs(w, dtype=np.float64).sum())
        slack = 10 * (rtol * target + atol * w.size) + 1e-9 * target + 1e-12  # summation order
        lo, hi = bisect_left(sums, target - slack), bisect_right(sums, target + slack)
        exact, close = [], []
        for name in names[lo:hi]:
            p = self.params[name]
            for transposed, cand in ((False, p), (True, p.T)) if p.ndim == 2 else ((False, p),):
                if cand.shape != w.shape:
                    continue
                if half is not None:
                    cand = cand.astype(half)
                if np.array_equal(cand, w):
                    exact.append((name, transposed))
                    break
                if np.allclose(w, cand, rtol=rtol, atol=atol):
                    close.append((name, transposed))
                    break
        if exact:
            return exact, "exact"
        return close, "close"

    def find_scaled(self, w: np.ndarray, config: MatchConfig) -> list[tuple[str, bool]]:
        """Parameters whose every output row, times one factor, equals ``w``'s row."""
        if w.ndim < 2 or not np.any(w):
            return []
        names = self.by_size.get(w.size, ((), ()))[1]
        return [(n, False) for n in names
                if self.params[n].shape == w.shape and _row_scaled(w, self.params[n], config.scaled_rtol)]


def _row_scaled(w: np.ndarray, p: np.ndarray, rtol: float) -> bool:
    """Every output row of ``w`` is one factor times that row of ``p`` (a folded BatchNorm)."""
    if w.shape != p.shape or w.ndim < 2 or not np.any(w):
        return False
    a = w.reshape(w.shape[0], -1).astype(np.float64)
    b = p.reshape(p.shape[0], -1).astype(np.float64)
    bb = np.einsum("ij,ij->i", b, b)
    if np.any(bb == 0) and np.any(a[bb == 0]):
        return False
    scale = np.einsum("ij,ij->i", a, b) / np.where(bb == 0, 1.0, bb)
    resid = np.linalg.norm(a - scale[:, None] * b, axis=1)
    return bool(np.all(resid <= rtol * np.linalg.norm(a, axis=1) + 1e-12))


# --------------------------------------------------------------------------- masks


def onnx_weights(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Every selectable weight of ``model`` in PyTorch layout, and its ONNX element type."""
    sites = graph.find_weights(model)
    values = {site.key: w for site, w in graph.iter_weight_values(model, sites)}
    return values, {s.key: s.dtype for s in sites}


def map_masks(
    masks: MaskFile,
    state_dict: Mapping[str, object],
    onnx_model: onnx.ModelProto | None = None,
    strict: bool = False,
    config: MatchConfig = MatchConfig(),
) -> tuple[MaskFile, MappingReport]:
    """Re-key ``masks`` by the PyTorch parameter names of ``state_dict``.

    ``onnx_model`` (the model the masks were selected on) supplies the weight
    values for matching by value; without it only names are matched. Masks
    end in the layout of their parameter; tied weights are OR-ed into one mask.
    Unmapped masks are left out of the result and listed in its metadata
    (``unmapped``) and in the report; with ``strict`` they raise
    :class:`MaskError`, as does a mask file that fits nothing in the model.
    """
    if onnx_model is None:
        report = _match_names({k: m.shape for k, m in masks.masks.items()}, state_dict)
    else:
        weights, dtypes = _weights_for(masks, onnx_model)
        report = match_weights(weights, state_dict, dtypes, config)

    if not report.matches:
        hint = "masks from another model?" if onnx_model is not None else \
            "masks from another model? without the ONNX model only names are matched"
        raise MaskError(f"none of the {len(masks.masks)} masks fits a parameter of the model ({hint})")
    differ = [m.onnx_key for m in report.matches.values() if not m.same_values]
    if onnx_model is not None and report.unmapped and len(differ) == len(report.matches):
        raise MaskError(
            f"{len(report.unmapped)} weight(s) match no parameter and the {len(differ)} matched by "
            "name hold other values: the PyTorch model does not have the ONNX model's weights "
            "(masks from another model, or another checkpoint?)"
        )
    if differ:
        log.warning("%d weight(s) matched by name hold other values than in the ONNX model: %s",
                    len(differ), ", ".join(differ[:5]))
    if strict and report.unmapped:
        raise MaskError(f"{len(report.unmapped)} weight(s) could not be mapped to a parameter: "
                        f"{', '.join(report.unmapped)}")
    for key, reason in report.unmapped.items():
        log.warning("not mapped: %s (%s)", key, reason)
    for name, keys in report.tied.items():
        log.info("tied: %s <- %s (masks OR-ed)", name, ", ".join(keys))
    return _rekey(masks, report), report


def _weights_for(masks: MaskFile, model: onnx.ModelProto):
    weights, dtypes = onnx_weights(model)
    for key, mask in masks.masks.items():
        if key not in weights:
            raise MaskError(f"mask {key!r} is not a weight of the ONNX model (masks from another model?)")
        if weights[key].shape != mask.shape:
            raise MaskError(f"mask {key!r} has shape {list(mask.shape)}, the ONNX weight "
                            f"{list(weights[key].shape)} (masks from another model?)")
    return {k: weights[k] for k in masks.masks}, dtypes


def _match_names(shapes: Mapping[str, tuple], state_dict) -> MappingReport:
    params, aliases = _parameters(state_dict)
    report = MappingReport(aliases=aliases)
    canonical = {a: name for name, names in aliases.items() for a in names}
    for key, shape in shapes.items():
        name = canonical.get(key, key)
        p = params.get(name)
        if p is None:
            report.unmapped[key] = "no parameter of this name (give the ONNX model to match by value)"
        elif p.shape not in (shape, shape[::-1]):
            raise MaskError(f"mask {key!r} has shape {list(shape)}, the parameter {list(p.shape)} "
                            "(masks from another model?)")
        else:
            report.matches[key] = Match(key, name, "name", p.shape != shape)
    return report


def _rekey(masks: MaskFile, report: MappingReport) -> MaskFile:
    out_masks: dict[str, np.ndarray] = {}
    tensors: dict[str, dict] = {}
    for key, m in report.matches.items():
        mask = masks.masks[key].T if m.transposed else masks.masks[key]
        entry = dict(masks.tensors.get(key, {}))
        entry.setdefault("onnx_initializer", key)
        if m.torch_name in out_masks:
            out_masks[m.torch_name] = out_masks[m.torch_name] | mask
            entry = tensors[m.torch_name]
            entry.setdefault("tied_onnx_initializers", [entry["onnx_initializer"]]).append(
                masks.tensors.get(key, {}).get("onnx_initializer", key))
        else:
            out_masks[m.torch_name] = np.array(mask, dtype=bool)
            entry.update(torch_name=m.torch_name, match=m.how, shape=list(mask.shape))
            if m.transposed:
                entry["torch_transposed"] = True
            aliases = report.aliases.get(m.torch_name)
            if aliases:
                entry["torch_aliases"] = aliases
        entry["selected"] = int(out_masks[m.torch_name].sum())
        tensors[m.torch_name] = entry
    meta = dict(masks.meta)
    meta["torch_mapping"] = json.dumps(report.counts(), sort_keys=True)
    meta["unmapped"] = json.dumps(sorted(report.unmapped))
    return MaskFile(out_masks, tensors, meta)


def unmapped_names(report: MappingReport, wanted: Iterable[str]) -> list[str]:
    """Which of ``wanted`` parameter names no ONNX weight was mapped to."""
    got = {m.torch_name for m in report.matches.values()}
    return [n for n in wanted if n not in got]


def map_to_model(
    masks: MaskFile,
    spec: str,
    onnx_path: str | None = None,
    *,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    strict: bool = False,
    config: MatchConfig = MatchConfig(),
) -> tuple[MaskFile, MappingReport]:
    """:func:`map_masks` onto the model users fine-tune for a SPEC.

    That is ``fps_onnx.models.build_model(spec, task=True)``, the model
    ``fps-onnx train`` builds, so the mapped keys are its parameter names.
    ``onnx_path`` is the ONNX file the masks were selected on (checked by its
    SHA-256); without it only names are matched, a backbone's names standing
    for the task model's (:func:`fps_onnx.models.resolve_keys`).
    """
    from .external import model_sha256 as sha256_file
    from .calibrate import load_model
    from .models import build_model, rekey_masks

    onnx_model = None
    if onnx_path is not None:
        onnx_model = load_model(onnx_path)
        want = masks.meta.get("model_sha256")
        if want and want != sha256_file(onnx_path):
            raise MaskError(f"the masks were selected on another ONNX model than {onnx_path}")
    model, _ = build_model(spec, checkpoint, num_classes, img_size, task=True)
    state = model.state_dict()
    if onnx_model is None:
        masks = rekey_masks(masks, state)
    return map_masks(masks, state, onnx_model, strict, config)
