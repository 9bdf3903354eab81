"""The activation power and the column cap of the FPS score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fps_onnx.errors import BudgetError
from fps_onnx.onnx.sites import WeightSite
from fps_onnx.selection import score as score_module
from fps_onnx.selection.score import (
    SelectConfig,
    capped_top_k,
    capped_top_n,
    column_cap_of,
    select_one,
    select_scores,
)
from fps_onnx.stats import ChannelStats


def site(out, inp):
    return WeightSite("w", "MatMul", "out_in", (out, inp), inp)


def stats_of(abs_sum, count=1):
    s = ChannelStats()
    s.add(abs_sum=np.asarray(abs_sum, np.float64), sq_sum=np.asarray(abs_sum, np.float64) ** 2, count=count)
    return s


def reference_fps(w, act, k, level):
    """FPS as a full stable sort: |w| * act, higher first, then lower flat index."""
    s = np.abs(w).astype(np.float32) * act.astype(np.float32)[None, :]
    flat = s if level == "neuron" else s.reshape(1, -1)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    mask = np.zeros(flat.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(s.shape)


def greedy(score, n, cap, k=None):
    """The capped greedy, entry by entry over a full stable sort; None when a row is left short."""
    rows, fan_in = score.shape
    order = np.argsort(-score.reshape(-1), kind="stable")
    mask = np.zeros(score.shape, bool)
    row_n, col_n, taken = np.zeros(rows, int), np.zeros(fan_in, int), 0
    for flat in order:
        r, c = divmod(int(flat), fan_in)
        if col_n[c] < cap and (k is None or row_n[r] < k):
            mask[r, c] = True
            row_n[r] += 1
            col_n[c] += 1
            taken += 1
            if taken == n:
                return mask
    return None


@pytest.mark.parametrize("level", ["neuron", "layer"])
def test_act_power_one_is_fps_bit_for_bit(level):
    r = np.random.default_rng(0)
    w = r.standard_normal((12, 30)).astype(np.float32)
    act = r.random(30) * 3
    act[[2, 5]] = 0.0  # silent channels
    st = stats_of(act)
    want = reference_fps(w, st.mean_abs(), 4 if level == "neuron" else 48, level)
    for config in (SelectConfig(per_neuron=4, level=level), SelectConfig(per_neuron=4, level=level, act_power=1.0)):
        np.testing.assert_array_equal(select_one(w, site(12, 30), st, config), want)


@pytest.mark.parametrize("level", ["neuron", "layer"])
def test_act_power_zero_ranks_like_magnitude_even_on_silent_channels(level):
    r = np.random.default_rng(1)
    w = r.standard_normal((9, 20)).astype(np.float32)
    act = r.random(20) * 10
    act[:4] = 0.0
    st = stats_of(act)
    zero = select_one(w, site(9, 20), st, SelectConfig(fraction=0.2, level=level, act_power=0))
    magnitude = select_one(w, site(9, 20), None, SelectConfig(fraction=0.2, level=level, method="magnitude"))
    np.testing.assert_array_equal(zero, magnitude)
    assert not np.array_equal(zero, select_one(w, site(9, 20), st, SelectConfig(fraction=0.2, level=level)))


def test_half_power_tempers_an_outlier_channel():
    w = np.array([[1.0, 3.0]], np.float32)
    st = stats_of([4.0, 1.0])  # scores 4 vs 3 at A = 1; 2 vs 3 at A = 0.5
    assert select_one(w, site(1, 2), st, SelectConfig(per_neuron=1)).tolist() == [[True, False]]
    assert select_one(w, site(1, 2), st, SelectConfig(per_neuron=1, act_power=0.5)).tolist() == [[False, True]]


def test_cap_takes_the_best_entries_the_cap_allows():
    s = np.array([[9, 1, 0], [8, 2, 0], [7, 3, 0], [6, 4, 5]], np.float32)
    config = SelectConfig(per_neuron=1, level="layer", column_cap=1)  # n = 4, cap = ceil(4/3) = 2
    assert select_scores(s, config).astype(int).tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert select_scores(s, SelectConfig(per_neuron=1, level="layer")).sum(axis=0).tolist() == [4, 0, 0]


def test_cap_is_exact_even_where_floats_round():
    assert column_cap_of(2.0, 9216, 576) == 32  # SmolLM2's q_proj at r = 8: twice the even share of 16
    assert column_cap_of(1.1, 10, 1) == 11  # 1.1 * 10 is 11.000000000000002 in floats
    assert column_cap_of(1.0, 3, 2) == 2


def test_layer_cap_equals_the_greedy_on_random_matrices():
    r = np.random.default_rng(2)
    for trial in range(80):
        rows, fan_in = r.integers(1, 12), r.integers(2, 15)
        ties = trial % 2 == 0
        s = (r.integers(0, 4, (rows, fan_in)) if ties else r.random((rows, fan_in))).astype(np.float32)
        n = int(r.integers(1, rows * fan_in + 1))
        cap = column_cap_of(float(r.choice([1.0, 1.5, 2.0, 3.0])), n, fan_in)
        mask = capped_top_n(s, n, cap)
        assert mask.sum() == n and mask.sum(axis=0).max() <= cap
        np.testing.assert_array_equal(mask, greedy(s, n, cap), err_msg=f"trial {trial}")


def test_layer_cap_equals_the_greedy_where_columns_are_long_enough_to_group():
    """Columns of 512 and a cap of 4: each column's top entries come from its row groups, read in place."""
    from fps_onnx.selection.score import _grouped_threshold

    r = np.random.default_rng(4)
    for ties in (False, True):
        s = (r.integers(0, 5, (512, 8)) if ties else r.random((512, 8)) * r.random(8) ** 4).astype(np.float32)
        n = 16
        cap = column_cap_of(2.0, n, 8)
        assert cap == 4 and _grouped_threshold(s.T, cap) is not None
        np.testing.assert_array_equal(capped_top_n(s, n, cap), greedy(s, n, cap), err_msg=f"ties={ties}")


def test_neuron_cap_equals_the_greedy_where_it_fills_every_row(monkeypatch):
    monkeypatch.setattr(score_module, "POOL", 1)
    r = np.random.default_rng(3)
    compared = 0
    for trial in range(60):
        rows, fan_in = r.integers(1, 10), r.integers(2, 12)
        s = (r.integers(0, 3, (rows, fan_in)) if trial % 2 else r.random((rows, fan_in))).astype(np.float32)
        k = int(r.integers(1, fan_in))
        cap = column_cap_of(float(r.choice([1.0, 1.5, 2.0])), k * rows, fan_in)
        mask = capped_top_k(s, k, cap)
        assert (mask.sum(axis=1) == k).all() and mask.sum(axis=0).max() <= cap
        want = greedy(s, k * rows, cap, k)
        if want is not None:
            np.testing.assert_array_equal(mask, want, err_msg=f"trial {trial}")
            compared += 1
    assert compared > 30


def test_neuron_cap_fills_a_row_the_greedy_leaves_short():
    # Rows 0-8 prefer columns 1-3, which fill (cap 5); row 9 took column 0 first and
    # then finds every column it lacks full.
    r = np.random.default_rng(4)
    s = np.ones((10, 4), np.float32)
    s[:9, 1:] = 10 + r.random((9, 3))
    s[9] = [100, 0.5, 0.5, 0.5]
    cap = column_cap_of(1.0, 20, 4)
    assert cap == 5 and greedy(s, 20, cap, k=2) is None
    mask = select_scores(s, SelectConfig(per_neuron=2, column_cap=1))
    assert (mask.sum(axis=1) == 2).all() and mask.sum(axis=0).max() <= cap
    assert mask[9, 0]


def test_cap_through_the_shira_budget_keeps_the_count_and_spreads_columns():
    r = np.random.default_rng(5)
    w = r.standard_normal((16, 24)).astype(np.float32)
    act = np.full(24, 0.1)
    act[:2] = 50.0  # two outlier channels
    st = stats_of(act)
    plain = select_one(w, site(16, 24), st, SelectConfig(shira_r=2))
    capped = select_one(w, site(16, 24), st, SelectConfig(shira_r=2, column_cap=2))
    n = 2 * (16 + 24)
    cap = math.ceil(2 * n / 24)
    assert plain.sum() == capped.sum() == n
    assert plain.sum(axis=0).max() == 16 and capped.sum(axis=0).max() <= cap
    assert capped.sum(axis=0)[:2].tolist() == [cap, cap]  # the outliers still fill up to the cap


@pytest.mark.parametrize("kwargs, match", [
    ({"act_power": -0.5}, "activation power must be a number from 0 to 4"),
    ({"act_power": 4.5}, "activation power"),
    ({"act_power": float("nan")}, "activation power"),
    ({"act_power": True}, "activation power"),
    ({"act_power": 0.5, "method": "magnitude"}, "--act-power scores method fps"),
    ({"column_cap": 0.9}, "column cap must be a number of at least 1"),
    ({"column_cap": float("inf")}, "column cap"),
    ({"column_cap": "2"}, "column cap"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(BudgetError, match=match):
        SelectConfig(**kwargs)


def test_options_are_recorded_for_the_mask_file():
    assert SelectConfig().options == {"act_power": 1.0}
    assert SelectConfig(act_power=0.5, column_cap=2).options == {"act_power": 0.5, "column_cap": 2.0}
    assert SelectConfig(method="random", column_cap=3).options == {"column_cap": 3.0}


# --------------------------------------------------------------------------- low rank


def test_a_rank_as_large_as_the_matrix_scores_like_fps_and_magnitude_to_the_bit():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 20)).astype(np.float32)
    act = rng.random(20) + 0.1
    for method, stats in (("fps", stats_of(act)), ("magnitude", None)):
        plain = select_one(w, site(12, 20), stats, SelectConfig(method=method, fraction=0.2))
        whole = select_one(w, site(12, 20), stats, SelectConfig(method=method, fraction=0.2, low_rank=12))
        assert np.array_equal(plain, whole), method


def test_the_low_rank_scores_follow_the_leading_directions_not_isolated_large_entries():
    """A rank-1 matrix plus a few large isolated entries: plain magnitude keeps the spikes,
    rank 1 keeps the largest entries of the rank-1 part (its outer product's top block)."""
    rng = np.random.default_rng(1)
    u, v = rng.random(40) + 0.5, rng.random(60) + 0.5
    u[:4] += 3.0  # rows 0-3 and columns 0-5 lead
    v[:6] += 3.0
    signs = np.where(rng.random(40) < 0.5, 1.0, -1.0)
    w = (np.outer(u * signs, v)).astype(np.float32)  # rank 1, rows of either sign
    spikes = [(30, 50), (35, 40), (20, 55)]
    for r, c in spikes:
        w[r, c] = 30.0  # above every entry of the rank-1 part (at most 4.5 ** 2), far below its norm
    config = SelectConfig(method="magnitude", level="layer", per_neuron=None, fraction=24 / 2400)
    plain = select_one(w, site(40, 60), None, config)
    assert all(plain[r, c] for r, c in spikes)
    principal = select_one(w, site(40, 60), None, SelectConfig(method="magnitude", level="layer",
                                                               fraction=24 / 2400, low_rank=1))
    assert principal.sum() == 24 and not any(principal[r, c] for r, c in spikes)
    assert principal[:4, :6].all()  # the outer product's 24 largest entries


def test_low_rank_scores_are_seeded_and_activation_weighted():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    act = rng.random(96)
    act[:8] *= 20  # outlier channels
    config = SelectConfig(method="fps", shira_r=2, low_rank=4)
    first = select_one(w, site(64, 96), stats_of(act), config)
    assert np.array_equal(first, select_one(w, site(64, 96), stats_of(act), config))
    assert first.sum() == 2 * (64 + 96)
    flat = select_one(w, site(64, 96), stats_of(np.ones(96)), config)
    assert first[:, :8].sum() > flat[:, :8].sum()  # the statistics weigh in, as in FPS


def test_principal_scores_are_the_truncated_svd_of_the_scaled_weight():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 4)) @ rng.standard_normal((4, 96)) + 0.01 * rng.standard_normal((64, 96)))
    w = w.astype(np.float32)
    act = rng.random(96) + 0.5
    u, sigma, vt = np.linalg.svd(w.astype(np.float64) * act[None, :])
    exact = np.abs((u[:, :4] * sigma[:4]) @ vt[:4])
    got = score_module.principal_scores(w, site(64, 96), act, 4)
    assert got.shape == w.shape and got.dtype == np.float32
    assert np.abs(got - exact).max() < 1e-4 * exact.max()
    assert np.abs(np.abs(w * act[None, :]) - exact).max() > 1e-3 * exact.max()  # the noise is gone


@pytest.mark.parametrize("kwargs, message", [
    ({"low_rank": 0}, "low rank must be a whole number"),
    ({"low_rank": 2.5}, "low rank must be a whole number"),
    ({"low_rank": 4, "method": "random"}, "--low-rank scores methods fps and magnitude"),
    ({"low_rank": 4, "method": "activation"}, "method activation takes none"),
])
def test_a_bad_low_rank_is_one_budget_error(kwargs, message):
    with pytest.raises(BudgetError, match=message):
        SelectConfig(**kwargs)


def test_low_rank_scoring_holds_blas_to_one_thread_per_scoring_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    assert before  # NumPy's BLAS is found, so the next line can fail
    with score_module.blas_per_thread(SelectConfig(low_rank=2)):
        assert blas_threads() == {1}
    with score_module.blas_per_thread(SelectConfig()):
        assert blas_threads() == before
    assert blas_threads() == before
