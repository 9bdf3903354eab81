"""The delta file: the trained deltas of a model, apart from its weights.

A safetensors file holding ``<name>:indices`` (int64, flat row-major indices)
and ``<name>:values`` (the deltas) per sparse weight, and the full values of
each fully trained ("dense") tensor under its own name. Metadata: ``format`` =
"fps-delta", ``format_version``, ``shapes`` (JSON name -> shape) and ``dense``
(JSON list). :func:`save_delta` writes one from a model with sparse deltas
(:mod:`fps_onnx.torch.train.sparse`); :func:`apply_delta` checks one whole
against the format and a plain model before adding it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
import json
import os

from ..._io import read_safetensors, write_safetensors
from ..._limits import read_json, shown
from ...errors import MaskError
from ._torch import nn, torch
from .sparse import merged_state_dict, tied_names, unique_deltas

__all__ = ["DELTA_FORMAT", "DELTA_FORMAT_VERSION", "Trained", "add_trained", "apply_delta", "delta_metadata",
    "merged_entries", "read_delta", "save_delta", "trained", "write_delta"]

DELTA_FORMAT = "fps-delta"
DELTA_FORMAT_VERSION = "1"


@dataclass
class Trained:
    """What a run trained, apart from the model: enough to write the delta file and the merged
    weights after the model is gone (:func:`trained`).

    ``sparse``: plain weight name -> (int64 flat indices, values), tied weights once under
    their first name; ``shapes``: each sparse weight's shape; ``dense``: each fully trained
    tensor's value by its state name; ``tied``: each name of a tied tensor -> all its names.
    Tensors on the CPU.
    """

    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)


def trained(model: nn.Module, dense: Collection[str] = ()) -> Trained:
    """The deltas and the ``dense`` tensors of ``model`` (plain or sharded: a sharded trainable
    tensor is gathered, a collective every process calls; FSDP keeps them replicated)."""
    def whole(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        return tensor.detach().cpu().contiguous()  # no copy of a CPU tensor

    deltas = unique_deltas(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = {}
    for name in deltas:
        module_name, _, tensor_name = name.rpartition(".")
        shapes[name] = tuple(model.get_submodule(module_name).parametrizations[tensor_name].original.shape)
    values = {name: (whole(d.flat()), whole(d.values)) for name, d in deltas.items()}
    merged = merged_state_dict(model) if any(name not in params for name in dense) else {}
    state = {name: whole(params[name] if name in params else merged[name]) for name in dense}
    return Trained(values, shapes, state, tied_names(model))


def write_delta(trained_: Trained, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write the delta file of ``trained_`` atomically (see :func:`save_delta`)."""
    tensors = {}
    for name, (indices, values) in trained_.sparse.items():
        tensors[f"{name}:indices"] = indices.to(torch.int64).contiguous()
        tensors[f"{name}:values"] = values.contiguous()
    tensors.update((name, value.contiguous()) for name, value in trained_.dense.items())
    meta = {
        **dict(metadata or {}),
        "format": DELTA_FORMAT,
        "format_version": DELTA_FORMAT_VERSION,
        "shapes": json.dumps({n: list(s) for n, s in trained_.shapes.items()}, sort_keys=True),
        "dense": json.dumps(sorted(trained_.dense)),
    }
    write_safetensors(path, tensors, meta, framework="pt")


def save_delta(model: nn.Module, path: str | os.PathLike, *, dense: Collection[str] = (),
               metadata: Mapping[str, str] | None = None) -> None:
    """Write the deltas (and the fully trained tensors named in ``dense``) atomically.

    The file (safetensors) holds ``<name>:indices`` (int64, flat row-major
    indices) and ``<name>:values`` (the deltas) per sparse weight, and the full
    values of each ``dense`` tensor under its own name. Metadata: ``format`` =
    "fps-delta", ``format_version``, ``shapes`` (JSON name -> shape) and
    ``dense`` (JSON list). Applying it to the starting model reproduces the
    fine-tuned one (:func:`apply_delta`). ``metadata``: more string entries
    (e.g. ``base_sha256``, the base model's hash); the format's own keys win.
    """
    write_delta(trained(model, dense), path, metadata=metadata)


def apply_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the deltas of a delta file to ``model``'s plain weights in place; returns ``model``.

    The whole file is checked against the format and the model first
    (:func:`read_delta`), then each weight plus its delta must be finite in the
    weight's dtype; a file that fails any check raises :class:`MaskError` and
    leaves ``model`` unchanged.
    """
    return add_trained(model, read_delta(path, model), path)


def add_trained(model: nn.Module, trained_: Trained, source: object = "the trained deltas") -> nn.Module:
    """Add ``trained_``'s deltas to ``model``'s plain weights and put its dense tensors in place;
    returns ``model``. Every sum is computed first (:func:`merged_entries`), so a MaskError
    (naming ``source``) leaves ``model`` unchanged."""
    params = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict()
    merged = {name: merged_entries(name, params[name], indices, values, source)
              for name, (indices, values) in trained_.sparse.items()}
    with torch.no_grad():
        for name, (indices, values) in merged.items():
            params[name].put_(indices, values)
        for name, value in trained_.dense.items():
            state[name].copy_(value.to(state[name].dtype))
    return model


def read_delta(path: str | os.PathLike, model: nn.Module) -> Trained:
    """The delta file ``path``, checked whole against the format and ``model``'s parameter
    names, shapes and dtypes (its values are not read: a model on the meta device serves).

    Checked: format and version, ``shapes`` and ``dense`` metadata, int64 indices
    in range and without repeats, real float values of the same length and finite
    in the weight's float dtype, every named tensor present and nothing else, no
    two deltas on one tied weight; a dense tensor must be a real float tensor
    finite in its target's float dtype, or else of the target's own dtype.
    MaskError names the first failure. ``tied`` is the model's.
    """
    tensors, meta = _read_delta(path)
    shapes = _json_meta(meta, "shapes", path)
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
            for v in shapes.values()):
        raise MaskError(f"{path}: metadata 'shapes' must map names to lists of non-negative integers")
    dense = _json_meta(meta, "dense", path)
    if not isinstance(dense, list) or not all(isinstance(n, str) for n in dense) or len(set(dense)) < len(dense):
        raise MaskError(f"{path}: metadata 'dense' must be a list of distinct names")
    both = set(shapes) & set(dense)
    if both:
        raise MaskError(f"{path}: {sorted(both)[0]} is both a sparse delta and a dense tensor")
    expected = {f"{n}:{part}" for n in shapes for part in ("indices", "values")} | set(dense)
    missing = sorted(expected - set(tensors))
    if missing:
        raise MaskError(f"{path}: tensor {missing[0]!r} is missing")
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise MaskError(f"{path}: unexpected tensor {unknown[0]!r}")

    params = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict(keep_vars=True)
    targets = [id(params[n]) for n in shapes if n in params]
    if len(set(targets)) < len(targets):
        raise MaskError(f"{path}: two deltas name one tied weight of the model")
    found = Trained({}, {}, {}, tied_names(model))
    for name, shape in shapes.items():
        if name not in params or list(params[name].shape) != shape:
            have = f"is {list(params[name].shape)}" if name in params else "does not exist"
            raise MaskError(f"{path}: delta for {name} {shown(shape)} does not fit the model (its {name} {have})")
        indices, values = tensors[f"{name}:indices"], tensors[f"{name}:values"]
        _check_sparse(name, indices, values, params[name], path)
        found.sparse[name], found.shapes[name] = (indices, values), tuple(shape)
    for name in dense:
        if name not in state or state[name].shape != tensors[name].shape:
            raise MaskError(f"{path}: tensor {name} {list(tensors[name].shape)} does not fit the model")
        _check_dense(name, state[name], tensors[name], path)
        found.dense[name] = tensors[name]
    return found


def delta_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a delta file (MaskError unless it is one this module reads)."""
    return _read_delta(path, with_tensors=False)[1]


def _read_delta(path, *, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a delta file whose format and version are this module's."""
    return read_safetensors(path, DELTA_FORMAT, DELTA_FORMAT_VERSION, MaskError, "delta",
                            framework="pt", with_tensors=with_tensors)


def _json_meta(meta: Mapping[str, str], key: str, path) -> object:
    if key not in meta:
        raise MaskError(f"{path}: metadata {key!r} is missing")
    return read_json(meta[key], f"{path}: metadata {key!r}", MaskError)


def _check_sparse(name: str, indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, path) -> None:
    where = f"{path}: {name}"
    numel = weight.numel()
    if not weight.is_floating_point():
        raise MaskError(f"{where}:values: the model's {name} is {weight.dtype}, not a float weight")
    if indices.dtype != torch.int64 or indices.ndim != 1:
        raise MaskError(f"{where}:indices must be a 1-D int64 tensor, not {indices.dtype} {list(indices.shape)}")
    if not values.is_floating_point() or values.ndim != 1 or values.numel() != indices.numel():
        raise MaskError(f"{where}:values must be a 1-D float tensor of {indices.numel()} values, "
                        f"not {values.dtype} {list(values.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise MaskError(f"{where}:indices must lie in [0, {numel})")
    if indices.unique().numel() != indices.numel():
        raise MaskError(f"{where}:indices repeat an entry")
    if not bool(torch.isfinite(values).all()):
        raise MaskError(f"{where}:values holds NaN or Inf")
    if not bool(torch.isfinite(values.to(weight.dtype)).all()):
        raise MaskError(f"{where}:values do not fit the model's {weight.dtype} weight (they overflow it to Inf)")


def merged_entries(name: str, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                   source: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weight + values at them in the weight's dtype), the sums taken in
    the wider of the two dtypes; MaskError unless every sum is finite in the
    weight's dtype (checked values: :func:`_check_sparse`)."""
    with torch.no_grad():
        indices = indices.to(weight.device)
        values = values.to(weight.device)
        wide = torch.promote_types(weight.dtype, values.dtype)
        summed = (weight.detach().take(indices).to(wide) + values.to(wide)).to(weight.dtype)
    if not bool(torch.isfinite(summed).all()):
        raise MaskError(f"{source}: {name}:values: weight + delta overflows the model's {weight.dtype} weight to Inf")
    return indices, summed


def _check_dense(name: str, target: torch.Tensor, value: torch.Tensor, path) -> None:
    """MaskError unless the dense tensor ``value`` can replace the model's ``target``
    as it is: a real float tensor finite in the target's float dtype, else the target's own dtype."""
    where = f"{path}: tensor {name}"
    if not target.is_floating_point():
        if value.dtype != target.dtype:
            raise MaskError(f"{where} must be {target.dtype} like the model's {name}, not {value.dtype}")
        return
    if not value.is_floating_point():
        raise MaskError(f"{where} must be a real float tensor like the model's {target.dtype} {name}, "
                        f"not {value.dtype}")
    if not bool(torch.isfinite(value.to(target.dtype)).all()):
        raise MaskError(f"{where} holds NaN or Inf, or values beyond the model's {target.dtype}")
