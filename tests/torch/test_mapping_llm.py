"""Mapping masks of decoder-LLM ONNX layouts onto the causal LM's parameter names.

Fast tests build each exporter's layout with onnx.helper: onnxruntime-genai's packed
``qkv_proj`` ([in, q+k+v] stored) and fused gate/up, its int4 ``MatMulNBits`` weights,
optimum's merged ``If(use_cache_branch)`` file and GPT-2's ``Conv1D`` Gemm ([in, out]).
Slow tests run the real exporters (tests/llm_models.py; skipped where their venv is missing)
and map masks of every file onto ``AutoModelForCausalLM`` with ``--strict``.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

from _cli import invoke
from _models import make_model, rng, tensor
from fps_onnx.errors import MaskError
from fps_onnx.onnx import graph
from fps_onnx.selection.maskfile import MaskFile, build
from fps_onnx.torch.mapping import MatchConfig, builder_candidates, map_masks, module_paths

HIDDEN, Q, KV, FFN = 16, 16, 8, 24  # 4 heads of 4, 2 kv heads: q rows 16, k and v rows 8
MS_OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _state(seed: int = 0, layers: int = 1) -> dict[str, np.ndarray]:
    """A Llama-like state_dict (PyTorch layout [out, in]) of ``layers`` decoder layers."""
    r = rng(seed)
    state = {}
    for i in range(layers):
        pre = f"model.layers.{i}"
        for name, shape in (("self_attn.q_proj", (Q, HIDDEN)), ("self_attn.k_proj", (KV, HIDDEN)),
                            ("self_attn.v_proj", (KV, HIDDEN)), ("self_attn.o_proj", (HIDDEN, Q)),
                            ("mlp.gate_proj", (FFN, HIDDEN)), ("mlp.up_proj", (FFN, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, FFN))):
            state[f"{pre}.{name}.weight"] = r.standard_normal(shape).astype(np.float32)
        state[f"{pre}.input_layernorm.weight"] = r.standard_normal(HIDDEN).astype(np.float32)
    return state


def _packed(state, i=0, parts=("q", "k", "v"), kind="self_attn"):
    return np.concatenate([state[f"model.layers.{i}.{kind}.{p}_proj.weight"] for p in parts])


def _masks_for(model, seed: int = 3) -> MaskFile:
    """Random masks of every weight, as `select` writes them (PyTorch layout [out, in])."""
    r = rng(seed)
    sites = graph.find_weights(model)
    return build({s.key: r.random(s.shape) < 0.4 for s in sites}, sites,
                 {"method": "fps", "model_sha256": "x"})


def _genai_fp_layer(state, dtype=np.float32, fuse_gate_up=False, qkv_name=None) -> onnx.ModelProto:
    """One decoder layer as the onnxruntime-genai builder writes it (fp32/fp16): weights
    ``model.layers.0.<attn|mlp>.<proj>.MatMul.weight`` stored [in, out], qkv packed."""
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inits, nodes = {}, []

    def matmul(proj, x, w, out, init_name=None):
        name = init_name or f"model.layers.0.{proj.replace('/', '.')}.MatMul.weight"
        inits[name] = np.ascontiguousarray(w.T).astype(dtype)
        nodes.append(helper.make_node("MatMul", [x, name], [out], name=f"/model/layers.0/{proj}/MatMul"))

    matmul("attn/qkv_proj", "x", _packed(state), "qkv", qkv_name)
    inits["split"] = np.array([Q, KV, KV], np.int64)
    nodes.append(helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=-1))
    matmul("attn/o_proj", "q", state["model.layers.0.self_attn.o_proj.weight"], "o")
    if fuse_gate_up:
        matmul("mlp/gate_up_proj", "o", _packed(state, parts=("gate", "up"), kind="mlp"), "gu")
        inits["split2"] = np.array([FFN, FFN], np.int64)
        nodes.append(helper.make_node("Split", ["gu", "split2"], ["gate", "up"], axis=-1))
    else:
        matmul("mlp/gate_proj", "o", state["model.layers.0.mlp.gate_proj.weight"], "gate")
        matmul("mlp/up_proj", "o", state["model.layers.0.mlp.up_proj.weight"], "up")
    nodes.append(helper.make_node("Mul", ["gate", "up"], ["h"]))
    matmul("mlp/down_proj", "h", state["model.layers.0.mlp.down_proj.weight"], "y")
    return make_model(nodes, [tensor("x", ["N", HIDDEN], elem)], [tensor("y", ["N", HIDDEN], elem),
                      tensor("k", ["N", KV], elem), tensor("v", ["N", KV], elem)], inits)


def test_packed_qkv_splits_into_q_k_v_by_rows():
    state = _state()
    model = _genai_fp_layer(state)
    masks = _masks_for(model)
    mapped, report = map_masks(masks, state, model, strict=True)

    linear = {k for k, v in state.items() if v.ndim == 2}
    assert set(mapped.masks) == linear  # one mask per parameter, the packed one gone
    packed = masks.masks["model.layers.0.attn.qkv_proj.MatMul.weight"]
    assert packed.shape == (Q + 2 * KV, HIDDEN)
    for name, rows in (("q", (0, Q)), ("k", (Q, Q + KV)), ("v", (Q + KV, Q + 2 * KV))):
        key = f"model.layers.0.self_attn.{name}_proj.weight"
        assert mapped.masks[key].shape == state[key].shape
        np.testing.assert_array_equal(mapped.masks[key], packed[rows[0]:rows[1]])
        entry = mapped.tensors[key]
        assert entry["onnx_initializer"] == "model.layers.0.attn.qkv_proj.MatMul.weight"
        assert entry["torch_rows"] == list(rows) and entry["match"] == "exact"
        assert entry["selected"] == int(packed[rows[0]:rows[1]].sum())
    parts = report.parts["model.layers.0.attn.qkv_proj.MatMul.weight"]
    assert [(m.torch_name.split(".")[-2], m.rows) for m in parts] == [
        ("q_proj", (0, Q)), ("k_proj", (Q, Q + KV)), ("v_proj", (Q + KV, Q + 2 * KV))]
    assert "1 packed weight(s) split into 3 parameters" in report.summary()
    assert report.to_json()["mapped"]["model.layers.0.attn.qkv_proj.MatMul.weight"]["parts"][1] == {
        "torch_name": "model.layers.0.self_attn.k_proj.weight", "how": "exact", "transposed": False,
        "rows": [Q, Q + KV]}


def test_packed_weight_with_an_anonymous_name_splits_by_value(tmp_path):
    # No builder name to go by: each row block is found by value from its first row.
    state = _state()
    model = _genai_fp_layer(state, qkv_name="onnx::MatMul_91")
    masks = _masks_for(model)
    mapped, report = map_masks(masks, state, model, strict=True)
    assert [m.torch_name for m in report.parts["onnx::MatMul_91"]] == [
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    np.testing.assert_array_equal(mapped.masks["model.layers.0.self_attn.v_proj.weight"],
                                  masks.masks["onnx::MatMul_91"][Q + KV:])
    # The mapped file saves and reads back with its row metadata.
    mapped.save(tmp_path / "m.safetensors")
    back = MaskFile.load(tmp_path / "m.safetensors")
    assert back.tensors["model.layers.0.self_attn.k_proj.weight"]["torch_rows"] == [Q, Q + KV]


def test_packed_fp16_weight_compares_in_fp16():
    state = _state()
    model = _genai_fp_layer(state, dtype=np.float16)
    mapped, report = map_masks(_masks_for(model), state, model, strict=True)
    assert {m.how for _, m in report.pairs()} == {"exact"}
    assert len(report.parts) == 1 and set(mapped.masks) == {k for k, v in state.items() if v.ndim == 2}


def test_fused_gate_up_splits_into_gate_and_up():
    state = _state()
    model = _genai_fp_layer(state, fuse_gate_up=True)
    masks = _masks_for(model)
    mapped, report = map_masks(masks, state, model, strict=True)
    packed = masks.masks["model.layers.0.mlp.gate_up_proj.MatMul.weight"]
    np.testing.assert_array_equal(mapped.masks["model.layers.0.mlp.gate_proj.weight"], packed[:FFN])
    np.testing.assert_array_equal(mapped.masks["model.layers.0.mlp.up_proj.weight"], packed[FFN:])
    assert mapped.tensors["model.layers.0.mlp.up_proj.weight"]["torch_rows"] == [FFN, 2 * FFN]


def test_a_model_that_keeps_qkv_packed_maps_it_whole():
    # Phi-3 style: the PyTorch model has self_attn.qkv_proj itself; the table's first choice.
    state = _state()
    state["model.layers.0.self_attn.qkv_proj.weight"] = _packed(state)
    for p in "qkv":
        del state[f"model.layers.0.self_attn.{p}_proj.weight"]
    model = _genai_fp_layer(state | {f"model.layers.0.self_attn.{p}_proj.weight": w for p, w in zip(
        "qkv", np.split(state["model.layers.0.self_attn.qkv_proj.weight"], [Q, Q + KV]))})
    mapped, report = map_masks(_masks_for(model), state, model, strict=True)
    match = report.matches["model.layers.0.attn.qkv_proj.MatMul.weight"]
    assert (match.torch_name, match.rows) == ("model.layers.0.self_attn.qkv_proj.weight", None)
    assert "torch_rows" not in mapped.tensors["model.layers.0.self_attn.qkv_proj.weight"]


def test_packed_weight_of_other_values_stays_unmapped():
    # Names fit, but a float weight's values are the parameter's own: another checkpoint is refused.
    state = _state(0)
    model = _genai_fp_layer(state)
    with pytest.raises(MaskError, match="none of the 5 masks fits"):
        map_masks(_masks_for(model), _state(1), model)
    changed = dict(state)  # only k_proj differs: the packed weight alone is left out
    changed["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"] + 1
    with pytest.raises(MaskError, match="1 weight.* could not be mapped.*qkv_proj"):
        map_masks(_masks_for(model), changed, model, strict=True)
    mapped, report = map_masks(_masks_for(model), changed, model)
    assert list(report.unmapped) == ["model.layers.0.attn.qkv_proj.MatMul.weight"]
    assert "model.layers.0.self_attn.q_proj.weight" not in mapped.masks


def test_builder_name_table():
    assert module_paths("model.layers.3.attn.qkv_proj.MatMul.weight_Q4") == ["model.layers.3.attn.qkv_proj"]
    assert module_paths("onnx::MatMul_7", ["/model/layers.0/self_attn/q_proj/MatMul"]) == [
        "model.layers.0.self_attn.q_proj"]
    assert module_paths("lm_head.MatMul.weight", ["/lm_head/MatMul_Q4"]) == ["lm_head"]
    assert builder_candidates("model.layers.3.attn.qkv_proj") == [
        ("model.layers.3.self_attn.qkv_proj.weight",),
        ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
         "model.layers.3.self_attn.v_proj.weight"),
        ("model.layers.3.attn.qkv_proj.weight",)]
    assert builder_candidates("model.layers.0.attn.o_proj")[0] == ("model.layers.0.self_attn.o_proj.weight",)
    assert builder_candidates("model.layers.0.mlp.down_proj") == [("model.layers.0.mlp.down_proj.weight",)]


# --------------------------------------------------------------------------- int4 (MatMulNBits)


def _quantize4(w: np.ndarray, block: int = 8):
    """Symmetric 4-bit block quantization of ``w`` [N, K] as MatMulNBits stores it (no zero points)."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    scales = np.abs(blocks).max(axis=2) / 7.0
    codes = np.clip(np.round(blocks / scales[:, :, None]) + 8, 0, 15).astype(np.uint8)
    packed = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)
    return packed, scales.astype(np.float32)


def _genai_int4_layer(state) -> onnx.ModelProto:
    """The int4 builder layout: MatMulNBits nodes ``/model/layers.0/<attn|mlp>/<proj>/MatMul_Q4``
    on ``model.layers.0.<...>.MatMul.weight_Q4`` (packed qkv) and ``_scales``."""
    inits, nodes = {}, []

    def nbits(proj, x, w, out):
        base = f"model.layers.0.{proj.replace('/', '.')}.MatMul"
        inits[f"{base}.weight_Q4"], inits[f"{base}.weight_scales"] = _quantize4(w)
        nodes.append(helper.make_node(
            "MatMulNBits", [x, f"{base}.weight_Q4", f"{base}.weight_scales"], [out],
            name=f"/model/layers.0/{proj}/MatMul_Q4", domain="com.microsoft",
            K=w.shape[1], N=w.shape[0], bits=4, block_size=8, accuracy_level=4))

    nbits("attn/qkv_proj", "x", _packed(state), "qkv")
    inits["split"] = np.array([Q, KV, KV], np.int64)
    nodes.append(helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=-1))
    nbits("attn/o_proj", "q", state["model.layers.0.self_attn.o_proj.weight"], "o")
    nbits("mlp/gate_proj", "o", state["model.layers.0.mlp.gate_proj.weight"], "gate")
    nbits("mlp/up_proj", "o", state["model.layers.0.mlp.up_proj.weight"], "up")
    nodes.append(helper.make_node("Mul", ["gate", "up"], ["h"]))
    nbits("mlp/down_proj", "h", state["model.layers.0.mlp.down_proj.weight"], "y")
    g = helper.make_graph(nodes, "g", [tensor("x", ["N", HIDDEN])],
                          [tensor("y", ["N", HIDDEN]), tensor("k", ["N", KV]), tensor("v", ["N", KV])],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=MS_OPSET)
    model.ir_version = 8
    return model


def test_int4_weights_map_by_builder_names_confirmed_within_quantization_error():
    state = _state()
    model = _genai_int4_layer(state)
    masks = _masks_for(model)
    mapped, report = map_masks(masks, state, model, strict=True)

    assert set(mapped.masks) == {k for k, v in state.items() if v.ndim == 2}
    assert {m.how for _, m in report.pairs()} == {"quantized"}
    packed = masks.masks["model.layers.0.attn.qkv_proj.MatMul.weight_Q4"]
    for name, (a, b) in (("q", (0, Q)), ("k", (Q, Q + KV)), ("v", (Q + KV, Q + 2 * KV))):
        key = f"model.layers.0.self_attn.{name}_proj.weight"
        np.testing.assert_array_equal(mapped.masks[key], packed[a:b])
        assert mapped.tensors[key]["torch_rows"] == [a, b]
        assert mapped.tensors[key]["match"] == "quantized"
        assert mapped.tensors[key]["op"] == "MatMulNBits"
    np.testing.assert_array_equal(mapped.masks["model.layers.0.self_attn.o_proj.weight"],
                                  masks.masks["model.layers.0.attn.o_proj.MatMul.weight_Q4"])
    assert "torch_rows" not in mapped.tensors["model.layers.0.self_attn.o_proj.weight"]


def test_int4_weights_of_other_values_map_by_name_with_a_warning(caplog):
    # Quantized values never match exactly: names decide, the values only confirm.
    model = _genai_int4_layer(_state(0))
    with caplog.at_level(logging.WARNING, logger="fps_onnx"):
        mapped, report = map_masks(_masks_for(model), _state(1), model, strict=True)
    assert {m.how for _, m in report.pairs()} == {"name"}
    assert not any(m.same_values for _, m in report.pairs())
    assert len(mapped.masks) == 7 and "hold other values" in caplog.text
    # A tighter tolerance than the quantization error turns "quantized" into "name".
    _, strict_report = map_masks(_masks_for(model), _state(0), model, config=MatchConfig(quant_rtol=1e-3))
    assert {m.how for _, m in strict_report.pairs()} == {"name"}


def test_int4_weight_whose_name_fits_nothing_is_unmapped():
    state = _state()
    model = _genai_int4_layer(state)
    del state["model.layers.0.mlp.down_proj.weight"]
    _, report = map_masks(_masks_for(model), state, model)
    assert report.unmapped == {"model.layers.0.mlp.down_proj.MatMul.weight_Q4":
                               "quantized, and its name fits no parameter"}
    # The name fits, the shape does not: unmapped too.
    state = _state()
    state["model.layers.0.self_attn.v_proj.weight"] = np.zeros((KV + 4, HIDDEN), np.float32)
    _, report = map_masks(_masks_for(model), state, model)
    assert "model.layers.0.attn.qkv_proj.MatMul.weight_Q4" in report.unmapped


# --------------------------------------------------------------------------- optimum


def _merged(state) -> onnx.ModelProto:
    """optimum's decoder_model_merged.onnx layout: one If(use_cache_branch), both branches reading
    the outer initializers ``onnx::MatMul_N_merged_0`` (stored [in, out]) by name."""
    q = state["model.layers.0.self_attn.q_proj.weight"]
    o = state["model.layers.0.self_attn.o_proj.weight"]
    inits = {"onnx::MatMul_5_merged_0": q.T.copy(), "onnx::MatMul_6_merged_0": o.T.copy()}

    def branch(name):
        nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_5_merged_0"], [f"{name}_h"],
                                  name="/model/layers.0/self_attn/q_proj/MatMul"),
                 helper.make_node("MatMul", [f"{name}_h", "onnx::MatMul_6_merged_0"], [f"{name}_y"],
                                  name="/model/layers.0/self_attn/o_proj/MatMul")]
        return helper.make_graph(nodes, name, [], [tensor(f"{name}_y", ["N", HIDDEN])])

    node = helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if",
                            then_branch=branch("with_past"), else_branch=branch("no_past"))
    return make_model([node], [tensor("x", ["N", HIDDEN]), tensor("use_cache_branch", [1], TensorProto.BOOL)],
                      [tensor("y", ["N", HIDDEN])], inits)


def test_merged_decoder_maps_through_its_inlined_branch():
    from fps_onnx.onnx.decoder import inline_cache_branch

    state = _state()
    merged = _merged(state)
    inlined = onnx.ModelProto()
    inlined.CopyFrom(merged)
    masks = _masks_for(inline_cache_branch(inlined)[0])  # what select measured
    before = merged.SerializeToString()
    mapped, report = map_masks(masks, state, merged, strict=True)
    assert merged.SerializeToString() == before  # the caller's model is left as it was
    assert {k: m.torch_name for k, m in report.matches.items()} == {
        "onnx::MatMul_5_merged_0": "model.layers.0.self_attn.q_proj.weight",
        "onnx::MatMul_6_merged_0": "model.layers.0.self_attn.o_proj.weight"}
    np.testing.assert_array_equal(mapped.masks["model.layers.0.self_attn.q_proj.weight"],
                                  masks.masks["onnx::MatMul_5_merged_0"])


def _conv1d_gemm(w_attn, w_proj, names=("onnx::Gemm_3", "onnx::Gemm_4")) -> onnx.ModelProto:
    """GPT-2's Conv1D as optimum exports it: Gemm(x, W) with W stored [in, out] as in PyTorch."""
    nodes = [helper.make_node("Gemm", ["x", names[0]], ["h"], name="/transformer/h.0/attn/c_attn/Gemm"),
             helper.make_node("Gemm", ["h", names[1]], ["y"], name="/transformer/h.0/attn/c_proj/Gemm")]
    return make_model(nodes, [tensor("x", ["N", HIDDEN])], [tensor("y", ["N", 3 * HIDDEN])],
                      {names[0]: w_attn, names[1]: w_proj})


@pytest.mark.parametrize("by", ["value", "name"])
def test_conv1d_masks_end_in_the_parameters_in_out_layout(by):
    r = rng(5)
    state = {"transformer.h.0.attn.c_attn.weight": r.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32),
             # square: the shape alone cannot tell [in, out] from [out, in]
             "transformer.h.0.attn.c_proj.weight":
                 r.standard_normal((3 * HIDDEN, 3 * HIDDEN)).astype(np.float32)}
    names = tuple(state) if by == "name" else ("onnx::Gemm_3", "onnx::Gemm_4")
    model = _conv1d_gemm(*state.values(), names=names)
    masks = _masks_for(model)
    mapped, report = map_masks(masks, state, model, strict=True)
    for name, key in zip(state, names):
        assert masks.masks[key].shape == state[name].shape[::-1]  # selected as [out, in]
        assert mapped.masks[name].shape == state[name].shape  # mapped: the parameter's [in, out]
        np.testing.assert_array_equal(mapped.masks[name], masks.masks[key].T)
        assert mapped.tensors[name]["torch_transposed"] is True
        assert report.matches[key].same_values


def test_optimum_node_names_map_a_weight_that_values_cannot_tell_apart():
    # Two parameters with equal values: the node name (a module path) says which is which.
    q = rng(1).standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    state = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.o_proj.weight": q.copy()}
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_9"], ["y"],
                              name="/model/layers.0/self_attn/o_proj/MatMul")]
    model = make_model(nodes, [tensor("x", ["N", HIDDEN])], [tensor("y", ["N", HIDDEN])],
                       {"onnx::MatMul_9": q.T.copy()})
    _, report = map_masks(_masks_for(model), state, model, strict=True)
    assert report.matches["onnx::MatMul_9"].torch_name == "model.layers.0.self_attn.o_proj.weight"


# --------------------------------------------------------------------------- command line

SPEC_FILE = '''
import torch
from torch import nn


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.k_proj = nn.Linear(16, 8, bias=False)
        self.v_proj = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def build():
    torch.manual_seed(0)
    return Attn(), torch.randn(2, 16)
'''


def test_cli_select_and_map_split_a_packed_weight(tmp_path):
    pytest.importorskip("torch")
    import importlib.util


    (tmp_path / "attn_spec.py").write_text(SPEC_FILE)
    spec = importlib.util.spec_from_file_location("attn_spec_for_test", tmp_path / "attn_spec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    state = {k: v.numpy() for k, v in module.build()[0].state_dict().items()}
    packed = np.concatenate([state[f"{p}_proj.weight"] for p in "qkv"])
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_3"], ["y"], name="/qkv/MatMul")]
    onnx.save(make_model(nodes, [tensor("x", ["N", HIDDEN])], [tensor("y", ["N", Q + 2 * KV])],
                         {"onnx::MatMul_3": packed.T.copy()}), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng(1).standard_normal((8, HIDDEN)).astype(np.float32))
    spec_arg = f"{tmp_path / 'attn_spec.py'}:build"

    raw, out, direct = tmp_path / "raw.safetensors", tmp_path / "out.safetensors", tmp_path / "d.safetensors"
    assert invoke("select", tmp_path / "m.onnx", tmp_path / "x.npy", "-o", raw, "--per-neuron", "3",
                  "-q").exit_code == 0
    result = invoke("map", raw, "--model", spec_arg, "--onnx", tmp_path / "m.onnx", "-o", out, "--strict", "--json",
                    "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [p["torch_name"] for p in summary["mapped"]["onnx::MatMul_3"]["parts"]] == [
        "q_proj.weight", "k_proj.weight", "v_proj.weight"]
    mapped, selected = MaskFile.load(out), MaskFile.load(raw).masks["onnx::MatMul_3"]
    assert {k: m.shape for k, m in mapped.masks.items()} == {
        "q_proj.weight": (Q, HIDDEN), "k_proj.weight": (KV, HIDDEN), "v_proj.weight": (KV, HIDDEN)}
    np.testing.assert_array_equal(mapped.masks["k_proj.weight"], selected[Q:Q + KV])
    assert all(m.sum(axis=1).tolist() == [3] * m.shape[0] for m in mapped.masks.values())
    # select --torch-model writes the same file in one step.
    assert invoke("select", tmp_path / "m.onnx", tmp_path / "x.npy", "-o", direct, "--per-neuron", "3",
                  "--torch-model", spec_arg, "-q").exit_code == 0
    again = MaskFile.load(direct)
    assert all(np.array_equal(again.masks[k], mapped.masks[k]) for k in mapped.masks)
    assert again.tensors["v_proj.weight"]["torch_rows"] == [Q + KV, Q + 2 * KV]


# --------------------------------------------------------------------------- real exporters (slow)

LAYOUTS = ("optimum", "optimum-merged", "genai-fp32", "genai-int4")
_DECODER_LINEAR = re.compile(r"\.(layers|h)\.\d+\..+\.weight$")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kind, layout) -> (model folder, ONNX file, data .npz), exported once per module."""
    llm_models = pytest.importorskip("llm_models")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llm_map")
    made: dict[tuple[str, str], tuple] = {}

    def get(kind: str, layout: str):
        if (kind, layout) not in made:
            exporter = "optimum" if layout.startswith("optimum") else "genai"
            llm_models.require_exporter(exporter)
            folder = root / kind / "hf"
            if not folder.is_dir():
                llm_models.save_tiny_llm(kind, folder)
            out = root / kind / layout
            if layout == "optimum":
                path = llm_models.optimum_export(folder, out)
            elif layout == "optimum-merged":
                path = llm_models.optimum_merged(folder, out)
            else:
                path = llm_models.genai_export(folder, out, precision=layout.split("-")[1])
            tokens = llm_models.token_batch(batch=6, seq=10, seed=2, pad_first=3, padding_side="right")
            data = root / kind / "tokens.npz"
            np.savez(data, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            made[kind, layout] = (folder, path, data)
        return made[kind, layout]

    return get


def _parameters(folder) -> dict[str, tuple[int, ...]]:
    """Shapes of the 2-D parameters of the causal LM in ``folder`` (tied lm_head included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.dim() == 2}


def _select_and_map(folder, path, data, tmp_path):
    raw, out = tmp_path / "raw.safetensors", tmp_path / "mapped.safetensors"
    result = invoke("select", path, data, "-o", raw, "-q")
    assert result.exit_code == 0, result.output
    result = invoke("map", raw, "--model", f"hf:{folder}", "--onnx", path, "-o", out, "--strict", "--json", "-q")
    assert result.exit_code == 0, result.output
    return MaskFile.load(raw), MaskFile.load(out), json.loads(result.output)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_llm_masks_map_onto_every_decoder_linear(exported, kind, layout, tmp_path):
    folder, path, data = exported(kind, layout)
    raw, mapped, summary = _select_and_map(folder, path, data, tmp_path)
    shapes = _parameters(folder)
    decoder = {k for k in shapes if _DECODER_LINEAR.search(k)}
    assert len(decoder) == 14  # 2 layers x q, k, v, o, gate, up, down
    keys = set(mapped.masks)
    assert decoder <= keys and not summary["unmapped"]
    for key, mask in mapped.masks.items():
        assert mask.shape == shapes[key], key  # each mask has its parameter's shape
    assert keys == decoder  # lm_head (an int4 MatMulNBits one too) is not selected by default
    kinds = {t["match"] for t in mapped.tensors.values()}
    assert kinds == ({"quantized"} if layout == "genai-int4" else {"exact"})
    if layout.startswith("genai"):
        # The builder packs q, k, v: their masks are rows of one selected mask, in that order.
        for i in range(2):
            packed_key = mapped.tensors[f"model.layers.{i}.self_attn.q_proj.weight"]["onnx_initializer"]
            assert re.fullmatch(rf"model\.layers\.{i}\.attn\.qkv_proj\.MatMul\.weight(_Q4)?", packed_key)
            names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
            assert [mapped.tensors[n]["torch_rows"] for n in names] == [[0, 64], [64, 96], [96, 128]]
            stacked = np.concatenate([mapped.masks[n] for n in names])
            np.testing.assert_array_equal(stacked, raw.masks[packed_key])
    else:
        assert not any("torch_rows" in t for t in mapped.tensors.values())
        assert sum(t["selected"] for t in mapped.tensors.values()) == raw.selected


@pytest.mark.slow
def test_exported_int4_select_with_torch_model_in_one_step(exported, tmp_path):

    folder, path, data = exported("llama", "genai-int4")
    _, two_steps, _ = _select_and_map(folder, path, data, tmp_path)
    out = tmp_path / "direct.safetensors"
    result = invoke("select", path, data, "-o", out, "-q", "--torch-model", f"hf:{folder}")
    assert result.exit_code == 0, result.output
    direct = MaskFile.load(out)
    assert set(direct.masks) == set(two_steps.masks)
    assert all(np.array_equal(direct.masks[k], two_steps.masks[k]) for k in direct.masks)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["optimum", "optimum-merged"])
def test_exported_gpt2_conv1d_masks_keep_the_parameters_in_out_layout(exported, layout, tmp_path):
    folder, path, data = exported("gpt2", layout)
    raw, mapped, summary = _select_and_map(folder, path, data, tmp_path)
    shapes = _parameters(folder)
    decoder = {k for k in shapes if _DECODER_LINEAR.search(k)}
    assert len(decoder) == 8 and set(mapped.masks) == decoder and not summary["unmapped"]
    for key, mask in mapped.masks.items():
        assert mask.shape == shapes[key], key  # Conv1D [in, out], c_proj's square one included
        entry = mapped.tensors[key]
        assert entry["torch_transposed"] is True and entry["onnx_layout"] == "in_out"
        np.testing.assert_array_equal(mask, raw.masks[entry["onnx_initializer"]].T)
        # neuron level: each output neuron (a column of the [in, out] parameter) keeps entries
        assert (mask.sum(axis=0) > 0).all()
