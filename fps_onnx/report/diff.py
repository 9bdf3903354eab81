"""How two mask files differ (``fps-onnx diff``): :func:`diff` -> :class:`Diff`.

Per tensor and overall: Jaccard |A∩B|/|A∪B| and kept share |A∩B|/|A| (a tensor
of one file only counts as selecting nothing in the other), the tensors of one
file only, and the differences of the run metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .._limits import read_json
from ..errors import MaskError
from ..selection.maskfile import MaskFile
from .summary import META_FIELDS

__all__ = ["Diff", "Overlap", "TensorDiff", "diff"]


@dataclass(frozen=True)
class Overlap:
    """Entries selected by A, by B and by both."""

    a: int = 0
    b: int = 0
    both: int = 0

    @property
    def union(self) -> int:
        return self.a + self.b - self.both

    @property
    def jaccard(self) -> float:
        """|A∩B| / |A∪B|; 1 when neither selects anything."""
        return self.both / self.union if self.union else 1.0

    @property
    def kept(self) -> float | None:
        """|A∩B| / |A|: the share of A's entries B keeps; None when A selects nothing."""
        return self.both / self.a if self.a else None

    def __add__(self, other: Overlap) -> Overlap:
        return Overlap(self.a + other.a, self.b + other.b, self.both + other.both)


@dataclass(frozen=True)
class TensorDiff:
    key: str
    shape: tuple[int, ...]
    overlap: Overlap


@dataclass(frozen=True)
class Diff:
    """How mask file B differs from mask file A (:func:`diff`)."""

    sources: tuple[str, str]
    tensors: tuple[TensorDiff, ...]  # in both files
    only_a: tuple[TensorDiff, ...]
    only_b: tuple[TensorDiff, ...]
    meta: dict[str, tuple[str | None, str | None]]  # field -> (A's, B's), differing fields only
    same_model: bool | None  # None when a file does not say which model
    overall: Overlap = field(default_factory=Overlap)


def _same(name: str, a: str | None, b: str | None) -> bool:
    if name == "budget" and a is not None and b is not None:
        try:
            return read_json(a, "budget", MaskError) == read_json(b, "budget", MaskError)
        except MaskError:  # not JSON (or not within the limits): compared as text
            pass
    return a == b


def diff(a: MaskFile, b: MaskFile, sources: Sequence[str] = ("A", "B"),
         allow_different_models: bool = False) -> Diff:
    """Overlap of two mask files, per tensor and overall.

    Raises MaskError when the files are of different models (``model_sha256``
    differs; unless ``allow_different_models``) or a tensor has different shapes.
    """
    sources = (str(sources[0]), str(sources[1]))
    sha_a, sha_b = a.meta.get("model_sha256"), b.meta.get("model_sha256")
    same_model = None if not (sha_a and sha_b) else sha_a == sha_b
    if same_model is False and not allow_different_models:
        raise MaskError(f"{sources[0]} and {sources[1]} are masks of different models (model_sha256 "
                        f"{sha_a[:12]} vs {sha_b[:12]}); --allow-different-models compares them anyway")
    common, only_a, only_b = [], [], []
    for key in sorted({*a.keys(), *b.keys()}):
        if key in a and key in b:
            if a.shape(key) != b.shape(key):
                raise MaskError(f"mask {key!r} has shape {list(a.shape(key))} in {sources[0]} and "
                                f"{list(b.shape(key))} in {sources[1]}; cannot compare")
            ia, ib = a.indices(key), b.indices(key)
            both = int(np.intersect1d(ia, ib, assume_unique=True).size)
            common.append(TensorDiff(key, a.shape(key), Overlap(int(ia.size), int(ib.size), both)))
        elif key in a:
            only_a.append(TensorDiff(key, a.shape(key), Overlap(a=a.count(key))))
        else:
            only_b.append(TensorDiff(key, b.shape(key), Overlap(b=b.count(key))))
    meta = {k: (a.meta.get(k), b.meta.get(k)) for k in META_FIELDS
            if not _same(k, a.meta.get(k), b.meta.get(k))}
    overall = sum((t.overlap for t in (*common, *only_a, *only_b)), Overlap())
    return Diff(sources, tuple(common), tuple(only_a), tuple(only_b), meta, same_model, overall)
