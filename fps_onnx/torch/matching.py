"""Matching ONNX weights to the parameters of a PyTorch state_dict.

Exporters and third-party tools rename weights (``onnx::MatMul_123``,
``val_13``) and store Linear weights transposed. A trainer needs to know which
of its parameters each mask belongs to, so every ONNX weight is matched to a
parameter of the PyTorch model, in this order:

1. **name**: the initializer is named like a parameter of the same shape;
2. **value**: the weight (in PyTorch layout) or its transpose equals a
   parameter of the same size, exactly or within ``MatchConfig`` tolerances;
   fp16/bf16 ONNX weights are compared after casting the parameter to the
   same precision. Candidates are found through a sorted index of abs-sums
   (:mod:`fps_onnx.torch.value_index`), so nothing is compared in full twice;
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
unmapped and reported (:class:`MappingReport`); :mod:`fps_onnx.torch.mapping`
re-keys masks by it.

Neither torch nor transformers is imported here: a state_dict is any mapping
from names to arrays or tensors.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
import re
import sys

import numpy as np
from onnx import TensorProto

from ..errors import MaskError
from .value_index import MatchConfig, ValueIndex, quantized_close

__all__ = ["BUILDER_NAMES", "HOW", "MappingReport", "Match", "builder_candidates", "in_out_parameters",
    "match_names", "match_weights", "module_paths"]

HOW = ("name", "exact", "close", "quantized", "scaled", "order")

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
    index = ValueIndex(params)
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
                    same = quantized_close(w, cand, config.quant_rtol)
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
        blocks = index.find_blocks(weights[key], dtypes.get(key, TensorProto.FLOAT), config)
        if blocks:
            report.parts[key] = tuple(Match(key, b.name, b.how, b.transposed, rows=b.rows) for b in blocks)
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


def match_names(shapes: Mapping[str, tuple], state_dict, in_out: Collection[str] = ()) -> MappingReport:
    """Mask keys (key -> shape, PyTorch [out, in] layout) matched to ``state_dict`` parameters
    by name alone. A parameter named in ``in_out`` is stored [in, out] (transformers' Conv1D;
    :func:`in_out_parameters`): its mask is transposed, square or not. Without that list a
    mask is transposed only where its shape is the parameter's reversed."""
    params, aliases = _parameters(state_dict, values=False)
    report = MappingReport(aliases=aliases)
    canonical = {a: name for name, names in aliases.items() for a in names}
    for key, shape in shapes.items():
        shape = tuple(shape)
        name = canonical.get(key, key)
        p = params.get(name)
        transposed = name in in_out or (p is not None and p.shape != shape)
        if p is None:
            report.unmapped[key] = "no parameter of this name (give the ONNX model to match by value)"
        elif p.shape != (shape[::-1] if transposed else shape):
            raise MaskError(f"mask {key!r} has shape {list(shape)}, the parameter {list(p.shape)}"
                            f"{' (stored [in, out])' if name in in_out else ''} (masks from another model?)")
        else:
            report.matches[key] = Match(key, name, "name", transposed)
    return report


def in_out_parameters(model) -> set[str]:
    """The names (tied ones included) of the weights ``model`` stores [in, out]: those of
    transformers' ``Conv1D`` modules (GPT-2), found without importing transformers."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is None:
        return set()
    return {f"{name}.weight" if name else "weight"
            for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, conv1d)}



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
                    same = quantized_close(block, cand, config.quant_rtol)
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


def _parameters(state_dict: Mapping[str, object],
                values: bool = True) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Parameters with at least 2 dims as float arrays; tied names folded onto the first.
    Without ``values``, a tensor is stood for by an array of its shape that holds no memory
    (matching by name needs the shapes alone: no copy of a bf16 or GPU model)."""
    params: dict[str, np.ndarray] = {}
    aliases: dict[str, list[str]] = {}
    seen: dict[tuple, str] = {}
    for name, value in state_dict.items():
        ident = _storage(value)
        if ident is not None and ident in seen:
            aliases.setdefault(seen[ident], [seen[ident]]).append(name)
            continue
        array = _to_numpy(value) if values or isinstance(value, np.ndarray) else _shape_only(value)
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


def _shape_only(value) -> np.ndarray | None:
    """A float array of a floating tensor's shape, holding no memory (a broadcast scalar)."""
    if not hasattr(value, "detach") or not value.is_floating_point():
        return None
    return np.broadcast_to(np.float32(0), tuple(value.shape))


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
