"""Layer 5: reports on stats and masks (summary, diff, render)."""

from __future__ import annotations

from .summary import (
    Activation,
    Count,
    Diff,
    Overlap,
    PlotDependencyError,
    Summary,
    TensorDiff,
    TensorSummary,
    classify,
    diff,
    node_names,
    plot,
    require_matplotlib,
    summarise,
    to_json,
    to_markdown,
    to_text,
)

__all__ = [
    "Activation",
    "Count",
    "Diff",
    "Overlap",
    "PlotDependencyError",
    "Summary",
    "TensorDiff",
    "TensorSummary",
    "classify",
    "diff",
    "node_names",
    "plot",
    "require_matplotlib",
    "summarise",
    "to_json",
    "to_markdown",
    "to_text",
]
