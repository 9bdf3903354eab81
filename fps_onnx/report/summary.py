"""Reports on mask files: what a mask selects (``inspect``) and how two masks differ (``diff``).

Pure functions on loaded files, for people and for CI jobs:

* :func:`summarise` (a :class:`MaskFile`, optionally its :class:`Stats` and the node names of
  its ONNX model, :func:`node_names`) -> :class:`Summary`:
  per tensor shape, selected entries and fraction, its layer depth and kind
  (:func:`classify`), totals per depth, per kind and per (depth, kind), and the
  number of output neurons (mask rows) per count of selected entries.
  With statistics, per tensor: the mean and the max over input channels of the
  channel statistic (mean|a|; RMS where the file holds only squared sums), and
  ``top10_share``, the share of the selected entries whose input channel is
  among the top 10% of channels by that statistic (ceil(10%) channels, ties to
  the lower index): about 0.1 for a selection blind to activations, towards 1
  when the selection follows the high-activation channels.
* :func:`diff` (two MaskFiles) -> :class:`Diff`: per tensor and overall Jaccard
  |A∩B|/|A∪B| and kept share |A∩B|/|A| (a tensor of one file only counts as
  selecting nothing in the other), the tensors of one file only, and the
  differences of the run metadata.
* :func:`to_text`, :func:`to_markdown` (a GitHub job summary), :func:`to_json`
  for either; :func:`plot` writes a PNG of a Summary (matplotlib, ``fps-onnx[plot]``).

Nothing here imports PyTorch; matplotlib is imported by :func:`plot` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
import functools
import math
import os
import re

import numpy as np

from .._io import atomic_write
from .._limits import read_json
from ..errors import FpsError, MaskError, MissingDependency, StatsError
from ..selection.maskfile import MaskFile
from ..stats import ChannelStats, Stats

META_FIELDS = ("model_sha256", "method", "norm", "level", "budget", "num_samples")
TOP_SHARE = 0.10  # top10_share: the top 10% of input channels by the statistic
TOP_TENSORS = 10  # tensors listed in the markdown summaries

# Kinds, in display order.
KINDS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
         "conv", "lm_head", "other")

_S = r"[._]"  # separator in a normalised name


def _tok(alternatives: str) -> re.Pattern:
    """Any of ``alternatives`` as whole name components."""
    return re.compile(rf"(?:^|{_S})(?:{alternatives})(?:{_S}|$)")


# Name rules: the first that matches a name gives its kind. Names are lowercased with
# '/', ':' and '-' turned into '.', so PyTorch names, ONNX initializer names and node
# names ("/model/layers.3/self_attn/q_proj/MatMul") read alike. Order matters:
# "attention.output.dense" (BERT) is attn.o before "output.dense" is mlp.down, and
# "attn.c_proj" (GPT-2) is attn.o before "c_proj" is mlp.down.
_KIND_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("lm_head", _tok(r"lm_head|embed_out")),
    ("attn.qkv", _tok(r"qkv|qkv_proj|query_key_value|c_attn|in_proj|wqkv|w_pack")),
    ("attn.o", _tok(rf"o_proj|out_proj|out_lin|to_out|attention{_S}output{_S}dense|attn{_S}c_proj"
                    rf"|attn{_S}proj|attention{_S}wo|self_attn{_S}o")),
    ("attn.q", _tok(r"q_proj|q|query|q_lin|to_q|wq")),
    ("attn.k", _tok(r"k_proj|k|key|k_lin|to_k|wk")),
    ("attn.v", _tok(r"v_proj|v|value|v_lin|to_v|wv")),
    ("mlp.up", _tok(rf"up_proj|gate_up_proj|fc1|c_fc|fc_in|lin1|dense_h_to_4h|wi|intermediate{_S}dense"
                    rf"|feed_forward{_S}w3")),
    ("mlp.gate", _tok(rf"gate_proj|gate|feed_forward{_S}w1")),
    ("mlp.down", _tok(rf"down_proj|fc2|c_proj|fc_out|lin2|dense_4h_to_h|output{_S}dense"
                      rf"|feed_forward{_S}w2|densereludense{_S}wo")),
    ("conv", _tok(r"conv\d*")),
)
# Depth: the index after the first layers/layer/blocks/block/h component.
_DEPTH = re.compile(rf"(?:^|{_S})(?:layers|layer|blocks|block|h){_S}(\d+)(?:{_S}|$)")
_CONV_OPS = ("Conv", "FusedConv")
_PACKED_QKV_OPS = ("Attention",)


def classify(names: Iterable[str], op: str | None = None, ndim: int = 2) -> tuple[int | None, str]:
    """(depth, kind) of a weight from its names (PyTorch name, key, ONNX initializer, node name).

    Kind: "conv" for a Conv op or a mask of 3+ dimensions, "attn.qkv" for the
    packed weight of an ``Attention`` op, else the first rule of ``_KIND_RULES``
    that matches a name (names tried in order), else "other". Depth: the first
    layer index found (``layers.3.``, ``layer.3.``, ``blocks.3.``, ``h.3.``,
    ``layers_3``), else None.
    """
    norm = [re.sub(r"[/:\-]", ".", n.lower()) for n in names if n]
    depth = next((int(m.group(1)) for n in norm if (m := _DEPTH.search(n))), None)
    if op in _CONV_OPS or ndim >= 3:
        return depth, "conv"
    if op in _PACKED_QKV_OPS:
        return depth, "attn.qkv"
    for name in norm:
        for kind, rule in _KIND_RULES:
            if rule.search(name):
                return depth, kind
    return depth, "other"


def _names(key: str, entry: dict, nodes: Mapping[str, Sequence[str]]) -> list[str]:
    names = [entry.get("torch_name"), key, entry.get("onnx_initializer"), entry.get("node")]
    names += list(entry.get("torch_aliases") or []) + list(entry.get("nodes") or [])
    names += list(nodes.get(key, ())) + list(nodes.get(entry.get("onnx_initializer") or "", ()))
    return [n for n in names if isinstance(n, str)]


def node_names(model_path: str | os.PathLike) -> dict[str, list[str]]:
    """Weight key -> names of the nodes that consume it, read from an ONNX file's graph
    (without its weights' bytes): exporter node names ("/blocks.0/attn/qkv/MatMul") tell
    depth and kind where weight names ("onnx::MatMul_416") do not."""
    from ..onnx import ops
    from ..onnx.load import load_graph

    graph = load_graph(model_path)[0].graph
    lookup = ops.Lookup.of(graph)
    names: dict[str, list[str]] = {}
    for node in graph.node:
        site = ops.weight_of(node, lookup)
        if site is not None and node.name:
            names.setdefault(site.key, []).append(node.name)
    return names


# ---------------------------------------------------------------------------------------------
# inspect


@dataclass(frozen=True)
class Count:
    """Selected entries of some tensors."""

    selected: int = 0
    total: int = 0
    tensors: int = 0

    @property
    def fraction(self) -> float:
        return self.selected / self.total if self.total else 0.0

    def __add__(self, other: Count) -> Count:
        return Count(self.selected + other.selected, self.total + other.total,
                     self.tensors + other.tensors)


@dataclass(frozen=True)
class Activation:
    """A tensor's input-channel statistic (mean|a|, or RMS) and where its selection falls."""

    mean: float
    max: float
    top10_share: float | None  # None when nothing is selected
    statistic: str  # "mean_abs" or "rms"


@dataclass(frozen=True)
class TensorSummary:
    key: str
    shape: tuple[int, ...]
    selected: int
    depth: int | None
    kind: str
    activation: Activation | None = None

    @property
    def total(self) -> int:
        return math.prod(self.shape)

    @property
    def fraction(self) -> float:
        return self.selected / self.total if self.total else 0.0


@dataclass(frozen=True)
class Summary:
    """What a mask file selects (:func:`summarise`)."""

    source: str
    meta: dict[str, str]
    tensors: tuple[TensorSummary, ...]  # by depth, kind and key
    per_neuron: tuple[int, ...]  # per_neuron[k]: output neurons (mask rows) with k selected entries

    @property
    def count(self) -> Count:
        return sum((_count(t) for t in self.tensors), Count())

    @property
    def depths(self) -> list[int | None]:
        return sorted({t.depth for t in self.tensors}, key=_depth_order)

    @property
    def kinds(self) -> list[str]:
        present = {t.kind for t in self.tensors}
        return [k for k in KINDS if k in present]

    def by_depth(self) -> dict[int | None, Count]:
        return {d: sum((_count(t) for t in self.tensors if t.depth == d), Count()) for d in self.depths}

    def by_kind(self) -> dict[str, Count]:
        return {k: sum((_count(t) for t in self.tensors if t.kind == k), Count()) for k in self.kinds}

    def by_depth_kind(self) -> dict[tuple[int | None, str], Count]:
        cells: dict[tuple[int | None, str], Count] = {}
        for t in self.tensors:
            cells[t.depth, t.kind] = cells.get((t.depth, t.kind), Count()) + _count(t)
        return dict(sorted(cells.items(), key=lambda kv: (_depth_order(kv[0][0]), KINDS.index(kv[0][1]))))


def _count(t: TensorSummary) -> Count:
    return Count(t.selected, t.total, 1)


def _depth_order(depth: int | None) -> tuple[bool, int]:
    return (depth is None, depth or 0)


def _depth_label(depth: int | None) -> str:
    return "-" if depth is None else str(depth)


def _out_axis(mask: np.ndarray, entry: dict) -> int:
    """Axis of the output neurons: 0 (PyTorch layout), 1 for a mapped weight stored [in, out]."""
    return 1 if mask.ndim == 2 and entry.get("torch_transposed") else 0


def _per_channel(mask: np.ndarray, entry: dict, channels: int) -> np.ndarray | None:
    """Selected entries per input channel (Conv: group(o) * C_in/groups + c), or None when the
    mask's input does not have ``channels`` channels."""
    if mask.ndim == 2:
        counts = mask.sum(axis=_out_axis(mask, entry))
        return counts if counts.size == channels else None
    if mask.ndim < 2 or mask.shape[1] == 0 or channels % mask.shape[1]:
        return None
    per_group = mask.shape[1]
    groups = channels // per_group
    if mask.shape[0] % groups:
        return None
    rows = mask.reshape(groups, mask.shape[0] // groups, per_group, -1)
    return rows.sum(axis=(1, 3)).reshape(-1)


def _activation(mask: np.ndarray, entry: dict, acc: ChannelStats, key: str) -> Activation:
    if acc.abs_sum is not None:
        stat, name = acc.mean_abs(), "mean_abs"
    else:
        stat, name = acc.rms(), "rms"
    counts = _per_channel(mask, entry, stat.size)
    if counts is None:
        raise StatsError(f"the statistics of {key} have {stat.size} channels, which do not fit its "
                         f"mask {list(mask.shape)} (statistics of another model?)")
    top = np.argsort(-stat, kind="stable")[: max(1, math.ceil(TOP_SHARE * stat.size))]
    selected = int(counts.sum())
    share = float(counts[top].sum() / selected) if selected else None
    return Activation(float(stat.mean()), float(stat.max()), share, name)


def summarise(masks: MaskFile, stats: Stats | None = None, source: str = "masks",
              nodes: Mapping[str, Sequence[str]] | None = None) -> Summary:
    """Per-tensor, per-depth and per-kind selection of ``masks``; with ``stats`` (of the same
    model) the activation statistic of each tensor's input and how the selection follows it;
    ``nodes`` (:func:`node_names`) adds node names to read depth and kind from."""
    nodes = nodes or {}
    if stats is not None:
        sha = masks.meta.get("model_sha256")
        if sha and stats.model_sha256 != sha:
            raise StatsError("the statistics are of another model than the masks "
                             f"(model_sha256 {stats.model_sha256[:12]} vs {sha[:12]})")
    tensors = []
    per_neuron = np.zeros(1, dtype=np.int64)
    for key in sorted(masks.masks):
        mask = masks.masks[key]
        entry = masks.tensors.get(key, {})
        depth, kind = classify(_names(key, entry, nodes), entry.get("op"), mask.ndim)
        activation = None
        if stats is not None:
            acc = stats.weights.get(key) or stats.weights.get(entry.get("onnx_initializer") or "")
            if acc is not None:
                activation = _activation(mask, entry, acc, key)
        tensors.append(TensorSummary(key, tuple(mask.shape), int(np.count_nonzero(mask)), depth, kind,
                                     activation))
        if mask.size:
            out = _out_axis(mask, entry)
            rows = np.moveaxis(mask, out, 0).reshape(mask.shape[out], -1)
            counts = np.bincount(rows.sum(axis=1))
            if counts.size > per_neuron.size:
                per_neuron = np.pad(per_neuron, (0, counts.size - per_neuron.size))
            per_neuron[: counts.size] += counts
    tensors.sort(key=lambda t: (_depth_order(t.depth), KINDS.index(t.kind), t.key))
    meta = {k: masks.meta[k] for k in META_FIELDS if k in masks.meta}
    return Summary(source, meta, tuple(tensors), tuple(int(c) for c in per_neuron))


# ---------------------------------------------------------------------------------------------
# diff


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
    for key in sorted(set(a.masks) | set(b.masks)):
        ma, mb = a.masks.get(key), b.masks.get(key)
        if ma is not None and mb is not None:
            if ma.shape != mb.shape:
                raise MaskError(f"mask {key!r} has shape {list(ma.shape)} in {sources[0]} and "
                                f"{list(mb.shape)} in {sources[1]}; cannot compare")
            both = int(np.count_nonzero(ma & mb))
            common.append(TensorDiff(key, ma.shape, Overlap(int(np.count_nonzero(ma)),
                                                            int(np.count_nonzero(mb)), both)))
        elif ma is not None:
            only_a.append(TensorDiff(key, ma.shape, Overlap(a=int(np.count_nonzero(ma)))))
        else:
            only_b.append(TensorDiff(key, mb.shape, Overlap(b=int(np.count_nonzero(mb)))))
    meta = {k: (a.meta.get(k), b.meta.get(k)) for k in META_FIELDS
            if not _same(k, a.meta.get(k), b.meta.get(k))}
    overall = sum((t.overlap for t in (*common, *only_a, *only_b)), Overlap())
    return Diff(sources, tuple(common), tuple(only_a), tuple(only_b), meta, same_model, overall)


# ---------------------------------------------------------------------------------------------
# rendering


def _pct(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _meta_line(meta: dict[str, str], sep: str = ", ", code: bool = False) -> str:
    q = (lambda v: f"`{v}`") if code else (lambda v: v)
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
        row = [f"`{t.key}`" if code else t.key, _shape(t.shape), f"{t.selected:,}", _pct(t.fraction),
               _depth_label(t.depth), t.kind]
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
    lines += ["", *_table(["depth", *group_header], _group_rows(s.by_depth(), _depth_label), group_right)]
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
    rows = [[_depth_label(d)] + [_pct(cells[d, k].fraction) if (d, k) in cells else "" for k in kinds]
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
        "by_depth": {_depth_label(d): count(c) for d, c in s.by_depth().items()},
        "by_kind": {k: count(c) for k, c in s.by_kind().items()},
        "by_depth_kind": [{"depth": d, "kind": k, **count(c)} for (d, k), c in s.by_depth_kind().items()],
        "neurons_by_selected": {str(k): n for k, n in enumerate(s.per_neuron) if n},
    }


def _diff_rows(tensors: Iterable[TensorDiff], code: bool = False):
    header = ["tensor", "shape", "|A|", "|B|", "|A∩B|", "jaccard", "kept"]
    rows = [[f"`{t.key}`" if code else t.key, _shape(t.shape), f"{t.overlap.a:,}", f"{t.overlap.b:,}",
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
            lines += ["", f"only in {label} ({len(only)}): " + ", ".join(t.key for t in only)]
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
            lines += [f"Only in {label}: " + ", ".join(f"`{t.key}`" for t in only), ""]
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
    top.set_xticks(range(len(depths)), [_depth_label(d) for d in depths],
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

