"""What is selectable: the lm_head (tied or not) and embeddings are left out by
default, --include-lm-head selects them, --exclude drops weights by regex."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper
import pytest

from _cli import assert_one_error, invoke
from _models import make_model, rng, tensor
from fps_onnx.errors import ModelError
from fps_onnx.onnx import graph
from fps_onnx.onnx.scope import ScopeConfig, in_scope, lm_head_keys
from fps_onnx.selection.exclude import drop_excluded
from fps_onnx.selection.maskfile import MaskFile

D, V = 4, 7


def ids_input():
    return tensor("input_ids", ["N", "S"], TensorProto.INT64)


def tied_lm(out: str = "logits") -> onnx.ModelProto:
    """Gather(emb) -> MatMul(w1) -> MatMul(Transpose(emb)) -> out."""
    r = rng(0)
    return make_model(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
            helper.make_node("MatMul", ["e", "w1"], ["h"]),
            helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["h", "emb_t"], [out]),
        ],
        [ids_input()],
        [tensor(out, ["N", "S", V])],
        {"emb": r.standard_normal((V, D)).astype(np.float32),
         "w1": r.standard_normal((D, D)).astype(np.float32)},
    )


def untied_lm(logits_shape=("N", "S", V), token_input: str = "input_ids") -> onnx.ModelProto:
    """Gather(emb, ids) -> MatMul(w1) -> MatMul(lm_head.weight) -> Add(bias) -> Cast -> logits."""
    r = rng(1)
    return make_model(
        [
            helper.make_node("Gather", ["emb", token_input], ["x"]),
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("MatMul", ["h", "lm_head.weight"], ["z"]),
            helper.make_node("Add", ["z", "lm_head.bias"], ["zb"]),
            helper.make_node("Cast", ["zb"], ["logits"], to=TensorProto.FLOAT),
        ],
        [tensor(token_input, ["N", "S"], TensorProto.INT64)],
        [tensor("logits", list(logits_shape))],
        {"emb": r.standard_normal((V, D)).astype(np.float32),
         "w1": r.standard_normal((D, D)).astype(np.float32),
         "lm_head.weight": r.standard_normal((D, V)).astype(np.float32),
         "lm_head.bias": r.standard_normal(V).astype(np.float32)},
    )


def test_a_classifier_head_feeding_logits_stays_selectable():
    """[batch, classes] logits (a sequence classifier), or a model without input_ids
    (an image classifier's `logits`), are not a vocabulary projection."""
    assert keys(untied_lm(logits_shape=("N", V))) == ["w1", "lm_head.weight"]
    assert keys(untied_lm(token_input="pixels")) == ["w1", "lm_head.weight"]


def keys(model, config=ScopeConfig()):
    return [s.key for s in in_scope(model, graph.find_weights(model), config)]


def test_tied_lm_head_is_found_through_the_transpose_of_the_embedding():
    model = tied_lm()
    assert [s.key for s in graph.find_weights(model)] == ["w1", "emb"]
    assert set(lm_head_keys(model, graph.find_weights(model))) == {"emb"}
    assert keys(model) == ["w1"]
    assert keys(model, ScopeConfig(include_lm_head=True)) == ["w1", "emb"]


def test_a_weight_read_by_a_gather_is_an_embedding_whatever_the_output_is_called():
    model = tied_lm(out="y")
    assert lm_head_keys(model, graph.find_weights(model)) == {"emb": "embedding, read by a Gather"}
    assert keys(model) == ["w1"]


def test_untied_lm_head_feeding_logits_through_bias_and_cast_is_left_out(caplog):
    model = untied_lm()
    with caplog.at_level(logging.INFO, logger="fps_onnx.onnx.scope"):
        assert keys(model) == ["w1"]
    assert "lm_head.weight (lm_head, feeds logits)" in caplog.text
    assert keys(model, ScopeConfig(include_lm_head=True)) == ["w1", "lm_head.weight"]


def test_a_last_matmul_not_feeding_logits_stays_selectable():
    model = untied_lm()
    model.graph.node[3].output[0] = "y"
    model.graph.output[0].name = "y"
    assert keys(model) == ["w1", "lm_head.weight"]


def test_logits_from_an_activation_product_name_no_weight():
    """logits = h @ h^T (no weight): nothing is taken for an lm_head."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["h", "ht"], ["logits"])],
        [tensor("x", [2, 3, D])], [tensor("logits", [2, 3, 3])],
        {"w1": np.eye(D, dtype=np.float32)},
    )
    assert keys(model) == ["w1"]


def test_exclude_regex_drops_matching_keys_and_nothing_left_is_an_error():
    model = untied_lm()
    config = ScopeConfig(include_lm_head=True, exclude=(r"^lm_head\.",))
    assert keys(model, config) == ["w1"]
    assert keys(model, ScopeConfig(exclude=("^$", "nothing"))) == ["w1"]
    with pytest.raises(ModelError, match=r"no selectable weight is left: w1 \(--exclude 1\$\)"):
        keys(model, ScopeConfig(exclude=("1$",)))
    with pytest.raises(ModelError, match="not a regular expression"):
        ScopeConfig(exclude=("(",))


def test_drop_excluded_matches_pytorch_names_of_mapped_masks():
    masks = MaskFile({"onnx::MatMul_1": np.ones((2, 2), bool), "w": np.zeros((2, 2), bool)},
                     {"onnx::MatMul_1": {"torch_name": "model.lm_head.weight"}, "w": {}}, {"m": "1"})
    kept = drop_excluded(masks, ScopeConfig(exclude=("lm_head",)))
    assert list(kept.masks) == ["w"] and list(kept.tensors) == ["w"] and kept.meta == {"m": "1"}
    assert drop_excluded(masks, ScopeConfig()) is masks


@pytest.fixture()
def untied_file(tmp_path):
    path = tmp_path / "lm.onnx"
    onnx.save(untied_lm(), path)
    np.save(tmp_path / "x.npy", rng(2).integers(0, V, (5, 3)))
    return path, tmp_path / "x.npy"


@pytest.mark.parametrize("extra, expected", [
    ((), ["w1"]),
    (("--include-lm-head",), ["lm_head.weight", "w1"]),
    (("--include-lm-head", "--exclude", "^w", "--exclude", "nothing"), ["lm_head.weight"]),
])
def test_cli_scope_options(untied_file, tmp_path, extra, expected):
    model, data = untied_file
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, data, "-o", out, *extra)
    assert result.exit_code == 0, result.output
    assert sorted(MaskFile.load(out).masks) == expected
    if not extra:
        assert "not selectable: lm_head.weight (lm_head, feeds logits)" in result.stderr


def test_cli_scope_applies_to_methods_without_data(untied_file, tmp_path):
    model, _ = untied_file
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, "-o", out, "--method", "magnitude", "-q")
    assert result.exit_code == 0, result.output
    assert list(MaskFile.load(out).masks) == ["w1"]


def test_cli_exclude_everything_is_one_error_line(untied_file, tmp_path):
    model, data = untied_file
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, data, "-o", out, "--exclude", ".", "-q")
    assert_one_error(result, "^Error: no selectable weight is left", absent=[out])
