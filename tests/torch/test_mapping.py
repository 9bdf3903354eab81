"""Mapping ONNX-keyed masks onto PyTorch parameter names (hand-built graphs, NumPy state_dicts)."""

from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto, helper
import pytest

from _models import make_model, rng, tensor
from fps_onnx.errors import MaskError
from fps_onnx.onnx import graph
from fps_onnx.selection.maskfile import MaskFile, build
from fps_onnx.torch.mapping import MatchConfig, map_masks, match_weights, onnx_weights


def _masks_for(model, seed: int = 3) -> MaskFile:
    """Random masks for every weight of ``model``, as `select` would write them."""
    r = rng(seed)
    sites = graph.find_weights(model)
    masks = {s.key: r.random(s.shape) < 0.3 for s in sites}
    return build(masks, sites, {"method": "fps", "model_sha256": "x"})


def _renamed_graph(w_fc, w_conv, w_extra=None, dtype=np.float32):
    """x[N,3,4,4] -> Conv('anon_conv') -> flatten -> MatMul('onnx::MatMul_7', stored [in, out])."""
    inits = {"anon_conv": w_conv.astype(dtype), "onnx::MatMul_7": w_fc.T.astype(dtype),
             "shape": np.array([0, -1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "anon_conv"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "onnx::MatMul_7"], ["y"]),
    ]
    outputs = [tensor("y", ["N", w_fc.shape[0]], TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT)]
    if w_extra is not None:
        inits["extra"] = w_extra.astype(dtype)
        nodes.append(helper.make_node("MatMul", ["y", "extra"], ["z"]))
        outputs.append(tensor("z", ["N", w_extra.shape[1]]))
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    return make_model(nodes, [tensor("x", ["N", 3, 4, 4], elem)], outputs, inits)


@pytest.fixture
def weights():
    r = rng(0)
    return {
        "conv.weight": r.standard_normal((2, 3, 3, 3)).astype(np.float32),
        "fc.weight": r.standard_normal((5, 32)).astype(np.float32),
        "fc.bias": r.standard_normal(5).astype(np.float32),
        "other.weight": r.standard_normal((7, 9)).astype(np.float32),
    }


def test_value_mapping_of_a_renamed_transposed_graph(weights):
    model = _renamed_graph(weights["fc.weight"], weights["conv.weight"])
    masks = _masks_for(model)
    mapped, report = map_masks(masks, weights, model)

    assert set(mapped.masks) == {"conv.weight", "fc.weight"}
    assert report.matches["onnx::MatMul_7"].how == "exact"
    # The mask was already in PyTorch layout [out, in]; it must be the same entries.
    np.testing.assert_array_equal(mapped.masks["fc.weight"], masks.masks["onnx::MatMul_7"])
    np.testing.assert_array_equal(mapped.masks["conv.weight"], masks.masks["anon_conv"])
    entry = mapped.tensors["fc.weight"]
    assert entry["onnx_initializer"] == "onnx::MatMul_7"
    assert entry["torch_name"] == "fc.weight"
    assert entry["onnx_layout"] == "in_out"
    assert json.loads(mapped.meta["unmapped"]) == []


def test_parameter_stored_in_out_gets_a_transposed_mask(weights):
    # A Conv1D-style parameter holds [in, out]: the mask must follow it.
    model = _renamed_graph(weights["fc.weight"], weights["conv.weight"])
    state = {"conv.weight": weights["conv.weight"], "c_fc.weight": weights["fc.weight"].T.copy()}
    masks = _masks_for(model)
    mapped, report = map_masks(masks, state, model)

    assert report.matches["onnx::MatMul_7"].transposed
    assert mapped.masks["c_fc.weight"].shape == (32, 5)
    np.testing.assert_array_equal(mapped.masks["c_fc.weight"], masks.masks["onnx::MatMul_7"].T)
    assert mapped.tensors["c_fc.weight"]["torch_transposed"] is True


def test_fp16_weights_compare_in_fp16(weights):
    model = _renamed_graph(weights["fc.weight"], weights["conv.weight"], dtype=np.float16)
    mapped, report = map_masks(_masks_for(model), weights, model)
    assert {m.torch_name for m in report.matches.values()} == {"conv.weight", "fc.weight"}
    assert all(m.how == "exact" for m in report.matches.values())


def test_close_values_match_within_tolerance_only(weights):
    noisy = weights["fc.weight"] * (1 + 1e-6)
    model = _renamed_graph(noisy, weights["conv.weight"])
    _, report = map_masks(_masks_for(model), weights, model)
    assert report.matches["onnx::MatMul_7"].how == "close"

    far = weights["fc.weight"] + 1e-2
    model = _renamed_graph(far, weights["conv.weight"])
    _, report = map_masks(_masks_for(model), weights, model)
    assert "onnx::MatMul_7" in report.unmapped


def test_strict_fails_naming_the_unmapped_weight(weights):
    extra = rng(5).standard_normal((5, 4)).astype(np.float32)  # in no state_dict
    model = _renamed_graph(weights["fc.weight"], weights["conv.weight"], w_extra=extra)
    masks = _masks_for(model)
    with pytest.raises(MaskError, match="could not be mapped.*extra"):
        map_masks(masks, weights, model, strict=True)

    mapped, report = map_masks(masks, weights, model)
    assert list(report.unmapped) == ["extra"]
    assert "extra" not in mapped.masks
    assert json.loads(mapped.meta["unmapped"]) == ["extra"]
    assert "unmapped: extra" in report.summary()


def test_tied_weights_end_as_one_or_mask(weights):
    # The same parameter used twice, once as a plain copy, once transposed.
    w = weights["other.weight"]  # [7, 9]
    model = make_model(
        [helper.make_node("Gemm", ["x", "copy_a"], ["h"], transB=1),
         helper.make_node("MatMul", ["x", "copy_b"], ["y"])],
        [tensor("x", ["N", 9])], [tensor("h", ["N", 7]), tensor("y", ["N", 7])],
        {"copy_a": w, "copy_b": w.T.copy()},
    )
    masks = _masks_for(model)
    mapped, report = map_masks(masks, {"other.weight": w}, model)

    assert list(mapped.masks) == ["other.weight"]
    assert report.tied == {"other.weight": ["copy_a", "copy_b"]}
    np.testing.assert_array_equal(mapped.masks["other.weight"],
                                  masks.masks["copy_a"] | masks.masks["copy_b"])
    entry = mapped.tensors["other.weight"]
    assert entry["tied_onnx_initializers"] == ["copy_a", "copy_b"]
    assert entry["selected"] == int(mapped.masks["other.weight"].sum())


def test_batchnorm_folded_conv_matches_by_row_scale(weights):
    scale = rng(2).uniform(0.5, 2.0, size=(2, 1, 1, 1)).astype(np.float32)
    model = _renamed_graph(weights["fc.weight"], weights["conv.weight"] * scale)
    _, report = map_masks(_masks_for(model), weights, model)
    assert report.matches["anon_conv"].how == "scaled"
    assert report.matches["anon_conv"].torch_name == "conv.weight"

    _, report = map_masks(_masks_for(model), weights, model, config=MatchConfig(scaled=False))
    assert "anon_conv" in report.unmapped


def test_equal_weights_pair_in_order_or_stay_ambiguous():
    zeros = np.zeros((4, 4), np.float32)
    found = {"w_a": zeros, "w_b": zeros}
    report = match_weights(found, {"l1.weight": zeros, "l2.weight": zeros.copy()})
    assert {k: m.torch_name for k, m in report.matches.items()} == {"w_a": "l1.weight", "w_b": "l2.weight"}
    assert {m.how for m in report.matches.values()} == {"order"}

    report = match_weights({"w_a": zeros}, {"l1.weight": zeros, "l2.weight": zeros.copy()})
    assert report.unmapped["w_a"].startswith("ambiguous")


def test_masks_from_another_model_fail(weights):
    model = _renamed_graph(weights["fc.weight"], weights["conv.weight"])
    masks = _masks_for(model)
    unrelated = {"a.weight": rng(9).standard_normal((5, 32)).astype(np.float32)}
    with pytest.raises(MaskError, match="another model"):
        map_masks(masks, unrelated, model)

    other = _renamed_graph(rng(4).standard_normal((6, 32)).astype(np.float32), weights["conv.weight"])
    with pytest.raises(MaskError, match="another model"):
        map_masks(masks, weights, other)  # mask shapes do not fit this ONNX model


def test_names_only_without_the_onnx_model(weights):
    masks = MaskFile({"fc.weight": np.ones((5, 32), bool), "anon": np.ones((2, 2), bool)},
                     {"fc.weight": {"onnx_initializer": "fc.weight"}}, {})
    mapped, report = map_masks(masks, weights)
    assert list(mapped.masks) == ["fc.weight"] and "anon" in report.unmapped

    wrong = MaskFile({"fc.weight": np.ones((4, 32), bool)}, {}, {})
    with pytest.raises(MaskError, match="shape"):
        map_masks(wrong, weights)


def test_onnx_weights_are_in_pytorch_layout(weights):
    model = _renamed_graph(weights["fc.weight"], weights["conv.weight"])
    values, dtypes = onnx_weights(model)
    np.testing.assert_array_equal(values["onnx::MatMul_7"], weights["fc.weight"])
    assert dtypes["anon_conv"] == TensorProto.FLOAT


def test_torch_tied_parameters_fold_onto_one_name():
    torch = pytest.importorskip("torch")
    emb = torch.nn.Embedding(11, 6)
    head = torch.nn.Linear(6, 11, bias=False)
    head.weight = emb.weight
    state = {"emb.weight": emb.weight, "head.weight": head.weight}
    w = emb.weight.detach().numpy()
    report = match_weights({"onnx::MatMul_3": w}, state)
    assert report.matches["onnx::MatMul_3"].torch_name == "emb.weight"
    assert report.aliases == {"emb.weight": ["emb.weight", "head.weight"]}


def test_by_name_a_parameter_stored_in_out_gets_its_mask_transposed_even_when_square():
    torch = pytest.importorskip("torch")
    state = {"sq": torch.zeros(4, 4, dtype=torch.bfloat16), "lin": torch.zeros(4, 4), "wide": torch.zeros(4, 6)}
    masks = MaskFile({"sq": np.eye(4, k=1, dtype=bool), "lin": np.eye(4, k=1, dtype=bool),
                      "wide": np.eye(6, 4, dtype=bool)}, {})
    mapped, report = map_masks(masks, state, in_out={"sq"})
    np.testing.assert_array_equal(mapped.dense("sq"), np.eye(4, k=-1, dtype=bool))  # [in, out]
    np.testing.assert_array_equal(mapped.dense("lin"), np.eye(4, k=1, dtype=bool))  # as it was
    np.testing.assert_array_equal(mapped.dense("wide"), np.eye(4, 6, dtype=bool))  # the shape tells
    assert [mapped.tensors[k].get("torch_transposed", False) for k in ("sq", "lin", "wide")] == [True, False, True]
    with pytest.raises(MaskError, match=r"the parameter \[4, 6\] \(stored \[in, out\]\)"):
        map_masks(MaskFile({"wide": np.ones((4, 6), bool)}, {}), state, in_out={"wide"})
