"""Per-entry step scales from the selection's statistics (``fps-onnx train --step-scale``).

An update ``d`` to entry ``w[i, j]`` moves output ``i`` by ``d * a_j``, ``a_j`` the
activation of input channel ``j``. AdamW moves every entry about ``lr`` a step
whatever its gradient's size, so an entry on a channel of large activations (the
channels FPS's score ``|w| * s_j`` favours) moves the output more per step than one
on a quiet channel: the lr that suits the first is too small for the second.
:func:`column_scales` gives each input channel the factor ``min(1, median(s) / s_j)``
(``s``: the statistic the masks were scored with, mean ``|a|`` or RMS, from the same
forward pass), which the trainer multiplies into every step of that channel's
entries: no entry then moves the output faster than one on a median channel.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from ..errors import StatsError
from ..stats import Stats
from .maskfile import MaskFile
from .score import channel_statistic

__all__ = ["column_scales", "entry_factors", "factors_digest"]


def column_scales(masks: MaskFile, stats: Stats | str | os.PathLike) -> dict[str, np.ndarray]:
    """Mask key -> the factor of each input channel of its weight (float32).

    ``stats`` (a Stats, or the path of a statistics file: ``select --stats-out``) must be of the
    model the masks were selected on; each mask's statistics are looked up by the ONNX initializer
    it traces back to (its key, unless mapped). StatsError where they are of another model,
    missing, or do not fit the weight.
    """
    source = "the statistics" if isinstance(stats, Stats) else stats
    if not isinstance(stats, Stats):
        stats = Stats.load(stats)
    selected_on = masks.meta.get("model_sha256")
    if not selected_on:
        raise StatsError("the masks name no ONNX model they were selected on (a gradient selection has "
                         "no statistics): --step-scale needs masks from `fps-onnx select`")
    if stats.model_sha256 != selected_on:
        raise StatsError(f"{source} are of another model than the masks (model_sha256 "
                         f"{stats.model_sha256[:12]}... vs {selected_on[:12]}...)")
    norm = masks.meta.get("norm", "l1")
    if norm not in ("l1", "l2"):
        raise StatsError(f"the masks' metadata 'norm' must be l1 or l2, not {norm!r}")
    out = {}
    for key in masks.keys():
        entry = masks.tensors.get(key, {})
        initializer = entry.get("onnx_initializer") or key
        held = stats.weights.get(initializer)
        if held is None:
            raise StatsError(f"{source} hold nothing for {initializer!r} (the weight of mask {key!r})")
        shape = masks.shape(key)
        if len(shape) != 2:
            raise StatsError(f"--step-scale handles 2-D weights (MatMul, Gemm, Linear); mask {key!r} is "
                             f"shaped {list(shape)}")
        axis = _channel_axis(masks, key)
        try:
            s = np.asarray(channel_statistic(held, norm), dtype=np.float64)
        except StatsError as e:
            raise StatsError(f"{source}: {e}") from None
        if s.shape != (shape[axis],):
            raise StatsError(f"{source} hold {s.size} input channels for {initializer!r}, its mask {key!r} "
                             f"has {shape[axis]}")
        out[key] = _factors(s)
    return out


def _channel_axis(masks: MaskFile, key: str) -> int:
    """The axis of mask ``key`` along its weight's input channels: 1 ([out, in]), or 0 for a
    parameter stored [in, out] (``torch_transposed``)."""
    return 0 if masks.tensors.get(key, {}).get("torch_transposed") else 1


def entry_factors(masks: MaskFile, key: str, factors: np.ndarray) -> np.ndarray:
    """Mask ``key`` as a float32 array of its shape: each selected entry's factor (``factors``: its
    channels', from :func:`column_scales`), 0 for every entry not selected."""
    axis = _channel_axis(masks, key)
    along = np.asarray(factors, np.float32).reshape((-1, 1) if axis == 0 else (1, -1))
    return np.where(masks.dense(key), along, np.float32(0))


def factors_digest(scales: dict[str, np.ndarray]) -> str:
    """Hex SHA-256 of ``scales`` (:func:`column_scales`' result): names a run's step factors, so a
    checkpoint resumes only under the same factors, whichever file they were read from."""
    digest = hashlib.sha256()
    for key in sorted(scales):
        factors = np.ascontiguousarray(scales[key], dtype="<f4")
        digest.update(f"{key}\0{factors.size}\n".encode("utf-8", "surrogateescape"))
        digest.update(factors.tobytes())
    return digest.hexdigest()


def _factors(s: np.ndarray) -> np.ndarray:
    """min(1, median / s_j), the median over the channels that were ever active (1 everywhere when none was)."""
    active = s[s > 0]
    if not active.size:
        return np.ones(s.shape, np.float32)
    ref = np.median(active)
    factors = np.ones(s.shape)
    np.divide(ref, s, out=factors, where=s > ref)
    return factors.astype(np.float32)
