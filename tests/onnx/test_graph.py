"""find_weights and add_statistics on hand-built three-node graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
import onnxruntime as ort
import pytest

from _models import make_model, rng, tensor
from fps_onnx.errors import ModelError
from fps_onnx.onnx import graph


def sites_of(model):
    return {s.key: s for s in graph.find_weights(model)}


def run_stats(model, sites, feed, statistics=("abs_sum", "sq_sum"), **kw):
    model, outputs = graph.add_statistics(model, sites, statistics, **kw)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(outputs)
    values = session.run(names, feed)
    return {(outputs[n].activation.tensor, outputs[n].statistic): v for n, v in zip(names, values)}


def test_matmul_in_out_initializer():
    w = rng().standard_normal((6, 4)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", ["N", 3, 6])], [tensor("y", ["N", 3, 4])], {"w": w})
    (site,) = graph.find_weights(model)
    assert (site.key, site.op, site.layout, site.shape, site.in_features) == ("w", "MatMul", "in_out", (4, 6), 6)
    assert site.activations == (graph.Activation("x", -1),)
    (_, value), = graph.iter_weight_values(model, [site])
    np.testing.assert_array_equal(value, w.T)


def test_matmul_through_transpose_identity_cast_is_out_in():
    w = rng().standard_normal((4, 6)).astype(np.float32)
    model = make_model(
        [helper.make_node("Identity", ["w"], ["wi"]),
         helper.make_node("Cast", ["wi"], ["wc"], to=TensorProto.FLOAT),
         helper.make_node("Transpose", ["wc"], ["wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"])],
        [tensor("x", ["N", 6])], [tensor("y", ["N", 4])], {"w": w})
    (site,) = graph.find_weights(model)
    assert (site.key, site.layout, site.shape) == ("w", "out_in", (4, 6))
    (_, value), = graph.iter_weight_values(model, [site])
    np.testing.assert_array_equal(value, w)


def test_weight_consumers_are_the_named_nodes_using_each_weight():
    """Through Transpose/Identity, tied uses listed in graph order; unnamed nodes,
    pass-through nodes and non-weight inputs (Gather, Add) left out."""
    w = rng().standard_normal((4, 6)).astype(np.float32)
    v = rng().standard_normal((4, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("Identity", ["w"], ["wi"], name="/id"),
         helper.make_node("Transpose", ["wi"], ["wt"], perm=[1, 0], name="/t"),
         helper.make_node("MatMul", ["x", "wt"], ["h"], name="/a/MatMul"),
         helper.make_node("MatMul", ["h", "v"], ["g"], name="/b/MatMul"),
         helper.make_node("MatMul", ["g", "v"], ["f"], name="/c/MatMul"),
         helper.make_node("MatMul", ["f", "v"], ["e"]),
         helper.make_node("Add", ["e", "v"], ["y"], name="/add")],
        [tensor("x", ["N", 6])], [tensor("y", [4, 4])], {"w": w, "v": v})
    assert graph.weight_consumers(model.graph) == {"w": ["/a/MatMul"], "v": ["/b/MatMul", "/c/MatMul"]}


@pytest.mark.parametrize("trans_b, layout", [(1, "out_in"), (0, "in_out")])
def test_gemm_trans_b(trans_b, layout):
    w = rng().standard_normal((4, 6) if trans_b else (6, 4)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b)],
                       [tensor("x", ["N", 6])], [tensor("y", ["N", 4])], {"w": w})
    (site,) = graph.find_weights(model)
    assert (site.layout, site.shape, site.activations[0].axis) == (layout, (4, 6), -1)


def test_gemm_trans_a_reduces_over_columns():
    w = rng().standard_normal((6, 4)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)],
                       [tensor("x", [6, "N"])], [tensor("y", ["N", 4])], {"w": w})
    (site,) = graph.find_weights(model)
    assert site.activations[0].axis == 0 and site.shape == (4, 6)
    x = rng(1).standard_normal((6, 5)).astype(np.float32)
    got = run_stats(model, [site], {"x": x})
    np.testing.assert_allclose(got[("x", "abs_sum")], np.abs(x).sum(1), rtol=1e-6)
    assert got[("x", "count")] == x.size


def test_grouped_conv_site_and_channel_statistics():
    w = rng().standard_normal((8, 2, 3, 3)).astype(np.float32)  # groups=2, C_in=4
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1])],
                       [tensor("x", ["N", 4, 5, 5])], [tensor("y", ["N", 8, 5, 5])], {"w": w})
    (site,) = graph.find_weights(model)
    assert (site.layout, site.shape, site.groups, site.in_features) == ("conv", (8, 2, 3, 3), 2, 4)
    x = rng(2).standard_normal((3, 4, 5, 5)).astype(np.float32)
    got = run_stats(model, [site], {"x": x})
    np.testing.assert_allclose(got[("x", "abs_sum")], np.abs(x).sum((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(got[("x", "sq_sum")], (x**2).sum((0, 2, 3)), rtol=1e-5)
    assert got[("x", "count")] // 4 == 3 * 5 * 5


def test_attention_matmul_between_activations_is_skipped():
    w = rng().standard_normal((6, 6)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["q"]),
         helper.make_node("Transpose", ["q"], ["k"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["q", "k"], ["y"])],
        [tensor("x", ["N", 3, 6])], [tensor("y", ["N", 3, 3])], {"w": w})
    assert list(sites_of(model)) == ["w"]


def test_tied_weight_is_one_site_with_both_inputs():
    w = rng().standard_normal((5, 5)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Tanh", ["h"], ["t"]),
         helper.make_node("MatMul", ["t", "w"], ["y"])],
        [tensor("x", ["N", 5])], [tensor("y", ["N", 5])], {"w": w})
    (site,) = graph.find_weights(model)
    assert [a.tensor for a in site.activations] == ["x", "t"]
    x = rng(3).standard_normal((4, 5)).astype(np.float32)
    got = run_stats(model, [site], {"x": x})
    t = np.tanh(x @ w)
    np.testing.assert_allclose(got[("t", "abs_sum")], np.abs(t).sum(0), rtol=1e-5)


def test_constant_node_weight_is_found():
    w = rng().standard_normal((3, 2)).astype(np.float32)
    const = helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w))
    model = make_model([const, helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", ["N", 3])], [tensor("y", ["N", 2])], {})
    (site,) = graph.find_weights(model)
    (_, value), = graph.iter_weight_values(model, [site])
    np.testing.assert_array_equal(value, w.T)


def test_model_without_weights_is_rejected():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [tensor("x", ["N", 3])], [tensor("y", ["N", 3])], {})
    with pytest.raises(ModelError, match="no weight"):
        graph.find_weights(model)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_statistics_match_numpy_for_rank3_input_across_opsets(opset):
    w = rng().standard_normal((6, 4)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", ["N", 3, 6])], [tensor("y", ["N", 3, 4])], {"w": w}, opset=opset)
    sites = graph.find_weights(model)
    x = rng(4).standard_normal((2, 3, 6)).astype(np.float32)
    got = run_stats(model, sites, {"x": x})
    np.testing.assert_allclose(got[("x", "abs_sum")], np.abs(x).reshape(-1, 6).sum(0), rtol=1e-6)
    np.testing.assert_allclose(got[("x", "sq_sum")], (x**2).reshape(-1, 6).sum(0), rtol=1e-5)
    assert got[("x", "count")] == x.size
    assert sorted(o.name for o in model.graph.output)[0] == "fps_stat::0::abs_sum"


def test_shared_activation_is_reduced_once():
    r = rng()
    model = make_model(
        [helper.make_node("MatMul", ["x", "a"], ["ya"]),
         helper.make_node("MatMul", ["x", "b"], ["yb"]),
         helper.make_node("Add", ["ya", "yb"], ["y"])],
        [tensor("x", ["N", 4])], [tensor("y", ["N", 3])],
        {"a": r.standard_normal((4, 3)).astype(np.float32),
         "b": r.standard_normal((4, 3)).astype(np.float32)})
    _, outputs = graph.add_statistics(model, graph.find_weights(model), ("abs_sum",))
    assert sorted(o.statistic for o in outputs.values()) == ["abs_sum", "count"]


def test_token_mask_excludes_padded_positions():
    w = rng().standard_normal((6, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", ["B", "S", 6]), tensor("attention_mask", ["B", "S"], TensorProto.INT64)],
        [tensor("y", ["B", "S", 4])], {"w": w})
    sites = graph.find_weights(model)
    assert graph.token_leading(model, ["x"], "attention_mask") == {"x"}
    x = rng(5).standard_normal((2, 4, 6)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=np.int64)
    got = run_stats(model, sites, {"x": x, "attention_mask": mask},
                    token_mask="attention_mask", masked_activations={"x"})
    kept = x[mask.astype(bool)]
    np.testing.assert_allclose(got[("x", "abs_sum")], np.abs(kept).sum(0), rtol=1e-6)
    np.testing.assert_allclose(got[("x", "sq_sum")], (kept**2).sum(0), rtol=1e-5)


def test_fp16_activations_are_summed_in_fp32():
    w = rng().standard_normal((8, 3)).astype(np.float16)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", ["N", 8], TensorProto.FLOAT16)],
                       [tensor("y", ["N", 3], TensorProto.FLOAT16)], {"w": w})
    sites = graph.find_weights(model)
    assert sites[0].dtype == TensorProto.FLOAT16
    x = np.full((400, 8), 300.0, np.float16)  # the sum (120,000) overflows fp16
    got = run_stats(model, sites, {"x": x})
    np.testing.assert_allclose(got[("x", "abs_sum")], np.full(8, 120_000.0), rtol=1e-6)
    assert got[("x", "abs_sum")].dtype == np.float32


@pytest.mark.parametrize("before, abs_pass", [("Relu", False), ("Sigmoid", False), ("Neg", True)])
def test_abs_pass_is_left_out_only_after_non_negative_ops(before, abs_pass):
    # before -> MaxPool (keeps signs) -> Conv 1x1: sum |a| of the conv input
    w = rng().standard_normal((3, 2, 1, 1)).astype(np.float32)
    model = make_model(
        [helper.make_node(before, ["x"], ["a"]),
         helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2]),
         helper.make_node("Conv", ["p", "w"], ["y"])],
        [tensor("x", ["N", 2, 4, 4])], [tensor("y", ["N", 3, 3, 3])], {"w": w})
    sites = graph.find_weights(model)
    x = rng(5).standard_normal((2, 2, 4, 4)).astype(np.float32)
    got = run_stats(model, sites, {"x": x})
    a = {"Relu": np.maximum(x, 0), "Sigmoid": 1 / (1 + np.exp(-x)), "Neg": -x}[before]
    pooled = np.lib.stride_tricks.sliding_window_view(a, (2, 2), axis=(2, 3)).max((-2, -1))
    np.testing.assert_allclose(got[("p", "abs_sum")], np.abs(pooled).sum((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(got[("p", "sq_sum")], (pooled**2).sum((0, 2, 3)), rtol=1e-5)
    assert any(n.op_type == "Abs" for n in model.graph.node) == abs_pass


def test_models_before_opset_9_are_refused():
    w = rng().standard_normal((6, 4)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", ["N", 6])], [tensor("y", ["N", 4])], {"w": w}, opset=8)
    with pytest.raises(ModelError, match="opset 8"):
        graph.add_statistics(model, graph.find_weights(model))
