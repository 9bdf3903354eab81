"""Sparse deltas on frozen weights: k trainable values at fixed flat indices.

The contract, for every weight a mask selects entries of:

* the weight itself stays a frozen ``nn.Parameter`` (``requires_grad=False``);
* a :class:`SparseDelta` parametrisation holds ``indices`` ([k], sorted
  flat indices in the PyTorch layout, row-major; int32 when the weight has fewer
  than 2**31 entries, else int64), ``base`` (the weight's
  original values there, [k]) and ``values`` (the trainable delta, an
  ``nn.Parameter`` [k], zero at the start);
* the weight the module computes with is ``W0 + scatter(values)``. It is kept
  merged *in the weight's own storage*: before a forward pass uses the weight,
  ``base + values`` is written into the k entries (without touching the
  weight's version counter), and a custom autograd function hands the module a view
  of that storage whose gradient is gathered at ``indices`` for ``values``.
  So there is no dense copy of the weight, the dense gradient is a temporary of
  one layer's backward, and the optimizer only ever sees k-sized tensors.
  Entries outside the mask are never written.

:func:`merge` removes the parametrisation and leaves a plain module whose
weight is ``W0 + delta`` (zero inference overhead, ordinary ``state_dict``);
:func:`fps_onnx.torch.train.delta.save_delta` / ``apply_delta`` write and apply
the deltas alone, and :func:`fps_onnx.torch.train.masks.attach_masks` attaches
a mask file keyed by ONNX names.
This works for any module parameter (nn.Linear, nn.Conv2d incl. grouped and
depthwise, nn.MultiheadAttention's ``in_proj_weight``, ...), because modules
read it through ``module.weight`` as usual.

Tied parameters (a language model's ``lm_head.weight`` that is its input
embedding) are one tensor: a mask on any of its names selects entries of that
one tensor, under its first name in ``named_parameters()``
(``model.embed_tokens.weight``), and every module that shares it gets the same
delta, so the gradient of both uses reaches it and the tie survives
:func:`merge`. Selecting entries of a tied ``lm_head`` changes the embedding too
(logged as a warning).

An ``nn.Linear`` (or transformers' ``Conv1D``) whose weight gets a delta
computes, on CPU, without the dense weight gradient: its forward pass is one
:class:`~fps_onnx.torch.train.kernels.SparseLinear` call whose backward returns the input's gradient and,
for the deltas, only the k sums ``grad_values[i] = sum_n g[n, r_i] * x[n, c_i]``
over the tokens (O(tokens x k) instead of a second dense matmul). Other
modules, other devices, and any other read of such a weight (a tied use) go
through the parametrisation; the gradients of every use add up in ``values``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from importlib import import_module
import logging
import sys
import warnings

import numpy as np

from ...errors import MaskError
from ...selection.maskfile import MaskFile
from ._torch import nn, torch
from .kernels import GatherGrad, SparseLinear

__all__ = ["SparseDelta", "attach", "buffer_names", "deltas", "merge", "merged_state_dict", "plain_name", "scale_steps",
    "sync", "tied_names", "unique_deltas"]

log = logging.getLogger(__name__)

_MARK = ".parametrizations."
# where Linear/Conv1D skip the dense weight gradient: measured on CPU only (SmolLM2-135M, 4 x 64
# tokens: 0.96-1.00x LoRA r=8's step, dense weight gradient 1.14x); on a GPU a bf16 dense matmul
# may well beat per-entry sums, so other devices keep the parametrisation until measured there
_SPARSE_GRAD_DEVICES = ("cpu",)


class SparseDelta(nn.Module):
    """Parametrisation ``W -> W0 + scatter(values)`` that trains only ``values``."""

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        # a weight on the meta device (a model built without its values, to be sharded and loaded
        # later: fsdp) gets real indices and values on the CPU, and a zero base to be filled in
        meta = weight.device.type == "meta"
        device = torch.device("cpu") if meta else weight.device
        small = weight.numel() <= torch.iinfo(torch.int32).max  # int32: half the memory of int64, kept all run
        indices = indices.to(device=device, dtype=torch.int32 if small else torch.int64)
        self.register_buffer("indices", indices)
        self.register_buffer("base", torch.zeros(indices.numel(), dtype=weight.dtype) if meta
                             else weight.detach().take(self.flat()).clone())
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=device))
        # each entry's factor on its optimizer steps (:func:`scale_steps`); None: steps as the optimizer makes them
        self.step_scale: torch.Tensor | None = None

    def flat(self) -> torch.Tensor:
        """The indices as int64, what ``take`` and ``put_`` index with (a k-sized copy where
        they are stored as int32, made for the one use)."""
        return self.indices if self.indices.dtype == torch.int64 else self.indices.long()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.write(weight)
        return GatherGrad.apply(weight, self.values, self.indices)

    def write(self, weight: torch.Tensor) -> None:
        """Put ``base + values`` into the weight's storage (two k-sized kernels).

        Done on every use, without first asking whether ``values`` changed:
        that check needs the values on the host (a device synchronisation per
        weight on GPU), and the version counter cannot answer it (fused
        optimizers update in place without bumping it). The write goes through
        ``weight.data``, whose version counter is not the weight's, so the
        graphs of forward passes not yet back-propagated (gradient
        accumulation, activation checkpointing's recomputation) stay valid:
        they see the same values, which change only at the optimizer step.
        """
        with torch.no_grad():
            merged = (self.base.to(self.values.dtype) + self.values).to(weight.dtype)
            weight.data.put_(self.flat(), merged)

    def extra_repr(self) -> str:
        return f"k={self.indices.numel()}"


class _SparseForward:
    """Forward of a Linear/Conv1D whose weight has a sparse delta: :class:`~fps_onnx.torch.train.kernels.SparseLinear`.

    Mixed in below the module's class (and below the class parametrisation
    injects), so ``isinstance`` and the class name stay those of the module.
    Without a sparse delta on its weight, or with the weight on a device not in
    ``_SPARSE_GRAD_DEVICES``, the module's own forward runs (the parametrisation).
    """

    _dense_class: type
    _transposed: bool

    def forward(self, input):
        plist = self.parametrizations["weight"] if "weight" in getattr(self, "parametrizations", {}) else ()
        if (len(plist) != 1 or not isinstance(plist[0], SparseDelta)
                or plist.original.device.type not in _SPARSE_GRAD_DEVICES):
            return self._dense_class.forward(self, input)
        delta, weight = plist[0], plist.original
        delta.write(weight)
        return SparseLinear.apply(input, weight, delta.values, delta.indices, self.bias, self._transposed)


_SPARSE_CLASSES: dict[type, type] = {}


def _sparse_layout(module: nn.Module) -> bool | None:
    """False for an nn.Linear, True for transformers' Conv1D (weight [in, out]), each
    with its class's own forward; None for any other module."""
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return False
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None and isinstance(module, conv1d) and cls.forward is conv1d.forward:
        return True
    return None


def _use_sparse_forward(module: nn.Module) -> None:
    """Give a plain Linear/Conv1D the sparse-gradient forward (before its parametrisation)."""
    from torch.nn.utils import parametrize

    layout = _sparse_layout(module)
    if layout is None or parametrize.is_parametrized(module) or isinstance(module, _SparseForward):
        return
    cls = type(module)
    if cls not in _SPARSE_CLASSES:
        _SPARSE_CLASSES[cls] = type(cls.__name__, (_SparseForward, cls), {
            "_dense_class": cls, "_transposed": layout, "__qualname__": cls.__qualname__})
    module.__class__ = _SPARSE_CLASSES[cls]


def _restore_classes(model: nn.Module) -> None:
    from torch.nn.utils import parametrize

    for module in model.modules():
        if isinstance(module, _SparseForward) and not parametrize.is_parametrized(module):
            module.__class__ = module._dense_class


def attach(model: nn.Module, masks: Mapping[str, object] | MaskFile, *, skip: Collection[str] = (),
           sparse_linear: bool = True) -> dict[str, SparseDelta]:
    """Make the entries ``masks`` select trainable deltas; keys are parameter names.

    ``masks``: a MaskFile (each delta's indices come from it, no dense mask is
    built), or name -> bool array (NumPy or torch) of the parameter's shape.
    Names in ``skip`` are left alone (e.g. a head that is trained fully). A mask
    that selects nothing leaves its weight frozen. Returns name -> SparseDelta.
    ``sparse_linear``: nn.Linear / Conv1D modules compute only the selected
    entries' gradient (:class:`~fps_onnx.torch.train.kernels.SparseLinear`; on CPU); False keeps every module
    on the parametrisation (dense weight gradient, then gathered). The gradients
    agree to float rounding either way.
    """
    from torch.nn.utils import parametrize

    params = dict(model.named_parameters(remove_duplicate=False))
    names = tied_names(model)
    held = masks if isinstance(masks, MaskFile) else None
    combined: dict[str, np.ndarray] = {}  # name -> sorted flat indices
    for key in (held.keys() if held is not None else masks):
        if key in skip:
            continue
        if key not in params:
            raise MaskError(f"mask {key!r} names no parameter of the model")
        weight = params[key]
        if held is None:
            mask = masks[key]
            mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        shape = held.shape(key) if held is not None else mask.shape
        if tuple(shape) != tuple(weight.shape):
            raise MaskError(f"mask {key!r} has shape {list(shape)}, "
                            f"but the model's weight is {list(weight.shape)}")
        if not weight.is_floating_point():
            raise MaskError(f"mask {key!r}: the model's {key} is {weight.dtype}, not a float weight")
        flat = held.indices(key) if held is not None else np.flatnonzero(mask.reshape(-1).astype(bool))
        name = names.get(key, [key])[0]
        combined[name] = np.union1d(combined[name], flat) if name in combined else flat
    attached: dict[str, SparseDelta] = {}
    for name, flat in combined.items():
        if name in skip:
            continue
        weight = params[name]
        if flat.size == 0:
            continue
        weight.requires_grad_(False)
        delta = SparseDelta(weight, torch.from_numpy(flat))
        for alias in names.get(name, [name]):  # every module sharing the tensor uses the delta
            module_name, _, tensor_name = alias.rpartition(".")
            module = model.get_submodule(module_name)
            if parametrize.is_parametrized(module, tensor_name):
                raise MaskError(f"{alias} already has a parametrisation; cannot add a sparse delta")
            if sparse_linear and tensor_name == "weight":
                _use_sparse_forward(module)
            parametrize.register_parametrization(module, tensor_name, delta)
        attached[name] = delta
    if not attached:
        raise MaskError("the mask selects no entries of the model's weights")
    for name in attached:
        if name in names:
            log.warning("%s are one tied tensor: the entries selected in it change all of them "
                        "(trained as %s)", " and ".join(names[name]), name)
    log.info("sparse deltas on %d weights, %s trainable entries", len(attached),
             f"{sum(d.indices.numel() for d in attached.values()):,}")
    return attached


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each name of a parameter that several modules share -> all its names
    (``named_parameters`` order: the first is the name it is known by)."""
    by_tensor: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor[id(param)].append(name)
    return {name: group for group in by_tensor.values() if len(group) > 1 for name in group}


def deltas(model: nn.Module) -> dict[str, SparseDelta]:
    """Plain parameter name -> SparseDelta, for every sparse weight of ``model``
    (a tied weight under each of its names, one SparseDelta)."""
    found = {}
    for module_name, module in model.named_modules():
        for tensor_name, plist in getattr(module, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, SparseDelta):
                    found[f"{module_name}.{tensor_name}" if module_name else tensor_name] = p
    return found


def scale_steps(model: nn.Module, scales: Mapping[str, np.ndarray]) -> int:
    """Give the deltas that ``scales`` names (parameter name -> a factor per input channel,
    :func:`fps_onnx.selection.stepscale.column_scales`) their entries' factors, which the
    optimizer of :func:`.loop.make_optimizer` multiplies into each step. The input channels are
    a weight's columns, or its rows for one stored [in, out] (transformers' Conv1D,
    :func:`fps_onnx.torch.mapping.in_out_parameters`). Returns how many deltas got them (names
    without one are left out: a head trained fully); MaskError where the factors do not fit
    their weight."""
    from ..mapping import in_out_parameters

    in_out = in_out_parameters(model)
    found, count = deltas(model), 0
    for name, factors in scales.items():
        delta = found.get(name)
        if delta is None:
            continue
        module_name, _, tensor_name = name.rpartition(".")
        shape = model.get_submodule(module_name).parametrizations[tensor_name].original.shape
        axis = 0 if name in in_out else 1
        if len(shape) != 2 or shape[axis] != len(factors):
            raise MaskError(f"--step-scale: {len(factors)} input-channel factors do not fit {name}, "
                            f"shaped {list(shape)}")
        flat = delta.flat().cpu()
        channel = flat % shape[1] if axis == 1 else flat // shape[1]
        delta.step_scale = torch.from_numpy(np.ascontiguousarray(factors, dtype=np.float32))[channel]
        count += 1
    return count


def sync(model: nn.Module) -> None:
    """Write the current deltas into the weights (done lazily by each forward pass)."""
    for name, delta in deltas(model).items():
        module_name, _, tensor_name = name.rpartition(".")
        original = model.get_submodule(module_name).parametrizations[tensor_name].original
        delta.write(original)


def plain_name(name: str) -> str | None:
    """``a.parametrizations.weight.original`` -> ``a.weight``; None for a delta's own tensors."""
    if _MARK not in name:
        return name
    head, _, rest = name.partition(_MARK)
    tensor, _, tail = rest.partition(".")
    if tail != "original":
        return None
    return f"{head}.{tensor}"


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's ordinary state_dict (PyTorch names, deltas merged), without changing it."""
    sync(model)
    out = {}
    for name, tensor in model.state_dict().items():
        plain = plain_name(name)
        if plain is not None:
            out[plain] = tensor
    return out


def merge(model: nn.Module) -> nn.Module:
    """Remove every sparse delta, leaving plain weights ``W0 + delta``; returns ``model``."""
    from torch.nn.utils import parametrize

    sync(model)
    for name in deltas(model):
        module_name, _, tensor_name = name.rpartition(".")
        # the original's storage already holds W0 + delta: restore it as the parameter
        parametrize.remove_parametrizations(model.get_submodule(module_name), tensor_name,
                                            leave_parametrized=False)
    _restore_classes(model)
    return model


def buffer_names(model: nn.Module) -> list[str]:
    """State names of the deltas' constant buffers (indices, base): nothing to synchronise."""
    return [n for n, _ in model.named_buffers() if _MARK in n and n.endswith((".indices", ".base"))]


def unique_deltas(model: nn.Module) -> dict[str, SparseDelta]:
    """:func:`deltas` with each tied weight once, under its first name."""
    found: dict[str, SparseDelta] = {}
    seen: set[int] = set()
    for name, delta in deltas(model).items():
        if id(delta) not in seen:
            seen.add(id(delta))
            found[name] = delta
    return found


#: Names that lived here before: name -> (module of fps_onnx.torch.train, its name there).
_MOVED = {
    "DELTA_FORMAT": ("delta", "DELTA_FORMAT"),
    "DELTA_FORMAT_VERSION": ("delta", "DELTA_FORMAT_VERSION"),
    "save_delta": ("delta", "save_delta"),
    "apply_delta": ("delta", "apply_delta"),
    "delta_metadata": ("delta", "delta_metadata"),
    "load_masks": ("masks", "attach_masks"),  # it attaches: renamed, importable for one release
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, new = _MOVED[name]
    warnings.warn(f"{__name__}.{name} is deprecated: use fps_onnx.torch.train.{module}.{new}",
                  DeprecationWarning, stacklevel=2)
    return getattr(import_module(f".{module}", __package__), new)
