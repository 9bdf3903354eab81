"""The exceptions fps-onnx raises on bad input.

Every failure a user can cause is one of these; the CLI turns each into a
single line and a non-zero exit. Messages are written to be shown as they are.
"""

from __future__ import annotations


class FpsError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ModelError(FpsError):
    """The ONNX model is missing, unreadable, or has nothing to select."""


class DataError(FpsError):
    """Calibration or training data is missing, unreadable or does not fit the model."""


class NumericError(FpsError):
    """Activations or weights hold NaN or Inf."""


class BudgetError(FpsError):
    """The selection budget cannot be met (K above a fan-in, F outside (0, 1])."""


class StatsError(FpsError):
    """A statistics file is unreadable or belongs to another model."""


class MaskError(FpsError):
    """A mask file is unreadable, malformed or does not fit the model."""


class OutputError(FpsError):
    """An output path cannot be written."""


class ExportError(FpsError):
    """A model cannot be built or exported to ONNX."""


class MissingDependency(FpsError):
    """An optional dependency (torch, timm, transformers) is not installed."""

    def __init__(self, package: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs {package}; install it with: pip install 'fps-onnx[torch]'"
        )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (third-party errors can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
