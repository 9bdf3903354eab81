"""Checks a model passes before anything is scored.

* :func:`check_model`: the whole model (every graph, subgraphs and functions
  included, also the nodes the session graph later leaves out) passes ONNX's
  checker and strict shape inference with type checks, as ONNX Runtime's
  loader would check it: nodes in topological order (no cycle), each with the
  inputs and attributes its op requires, and shapes that fit (a MatMul of
  ``x [N, 6]`` by ``w [3, 5]`` is refused even where no output needs it).
* :func:`check_sites`: every weight to be scored fits the statistic it is
  scored with: the channel axis of each of its input activations, where shape
  inference knows it, has the weight's ``in_features`` (ONNX Runtime's own ops,
  which ONNX's inference does not know, included).

Both raise :class:`~fps_onnx.errors.ModelError` with one line. Weights' bytes
are never read: the checks run on a copy of the graph in which external-data
and large tensors are declared as typed graph inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import onnx
from onnx import TensorProto, helper

from ..errors import ModelError, first_line
from . import external
from .decoder import replace_field
from .graph import inferred_shapes
from .sites import WeightSite

__all__ = ["check_model", "check_sites"]

#: Tensors above this size are declared, not copied, for the checks.
_DECLARED_BYTES = 4096
#: What ONNX's checker says of a graph input or output declared without a shape.
_NO_SHAPE = "Field 'shape' of 'type' is required but missing"


def check_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """ModelError unless ``model`` passes ONNX's checker and strict shape inference."""
    light = _declared_copy(model)
    try:
        try:
            onnx.checker.check_model(light)
        except onnx.checker.ValidationError as exc:
            if _NO_SHAPE not in str(exc):
                raise
            # ONNX Runtime loads graph outputs declared without a shape; the checker wants
            # one, so they take the shapes strict inference gives them (which checks the nodes)
            light = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
            onnx.checker.check_model(light)
        else:
            onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"{path} is not a valid ONNX model (ONNX Runtime refuses such a "
                         f"model): {first_line(exc).rstrip(': ')}") from exc


def check_sites(model: onnx.ModelProto, sites: Sequence[WeightSite]) -> None:
    """ModelError for the first site whose input activation has, on its channel
    axis, another size than the weight's ``in_features`` (or another rank than a
    Conv weight's), where ONNX shape inference knows the activation's shape."""
    shapes = inferred_shapes(model, symbolic=False)
    for site in sites:
        for act in site.activations:
            shape = shapes.get(act.tensor)
            if shape is None:
                continue
            if act.rank is not None and len(shape) != act.rank:
                raise ModelError(f"weight {site.key} ({site.op}, dims {list(site.shape)}) reads "
                                 f"{act.tensor!r} of rank {len(shape)}, not {act.rank}")
            if not -len(shape) <= act.axis < len(shape):
                raise ModelError(f"weight {site.key} ({site.op}) reads {act.tensor!r} of shape "
                                 f"{shape}, which has no channel axis {act.axis}")
            channels = shape[act.axis]
            if isinstance(channels, int) and channels != site.in_features:
                raise ModelError(f"weight {site.key} ({site.op}, dims {list(site.shape)}) takes "
                                 f"{site.in_features} input channels, but its input "
                                 f"{act.tensor!r} has {channels} (shape {shape})")


def _declared_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose external-data and large initializers (in any
    graph) and external Constant values are typed inputs of the main graph: the
    checks need their types and dims only, and read no file."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    declared = {vi.name for vi in copy.graph.input}
    moved: list[onnx.ValueInfoProto] = []

    def declare(name: str, tensor: TensorProto) -> None:
        if name not in declared:
            declared.add(name)
            moved.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))

    for g in list(external.iter_graphs(copy)):
        kept = []
        for tensor in g.initializer:
            if _heavy(tensor):
                declare(tensor.name, tensor)
            else:
                kept.append(tensor)
        if len(kept) != len(g.initializer):
            replace_field(g.initializer, kept)
        nodes = []
        for node in g.node:
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if node.op_type == "Constant" and value is not None and _heavy(value) and node.output:
                declare(node.output[0], value)
            else:
                nodes.append(node)
        if len(nodes) != len(g.node):
            replace_field(g.node, nodes)
    copy.graph.input.extend(moved)
    return copy


def _heavy(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL or tensor.ByteSize() > _DECLARED_BYTES
