"""torch, imported once for the training package, or a clear message when it is missing."""

from __future__ import annotations

from ...errors import MissingDependency

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise MissingDependency("torch", "fps-onnx train") from exc

__all__ = ["nn", "torch"]
