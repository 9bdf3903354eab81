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


class CheckpointError(FpsError):
    """A checkpoint to resume from is missing, damaged, or was written by another run."""


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


#: Characters that would break a message into lines or rewrite the terminal:
#: C0 and C1 controls (newline, carriage return, escape, ...), DEL, the Unicode
#: line and paragraph separators, and the bidirectional overrides.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                            *range(0x2066, 0x206A), 0xFEFF)})


def one_line(text: object) -> str:
    """``text`` as exactly one line: every control character escaped (``\\n``,
    ``\\x1b``, ``\\u2028``, ...), so a name read from a file cannot start a
    second line of output or move the cursor."""
    return str(text).strip().translate(_ESCAPES)


def quoted(name: object) -> str:
    """A name read from a file (weight, input, stats key, file name) as it
    appears in a message: quoted, control characters escaped (``repr``)."""
    return repr(str(name))
