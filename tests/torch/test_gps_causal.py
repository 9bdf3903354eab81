"""``select --method gps --task causal-lm``: summed |grad| of the next-token loss on a causal LM."""

from __future__ import annotations

import json
from pathlib import Path
import re

import numpy as np
import pytest

from _cli import assert_one_error, invoke

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fps_onnx.onnx.scope import ScopeConfig  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402
from fps_onnx.selection.score import SelectConfig  # noqa: E402
from fps_onnx.torch.gps import gps_select_causal  # noqa: E402
from llm_models import save_tiny_llm  # noqa: E402

LINES = ["The capital of France is Paris.", "The quick brown fox jumps over the lazy dog.",
         "Every layer has attention and a feed-forward block.", "A small model learns to predict."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Tiny model folders (llama, llama-tied, gpt2) and token data: tokens.npz (6 rows of 10 ids,
    no labels, no padding) and text.txt (a sample per line)."""
    root = tmp_path_factory.mktemp("gps-llms")
    for kind in ("llama", "llama-tied", "gpt2"):
        save_tiny_llm(kind, root / kind)
    ids = np.random.default_rng(0).integers(4, 300, (6, 10))
    np.savez(root / "tokens.npz", input_ids=ids)
    (root / "text.txt").write_text("\n".join(LINES) + "\n")
    return root


def reference(folder: Path, ids: np.ndarray, batch: int, r: int) -> dict[str, np.ndarray]:
    """GPS by hand: per batch the gradient of the mean next-token loss, |grad| summed over the
    batches; per weight [out, in] the top r*(in+out) by score, ties to the lower flat index."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    weights = {n: p for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2
               and "embed" not in n and "wte" not in n and "wpe" not in n and n != "lm_head.weight"}
    sums = {n: torch.zeros_like(p) for n, p in weights.items()}
    for start in range(0, len(ids), batch):
        x = torch.from_numpy(ids[start:start + batch])
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum") / x[:, 1:].numel()
        model.zero_grad()
        loss.backward()
        for n, p in weights.items():
            sums[n] += p.grad.abs()
    out = {}
    for n, total in sums.items():
        conv1d = "transformer.h" in n  # GPT-2's Conv1D: stored [in, out], scored as [out, in]
        score = (total.T if conv1d else total).contiguous()
        k = r * sum(score.shape)
        order = torch.sort(-score.flatten(), stable=True).indices[:k]
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[order] = True
        mask = mask.reshape(score.shape)
        out[n] = (mask.T if conv1d else mask).numpy()
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_cli_selects_the_top_summed_gradients(folders, tmp_path, kind):
    out = tmp_path / "gps.safetensors"
    result = invoke("select", "--method", "gps", "--task", "causal-lm", f"hf:{folders / kind}",
                    folders / "tokens.npz", "-o", out, "--shira-r", 2, "--batch-size", 4, "-q")
    assert result.exit_code == 0, result.output
    masks = MaskFile.load(out)
    want = reference(folders / kind, np.load(folders / "tokens.npz")["input_ids"], 4, 2)
    assert sorted(masks.masks) == sorted(want)
    for name, expected in want.items():
        assert masks.masks[name].shape == expected.shape, name  # the parameter's shape
        mismatch = int((masks.masks[name] != expected).sum())
        assert mismatch == 0, f"{name}: {mismatch} entries differ"
    meta = masks.meta
    assert (meta["method"], meta["loss"], meta["labels"], meta["level"]) == ("gps", "next_token", "none", "layer")
    assert json.loads(meta["budget"]) == {"shira_r": 2} and meta["num_samples"] == "6"
    entry = masks.tensors[next(iter(want))]
    assert entry["onnx_initializer"] is None and entry.get("torch_transposed", False) == (kind == "gpt2")


def test_plain_text_needs_no_labels_and_the_budget_is_per_neuron(folders):
    result = gps_select_causal(f"hf:{folders / 'llama'}", folders / "text.txt",
                               SelectConfig(method="gps", per_neuron=3), batch_size=3)
    assert result.samples == len(LINES)
    for name, mask in result.masks.masks.items():
        assert (mask.sum(axis=1) == 3).all(), name


@pytest.fixture(scope="module")
def tied_export(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tied-onnx") / "model.onnx"
    result = invoke("export", f"hf:{folders / 'llama-tied'}", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("scope", [[], ["--include-lm-head"], ["--include-lm-head", "--exclude", r"layers\.1\.mlp"]])
def test_the_selectable_weights_are_those_of_fps(folders, tied_export, tmp_path, scope):
    """Scope is one rule for every ONNX method: magnitude (no data) stands for FPS."""
    fps = tmp_path / "fps.safetensors"
    result = invoke("select", "--method", "magnitude", tied_export, "-o", fps, "--per-neuron", 1, "-q", *scope)
    assert result.exit_code == 0, result.output
    config = ScopeConfig(include_lm_head="--include-lm-head" in scope, exclude=tuple(scope[2:]))
    gps = gps_select_causal(f"hf:{folders / 'llama-tied'}", folders / "tokens.npz",
                            SelectConfig(method="gps", per_neuron=1), scope=config, max_samples=2)
    assert sorted(gps.masks.masks) == sorted(MaskFile.load(fps).masks)
    assert ("model.embed_tokens.weight" in gps.masks.masks) == bool(scope)  # the tied lm_head, by its first name


def _bert_folder(root: Path) -> Path:
    config = transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(root / "bert")
    return root / "bert"


@pytest.mark.parametrize("problem, message", [
    ("code", "holds Python code"),
    ("bert", "is not a causal language model (bert)"),
    ("not-hf", "--task causal-lm needs a transformers folder"),
    ("no-tokens", "has no tokens to predict"),
    ("folder-data", "causal LM data is a .txt, .jsonl or .npz file"),
    ("budget", "--per-neuron 65 is larger than a fan-in of 64"),
    ("fps", "--task applies to --method gps only"),
    ("tokenizer", "--tokenizer do not apply to --task causal-lm"),
    ("classification", "is a causal language model: give --task causal-lm"),
])
def test_bad_input_is_one_line_and_writes_nothing(folders, tmp_path, problem, message):
    spec, data, extra = f"hf:{folders / 'llama'}", folders / "text.txt", ["--per-neuron", "1"]
    if problem == "code":
        save_tiny_llm("llama", tmp_path / "coded")
        (tmp_path / "coded" / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
        spec = f"hf:{tmp_path / 'coded'}"
    elif problem == "bert":
        spec = f"hf:{_bert_folder(tmp_path)}"
    elif problem == "not-hf":
        spec = f"{Path(__file__).resolve().parents[1] / '_models.py'}:small_cnn"
    elif problem == "no-tokens":
        data = tmp_path / "prompts.jsonl"
        data.write_text(json.dumps({"prompt": "x" * 600, "completion": " Paris."}) + "\n")
    elif problem == "folder-data":
        data = folders
    elif problem == "budget":
        extra = ["--per-neuron", "65"]
    elif problem == "fps":
        extra = ["--method", "fps"]
    elif problem == "tokenizer":
        extra = ["--tokenizer", folders / "llama"]
    args = ["select", "--task", "causal-lm", spec, data, "-o", tmp_path / "m.safetensors", "-q", *extra]
    if problem == "classification":
        args.remove("--task")
        args.remove("causal-lm")
    if problem != "fps":
        args.insert(1, "--method")
        args.insert(2, "gps")
    result = invoke(*args)
    assert_one_error(result, re.escape(message), status=2 if problem in ("fps", "tokenizer") else 1,
                     absent=[tmp_path / "m.safetensors"])


def test_only_float32_sums_remain_of_the_gradients(folders):
    """Each weight's gradient is added into its float32 sum as it arrives and dropped: after the
    pass no parameter holds a gradient, whatever the model's dtype."""
    from fps_onnx.torch.gps import _summed_abs_gradients, causal_lm_weights
    from fps_onnx.torch.train.lm_data import Collate

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folders / "llama")).to(torch.bfloat16).eval()
    weights = causal_lm_weights(model)
    ids = np.random.default_rng(0).integers(4, 300, (2, 6))
    batch = Collate(0)([(row, row) for row in ids])
    sums = _summed_abs_gradients(model, weights, [batch, batch], torch.device("cpu"), None)
    assert sorted(sums) == sorted(weights) and all(s.dtype == torch.float32 for s in sums.values())
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad  # no gradient is computed for it
    one = _summed_abs_gradients(model, weights, [batch], torch.device("cpu"), None)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(sums[name], 2 * one[name])  # summed over the batches
