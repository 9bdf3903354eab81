"""Layer 5: reports on mask files, for people and CI jobs; nothing here imports PyTorch.

* :mod:`~fps_onnx.report.summary`: what a mask file selects (:func:`summarise`, ``inspect``);
* :mod:`~fps_onnx.report.diff`: how two mask files differ (:func:`diff`, ``diff``);
* :mod:`~fps_onnx.report.kinds`: a weight's depth and kind from its names (:func:`classify`);
* :mod:`~fps_onnx.report.render`: either as text, markdown or JSON, a summary as a PNG.

The public names are importable from here.
"""

from __future__ import annotations

from .diff import Diff, Overlap, TensorDiff, diff
from .kinds import KINDS, classify, node_names
from .render import PlotDependencyError, plot, require_matplotlib, to_json, to_markdown, to_text
from .summary import ChannelActivation, Count, Summary, TensorSummary, summarise

__all__ = [
    "KINDS",
    "ChannelActivation",
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
