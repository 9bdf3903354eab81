"""Statistics accumulators and the stats file."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from _cli import assert_one_error, invoke
from _models import linear_chain
from fps_onnx.errors import StatsError
from fps_onnx.onnx.external import model_sha256
from fps_onnx.onnx.sites import WeightSite
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.selection.score import SelectConfig, select_one
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


# --------------------------------------------------------------------------- forged files


def _valid(sha="abc"):
    """Tensors and metadata of a valid stats file (w1: 6 channels, w2: 5)."""
    r = np.random.default_rng(0)
    tensors = {}
    for key, n in (("w1", 6), ("w2", 5)):
        tensors[f"{key}:abs_sum"] = r.random(n)
        tensors[f"{key}:sq_sum"] = r.random(n)
        tensors[f"{key}:count"] = np.array([20], np.int64)
    meta = {"format": "fps-stats", "format_version": "1", "model_sha256": sha, "num_samples": "20"}
    return tensors, meta


def _set(name, value):
    return lambda t, m: t.__setitem__(name, value)


def _drop(name):
    return lambda t, m: t.pop(name)


def _meta(name, value):
    return lambda t, m: m.__setitem__(name, value)


FORGED = [
    (_set("w1:abs_sum", np.array([1.0])), "sums of w1 differ in length"),
    (_set("w1:abs_sum", -np.ones(6)), "w1:abs_sum holds negative sums"),
    (_set("w1:sq_sum", np.array([1, np.nan, 1, 1, 1, 1.0])), "w1:sq_sum holds NaN or Inf"),
    (_set("w1:abs_sum", np.ones(6, np.float32)), "w1:abs_sum must be a non-empty 1-D float64"),
    (_set("w1:abs_sum", np.ones((2, 3))), r"w1:abs_sum must be a non-empty 1-D float64 vector, not float64 \[2, 3\]"),
    (_set("w1:count", np.array([-3], np.int64)), "w1:count must be a whole number from 1 to 9,223,372,036,854,775,807, not -3"),
    (_set("w1:count", np.array([0], np.int64)), "w1:count must be a whole number from 1 to 9,223,372,036,854,775,807, not 0"),
    (_set("w1:count", np.array([], np.int64)), r"w1:count must be one int64 count, not int64 \[0\]"),
    (_set("w1:count", np.array([2, 3], np.int64)), "w1:count must be one int64 count"),
    (_set("w1:count", np.array([2.0])), "w1:count must be one int64 count, not float64"),
    (_set("w1:mean", np.ones(6)), "unexpected tensor 'w1:mean'"),
    (_set("w1", np.ones(6)), "unexpected tensor 'w1'"),
    (_drop("w2:count"), "w2 has no count"),
    (lambda t, m: [t.pop("w2:abs_sum"), t.pop("w2:sq_sum")], "w2 has a count but no sums"),
    (_drop("w2:sq_sum"), "some weights hold abs_sum and sq_sum, w2 holds abs_sum"),
    (_meta("num_samples", "abc"), "'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not 'abc'"),
    (_meta("num_samples", "0"), "'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not '0'"),
    (_meta("num_samples", "-4"), "'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not '-4'"),
    (lambda t, m: m.pop("num_samples"), "'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not ''"),
    (_meta("num_samples", "9" * 5000), r"'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not '9999.*'\.\.\. \(5,000 characters\)"),
    (_meta("num_samples", str(2**63)), "'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not '9223372036854775808'"),
    (_meta("num_samples", " 20"), "'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not ' 20'"),
    (_meta("num_samples", "２０"), "'num_samples' must be a whole number from 1 to 9,223,372,036,854,775,807, not '２０'"),  # full-width digits: int() takes them
    (_meta("shard", "0/999999999"), r"'shard' \(K/N\): N must be a whole number from 1 to 1,000,000, not '999999999'"),
    (_meta("shard", "0/" + "9" * 5000), r"'shard' \(K/N\): N must be a whole number from 1 to 1,000,000, not '9999"),
    (_meta("shard", "3/3"), r"'shard' \(K/N\): K must be a whole number from 0 to 2, not '3'"),
    (_meta("shard", "-1/3"), r"'shard' \(K/N\): K must be a whole number from 0 to 2, not '-1'"),
    (_meta("shard", "1/0"), r"'shard' \(K/N\): N must be a whole number from 1 to 1,000,000, not '0'"),
    (_meta("shard", "1"), r"'shard' \(K/N\): N must be a whole number from 1 to 1,000,000, not ''"),
    (_meta("shard", "1/2\nError: forged"), r"'shard' \(K/N\): N must be .*not '2\\nError: forged'"),
    (_meta("batch_size", "1" * 30), "'batch_size' must be a whole number from 1 to 9,223,372,036,854,775,807, not '1111"),
    (_meta("batch_size", "0"), "'batch_size' must be a whole number from 1 to 9,223,372,036,854,775,807, not '0'"),
    (lambda t, m: m.pop("model_sha256"), "'model_sha256' is missing"),
    (_meta("format_version", "2"), "has statistics format version 2"),
]


def _forge(path, change, sha="abc"):
    tensors, meta = _valid(sha)
    change(tensors, meta)
    save_file(tensors, path, metadata=meta)
    return path


@pytest.mark.parametrize("change, message", FORGED)
def test_forged_stats_files_are_refused_on_load(tmp_path, change, message):
    with pytest.raises(StatsError, match=message):
        Stats.load(_forge(tmp_path / "s.safetensors", change))


def test_the_valid_file_loads_and_a_scalar_count_is_accepted(tmp_path):
    s = Stats.load(_forge(tmp_path / "s.safetensors", _set("w2:count", np.array(7, np.int64))))
    assert s.weights["w1"].count == 20 and s.weights["w2"].count == 7 and s.num_samples == 20


def test_lengths_are_checked_against_the_weights():
    tensors, _ = _valid()
    s = Stats("abc")
    for key in ("w1", "w2"):
        s.weights[key] = ChannelStats(tensors[f"{key}:abs_sum"], None, 3)
    s.check_fits({"w1": 6, "w2": 5}, "f")
    with pytest.raises(StatsError, match="f: w2:abs_sum has 5 channels, the weight's input has 4"):
        s.check_fits({"w1": 6, "w2": 4}, "f")
    with pytest.raises(StatsError, match="f has no statistics for w3"):
        s.check_fits({"w1": 6, "w2": 5, "w3": 2}, "f")
    with pytest.raises(StatsError, match="f has statistics for 'w2', which is not a selectable"):
        s.check_fits({"w1": 6}, "f")


def test_merging_shards_with_different_sums_fails():
    a, b = shard(0), shard(1)
    for c in b.weights.values():
        c.abs_sum = None
    with pytest.raises(StatsError, match="different sums"):
        a.merge(b)


def test_a_count_of_zero_is_never_written(tmp_path):
    s = shard(0)
    s.weights["conv.weight"].count = 0
    with pytest.raises(StatsError, match="no input rows were measured for weight conv.weight"):
        s.save(tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_zero_count_fails_selection_naming_the_weight():
    site = WeightSite("w", "Gemm", "out_in", (2, 3), 3)
    c = ChannelStats(np.zeros(3), np.zeros(3), 0)
    with pytest.raises(StatsError, match="no input rows were measured for weight w"):
        select_one(np.ones((2, 3), np.float32), site, c, SelectConfig(per_neuron=1))
    # weight-only methods need no statistics
    assert select_one(np.ones((2, 3), np.float32), site, None, SelectConfig(method="magnitude", per_neuron=1)).sum() == 2


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture()
def chain_model(tmp_path):
    return linear_chain(tmp_path)


CLI_FORGED = FORGED + [
    # length 1 for both sums: consistent in the file, but not the weight's 6 input channels
    (lambda t, m: [t.__setitem__("w1:abs_sum", np.ones(1)), t.__setitem__("w1:sq_sum", np.ones(1))],
     "w1:abs_sum has 1 channels, the weight's input has 6"),
    (lambda t, m: [t.__setitem__("w3:abs_sum", np.ones(2)), t.__setitem__("w3:sq_sum", np.ones(2)),
                   t.__setitem__("w3:count", np.array([1], np.int64))], "statistics for 'w3', which is not"),
    (lambda t, m: [t.pop(f"w2:{n}") for n in ("abs_sum", "sq_sum", "count")], "has no statistics for w2"),
]


@pytest.mark.parametrize("change, message", CLI_FORGED)
def test_forged_stats_fail_select_with_one_line(tmp_path, chain_model, change, message):
    stats = _forge(tmp_path / "s.safetensors", change, sha=model_sha256(chain_model))
    out = tmp_path / "m.safetensors"
    assert_one_error(invoke("select", chain_model, "-o", out, "--from-stats", stats), message, alone=False,
                     absent=[out])


def test_valid_forged_stats_select(tmp_path, chain_model):
    stats = _forge(tmp_path / "s.safetensors", lambda t, m: None, sha=model_sha256(chain_model))
    out = tmp_path / "m.safetensors"
    result = invoke("select", chain_model, "-o", out, "--from-stats", stats, "-q")
    assert result.exit_code == 0, result.output
    masks = MaskFile.load(out)
    assert sorted(masks.masks) == ["w1", "w2"] and masks.meta["model_sha256"] == model_sha256(chain_model)


def test_shards_with_different_sums_fail_select_with_one_line(tmp_path, chain_model):
    sha = model_sha256(chain_model)
    a = _forge(tmp_path / "a.safetensors", lambda t, m: [t.pop(k) for k in list(t) if k.endswith("sq_sum")], sha)
    b = _forge(tmp_path / "b.safetensors", lambda t, m: [t.pop(k) for k in list(t) if k.endswith("abs_sum")], sha)
    out, merged = tmp_path / "m.safetensors", tmp_path / "merged.safetensors"
    result = invoke("select", chain_model, "-o", out, "--from-stats", a, "--from-stats", b, "--stats-out", merged)
    assert_one_error(result, r"cannot merge .*a.safetensors \(abs_sum\) with .*b.safetensors \(sq_sum\)",
                     alone=False, absent=[out])
    assert not merged.exists()


# --------------------------------------------------------------------------- numbers in range


def _timed_select(*args):
    import time

    start = time.monotonic()
    result = invoke("select", *args)
    return result, time.monotonic() - start


@pytest.mark.parametrize("shards", [("0/999999999", "1/999999999"), ("0/1000001", "5/1000001"),
                                    ("0/" + "9" * 400, "1/" + "9" * 400)])
def test_shard_counts_past_the_limit_are_refused_before_anything_is_sized(tmp_path, chain_model, shards):
    sha = model_sha256(chain_model)
    files = [_forge(tmp_path / f"{i}.safetensors", _meta("shard", s), sha) for i, s in enumerate(shards)]
    out = tmp_path / "m.safetensors"
    result, took = _timed_select(chain_model, "-o", out, "-q", *[a for f in files for a in ("--from-stats", f)])
    assert_one_error(result, r"0\.safetensors: metadata 'shard' \(K/N\): N must be a whole number from 1 to 1,000,000",
                     absent=[out])
    assert took < 20


def test_shards_at_the_limit_merge_in_bounded_time(tmp_path, chain_model, caplog):
    sha = model_sha256(chain_model)
    files = [_forge(tmp_path / f"{k}.safetensors",
                    lambda t, m, k=k: m.update(shard=f"{k}/1000000", batch_size="4"), sha)
             for k in (0, 999_999)]
    out = tmp_path / "m.safetensors"
    result, took = _timed_select(chain_model, "-o", out, "-q", *[a for f in files for a in ("--from-stats", f)])
    assert result.exit_code == 0, result.output
    assert "shard 1/1000000, 2/1000000, 3/1000000, 4/1000000, 5/1000000 ... not among" in result.stderr
    assert took < 20
    loaded = Stats.load(files[0])
    assert loaded.shard == (0, 1_000_000) and loaded.batch_size == 4


@pytest.mark.parametrize("change, message", [
    (_set("w1:count", np.array([2**63 - 1], np.int64)),
     r"cannot merge the statistics of w1: their counts add up to 18,446,744,073,709,551,614 rows"),
    (_meta("num_samples", str(2**63 - 1)), r"cannot merge statistics of 18,446,744,073,709,551,614 samples"),
    (_set("w2:sq_sum", np.full(5, 1e308)), r"cannot merge the statistics of w2: their sums add up past float64"),
])
def test_merges_that_overflow_are_refused(tmp_path, chain_model, change, message):
    sha = model_sha256(chain_model)
    a, b = (_forge(tmp_path / f"{n}.safetensors", change, sha) for n in "ab")
    out, merged = tmp_path / "m.safetensors", tmp_path / "merged.safetensors"
    result, took = _timed_select(chain_model, "-o", out, "--from-stats", a, "--from-stats", b,
                                 "--stats-out", merged)
    assert_one_error(result, message, absent=[out, merged])
    assert took < 20
    with pytest.raises(StatsError, match=message):
        merge_all([Stats.load(a), Stats.load(b)])


def test_counts_near_the_limit_load_and_merge_below_it(tmp_path):
    half = 2**62
    a, b = (_forge(tmp_path / f"{n}.safetensors", _set("w1:count", np.array([half], np.int64))) for n in "ab")
    with pytest.raises(StatsError, match="counts add up to 9,223,372,036,854,775,808"):
        merge_all([Stats.load(a), Stats.load(b)])
    c = _forge(tmp_path / "c.safetensors", _set("w1:count", np.array([half - 1], np.int64)))
    assert merge_all([Stats.load(a), Stats.load(c)]).weights["w1"].count == 2**63 - 1
