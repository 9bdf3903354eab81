"""What a mask file selects (``fps-onnx inspect``): :func:`summarise` -> :class:`Summary`.

Per tensor: shape, selected entries and fraction, its layer depth and kind
(:func:`fps_onnx.report.kinds.classify`), totals per depth, per kind and per
(depth, kind), and the number of output neurons (mask rows) per count of
selected entries. With statistics, per tensor (:class:`ChannelActivation`): the
mean and the max over input channels of the channel statistic (mean|a|; RMS
where the file holds only squared sums), and ``top10_share``, the share of the
selected entries whose input channel is among the top 10% of channels by that
statistic (ceil(10%) channels, ties to the lower index): about 0.1 for a
selection blind to activations, towards 1 when the selection follows the
high-activation channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import math

import numpy as np

from ..errors import StatsError
from ..selection.maskfile import MaskFile
from ..stats import ChannelStats, Stats
from .kinds import KINDS, classify, depth_order, weight_names

__all__ = ["ChannelActivation", "Count", "Summary", "TensorSummary", "summarise"]

#: run metadata of a mask file that reports show and compare
META_FIELDS = ("model_sha256", "method", "norm", "level", "budget", "num_samples")
TOP_SHARE = 0.10  # top10_share: the top 10% of input channels by the statistic


@dataclass(frozen=True)
class Count:
    """Selected entries of some tensors."""

    selected: int = 0
    total: int = 0
    tensors: int = 0

    @property
    def fraction(self) -> float:
        return self.selected / self.total if self.total else 0.0

    def __add__(self, other: Count) -> Count:
        return Count(self.selected + other.selected, self.total + other.total,
                     self.tensors + other.tensors)


@dataclass(frozen=True)
class ChannelActivation:
    """A tensor's input-channel statistic (mean|a|, or RMS) and where its selection falls."""

    mean: float
    max: float
    top10_share: float | None  # None when nothing is selected
    statistic: str  # "mean_abs" or "rms"


@dataclass(frozen=True)
class TensorSummary:
    key: str
    shape: tuple[int, ...]
    selected: int
    depth: int | None
    kind: str
    activation: ChannelActivation | None = None

    @property
    def total(self) -> int:
        return math.prod(self.shape)

    @property
    def fraction(self) -> float:
        return self.selected / self.total if self.total else 0.0


@dataclass(frozen=True)
class Summary:
    """What a mask file selects (:func:`summarise`)."""

    source: str
    meta: dict[str, str]
    tensors: tuple[TensorSummary, ...]  # by depth, kind and key
    per_neuron: tuple[int, ...]  # per_neuron[k]: output neurons (mask rows) with k selected entries

    @property
    def count(self) -> Count:
        return sum((_count(t) for t in self.tensors), Count())

    @property
    def depths(self) -> list[int | None]:
        return sorted({t.depth for t in self.tensors}, key=depth_order)

    @property
    def kinds(self) -> list[str]:
        present = {t.kind for t in self.tensors}
        return [k for k in KINDS if k in present]

    def by_depth(self) -> dict[int | None, Count]:
        return {d: sum((_count(t) for t in self.tensors if t.depth == d), Count()) for d in self.depths}

    def by_kind(self) -> dict[str, Count]:
        return {k: sum((_count(t) for t in self.tensors if t.kind == k), Count()) for k in self.kinds}

    def by_depth_kind(self) -> dict[tuple[int | None, str], Count]:
        cells: dict[tuple[int | None, str], Count] = {}
        for t in self.tensors:
            cells[t.depth, t.kind] = cells.get((t.depth, t.kind), Count()) + _count(t)
        return dict(sorted(cells.items(), key=lambda kv: (depth_order(kv[0][0]), KINDS.index(kv[0][1]))))


def _count(t: TensorSummary) -> Count:
    return Count(t.selected, t.total, 1)


def _out_axis(shape: tuple[int, ...], entry: dict) -> int:
    """Axis of the output neurons: 0 (PyTorch layout), 1 for a mapped weight stored [in, out]."""
    return 1 if len(shape) == 2 and entry.get("torch_transposed") else 0


def _along(shape: tuple[int, ...], flat: np.ndarray, axis: int) -> np.ndarray:
    """Selected entries per index of ``axis`` (0, or 1 of a 2-D mask), from the sorted flat indices."""
    if axis == 0:
        at = flat // max(1, math.prod(shape[1:]))
    else:
        at = flat % shape[1]
    return np.bincount(at, minlength=shape[axis])


def _per_channel(shape: tuple[int, ...], flat: np.ndarray, entry: dict, channels: int) -> np.ndarray | None:
    """Selected entries per input channel (Conv: group(o) * C_in/groups + c), or None when the
    mask's input does not have ``channels`` channels."""
    if len(shape) == 2:
        counts = _along(shape, flat, 1 - _out_axis(shape, entry))
        return counts if counts.size == channels else None
    if len(shape) < 2 or shape[1] == 0 or channels % shape[1]:
        return None
    per_group = shape[1]
    groups = channels // per_group
    if shape[0] % groups:
        return None
    window = math.prod(shape[2:])
    out, c = flat // (per_group * window), (flat // window) % per_group
    return np.bincount(out // (shape[0] // groups) * per_group + c, minlength=channels)


def _activation(shape: tuple[int, ...], flat: np.ndarray, entry: dict, acc: ChannelStats,
                key: str) -> ChannelActivation:
    if acc.abs_sum is not None:
        stat, name = acc.mean_abs(), "mean_abs"
    else:
        stat, name = acc.rms(), "rms"
    counts = _per_channel(shape, flat, entry, stat.size)
    if counts is None:
        raise StatsError(f"the statistics of {key} have {stat.size} channels, which do not fit its "
                         f"mask {list(shape)} (statistics of another model?)")
    top = np.argsort(-stat, kind="stable")[: max(1, math.ceil(TOP_SHARE * stat.size))]
    selected = int(counts.sum())
    share = float(counts[top].sum() / selected) if selected else None
    return ChannelActivation(float(stat.mean()), float(stat.max()), share, name)


def summarise(masks: MaskFile, stats: Stats | None = None, source: str = "masks",
              nodes: Mapping[str, Sequence[str]] | None = None) -> Summary:
    """Per-tensor, per-depth and per-kind selection of ``masks``; with ``stats`` (of the same
    model) the activation statistic of each tensor's input and how the selection follows it;
    ``nodes`` (:func:`fps_onnx.report.kinds.node_names`) adds node names to read depth and kind from."""
    nodes = nodes or {}
    if stats is not None:
        sha = masks.meta.get("model_sha256")
        if sha and stats.model_sha256 != sha:
            raise StatsError("the statistics are of another model than the masks "
                             f"(model_sha256 {stats.model_sha256[:12]} vs {sha[:12]})")
    tensors = []
    per_neuron = np.zeros(1, dtype=np.int64)
    for key in sorted(masks.keys()):
        shape, flat = masks.shape(key), masks.indices(key)
        entry = masks.tensors.get(key, {})
        depth, kind = classify(weight_names(key, entry, nodes), entry.get("op"), len(shape))
        activation = None
        if stats is not None:
            acc = stats.weights.get(key) or stats.weights.get(entry.get("onnx_initializer") or "")
            if acc is not None:
                activation = _activation(shape, flat, entry, acc, key)
        tensors.append(TensorSummary(key, shape, int(flat.size), depth, kind, activation))
        if shape and math.prod(shape):
            counts = np.bincount(_along(shape, flat, _out_axis(shape, entry)))
            if counts.size > per_neuron.size:
                per_neuron = np.pad(per_neuron, (0, counts.size - per_neuron.size))
            per_neuron[: counts.size] += counts
    tensors.sort(key=lambda t: (depth_order(t.depth), KINDS.index(t.kind), t.key))
    meta = {k: masks.meta[k] for k in META_FIELDS if k in masks.meta}
    return Summary(source, meta, tuple(tensors), tuple(int(c) for c in per_neuron))
