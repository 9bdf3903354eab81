"""Decoder LLMs as their exporters leave them, run as one first generation step.

ONNX files of decoder-only LLMs (optimum's ``model.onnx`` and older
``decoder_model_merged.onnx``, onnxruntime-genai's ``model.onnx``) take more
inputs than the calibration data holds: ``position_ids``, the key/value cache
of every layer (``past_key_values.{i}.key`` / ``.value``, shaped
``[batch, kv_heads, past, head_dim]``) and, in merged files,
``use_cache_branch``. Calibration runs them as the first step of generation:
empty past, positions counted over the attention mask. Everything here is a
pure pass over an ``onnx.ModelProto`` or a feed builder; nothing does I/O.

* :func:`inline_cache_branch` replaces ``If(use_cache_branch)`` by its no-past
  branch, so the weights inside become visible to :func:`fps_onnx.onnx.graph.find_weights`.
* :func:`prune` keeps only the nodes, initializers and inputs that the given
  outputs need (the added statistics), so logits and the cache are never computed.
* :func:`first_step_inputs` declares past length 0 on a copy used for shape
  inference, so that [batch, seq] is followed through attention;
  :func:`lift_row_views` measures a weight on a 2-D row view ([batch*seq, K],
  GPT-2's Conv1D as Gemm) at the [batch, seq, K] tensor it views, where the
  token mask applies.
* :func:`make_feeder` lists the inputs the tool makes and completes each batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
import logging

import numpy as np
import onnx
from onnx import helper

from ..errors import DataError, ModelError
from .edges import Producers, required_input
from .external import subgraphs
from .inputs import InputSpec

__all__ = [
    "USE_CACHE_BRANCH", "TOKEN_IDS", "Feeder", "first_step_inputs", "inline_cache_branch", "is_decoder",
    "is_past", "lift_row_views", "make_feeder", "needs_right_padding", "past_head_sizes",
    "position_ids", "prune", "replace_field",
]

log = logging.getLogger(__name__)

USE_CACHE_BRANCH = "use_cache_branch"
POSITION_IDS = "position_ids"
TOKEN_IDS = "input_ids"
#: Input names of the key/value cache (optimum and onnxruntime-genai: past_key_values.{i}.key).
PAST_PREFIXES = ("past_key_values.", "past_key.", "past_value.", "past.")
#: Position given to padded tokens, by the runtime that made the file (its producer_name):
#: transformers/optimum fill 1 (cumsum - 1, masked_fill 1), onnxruntime-genai 0. Padded
#: positions are masked out of attention and of the statistics, so either is exact.
PAD_POSITION = {"onnxruntime-genai": 0}
DEFAULT_PAD_POSITION = 1


def is_past(name: str) -> bool:
    """Whether ``name`` is a key/value cache input."""
    return name.startswith(PAST_PREFIXES)


def is_decoder(model: onnx.ModelProto) -> bool:
    """Whether ``model`` takes token ids and a key/value cache or position ids."""
    names = {i.name for i in model.graph.input}
    return TOKEN_IDS in names and (POSITION_IDS in names or any(is_past(n) for n in names))


# --------------------------------------------------------------------------- If(use_cache_branch)


def inline_cache_branch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Replace each ``If(use_cache_branch)`` node by its no-past (else) branch, in place.

    Branch nodes join the main graph where the If was (their outer-scope names
    are main-graph names), branch initializers move to the main graph, and each
    branch output becomes the If output of the same position. Afterwards
    ``use_cache_branch`` and the past inputs no node reads any more are dropped.
    Returns (model, whether anything changed).
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    if USE_CACHE_BRANCH not in inputs:
        return model, False
    changed = False
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[:1] == [USE_CACHE_BRANCH]:
            branch = next((a.g for a in node.attribute if a.name == "else_branch"), None)
            if branch is None:
                raise ModelError(f"If node {node.name!r} has no else_branch")
            nodes += _inline(graph, node, branch)
            changed = True
        else:
            nodes.append(node)
    if not changed:
        return model, False
    del graph.node[:]
    graph.node.extend(nodes)
    read = _names_read(graph.node) | {o.name for o in graph.output}
    unused = [i for i in graph.input
              if i.name not in read and (i.name == USE_CACHE_BRANCH or is_past(i.name))]
    for vi in unused:
        graph.input.remove(vi)
    log.info("merged decoder: the no-past branch of If(%s) is run (%d inputs dropped)",
             USE_CACHE_BRANCH, len(unused))
    return model, True


def _inline(graph: onnx.GraphProto, node: onnx.NodeProto, branch: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes replacing ``node``; ``branch``'s initializers and value_info join ``graph``."""
    outer = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    outer |= {o for n in graph.node if n is not node for o in n.output}
    defined = {o for n in branch.node for o in n.output} | {t.name for t in branch.initializer}
    results = dict(zip((o.name for o in branch.output), node.output))
    # A branch name may equal an outer one only where it is the If output it becomes.
    renames = {n: f"{n}::{branch.name or 'else'}" for n in defined & outer
               if results.get(n) != n}
    nodes = []
    for inner in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        _rename(copy, renames)
        nodes.append(copy)
    for tensor in branch.initializer:
        moved = graph.initializer.add()
        moved.CopyFrom(tensor)
        moved.name = renames.get(tensor.name, tensor.name)
    for tensor in branch.sparse_initializer:
        graph.sparse_initializer.add().CopyFrom(tensor)
    for vi in branch.value_info:
        if vi.name not in renames:
            graph.value_info.add().CopyFrom(vi)
    for out, target in zip(branch.output, node.output):
        source = renames.get(out.name, out.name)
        if target and source != target:
            nodes.append(helper.make_node("Identity", [source], [target], name=f"{target}::inlined"))
    return nodes


def _rename(node: onnx.NodeProto, renames: Mapping[str, str]) -> None:
    if not renames:
        return
    for i, name in enumerate(node.input):
        node.input[i] = renames.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = renames.get(name, name)
    for attr in node.attribute:
        for sub in subgraphs(attr):
            for inner in sub.node:
                _rename(inner, renames)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every name ``node`` reads, outer-scope names of its subgraphs included."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for sub in subgraphs(attr):
            names |= _names_read(sub.node)
    return names


def _names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        names |= _reads(node)
    return names


# --------------------------------------------------------------------------- prune


def prune(model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``keep``, computing nothing else.

    Every node none of those outputs depends on is removed, and so are the
    initializers, inputs and value_info nobody reads any more. The original
    outputs (logits, present.*, a classifier's head) and the nodes only they
    need are gone; ``model`` itself is left as it is.
    """
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    wanted = set(keep)
    missing = wanted - {o.name for o in graph.output}
    if missing:
        raise ValueError(f"not graph outputs: {sorted(missing)[:3]}")
    needed = set(wanted)
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= _reads(node)
    kept.reverse()
    outputs = [o for o in graph.output if o.name in wanted]
    replace_field(graph.output, outputs)
    replace_field(graph.node, kept)
    replace_field(graph.initializer, [t for t in graph.initializer if t.name in needed])
    replace_field(graph.sparse_initializer,
             [t for t in graph.sparse_initializer if t.values.name in needed])
    replace_field(graph.input, [i for i in graph.input if i.name in needed])
    replace_field(graph.value_info, [v for v in graph.value_info if v.name in needed])
    return pruned


def replace_field(field, items: list) -> None:
    """Set a repeated message field to copies of ``items``."""
    copies = [type(item)() for item in items]
    for copy, item in zip(copies, items):
        copy.CopyFrom(item)
    del field[:]
    field.extend(copies)


# --------------------------------------------------------------------------- shape inference


def first_step_inputs(graph: onnx.GraphProto, mask_input: str | None) -> bool:
    """Declare the inputs of ``graph`` (a copy made for shape inference) as on a
    first generation step: past length 0 in every past input, and the sequence
    axis of the mask that of ``input_ids``. In place; returns whether ``graph``
    has past inputs (nothing is changed otherwise).

    Exporters declare the mask as [batch, past + seq], so without this no
    activation's [batch, seq] axes would match the mask's.
    """
    pasts = [vi for vi in graph.input if is_past(vi.name) and _rank(vi) >= 3]
    if not pasts:
        return False
    for vi in pasts:
        dims = vi.type.tensor_type.shape.dim
        names = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims]
        axis = past_axis(names)
        if axis is not None:
            dims[axis].Clear()
            dims[axis].dim_value = 0
    by_name = {vi.name: vi for vi in graph.input}
    ids, mask = by_name.get(TOKEN_IDS), by_name.get(mask_input or "")
    if ids is not None and mask is not None and _rank(ids) == 2 and _rank(mask) == 2:
        for i in range(2):
            mask.type.tensor_type.shape.dim[i].CopyFrom(ids.type.tensor_type.shape.dim[i])
    return True


def _rank(vi: onnx.ValueInfoProto) -> int:
    t = vi.type.tensor_type
    return len(t.shape.dim) if vi.type.HasField("tensor_type") and t.HasField("shape") else -1


def lift_row_views(model: onnx.ModelProto, sites: Sequence, shapes: Mapping[str, list],
                   mask_input: str) -> list:
    """``sites`` with each input that is a 2-D row view ``Reshape(x) -> [rows, K]`` of
    a token activation ``x`` [batch, seq, ..., K] (leading axes those of
    ``mask_input``) replaced by ``x``: the per-channel sums are the same, and
    padded positions can be left out of ``x``'s. ``shapes``: inferred shapes by name."""
    mask_shape = shapes.get(mask_input)
    if mask_shape is None or len(mask_shape) != 2:
        return list(sites)
    producers = Producers.of(model.graph)
    lifted = []
    for site in sites:
        acts = []
        for act in site.activations:
            node = producers.get(act.tensor)
            if act.axis == -1 and node is not None and node.op_type == "Reshape" \
                    and node.domain in ("", "ai.onnx"):
                src, dst = shapes.get(required_input(node)), shapes.get(act.tensor)
                if (src is not None and dst is not None and len(dst) == 2 and len(src) >= 3
                        and src[-1] == dst[-1] == site.in_features
                        and list(src[:2]) == list(mask_shape)):
                    act = replace(act, tensor=node.input[0])
            if act not in acts:
                acts.append(act)
        lifted.append(replace(site, activations=tuple(acts)))
    return lifted


def _width(name: str, producers: Producers, inits: Mapping) -> int | None:
    """The last axis of ``name`` where it is a projection's output (bias Add
    included): MatMul by an [in, out] initializer, or MatMulNBits (attribute N)."""

    def step(_: str, node: onnx.NodeProto | None) -> str | None:
        if node is None or node.op_type != "Add":
            return None
        return next((i for i in node.input if i and i not in inits), None)

    node = producers.get(producers.trace(name, step))
    if node is None or node.op_type == "Add":
        return None
    if node.op_type == "MatMulNBits":
        return next((int(a.i) for a in node.attribute if a.name == "N"), None)
    if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
        dims = inits[node.input[1]].dims
        return int(dims[-1]) if len(dims) == 2 else None
    return None


# --------------------------------------------------------------------------- feeds


@dataclass(frozen=True)
class Feeder:
    """The inputs the tool makes (``provided``) and how each batch is completed.

    ``position_ids`` are counted over the mask (cumsum - 1; padded positions
    get ``pad_position``), past inputs are empty ([batch, kv_heads, 0, head_dim]
    in the graph's dtype), ``use_cache_branch`` is False. Feeds for inputs the
    session does not have are dropped. With ``right_pad`` (GroupQueryAttention
    reads each sequence's length from the mask and takes its tokens to come
    first) left-padded rows are moved to the left; statistics must then use the
    completed feed's mask.
    """

    inputs: tuple[InputSpec, ...]
    provided: tuple[str, ...]
    mask: str | None = None
    pad_position: int = DEFAULT_PAD_POSITION
    right_pad: bool = False

    def complete(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` (what the data holds) plus the inputs the tool makes."""
        names = {s.name for s in self.inputs}
        out = {k: v for k, v in feed.items() if k in names}
        if self.right_pad and self.mask in out:
            out = _to_right_padding(out, self.mask)
            feed = out
        batch, seq = _batch_seq(feed, self.mask)
        for spec in self.inputs:
            if spec.name not in self.provided:
                continue
            if spec.name == USE_CACHE_BRANCH:
                out[spec.name] = np.zeros([1] * len(spec.shape), dtype=np.bool_)
            elif spec.name == POSITION_IDS:
                mask = feed.get(self.mask) if self.mask else None
                out[spec.name] = position_ids(mask, batch, seq, self.pad_position).astype(spec.dtype)
            else:
                out[spec.name] = np.zeros(empty_past_shape(spec, batch), dtype=spec.dtype)
        return out


def make_feeder(inputs: Sequence[InputSpec], mask: str | None, producer: str = "",
                head_sizes: Mapping[str, int] | None = None, right_pad: bool = False) -> Feeder:
    """The feeder for a session with ``inputs``; ``producer`` is the file's producer_name;
    ``head_sizes`` gives the last axis of past inputs that leave it symbolic
    (:func:`past_head_sizes`); ``right_pad``: see :class:`Feeder`
    (:func:`needs_right_padding`)."""
    provided = []
    specs = []
    for spec in inputs:
        if spec.name in (USE_CACHE_BRANCH, POSITION_IDS):
            provided.append(spec.name)
        elif is_past(spec.name):
            head = (head_sizes or {}).get(spec.name)
            if head is not None and len(spec.shape) >= 3 and not isinstance(spec.shape[-1], int):
                spec = replace(spec, shape=(*spec.shape[:-1], head))
            empty_past_shape(spec, 1)  # raises now if the shape cannot be told
            provided.append(spec.name)
        specs.append(spec)
    if provided and mask is None and any(n != USE_CACHE_BRANCH for n in provided):
        log.warning("no attention mask: positions are counted as if no token were padded")
    pad = PAD_POSITION.get(producer, DEFAULT_PAD_POSITION)
    return Feeder(tuple(specs), tuple(provided), mask, pad, right_pad and mask is not None)


def needs_right_padding(model: onnx.ModelProto) -> bool:
    """Whether attention is com.microsoft GroupQueryAttention, which takes each
    sequence's tokens to come first (its length is the mask's count)."""
    return any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"
               for n in model.graph.node)


def _to_right_padding(feed: Mapping[str, np.ndarray], mask_name: str) -> dict[str, np.ndarray]:
    """Each row's tokens moved to the start in every [batch, seq] input like the mask.
    A sequence's activations do not depend on where padding lies (positions are
    counted over the mask and the cache is empty), only on its tokens' order."""
    mask = np.asarray(feed[mask_name]) != 0
    starts = mask.argmax(axis=1)
    lengths = mask.sum(axis=1)
    if mask.ndim != 2 or not np.array_equal(
            mask, (np.arange(mask.shape[1]) >= starts[:, None])
            & (np.arange(mask.shape[1]) < (starts + lengths)[:, None])):
        raise DataError("GroupQueryAttention models need each sequence's tokens in one block "
                        f"of {mask_name} (padding before or after it, not inside)")
    if not starts.any():
        return dict(feed)
    index = (np.arange(mask.shape[1])[None, :] + starts[:, None]) % mask.shape[1]
    out = dict(feed)
    for name, value in feed.items():
        if np.ndim(value) == 2 and np.shape(value) == mask.shape:
            out[name] = np.take_along_axis(np.asarray(value), index, axis=1)
    return out


def past_head_sizes(model: onnx.ModelProto, shapes: Mapping[str, list]) -> dict[str, int]:
    """Head size of past inputs (onnxruntime-genai declares it symbolic), from the
    inferred ``shapes``: that of the present key/value a Concat appends to the
    past, or for com.microsoft GroupQueryAttention the query's width over
    num_heads (num_heads + 2 * kv_num_heads when Q, K and V come packed)."""
    sizes: dict[str, int] = {}
    producers = Producers.of(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            pasts = [n for n in node.input if is_past(n)]
            others = [shapes.get(n) or [None] for n in node.input if n and not is_past(n)]
            last = {s[-1] for s in others if isinstance(s[-1], int)}
            if pasts and len(last) == 1:
                sizes.update(dict.fromkeys(pasts, last.pop()))
            continue
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        query = shapes.get(required_input(node)) or [_width(node.input[0], producers, inits)]
        if not isinstance(query[-1], int) or "num_heads" not in attrs:
            continue
        packed = len(node.input) < 2 or not node.input[1]
        heads = int(attrs["num_heads"]) + (2 * int(attrs.get("kv_num_heads", 0)) if packed else 0)
        for name in node.input[3:5]:
            if name and query[-1] % heads == 0:
                sizes[name] = query[-1] // heads
    return sizes


def position_ids(mask: np.ndarray | None, batch: int, seq: int, pad_position: int) -> np.ndarray:
    """int64 [batch, seq] positions: the running count of real tokens minus 1,
    ``pad_position`` at padded ones (0..seq-1 without a mask)."""
    if mask is None:
        return np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    real = np.asarray(mask) != 0
    pos = np.cumsum(real, axis=-1, dtype=np.int64) - 1
    pos[~real] = pad_position
    return pos


def past_axis(dims: Sequence) -> int | None:
    """The past-length axis of a past input's dims (ints static, str/None dynamic):
    the first dynamic axis after the batch named like a length (past, seq, len),
    else the first dynamic axis after the batch."""
    free = [i for i, d in enumerate(dims) if i > 0 and not isinstance(d, int)]
    named = [i for i in free if any(w in str(dims[i]).lower() for w in ("past", "seq", "len"))]
    return (named or free or [None])[0]


def empty_past_shape(spec: InputSpec, batch: int) -> list[int]:
    """[batch, kv_heads, 0, head_dim] for a past input: dim 0 is the batch, the
    :func:`past_axis` is 0 long; every other axis must be static."""
    dims = list(spec.shape)
    if not dims:
        raise ModelError(f"past input {spec.describe()} has no shape to make an empty one from")
    axis = past_axis(dims)
    free = [i for i, d in enumerate(dims[1:], 1) if not isinstance(d, int) and i != axis]
    if axis is None or free:
        raise ModelError(
            f"cannot tell the shape of an empty {spec.describe()} "
            "(expected one dynamic axis, the past length, besides the batch)")
    shape = [batch] + [int(d) if isinstance(d, int) else 0 for d in dims[1:]]
    if isinstance(dims[0], int) and dims[0] != batch:
        raise DataError(f"{spec.describe()} takes batch {dims[0]}; use --batch-size {dims[0]}")
    return shape


def _batch_seq(feed: Mapping[str, np.ndarray], mask: str | None) -> tuple[int, int]:
    for name in (mask, TOKEN_IDS):
        if name and name in feed and np.ndim(feed[name]) == 2:
            return tuple(int(d) for d in np.shape(feed[name]))  # type: ignore[return-value]
    first = next(iter(feed.values()))
    return len(first), int(first.shape[1]) if first.ndim > 1 else 1
