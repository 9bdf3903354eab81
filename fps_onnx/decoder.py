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
  branch, so the weights inside become visible to :func:`fps_onnx.graph.find_weights`.
* :func:`prune` keeps only the nodes, initializers and inputs that the given
  outputs need (the added statistics), so logits and the cache are never computed.
* :func:`first_step_inputs` declares past length 0 on a copy used for shape
  inference, so that [batch, seq] is followed through attention.
* :func:`make_feeder` lists the inputs the tool makes and completes each batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
import logging

import numpy as np
import onnx
from onnx import helper

from .data import InputSpec
from .errors import DataError, ModelError

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
        if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] == USE_CACHE_BRANCH:
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
        for sub in _subgraphs(attr):
            for inner in sub.node:
                _rename(inner, renames)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every name ``node`` reads, outer-scope names of its subgraphs included."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for sub in _subgraphs(attr):
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
    _replace(graph.output, outputs)
    _replace(graph.node, kept)
    _replace(graph.initializer, [t for t in graph.initializer if t.name in needed])
    _replace(graph.sparse_initializer,
             [t for t in graph.sparse_initializer if t.values.name in needed])
    _replace(graph.input, [i for i in graph.input if i.name in needed])
    _replace(graph.value_info, [v for v in graph.value_info if v.name in needed])
    return pruned


def _replace(field, items: list) -> None:
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
        for dim in list(dims)[1:]:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 0
    by_name = {vi.name: vi for vi in graph.input}
    ids, mask = by_name.get(TOKEN_IDS), by_name.get(mask_input or "")
    if ids is not None and mask is not None and _rank(ids) == 2 and _rank(mask) == 2:
        for i in range(2):
            mask.type.tensor_type.shape.dim[i].CopyFrom(ids.type.tensor_type.shape.dim[i])
    return True


def _rank(vi: onnx.ValueInfoProto) -> int:
    t = vi.type.tensor_type
    return len(t.shape.dim) if vi.type.HasField("tensor_type") and t.HasField("shape") else -1


# --------------------------------------------------------------------------- feeds


@dataclass(frozen=True)
class Feeder:
    """The inputs the tool makes (``provided``) and how each batch is completed.

    ``position_ids`` are counted over the mask (cumsum - 1; padded positions
    get ``pad_position``), past inputs are empty ([batch, kv_heads, 0, head_dim]
    in the graph's dtype), ``use_cache_branch`` is False. Feeds for inputs the
    session does not have are dropped.
    """

    inputs: tuple[InputSpec, ...]
    provided: tuple[str, ...]
    mask: str | None = None
    pad_position: int = DEFAULT_PAD_POSITION

    def complete(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` (what the data holds) plus the inputs the tool makes."""
        names = {s.name for s in self.inputs}
        out = {k: v for k, v in feed.items() if k in names}
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


def make_feeder(inputs: Sequence[InputSpec], mask: str | None, producer: str = "") -> Feeder:
    """The feeder for a session with ``inputs``; ``producer`` is the file's producer_name."""
    provided = []
    for spec in inputs:
        if spec.name in (USE_CACHE_BRANCH, POSITION_IDS):
            provided.append(spec.name)
        elif is_past(spec.name):
            empty_past_shape(spec, 1)  # raises now if the shape cannot be told
            provided.append(spec.name)
    if provided and mask is None and any(n != USE_CACHE_BRANCH for n in provided):
        log.warning("no attention mask: positions are counted as if no token were padded")
    pad = PAD_POSITION.get(producer, DEFAULT_PAD_POSITION)
    return Feeder(tuple(inputs), tuple(provided), mask, pad)


def position_ids(mask: np.ndarray | None, batch: int, seq: int, pad_position: int) -> np.ndarray:
    """int64 [batch, seq] positions: the running count of real tokens minus 1,
    ``pad_position`` at padded ones (0..seq-1 without a mask)."""
    if mask is None:
        return np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    real = np.asarray(mask) != 0
    pos = np.cumsum(real, axis=-1, dtype=np.int64) - 1
    pos[~real] = pad_position
    return pos


def empty_past_shape(spec: InputSpec, batch: int) -> list[int]:
    """[batch, kv_heads, 0, head_dim] for a past input: dim 0 is the batch, the one
    other axis without a static size is the past length; the rest must be static."""
    dims = list(spec.shape)
    if not dims:
        raise ModelError(f"past input {spec.describe()} has no shape to make an empty one from")
    free = [i for i, d in enumerate(dims[1:], 1) if not isinstance(d, int)]
    if len(free) != 1:
        raise ModelError(
            f"cannot tell the past-length axis of {spec.describe()} "
            "(expected one dynamic axis besides the batch; give the model static head sizes)")
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
