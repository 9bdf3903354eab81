"""Candidate parameters for an ONNX weight, found by value, and the comparisons.

:class:`ValueIndex` keeps the parameters sorted by (size, abs-sum), so the ones a
weight may equal come from a bisect and nothing is compared in full twice. A
weight equals a parameter exactly, or "close" within the tolerances of
:class:`MatchConfig` (half-precision weights compared in
half); :func:`row_scaled` and :func:`quantized_close` are the looser equalities
of a folded BatchNorm and a block-quantized weight. Used by
:func:`fps_onnx.torch.matching.match_weights`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from onnx import TensorProto

__all__ = ["Block", "HALF", "MatchConfig", "ValueIndex", "quantized_close", "row_scaled"]

#: Half-precision ONNX element types compared in their own precision.
HALF = {TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class MatchConfig:
    """Tolerances of the value match (float32; half-precision weights use ``half_*``)."""

    rtol: float = 1e-5
    atol: float = 1e-7
    half_rtol: float = 2e-3
    half_atol: float = 1e-5
    scaled: bool = True  # also accept per-output-row scaled copies (folded BatchNorm)
    scaled_rtol: float = 1e-4
    quant_rtol: float = 0.2  # quantized: RMS(dequantized - parameter) below this times its std


class Block(NamedTuple):
    """Rows ``rows`` (start, stop) of a packed weight equal parameter ``name`` (``how``)."""

    name: str
    how: str
    transposed: bool
    rows: tuple[int, int]


class ValueIndex:
    """Parameters sorted by (size, abs-sum), so candidates come from a bisect."""

    def __init__(self, params: Mapping[str, np.ndarray]) -> None:
        self.params = params
        self._rows: dict[int, tuple[list[float], list[tuple[str, bool]]]] | None = None
        self.by_size: dict[int, tuple[list[float], list[str]]] = {}
        rows = defaultdict(list)
        for name, p in params.items():
            rows[p.size].append((float(np.abs(p, dtype=np.float64).sum()), name))
        for size, items in rows.items():
            items.sort()
            self.by_size[size] = ([s for s, _ in items], [n for _, n in items])

    def agrees(self, w: np.ndarray, p: np.ndarray, dtype: int, config: MatchConfig) -> bool:
        """Whether ``w`` equals ``p`` (same layout) within tolerance, or is a row-scaled copy."""
        half = HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half is not None else (config.rtol, config.atol)
        cand = p.astype(half) if half is not None else p
        if np.allclose(w, cand, rtol=rtol, atol=atol):
            return True
        return config.scaled and row_scaled(w, p, config.scaled_rtol)

    def find(self, w: np.ndarray, dtype: int, config: MatchConfig) -> tuple[list[tuple[str, bool]], str]:
        """Parameters equal to ``w`` or its transpose: [(name, transposed)], and how."""
        sums, names = self.by_size.get(w.size, ((), ()))
        if not names:
            return [], ""
        half = HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half or dtype == TensorProto.BFLOAT16 \
            else (config.rtol, config.atol)
        target = float(np.abs(w, dtype=np.float64).sum())
        slack = 10 * (rtol * target + atol * w.size) + 1e-9 * target + 1e-12  # summation order
        lo, hi = bisect_left(sums, target - slack), bisect_right(sums, target + slack)
        exact, close = [], []
        for name in names[lo:hi]:
            p = self.params[name]
            for transposed, cand in ((False, p), (True, p.T)) if p.ndim == 2 else ((False, p),):
                if cand.shape != w.shape:
                    continue
                if half is not None:
                    cand = cand.astype(half)
                if np.array_equal(cand, w):
                    exact.append((name, transposed))
                    break
                if np.allclose(w, cand, rtol=rtol, atol=atol):
                    close.append((name, transposed))
                    break
        if exact:
            return exact, "exact"
        return close, "close"

    def compare(self, w: np.ndarray, p: np.ndarray, dtype: int, config: MatchConfig) -> str | None:
        """"exact" or "close" when ``w`` equals ``p`` (same layout; half weights in half), else None."""
        if w.shape != p.shape:
            return None
        half = HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half or dtype == TensorProto.BFLOAT16 \
            else (config.rtol, config.atol)
        cand = p.astype(half) if half is not None else p
        if np.array_equal(cand, w):
            return "exact"
        return "close" if np.allclose(w, cand, rtol=rtol, atol=atol) else None

    def first_rows(self, k: int) -> tuple[list[float], list[tuple[str, bool]]]:
        """Parameters with ``k`` inputs (W, or W^T of an [in, out] one), by their first row's abs-sum."""
        if self._rows is None:
            rows = defaultdict(list)
            for name, p in self.params.items():
                if p.ndim != 2 or not p.size:
                    continue
                rows[p.shape[1]].append((float(np.abs(p[0], dtype=np.float64).sum()), (name, False)))
                rows[p.shape[0]].append((float(np.abs(p[:, 0], dtype=np.float64).sum()), (name, True)))
            self._rows = {}
            for size, items in rows.items():
                items.sort()
                self._rows[size] = ([s for s, _ in items], [h for _, h in items])
        return self._rows.get(k, ([], []))

    def find_blocks(self, w: np.ndarray, dtype: int, config: MatchConfig) -> list[Block] | None:
        """``w`` [out, in] as consecutive row blocks, each equal to one parameter (W or W^T), or None.

        At each offset, the parameters whose first row equals ``w``'s row there
        are compared in full; exactly one must match (exact ones preferred), and
        the blocks must cover every row, with at least two blocks.
        """
        if w.ndim != 2 or w.shape[0] < 2:
            return None
        n, k = w.shape
        sums, hits = self.first_rows(k)
        if not hits:
            return None
        half = HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half or dtype == TensorProto.BFLOAT16 \
            else (config.rtol, config.atol)
        out: list[Block] = []
        start = 0
        while start < n:
            target = float(np.abs(w[start], dtype=np.float64).sum())
            slack = 10 * (rtol * target + atol * k) + 1e-9 * target + 1e-12
            lo, hi = bisect_left(sums, target - slack), bisect_right(sums, target + slack)
            found: dict[str, list[tuple[str, bool, int]]] = {"exact": [], "close": []}
            for name, transposed in hits[lo:hi]:
                p = self.params[name]
                cand = p.T if transposed else p
                rows = cand.shape[0]
                if rows >= n or start + rows > n:
                    continue  # whole weights are matched elsewhere
                how = self.compare(w[start:start + rows], cand, dtype, config)
                if how:
                    found[how].append((name, transposed, rows))
            best, how = (found["exact"], "exact") if found["exact"] else (found["close"], "close")
            if len(best) != 1:
                return None
            name, transposed, rows = best[0]
            out.append(Block(name, how, transposed, (start, start + rows)))
            start += rows
        return out if len(out) > 1 else None

    def find_scaled(self, w: np.ndarray, config: MatchConfig) -> list[tuple[str, bool]]:
        """Parameters whose every output row, times one factor, equals ``w``'s row."""
        if w.ndim < 2 or not np.any(w):
            return []
        names = self.by_size.get(w.size, ((), ()))[1]
        return [(n, False) for n in names
                if self.params[n].shape == w.shape and row_scaled(w, self.params[n], config.scaled_rtol)]


def row_scaled(w: np.ndarray, p: np.ndarray, rtol: float) -> bool:
    """Every output row of ``w`` is one factor times that row of ``p`` (a folded BatchNorm)."""
    if w.shape != p.shape or w.ndim < 2 or not np.any(w):
        return False
    a = w.reshape(w.shape[0], -1).astype(np.float64)
    b = p.reshape(p.shape[0], -1).astype(np.float64)
    bb = np.einsum("ij,ij->i", b, b)
    if np.any(bb == 0) and np.any(a[bb == 0]):
        return False
    scale = np.einsum("ij,ij->i", a, b) / np.where(bb == 0, 1.0, bb)
    resid = np.linalg.norm(a - scale[:, None] * b, axis=1)
    return bool(np.all(resid <= rtol * np.linalg.norm(a, axis=1) + 1e-12))


def quantized_close(w: np.ndarray, p: np.ndarray, rtol: float) -> bool:
    """Whether dequantized ``w`` is ``p`` within quantization error: RMS(w - p) <= rtol * std(p)."""
    if w.shape != p.shape or not w.size:
        return False
    a, b = w.astype(np.float64), p.astype(np.float64)
    return bool(np.sqrt(np.mean((a - b) ** 2)) <= rtol * b.std() + 1e-12)
