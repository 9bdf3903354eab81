"""Reports for people and CI jobs: a :class:`~fps_onnx.report.summary.Summary` or a
:class:`~fps_onnx.report.diff.Diff` as plain text (:func:`to_text`), GitHub-flavoured
markdown (:func:`to_markdown`, a job summary) or a JSON-ready dict (:func:`to_json`),
and a Summary as a PNG (:func:`plot`; matplotlib, ``fps-onnx[plot]``, imported by
:func:`plot` only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import functools
import os

import numpy as np

from .._io import atomic_write
from ..errors import FpsError, MissingDependency, one_line
from .diff import Diff, Overlap, TensorDiff
from .kinds import depth_label
from .summary import Count, Summary, TensorSummary

__all__ = ["PlotDependencyError", "plot", "require_matplotlib", "to_json", "to_markdown", "to_text"]

TOP_TENSORS = 10  # tensors listed in the markdown summaries


def _pct(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _meta_line(meta: dict[str, str], sep: str = ", ", code: bool = False) -> str:
    q = (lambda v: f"`{one_line(v)}`") if code else one_line
    parts = [f"{k} {q(meta[k])}" for k in ("method", "norm", "level", "budget") if k in meta]
    if "num_samples" in meta:
        parts.append(f"{meta['num_samples']} samples")
    if meta.get("model_sha256"):
        parts.append(f"model {q(meta['model_sha256'][:12])}")
    return sep.join(parts)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """A plain-text table, columns padded to their widest cell."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.rjust(w) if rt else c.ljust(w)  # noqa: E731
                              for c, w, rt in zip(r, widths, right)).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]) -> list[str]:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |",
            "|" + "|".join("---:" if r else "---" for r in right) + "|",
            *("| " + " | ".join(map(esc, r)) + " |" for r in rows)]


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _tensor_rows(s: Summary, tensors: Iterable[TensorSummary], code: bool = False):
    stats = any(t.activation for t in s.tensors)
    header = ["tensor", "shape", "selected", "fraction", "depth", "kind"]
    right = [False, False, True, True, True, False]
    if stats:
        header += ["mean|a|", "max|a|", "top10%"]
        right += [True, True, True]
    rows = []
    for t in tensors:
        row = [f"`{one_line(t.key)}`" if code else one_line(t.key), _shape(t.shape), f"{t.selected:,}", _pct(t.fraction),
               depth_label(t.depth), t.kind]
        if stats:
            a = t.activation
            row += ["-", "-", "-"] if a is None else [f"{a.mean:.4g}", f"{a.max:.4g}", _pct(a.top10_share, 1)]
        rows.append(row)
    return header, rows, right


def _group_rows(groups: dict, label) -> list[list[str]]:
    return [[label(k), str(c.tensors), f"{c.selected:,}", f"{c.total:,}", _pct(c.fraction)]
            for k, c in groups.items()]


@functools.singledispatch
def to_text(report) -> str:
    """A plain-text report of a :class:`Summary` or a :class:`Diff`."""
    raise TypeError(f"no text report for {type(report).__name__}")


@functools.singledispatch
def to_markdown(report) -> str:
    """A GitHub-flavoured markdown report of a :class:`Summary` or a :class:`Diff`."""
    raise TypeError(f"no markdown report for {type(report).__name__}")


@functools.singledispatch
def to_json(report) -> dict:
    """A JSON-ready dict of a :class:`Summary` or a :class:`Diff`."""
    raise TypeError(f"no JSON report for {type(report).__name__}")


@to_text.register
def _(s: Summary) -> str:
    c = s.count
    lines = [f"{s.source}: {c.selected:,} of {c.total:,} weights selected ({_pct(c.fraction)}) in "
             f"{c.tensors} tensors", _meta_line(s.meta), ""]
    lines += _table(*_tensor_rows(s, s.tensors))
    group_header = ["tensors", "selected", "total", "fraction"]
    group_right = [True, True, True, True, True]
    lines += ["", *_table(["depth", *group_header], _group_rows(s.by_depth(), depth_label), group_right)]
    lines += ["", *_table(["kind", *group_header], _group_rows(s.by_kind(), str), [False, *group_right[1:]])]
    if any(t.activation for t in s.tensors):
        lines += ["", "mean|a|, max|a|: over input channels of the channel statistic; top10%: share of "
                      "the selected entries on the top 10% of input channels by it (about 10% when the "
                      "selection ignores activations)"]
    return "\n".join(lines)


@to_markdown.register
def _(s: Summary) -> str:
    c = s.count
    lines = [f"### fps-onnx masks: `{s.source}`", "",
             f"**{c.selected:,}** of **{c.total:,}** weights selected (**{_pct(c.fraction)}**) in "
             f"{c.tensors} tensors" + (f" · {_meta_line(s.meta, ' · ', code=True)}" if s.meta else ""), ""]
    kinds, cells = s.kinds, s.by_depth_kind()
    by_depth, by_kind = s.by_depth(), s.by_kind()
    rows = [[depth_label(d)] + [_pct(cells[d, k].fraction) if (d, k) in cells else "" for k in kinds]
            + [_pct(by_depth[d].fraction)] for d in s.depths]
    rows.append(["**all**"] + [_pct(by_kind[k].fraction) for k in kinds] + [f"**{_pct(c.fraction)}**"])
    lines += ["Selected fraction by depth and kind:", "",
              *_md_table(["depth", *kinds, "all"], rows, [True] * (len(kinds) + 2)), ""]
    top = sorted(s.tensors, key=lambda t: (-t.selected, t.key))[:TOP_TENSORS]
    lines += [f"Top {len(top)} tensors by selected entries:", "", *_md_table(*_tensor_rows(s, top, True))]
    if len(s.tensors) > len(top):
        lines += ["", f"<details><summary>All {len(s.tensors)} tensors</summary>", "",
                  *_md_table(*_tensor_rows(s, s.tensors, True)), "", "</details>"]
    return "\n".join(lines) + "\n"


@to_json.register
def _(s: Summary) -> dict:
    def count(c: Count) -> dict:
        return {"tensors": c.tensors, "selected": c.selected, "total": c.total, "fraction": c.fraction}

    def tensor(t: TensorSummary) -> dict:
        out = {"shape": list(t.shape), "selected": t.selected, "total": t.total, "fraction": t.fraction,
               "depth": t.depth, "kind": t.kind}
        if t.activation is not None:
            a = t.activation
            out["activation"] = {"statistic": a.statistic, "mean": a.mean, "max": a.max,
                                 "top10_share": a.top10_share}
        return out

    return {
        "file": s.source,
        "meta": s.meta,
        **count(s.count),
        "tensors": {t.key: tensor(t) for t in s.tensors},
        "by_depth": {depth_label(d): count(c) for d, c in s.by_depth().items()},
        "by_kind": {k: count(c) for k, c in s.by_kind().items()},
        "by_depth_kind": [{"depth": d, "kind": k, **count(c)} for (d, k), c in s.by_depth_kind().items()],
        "neurons_by_selected": {str(k): n for k, n in enumerate(s.per_neuron) if n},
    }


def _diff_rows(tensors: Iterable[TensorDiff], code: bool = False):
    header = ["tensor", "shape", "|A|", "|B|", "|A∩B|", "jaccard", "kept"]
    rows = [[f"`{one_line(t.key)}`" if code else one_line(t.key), _shape(t.shape), f"{t.overlap.a:,}", f"{t.overlap.b:,}",
             f"{t.overlap.both:,}", _num(t.overlap.jaccard), _num(t.overlap.kept)] for t in tensors]
    return header, rows, [False, False, True, True, True, True, True]


def _overall(d: Diff) -> str:
    o = d.overall
    return (f"overall: jaccard {_num(o.jaccard)}, kept {_num(o.kept)} "
            f"(|A∩B| {o.both:,}, |A∪B| {o.union:,}, |A| {o.a:,}, |B| {o.b:,})")


@to_text.register
def _(d: Diff) -> str:
    lines = [f"A: {d.sources[0]}", f"B: {d.sources[1]}"]
    if d.same_model is False:
        lines.append("warning: the masks are of different models")
    if d.meta:
        lines += ["", "metadata differences:"]
        lines += [f"  {k}: {a if a is not None else '-'} -> {b if b is not None else '-'}"
                  for k, (a, b) in d.meta.items()]
    if d.tensors:
        lines += ["", *_table(*_diff_rows(d.tensors))]
    for label, only in (("A", d.only_a), ("B", d.only_b)):
        if only:
            lines += ["", f"only in {label} ({len(only)}): " + ", ".join(one_line(t.key) for t in only)]
    lines += ["", _overall(d)]
    return "\n".join(lines)


@to_markdown.register
def _(d: Diff) -> str:
    o = d.overall
    lines = [f"### fps-onnx diff: `{d.sources[0]}` → `{d.sources[1]}`", "",
             f"**Jaccard {_num(o.jaccard)}**, kept {_num(o.kept)} of A's entries "
             f"(|A∩B| {o.both:,}, |A∪B| {o.union:,}, |A| {o.a:,}, |B| {o.b:,}) over "
             f"{len(d.tensors)} common tensors, {len(d.only_a)} only in A, {len(d.only_b)} only in B", ""]
    if d.same_model is False:
        lines += ["> [!WARNING]", "> The masks are of different models.", ""]
    if d.meta:
        rows = [[k, f"`{a}`" if a is not None else "-", f"`{b}`" if b is not None else "-"]
                for k, (a, b) in d.meta.items()]
        lines += ["Metadata differences:", "", *_md_table(["field", "A", "B"], rows, [False] * 3), ""]
    worst = sorted(d.tensors, key=lambda t: (t.overlap.jaccard, t.key))[:TOP_TENSORS]
    if worst:
        lines += [f"Lowest overlap ({len(worst)} of {len(d.tensors)} tensors):", "",
                  *_md_table(*_diff_rows(worst, True)), ""]
    for label, only in (("A", d.only_a), ("B", d.only_b)):
        if only:
            lines += [f"Only in {label}: " + ", ".join(f"`{one_line(t.key)}`" for t in only), ""]
    return "\n".join(lines)


@to_json.register
def _(d: Diff) -> dict:
    def overlap(o: Overlap) -> dict:
        return {"a": o.a, "b": o.b, "both": o.both, "union": o.union, "jaccard": o.jaccard, "kept": o.kept}

    return {
        "a": d.sources[0],
        "b": d.sources[1],
        "same_model": d.same_model,
        "meta_differences": {k: {"a": a, "b": b} for k, (a, b) in d.meta.items()},
        "overall": overlap(d.overall),
        "tensors": {t.key: {"shape": list(t.shape), **overlap(t.overlap)} for t in d.tensors},
        "only_a": {t.key: {"shape": list(t.shape), "selected": t.overlap.a} for t in d.only_a},
        "only_b": {t.key: {"shape": list(t.shape), "selected": t.overlap.b} for t in d.only_b},
    }


# ---------------------------------------------------------------------------------------------
# figure


class PlotDependencyError(MissingDependency):
    """matplotlib, which --png needs, is not installed."""

    def __init__(self) -> None:
        FpsError.__init__(self, "--png needs matplotlib; install it with: pip install 'fps-onnx[plot]'")


def require_matplotlib() -> None:
    """Raise PlotDependencyError unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotDependencyError() from None


def plot(s: Summary, path: str | os.PathLike) -> None:
    """Write a PNG of ``s`` atomically: the selected fraction by depth (x) and kind (y) as a heat
    strip, and a histogram of selected entries per output neuron (all tensors pooled)."""
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    depths, kinds, cells = s.depths, s.kinds, s.by_depth_kind()
    grid = np.full((len(kinds), len(depths)), np.nan)
    for (d, k), c in cells.items():
        grid[kinds.index(k), depths.index(d)] = 100 * c.fraction
    width = min(22.0, max(9.0, 3.0 + 0.45 * len(depths)))
    fig = Figure(figsize=(width, 3.2 + 0.42 * len(kinds) + 3.0), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[0.6 + 0.42 * len(kinds), 3.0])
    c = s.count
    fig.suptitle(f"{s.source}: {c.selected:,} of {c.total:,} weights selected ({_pct(c.fraction)}), "
                 f"{c.tensors} tensors" + (f"\n{_meta_line(s.meta)}" if s.meta else ""), fontsize=11)

    finite = grid[np.isfinite(grid)]
    # where the largest cell is an outlier (a classifier head selected at 50%), colours span up
    # to the 95th percentile of the cells, so that it does not flatten the rest
    vmax = float(finite.max()) if finite.size else 1.0
    p95 = float(np.percentile(finite, 95)) if finite.size else vmax
    clipped = vmax > 2 * p95 > 0
    vmax = max(p95 if clipped else vmax, 1e-9)
    cmap = colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
    image = top.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                       interpolation="nearest")
    top.set_xticks(range(len(depths)), [depth_label(d) for d in depths],
                   fontsize=8 if len(depths) > 24 else 9)
    top.set_yticks(range(len(kinds)), kinds, fontsize=9)
    top.set_xlabel("depth (layer index; - = none found)")
    top.set_title("selected fraction (%) by depth and kind; grey: no tensor", fontsize=10)
    if len(depths) <= 40:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = min(v, vmax) / vmax < 0.6
                top.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8 if len(depths) <= 16 else 6.5,
                         color="white" if dark else "black")
    fig.colorbar(image, ax=top, label="selected %", pad=0.01, extend="max" if clipped else "neither")

    counts = np.asarray(s.per_neuron, dtype=np.int64)
    k = np.arange(counts.size)
    if counts.size <= 64:  # one bar per count
        bottom.bar(k, counts, width=0.8, color="#3b6ea5")
        bottom.set_xlim(-0.8, max(counts.size, 2) - 0.2)
        if counts.size <= 24:
            bottom.set_xticks(k)
    else:  # log-spaced integer bins (one per count at the low end) on a symlog axis
        edges = np.unique(np.concatenate([[0], np.round(np.geomspace(1, counts.size, 48)).astype(int)]))
        edges = np.append(edges[edges < counts.size], counts.size)
        bottom.stairs(np.add.reduceat(counts, edges[:-1]), edges - 0.5, fill=True, color="#3b6ea5")
        bottom.set_xscale("symlog", linthresh=1)
        bottom.xaxis.set_major_formatter(ScalarFormatter())
    if counts[counts > 0].size and counts.max() / counts[counts > 0].min() > 100:
        bottom.set_yscale("log")
    rows = int(counts.sum())
    mean = float((k * counts).sum() / rows) if rows else 0.0
    bottom.set_title(f"selected entries per output neuron (mask row), all tensors pooled: "
                     f"{rows:,} neurons, mean {mean:.3g}", fontsize=10)
    bottom.set_xlabel("selected entries in the row")
    bottom.set_ylabel("neurons")
    bottom.grid(axis="y", alpha=0.3)

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
