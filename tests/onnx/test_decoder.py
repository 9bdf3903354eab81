"""Decoder LLMs: merged If branches, pruning, the inputs the tool makes, padding."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import onnxruntime as ort
import pytest

from _models import make_model, rng, tensor
from fps_onnx.calibrate import CalibrationConfig, calibrate
from fps_onnx.errors import ModelError
from fps_onnx.onnx import decoder, graph
from fps_onnx.onnx.inputs import InputSpec
from fps_onnx.onnx.load import load_graph, load_model


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- If(use_cache_branch)


def merged_decoder(same_output_name: bool = True):
    """x [B, S, 4] -> If(use_cache_branch): then MatMul(concat(past, x), w_then), else
    MatMul(x, w_else) with w_else a branch initializer -> y; a main-graph Relu reads y."""
    r = rng(3)
    w_then = r.standard_normal((4, 3)).astype(np.float32)
    w_else = r.standard_normal((4, 3)).astype(np.float32)
    out = "y" if same_output_name else "y_else"
    then_branch = helper.make_graph(
        [helper.make_node("Concat", ["past_key_values.0.key", "x"], ["cat"], axis=1),
         helper.make_node("MatMul", ["cat", "w_then"], ["y"])],
        "with_past", [], [tensor("y", None)])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_else"], [out])],
        "no_past", [], [tensor(out, None)], [numpy_helper.from_array(w_else, "w_else")])
    model = make_model(
        [helper.make_node("If", ["use_cache_branch"], ["y"], then_branch=then_branch,
                          else_branch=else_branch),
         helper.make_node("Relu", ["y"], ["z"])],
        [tensor("x", ["B", "S", 4]), tensor("use_cache_branch", [1], TensorProto.BOOL),
         tensor("past_key_values.0.key", ["B", "P", 4])],
        [tensor("z", ["B", "S", 3])], {"w_then": w_then})
    return model, w_then, w_else


@pytest.mark.parametrize("same_output_name", [True, False])
def test_inlined_no_past_branch_exposes_its_weight(same_output_name):
    model, _, w_else = merged_decoder(same_output_name)
    assert not any(True for _ in _safe_sites(model))  # nothing selectable inside the If
    inlined, changed = decoder.inline_cache_branch(model)
    assert changed
    onnx.checker.check_model(inlined)
    assert [i.name for i in inlined.graph.input] == ["x"]  # use_cache_branch and past dropped
    assert all(n.op_type != "If" for n in inlined.graph.node)
    (site,) = graph.find_weights(inlined)
    assert site.key == "w_else" and site.activations == (graph.Activation("x", -1),)
    x = rng(4).standard_normal((2, 5, 4)).astype(np.float32)
    (z,) = session(inlined).run(["z"], {"x": x})
    np.testing.assert_allclose(z, np.maximum(x @ w_else, 0), rtol=1e-5)


def _safe_sites(model):
    try:
        return graph.find_weights(model)
    except ModelError:
        return []


def test_model_without_cache_branch_is_left_alone():
    model, *_ = merged_decoder()
    model.graph.input[1].name = "flag"
    model.graph.node[0].input[0] = "flag"
    before = model.SerializeToString()
    assert decoder.inline_cache_branch(model) == (model, False)
    assert model.SerializeToString() == before


def test_branch_names_that_clash_with_the_main_graph_are_renamed():
    model, _, w_else = merged_decoder()
    # the main graph also defines "w_else" (another weight): the branch's is renamed
    model.graph.initializer.append(numpy_helper.from_array(np.ones((3, 3), np.float32), "w_else"))
    model.graph.node.append(helper.make_node("MatMul", ["z", "w_else"], ["u"]))
    model.graph.output.append(tensor("u", ["B", "S", 3]))
    inlined, _ = decoder.inline_cache_branch(model)
    onnx.checker.check_model(inlined)
    names = [t.name for t in inlined.graph.initializer]
    assert len(names) == len(set(names)) and "w_else::no_past" in names
    x = rng(4).standard_normal((2, 5, 4)).astype(np.float32)
    z, u = session(inlined).run(["z", "u"], {"x": x})
    np.testing.assert_allclose(z, np.maximum(x @ w_else, 0), rtol=1e-5)
    np.testing.assert_allclose(u, z @ np.ones((3, 3)), rtol=1e-5)


def test_merged_file_is_inlined_on_load(tmp_path):
    model, *_ = merged_decoder()
    onnx.save(model, tmp_path / "decoder_model_merged.onnx")
    loaded, _ = load_graph(tmp_path / "decoder_model_merged.onnx")
    assert [s.key for s in graph.find_weights(loaded)] == ["w_else"]


# --------------------------------------------------------------------------- prune


def classifier():
    """x [B, S, 6] -> MatMul(w1) -> h -> Relu -> MatMul(w_head) -> logits; h also -> Sigmoid -> aux."""
    r = rng(5)
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w_head"], ["logits"]),
         helper.make_node("Sigmoid", ["h"], ["aux"])],
        [tensor("x", ["B", "S", 6]), tensor("unused", ["B"])],
        [tensor("logits", ["B", "S", 3]), tensor("aux", ["B", "S", 5])],
        {"w1": r.standard_normal((6, 5)).astype(np.float32),
         "w_head": r.standard_normal((5, 3)).astype(np.float32)})


def test_prune_keeps_only_what_the_statistics_need():
    model = classifier()
    sites = graph.find_weights(model)  # on the unpruned graph: the head is found
    assert [s.key for s in sites] == ["w1", "w_head"]
    model, outputs = graph.add_statistics(model, sites, ("abs_sum", "sq_sum"))
    pruned = decoder.prune(model, list(outputs))
    onnx.checker.check_model(pruned)
    ops = [n.op_type for n in pruned.graph.node]
    assert "Sigmoid" not in ops and ops.count("MatMul") == 1 + 2 * 2 * 1  # x@w1, ones@|a| per stat
    assert {o.name for o in pruned.graph.output} == set(outputs)
    assert {t.name for t in pruned.graph.initializer} & {"w1", "w_head"} == {"w1"}
    assert [i.name for i in pruned.graph.input] == ["x"]
    assert [o.name for o in model.graph.output][:2] == ["logits", "aux"]  # the input is untouched
    x = rng(6).standard_normal((3, 4, 6)).astype(np.float32)
    full = session(model).run(list(outputs), {"x": x, "unused": np.zeros(3, np.float32)})
    got = session(pruned).run(list(outputs), {"x": x})
    for a, b in zip(full, got):
        np.testing.assert_array_equal(a, b)
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    h = np.maximum(x @ w1, 0)  # the head's input: its MatMul is gone, its statistics are not
    head = next(n for n, o in outputs.items() if o.activation.tensor == "r" and o.statistic == "abs_sum")
    np.testing.assert_allclose(got[list(outputs).index(head)], np.abs(h).reshape(-1, 5).sum(0), rtol=1e-5)


def test_prune_follows_outer_scope_reads_of_subgraphs():
    model, *_ = merged_decoder()
    pruned = decoder.prune(model, ["z"])
    assert {t.name for t in pruned.graph.initializer} == {"w_then"}
    assert len(pruned.graph.input) == 3  # the If's branches read x and the past


# --------------------------------------------------------------------------- feeds


def specs(pos_dtype=np.int64, past_dtype=np.float32, past_shape=("batch_size", 2, "past_sequence_length", 8)):
    return [InputSpec("input_ids", ("batch_size", "sequence_length"), np.dtype(np.int64)),
            InputSpec("attention_mask", ("batch_size", "total"), np.dtype(np.int64)),
            InputSpec("position_ids", ("batch_size", "sequence_length"), np.dtype(pos_dtype)),
            InputSpec("past_key_values.0.key", past_shape, np.dtype(past_dtype)),
            InputSpec("past_key_values.0.value", past_shape, np.dtype(past_dtype)),
            InputSpec("use_cache_branch", (1,), np.dtype(np.bool_))]


LEFT = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
RIGHT = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


@pytest.mark.parametrize("producer, pad", [("pytorch", 1), ("optimum", 1), ("onnxruntime-genai", 0)])
def test_position_ids_count_real_tokens(producer, pad):
    feeder = decoder.make_feeder(specs(), "attention_mask", producer)
    assert feeder.provided == ("position_ids", "past_key_values.0.key", "past_key_values.0.value",
                               "use_cache_branch")
    ids = np.ones((3, 5), np.int64)
    left = feeder.complete({"input_ids": ids, "attention_mask": LEFT})["position_ids"]
    p = pad
    np.testing.assert_array_equal(left, [[p, p, 0, 1, 2], [0, 1, 2, 3, 4], [p, p, p, p, 0]])
    right = feeder.complete({"input_ids": ids, "attention_mask": RIGHT})["position_ids"]
    np.testing.assert_array_equal(right, [[0, 1, 2, p, p], [0, 1, 2, 3, 4], [0, p, p, p, p]])
    assert left.dtype == np.int64


def test_position_ids_match_transformers_convention():
    import torch

    mask = torch.from_numpy(LEFT)
    expected = mask.long().cumsum(-1) - 1
    expected.masked_fill_(mask == 0, 1)
    np.testing.assert_array_equal(decoder.position_ids(LEFT, 3, 5, 1), expected.numpy())


def test_empty_past_takes_the_graph_dtype_and_static_sizes():
    feeder = decoder.make_feeder(specs(np.int32, np.float16), "attention_mask")
    feed = feeder.complete({"input_ids": np.ones((3, 5), np.int64), "attention_mask": LEFT,
                            "token_type_ids": np.zeros((3, 5), np.int64)})
    assert set(feed) == {s.name for s in specs()}  # an input the session lacks is dropped
    key = feed["past_key_values.0.key"]
    assert key.shape == (3, 2, 0, 8) and key.dtype == np.float16
    assert feed["position_ids"].dtype == np.int32
    assert feed["use_cache_branch"].shape == (1,) and not feed["use_cache_branch"].any()


def test_past_without_static_head_sizes_is_a_model_error():
    with pytest.raises(ModelError, match="shape of an empty"):
        decoder.make_feeder(specs(past_shape=("b", "heads", "past", 8)), "attention_mask")


def test_no_mask_gives_running_positions():
    feeder = decoder.make_feeder(specs()[:1] + specs()[2:3], None)
    feed = feeder.complete({"input_ids": np.ones((2, 4), np.int64)})
    np.testing.assert_array_equal(feed["position_ids"], [[0, 1, 2, 3]] * 2)


# --------------------------------------------------------------------------- tiny Llama, end to end


LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _cache_arg():
    """transformers 5.25 renamed the forward's ``past_key_values`` to ``cache`` (old name removed in 5.40)."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def export_optimum_like(model, path):
    """torch.onnx (legacy) export with optimum's interface: input_ids, attention_mask
    [batch, past + seq], position_ids, past_key_values.{i}.key/value -> logits, present.*."""
    import torch
    from transformers.cache_utils import DynamicCache

    cache_arg = _cache_arg()

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=model.config)
            for i in range(LAYERS):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, **{cache_arg: cache})
            present = [t for layer in out[cache_arg].layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    b, s, p = 2, 5, 3
    past_names = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    dynamic = {"input_ids": {0: "batch_size", 1: "sequence_length"},
               "position_ids": {0: "batch_size", 1: "sequence_length"},
               "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
               "logits": {0: "batch_size", 1: "sequence_length"}}
    dynamic.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    dynamic.update({n: {0: "batch_size", 2: "past_sequence_length + sequence_length"}
                    for n in present_names})
    example = (torch.randint(0, 100, (b, s)), torch.ones(b, p + s, dtype=torch.long),
               torch.arange(p, p + s)[None].expand(b, s),
               *[torch.randn(b, KV_HEADS, p, HEAD_DIM) for _ in past_names])
    torch.onnx.export(WithPast(), example, str(path), input_names=names,
                      output_names=["logits", *present_names], dynamic_axes=dynamic,
                      opset_version=17, dynamo=False, do_constant_folding=False)
    return path


def linear_input_sums(model, ids, mask):
    """sum |x|, sum x^2 and rows over real tokens of every nn.Linear input, by weight values."""
    import torch

    keep = torch.from_numpy(mask).bool()
    sums, handles = [], []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            def pre(m, args):
                x = args[0].detach().double()[keep]
                sums.append((m.weight.detach().numpy(), x.abs().sum(0).numpy(),
                             (x * x).sum(0).numpy(), x.shape[0]))
            handles.append(mod.register_forward_pre_hook(pre))
    position = torch.from_numpy(decoder.position_ids(mask, *mask.shape, 1))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              position_ids=position)
    for h in handles:
        h.remove()
    return sums


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    path = export_optimum_like(model, tmp / "model.onnx")
    return model, path, tmp


@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_statistics_equal_pytorch_hooks_without_padding(llama_case, side, caplog):
    model, path, tmp = llama_case
    r = np.random.default_rng(1)
    lengths = np.array([9, 3, 5, 1, 9, 6])
    start = 9 - lengths if side == "left" else np.zeros_like(lengths)
    pos = np.arange(9)[None, :]
    mask = ((pos >= start[:, None]) & (pos < (start + lengths)[:, None])).astype(np.int64)
    ids = r.integers(1, 100, (6, 9)) * mask
    np.savez(tmp / f"{side}.npz", input_ids=ids, attention_mask=mask)  # no position_ids, no past
    with caplog.at_level("INFO", logger="fps_onnx"):
        result = calibrate(path, tmp / f"{side}.npz",
                           CalibrationConfig(provider="cpu", statistics=("abs_sum", "sq_sum")))
    acts = {a.tensor for s in result.sites for a in s.activations}
    assert f"applies to {len(acts)} of {len(acts)} weight inputs" in caplog.text
    assert "position_ids, past_key_values.* (4 empty)" in caplog.text
    reference = linear_input_sums(model, ids, mask)
    weights = dict(graph.iter_weight_values(load_model(path), result.sites))
    assert len(result.sites) >= 7 * LAYERS
    for site in result.sites:
        matches = [ref for ref in reference if ref[0].shape == weights[site].shape
                   and np.array_equal(ref[0], weights[site])]
        assert matches, site.key
        _, abs_sum, sq_sum, rows = matches[0]
        got = result.stats.weights[site.key]
        assert got.count == rows == mask.sum()
        np.testing.assert_allclose(got.abs_sum, abs_sum, rtol=2e-4, err_msg=site.key)
        np.testing.assert_allclose(got.sq_sum, sq_sum, rtol=2e-4, err_msg=site.key)


def test_llama_session_computes_neither_logits_nor_cache(llama_case):
    _, path, _ = llama_case
    model, _ = load_graph(path)
    sites = graph.find_weights(model)
    model, outputs = graph.add_statistics(model, sites, ("abs_sum",))
    pruned = decoder.prune(model, list(outputs))
    names = {o.name for o in pruned.graph.output}
    assert not any(n == "logits" or n.startswith("present") for n in names)
    assert len(pruned.graph.node) < len(model.graph.node)


def test_llama_first_step_shapes_give_batch_and_sequence(llama_case):
    _, path, _ = llama_case
    model = load_model(path, load_weights=False)
    acts = {a.tensor for s in graph.find_weights(model) for a in s.activations}
    assert graph.token_leading(model, acts, "attention_mask") == acts


# --------------------------------------------------------------------------- real exporter files


def hooked_input_sums(model, ids, mask):
    """(weight, sum |x| over real tokens) of every nn.Linear and GPT-2 Conv1D input."""
    import torch

    keep = torch.from_numpy(mask).bool()
    sums, handles = [], []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            def pre(m, args):
                sums.append((m.weight.detach().numpy(), args[0].detach().double()[keep].abs().sum(0).numpy()))
            handles.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              position_ids=torch.from_numpy(decoder.position_ids(mask, *mask.shape, 1)))
    for h in handles:
        h.remove()
    return sums


@pytest.mark.slow
@pytest.mark.parametrize("exporter, kind, layout", [
    ("optimum", "llama", "with-past"), ("optimum", "qwen2", "without-past"),
    ("optimum", "gpt2", "merged"), ("optimum", "llama-tied", "merged"),
    ("genai", "llama", "fp32"), ("genai", "qwen2", "fp32"),
])
@pytest.mark.parametrize("side", ["left", "right"])
def test_exported_llm_statistics_equal_pytorch_hooks(tmp_path, exporter, kind, layout, side, caplog):
    llm_models = pytest.importorskip("llm_models")
    python = llm_models.require_exporter(exporter)
    folder = llm_models.save_tiny_llm(kind, tmp_path / "hf")
    if exporter == "genai":
        path = llm_models.genai_export(folder, tmp_path / "onnx", precision=layout, python=python)
    elif layout == "merged":
        path = llm_models.optimum_merged(folder, tmp_path / "onnx", python=python)
    else:
        path = llm_models.optimum_export(folder, tmp_path / "onnx", with_past=layout == "with-past",
                                         python=python)
    r = np.random.default_rng(2)
    lengths = np.array([9, 3, 5, 1, 9, 6])
    start = 9 - lengths if side == "left" else np.zeros_like(lengths)
    pos = np.arange(9)[None, :]
    mask = ((pos >= start[:, None]) & (pos < (start + lengths)[:, None])).astype(np.int64)
    ids = r.integers(5, llm_models.VOCAB, (6, 9)) * mask
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=mask)
    with caplog.at_level("INFO", logger="fps_onnx"):
        result = calibrate(path, tmp_path / "tokens.npz", CalibrationConfig(provider="cpu"))
    acts = {a.tensor for s in result.sites for a in s.activations}
    assert f"applies to {len(acts)} of {len(acts)} weight inputs" in caplog.text
    reference = hooked_input_sums(llm_models.tiny_llm(kind), ids, mask)
    model, base = load_graph(path)
    for site, w in graph.iter_weight_values(model, result.sites, base):
        got = result.stats.weights[site.key]
        assert got.count == mask.sum(), site.key
        same = [a for rw, a in reference if rw.size == w.size and any(
            rw.shape == v.shape and np.allclose(rw, v, atol=1e-6) for v in (w, w.T))]
        if not same:  # packed q/k/v (genai): the inputs of q_proj, k_proj and v_proj agree
            assert "qkv" in site.key, site.key
            continue
        np.testing.assert_allclose(got.abs_sum, same[0], rtol=1e-3, atol=1e-4, err_msg=site.key)


# --------------------------------------------------------------------------- small passes


def test_row_view_of_a_token_activation_is_measured_where_the_mask_applies():
    """GPT-2's Conv1D: x [B, S, 4] -> Reshape [-1, 4] -> Gemm(w)."""
    w = rng(7).standard_normal((4, 3)).astype(np.float32)
    model = make_model(
        [helper.make_node("Reshape", ["x", "rows"], ["x2"]),
         helper.make_node("Gemm", ["x2", "w"], ["y"])],
        [tensor("x", ["B", "S", 4]), tensor("attention_mask", ["B", "S"], TensorProto.INT64)],
        [tensor("y", [None, 3])], {"w": w, "rows": np.array([-1, 4], np.int64)})
    sites = graph.find_weights(model)
    shapes = graph.inferred_shapes(model, "attention_mask")
    (site,) = decoder.lift_row_views(model, sites, shapes, "attention_mask")
    assert site.activations == (graph.Activation("x", -1),)
    assert graph.token_leading(model, ["x", "x2"], "attention_mask", shapes) == {"x"}


def test_head_size_of_symbolic_past_comes_from_the_concat_partner():
    model = make_model(
        [helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2)],
        [tensor("past_key_values.0.key", ["b", 2, "past_sequence_length", "kv_cache_dim"]),
         tensor("k", ["b", 2, "s", 16])],
        [tensor("present.0.key", ["b", 2, None, None])], {})
    shapes = graph.inferred_shapes(model)
    sizes = decoder.past_head_sizes(model, shapes)
    assert sizes == {"past_key_values.0.key": 16}
    spec = InputSpec("past_key_values.0.key", ("b", 2, "past_sequence_length", "kv_cache_dim"),
                     np.dtype(np.float32))
    feeder = decoder.make_feeder([spec], None, head_sizes=sizes)
    assert feeder.complete({"input_ids": np.ones((3, 5))})[spec.name].shape == (3, 2, 0, 16)


def test_left_padding_is_moved_right_for_group_query_attention():
    feeder = decoder.make_feeder(specs()[:3], "attention_mask", "onnxruntime-genai", right_pad=True)
    ids = np.arange(15).reshape(3, 5)
    out = feeder.complete({"input_ids": ids, "attention_mask": LEFT})
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["input_ids"][0, :3], [2, 3, 4])
    np.testing.assert_array_equal(out["input_ids"][2, :1], [14])
    np.testing.assert_array_equal(out["position_ids"], [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    from fps_onnx.errors import DataError
    with pytest.raises(DataError, match="one block"):
        feeder.complete({"input_ids": ids, "attention_mask": np.array([[1, 0, 1, 1, 1]] * 3)})
