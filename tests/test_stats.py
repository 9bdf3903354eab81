"""Statistics accumulators and the stats file."""

from __future__ import annotations

import numpy as np
import pytest

from fps_onnx.errors import StatsError
from fps_onnx.stats import ChannelStats, Stats, merge_all


def shard(seed, sha="abc"):
    r = np.random.default_rng(seed)
    s = Stats(sha, num_samples=5)
    for key in ("onnx::MatMul_1", "conv.weight"):
        c = ChannelStats()
        c.add(abs_sum=r.random(3), sq_sum=r.random(3), count=7)
        s.weights[key] = c
    return s


def test_save_load_round_trip(tmp_path):
    s = shard(0)
    s.save(tmp_path / "s.safetensors")
    back = Stats.load(tmp_path / "s.safetensors")
    assert back.model_sha256 == "abc" and back.num_samples == 5
    for key, c in s.weights.items():
        np.testing.assert_array_equal(back.weights[key].abs_sum, c.abs_sum)
        np.testing.assert_array_equal(back.weights[key].sq_sum, c.sq_sum)
        assert back.weights[key].count == 7
    assert back.statistics == {"abs_sum", "sq_sum"}


def test_shards_add_up():
    a, b = shard(0), shard(1)
    m = merge_all([a, b])
    assert m.num_samples == 10
    c = m.weights["conv.weight"]
    np.testing.assert_allclose(c.abs_sum, a.weights["conv.weight"].abs_sum + b.weights["conv.weight"].abs_sum)
    assert c.count == 14
    np.testing.assert_allclose(c.mean_abs(), c.abs_sum / 14)


def test_merging_other_models_fails():
    with pytest.raises(StatsError, match="different models"):
        shard(0).merge(shard(1, sha="other"))


def test_missing_norm_statistic_is_named():
    c = ChannelStats()
    c.add(abs_sum=np.ones(2), count=1)
    with pytest.raises(StatsError, match="no sq_sum, which --norm l2 needs"):
        c.rms()


def test_not_a_stats_file(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(StatsError, match="cannot read statistics file"):
        Stats.load(bad)
    with pytest.raises(StatsError, match="does not exist"):
        Stats.load(tmp_path / "missing.safetensors")
