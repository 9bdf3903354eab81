"""The bounded producer walk: three-node graphs, good and cyclic."""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import helper, numpy_helper
import pytest

from fps_onnx.errors import ModelError
from fps_onnx.onnx import decoder, graph, scope
from fps_onnx.onnx.edges import Producers, required_input
from fps_onnx.onnx.ops import Lookup

W = numpy_helper.from_array(np.ones((6, 5), np.float32), "w")


def nodes_graph(nodes, initializers=()) -> onnx.GraphProto:
    """A graph of ``nodes`` as given (no checks: cycles and missing inputs stay)."""
    return helper.make_graph(nodes, "g", [], [], list(initializers))


def test_trace_follows_until_step_stops_and_returns_that_tensor():
    g = nodes_graph([helper.make_node("Identity", ["w"], ["a"]), helper.make_node("Cast", ["a"], ["b"], to=1),
                     helper.make_node("Relu", ["b"], ["c"])])
    producers = Producers.of(g)
    seen = []

    def step(name, node):
        seen.append(name)
        return required_input(node) if node is not None and node.op_type != "Cast" else None

    assert producers.trace("c", step) == "b"
    assert seen == ["c", "b"]
    assert producers.trace("w", step) == "w"  # no producer: stops at once
    assert set(producers) == {"a", "b", "c"} and len(producers) == 3


@pytest.mark.parametrize("length", [1, 2, 3, 5])
def test_a_cycle_of_any_length_is_refused_naming_a_tensor_on_it(length):
    names = [f"t{i}" for i in range(length)]
    ops = ["Identity", "Transpose", "Cast"]
    nodes = [helper.make_node(ops[i % 3], [names[(i + 1) % length]], [names[i]],
                              **({"to": 1} if ops[i % 3] == "Cast" else {})) for i in range(length)]
    lookup = Lookup.of(nodes_graph(nodes))
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cycle through tensor 't\d'"):
        lookup.constant("t0")
    with pytest.raises(ModelError, match="cycle"):
        lookup.dequantized("t0")
    assert time.perf_counter() - start < 1


def test_a_path_into_a_cycle_is_refused_and_a_path_beside_it_is_not():
    nodes = [helper.make_node("Identity", ["b"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
             helper.make_node("Identity", ["a"], ["into"]), helper.make_node("Identity", ["w"], ["beside"])]
    lookup = Lookup.of(nodes_graph(nodes, [W]))
    with pytest.raises(ModelError, match="cycle"):
        lookup.constant("into")
    traced = lookup.constant("beside")
    assert traced is not None and traced.key == "w" and not traced.transposed


def test_a_transpose_twice_is_not_a_cycle():
    nodes = [helper.make_node("Transpose", ["w"], ["a"], perm=[1, 0]),
             helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0]), helper.make_node("Identity", ["b"], ["c"])]
    traced = Lookup.of(nodes_graph(nodes, [W])).constant("c")
    assert traced is not None and (traced.key, traced.transposed) == ("w", False)


def test_a_pass_through_node_without_its_input_is_refused_by_name():
    nodes = [helper.make_node("Identity", [], ["a"], name="lost"), helper.make_node("Cast", ["a"], ["b"], to=1)]
    with pytest.raises(ModelError, match=r"node lost \(Identity\) has no input 0"):
        Lookup.of(nodes_graph(nodes)).constant("b")


def test_sign_analysis_refuses_a_cycle_of_reshapes():
    nodes = [helper.make_node("Reshape", ["r3", "s"], ["r1"]), helper.make_node("Flatten", ["r1"], ["r2"]),
             helper.make_node("Squeeze", ["r2"], ["r3"])]
    with pytest.raises(ModelError, match="cycle"):
        graph._non_negative("r1", Producers.of(nodes_graph(nodes)))
    ok = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Reshape", ["a", "s"], ["b"]),
          helper.make_node("Flatten", ["b"], ["c"])]
    assert graph._non_negative("c", Producers.of(nodes_graph(ok)))
    assert not graph._non_negative("x", Producers.of(nodes_graph(ok)))


def test_lm_head_walk_refuses_a_cycle_behind_logits():
    nodes = [helper.make_node("Add", ["h", "bias"], ["logits"]), helper.make_node("Identity", ["logits"], ["h"]),
             helper.make_node("MatMul", ["x", "w"], ["unused"])]
    with pytest.raises(ModelError, match="cycle"):
        scope._logits_node(Producers.of(nodes_graph(nodes)), {"bias", "w"})
    good = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["a"]),
            helper.make_node("Cast", ["a"], ["logits"], to=1)]
    assert scope._logits_node(Producers.of(nodes_graph(good)), {"bias", "w"}).op_type == "MatMul"


def test_projection_width_walk_refuses_a_cycle_of_adds():
    nodes = [helper.make_node("Add", ["b", "bias"], ["a"]), helper.make_node("Add", ["a", "bias"], ["b"]),
             helper.make_node("Identity", ["a"], ["q"])]
    with pytest.raises(ModelError, match="cycle"):
        decoder._width("a", Producers.of(nodes_graph(nodes)), {"bias": None})
    good = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["a"])]
    assert decoder._width("a", Producers.of(nodes_graph(good)), {"w": W, "bias": None}) == 5


def test_producers_leave_out_empty_output_names():
    g = nodes_graph([helper.make_node("Dropout", ["x"], ["y", ""])])
    assert set(Producers.of(g)) == {"y"}
