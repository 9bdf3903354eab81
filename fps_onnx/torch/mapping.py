"""Mask keys as PyTorch parameter names: matching ONNX weights to a state_dict.

Exporters and third-party tools rename weights (``onnx::MatMul_123``,
``val_13``) and store Linear weights transposed. A trainer needs to know which
of its parameters each mask belongs to, so every ONNX weight is matched to a
parameter of the PyTorch model, in this order:

1. **name**: the initializer is named like a parameter of the same shape;
2. **value**: the weight (in PyTorch layout) or its transpose equals a
   parameter of the same size, exactly or within ``MatchConfig`` tolerances;
   fp16/bf16 ONNX weights are compared after casting the parameter to the
   same precision. Candidates are found through a sorted index of abs-sums,
   so nothing is compared in full twice;
3. **rows**: a packed weight (onnxruntime-genai's ``qkv_proj``: the q, k and
   v weights stacked along the output axis, [q+k+v, in] in PyTorch layout) is
   cut into consecutive row blocks, each equal to one parameter (W or W^T,
   exactly or within tolerance), found block by block from the first row;
4. **scaled**: every output row is the parameter's row times one factor (a
   Conv or Gemm with a BatchNorm folded into it by the exporter);
5. **builder names**: weights named by the onnxruntime-genai model builder
   (initializers ``model.layers.0.attn.qkv_proj.MatMul.weight[_Q4]``, nodes
   ``/model/layers.0/attn/qkv_proj/MatMul[_Q4]``) or by module path (optimum's
   node ``/model/layers.0/self_attn/q_proj/MatMul``) are matched to
   parameters through :data:`BUILDER_NAMES`, packed ones split by rows in the
   table's order, when the shapes fit. The values then confirm the match
   ("exact"/"close"); block-quantized weights (``MatMulNBits``) cannot match
   exactly and count as "quantized" when the dequantized weight is within
   ``MatchConfig.quant_rtol`` of the parameter (RMS error over its std), else
   as "name" (values unconfirmed, warned);
6. **order**: several weights equal to the same several parameters (e.g.
   all-zero initial weights) are paired in graph order.

A weight that matches nothing, or several parameters equally well, is left
unmapped and reported. After mapping, each mask has its parameter's shape:
rows ``a:b`` of a packed weight's [out, in] mask for a row block, transposed
when the parameter is stored [in, out] (GPT-2's ``Conv1D``); several ONNX
weights matched to one parameter (tied weights) become one mask, their logical OR.

Neither torch nor transformers is imported here: a state_dict is any mapping
from names to arrays or tensors.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
import json
import logging
import re

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import MaskError
from ..onnx import graph
from ..selection.maskfile import MaskFile

log = logging.getLogger(__name__)

HOW = ("name", "exact", "close", "quantized", "scaled", "order")

_HALF = {TensorProto.FLOAT16: np.float16}


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


@dataclass(frozen=True)
class Match:
    """One ONNX weight matched to a parameter.

    ``transposed``: the parameter holds the transpose of the weight's PyTorch
    layout (e.g. a Conv1D-style [in, out] parameter), so masks are transposed.
    ``rows``: (start, stop) of the block of the weight's [out, in] rows that is
    this parameter (a packed weight), or None for the whole weight.
    """

    onnx_key: str
    torch_name: str
    how: str
    transposed: bool = False
    same_values: bool = True  # False: matched by name, but the parameter holds other values
    rows: tuple[int, int] | None = None


@dataclass
class MappingReport:
    """What was matched, how, and what was not."""

    matches: dict[str, Match] = field(default_factory=dict)  # ONNX key -> Match
    unmapped: dict[str, str] = field(default_factory=dict)  # ONNX key -> reason
    aliases: dict[str, list[str]] = field(default_factory=dict)  # parameter -> tied names
    parts: dict[str, tuple[Match, ...]] = field(default_factory=dict)  # packed key -> row blocks

    def pairs(self) -> list[tuple[str, Match]]:
        """Every (ONNX key, Match): whole weights, then the row blocks of packed ones."""
        out = list(self.matches.items())
        out += [(key, m) for key, ms in self.parts.items() for m in ms]
        return out

    @property
    def tied(self) -> dict[str, list[str]]:
        """Parameters matched by several ONNX weights: name -> ONNX keys."""
        by_param: dict[str, list[str]] = defaultdict(list)
        for key, m in self.pairs():
            by_param[m.torch_name].append(key)
        return {k: v for k, v in by_param.items() if len(v) > 1}

    def counts(self) -> dict[str, int]:
        """Matches per kind (a packed weight counts once per row block)."""
        out = {how: 0 for how in HOW}
        for _, m in self.pairs():
            out[m.how] += 1
        return {k: v for k, v in out.items() if v}

    def summary(self) -> str:
        how = ", ".join(f"{n} by {k}" for k, n in self.counts().items()) or "none"
        mapped = len(self.matches) + len(self.parts)
        text = f"mapped {mapped} of {mapped + len(self.unmapped)} weights ({how})"
        if self.parts:
            blocks = sum(len(ms) for ms in self.parts.values())
            text += f"; {len(self.parts)} packed weight(s) split into {blocks} parameters"
        if self.tied:
            text += f"; {len(self.tied)} tied parameter(s)"
        if self.unmapped:
            text += f"; unmapped: {', '.join(self.unmapped)}"
        return text

    def to_json(self) -> dict:
        mapped: dict[str, object] = {
            k: {"torch_name": m.torch_name, "how": m.how, "transposed": m.transposed}
            for k, m in self.matches.items()}
        for k, ms in self.parts.items():
            mapped[k] = {"parts": [{"torch_name": m.torch_name, "how": m.how,
                                    "transposed": m.transposed, "rows": list(m.rows)} for m in ms]}
        return {"mapped": mapped, "unmapped": dict(self.unmapped), "tied": self.tied}


# --------------------------------------------------------------------------- matching


def match_weights(
    weights: Mapping[str, np.ndarray],
    state_dict: Mapping[str, object],
    dtypes: Mapping[str, int] | None = None,
    config: MatchConfig = MatchConfig(),
    *,
    sources: Mapping[str, Sequence[str]] | None = None,
    quantized: Collection[str] = (),
) -> MappingReport:
    """Match ONNX weights (key -> array in PyTorch layout) to ``state_dict`` parameters.

    ``dtypes`` gives the ONNX element type of each weight (default float32);
    half-precision weights compare in half precision. ``sources`` gives the
    names of the nodes that consume each weight (for :data:`BUILDER_NAMES`);
    ``quantized`` the keys of dequantized block-quantized weights, which are
    matched by name only and confirmed within ``config.quant_rtol``.
    """
    params, aliases = _parameters(state_dict)
    report = MappingReport(aliases=aliases)
    index = _Index(params)
    canonical = {a: name for name, names in aliases.items() for a in names}
    dtypes = dtypes or {}
    sources = sources or {}
    quantized = set(quantized)
    ambiguous: dict[str, tuple[tuple[str, bool], ...]] = {}
    scaled_todo: list[str] = []
    by_name: list[str] = []
    for key, w in weights.items():
        name = canonical.get(key, key)
        p = params.get(name)
        if p is not None and p.shape in (w.shape, w.shape[::-1]):
            # A square parameter may be stored either way (Conv1D [in, out]): the values say which.
            found = None
            for transposed in (p.shape != w.shape, *((True,) if p.shape == w.shape[::-1] == w.shape else ())):
                cand = p.T if transposed else p
                if key in quantized:
                    same = _quantized_close(w, cand, config.quant_rtol)
                    how = "quantized" if same else "name"
                else:
                    same, how = index.agrees(w, cand, dtypes.get(key, TensorProto.FLOAT), config), "name"
                if found is None or same:
                    found = Match(key, name, how, transposed, same)
                if same:
                    break
            report.matches[key] = found
            continue
        if key in quantized:
            by_name.append(key)
            continue
        hits, how = index.find(w, dtypes.get(key, TensorProto.FLOAT), config)
        if len(hits) == 1:
            report.matches[key] = Match(key, hits[0][0], how, hits[0][1])
        elif hits:
            ambiguous[key] = tuple(hits)
        else:
            scaled_todo.append(key)

    for key in scaled_todo:
        blocks = index.find_blocks(key, weights[key], dtypes.get(key, TensorProto.FLOAT), config)
        if blocks:
            report.parts[key] = blocks
            continue
        hits = index.find_scaled(weights[key], config) if config.scaled else []
        if len(hits) == 1:
            report.matches[key] = Match(key, hits[0][0], "scaled", hits[0][1])
        elif hits:
            ambiguous[key] = tuple(hits)
        else:
            by_name.append(key)

    for key in list(ambiguous):  # equal values: the exporter's names may tell them apart
        found = _by_builder_name(key, weights[key], sources.get(key, ()), params, canonical, index,
                                 dtypes.get(key, TensorProto.FLOAT), False, config)
        if found and len(found) == 1 and (found[0].torch_name, found[0].transposed) in ambiguous[key]:
            report.matches[key] = replace(found[0], rows=None)
            del ambiguous[key]

    for key in by_name:
        found = _by_builder_name(key, weights[key], sources.get(key, ()), params, canonical, index,
                                 dtypes.get(key, TensorProto.FLOAT), key in quantized, config)
        if found is None:
            report.unmapped[key] = ("quantized, and its name fits no parameter" if key in quantized
                                    else "no parameter of this shape holds these values")
        elif len(found) == 1 and found[0].rows == (0, weights[key].shape[0]):
            report.matches[key] = replace(found[0], rows=None)
        else:
            report.parts[key] = found

    _pair_in_order(ambiguous, params, report)
    return report


# --------------------------------------------------------------------------- builder names

#: Weight names of the onnxruntime-genai model builder, as module paths, and the
#: transformers modules they stand for. Each entry is (pattern, alternatives): the
#: first alternative whose parameters exist and fit the weight's shape is taken;
#: an alternative of several modules is a packed weight, their ``.weight`` rows
#: stacked in that order (the builder's ``torch.cat(dim=0)``: q, k, v; gate, up).
#: A path no pattern fits stands for itself (optimum's node names are module paths).
BUILDER_NAMES: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    (r"\.attn\.qkv_proj$", ((".self_attn.qkv_proj",),
                            (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj"))),
    (r"\.attn\.([qkvo])_proj$", ((r".self_attn.\1_proj",),)),
    (r"\.mlp\.gate_up_proj$", ((".mlp.gate_up_proj",), (".mlp.gate_proj", ".mlp.up_proj"))),
)

#: Module path from an initializer name (builder: ``<path>.MatMul.weight[_Q4]``)
#: or a node name (``/<path with slashes>/MatMul[_Q4]``).
_INIT_PATH = re.compile(r"^(?P<path>.+?)\.(?:MatMul|Gemm)\.weight(?:_Q\d+)?$")
_NODE_PATH = re.compile(r"^/?(?P<path>.+?)/(?:MatMul|Gemm|MatMulNBits)(?:_Q\d+)?$")


def module_paths(key: str, nodes: Iterable[str] = ()) -> list[str]:
    """Dotted module paths a weight's initializer name or its nodes' names give."""
    out = []
    for text, pattern in ((key, _INIT_PATH), *((n, _NODE_PATH) for n in nodes)):
        m = pattern.match(text)
        path = m and m.group("path").replace("/", ".")
        if path and path not in out:
            out.append(path)
    return out


def builder_candidates(path: str) -> list[tuple[str, ...]]:
    """Parameter names (one, or several packed in row order) a module path may stand for."""
    out: list[tuple[str, ...]] = []
    for pattern, alternatives in BUILDER_NAMES:
        if re.search(pattern, path):
            out += [tuple(re.sub(pattern, m, path) + ".weight" for m in alt) for alt in alternatives]
    out.append((path + ".weight",))
    return out


def _by_builder_name(key, w, nodes, params, canonical, index, dtype, quantized,
                     config) -> tuple[Match, ...] | None:
    """Row blocks of ``w`` matched through :data:`BUILDER_NAMES`, or None when no names fit
    (float weights: or the values differ; quantized ones are then matched by "name")."""
    if w.ndim != 2:
        return None
    n, k = w.shape
    for path in module_paths(key, nodes):
        for names in builder_candidates(path):
            resolved = [_param_named(name, params, canonical) for name in names]
            if None in resolved:
                continue
            layout = []
            for name in resolved:
                p = params[name]
                if p.ndim != 2 or k not in p.shape:
                    break
                transposed = p.shape[1] != k
                layout.append((name, transposed, p.shape[1] if transposed else p.shape[0]))
            if len(layout) != len(resolved) or sum(rows for *_, rows in layout) != n:
                continue
            out, start = [], 0
            for name, transposed, rows in layout:
                block, p = w[start:start + rows], params[name]
                cand = p.T if transposed else p
                if quantized:
                    same = _quantized_close(block, cand, config.quant_rtol)
                    how = "quantized" if same else "name"
                else:  # float values are the parameter's own: a name alone is not enough
                    how = index.compare(block, cand, dtype, config)
                    same = how is not None
                    if not same:
                        break
                out.append(Match(key, name, how, transposed, same, (start, start + rows)))
                start += rows
            if start == n:
                return tuple(out)
    return None


def _param_named(name: str, params: Mapping[str, np.ndarray], canonical: Mapping[str, str]) -> str | None:
    """The parameter ``name`` is (a tied name: the one its storage is kept under), or the one
    ending with ``"." + name`` (a task model's)."""
    if name in params or name in canonical:
        return canonical.get(name, name)
    hits = {canonical.get(p, p) for p in (*params, *canonical) if p.endswith("." + name)}
    return hits.pop() if len(hits) == 1 else None


def _quantized_close(w: np.ndarray, p: np.ndarray, rtol: float) -> bool:
    """Whether dequantized ``w`` is ``p`` within quantization error: RMS(w - p) <= rtol * std(p)."""
    if w.shape != p.shape or not w.size:
        return False
    a, b = w.astype(np.float64), p.astype(np.float64)
    return bool(np.sqrt(np.mean((a - b) ** 2)) <= rtol * b.std() + 1e-12)


def _pair_in_order(ambiguous, params, report: MappingReport) -> None:
    """Weights equal to the same k parameters, k of them: pair in graph / state_dict order."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for key, hits in ambiguous.items():
        groups[hits].append(key)
    order = {name: i for i, name in enumerate(params)}
    for hits, keys in groups.items():
        if len(keys) == len(hits):
            ranked = sorted(hits, key=lambda h: order[h[0]])
            for key, (name, transposed) in zip(keys, ranked):
                report.matches[key] = Match(key, name, "order", transposed)
            continue
        for key in keys:
            names = ", ".join(h[0] for h in hits[:4])
            report.unmapped[key] = f"ambiguous: equals {len(hits)} parameters ({names})"


def _parameters(state_dict: Mapping[str, object]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Parameters with at least 2 dims as float arrays; tied names folded onto the first."""
    params: dict[str, np.ndarray] = {}
    aliases: dict[str, list[str]] = {}
    seen: dict[tuple, str] = {}
    for name, value in state_dict.items():
        ident = _storage(value)
        if ident is not None and ident in seen:
            aliases.setdefault(seen[ident], [seen[ident]]).append(name)
            continue
        array = _to_numpy(value)
        if array is None or array.ndim < 2 or array.dtype.kind != "f":
            continue
        if ident is not None:
            seen[ident] = name
        params[name] = array
    return params, aliases


def _storage(value) -> tuple | None:
    ptr = getattr(value, "data_ptr", None)
    if ptr is None or not callable(ptr):
        return None
    return (ptr(), tuple(value.shape), tuple(value.stride()), str(value.dtype))


def _to_numpy(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        t = value.detach()
        if not t.is_floating_point():
            return None
        if str(t.dtype) in ("torch.bfloat16",):
            t = t.float()
        return t.cpu().numpy()
    return None


class _Index:
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
        half = _HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half is not None else (config.rtol, config.atol)
        cand = p.astype(half) if half is not None else p
        if np.allclose(w, cand, rtol=rtol, atol=atol):
            return True
        return config.scaled and _row_scaled(w, p, config.scaled_rtol)

    def find(self, w: np.ndarray, dtype: int, config: MatchConfig) -> tuple[list[tuple[str, bool]], str]:
        """Parameters equal to ``w`` or its transpose: [(name, transposed)], and how."""
        sums, names = self.by_size.get(w.size, ((), ()))
        if not names:
            return [], ""
        half = _HALF.get(dtype)
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
        half = _HALF.get(dtype)
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

    def find_blocks(self, key: str, w: np.ndarray, dtype: int,
                    config: MatchConfig) -> tuple[Match, ...] | None:
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
        half = _HALF.get(dtype)
        rtol, atol = (config.half_rtol, config.half_atol) if half or dtype == TensorProto.BFLOAT16 \
            else (config.rtol, config.atol)
        out: list[Match] = []
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
            out.append(Match(key, name, how, transposed, rows=(start, start + rows)))
            start += rows
        return tuple(out) if len(out) > 1 else None

    def find_scaled(self, w: np.ndarray, config: MatchConfig) -> list[tuple[str, bool]]:
        """Parameters whose every output row, times one factor, equals ``w``'s row."""
        if w.ndim < 2 or not np.any(w):
            return []
        names = self.by_size.get(w.size, ((), ()))[1]
        return [(n, False) for n in names
                if self.params[n].shape == w.shape and _row_scaled(w, self.params[n], config.scaled_rtol)]


def _row_scaled(w: np.ndarray, p: np.ndarray, rtol: float) -> bool:
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


# --------------------------------------------------------------------------- masks


def onnx_weights(model: onnx.ModelProto, base_dir: str = "") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Every selectable weight of ``model`` in PyTorch layout (block-quantized
    ones dequantized), and its ONNX element type."""
    sites = graph.find_weights(model)
    values = {site.key: w for site, w in graph.iter_weight_values(model, sites, base_dir)}
    return values, {s.key: s.dtype for s in sites}


def weight_nodes(model: onnx.ModelProto, keys: Collection[str]) -> dict[str, list[str]]:
    """Names of the nodes whose inputs trace back to each of ``keys`` (through
    Transpose/Identity/Cast), for matching by the exporter's node names."""
    from ..onnx.ops import Lookup

    g = model.graph
    lookup = Lookup.of(g)
    out: dict[str, list[str]] = defaultdict(list)
    for node in g.node:
        if not node.name or node.op_type in ("Transpose", "Identity", "Cast"):
            continue
        for name in node.input:
            traced = lookup.constant(name) if name else None
            if traced is not None and traced.key in keys and node.name not in out[traced.key]:
                out[traced.key].append(node.name)
    return dict(out)


def _without_cache_branch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A merged decoder (``If(use_cache_branch)``) with its no-past branch inlined, on a copy,
    as selection measured it; any other model as it is."""
    from ..onnx.decoder import USE_CACHE_BRANCH, inline_cache_branch

    if not any(i.name == USE_CACHE_BRANCH for i in model.graph.input):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return inline_cache_branch(copy)[0]


def map_masks(
    masks: MaskFile,
    state_dict: Mapping[str, object],
    onnx_model: onnx.ModelProto | None = None,
    strict: bool = False,
    config: MatchConfig = MatchConfig(),
    *,
    base_dir: str = "",
) -> tuple[MaskFile, MappingReport]:
    """Re-key ``masks`` by the PyTorch parameter names of ``state_dict``.

    ``onnx_model`` (the model the masks were selected on; a merged decoder is
    read as selection reads it, its no-past branch inlined) supplies the weight
    values for matching by value, and its node names for matching by the
    exporter's names; ``base_dir`` is the folder its external data lies in.
    Without it only names are matched. After mapping each mask has its
    parameter's shape: a packed weight's mask is cut into its row blocks, a
    mask is transposed for a parameter stored [in, out]; tied weights are OR-ed
    into one mask. Unmapped masks are left out of the result and listed in its
    metadata (``unmapped``) and in the report; with ``strict`` they raise
    :class:`MaskError`, as does a mask file that fits nothing in the model.
    """
    if onnx_model is None:
        report = _match_names({k: m.shape for k, m in masks.masks.items()}, state_dict)
    else:
        onnx_model = _without_cache_branch(onnx_model)
        weights, dtypes, quantized = _weights_for(masks, onnx_model, base_dir)
        report = match_weights(weights, state_dict, dtypes, config,
                               sources=weight_nodes(onnx_model, weights), quantized=quantized)

    pairs = report.pairs()
    if not pairs:
        hint = "masks from another model?" if onnx_model is not None else \
            "masks from another model? without the ONNX model only names are matched"
        raise MaskError(f"none of the {len(masks.masks)} masks fits a parameter of the model ({hint})")
    differ = sorted({key for key, m in pairs if not m.same_values})
    if onnx_model is not None and report.unmapped and all(not m.same_values for _, m in pairs):
        raise MaskError(
            f"{len(report.unmapped)} weight(s) match no parameter and the {len(differ)} matched by "
            "name hold other values: the PyTorch model does not have the ONNX model's weights "
            "(masks from another model, or another checkpoint?)"
        )
    if differ:
        log.warning("%d weight(s) matched by name hold other values than in the ONNX model: %s",
                    len(differ), ", ".join(differ[:5]))
    if strict and report.unmapped:
        raise MaskError(f"{len(report.unmapped)} weight(s) could not be mapped to a parameter: "
                        f"{', '.join(report.unmapped)}")
    for key, reason in report.unmapped.items():
        log.warning("not mapped: %s (%s)", key, reason)
    for name, keys in report.tied.items():
        log.info("tied: %s <- %s (masks OR-ed)", name, ", ".join(keys))
    return _rekey(masks, report), report


def _weights_for(masks: MaskFile, model: onnx.ModelProto, base_dir: str = ""):
    """(weights of the masks' keys, their ONNX types, the keys of block-quantized ones)."""
    sites = {s.key: s for s in graph.find_weights(model)}
    for key, mask in masks.masks.items():
        if key not in sites:
            raise MaskError(f"mask {key!r} is not a weight of the ONNX model (masks from another model?)")
        if tuple(sites[key].shape) != mask.shape:
            raise MaskError(f"mask {key!r} has shape {list(mask.shape)}, the ONNX weight "
                            f"{list(sites[key].shape)} (masks from another model?)")
    wanted = {k: sites[k] for k in masks.masks}
    weights = _Weights(graph.weight_reader(model, base_dir), wanted)
    quantized = {k for k, s in wanted.items() if s.quant is not None}
    return weights, {k: s.dtype for k, s in wanted.items()}, quantized


class _Weights(Mapping):
    """Weights in PyTorch layout, read (block-quantized ones dequantized) each time one is
    asked for, so that one weight at a time is in memory, as when scoring."""

    def __init__(self, read, sites: Mapping[str, graph.WeightSite]) -> None:
        self._read, self._sites = read, sites

    def __getitem__(self, key: str) -> np.ndarray:
        return self._read(self._sites[key])

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


def _match_names(shapes: Mapping[str, tuple], state_dict) -> MappingReport:
    params, aliases = _parameters(state_dict)
    report = MappingReport(aliases=aliases)
    canonical = {a: name for name, names in aliases.items() for a in names}
    for key, shape in shapes.items():
        name = canonical.get(key, key)
        p = params.get(name)
        if p is None:
            report.unmapped[key] = "no parameter of this name (give the ONNX model to match by value)"
        elif p.shape not in (shape, shape[::-1]):
            raise MaskError(f"mask {key!r} has shape {list(shape)}, the parameter {list(p.shape)} "
                            "(masks from another model?)")
        else:
            report.matches[key] = Match(key, name, "name", p.shape != shape)
    return report


def _rekey(masks: MaskFile, report: MappingReport) -> MaskFile:
    out_masks: dict[str, np.ndarray] = {}
    tensors: dict[str, dict] = {}
    for key, m in report.pairs():
        mask = masks.masks[key] if m.rows is None else masks.masks[key][m.rows[0]:m.rows[1]]
        mask = mask.T if m.transposed else mask
        entry = dict(masks.tensors.get(key, {}))
        entry.setdefault("onnx_initializer", key)
        if m.torch_name in out_masks:
            out_masks[m.torch_name] = out_masks[m.torch_name] | mask
            entry = tensors[m.torch_name]
            entry.setdefault("tied_onnx_initializers", [entry["onnx_initializer"]]).append(
                masks.tensors.get(key, {}).get("onnx_initializer", key))
        else:
            out_masks[m.torch_name] = np.array(mask, dtype=bool)
            entry.update(torch_name=m.torch_name, match=m.how, shape=list(mask.shape))
            if m.rows is not None:
                entry["torch_rows"] = list(m.rows)
            if m.transposed:
                entry["torch_transposed"] = True
            aliases = report.aliases.get(m.torch_name)
            if aliases:
                entry["torch_aliases"] = aliases
        entry["selected"] = int(out_masks[m.torch_name].sum())
        tensors[m.torch_name] = entry
    meta = dict(masks.meta)
    meta["torch_mapping"] = json.dumps(report.counts(), sort_keys=True)
    meta["unmapped"] = json.dumps(sorted(report.unmapped))
    return MaskFile(out_masks, tensors, meta)


def unmapped_names(report: MappingReport, wanted: Iterable[str]) -> list[str]:
    """Which of ``wanted`` parameter names no ONNX weight was mapped to."""
    got = {m.torch_name for _, m in report.pairs()}
    return [n for n in wanted if n not in got]


def map_to_model(
    masks: MaskFile,
    spec: str,
    onnx_path: str | None = None,
    *,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    strict: bool = False,
    config: MatchConfig = MatchConfig(),
) -> tuple[MaskFile, MappingReport]:
    """:func:`map_masks` onto the model users fine-tune for a SPEC.

    That is ``fps_onnx.models.build_model(spec, task=True)``, the model
    ``fps-onnx train`` builds, so the mapped keys are its parameter names.
    ``onnx_path`` is the ONNX file the masks were selected on (checked by its
    SHA-256); without it only names are matched, a backbone's names standing
    for the task model's (:func:`fps_onnx.models.resolve_keys`).
    """
    from ..onnx.external import model_sha256
    from ..onnx.load import load_checked
    from .models import build_model, rekey_masks

    onnx_model, folder = None, ""
    if onnx_path is not None:
        onnx_model, folder, refs = load_checked(onnx_path)
        want = masks.meta.get("model_sha256")
        if want and want != model_sha256(onnx_path, refs):
            raise MaskError(f"the masks were selected on another ONNX model than {onnx_path}")
    model, _ = build_model(spec, checkpoint, num_classes, img_size, task=True)
    state = model.state_dict()
    if onnx_model is None:
        masks = rekey_masks(masks, state)
    return map_masks(masks, state, onnx_model, strict, config, base_dir=folder)
