"""The depth and kind of a weight, read from its names (``fps-onnx inspect``).

Kinds (:data:`KINDS`): attention q/k/v/qkv/o, MLP gate/up/down, conv, lm_head or
other; depth: the layer index. :func:`classify` reads them from a weight's
PyTorch name, key, ONNX initializer and the names of the nodes that use it
(:func:`node_names`: exporter node names such as "/blocks.0/attn/qkv/MatMul"
tell depth and kind where weight names such as "onnx::MatMul_416" do not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import os
import re

__all__ = ["KINDS", "classify", "depth_label", "depth_order", "node_names", "weight_names"]

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


def depth_order(depth: int | None) -> tuple[bool, int]:
    """Sort key of a depth: by index, None (no depth found) last."""
    return (depth is None, depth or 0)


def depth_label(depth: int | None) -> str:
    """A depth as shown in reports: its index, or "-" for none."""
    return "-" if depth is None else str(depth)


def weight_names(key: str, entry: dict, nodes: Mapping[str, Sequence[str]]) -> list[str]:
    """Every name a mask file's entry ``key`` gives its weight (PyTorch name and aliases,
    ONNX initializer, node names), and those of ``nodes`` (:func:`node_names`)."""
    names = [entry.get("torch_name"), key, entry.get("onnx_initializer")]
    names += list(entry.get("torch_aliases") or [])
    names += list(nodes.get(key, ())) + list(nodes.get(entry.get("onnx_initializer") or "", ()))
    return [n for n in names if isinstance(n, str)]


def node_names(model_path: str | os.PathLike) -> dict[str, list[str]]:
    """Weight key -> names of the nodes that consume it, read from an ONNX file's graph
    (without its weights' bytes): exporter node names ("/blocks.0/attn/qkv/MatMul") tell
    depth and kind where weight names ("onnx::MatMul_416") do not."""
    from ..onnx.graph import weight_consumers
    from ..onnx.load import load_graph

    return weight_consumers(load_graph(model_path)[0].graph)
