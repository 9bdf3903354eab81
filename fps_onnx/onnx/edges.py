"""Producer edges of a graph, and the one bounded walk back along them.

Every pass that follows a tensor back to where it comes from (a weight traced
through Transpose/Identity/Cast, the sign of an activation through Reshape, the
lm_head behind ``logits``, a projection's width behind a bias Add) walks with
:meth:`Producers.trace`: each tensor is visited at most once, so a walk takes
at most as many steps as the graph has tensors, and a cycle (``Identity(a) ->
b``, ``Identity(b) -> a``), which no valid graph holds, is refused with a
:class:`~fps_onnx.errors.ModelError` naming a tensor on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import onnx

from ..errors import ModelError

__all__ = ["Producers", "Step", "node_label", "required_input"]

#: ``step(tensor, its producer or None)``: the tensor to go on from, or None to stop.
Step = Callable[[str, "onnx.NodeProto | None"], "str | None"]


class Producers(Mapping[str, onnx.NodeProto]):
    """Each tensor of one graph -> the node that produces it (empty names left out)."""

    def __init__(self, nodes: Iterable[onnx.NodeProto]) -> None:
        self._by_output = {out: node for node in nodes for out in node.output if out}

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> Producers:
        return cls(graph.node)

    def __getitem__(self, name: str) -> onnx.NodeProto:
        return self._by_output[name]

    def __iter__(self):
        return iter(self._by_output)

    def __len__(self) -> int:
        return len(self._by_output)

    def trace(self, name: str, step: Step) -> str:
        """Follow producers back from ``name``: ``step(tensor, producer)`` gives the
        tensor to go on from (an input of ``producer``) or None to stop there.
        Returns the tensor the walk stopped at; ModelError when it comes back to a
        tensor it has passed (a cycle)."""
        seen: set[str] = set()
        while True:
            if name in seen:
                raise ModelError(f"the graph has a cycle through tensor {name!r}: "
                                 "it is computed from itself")
            seen.add(name)
            following = step(name, self._by_output.get(name))
            if following is None:
                return name
            name = following


def node_label(node: onnx.NodeProto) -> str:
    """How a message names ``node``: its name, or the output it makes."""
    if node.name:
        return node.name
    return f"(output {node.output[0]})" if node.output else f"({node.op_type} without outputs)"


def required_input(node: onnx.NodeProto, index: int = 0) -> str:
    """``node``'s input ``index``, or ModelError when the node does not have it."""
    if len(node.input) > index and node.input[index]:
        return node.input[index]
    raise ModelError(f"node {node_label(node)} ({node.op_type}) has no input {index}, "
                     "which its op requires")
