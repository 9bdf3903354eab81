"""Sparse deltas on frozen weights: k trainable values at fixed flat indices.

The contract, for every weight a mask selects entries of:

* the weight itself stays a frozen ``nn.Parameter`` (``requires_grad=False``);
* a :class:`SparseDelta` parametrisation holds ``indices`` (int64 [k], sorted
  flat indices in the PyTorch layout, row-major), ``base`` (the weight's
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
:func:`save_delta` / :func:`apply_delta` write and apply the deltas alone.
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
:class:`_SparseLinear` call whose backward returns the input's gradient and,
for the deltas, only the k sums ``grad_values[i] = sum_n g[n, r_i] * x[n, c_i]``
over the tokens (O(tokens x k) instead of a second dense matmul). Other
modules, other devices, and any other read of such a weight (a tied use) go
through the parametrisation; the gradients of every use add up in ``values``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping
import json
import logging
import os
import sys

import numpy as np

from ..._io import atomic_write, read_safetensors
from ..._limits import read_json, shown
from ...errors import MaskError
from ...selection.maskfile import MaskFile
from ._torch import nn, torch

log = logging.getLogger(__name__)

DELTA_FORMAT = "fps-delta"
DELTA_FORMAT_VERSION = "1"
_MARK = ".parametrizations."


class _GatherGrad(torch.autograd.Function):
    """Identity on the (already merged) weight; the backward keeps only its k entries."""

    @staticmethod
    def forward(ctx, weight, values, indices):
        ctx.save_for_backward(indices)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return None, grad.take(indices), None


class SparseDelta(nn.Module):
    """Parametrisation ``W -> W0 + scatter(values)`` that trains only ``values``."""

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        indices = indices.to(device=weight.device, dtype=torch.int64)
        self.register_buffer("indices", indices)
        self.register_buffer("base", weight.detach().take(indices).clone())
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.write(weight)
        return _GatherGrad.apply(weight, self.values, self.indices)

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
            weight.data.put_(self.indices, merged)

    def extra_repr(self) -> str:
        return f"k={self.indices.numel()}"


# elements of one gathered [chunk, tokens] block of the deltas' gradient: small
# enough to stay in cache, large enough to amortise the per-kernel overhead
_CHUNK_ELEMENTS = 1 << 19


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes a matmul of ``x`` in, or None when it is off for ``x``."""
    kind = x.device.type
    if x.dtype == torch.float64 or not x.is_floating_point() or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class _SparseLinear(torch.autograd.Function):
    """``y = x W^T + b`` (``transposed``: ``x W + b``) on the merged weight ``W``.

    The backward gives the input's gradient (dense), the bias's, and for
    ``values`` only the selected entries of the weight's gradient, summed over
    the flattened tokens in float32 (:func:`_entry_grad`). ``W`` gets no
    gradient. Under autocast the matmuls run in autocast's dtype, as
    ``F.linear`` would.
    """

    @staticmethod
    def forward(ctx, x, weight, values, indices, bias, transposed):
        original = weight  # saved as it is: no copy of the weight is kept
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if transposed:  # transformers' Conv1D: weight [in, out]
                flat = x.reshape(-1, x.shape[-1])
                out = torch.addmm(bias, flat, weight) if bias is not None else flat.mm(weight)
                out = out.view(*x.shape[:-1], weight.shape[1])
            else:
                out = nn.functional.linear(x, weight, bias)
        # x in the matmul's dtype (under autocast the copy F.linear would keep too)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, original, indices)
        ctx.transposed = transposed
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, indices = ctx.saved_tensors
        transposed = ctx.transposed
        grad_x = grad_values = grad_bias = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                weight = weight.to(grad.dtype)
                grad_x = grad.matmul(weight.t() if transposed else weight)
            g = grad.reshape(-1, grad.shape[-1])
            if x is not None:
                grad_values = _entry_grad(g, x.reshape(-1, x.shape[-1]), indices, weight.shape[1], transposed)
            if ctx.needs_input_grad[4]:
                grad_bias = g.sum(0, dtype=torch.float32)
        return grad_x, None, grad_values, None, grad_bias, None


def _entry_grad(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, columns: int,
                transposed: bool) -> torch.Tensor:
    """float32 ``g^T x`` (``transposed``: ``x^T g``) at the flat ``indices`` of a
    [*, ``columns``] weight; ``g`` [N, out], ``x`` [N, in]."""
    g, x = g.to(torch.float32), x.to(torch.float32)
    left, right = (x, g) if transposed else (g, x)  # the weight's gradient is left^T right
    rows, cols = indices // columns, indices % columns
    if left.device.type in _SAMPLED_DEVICES and bool((indices[1:] > indices[:-1]).all()):
        return _sampled(left, right, rows, cols, columns)
    return _gathered(left, right, rows, cols)


# where torch.sparse.sampled_addmm computes the entries (measured faster than gathering on CPU)
_SAMPLED_DEVICES = ("cpu",)
# where Linear/Conv1D skip the dense weight gradient: measured on CPU only (SmolLM2-135M, 4 x 64
# tokens: 0.96-1.00x LoRA r=8's step, dense weight gradient 1.14x); on a GPU a bf16 dense matmul
# may well beat per-entry sums, so other devices keep the parametrisation until measured there
_SPARSE_GRAD_DEVICES = ("cpu",)


def _sampled(left, right, rows, cols, columns: int) -> torch.Tensor:
    """``(left^T right)`` at (rows, cols), sorted row-major, through a CSR pattern: no [k, N] blocks."""
    import warnings

    crow = torch.zeros(left.shape[1] + 1, dtype=torch.int64, device=left.device)
    torch.cumsum(torch.bincount(rows, minlength=left.shape[1]), 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CSR layout's "beta" notice
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), device=left.device),
                                          (left.shape[1], columns), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, left.t(), right, beta=0.0).values()


def _gathered(left, right, rows, cols) -> torch.Tensor:
    """``(left^T right)`` at (rows, cols): gathered rows of the transposes, multiplied and
    summed over the tokens, in chunks of about ``_CHUNK_ELEMENTS``."""
    lt = left.t().contiguous()  # [rows, N]: each entry's row is contiguous
    rt = right.t().contiguous()
    out = torch.empty(rows.numel(), dtype=torch.float32, device=left.device)
    step = max(64, _CHUNK_ELEMENTS // max(left.shape[0], 1))
    for start in range(0, rows.numel(), step):
        end = start + step
        block = lt.index_select(0, rows[start:end])
        block.mul_(rt.index_select(0, cols[start:end]))
        torch.sum(block, 1, out=out[start:end])
    return out


class _SparseForward:
    """Forward of a Linear/Conv1D whose weight has a sparse delta: :class:`_SparseLinear`.

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
        return _SparseLinear.apply(input, weight, delta.values, delta.indices, self.bias, self._transposed)


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


def attach(model: nn.Module, masks: Mapping[str, object], *, skip: Collection[str] = (),
           sparse_linear: bool = True) -> dict[str, SparseDelta]:
    """Make the entries ``masks`` select trainable deltas; keys are parameter names.

    ``masks``: name -> bool array (NumPy or torch) of the parameter's shape.
    Names in ``skip`` are left alone (e.g. a head that is trained fully). A mask
    that selects nothing leaves its weight frozen. Returns name -> SparseDelta.
    ``sparse_linear``: nn.Linear / Conv1D modules compute only the selected
    entries' gradient (:class:`_SparseLinear`; on CPU); False keeps every module
    on the parametrisation (dense weight gradient, then gathered). The gradients
    agree to float rounding either way.
    """
    from torch.nn.utils import parametrize

    params = dict(model.named_parameters(remove_duplicate=False))
    names = tied_names(model)
    combined: dict[str, np.ndarray] = {}
    for key, mask in masks.items():
        if key in skip:
            continue
        if key not in params:
            raise MaskError(f"mask {key!r} names no parameter of the model")
        weight = params[key]
        mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        if tuple(mask.shape) != tuple(weight.shape):
            raise MaskError(f"mask {key!r} has shape {list(mask.shape)}, "
                            f"but the model's weight is {list(weight.shape)}")
        if not weight.is_floating_point():
            raise MaskError(f"mask {key!r}: the model's {key} is {weight.dtype}, not a float weight")
        name = names.get(key, [key])[0]
        combined[name] = combined[name] | mask.astype(bool) if name in combined else mask.astype(bool)
    attached: dict[str, SparseDelta] = {}
    for name, mask in combined.items():
        if name in skip:
            continue
        weight = params[name]
        flat = np.flatnonzero(mask.reshape(-1))
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


def load_masks(
    model: nn.Module,
    masks: MaskFile | str | os.PathLike,
    *,
    skip: Collection[str] = (),
    onnx_model=None,
    sparse_linear: bool = True,
) -> dict[str, SparseDelta]:
    """Attach a mask file (or loaded MaskFile) to ``model``.

    Keys that are parameter names are used as they are. Other keys (ONNX
    initializer names) are matched to the model's parameters through
    :func:`fps_onnx.mapping.map_masks`: by value when ``onnx_model`` (the ONNX
    model the masks were selected on: path or ModelProto) is given, by name
    otherwise. Masks named in ``skip`` (a head trained fully) are ignored.
    ``sparse_linear``: as in :func:`attach`.
    """
    maskfile = masks if isinstance(masks, MaskFile) else MaskFile.load(masks)
    if not maskfile.masks:
        raise MaskError("the mask file holds no masks")
    return attach(model, _by_parameter_name(model, maskfile, skip, onnx_model), skip=skip,
                  sparse_linear=sparse_linear)


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each name of a parameter that several modules share -> all its names
    (``named_parameters`` order: the first is the name it is known by)."""
    by_tensor: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor[id(param)].append(name)
    return {name: group for group in by_tensor.values() if len(group) > 1 for name in group}


def _by_parameter_name(model: nn.Module, maskfile: MaskFile, skip, onnx_model) -> dict[str, np.ndarray]:
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    wanted = {k: m for k, m in maskfile.masks.items() if k not in skip}
    if all(key in names for key in wanted):
        return wanted
    if onnx_model is None and not any(key in names for key in wanted):
        key = next(iter(wanted))
        raise MaskError(f"mask key {key!r} is not a parameter name of the model; map the masks "
                        "with `fps-onnx map`, or give the ONNX model they were selected on")
    from ..mapping import map_masks

    if onnx_model is not None and not hasattr(onnx_model, "graph"):
        from ...onnx.load import load_model

        onnx_model = load_model(onnx_model)
    subset = MaskFile(wanted, {k: maskfile.tensors.get(k, {}) for k in wanted}, dict(maskfile.meta))
    mapped, report = map_masks(subset, model.state_dict(), onnx_model)
    log.info("masks mapped to the model's parameters: %s", report.summary())
    return mapped.masks


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


def _delta_tensors(model: nn.Module, dense: Collection[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, delta in unique_deltas(model).items():
        yield f"{name}:indices", delta.indices
        yield f"{name}:values", delta.values.detach()
    state = merged_state_dict(model)
    for name in dense:
        yield name, state[name]


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
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in _delta_tensors(model, dense)}
    state = merged_state_dict(model)
    shapes = {name: list(state[name].shape) for name in unique_deltas(model)}
    meta = {
        **dict(metadata or {}),
        "format": DELTA_FORMAT,
        "format_version": DELTA_FORMAT_VERSION,
        "shapes": json.dumps(shapes, sort_keys=True),
        "dense": json.dumps(sorted(dense)),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def apply_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the deltas of a delta file to ``model``'s plain weights in place; returns ``model``.

    The whole file is checked against the format and the model first (format
    and version, ``shapes`` and ``dense`` metadata, int64 indices in range and
    without repeats, real float values of the same length, every named tensor
    present and nothing else; the values, and each weight plus its delta, must
    be finite in the weight's dtype, and a dense tensor must be a real float
    tensor finite in its target's float dtype, or else of the target's own
    dtype); a file that fails any check raises
    :class:`MaskError` and leaves ``model`` unchanged.
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
    state = model.state_dict()
    targets = [id(params[n]) for n in shapes if n in params]
    if len(set(targets)) < len(targets):
        raise MaskError(f"{path}: two deltas name one tied weight of the model")
    merged = {}
    for name, shape in shapes.items():
        if name not in params or list(params[name].shape) != shape:
            have = f"is {list(params[name].shape)}" if name in params else "does not exist"
            raise MaskError(f"{path}: delta for {name} {shown(shape)} does not fit the model (its {name} {have})")
        indices, values = tensors[f"{name}:indices"], tensors[f"{name}:values"]
        _check_sparse(name, indices, values, params[name].numel(), path)
        merged[name] = _added(name, params[name], indices, values, path)
    for name in dense:
        if name not in state or state[name].shape != tensors[name].shape:
            raise MaskError(f"{path}: tensor {name} {list(tensors[name].shape)} does not fit the model")
        _check_dense(name, state[name], tensors[name], path)

    with torch.no_grad():
        for name, (indices, values) in merged.items():
            params[name].put_(indices, values)
        for name in dense:
            state[name].copy_(tensors[name])
    return model


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


def _check_sparse(name: str, indices: torch.Tensor, values: torch.Tensor, numel: int, path) -> None:
    where = f"{path}: {name}"
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


def _added(name: str, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, path
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weight + values at them in the weight's dtype), the sums taken in
    the wider of the two dtypes; MaskError unless the values and every sum are
    finite in the weight's dtype (1e300 in a float32 weight is Inf there)."""
    where = f"{path}: {name}:values"
    if not weight.is_floating_point():
        raise MaskError(f"{where}: the model's {name} is {weight.dtype}, not a float weight")
    with torch.no_grad():
        indices = indices.to(weight.device)
        values = values.to(weight.device)
        if not bool(torch.isfinite(values.to(weight.dtype)).all()):
            raise MaskError(f"{where} do not fit the model's {weight.dtype} weight (they overflow it to Inf)")
        wide = torch.promote_types(weight.dtype, values.dtype)
        summed = (weight.detach().take(indices).to(wide) + values.to(wide)).to(weight.dtype)
    if not bool(torch.isfinite(summed).all()):
        raise MaskError(f"{where}: weight + delta overflows the model's {weight.dtype} weight to Inf")
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
