"""Scope exclusions applied to a finished mask file: after mapping to PyTorch names, an
``--exclude`` pattern may match a tensor's PyTorch name that its ONNX name did not show."""

from __future__ import annotations

import logging

from ..errors import ModelError
from ..onnx.scope import ScopeConfig
from .maskfile import MaskFile

__all__ = ["drop_excluded"]

log = logging.getLogger(__name__)


def drop_excluded(masks: MaskFile, config: ScopeConfig) -> MaskFile:
    """``masks`` without the tensors whose key or PyTorch name an ``exclude``
    pattern matches (for masks keyed by PyTorch names after mapping)."""
    dropped = [k for k in masks.keys()
               if config.excluded(k, masks.tensors.get(k, {}).get("torch_name")) is not None]
    if not dropped:
        return masks
    log.info("not selectable (--exclude): %s", ", ".join(dropped))
    if len(dropped) == len(masks):
        raise ModelError(f"no selectable weight is left: --exclude matches {', '.join(dropped)}")
    return masks.subset(k for k in masks.keys() if k not in dropped)
