"""Graph analysis and rewriting: which weights can be selected, and where their inputs are.

Two passes over an ``onnx.ModelProto``, neither doing any I/O:

* :func:`find_weights` traces the weight input of every MatMul, Gemm and Conv
  (and the ONNX Runtime ops of :mod:`fps_onnx.onnx.ops`) back through
  Transpose/Identity/Cast to an initializer (or Constant) and returns one
  :class:`WeightSite` per weight, with every node that consumes it.
* :func:`add_statistics` adds reduction nodes so that, for each distinct input
  activation of those nodes, only per-input-channel vectors leave the session
  (sum |a|, sum a^2, and the element count). It returns an explicit map from
  every added output to the activation and statistic it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from .edges import Producers, required_input
from .sites import STATISTICS, Activation, StatOutput, WeightSite  # noqa: F401 - site types live in sites

__all__ = [
    "add_statistics", "find_weights", "inferred_shapes", "iter_weight_values", "tensor_value",
    "token_leading", "weight_reader",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- find


def find_weights(model: onnx.ModelProto) -> list[WeightSite]:
    """Every weight consumed by a MatMul, Gemm, Conv or other op with a rule in
    :mod:`fps_onnx.onnx.ops`, in graph order.

    MatMuls whose inputs are both activations (attention) are skipped. A weight
    consumed by several nodes is returned once with all their activations.
    Raises :class:`ModelError` when the graph holds no selectable weight, or a
    quantized weight fps-onnx cannot score.
    """
    from . import ops

    graph = model.graph
    lookup = ops.Lookup.of(graph)
    sites: dict[str, WeightSite] = {}
    for node in graph.node:
        site = ops.weight_of(node, lookup)
        if site is None:
            continue
        known = sites.get(site.key)
        if known is None:
            sites[site.key] = site
        elif (known.layout, known.shape, known.quant) != (site.layout, site.shape, site.quant):
            log.warning(
                "weight %s is used by %s as %s %s and by %s as %s %s; "
                "only the first use is measured",
                site.key, known.op, known.layout, list(known.shape),
                site.op, site.layout, list(site.shape),
            )
        else:
            sites[site.key] = _with_activations(known, site.activations)
    if not sites:
        raise ModelError("the model has no weight consumed by a MatMul, Gemm or Conv node")
    return list(sites.values())


def weight_consumers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Weight key -> names of the nodes that consume it (as :func:`find_weights` finds
    them, unnamed nodes left out), in graph order: exporter node names
    ("/blocks.0/attn/qkv/MatMul") tell module paths where weight names
    ("onnx::MatMul_416") do not."""
    from . import ops

    lookup = ops.Lookup.of(graph)
    names: dict[str, list[str]] = {}
    for node in graph.node:
        site = ops.weight_of(node, lookup)
        if site is not None and node.name and node.name not in names.get(site.key, ()):
            names.setdefault(site.key, []).append(node.name)
    return names


def _with_activations(site: WeightSite, more: Iterable[Activation]) -> WeightSite:
    merged = list(site.activations)
    merged += [a for a in more if a not in merged]
    return replace(site, activations=tuple(merged))


def iter_weight_values(model: onnx.ModelProto, sites: Sequence[WeightSite], base_dir: str = ""):
    """(site, weight in PyTorch layout as a NumPy array), one weight at a time.

    Weights stored as external data are read from ``base_dir``; the model
    itself is left as it is (it does not take the weights' bytes in).
    """
    read = weight_reader(model, base_dir)
    for site in sites:
        yield site, read(site)


def weight_reader(model: onnx.ModelProto, base_dir: str = "", mapped: bool = False):
    """A function giving a site's weight in PyTorch layout (safe to call from threads).

    ``mapped``: weights stored as external data come as read-only arrays on a
    memory map of their bytes (:func:`fps_onnx.onnx.external.map_bytes`) instead of
    arrays of their own; block-quantized weights are dequantized either way.
    """
    by_name = {t.name: t for t in model.graph.initializer}
    by_name.update({
        n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
        for a in n.attribute if a.name == "value"
    })

    def read(site: WeightSite) -> np.ndarray:
        if site.quant is not None:
            from .ops import dequantize

            return dequantize(site.quant, lambda name: tensor_value(by_name[name], base_dir))
        array = tensor_value(by_name[site.key], base_dir, mapped)
        return array.T if site.layout == "in_out" else array

    return read


_PLAIN_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
                 TensorProto.DOUBLE: np.float64}


def tensor_value(tensor: onnx.TensorProto, base_dir: str = "", mapped: bool = False) -> np.ndarray:
    """The value of ``tensor``, or ModelError naming it.

    External data is checked before anything is read or allocated (a regular
    file inside ``base_dir``, holding the bytes its dims ask for: see
    :func:`fps_onnx.onnx.external.check_tensor`) and read with one read; no copy of
    the bytes is kept in ``tensor``. ``mapped``: float external data comes as a
    read-only array on a memory map of the file (:func:`fps_onnx.onnx.external.map_bytes`).
    """
    from . import external

    name = tensor.name or "(unnamed)"
    if tensor.data_location == TensorProto.EXTERNAL:
        ref = external.check_tensor(tensor, base_dir)
        dtype = _PLAIN_DTYPES.get(tensor.data_type)
        raw = external.map_bytes(ref) if mapped and dtype is not None else external.read_bytes(ref)
        if dtype is not None:
            array = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
            return array.astype(dtype, copy=False).reshape(tuple(tensor.dims))
        embedded = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                    raw_data=bytes(raw))
        return _embedded_value(embedded, name)
    nbytes = external.tensor_nbytes(tensor)
    if nbytes is not None and nbytes > 16 * tensor.ByteSize() + 64:
        raise ModelError(f"tensor {name!r} has dims {list(tensor.dims)} ({nbytes} bytes) "
                         f"but holds {tensor.ByteSize()} bytes of data")
    return _embedded_value(tensor, name)


# --------------------------------------------------------------------------- rewrite


def add_statistics(
    model: onnx.ModelProto,
    sites: Sequence[WeightSite],
    statistics: Sequence[str] = ("abs_sum",),
    token_mask: str | None = None,
    masked_activations: Iterable[str] = (),
) -> tuple[onnx.ModelProto, dict[str, StatOutput]]:
    """Expose per-channel statistics of every weight input as graph outputs (in place).

    Each distinct activation gets the requested ``statistics`` (float32,
    [channels]) and a ``count`` output (int64 scalar: the number of elements,
    from which the row count follows). Activations named in
    ``masked_activations`` have the [batch, seq] graph input ``token_mask``
    applied: padded positions add nothing to the sums.

    Returns the model and a map from each added output name to what it holds.
    """
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    masked = set(masked_activations)
    opset = _default_opset(model)
    if opset < 9:
        raise ModelError(f"the model uses ONNX opset {opset}; fps-onnx needs opset 9 or later")
    builder = _Builder(model.graph, opset)
    producers = Producers.of(model.graph)
    outputs: dict[str, StatOutput] = {}
    seen: set[Activation] = set()
    mask_f = None
    for site in sites:
        for act in site.activations:
            if act in seen:
                continue
            seen.add(act)
            index = len(seen) - 1
            is_masked = token_mask is not None and act.tensor in masked and act.axis == -1
            if is_masked and mask_f is None:
                mask_f = builder.node("Cast", [token_mask], to=TensorProto.FLOAT)
                mask_f = builder.node("Reshape", [mask_f, builder.const([0, 1, -1])])  # [B, 1, S]
            for stat in statistics:
                name = f"fps_stat::{index}::{stat}"
                builder.reduce(act, site.in_features, stat, name, mask_f if is_masked else None,
                               site.dtype, _non_negative(act.tensor, producers))
                outputs[name] = StatOutput(act, stat, is_masked)
            name = f"fps_stat::{index}::count"
            builder.node("Size", [act.tensor], out=name)
            builder.output(name, TensorProto.INT64, [])
            outputs[name] = StatOutput(act, "count", is_masked)
    return model, outputs


#: Ops whose output is never negative: sum |a| is then sum a, and the Abs pass
#: is left out (conv inputs after ReLU, attention probabilities).
_NON_NEGATIVE = ("Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Softplus", "HardSigmoid")
#: Ops that keep the sign of every value of their (first) input.
_SIGN_KEEPING = ("Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                 "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def _non_negative(tensor: str, producers: Producers) -> bool:
    """Whether ``tensor`` is a non-negative op's output, seen through sign-keeping ops."""

    def step(_: str, node: onnx.NodeProto | None) -> str | None:
        keeps = node is not None and _standard(node) and node.op_type in _SIGN_KEEPING
        return required_input(node) if keeps else None

    node = producers.get(producers.trace(tensor, step))
    return node is not None and _standard(node) and node.op_type in _NON_NEGATIVE


def _standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelError("the model imports no default ONNX opset")


class _Builder:
    """Appends nodes, constants and outputs to a graph with unique names."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.count = 0
        self.consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"fps_stat::{hint}_{self.count}"

    def const(self, values: Sequence[int]) -> str:
        key = tuple(values)
        if key not in self.consts:
            name = self._name("const")
            self.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
            self.consts[key] = name
        return self.consts[key]

    def node(self, op: str, inputs: Sequence[str], out: str | None = None, **attrs) -> str:
        out = out or self._name(op.lower())
        self.graph.node.append(helper.make_node(op, list(inputs), [out], name=out + ":node", **attrs))
        return out

    def output(self, name: str, elem_type: int, shape) -> None:
        self.graph.output.append(helper.make_tensor_value_info(name, elem_type, shape))

    def _reduce(self, op: str, x: str, axes: Sequence[int], out: str | None = None) -> str:
        # Reduce* take axes as an input from opset 18 (ReduceSum from 13).
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            return self.node(op, [x, self.const(axes)], out=out, keepdims=0)
        return self.node(op, [x], out=out, axes=list(axes), keepdims=0)

    def ones(self, x: str, axis: int, row: bool) -> str:
        """Float ones shaped [1, n] (``row``) or [n, 1], n = x.shape[axis] at run time."""
        n = self.node("Gather", [self.node("Shape", [x]), self.const([axis])], axis=0)
        shape = self.node("Concat", [self.const([1]), n] if row else [n, self.const([1])], axis=0)
        one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        return self.node("ConstantOfShape", [shape], value=one)

    def reduce(self, act: Activation, channels: int, stat: str, out: str, mask: str | None,
               dtype: int = TensorProto.FLOAT, non_negative: bool = False) -> None:
        """``out`` = sum over rows of |x| (or x^2) per channel, as a [channels] output.

        The sum over rows is a matrix-vector product with ones (or with the token
        mask), which ONNX Runtime's GEMM runs about twice as fast as ReduceSum
        over a leading axis, and which folds the mask in for free.
        """
        x = act.tensor
        if dtype != TensorProto.FLOAT:  # sums of fp16/bf16 activations overflow: add in fp32
            x = self.node("Cast", [x], to=TensorProto.FLOAT)
        if act.axis == 1:  # Conv input [N, C, *spatial] -> [N*C, S]
            x = self.node("Flatten", [x], axis=2)
        elif mask is not None:  # [B, S, ..., K] -> [B, S, R*K]
            x = self.node("Reshape", [x, self.const([0, 0, -1])])
        elif act.axis == -1:  # [..., K] -> [R, K]
            x = self.node("Reshape", [x, self.const([-1, channels])])
        if stat == "sq_sum":
            x = self.node("Mul", [x, x])
        elif not non_negative:
            x = self.node("Abs", [x])
        if act.axis == 1 or act.axis == 0:  # [N*C, S] @ [S, 1]; Gemm transA: [K, M] @ [M, 1]
            x = self.node("MatMul", [x, self.ones(x, 1, row=False)])
        elif act.axis == -2:  # FusedMatMul transA: [..., K, M] @ [M, 1]
            x = self.node("MatMul", [x, self.ones(x, -1, row=False)])
        elif mask is not None:  # [B, 1, S] @ [B, S, R*K] -> [B, 1, R*K]
            x = self.node("MatMul", [mask, x])
        else:  # [1, R] @ [R, K]
            x = self.node("MatMul", [self.ones(x, 0, row=True), x])
        x = self.node("Reshape", [x, self.const([-1, channels])])
        self._reduce("ReduceSum", x, [0], out=out)
        self.output(out, TensorProto.FLOAT, [channels])


# --------------------------------------------------------------------------- token axes


def token_leading(model: onnx.ModelProto, tensors: Iterable[str], mask_input: str,
                  shapes: dict[str, list] | None = None) -> set[str]:
    """The tensors among ``tensors`` whose two leading axes are those of ``mask_input``.

    Decided by ONNX shape inference with symbolic dimensions (``shapes``, from
    :func:`inferred_shapes`, or inferred here); a tensor whose shape cannot be
    inferred is not counted (its statistics include padding).
    """
    if shapes is None:
        shapes = inferred_shapes(model, mask_input)
    mask_shape = shapes.get(mask_input)
    if mask_shape is None or len(mask_shape) != 2 or None in mask_shape:
        return set()
    hits = set()
    for name in tensors:
        shape = shapes.get(name)
        if shape is not None and len(shape) >= 3 and tuple(shape[:2]) == tuple(mask_shape):
            hits.add(name)
    return hits


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference, which follows [batch, seq] through
    the Reshape/Transpose chains of attention where plain ONNX inference gives up."""
    try:
        return _symbolic_shape_infer().SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # noqa: BLE001 - fall back to ONNX's own inference
        log.debug("symbolic shape inference failed: %s", exc)
        return None


def _symbolic_shape_infer():
    """ONNX Runtime's ``tools/symbolic_shape_infer.py``, loaded on its own: the
    ``onnxruntime.tools`` package imports torch whenever torch is installed, and
    selection must not pay for (or depend on) PyTorch."""
    import importlib.util
    import os
    import sys

    import onnxruntime

    name = "fps_onnx._ort_symbolic_shape_infer"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def inferred_shapes(model: onnx.ModelProto, mask_input: str | None = None,
                    symbolic: bool = True) -> dict[str, list]:
    """Shapes by tensor name (ints, symbolic names, None where unknown). Decoders
    are inferred as on a first step: past length 0, ``mask_input`` [batch, seq].

    ``symbolic``: ONNX Runtime's symbolic inference, falling back to ONNX's own
    where it gives up; else ONNX's own only (about 10x cheaper, but it loses
    [batch, seq] in some Reshape/Transpose chains).
    """
    from .decoder import first_step_inputs

    # Shape inference needs no weight values: keep small constants (shapes,
    # axes) and declare large initializers as typed inputs, so memory stays flat.
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    # Decoders: as on a first generation step (past length 0, mask [batch, seq]).
    if first_step_inputs(graph, mask_input):
        for vi in graph.output:
            vi.type.tensor_type.ClearField("shape")
    declared = {vi.name for vi in model.graph.input}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) <= 64 and tensor.data_location != TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    inferred = _symbolic_inference(light) if symbolic else None
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - inference failing only loses the mask
            if symbolic:
                log.warning("shape inference failed (%s); padded positions will be counted", exc)
            else:
                log.debug("ONNX shape inference failed: %s", exc)
            return {}
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[vi.name] = dims
    return shapes


def _embedded_value(tensor: onnx.TensorProto, name: str) -> np.ndarray:
    """``tensor``'s value, its bytes in the message, or ModelError naming it."""
    from ..errors import first_line

    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # noqa: BLE001 - reshape, decoding and type errors of onnx
        raise ModelError(f"tensor {name!r} cannot be read: {first_line(exc)}") from exc
