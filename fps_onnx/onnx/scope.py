"""Which of the weights found in a graph are selectable.

For causal language models the vocabulary projection (``lm_head``, tied to the
token embedding or not) and the embeddings are left out by default, as Wanda,
SpIEL and PEFT leave them out: ``ScopeConfig.include_lm_head`` selects them.
``ScopeConfig.exclude`` holds regular expressions; a weight whose mask key (or
PyTorch name, where masks are mapped) matches any of them (``re.search``) is
left out too.

In an ONNX graph the lm_head is found two ways:

* the MatMul/Gemm (FusedMatMul, MatMulNBits) whose output reaches the graph
  output ``logits``, through Identity, Cast, Reshape, Add of a bias (and the
  constant scalings of logit soft-capping), in a model that reads
  ``input_ids`` and whose ``logits`` are not [batch, classes] (a classifier's
  head is not a vocabulary projection);
* a weight that a Gather also reads (the token embedding, tied to the lm_head
  through a Transpose).
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from dataclasses import dataclass
import logging
import re

import onnx

from ..errors import ModelError
from .decoder import TOKEN_IDS
from .edges import Producers, required_input
from .ops import Lookup
from .sites import WeightSite

__all__ = ["ScopeConfig", "in_scope", "lm_head_keys", "report_left_out"]

log = logging.getLogger(__name__)

LOGITS = "logits"
#: Ops whose input 1 is the lm_head weight (MatMulNBits: its packed int4 codes).
_WEIGHT_OPS = ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits")
#: Ops between the lm_head's MatMul and the ``logits`` output: data on input 0,
#: or (binary) the one input that is not a constant (a bias, a soft-capping scale).
_TO_LOGITS_UNARY = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Tanh")
_TO_LOGITS_BINARY = ("Add", "Mul", "Div")


@dataclass(frozen=True)
class ScopeConfig:
    """Which weights may be selected."""

    include_lm_head: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ModelError(f"--exclude {pattern!r} is not a regular expression: {exc}") from exc

    def excluded(self, *names: str | None) -> str | None:
        """The first pattern that any of ``names`` matches, or None."""
        for pattern in self.exclude:
            if any(n is not None and re.search(pattern, n) for n in names):
                return pattern
        return None


def in_scope(
    model: onnx.ModelProto, sites: Sequence[WeightSite], config: ScopeConfig = ScopeConfig()
) -> list[WeightSite]:
    """The ``sites`` that may be selected, in order; logs what was left out and why.

    Raises ModelError when nothing is left.
    """
    heads = {} if config.include_lm_head else lm_head_keys(model, sites)
    kept, left_out = [], []
    for site in sites:
        why = heads.get(site.key)
        pattern = config.excluded(site.key)
        if pattern is not None:
            why = f"--exclude {pattern}"
        if why is None:
            kept.append(site)
        else:
            left_out.append(f"{site.key} ({why})")
    report_left_out(kept, left_out)
    return kept


def report_left_out(kept: Sized, left_out: Sequence[str], nothing: str = "") -> None:
    """Log the weights a scope left out ("name (why)"); ModelError when none is kept
    (``nothing``: why, where nothing was left out either)."""
    if left_out:
        log.info("not selectable: %s", ", ".join(left_out))
    if not kept:
        raise ModelError(f"no selectable weight is left: {', '.join(left_out) or nothing}")


def lm_head_keys(model: onnx.ModelProto, sites: Sequence[WeightSite]) -> dict[str, str]:
    """Keys of the sites that are the vocabulary projection or an embedding -> why."""
    graph = model.graph
    keys = {s.key for s in sites}
    lookup = Lookup.of(graph)
    constants = {t.name for t in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"
    }

    def site_key(name: str) -> str | None:
        traced = lookup.constant(name)  # through Identity, Cast, Transpose: as find_weights traces
        return traced.key if traced is not None and traced.key in keys else None

    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Gather" and node.input:
            key = site_key(node.input[0])
            if key is not None:
                found[key] = "embedding, read by a Gather"
    if _predicts_tokens(graph):
        node = _logits_node(lookup.producers, constants)
        if node is not None:
            key = site_key(node.input[1])
            if key is not None:
                found.setdefault(key, f"lm_head, feeds {LOGITS}")
    return found


def _predicts_tokens(graph: onnx.GraphProto) -> bool:
    """Whether ``logits`` is a language model's [batch, seq, vocab] output: the
    model reads ``input_ids`` and ``logits`` is not declared [batch, classes] (a
    classifier's head, like an image model's, stays selectable)."""
    if not any(i.name == TOKEN_IDS for i in graph.input):
        return False
    for out in graph.output:
        if out.name == LOGITS:
            tensor_type = out.type.tensor_type
            return not (tensor_type.HasField("shape") and len(tensor_type.shape.dim) == 2)
    return False


def _logits_node(producers: Producers, constants) -> onnx.NodeProto | None:
    """The MatMul/Gemm that the graph output ``logits`` comes from."""

    def step(_: str, node: onnx.NodeProto | None) -> str | None:
        if node is None or node.op_type in _WEIGHT_OPS:
            return None
        if node.op_type in _TO_LOGITS_UNARY:
            return required_input(node)
        if node.op_type not in _TO_LOGITS_BINARY:
            return None
        moving = [i for i in node.input[:2] if i not in constants]
        return moving[0] if len(moving) == 1 and moving[0] else None

    node = producers.get(producers.trace(LOGITS, step))
    if node is None or node.op_type not in _WEIGHT_OPS:
        return None
    return node if len(node.input) >= 2 else None

