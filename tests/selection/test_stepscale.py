"""Per-entry step scales from the statistics (``train --step-scale``): the selection layer's rule."""

from __future__ import annotations

import numpy as np
import pytest

from fps_onnx.errors import StatsError
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.selection.stepscale import column_scales
from fps_onnx.stats import ChannelStats, Stats

SHA = "a" * 64


def stats_of(sha=SHA, **columns) -> Stats:
    stats = Stats(sha, num_samples=2)
    for key, mean_abs in columns.items():
        acc = ChannelStats()
        acc.add(abs_sum=2 * np.asarray(mean_abs, np.float64), sq_sum=8 * np.asarray(mean_abs, np.float64) ** 2,
                count=2)
        stats.weights[key] = acc
    return stats


def masks_of(shapes, tensors=None, sha=SHA, norm="l1") -> MaskFile:
    return MaskFile({k: np.eye(*shape, dtype=bool) for k, shape in shapes.items()}, tensors,
                    {"model_sha256": sha, "norm": norm})


def test_channels_louder_than_the_median_step_in_proportion_and_the_rest_fully():
    got = column_scales(masks_of({"w": (3, 4)}), stats_of(w=[1.0, 2.0, 3.0, 10.0]))
    assert got["w"].dtype == np.float32
    np.testing.assert_allclose(got["w"], [1.0, 1.0, 2.5 / 3.0, 0.25])  # median 2.5


def test_l2_masks_use_the_rms_and_silent_channels_are_left_out_of_the_median():
    got = column_scales(masks_of({"w": (2, 4)}, norm="l2"), stats_of(w=[0.0, 1.0, 2.0, 4.0]))
    np.testing.assert_allclose(got["w"], [1.0, 1.0, 1.0, 0.5])  # rms = 2 * mean|a| here; median of 2, 4, 8
    silent = column_scales(masks_of({"w": (2, 3)}), stats_of(w=[0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(silent["w"], np.ones(3, np.float32))


def test_a_mapped_mask_finds_its_statistics_through_its_onnx_initializer_and_its_input_axis():
    tensors = {"h.0.attn.c_attn.weight": {"onnx_initializer": "onnx::MatMul_7", "torch_transposed": True}}
    got = column_scales(masks_of({"h.0.attn.c_attn.weight": (4, 6)}, tensors), stats_of(**{"onnx::MatMul_7": [1, 1, 4, 1]}))
    np.testing.assert_allclose(got["h.0.attn.c_attn.weight"], [1, 1, 0.25, 1])  # [in, out]: 4 channels


@pytest.mark.parametrize("masks, stats, message", [
    (masks_of({"w": (2, 3)}), stats_of("b" * 64, w=[1, 2, 3]), "are of another model than the masks"),
    (MaskFile({"w": np.eye(2, dtype=bool)}, None, {}), stats_of(w=[1, 2]), "name no ONNX model"),
    (masks_of({"w": (2, 3)}), stats_of(v=[1, 2, 3]), "hold nothing for 'w'"),
    (masks_of({"w": (2, 3)}), stats_of(w=[1, 2]), "hold 2 input channels for 'w', its mask 'w' has 3"),
    (masks_of({"w": (2, 3)}, norm="l3"), stats_of(w=[1, 2, 3]), "'norm' must be l1 or l2"),
])
def test_statistics_that_do_not_fit_the_masks_are_refused(masks, stats, message):
    with pytest.raises(StatsError, match=message):
        column_scales(masks, stats)


def test_a_conv_weight_is_refused():
    masks = MaskFile({"c": np.ones((2, 3, 1, 1), bool)}, None, {"model_sha256": SHA})
    with pytest.raises(StatsError, match=r"2-D weights .* 'c' is shaped \[2, 3, 1, 1\]"):
        column_scales(masks, stats_of(c=[1, 2, 3]))


def test_statistics_without_the_sum_the_norm_needs_are_refused():
    stats = Stats(SHA, num_samples=1)
    acc = ChannelStats()
    acc.add(abs_sum=np.ones(3), count=1)
    stats.weights["w"] = acc
    with pytest.raises(StatsError, match="hold no sq_sum, which --norm l2 needs"):
        column_scales(masks_of({"w": (2, 3)}, norm="l2"), stats)
