"""Reading a model's graph with its embedded weights referenced in place."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

from fps_onnx.errors import ModelError
from fps_onnx.onnx import protofile
from fps_onnx.onnx.graph import tensor_value
from fps_onnx.onnx.load import load_graph


def _model() -> onnx.ModelProto:
    """x @ W (large) + b (small), and an If whose branch holds its own large weight."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    inner = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "inner")
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["y", "inner"], ["z"])], "then", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [inner],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["z2"])], "else", [],
        [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
        helper.make_node("If", ["flag"], ["out"], then_branch=branch, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_large_weights_become_references_to_their_bytes_in_the_file(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    light, folder = protofile.load_graph(path)
    assert folder == str(tmp_path)

    by_name = {t.name: t for t in light.graph.initializer}
    w = by_name["W"]
    assert w.data_location == TensorProto.EXTERNAL and not w.raw_data
    info = {e.key: e.value for e in w.external_data}
    assert info["location"] == "m.onnx" and int(info["length"]) == 64 * 32 * 4
    raw = path.read_bytes()[int(info["offset"]):int(info["offset"]) + int(info["length"])]
    assert raw == model.graph.initializer[0].raw_data
    np.testing.assert_array_equal(tensor_value(w, str(tmp_path)), numpy_helper.to_array(model.graph.initializer[0]))
    # small weights and subgraphs stay as they are, byte for byte
    assert by_name["b"] == model.graph.initializer[1]
    assert list(light.graph.node) == list(model.graph.node)
    assert light.graph.input == model.graph.input and light.opset_import == model.opset_import
    assert light.ByteSize() < model.ByteSize() - 64 * 32 * 4 + 200  # only W's bytes left


def test_a_model_with_external_data_is_read_unchanged(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    light, folder = protofile.load_graph(path)
    assert light == onnx.load(str(path), load_external_data=False) and folder == str(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x3b garbage", b"not an onnx model at all"])
def test_bytes_that_are_not_a_model_are_refused(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(protofile.MalformedProto):
        protofile.load_graph(path)
    with pytest.raises(ModelError, match="bad.onnx"):
        load_graph(path)


def test_truncated_model_is_refused_with_its_name(tmp_path):
    path = tmp_path / "cut.onnx"
    onnx.save(_model(), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError, match="cut.onnx"):
        load_graph(path)


def test_a_linked_model_with_its_own_external_data_keeps_that_folder(tmp_path):
    model = _model()
    w = numpy_helper.to_array(model.graph.initializer[0])  # saving moves it out of the message
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=5000)  # W (8 KiB) external
    mixed = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    big = np.arange(2048, dtype=np.float32)
    mixed.graph.initializer.append(numpy_helper.from_array(big, "E"))  # 8 KiB embedded
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "9c").write_bytes(mixed.SerializeToString())
    (tmp_path / "linked.onnx").symlink_to(tmp_path / "blobs" / "9c")

    here, folder = protofile.load_graph(tmp_path / "blobs" / "9c")  # not a link: E referenced in place
    e = {t.name: t for t in here.graph.initializer}["E"]
    assert e.data_location == TensorProto.EXTERNAL and folder == str(tmp_path / "blobs")
    linked, folder = protofile.load_graph(tmp_path / "linked.onnx")  # ext.data lies beside the link
    by_name = {t.name: t for t in linked.graph.initializer}
    assert folder == str(tmp_path)
    np.testing.assert_array_equal(numpy_helper.to_array(by_name["E"]), big)  # stays embedded
    np.testing.assert_array_equal(tensor_value(by_name["W"], folder), w)
