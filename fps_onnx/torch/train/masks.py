"""A mask file attached to a PyTorch model, its keys mapped from ONNX names.

Masks in their parameter's layout (mapped, GPS, or plain arrays) keyed by parameter names are
used as they are; masks as selection wrote them on an ONNX model ([out, in], keyed by the ONNX
initializer name, even where that is a parameter's name) are matched to the model's parameters
first (:func:`fps_onnx.torch.mapping.map_masks`), which transposes a mask for a parameter stored
[in, out] (GPT-2's Conv1D).
"""

from __future__ import annotations

from collections.abc import Collection
import logging
import os

from ...errors import MaskError
from ...selection.maskfile import MaskFile, mask_file_of
from ..mapping import in_out_parameters, map_masks
from . import sparse
from ._torch import nn

__all__ = ["attach_masks"]

log = logging.getLogger(__name__)


def attach_masks(
    model: nn.Module,
    masks: MaskFile | str | os.PathLike,
    *,
    skip: Collection[str] = (),
    onnx_model=None,
    sparse_linear: bool = True,
) -> dict[str, sparse.SparseDelta]:
    """Attach a mask file (its path, or a loaded MaskFile) to ``model`` (:func:`sparse.attach`).

    Masks keyed by parameter names and in their layout are used as they are.
    Masks selected on ONNX and not mapped yet are matched to the model's parameters through
    :func:`fps_onnx.torch.mapping.map_masks`: by value when ``onnx_model`` (the ONNX
    model the masks were selected on: path or ModelProto) is given, by name
    otherwise. Masks named in ``skip`` (a head trained fully) are ignored.
    ``sparse_linear``: as in :func:`sparse.attach`.
    """
    maskfile = mask_file_of(masks)
    if not len(maskfile):
        raise MaskError("the mask file holds no masks")
    return sparse.attach(model, _by_parameter_name(model, maskfile, skip, onnx_model), skip=skip,
                  sparse_linear=sparse_linear)


def _by_parameter_name(model: nn.Module, maskfile: MaskFile, skip, onnx_model) -> MaskFile:
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    wanted = maskfile.subset(k for k in maskfile.keys() if k not in skip)
    if all(key in names for key in wanted.keys()) and not any(
            _selected_on_onnx(wanted.tensors.get(k, {})) for k in wanted.keys()):
        return wanted
    if onnx_model is None and not any(key in names for key in wanted.keys()):
        key = wanted.keys()[0]
        raise MaskError(f"mask key {key!r} is not a parameter name of the model; map the masks "
                        "with `fps-onnx map`, or give the ONNX model they were selected on")
    if onnx_model is not None and not hasattr(onnx_model, "graph"):
        from ...onnx.load import load_model

        onnx_model = load_model(onnx_model)
    mapped, report = map_masks(wanted, model.state_dict(), onnx_model, in_out=in_out_parameters(model))
    log.info("masks mapped to the model's parameters: %s", report.summary())
    return mapped


def _selected_on_onnx(entry: dict) -> bool:
    """A mask as selection wrote it on an ONNX weight ([out, in], not yet in its parameter's
    layout): mapping transposes it where the parameter is stored [in, out]."""
    return bool(entry.get("onnx_initializer")) and "torch_name" not in entry
