"""The frozen base's dtype (``--base-dtype``): half-precision weights, fp32 deltas.

The frozen weights are held in the base dtype (bf16 or fp16 halve their
memory); what trains stays fp32: each delta's k values and their AdamW state
(:class:`~fps_onnx.torch.train.sparse.SparseDelta` keeps ``values`` in at
least fp32), and every tensor trained fully (:func:`cast_model`). A delta is
added to its base entries in fp32 and cast once per use
(``SparseDelta.write``); with a half base the forward pass runs under autocast
in that dtype, so fp32 trainables and half weights meet in one matmul. The
merged output is rebuilt from the base's own weights in their original dtype
(``run``), never from the half copy.
"""

from __future__ import annotations

from ._torch import nn, torch
from .recipe import Recipe

__all__ = ["DTYPES", "base_dtype", "cast_model", "is_half"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def base_dtype(recipe: Recipe, device: torch.device | str) -> torch.dtype:
    """The frozen weights' dtype: ``recipe.base_dtype``, else bf16 on CUDA and fp32 elsewhere."""
    if recipe.base_dtype is not None:
        return DTYPES[recipe.base_dtype]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def is_half(recipe: Recipe, device: torch.device | str) -> bool:
    return base_dtype(recipe, device) != torch.float32


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen float parameters to ``dtype``, trainable ones to fp32 (in place, one tensor at a time)."""
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        want = torch.float32 if param.requires_grad else dtype
        if param.dtype != want and param.device.type != "meta":
            param.data = param.data.to(want)
        elif param.dtype != want:
            param.data = torch.empty_like(param.data, dtype=want)
