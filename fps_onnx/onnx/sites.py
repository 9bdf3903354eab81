"""The types every layer names a weight by: a selectable weight (:class:`WeightSite`), its
input activation (:class:`Activation`), how a block-quantized one is stored (:class:`BlockQuant`),
what one added statistics output holds (:class:`StatOutput`), and the statistic names.

Plain frozen dataclasses without behaviour beyond a derived property, so that ``graph``
(which finds sites), ``ops`` (the per-op rules that build them), ``stats``, ``select`` and
``maskfile`` share them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnx import TensorProto

__all__ = ["STATISTICS", "SUMS", "Activation", "BlockQuant", "StatOutput", "WeightSite"]

#: The per-channel sums a stats file holds for an activation (``count`` is always there too).
SUMS = ("abs_sum", "sq_sum")

#: Statistics an activation can be reduced to (the sums of the stats file); ``count`` is always added.
STATISTICS = SUMS


@dataclass(frozen=True)
class BlockQuant:
    """How a MatMulNBits weight is stored: initializer names and attributes.

    W[n, k] = (q[n, k] - zp[n, b]) * scale[n, b], b = k // block_size
    (or ``g_idx[k]``); q packed ``bits`` to a byte, low bits first, in blocks
    of ``block_size`` along K; zp packed the same way (uint8), or float,
    or 2^(bits-1) when absent.
    """

    b: str
    scales: str
    zero_points: str | None
    g_idx: str | None
    n: int
    k: int
    bits: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)


@dataclass(frozen=True)
class Activation:
    """An input activation of a weight: tensor name and the axis holding its channels.

    ``axis`` is -1 for MatMul/Gemm inputs (in_features last), 1 for Conv inputs,
    0 for Gemm with transA=1 and -2 for FusedMatMul with transA=1 ([..., K, M]).
    ``rank`` is known for Conv inputs only.
    """

    tensor: str
    axis: int
    rank: int | None = None


@dataclass(frozen=True)
class WeightSite:
    """One selectable weight and the nodes that consume it.

    ``shape`` is the weight's PyTorch layout: [out, in] for MatMul/Gemm,
    [out, in/groups, kh, kw] for Conv. ``layout`` says how the ONNX tensor
    ``key`` stores it: "out_in", "in_out" (transposed) or "conv". A
    block-quantized weight (MatMulNBits) has ``quant``: ``key`` is its packed
    initializer and :func:`weight_reader` dequantizes it; ``dtype`` is then
    that of its scales (and its input activation).
    """

    key: str
    op: str
    layout: str
    shape: tuple[int, ...]
    in_features: int
    groups: int = 1
    activations: tuple[Activation, ...] = field(default_factory=tuple)
    dtype: int = TensorProto.FLOAT
    quant: BlockQuant | None = None


@dataclass(frozen=True)
class StatOutput:
    """What one added graph output holds: ``statistic`` of ``activation``."""

    activation: Activation
    statistic: str  # "abs_sum", "sq_sum" or "count"
    masked: bool = False
