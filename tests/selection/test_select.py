"""FPS scores, top-k with ties, budgets."""

from __future__ import annotations

import numpy as np
import pytest

from fps_onnx.errors import BudgetError, NumericError
from fps_onnx.onnx.sites import WeightSite
from fps_onnx.selection.score import Scratch, SelectConfig, scores, select_one, top_k
from fps_onnx.stats import ChannelStats


def linear_site(out=3, inp=4):
    return WeightSite("w", "MatMul", "out_in", (out, inp), inp)


def test_top_k_breaks_ties_by_lower_index():
    s = np.array([[1.0, 2.0, 2.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0]])
    mask = top_k(s, 2)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]


def test_top_k_matches_stable_sort_on_random_scores_with_ties():
    r = np.random.default_rng(0)
    s = r.integers(0, 5, size=(50, 40)).astype(np.float64)  # many ties
    for k in (1, 7, 39, 40):
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        want = np.zeros_like(s, dtype=bool)
        np.put_along_axis(want, order, True, axis=1)
        np.testing.assert_array_equal(top_k(s, k), want)


def test_l1_score_is_weight_times_mean_abs_activation():
    w = np.array([[1.0, -2.0], [0.5, 4.0]])
    stats = ChannelStats()
    stats.add(abs_sum=np.array([6.0, 2.0]), sq_sum=np.array([20.0, 2.0]), count=2)
    site = linear_site(2, 2)
    np.testing.assert_allclose(scores(w, site, stats.mean_abs()), [[3.0, 2.0], [1.5, 4.0]])
    np.testing.assert_allclose(scores(w, site, stats.rms()), np.abs(w) * np.sqrt([10.0, 1.0]))
    mask = select_one(w.astype(np.float32), site, stats, SelectConfig(per_neuron=1))
    assert mask.tolist() == [[True, False], [False, True]]


def test_conv_score_uses_the_channel_of_each_group():
    # 4 output channels, 2 groups, 2 input channels per group -> C_in = 4
    site = WeightSite("c", "Conv", "conv", (4, 2, 1, 1), 4, groups=2)
    w = np.ones((4, 2, 1, 1))
    act = np.array([1.0, 2.0, 3.0, 4.0])
    s = scores(w, site, act)[:, :, 0, 0]
    assert s.tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]


def test_neuron_and_layer_budgets():
    r = np.random.default_rng(1)
    w = r.standard_normal((10, 40)).astype(np.float32)
    stats = ChannelStats()
    stats.add(abs_sum=r.random(40), count=3)
    site = linear_site(10, 40)
    neuron = select_one(w, site, stats, SelectConfig(fraction=0.1))
    assert (neuron.sum(1) == 4).all()
    layer = select_one(w, site, stats, SelectConfig(level="layer", per_neuron=4))
    assert layer.sum() == 40
    layer_f = select_one(w, site, stats, SelectConfig(level="layer", fraction=0.001))
    assert layer_f.sum() == 1  # at least one entry
    best = np.unravel_index(np.argmax(np.abs(w) * stats.mean_abs()), w.shape)
    assert layer_f[best]


@pytest.mark.parametrize("kwargs, message", [
    ({"fraction": 0.0}, "fraction must be in"),
    ({"fraction": 1.5}, "fraction must be in"),
    ({"per_neuron": 0}, "at least 1"),
    ({"per_neuron": 1, "fraction": 0.1}, "not both"),
    ({"norm": "l3"}, "norm must be"),
])
def test_bad_budgets_are_rejected(kwargs, message):
    with pytest.raises(BudgetError, match=message):
        SelectConfig(**kwargs)


def test_k_above_fan_in_is_rejected():
    with pytest.raises(BudgetError, match="larger than a fan-in of 4"):
        SelectConfig(per_neuron=5).keep(3, 4)


def test_nan_weight_is_rejected():
    stats = ChannelStats()
    stats.add(abs_sum=np.ones(4), count=1)
    w = np.ones((3, 4), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(NumericError, match="NaN"):
        select_one(w, linear_site(), stats, SelectConfig())


def _stats(act):
    stats = ChannelStats()
    stats.add(abs_sum=np.asarray(act, float), count=1)
    return stats


def test_baseline_methods_score_as_documented():
    w = np.array([[1.0, -3.0, 2.0], [4.0, 0.1, -0.2]], np.float32)
    stats = _stats([1.0, 0.1, 5.0])
    site = linear_site(2, 3)
    pick = {m: select_one(w, site, stats, SelectConfig(method=m, per_neuron=1)).tolist()
            for m in ("fps", "activation", "magnitude")}
    assert pick["fps"] == [[False, False, True], [True, False, False]]        # |w| * act
    assert pick["activation"] == [[False, False, True], [False, False, True]]  # act only
    assert pick["magnitude"] == [[False, True, False], [True, False, False]]   # |w| only


def test_random_method_is_seeded_and_keeps_the_budget():
    w = np.ones((8, 50), np.float32)
    site = linear_site(8, 50)
    a = select_one(w, site, None, SelectConfig(method="random", per_neuron=5, seed=1))
    b = select_one(w, site, None, SelectConfig(method="random", per_neuron=5, seed=1))
    c = select_one(w, site, None, SelectConfig(method="random", per_neuron=5, seed=2))
    assert (a.sum(1) == 5).all()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_unknown_method_is_rejected():
    with pytest.raises(BudgetError, match="method must be one of .*fps.*magnitude"):
        SelectConfig(method="oracle")


def _stable_top_k(s, k):
    """The documented order (higher score, then lower index) by a stable sort."""
    want = np.zeros(s.shape, bool)
    np.put_along_axis(want, np.argsort(-s, axis=1, kind="stable")[:, :k], True, axis=1)
    return want


def test_top_k_in_reused_work_arrays_matches_stable_sort():
    r = np.random.default_rng(3)
    scratch = Scratch()
    top_k(r.random((64, 300)), 5, scratch)  # leaves larger, unrelated values in the work array
    for s, k in [(r.integers(0, 4, (30, 20)).astype(np.float32), 6),    # ties in most rows
                 (r.random((30, 20)).astype(np.float32), 6),            # no ties
                 (np.vstack([np.full((1, 20), 2.0), r.random((5, 20))]), 3),  # one tied row
                 (r.integers(0, 3, (1, 500)).astype(np.float64), 77)]:  # layer level: one row
        np.testing.assert_array_equal(top_k(s, k, scratch), _stable_top_k(s, k))
        np.testing.assert_array_equal(top_k(s, k), _stable_top_k(s, k))


@pytest.mark.parametrize("method", ["fps", "magnitude", "activation", "random"])
@pytest.mark.parametrize("level", ["neuron", "layer"])
def test_select_one_with_reused_work_arrays_keeps_the_documented_order(method, level):
    r = np.random.default_rng(4)
    scratch = Scratch()
    big = r.standard_normal((40, 70)).astype(np.float32)
    cases = [
        (big, linear_site(40, 70)),  # fills the work arrays first
        (r.integers(-2, 3, (6, 9)).astype(np.float32), linear_site(6, 9)),  # ties
        (r.standard_normal((9, 6)).astype(np.float32).T, WeightSite("t", "MatMul", "in_out", (6, 9), 9)),
        (r.standard_normal((6, 9)).astype(np.float16), linear_site(6, 9)),
        (r.standard_normal((6, 9)), linear_site(6, 9)),  # float64 scores
        (r.standard_normal((4, 2, 3, 3)).astype(np.float32), WeightSite("c", "Conv", "conv", (4, 2, 3, 3), 4, 2)),
    ]
    config = SelectConfig(method=method, level=level, per_neuron=2)
    for w, site in cases:
        stats = _stats(r.random(site.in_features) + (np.arange(site.in_features) % 2))
        got = select_one(w, site, stats, config, scratch)
        np.testing.assert_array_equal(got, select_one(w, site, stats, config))
        if method == "random":
            continue
        act = stats.mean_abs()
        ones = np.ones(w.shape)
        s = {"fps": scores(w, site, act), "magnitude": np.abs(w.astype(np.result_type(w.dtype, np.float32))),
             "activation": scores(ones, site, act)}[method]
        rows = w.shape[0] if level == "neuron" else 1
        k = 2 if level == "neuron" else 2 * w.shape[0]
        want = _stable_top_k(s.reshape(rows, -1), k).reshape(w.shape)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", ["fps", "magnitude"])
def test_a_non_finite_weight_is_named_even_where_its_score_is_nan(method):
    w = np.ones((3, 4), np.float32)
    w[0, 1] = np.inf  # its activation is 0: its score is inf * 0 = NaN
    with pytest.raises(NumericError, match="weight 'w' holds NaN or Inf"):
        select_one(w, linear_site(), _stats([1.0, 0.0, 1.0, 1.0]), SelectConfig(method=method), Scratch())
    with pytest.raises(NumericError, match="weight 'w' holds NaN or Inf"):  # before missing statistics
        select_one(w, linear_site(), None, SelectConfig(method=method))
    with pytest.raises(NumericError, match="scores of weight 'w' are not finite"):
        select_one(np.ones((3, 4), np.float32), linear_site(), _stats([1.0, np.nan, 1.0, 1.0]),
                   SelectConfig(method="fps"), Scratch())


def test_top_k_through_column_groups_matches_stable_sort_on_ties_at_the_threshold():
    """Rows long enough for the column-group search (k * 8 * g <= n): exact, ties included,
    among them ties between a chosen group's maximum and an unchosen group's."""
    from fps_onnx.selection.score import _grouped_threshold

    r = np.random.default_rng(5)
    cases = [r.random((40, 512)).astype(np.float32),                      # no ties
             r.integers(0, 6, (40, 512)).astype(np.float32),              # ties everywhere
             r.integers(0, 400, (40, 1024)).astype(np.float64),           # a few ties
             r.integers(0, 3, (1, 4096)).astype(np.float32)]              # layer level: one row
    tied = np.zeros((3, 512), np.float32)
    tied[:, [300, 40, 6, 5]] = 1.0  # equal maxima of 4 of the 32 column groups (g=16): k=2 picks 2
    cases.append(tied)
    # the same values as strided views (a transposed weight's columns: capped selection reads them in place)
    cases += [np.asfortranarray(c) for c in cases[:3]]
    assert not cases[-1].flags.c_contiguous
    for s in cases:
        for k in (1, 2, 3, s.shape[1] // 130):
            if k < 1:
                continue
            assert _grouped_threshold(s, k) is not None  # the grouped path, not the full partition
            np.testing.assert_array_equal(top_k(s, k), _stable_top_k(s, k), err_msg=f"{s.shape} k={k}")


def test_gps_is_offered_but_never_registered_and_the_docstring_says_so():
    from fps_onnx.selection import score
    import fps_onnx.torch.gps  # noqa: F401 - importing it registers nothing

    assert "gps" in score.method_names() and "gps" not in score.METHODS
    assert SelectConfig(method="gps").method == "gps"
    assert "registers itself" not in score.__doc__ and "is not registered" in score.__doc__


def test_a_shira_budget_at_neuron_level_spreads_r_in_plus_out_over_the_rows():
    from fps_onnx.selection.score import select_scores, spread_top_k

    rng = np.random.default_rng(3)
    score = rng.random((5, 12))
    config = SelectConfig(shira_r=2, level="neuron")
    mask = select_scores(score, config, "w")
    assert mask.sum() == 2 * (5 + 12)  # 34 = 6 per row, and 4 rows with a 7th
    per_row = mask.sum(axis=1)
    assert sorted(per_row.tolist()) == [6, 7, 7, 7, 7]
    ordered = -np.sort(-score, axis=1)
    assert all(set(np.flatnonzero(mask[i])) == set(np.argsort(-score[i])[:per_row[i]]) for i in range(5))
    # the row left with 6 is the one whose 7th best entry scores lowest
    assert per_row[np.argmin(ordered[:, 6])] == 6
    # a budget the rows divide is each row's top k; ties between rows go to the lower row
    assert np.array_equal(spread_top_k(score, 15), top_k(score, 3))
    assert spread_top_k(np.ones((3, 4)), 5).sum(axis=1).tolist() == [2, 2, 1]
    assert spread_top_k(np.ones((3, 4)), 2).sum(axis=1).tolist() == [1, 1, 0]

