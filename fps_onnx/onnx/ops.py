"""Op rules: which input of which op holds a selectable weight, and how it is stored.

One small function per op, registered in :data:`RULES` under ``(domain, op_type)``;
:func:`weight_of` consults the table for each node (``graph.find_weights``).
A rule returns a :class:`~fps_onnx.onnx.sites.WeightSite` or None (no weight here).

* ONNX ``MatMul``, ``Gemm``, ``Conv``; com.microsoft ``FusedGemm``/``FusedConv``
  (the same with a fused activation) and ``FusedMatMul`` (alpha, transA, transB).
* com.microsoft ``Attention`` (ORT transformer optimizer): the packed QKV weight
  [in, q+k+v], its input 0 the activation.
* com.microsoft ``MatMulNBits`` (onnxruntime-genai ``-p int4`` exports): a
  block-quantized weight (:class:`BlockQuant`), dequantized by
  :func:`dequantize` when it is scored, one weight at a time.

Quantized ops whose weights fps-onnx cannot score (:data:`REFUSED`, and a
DequantizeLinear feeding a weight input) raise :class:`ModelError` naming the
node and the op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelError
from .edges import Producers, node_label, required_input
from .sites import Activation, BlockQuant, WeightSite

__all__ = ["REFUSED", "RULES", "Lookup", "Rule", "Traced", "dequantize", "rule", "weight_of"]

MS = "com.microsoft"
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
_PASS_THROUGH = ("Identity", "Cast")

#: Ops holding quantized weights in a form fps-onnx cannot score.
REFUSED = frozenset({
    ("", "QLinearMatMul"), ("", "QLinearConv"), ("", "MatMulInteger"), ("", "ConvInteger"),
    (MS, "QLinearMatMul"), (MS, "QLinearConv"), (MS, "DynamicQuantizeMatMul"),
    (MS, "MatMulIntegerToFloat"), (MS, "QAttention"), (MS, "QGemm"), (MS, "MatMulFpQ4"),
    (MS, "MatMulBnb4"), (MS, "QOrderedMatMul"), (MS, "QOrderedAttention"),
})
_ADVICE = "export the model in float (fp32/fp16) or int4 MatMulNBits"

#: Ops whose weight input a DequantizeLinear may not feed.
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "Attention")


@dataclass(frozen=True)
class Traced:
    """A constant a weight input traces back to (through Transpose/Identity/Cast)."""

    key: str
    tensor: onnx.TensorProto
    transposed: bool

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)


@dataclass(frozen=True)
class Lookup:
    """What a rule may look up: the graph's initializers and each tensor's producer."""

    initializers: Mapping[str, onnx.TensorProto]
    producers: Producers

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> Lookup:
        """The lookup of ``graph``'s own initializers and nodes."""
        return cls({t.name: t for t in graph.initializer}, Producers.of(graph))

    def constant(self, name: str) -> Traced | None:
        """The initializer or Constant ``name`` traces back to, or None (an activation)."""
        transposed = False

        def step(tensor: str, node: onnx.NodeProto | None) -> str | None:
            nonlocal transposed
            if tensor in self.initializers or node is None:
                return None
            if node.op_type in _PASS_THROUGH:
                return required_input(node)
            if node.op_type == "Transpose" and _perm(node) == [1, 0]:
                transposed = not transposed
                return required_input(node)
            return None

        name = self.producers.trace(name, step)
        if name in self.initializers:
            return Traced(name, self.initializers[name], transposed)
        node = self.producers.get(name)
        if node is None or node.op_type != "Constant":
            return None
        value = next((a for a in node.attribute if a.name == "value"), None)
        return None if value is None else Traced(name, value.t, transposed)

    def dequantized(self, name: str) -> onnx.NodeProto | None:
        """The DequantizeLinear behind ``name`` whose input is a constant
        (directly or through QuantizeLinear), else None."""

        def step(tensor: str, node: onnx.NodeProto | None) -> str | None:
            passes = node is not None and node.op_type in (*_PASS_THROUGH, "Transpose")
            return required_input(node) if passes else None

        node = self.producers.get(self.producers.trace(name, step))
        if node is None or node.op_type != "DequantizeLinear":
            return None
        source = self.producers.get(required_input(node))
        if source is not None and source.op_type == "QuantizeLinear":
            return node if self.constant(required_input(source)) is not None else None
        return node if self.constant(node.input[0]) is not None else None


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])


Rule = Callable[[onnx.NodeProto, Lookup], "WeightSite | None"]
RULES: dict[tuple[str, str], Rule] = {}


def rule(*keys: tuple[str, str]) -> Callable[[Rule], Rule]:
    """Register a rule for each (domain, op_type)."""

    def register(fn: Rule) -> Rule:
        for key in keys:
            if key in RULES:
                raise ValueError(f"op {key} has a rule already")
            RULES[key] = fn
        return fn

    return register


def weight_of(node: onnx.NodeProto, lookup: Lookup) -> WeightSite | None:
    """The weight ``node`` consumes, or None; ModelError for unreadable quantized weights."""
    key = (_domain(node.domain), node.op_type)
    if key in REFUSED:
        raise ModelError(f"node {node_label(node)} uses {node.op_type}, whose quantized weights "
                         f"fps-onnx cannot score; {_ADVICE}")
    fn = RULES.get(key)
    site = None if fn is None else fn(node, lookup)
    if site is not None:
        _check_site(node, site)
    return site


def _check_site(node: onnx.NodeProto, site: WeightSite) -> None:
    """ModelError unless ``site`` has entries to select and its groups split its channels."""
    if site.groups < 1 or site.shape[0] % site.groups:
        raise ModelError(f"node {node_label(node)}: {node.op_type} with group={site.groups} does "
                         f"not split the {site.shape[0]} output channels of {site.key} into groups")
    if min(site.shape) < 1 or site.in_features < 1:
        raise ModelError(f"node {node_label(node)}: weight {site.key} has dims {list(site.shape)} "
                         f"({site.layout}), which hold no entries to select")


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _float_weight(node: onnx.NodeProto, lookup: Lookup, index: int = 1) -> Traced | None:
    """The float constant at input ``index`` when input 0 is an activation, else None."""
    name, act = _input(node, index), _input(node, 0)
    if not name or not act or lookup.constant(act) is not None:
        return None
    traced = lookup.constant(name)
    if traced is None:
        dq = lookup.dequantized(name)
        if dq is not None and node.op_type in _WEIGHT_OPS:
            raise ModelError(f"node {node_label(node)} uses {node.op_type} on a DequantizeLinear "
                             f"weight ({node_label(dq)}), whose quantized weights fps-onnx cannot "
                             f"score; {_ADVICE}")
        return None  # activation x activation (attention)
    return traced if traced.tensor.data_type in FLOAT_TYPES else None


def _linear(node, traced: Traced, out_in: bool, axis: int = -1) -> WeightSite | None:
    dims = traced.dims
    if len(dims) != 2:
        return None  # batched or 1-D operands are not Linear weights
    out_f, in_f = (dims[0], dims[1]) if out_in else (dims[1], dims[0])
    act = Activation(node.input[0], axis)
    return WeightSite(traced.key, node.op_type, "out_in" if out_in else "in_out", (out_f, in_f),
                      in_f, 1, (act,), traced.tensor.data_type)


@rule(("", "MatMul"))
def _matmul(node, lookup):
    traced = _float_weight(node, lookup)
    return None if traced is None else _linear(node, traced, traced.transposed)


@rule(("", "Gemm"), (MS, "FusedGemm"))
def _gemm(node, lookup):
    traced = _float_weight(node, lookup)
    if traced is None:
        return None
    attrs = _attrs(node)
    out_in = traced.transposed ^ bool(attrs.get("transB", 0))
    return _linear(node, traced, out_in, 0 if attrs.get("transA", 0) else -1)


@rule((MS, "FusedMatMul"))
def _fused_matmul(node, lookup):
    traced = _float_weight(node, lookup)
    if traced is None:
        return None
    attrs = _attrs(node)
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise ModelError(f"node {node_label(node)} uses FusedMatMul with transBatchA/transBatchB, "
                         "which fps-onnx cannot read; export the model without ORT's fusions")
    out_in = traced.transposed ^ bool(attrs.get("transB", 0))
    # transA: A is [..., K, M], its channels on the second-last axis.
    return _linear(node, traced, out_in, -2 if attrs.get("transA", 0) else -1)


@rule(("", "Conv"), (MS, "FusedConv"))
def _conv(node, lookup):
    traced = _float_weight(node, lookup)
    if traced is None or traced.transposed or len(traced.dims) < 3:
        return None
    dims = traced.dims
    groups = int(_attrs(node).get("group", 1))
    act = Activation(node.input[0], 1, len(dims))
    return WeightSite(traced.key, node.op_type, "conv", dims, dims[1] * groups, groups, (act,),
                      traced.tensor.data_type)


@rule((MS, "Attention"))
def _attention(node, lookup):
    traced = _float_weight(node, lookup)
    if traced is None:
        return None  # no weights: QKV projected outside the node
    site = _linear(node, traced, traced.transposed)
    sizes = _attrs(node).get("qkv_hidden_sizes")
    if site is not None and sizes and sum(sizes) != site.shape[0]:
        raise ModelError(f"node {node_label(node)}: Attention weight {traced.key} has "
                         f"{site.shape[0]} outputs, qkv_hidden_sizes {list(sizes)} add up to {sum(sizes)}")
    return site


# --------------------------------------------------------------------------- MatMulNBits


@rule((MS, "MatMulNBits"))
def _matmul_nbits(node, lookup):
    name = node_label(node)
    if lookup.constant(required_input(node)) is not None:
        return None
    b = lookup.constant(_input(node, 1))
    if b is None or b.transposed:
        return None
    attrs = _attrs(node)
    try:
        n, k, bs = int(attrs["N"]), int(attrs["K"]), int(attrs["block_size"])
    except KeyError as exc:
        raise ModelError(f"node {name}: MatMulNBits has no attribute {exc.args[0]}") from exc
    bits = int(attrs.get("bits", 4))
    if bits not in (2, 4, 8):
        raise ModelError(f"node {name}: MatMulNBits with bits={bits}, which fps-onnx cannot read "
                         "(it reads 2, 4 and 8)")
    if n < 1 or k < 1 or bs < 1 or bs * bits % 8:
        raise ModelError(f"node {name}: MatMulNBits with N={n}, K={k}, block_size={bs}")
    blocks = -(-k // bs)
    scales = lookup.constant(_input(node, 2))
    if scales is None or scales.tensor.data_type not in FLOAT_TYPES:
        raise ModelError(f"node {name}: the scales of MatMulNBits are not a float constant")
    itemsize = {TensorProto.UINT8: 1, TensorProto.INT32: 4}.get(b.tensor.data_type)
    _check_size(name, "B", b, n * blocks * bs * bits // 8, itemsize)
    _check_size(name, "scales", scales, n * blocks)
    zp = lookup.constant(_input(node, 3)) if _input(node, 3) else None
    if _input(node, 3) and zp is None:
        raise ModelError(f"node {name}: the zero points of MatMulNBits are not a constant")
    if zp is not None:
        if zp.tensor.data_type in FLOAT_TYPES:
            _check_size(name, "zero points", zp, n * blocks)
        else:
            _check_size(name, "zero points", zp, n * -(-blocks * bits // 8),
                        {TensorProto.UINT8: 1, TensorProto.INT32: 4}.get(zp.tensor.data_type))
    g_idx = lookup.constant(_input(node, 4)) if _input(node, 4) else None
    if g_idx is not None:
        _check_size(name, "g_idx", g_idx, k)
    quant = BlockQuant(b.key, scales.key, zp and zp.key, g_idx and g_idx.key, n, k, bits, bs)
    act = Activation(node.input[0], -1)
    return WeightSite(b.key, node.op_type, "out_in", (n, k), k, 1, (act,),
                      scales.tensor.data_type, quant)


def _check_size(node: str, what: str, traced: Traced, want_bytes: int, itemsize: int | None = 0) -> None:
    """``traced`` holds ``want_bytes`` bytes (itemsize given) or elements (itemsize 0)."""
    if itemsize is None:
        raise ModelError(f"node {node}: MatMulNBits {what} {traced.key} has element type "
                         f"{TensorProto.DataType.Name(traced.tensor.data_type)}")
    have = math.prod(traced.dims) * (itemsize or 1)
    if have != want_bytes:
        unit = "bytes" if itemsize else "values"
        raise ModelError(f"node {node}: MatMulNBits {what} {traced.key} holds {have} {unit}, "
                         f"its attributes need {want_bytes}")


def dequantize(quant: BlockQuant, value: Callable[[str], np.ndarray]) -> np.ndarray:
    """The float32 weight [N, K] of a MatMulNBits; ``value(name)`` reads an initializer."""
    n, k, bits, blocks = quant.n, quant.k, quant.bits, quant.k_blocks
    codes = _unpack(_bytes(value(quant.b), n), bits)  # [N, blocks * block_size]
    scales = np.asarray(value(quant.scales), np.float32).reshape(n, blocks)
    if quant.zero_points is None:
        zp: np.ndarray | float = float(2 ** (bits - 1))
    else:
        raw = value(quant.zero_points)
        if np.issubdtype(raw.dtype, np.floating):
            zp = np.asarray(raw, np.float32).reshape(n, blocks)
        else:
            zp = _unpack(_bytes(raw, n), bits)[:, :blocks].astype(np.float32)
    if quant.g_idx is not None:
        group = np.asarray(value(quant.g_idx), np.int64).reshape(k)
        if group.size and (group.min() < 0 or group.max() >= blocks):
            raise ModelError(f"MatMulNBits weight {quant.b}: g_idx holds a block outside 0..{blocks - 1}")
        w = codes[:, :k].astype(np.float32)
        w -= zp[:, group] if isinstance(zp, np.ndarray) else zp
        w *= scales[:, group]
        return w
    w = codes.reshape(n, blocks, quant.block_size).astype(np.float32)
    w -= zp[:, :, None] if isinstance(zp, np.ndarray) else zp
    w *= scales[:, :, None]
    w = w.reshape(n, -1)
    return w if w.shape[1] == k else np.ascontiguousarray(w[:, :k])


def _bytes(array: np.ndarray, rows: int) -> np.ndarray:
    """The little-endian bytes of ``array`` as uint8 [rows, -1]."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        array = array.astype(array.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    return array.reshape(rows, -1)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [R, B] holding ``8 // bits`` codes a byte, low bits first -> uint8 [R, B * 8 // bits]."""
    if bits == 8:
        return packed
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = packed[:, :, None] >> shifts
    codes &= np.uint8((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)
