"""Scores and top-k selection: FPS (Eq. 3/4 of the FPS paper) and its baselines.

Score of weight w[j, k] (PyTorch layout, row j = output neuron, k = input):
``|w| * mean|a_k|`` (norm "l1") or ``|w| * RMS(a_k)`` (norm "l2"). For a Conv
weight w[o, c, i, j] the statistic is that of input channel
``group(o) * C_in/groups + c``, broadcast over the kernel window.

Other methods plug in through :func:`register_method`: "activation" (Eq. 5/6,
the activation statistic alone), "magnitude" (|w| alone) and "random" (seeded
uniform scores) are built in. "gps" (:data:`GRADIENT_METHOD`) is not registered:
its scores are gradients of a PyTorch model, not a function of an ONNX weight,
so ``fps_onnx.pipeline.select`` runs :mod:`fps_onnx.torch.gps` for it, which
selects with this module's budgets (:func:`select_scores`); :func:`method_names`
and :class:`SelectConfig` accept it.

Selection keeps the top K per output neuron (level "neuron") or the top N of
each tensor (level "layer"); the SHiRA budget (``shira_r`` = r) keeps the top
r*(in+out) of each Linear weight [out, in], the adapter size PEFT's SHiRA
requires. Ties go to the higher score, then the lower flat index, so the
result is deterministic.

Two options shape FPS for budgets that would otherwise pile onto a few outlier
input channels: the activation power A scores ``|w| * s ** A`` (A = 1 is FPS,
A = 0 ranks like magnitude), and the column cap C lets no input column (one
position of the fan-in) hold more than ``ceil(C * N / fan_in)`` of a tensor's N
selected entries (neuron level: of the rows' K * rows), taking the
best-scoring entries the cap allows (:func:`capped_top_n`, :func:`capped_top_k`).

The low rank R (methods "fps" and "magnitude") scores the entries of the best
rank-R approximation of ``w * s`` (FPS) or of ``w`` (magnitude: the "principal
weights" of LIFT, Liu et al. 2025) instead of those of the matrix itself: the
entries that carry its R leading directions, not isolated large ones
(:func:`principal_scores`, a seeded randomized SVD).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
from dataclasses import dataclass
from fractions import Fraction
import json
import math
import zlib

import numpy as np

from .._limits import SEED_MAX, shown, whole_number
from ..errors import BudgetError, NumericError, StatsError, quoted
from ..onnx.sites import WeightSite
from ..stats import ChannelStats, no_rows

__all__ = [
    "ACT_POWER_MAX", "DEFAULT_FRACTION", "GRADIENT_METHOD", "LEVELS", "LOW_RANK_MAX", "LOW_RANK_METHODS",
    "METHODS", "NORMS", "Method", "Scratch", "SelectConfig", "blas_per_thread", "capped_top_k",
    "capped_top_n", "channel_statistic", "check_shira", "column_cap_of", "describe_budget", "magnitudes",
    "method_names", "principal_scores", "register_method", "scores", "select_one", "select_scores",
    "spread_top_k", "top_k",
]

NORMS = ("l1", "l2")
LEVELS = ("neuron", "layer")
DEFAULT_FRACTION = 0.005
ACT_POWER_MAX = 4.0
LOW_RANK_MAX = 1 << 16  # far past any weight's smaller side: a bound on what --low-rank asks
#: The methods ``low_rank`` applies to: their scores are |w| times a factor per input column.
LOW_RANK_METHODS = ("fps", "magnitude")
#: Extra columns of the randomized SVD of :func:`principal_scores`, and its power iterations
#: (Halko, Martinsson and Tropp 2011: 5 to 10, and 1 or 2 for slowly decaying spectra).
_OVERSAMPLE, _POWER_ITERATIONS = 8, 2


@dataclass(frozen=True)
class SelectConfig:
    """How to score and how many entries to keep.

    Give at most one of ``per_neuron`` (K per output neuron; at layer level
    N = K * out), ``fraction`` (F of each neuron's fan-in, or of each
    tensor at layer level) and ``shira_r`` (r: the top r*(in+out) of each
    Linear weight [out, in], as PEFT's SHiRA needs; ``level`` left out becomes
    "layer", the top r*(in+out) of the tensor; at level "neuron" they are spread
    over the rows, each row's best ``r*(in+out) // out`` and one more in the rows
    whose next entry scores highest (:func:`spread_top_k`); a Conv weight, or one
    with fewer than r*(in+out) entries, is a BudgetError); with none,
    ``fraction`` = DEFAULT_FRACTION. ``level`` left out is "neuron" otherwise.

    ``act_power`` (A, 0 to ACT_POWER_MAX, method "fps" only): score
    ``|w| * s ** A``; 1 is FPS itself. ``column_cap`` (C >= 1, or None for no
    cap): no input column holds more than ``ceil(C * N / fan_in)`` of a
    tensor's N selected entries (see :func:`column_cap_of`). ``low_rank`` (R >= 1,
    or None; methods "fps" and "magnitude"): score the entries of the best rank-R
    approximation of ``w * s ** A`` (magnitude: of ``w``), see :func:`principal_scores`.
    """

    norm: str = "l1"
    level: str | None = None  # "neuron", or "layer" with shira_r
    per_neuron: int | None = None
    fraction: float | None = None
    method: str = "fps"
    seed: int = 0
    shira_r: int | None = None
    act_power: float = 1.0
    column_cap: float | None = None
    low_rank: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS and self.method != GRADIENT_METHOD:
            raise BudgetError(f"method must be one of {', '.join(method_names())}, not {self.method!r}")
        if self.norm not in NORMS:
            raise BudgetError(f"norm must be one of {', '.join(NORMS)}, not {self.norm!r}")
        if self.level is None:
            object.__setattr__(self, "level", "layer" if self.shira_r is not None else "neuron")
        if self.level not in LEVELS:
            raise BudgetError(f"level must be one of {', '.join(LEVELS)}, not {self.level!r}")
        if sum(b is not None for b in (self.per_neuron, self.fraction, self.shira_r)) > 1:
            raise BudgetError("give one budget, not both: a per-neuron count, a fraction or a SHiRA r")
        if self.shira_r is not None:
            if isinstance(self.shira_r, bool) or not isinstance(self.shira_r, int) or self.shira_r < 1:
                raise BudgetError(f"SHiRA r must be a whole number of at least 1, not {self.shira_r!r}")
            if self.level == "neuron" and self.column_cap is not None:
                raise BudgetError("--column-cap caps the columns of a tensor's top entries: with --shira-r, "
                                  "leave out --level neuron")
        whole_number(self.seed, "the seed", BudgetError, 0, SEED_MAX)
        if self.per_neuron is not None and self.per_neuron < 1:
            raise BudgetError(f"per-neuron count must be at least 1, not {self.per_neuron}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise BudgetError(f"fraction must be in (0, 1], not {self.fraction}")
        if not _real(self.act_power) or not 0.0 <= self.act_power <= ACT_POWER_MAX:
            raise BudgetError(f"activation power must be a number from 0 to {ACT_POWER_MAX:g}, "
                              f"not {shown(self.act_power)}")
        if self.act_power != 1.0 and self.method != "fps":
            raise BudgetError(f"--act-power scores method fps; method {self.method} takes none")
        if self.column_cap is not None and (not _real(self.column_cap) or not 1.0 <= self.column_cap < math.inf):
            raise BudgetError(f"column cap must be a number of at least 1, not {shown(self.column_cap)}")
        if self.low_rank is not None:
            whole_number(self.low_rank, "the low rank", BudgetError, 1, LOW_RANK_MAX)
            if self.method not in LOW_RANK_METHODS:
                raise BudgetError(f"--low-rank scores methods {' and '.join(LOW_RANK_METHODS)}; "
                                  f"method {self.method} takes none")

    @property
    def options(self) -> dict:
        """The scoring options as recorded in mask files: ``act_power`` (method
        fps), ``column_cap`` and ``low_rank`` (when set)."""
        out = {"act_power": float(self.act_power)} if self.method == "fps" else {}
        if self.column_cap is not None:
            out["column_cap"] = float(self.column_cap)
        if self.low_rank is not None:
            out["low_rank"] = int(self.low_rank)
        return out

    @property
    def budget(self) -> dict:
        """The budget as recorded in mask files."""
        if self.per_neuron is not None:
            return {"per_neuron": self.per_neuron}
        if self.shira_r is not None:
            return {"shira_r": self.shira_r}
        return {"fraction": DEFAULT_FRACTION if self.fraction is None else self.fraction}

    @property
    def statistic(self) -> str:
        """The input statistic the norm needs."""
        return "abs_sum" if self.norm == "l1" else "sq_sum"

    def keep(self, rows: int, fan_in: int) -> int:
        """Entries to keep per row (neuron level) or per tensor (layer level).

        For ``shira_r`` that is r*(rows+fan_in) per tensor at either level (at
        level "neuron" spread over the rows: :func:`spread_top_k`);
        :func:`check_shira` says whether a weight can take it.
        """
        budget = self.budget
        if "shira_r" in budget:
            return budget["shira_r"] * (rows + fan_in)
        if "per_neuron" in budget:
            k = budget["per_neuron"]
            if k > fan_in:
                raise BudgetError(f"--per-neuron {k} is larger than a fan-in of {fan_in}")
            return k if self.level == "neuron" else k * rows
        f = budget["fraction"]
        n = fan_in if self.level == "neuron" else rows * fan_in
        return max(1, round(f * n))


def _real(value: object) -> bool:
    """A finite real number (an int or float, not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


@dataclass(frozen=True)
class Method:
    """A selection method: how it scores a weight, and whether it needs activations.

    ``fills_out``: ``score`` takes a keyword ``out``, an array shaped like the
    weight of dtype ``np.result_type(weight.dtype, np.float32)``, and returns
    it filled. ``weighted``: every score is |w| times a factor, so scores that
    are all finite mean a finite weight.
    """

    name: str
    score: Callable[..., np.ndarray]
    needs_activations: bool
    fills_out: bool = False
    weighted: bool = False


METHODS: dict[str, Method] = {}
#: The method of gradients on a PyTorch model (:mod:`fps_onnx.torch.gps`): offered, never registered.
GRADIENT_METHOD = "gps"


def register_method(name: str, score, needs_activations: bool, *, fills_out: bool = False,
                    weighted: bool = False) -> Method:
    """Add a selection method; ``score(weight, site, activation, config)`` returns
    an array shaped like ``weight`` (``activation`` is None when not needed).
    See :class:`Method` for ``fills_out`` and ``weighted``."""
    if not name.isidentifier() or name in METHODS:
        raise ValueError(f"method name {name!r} is not a new identifier")
    METHODS[name] = Method(name, score, needs_activations, fills_out, weighted)
    return METHODS[name]


class Scratch:
    """Work arrays reused from one weight to the next (one per thread): a fresh
    array the size of a large weight costs a page fault per 4 KiB, several
    times what filling it costs."""

    def __init__(self) -> None:
        self._bytes: dict[str, np.ndarray] = {}

    def array(self, name: str, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``, the
        memory of buffer ``name`` (the previous array of that name is overwritten)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._bytes.get(name)
        if buf is None or buf.size < nbytes:
            buf = self._bytes[name] = np.empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


def method_names() -> list[str]:
    """Every method the select command offers (:data:`GRADIENT_METHOD` loads PyTorch when chosen)."""
    return sorted({*METHODS, GRADIENT_METHOD})


def channel_statistic(stats: ChannelStats, norm: str) -> np.ndarray:
    """mean|a| (l1) or RMS(a) (l2) per input channel."""
    return stats.mean_abs() if norm == "l1" else stats.rms()


_TILE = 64


def magnitudes(weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """|w|, C-contiguous whatever the layout of ``weight`` (the per-row partitions
    of top-k run ~3x slower over strided rows), in float32 (float64 weights:
    float64). float32 carries the scores as far as the statistics go: those are
    sums of float32 activations, good to about 1e-6, far coarser than its 6e-8.
    ``out``: the array to fill (C-contiguous, shaped like ``weight``, that dtype).
    """
    if out is None:
        out = np.empty(weight.shape, np.result_type(weight.dtype, np.float32))
    if weight.ndim == 2 and weight.strides[0] < weight.strides[1]:
        # A transposed view ([in, out] storage): copy in tiles, which stay in cache.
        rows, cols = weight.shape
        for i in range(0, rows, _TILE):
            for j in range(0, cols, _TILE):
                np.abs(weight[i : i + _TILE, j : j + _TILE], out=out[i : i + _TILE, j : j + _TILE])
    else:
        np.abs(weight, out=out)
    return out


def scores(weight: np.ndarray, site: WeightSite, activation: np.ndarray,
           out: np.ndarray | None = None) -> np.ndarray:
    """|w| * activation statistic, shaped like ``weight`` (PyTorch layout), in the
    precision of :func:`magnitudes` (into ``out`` when given, as there)."""
    return _scaled(magnitudes(weight, out), site, activation)


def _scaled(w: np.ndarray, site: WeightSite, activation: np.ndarray) -> np.ndarray:
    """``w`` (shaped like the site's weight) times each entry's input statistic, in place."""
    activation = activation.astype(w.dtype)
    if site.layout != "conv":
        w *= activation[None, :]
        return w
    rows, per_group = w.shape[:2]
    group = np.arange(rows) // (rows // site.groups)
    channel = group[:, None] * per_group + np.arange(per_group)[None, :]
    w *= activation[channel].reshape(rows, per_group, *([1] * (w.ndim - 2)))
    return w


def _broadcast(site: WeightSite, activation: np.ndarray, shape) -> np.ndarray:
    return scores(np.ones(shape), site, activation)


def _random(weight: np.ndarray, site: WeightSite, _act, config: SelectConfig) -> np.ndarray:
    rng = np.random.default_rng([config.seed, zlib.crc32(site.key.encode())])
    return rng.random(weight.shape)


register_method("fps", lambda w, site, act, _c, out=None: scores(w, site, act, out),
                needs_activations=True, fills_out=True, weighted=True)
register_method("activation", lambda w, site, act, _c: _broadcast(site, act, w.shape), True)
register_method("magnitude", lambda w, site, _act, _c, out=None: magnitudes(w, out),
                needs_activations=False, fills_out=True, weighted=True)
register_method("random", _random, needs_activations=False)


def top_k(score: np.ndarray, k: int, scratch: Scratch | None = None) -> np.ndarray:
    """Bool mask of the top ``k`` entries of each row of a 2-D array.

    Higher score first, then lower column index: exact and deterministic,
    in O(n) per row (each row's k-th largest, then ties filled from the left).
    The k-th largest comes from the column groups of :func:`_grouped_threshold`
    where k is a small share of the row, else from a partitioned copy, made in
    ``scratch`` when given. The mask is made in ``scratch`` when given: it is
    then good until the next call with that scratch.
    """
    rows, n = score.shape
    if k >= n:
        return np.ones_like(score, dtype=bool)
    found = _grouped_threshold(score, k)
    if found is None:
        part = np.empty(score.shape, score.dtype) if scratch is None else \
            scratch.array("partition", score.shape, score.dtype)
        np.copyto(part, score)
        part.partition(n - k, axis=1)
        threshold = part[:, n - k : n - k + 1]
        # A row keeps more than k exactly when an entry left of its k-th largest
        # (all <= it after the partition) equals it: a tie across the threshold.
        tied = np.flatnonzero(part[:, : n - k].max(axis=1) == threshold[:, 0])
    else:
        threshold, tied = found
    keep = np.greater_equal(score, threshold, out=None if scratch is None else
                            scratch.array("keep", score.shape, bool))
    if tied.size == 0:
        return keep  # the usual case
    sub, at = score[tied], threshold[tied]
    above = sub > at
    equal = sub == at
    need = k - np.count_nonzero(above, axis=1).reshape(-1, 1)
    rank = np.cumsum(equal, axis=1, dtype=np.int32 if n < 2**31 else np.int64)
    keep[tied] = above | (equal & (rank <= need))
    return keep


#: Column groups of :func:`_grouped_threshold`, largest first, and how much smaller than
#: a row the k groups it looks into must be for that to pay.
_GROUPS = (32, 16, 8)
_GROUP_SHARE = 8


def _grouped_threshold(score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(each row's k-th largest score [rows, 1], the rows where another entry equals it),
    or None where this does not pay (k too large a share of the row, no group size
    dividing it). A strided array (a transposed weight: each column's top entries) is
    grouped in place: numpy splits its rows into groups as a view, so no transposed copy.

    Column j of a row of n belongs to group ``j % (n // g)``; the k-th largest of the
    group maxima, t, is at most the row's k-th largest v (k groups hold an entry >= t),
    and every entry above t lies in one of the k groups of the highest maxima, so v is
    the k-th largest entry of those k groups: a partition of k * g entries per row
    instead of n, after one pass that reads the row. A tie at v is an entry of those
    groups besides the k largest that equals v, or more than k groups whose maximum is
    >= v (each holds an entry >= v).
    """
    rows, n = score.shape
    g = next((g for g in _GROUPS if n % g == 0 and k * g * _GROUP_SHARE <= n), None)
    if g is None or k < 1:
        return None
    m = n // g
    groups = score.reshape(rows, g, m)
    best = groups.max(axis=1)  # [rows, m]: the maximum of each group
    top = np.argpartition(best, m - k, axis=1)[:, m - k :]  # the k groups of the highest maxima
    cand = np.take_along_axis(groups, top[:, None, :], axis=2).reshape(rows, g * k)
    cand.partition(g * k - k, axis=1)
    threshold = cand[:, g * k - k : g * k - k + 1]
    tied = (cand[:, : g * k - k].max(axis=1) == threshold[:, 0]) | (
        np.count_nonzero(best >= threshold, axis=1) > k)
    return threshold, np.flatnonzero(tied)


def select_one(
    weight: np.ndarray, site: WeightSite, stats: ChannelStats | None, config: SelectConfig,
    scratch: Scratch | None = None,
) -> np.ndarray:
    """The bool mask of one weight (PyTorch layout). ``scratch``: work arrays to
    reuse (scores, the partitioned copy and, at neuron level without a column
    cap, the mask itself: good until the next call), else fresh ones."""
    check_shira(config, site.shape, f"weight {quoted(site.key)}")
    method = METHODS[config.method]
    missing = None
    if method.needs_activations:
        if stats is None:
            missing = StatsError(f"there are no statistics for weight {quoted(site.key)}")
        elif stats.count < 1:  # all-zero sums would keep the leftmost entries of every row
            missing = StatsError(no_rows(site.key))
    # Scores of a weighted method are finite only where the weight is: its own
    # pass over the weight is needed only to say which is to blame.
    if missing is not None or not method.weighted:
        _check_weight(weight, site)
    if missing is not None:
        raise missing
    act = channel_statistic(stats, config.norm) if method.needs_activations else None
    if act is not None and config.act_power != 1.0:  # A = 1 leaves FPS's scores bit for bit
        act = act ** config.act_power  # 0 ** 0 = 1: A = 0 is magnitude, even on silent channels
    if config.low_rank is not None:
        out = None if scratch is None else scratch.array("score", weight.shape, np.result_type(weight.dtype, np.float32))
        score = principal_scores(weight, site, act, config.low_rank, seed=config.seed, out=out)
    elif scratch is not None and method.fills_out:
        out = scratch.array("score", weight.shape, np.result_type(weight.dtype, np.float32))
        score = method.score(weight, site, act, config, out=out)
    else:
        score = method.score(weight, site, act, config)
    if not np.isfinite(np.sum(score)):  # scores are >= 0: finite exactly when every one is
        if method.weighted:
            _check_weight(weight, site)
        raise NumericError(f"the scores of weight {quoted(site.key)} are not finite (NaN or Inf statistics)")
    return select_scores(score, config, f"weight {quoted(site.key)}", scratch)


def principal_scores(weight: np.ndarray, site: WeightSite, activation: np.ndarray | None, rank: int, *,
                     seed: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """|the best rank-``rank`` approximation of ``w * activation``| (``activation`` None: of
    ``w``), shaped like ``weight``, in the precision of :func:`magnitudes` (into ``out`` when
    given, as there). The matrix is the weight as [rows, fan-in] (a Conv weight's fan-in is its
    channels times its window), its factor per input as :func:`scores` broadcasts it; a rank at
    least the smaller side leaves it whole, so the scores are then those of :func:`scores` (or
    :func:`magnitudes`) to the bit.

    The approximation is a randomized SVD (Halko, Martinsson and Tropp 2011): a Gaussian test
    matrix of ``rank`` + 8 columns, seeded by ``seed`` and the weight's key, and power
    iterations, each re-orthonormalised; so the same weight, statistics and seed give the same
    scores. Memory: ``out`` and [rows or fan-in, rank + 8] blocks.
    """
    dtype = np.result_type(weight.dtype, np.float32)
    if out is None:
        out = np.empty(weight.shape, dtype)
    rows = weight.shape[0]
    matrix = out.reshape(rows, -1)
    np.copyto(out, weight, casting="same_kind")
    if activation is not None:
        _scaled(out, site, activation)
    m, n = matrix.shape
    if rank < min(m, n):
        _low_rank(matrix, rank, np.random.default_rng([seed, zlib.crc32(site.key.encode())]))
    np.abs(out, out=out)
    return out


def blas_per_thread(config: SelectConfig) -> contextlib.AbstractContextManager:
    """Where ``config`` scores with BLAS (``low_rank``): BLAS held to one thread of its own
    while the caller scores several weights in threads (each thread then one core), else
    nothing. BLAS's own threads on top of the scoring threads oversubscribe the cores:
    0.85 B Llama, 2 cores, ``--low-rank 16``: scoring 7.4 s, against 3.9 s so."""
    if config.low_rank is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _low_rank(matrix: np.ndarray, rank: int, rng: np.random.Generator) -> None:
    """Overwrite ``matrix`` [m, n] with its rank-``rank`` approximation (randomized SVD)."""
    m, n = matrix.shape
    width = min(rank + _OVERSAMPLE, m, n)
    y = matrix @ rng.standard_normal((n, width), dtype=np.float32).astype(matrix.dtype, copy=False)
    for _ in range(_POWER_ITERATIONS):
        q = np.linalg.qr(y)[0]
        y = matrix @ np.linalg.qr(matrix.T @ q)[0]
    q = np.linalg.qr(y)[0]  # [m, width]: an orthonormal basis of the leading column space
    u, sigma, vt = np.linalg.svd(q.T @ matrix, full_matrices=False)
    left = (q @ u[:, :rank]) * sigma[:rank]
    np.matmul(left, vt[:rank], out=matrix)


def _check_weight(weight: np.ndarray, site: WeightSite) -> None:
    # A float64 sum of float32/16 values is finite exactly when every value is
    # (and it reads the weight once, in memory order, without a bool copy).
    if not np.isfinite(np.sum(weight, dtype=np.float64)):
        raise NumericError(f"weight {quoted(site.key)} holds NaN or Inf")


def check_shira(config: SelectConfig, shape, key: str = "a weight") -> None:
    """BudgetError unless weight ``key`` of ``shape`` (PyTorch layout) takes the SHiRA
    budget: a Linear weight [out, in] with at least r*(in+out) entries. Nothing
    to check for other budgets."""
    r = config.shira_r
    if r is None:
        return
    shape = [int(d) for d in shape]
    if len(shape) != 2:
        raise BudgetError(f"--shira-r: {key} {shape} is a Conv weight; SHiRA adapts Linear weights only "
                          "(leave it out with --exclude)")
    out, fan_in = shape
    if r * (out + fan_in) > out * fan_in:
        raise BudgetError(f"--shira-r {r}: {key} {shape} has {out * fan_in} entries, fewer than "
                          f"r*(in+out) = {r * (out + fan_in)} (lower r, or leave it out with --exclude)")


def select_scores(score: np.ndarray, config: SelectConfig, key: str = "a weight",
                  scratch: Scratch | None = None) -> np.ndarray:
    """The bool mask of one tensor's scores (PyTorch layout, rows = output neurons);
    ``key`` names the weight in errors; ``scratch``: see :func:`top_k`."""
    check_shira(config, score.shape, key)
    rows = score.shape[0]
    fan_in = score[0].size
    k = config.keep(rows, fan_in)
    if config.column_cap is not None:
        matrix = score.reshape(rows, fan_in)
        if config.level == "neuron":
            cap = column_cap_of(config.column_cap, k * rows, fan_in)
            return capped_top_k(matrix, k, cap, scratch).reshape(score.shape)
        cap = column_cap_of(config.column_cap, k, fan_in)
        return capped_top_n(matrix, k, cap, scratch).reshape(score.shape)
    if config.level == "neuron" and config.shira_r is not None:
        return spread_top_k(score.reshape(rows, fan_in), k, scratch).reshape(score.shape)
    flat = score.reshape(rows, fan_in) if config.level == "neuron" else score.reshape(1, -1)
    return top_k(flat, k, scratch).reshape(score.shape)


def spread_top_k(score: np.ndarray, n: int, scratch: Scratch | None = None) -> np.ndarray:
    """Bool mask of ``n`` entries of a 2-D array spread over its rows: each row's top
    ``n // rows`` (:func:`top_k`), and one more in the ``n % rows`` rows whose next entry
    (their ``n // rows + 1``-th largest) scores highest, ties to the lower row."""
    rows, fan_in = score.shape
    k, extra = divmod(n, rows)
    if extra == 0:
        return top_k(score, k, scratch)
    found = _grouped_threshold(score, k + 1)
    if found is None:
        part = np.partition(score, fan_in - k - 1, axis=1)
        following = part[:, fan_in - k - 1]
    else:
        following = found[0][:, 0]
    order = np.lexsort((np.arange(rows), -following))
    more = np.zeros(rows, dtype=bool)
    more[order[:extra]] = True
    mask = np.zeros(score.shape, dtype=bool)
    mask[more] = top_k(score[more], k + 1)
    if k:
        mask[~more] = top_k(score[~more], k)
    return mask


#: A capped neuron-level selection first looks at each row's best POOL * K entries,
#: and grows that by GROW while the cap leaves a row short.
POOL = 4
GROW = 4


def column_cap_of(cap: float, selected: int, fan_in: int) -> int:
    """The most entries one input column may hold: ``ceil(cap * selected / fan_in)``,
    computed exactly on the decimal value of ``cap`` (1.1 * 10 is 11)."""
    return math.ceil(Fraction(repr(float(cap))) * selected / fan_in)


def capped_top_n(score: np.ndarray, n: int, cap: int, scratch: Scratch | None = None) -> np.ndarray:
    """Bool mask of the best ``n`` entries of a 2-D array [rows, fan_in] such that no
    column holds more than ``cap``: the greedy over entries by higher score, then lower
    flat index, taking each whose column has room (exact: the cap is a partition
    matroid). Needs ``min(cap, rows) * fan_in >= n``.

    The greedy takes from each column a prefix of its own order, so it keeps exactly
    the best ``n`` of the columns' top ``cap`` entries: two partitions (as
    :func:`top_k`), never a sort of the tensor.
    """
    rows, fan_in = score.shape
    if min(cap, rows) * fan_in < n:
        raise BudgetError(f"a column cap of {cap} cannot hold {n} entries of a [{rows}, {fan_in}] weight")
    if cap >= rows:
        return top_k(score.reshape(1, -1), n, scratch).reshape(score.shape)
    candidates = np.flatnonzero(top_k(score.T, cap, scratch).T)  # ascending flat index
    best = top_k(score.reshape(-1)[candidates].reshape(1, -1), n).reshape(-1)
    mask = np.zeros(score.size, bool)
    mask[candidates[best]] = True
    return mask.reshape(score.shape)


def capped_top_k(score: np.ndarray, k: int, cap: int, scratch: Scratch | None = None) -> np.ndarray:
    """Bool mask of ``k`` entries of each row of a 2-D array [rows, fan_in] such that no
    column holds more than ``cap``: the greedy over entries by higher score, then lower
    flat index, taking each whose row and column both have room. A row the greedy
    leaves short (rare: every column it lacks is full) takes its best missing column
    from a row that can move to a column with room. Needs ``cap * fan_in >= k * rows``.

    The greedy runs over each row's best ``POOL * k`` entries (:func:`top_k`), grown
    while a row is left short: when every row fills, the mask is that of whole rows.
    """
    rows, fan_in = score.shape
    if k >= fan_in:
        return np.ones(score.shape, bool)
    if cap * fan_in < k * rows:
        raise BudgetError(f"a column cap of {cap} cannot hold {k} entries in each of {rows} rows "
                          f"of fan-in {fan_in}")
    width = min(fan_in, POOL * k)
    while True:
        r, c = np.nonzero(top_k(score, width, scratch))  # each row's best, in flat order
        order = np.argsort(-score[r, c], kind="stable")
        mask = np.zeros(score.shape, bool)
        row_n, col_n = [0] * rows, [0] * fan_in
        left = rows * k
        for i, j in zip(r[order].tolist(), c[order].tolist()):
            if row_n[i] < k and col_n[j] < cap:
                row_n[i] += 1
                col_n[j] += 1
                mask[i, j] = True
                left -= 1
                if not left:
                    break
        if not left or width == fan_in:
            break
        width = min(fan_in, width * GROW)
    if left:
        _fill_short_rows(mask, score, k, cap)
    return mask


def _fill_short_rows(mask: np.ndarray, score: np.ndarray, k: int, cap: int) -> None:
    counts = mask.sum(axis=0)
    for r in np.flatnonzero(mask.sum(axis=1) < k):
        while np.count_nonzero(mask[r]) < k:
            room = counts < cap
            free = np.flatnonzero(room & ~mask[r])
            if free.size:  # a column with room that this row lacks: its best one
                c = free[np.argmax(score[r, free])]
                mask[r, c] = True
                counts[c] += 1
                continue
            # Every column the row lacks is full; one with room (which the row holds)
            # has fewer holders than the full one, so some holder of the full one can move.
            lacking = np.flatnonzero(~mask[r])
            full = lacking[np.argmax(score[r, lacking])]
            spare = np.flatnonzero(room)[0]
            mover = np.flatnonzero(mask[:, full] & ~mask[:, spare])[0]
            mask[mover, full], mask[mover, spare], mask[r, full] = False, True, True
            counts[spare] += 1


def describe_budget(config: SelectConfig) -> str:
    """The budget as JSON, for file metadata."""
    return json.dumps(config.budget, sort_keys=True)
