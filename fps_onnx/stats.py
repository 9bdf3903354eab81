"""Per-weight input statistics: accumulation, merging and the stats file.

The stats file (safetensors) holds, per weight key, ``<key>:abs_sum`` and/or
``<key>:sq_sum`` (float64, [in_features], or [C_in] for Conv) and
``<key>:count`` (int64, [1]: rows the sums run over). Metadata: ``format`` =
"fps-stats", ``format_version`` = "1", ``model_sha256``, ``num_samples``.
Two files of the same model add up, which is how sharded calibration merges.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
import os

import numpy as np

from ._io import read_safetensors, write_safetensors
from .errors import StatsError

FORMAT = "fps-stats"
FORMAT_VERSION = "1"


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


@dataclass
class Stats:
    """Statistics of every selectable weight of one model."""

    model_sha256: str
    weights: dict[str, ChannelStats] = field(default_factory=dict)
    num_samples: int = 0

    @property
    def statistics(self) -> set[str]:
        """The sums every weight holds ("abs_sum", "sq_sum")."""
        held = [{n for n in ("abs_sum", "sq_sum") if getattr(c, n) is not None}
                for c in self.weights.values()]
        return set.intersection(*held) if held else set()

    def merge(self, other: Stats) -> Stats:
        """The sum of two shards' statistics of the same model."""
        if other.model_sha256 != self.model_sha256:
            raise StatsError("cannot merge statistics of different models")
        if set(other.weights) != set(self.weights):
            raise StatsError("cannot merge statistics over different weights")
        merged = Stats(self.model_sha256, num_samples=self.num_samples + other.num_samples)
        for key, mine in self.weights.items():
            theirs = other.weights[key]
            acc = ChannelStats()
            acc.add(mine.abs_sum, mine.sq_sum, mine.count)
            acc.add(theirs.abs_sum, theirs.sq_sum, theirs.count)
            merged.weights[key] = acc
        return merged

    def save(self, path: str | os.PathLike) -> None:
        """Write the stats file atomically."""
        tensors = {}
        for key, c in self.weights.items():
            for name in ("abs_sum", "sq_sum"):
                value = getattr(c, name)
                if value is not None:
                    tensors[f"{key}:{name}"] = np.ascontiguousarray(value, dtype=np.float64)
            tensors[f"{key}:count"] = np.array([c.count], dtype=np.int64)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_sha256": self.model_sha256,
            "num_samples": str(self.num_samples),
        }
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        """Read a stats file, checking its format."""
        tensors, meta = read_safetensors(path, FORMAT, FORMAT_VERSION, StatsError, "statistics")
        stats = cls(meta.get("model_sha256", ""), num_samples=int(meta.get("num_samples", 0)))
        for name, value in tensors.items():
            key, _, stat = name.rpartition(":")
            acc = stats.weights.setdefault(key, ChannelStats())
            if stat == "count":
                acc.count = int(value.reshape(-1)[0])
            elif stat in ("abs_sum", "sq_sum"):
                setattr(acc, stat, value.astype(np.float64))
            else:
                raise StatsError(f"{path}: unexpected tensor {name!r}")
        return stats


def merge_all(stats: Iterable[Stats]) -> Stats:
    """Merge statistics shards of one model."""
    it = iter(stats)
    total = next(it)
    for shard in it:
        total = total.merge(shard)
    return total

