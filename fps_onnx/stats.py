"""Per-weight input statistics: accumulation, merging and the stats file.

The stats file (safetensors) holds, per weight key, ``<key>:abs_sum`` and/or
``<key>:sq_sum`` (float64, [in_features], or [C_in] for Conv) and
``<key>:count`` (int64, [1]: rows the sums run over, at least 1). Metadata:
``format`` = "fps-stats", ``format_version`` = "1", ``model_sha256`` (:func:`fps_onnx.external.model_sha256`),
``num_samples`` (an integer >= 1); a shard's file (``--shard K/N``) also has
``shard`` = "K/N" (0 <= K < N) and ``batch_size``, with which the data was cut.
Every weight holds the same sums. Two files of the same model add up, which is
how sharded calibration merges: among the files merged, no two may be the same
shard, and shards must agree on N and ``batch_size`` (else they do not
partition one run's batches); a missing shard is only logged. A merged file has
no ``shard`` (nor ``batch_size``).

Reading a file checks all of it (names, dtypes, shapes, finite non-negative
sums, counts >= 1); :meth:`Stats.check_fits` checks the lengths against the
model's weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
import itertools
import logging
import os

import numpy as np

from ._io import Outputs, read_safetensors, write_safetensors
from ._limits import INT64_MAX, MAX_SHARDS, whole_number
from .errors import StatsError
from .onnx.sites import SUMS

log = logging.getLogger(__name__)

FORMAT = "fps-stats"
FORMAT_VERSION = "1"
_MISSING_SHOWN = 5  # missing shards named in the warning


@dataclass
class ChannelStats:
    """Sums over rows of one weight's input, per input channel."""

    abs_sum: np.ndarray | None = None
    sq_sum: np.ndarray | None = None
    count: int = 0

    def add(self, abs_sum=None, sq_sum=None, count: int = 0) -> None:
        """Add one batch (or another accumulator's) sums, in float64."""
        for name, value in (("abs_sum", abs_sum), ("sq_sum", sq_sum)):
            if value is None:
                continue
            value = np.asarray(value, dtype=np.float64)
            mine = getattr(self, name)
            setattr(self, name, value.copy() if mine is None else mine + value)
        self.count += int(count)

    def mean_abs(self) -> np.ndarray:
        """mean |a_k| over all rows (Eq. 3)."""
        return self._need("abs_sum", "l1") / max(self.count, 1)

    def rms(self) -> np.ndarray:
        """sqrt(mean a_k^2) over all rows (Eq. 4)."""
        return np.sqrt(self._need("sq_sum", "l2") / max(self.count, 1))

    def _need(self, name: str, norm: str) -> np.ndarray:
        value = getattr(self, name)
        if value is None:
            raise StatsError(f"the statistics hold no {name}, which --norm {norm} needs")
        return value

    @property
    def sums(self) -> frozenset[str]:
        """The sums this accumulator holds ("abs_sum", "sq_sum")."""
        return frozenset(n for n in SUMS if getattr(self, n) is not None)


@dataclass
class Stats:
    """Statistics of every selectable weight of one model."""

    model_sha256: str
    weights: dict[str, ChannelStats] = field(default_factory=dict)
    num_samples: int = 0
    shard: tuple[int, int] | None = None  # (K, N) of a shard's statistics
    batch_size: int | None = None  # the batch size a shard's data was cut with

    @property
    def statistics(self) -> set[str]:
        """The sums every weight holds ("abs_sum", "sq_sum")."""
        held = [set(c.sums) for c in self.weights.values()]
        return set.intersection(*held) if held else set()

    def merge(self, other: Stats) -> Stats:
        """The sum of two shards' statistics of the same model (holding the same sums)."""
        if other.model_sha256 != self.model_sha256:
            raise StatsError("cannot merge statistics of different models")
        _check_shards([self, other], ["the first statistics", "the second"])
        if set(other.weights) != set(self.weights):
            raise StatsError("cannot merge statistics over different weights")
        for key, mine in self.weights.items():
            theirs = other.weights[key].sums
            if mine.sums != theirs:
                raise StatsError(
                    f"cannot merge statistics holding different sums ({_names(mine.sums)} and "
                    f"{_names(theirs)} for {key}): collect every shard with --stats-out")
            size = {np.shape(getattr(c, n)) for c in (mine, other.weights[key]) for n in mine.sums}
            if len(size) > 1:
                raise StatsError(f"cannot merge statistics of {key} over different channel counts")
        num_samples = self.num_samples + other.num_samples
        if num_samples > INT64_MAX:
            raise StatsError(f"cannot merge statistics of {num_samples:,} samples in all: over {INT64_MAX:,}")
        merged = Stats(self.model_sha256, num_samples=num_samples)
        for key, mine in self.weights.items():
            theirs = other.weights[key]
            acc = ChannelStats()
            acc.add(mine.abs_sum, mine.sq_sum, mine.count)
            acc.add(theirs.abs_sum, theirs.sq_sum, theirs.count)
            if acc.count > INT64_MAX:
                raise StatsError(f"cannot merge the statistics of {key}: their counts add up to "
                                 f"{acc.count:,} rows, over {INT64_MAX:,}")
            if not all(np.all(np.isfinite(getattr(acc, n))) for n in acc.sums):
                raise StatsError(f"cannot merge the statistics of {key}: their sums add up past float64")
            merged.weights[key] = acc
        return merged

    def check_fits(self, in_features: Mapping[str, int], source: object = "the statistics") -> None:
        """Raise StatsError unless the statistics are those of exactly these weights
        (key -> in_features, C_in for Conv): every key present, one sum per input channel."""
        for key, c in self.weights.items():
            if key not in in_features:
                raise StatsError(f"{source} has statistics for {key!r}, which is not a selectable "
                                 "weight of the model")
            for name in sorted(c.sums):
                size = np.shape(getattr(c, name))[0]
                if size != in_features[key]:
                    raise StatsError(f"{source}: {key}:{name} has {size} channels, the weight's "
                                     f"input has {in_features[key]}")
        missing = [k for k in in_features if k not in self.weights]
        if missing:
            raise StatsError(f"{source} has no statistics for {missing[0]}")

    def save(self, path: str | os.PathLike, outputs: Outputs | None = None, *,
             metadata: Mapping[str, str] | None = None) -> None:
        """Write the stats file atomically (or stage it in the transaction ``outputs``);
        ``metadata``: more string entries (the format's own keys win)."""
        for key, c in self.weights.items():
            if c.count < 1:
                raise StatsError(no_rows(key))
        tensors = {}
        for key, c in self.weights.items():
            for name in ("abs_sum", "sq_sum"):
                value = getattr(c, name)
                if value is not None:
                    tensors[f"{key}:{name}"] = np.ascontiguousarray(value, dtype=np.float64)
            tensors[f"{key}:count"] = np.array([c.count], dtype=np.int64)
        meta = {
            **dict(metadata or {}),
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_sha256": self.model_sha256,
            "num_samples": str(self.num_samples),
        }
        if self.shard is not None:
            meta["shard"] = "/".join(map(str, self.shard))
        if self.batch_size is not None:
            meta["batch_size"] = str(self.batch_size)
        write_safetensors(path, tensors, meta, outputs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        """Read a stats file, checking its format and every tensor."""
        tensors, meta = read_safetensors(path, FORMAT, FORMAT_VERSION, StatsError, "statistics")
        sha = meta.get("model_sha256")
        if not sha:
            raise StatsError(f"{path}: metadata 'model_sha256' is missing")
        stats = cls(sha, num_samples=whole_number(meta.get("num_samples", ""), f"{path}: metadata 'num_samples'",
                                                  StatsError, 1))
        if "shard" in meta:
            k, _, n = meta["shard"].partition("/")
            where = f"{path}: metadata 'shard' (K/N)"
            n = whole_number(n, f"{where}: N", StatsError, 1, MAX_SHARDS)
            stats.shard = (whole_number(k, f"{where}: K", StatsError, 0, n - 1), n)
        if "batch_size" in meta:
            stats.batch_size = whole_number(meta["batch_size"], f"{path}: metadata 'batch_size'", StatsError, 1)
        for name, value in tensors.items():
            key, _, stat = name.rpartition(":")
            if not key or stat not in ("count", *SUMS):
                raise StatsError(f"{path}: unexpected tensor {name!r}")
            acc = stats.weights.setdefault(key, ChannelStats())
            if stat == "count":
                acc.count = _count(value, f"{path}: {name}")
            else:
                setattr(acc, stat, _sum(value, f"{path}: {name}"))
        if not stats.weights:
            raise StatsError(f"{path} holds no statistics")
        held = None
        for key, acc in stats.weights.items():
            if f"{key}:count" not in tensors:
                raise StatsError(f"{path}: {key} has no count")
            if not acc.sums:
                raise StatsError(f"{path}: {key} has a count but no sums")
            if len({getattr(acc, n).shape for n in acc.sums}) > 1:
                raise StatsError(f"{path}: the sums of {key} differ in length")
            if held is None:
                held = acc.sums
            elif acc.sums != held:
                raise StatsError(f"{path}: some weights hold {_names(held)}, {key} holds "
                                 f"{_names(acc.sums)}")
        return stats


def no_rows(key: str) -> str:
    """The message for a weight whose input had no rows to measure."""
    return (f"no input rows were measured for weight {key} (count 0: is every position of "
            "the calibration data padding?)")


def _names(sums) -> str:
    return " and ".join(sorted(sums)) or "no sums"


def _sum(value: np.ndarray, what: str) -> np.ndarray:
    if value.dtype != np.float64 or value.ndim != 1 or value.size == 0:
        raise StatsError(f"{what} must be a non-empty 1-D float64 vector, not "
                         f"{value.dtype} {list(value.shape)}")
    if not np.all(np.isfinite(value)):
        raise StatsError(f"{what} holds NaN or Inf")
    if np.any(value < 0):
        raise StatsError(f"{what} holds negative sums")
    return value


def _count(value: np.ndarray, what: str) -> int:
    if value.dtype != np.int64 or value.shape not in ((), (1,)):
        raise StatsError(f"{what} must be one int64 count, not {value.dtype} {list(value.shape)}")
    return whole_number(value.reshape(-1)[0], what, StatsError, 1)


def merge_all(stats: Iterable[Stats], sources: Sequence[object] | None = None) -> Stats:
    """Merge statistics shards of one model (``sources``: their names, for messages).

    One file comes back as it is; a merge has no ``shard``."""
    stats = list(stats)
    if not stats:
        raise StatsError("no statistics to merge")
    sources = list(sources) if sources is not None else [f"statistics {i + 1}" for i in range(len(stats))]
    missing = _check_shards(stats, sources)
    if missing and len(stats) > 1:
        log.warning("shard %s not among the statistics merged: they cover part of the data",
                    ", ".join(missing[:_MISSING_SHOWN]) + " ..." * (len(missing) > _MISSING_SHOWN))
    total = stats[0]
    for shard in stats[1:]:
        total = total.merge(shard)
    return total


def _check_shards(stats: Sequence[Stats], sources: Sequence[object]) -> list[str]:
    """Raise StatsError unless the shards among ``stats`` can be parts of one run:
    distinct K, one N, one batch size. Returns the first few shards ("K/N") not among them."""
    seen: dict[tuple[int, int], object] = {}
    first: tuple[Stats, object] | None = None
    for s, source in zip(stats, sources):
        if s.shard is None:
            continue
        k, n = s.shard
        if s.shard in seen:
            raise StatsError(f"cannot merge {seen[s.shard]} with {source}: both are shard {k}/{n}, "
                             "the same part of the data twice")
        seen[s.shard] = source
        if first is None:
            first = (s, source)
            continue
        other, where = first
        if n != other.shard[1]:
            raise StatsError(f"cannot merge {where} (shard {other.shard[0]}/{other.shard[1]}) with "
                             f"{source} (shard {k}/{n}): the shards of one calibration share N")
        if s.batch_size != other.batch_size:
            raise StatsError(f"cannot merge {where} (batch size {other.batch_size}) with {source} "
                             f"(batch size {s.batch_size}): shards cut with different --batch-size "
                             "do not partition the data")
    if first is None:
        return []
    n = first[0].shard[1]
    missing = (f"{k}/{n}" for k in range(n) if (k, n) not in seen)  # N comes from a file: never listed whole
    return list(itertools.islice(missing, _MISSING_SHOWN + 1))

