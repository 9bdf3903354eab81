"""Mask keys as PyTorch parameter names: re-keying a mask file for a model.

Each mask's ONNX weight is matched to a parameter (:mod:`fps_onnx.torch.matching`)
and the mask re-keyed by its name. After mapping, each mask has its parameter's
shape: rows ``a:b`` of a packed weight's [out, in] mask for a row block,
transposed when the parameter is stored [in, out] (GPT-2's ``Conv1D``); several
ONNX weights matched to one parameter (tied weights) become one mask, their
logical OR.

Neither torch nor transformers is imported here: a state_dict is any mapping
from names to arrays or tensors.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
import json
import logging
import math

import numpy as np
import onnx

from ..errors import MaskError
from ..onnx import graph
from ..selection.maskfile import MaskFile
from .matching import (  # noqa: F401 - the matching API is also importable from here
    BUILDER_NAMES,
    HOW,
    MappingReport,
    Match,
    MatchConfig,
    builder_candidates,
    in_out_parameters,
    match_names,
    match_weights,
    module_paths,
)

__all__ = ["map_masks", "map_to_model", "onnx_weights", "unmapped_names"]

log = logging.getLogger(__name__)


def onnx_weights(model: onnx.ModelProto, base_dir: str = "") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Every selectable weight of ``model`` in PyTorch layout (block-quantized
    ones dequantized), and its ONNX element type."""
    sites = graph.find_weights(model)
    values = {site.key: w for site, w in graph.iter_weight_values(model, sites, base_dir)}
    return values, {s.key: s.dtype for s in sites}


def _without_cache_branch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A merged decoder (``If(use_cache_branch)``) with its no-past branch inlined, on a copy,
    as selection measured it; any other model as it is."""
    from ..onnx.decoder import USE_CACHE_BRANCH, inline_cache_branch

    if not any(i.name == USE_CACHE_BRANCH for i in model.graph.input):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return inline_cache_branch(copy)[0]


def map_masks(
    masks: MaskFile,
    state_dict: Mapping[str, object],
    onnx_model: onnx.ModelProto | None = None,
    strict: bool = False,
    config: MatchConfig = MatchConfig(),
    *,
    base_dir: str = "",
    in_out: Collection[str] = (),
) -> tuple[MaskFile, MappingReport]:
    """Re-key ``masks`` by the PyTorch parameter names of ``state_dict``.

    ``onnx_model`` (the model the masks were selected on; a merged decoder is
    read as selection reads it, its no-past branch inlined) supplies the weight
    values for matching by value, and its node names for matching by the
    exporter's names; ``base_dir`` is the folder its external data lies in.
    Without it only names are matched, and ``in_out`` names the parameters stored
    [in, out] (:func:`in_out_parameters` of the model), whose masks are transposed
    whatever their shape; with it the values tell. After mapping each mask has its
    parameter's shape: a packed weight's mask is cut into its row blocks, a
    mask is transposed for a parameter stored [in, out]; tied weights are OR-ed
    into one mask. Unmapped masks are left out of the result and listed in its
    metadata (``unmapped``) and in the report; with ``strict`` they raise
    :class:`MaskError`, as does a mask file that fits nothing in the model.
    """
    if onnx_model is None:
        report = match_names({k: masks.shape(k) for k in masks.keys()}, state_dict, in_out)
    else:
        onnx_model = _without_cache_branch(onnx_model)
        weights, dtypes, quantized = _weights_for(masks, onnx_model, base_dir)
        report = match_weights(weights, state_dict, dtypes, config,
                               sources=graph.weight_consumers(onnx_model.graph), quantized=quantized)

    pairs = report.pairs()
    if not pairs:
        hint = "masks from another model?" if onnx_model is not None else \
            "masks from another model? without the ONNX model only names are matched"
        raise MaskError(f"none of the {len(masks)} masks fits a parameter of the model ({hint})")
    differ = sorted({key for key, m in pairs if not m.same_values})
    if onnx_model is not None and report.unmapped and all(not m.same_values for _, m in pairs):
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


def _weights_for(masks: MaskFile, model: onnx.ModelProto, base_dir: str = ""):
    """(weights of the masks' keys, their ONNX types, the keys of block-quantized ones)."""
    sites = {s.key: s for s in graph.find_weights(model)}
    for key in masks.keys():
        if key not in sites:
            raise MaskError(f"mask {key!r} is not a weight of the ONNX model (masks from another model?)")
        if tuple(sites[key].shape) != masks.shape(key):
            raise MaskError(f"mask {key!r} has shape {list(masks.shape(key))}, the ONNX weight "
                            f"{list(sites[key].shape)} (masks from another model?)")
    wanted = {k: sites[k] for k in masks.keys()}
    weights = _Weights(graph.weight_reader(model, base_dir), wanted)
    quantized = {k for k, s in wanted.items() if s.quant is not None}
    return weights, {k: s.dtype for k, s in wanted.items()}, quantized


class _Weights(Mapping):
    """Weights in PyTorch layout, read (block-quantized ones dequantized) each time one is
    asked for, so that one weight at a time is in memory, as when scoring."""

    def __init__(self, read, sites: Mapping[str, graph.WeightSite]) -> None:
        self._read, self._sites = read, sites

    def __getitem__(self, key: str) -> np.ndarray:
        return self._read(self._sites[key])

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


def _cut(shape: tuple[int, ...], flat: np.ndarray, rows: tuple[int, int] | None,
         transposed: bool) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, sorted flat indices) of rows ``a:b`` of a mask given by its sorted flat
    indices, transposed (2-D) when asked: the index form of ``mask[a:b]`` and ``.T``."""
    if rows is not None:
        length = math.prod(shape[1:])
        lo, hi = np.searchsorted(flat, [rows[0] * length, rows[1] * length])
        flat = flat[lo:hi] - rows[0] * length
        shape = (rows[1] - rows[0], *shape[1:])
    if transposed:
        out, fan_in = shape
        flat = np.sort((flat % fan_in) * out + flat // fan_in)
        shape = (fan_in, out)
    return shape, flat


def _rekey(masks: MaskFile, report: MappingReport) -> MaskFile:
    out_masks: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
    tensors: dict[str, dict] = {}
    for key, m in report.pairs():
        shape, flat = _cut(masks.shape(key), masks.indices(key), m.rows, m.transposed)
        entry = dict(masks.tensors.get(key, {}))
        entry.setdefault("onnx_initializer", key)
        if m.torch_name in out_masks:
            out_masks[m.torch_name] = (shape, np.union1d(out_masks[m.torch_name][1], flat))
            entry = tensors[m.torch_name]
            entry.setdefault("tied_onnx_initializers", [entry["onnx_initializer"]]).append(
                masks.tensors.get(key, {}).get("onnx_initializer", key))
        else:
            out_masks[m.torch_name] = (shape, flat)
            entry.update(torch_name=m.torch_name, match=m.how, shape=list(shape))
            if m.rows is not None:
                entry["torch_rows"] = list(m.rows)
            if m.transposed:
                entry["torch_transposed"] = True
            aliases = report.aliases.get(m.torch_name)
            if aliases:
                entry["torch_aliases"] = aliases
        entry["selected"] = int(out_masks[m.torch_name][1].size)
        tensors[m.torch_name] = entry
    meta = dict(masks.meta)
    meta["torch_mapping"] = json.dumps(report.counts(), sort_keys=True)
    meta["unmapped"] = json.dumps(sorted(report.unmapped))
    return MaskFile.from_indices(out_masks, tensors, meta)


def _shapes(model) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """(name -> shape of each parameter and buffer of a model on the meta device,
    parameter -> its tied names, the first name first); tied names are one tensor."""
    first: dict[int, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in first:
            aliases.setdefault(first[id(value)], [first[id(value)]]).append(name)
        else:
            first[id(value)] = name
            shapes[name] = tuple(value.shape)
    return shapes, aliases


def _kept_names(masks: MaskFile, onnx_model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                aliases: dict[str, list[str]]) -> MappingReport | None:
    """Every mask matched by name to the parameter its ONNX weight is, when the export
    kept the names (as ``fps-onnx export`` does): the weight is an initializer of a
    parameter's name (or a backbone's name for it, :func:`fps_onnx.torch.models.resolve_keys`) and dims, used as a plain (not block-quantized) weight of the mask's
    shape; the mask is transposed for an initializer used [in, out]. None when a mask
    is not such a weight (then it is matched by value)."""
    from .models import resolve_keys

    try:
        names = resolve_keys(masks.masks, shapes)
    except MaskError:
        return None
    dims = {t.name: tuple(t.dims) for t in onnx_model.graph.initializer}
    sites = {s.key: s for s in graph.find_weights(onnx_model)}
    report = MappingReport(aliases=aliases)
    for key, mask in masks.masks.items():
        site, name = sites.get(key), names.get(key)
        if (site is None or site.quant is not None or name is None or dims.get(key) != shapes[name]
                or tuple(site.shape) != tuple(mask.shape)):
            return None
        report.matches[key] = Match(key, name, "name", site.layout == "in_out")
    return report if report.matches else None


def _header_names(masks: MaskFile, onnx_model: onnx.ModelProto, folder: str) -> MappingReport | None:
    """What :func:`_kept_names` gives on the model built on the meta device, found from the
    safetensors headers of the folder's weights (:func:`fps_onnx.torch.hf.weight_shapes`),
    without torch, where they settle it; else None (then the model is built).

    They settle it for a folder saved from a causal LM class (its ``architectures``: one
    ``...ForCausalLM``/``...LMHeadModel``, the class ``AutoModelForCausalLM`` builds, whose
    parameters are the weights it saved) when every mask's key is a tensor of the headers and
    the export kept that name and shape (:func:`_kept_names` on the header shapes) and no mask
    is transposed: a weight the ONNX model uses [in, out] may be a parameter stored [in, out]
    (GPT-2's ``Conv1D``, which only the model tells from a transposed [out, in] one), and a
    mask of the vocabulary's size may be a tied lm_head (the model's aliases), unless the
    config unties them."""
    from types import SimpleNamespace

    from .hf import check_folder, weight_shapes
    from .models import CAUSAL_LM_HEADS, is_causal_lm

    config = check_folder(folder, known_type=False)
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str)
            and architectures[0].endswith(CAUSAL_LM_HEADS) and is_causal_lm(SimpleNamespace(**config))):
        return None
    shapes = weight_shapes(folder)
    if shapes is None or not all(key in shapes for key in masks.keys()):
        return None
    vocab = config.get("vocab_size")
    if config.get("tie_word_embeddings", True) is not False and any(
            vocab in masks.shape(key) for key in masks.keys()):
        return None
    report = _kept_names(masks, onnx_model, shapes, {})
    if report is None or any(m.transposed for m in report.matches.values()):
        return None
    return report


def unmapped_names(report: MappingReport, wanted: Iterable[str]) -> list[str]:
    """Which of ``wanted`` parameter names no ONNX weight was mapped to."""
    got = {m.torch_name for _, m in report.pairs()}
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

    That is ``fps_onnx.torch.models.build_model(spec, task=True)``, the model
    ``fps-onnx train`` builds, so the mapped keys are its parameter names.
    ``onnx_path`` is the ONNX file the masks were selected on (checked by its
    SHA-256); without it only names are matched, a backbone's names standing
    for the task model's (:func:`fps_onnx.torch.models.resolve_keys`). When
    every mask's ONNX weight is the parameter of its name (an export that kept
    the names, as ``fps-onnx export`` does) and no ``checkpoint`` is given, a
    ``timm:`` or ``hf:`` model is built on the meta device (names and shapes,
    no weights) and the masks matched by name; otherwise by value. For a causal
    LM's ``hf:`` folder whose weights' safetensors headers settle the names
    (:func:`_header_names`), nothing is built and torch is not imported.
    """
    from ..onnx.external import model_sha256
    from ..onnx.load import load_checked
    from .models import build_model, rekey_masks

    onnx_model, folder = None, ""
    if onnx_path is not None:
        onnx_model, folder, refs = load_checked(onnx_path)
        want = masks.meta.get("model_sha256")
        if want and want != model_sha256(onnx_path, refs):
            raise MaskError(f"the masks were selected on another ONNX model than {onnx_path}")
    if onnx_model is not None and checkpoint is None and spec.startswith(("timm:", "hf:")):
        # An export that kept the parameter names needs the names and shapes only: from the
        # folder's weight headers where they settle it, else from the model on the meta device.
        plain, report = _without_cache_branch(onnx_model), None
        if spec.startswith("hf:") and num_classes is None and img_size is None:
            report = _header_names(masks, plain, spec[3:])
        if report is None:
            shapes, aliases = _shapes(build_model(spec, None, num_classes, img_size, task=True, meta=True)[0])
            report = _kept_names(masks, plain, shapes, aliases)
        if report is not None:
            for name, keys in report.tied.items():
                log.info("tied: %s <- %s (masks OR-ed)", name, ", ".join(keys))
            return _rekey(masks, report), report
    model, _ = build_model(spec, checkpoint, num_classes, img_size, task=True)
    state = model.state_dict()
    if onnx_model is None:
        masks = rekey_masks(masks, state)
    return map_masks(masks, state, onnx_model, strict, config, base_dir=folder, in_out=in_out_parameters(model))
