"""``fps-onnx train --task causal-lm`` and ``apply-delta`` on tiny seeded decoder-only LLMs."""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from _cli import assert_one_error, invoke

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fps_onnx.errors import ExportError  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402
from fps_onnx.torch.train import causal, hf_folder, lm_data, loop, sparse  # noqa: E402
from fps_onnx.torch.train import delta as delta_file  # noqa: E402
from fps_onnx.torch.train.recipe import CausalLMRecipe  # noqa: E402
from llm_models import save_tiny_llm  # noqa: E402

LINES = ["The capital of France is Paris.", "The quick brown fox jumps over the lazy dog.",
         "Every layer has attention and a feed-forward block.", "A small model learns to predict."]
SELECTED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny model folders: llama, llama-tied, and llama2 (same architecture, another seed)."""
    root = tmp_path_factory.mktemp("llms")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    save_tiny_llm("llama", root / "llama", seed=0)
    save_tiny_llm("llama-tied", root / "llama-tied", seed=0)
    save_tiny_llm("llama", root / "llama2", seed=1)
    return root


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()


def _state(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _masks(model, names, fraction: float, seed: int = 0) -> dict[str, np.ndarray]:
    params = dict(model.named_parameters(remove_duplicate=False))
    rng = np.random.default_rng(seed)
    return {n: rng.random(tuple(params[n].shape)) < fraction for n in names}


@pytest.fixture
def case(folders, tmp_path):
    """(llama folder, mask path, masks, train.txt) with 10% of three weights selected."""
    masks = _masks(_load(folders / "llama"), SELECTED, 0.1)
    MaskFile(masks, {}).save(tmp_path / "m.safetensors")
    (tmp_path / "train.txt").write_text("\n".join(LINES * 2) + "\n\n")
    return folders / "llama", tmp_path / "m.safetensors", masks, tmp_path / "train.txt"


def _train(model_dir, masks, train, out, *extra):
    args = ["train", "--task", "causal-lm", "--model", f"hf:{model_dir}", "--masks", str(masks),
            "--train", str(train), "-o", str(out), "--batch-size", "4", "--lr", "1e-2", "-q", *extra]
    return invoke(*args)


def test_one_epoch_changes_exactly_the_selected_entries_and_the_folder_reloads(case, tmp_path):
    model_dir, mask_path, masks, train = case
    out = tmp_path / "out"
    result = _train(model_dir, mask_path, train, out, "--epochs", "1", "--val", str(train), "--test", str(train))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "metrics.json", "model"]
    metrics = json.loads((out / "metrics.json").read_text())
    epoch = metrics["epochs"][0]
    assert {"train_loss", "val_loss", "val_perplexity", "tokens_per_second", "peak_memory_bytes"} <= set(epoch)
    assert metrics["test_perplexity"] == pytest.approx(np.exp(metrics["test_loss"]))
    assert metrics["trainable"] == {"selected": int(sum(m.sum() for m in masks.values())), "sparse_tensors": 3,
                                    "dense": 0, "dense_tensors": []}
    assert metrics["base_sha256"] == hf_folder.base_sha256(model_dir)

    base, tuned = _state(model_dir), _state(out / "model")
    assert set(base) == set(tuned)
    for name, before in base.items():
        after = tuned[name]
        changed = (after != before).numpy()
        if name in masks:
            assert np.array_equal(changed, masks[name]), name  # every selected entry moved, nothing else
        else:
            assert torch.equal(after, before), name  # embeddings, norms, other weights: bit-identical

    # the folder loads as it is, and gives the logits of base + delta
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    loaded = _load(out / "model")
    merged = delta_file.apply_delta(_load(model_dir), out / "delta.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, merged(ids).logits)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / "model" / name).read_bytes() == (model_dir / name).read_bytes()

    # apply-delta rebuilds the same folder, bit for bit
    rebuilt = tmp_path / "rebuilt"
    result = invoke("apply-delta", f"hf:{model_dir}", out / "delta.safetensors", "-o", rebuilt, "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in rebuilt.iterdir()) == sorted(p.name for p in (out / "model").iterdir())
    again = _state(rebuilt)
    assert all(torch.equal(again[n], tuned[n]) for n in tuned)
    assert (rebuilt / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()


def test_the_loss_on_a_repeated_corpus_falls(case, tmp_path):
    model_dir, _, _, _ = case
    masks = _masks(_load(model_dir), SELECTED, 0.3, seed=1)
    MaskFile(masks, {}).save(tmp_path / "m30.safetensors")
    (tmp_path / "four.txt").write_text("\n".join(LINES) + "\n")
    result = _train(model_dir, tmp_path / "m30.safetensors", tmp_path / "four.txt", tmp_path / "out",
                    "--epochs", "100", "--max-steps", "30", "--lr", "3e-2", "--warmup-epochs", "0", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 30 and len(metrics["epochs"]) == 30  # one step (4 lines) per epoch
    losses = [e["train_loss"] for e in metrics["epochs"]]
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_loss_is_the_models_own_shifted_loss(folders):
    model = _load(folders / "llama")
    batch = lm_data.Collate(0)([(np.array([5, 6, 7, 8, 9]), np.array([-100, -100, 7, 8, 9])),
                                (np.array([11, 12, 13]), np.array([11, 12, 13]))])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        ours = causal.token_loss_sum(out.logits, batch["labels"]) / causal.count_tokens(batch["labels"])
    assert causal.count_tokens(batch["labels"]) == 3 + 2
    torch.testing.assert_close(ours, out.loss)


def test_prompt_and_padding_are_not_learned(folders, tmp_path):
    tokenizer = lm_data.load_tokenizer(folders / "llama")
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of France is", "completion": " Paris."}) + "\n\n"
                    + json.dumps({"text": "A small model."}) + "\n")
    data = lm_data.open_lm_split(path, tokenizer, 128, len(tokenizer))
    prompt = tokenizer("The capital of France is")["input_ids"]
    completion = tokenizer(" Paris.", add_special_tokens=False)["input_ids"]
    text = tokenizer("A small model.")["input_ids"]
    eos = tokenizer.eos_token_id
    batch = lm_data.Collate(lm_data.pad_id(tokenizer))([data[0], data[1]])
    n0, n1 = len(prompt) + len(completion) + 1, len(text) + 1
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["input_ids"][0, :n0].tolist() == prompt + completion + [eos]
    assert batch["labels"][0, :n0].tolist() == [-100] * len(prompt) + completion + [eos]
    assert batch["labels"][1].tolist() == text + [eos] + [-100] * (batch["labels"].shape[1] - n1)
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (batch["labels"].shape[1] - n1)
    assert data.predicted_tokens() == len(completion) + 1 + len(text)

    # token arrays: the rows' real tokens; labels -100 where the mask is 0
    ids = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    tokens = lm_data.open_lm_split(tmp_path / "t.npz", tokenizer, 4, len(tokenizer))
    assert [s[0].tolist() for s in tokens] == [[5, 6, 7], [8, 9, 10, 11]]
    assert [s[1].tolist() for s in tokens] == [[5, 6, 7], [8, 9, 10, 11]]


def _prepared(folder, masks, recipe):
    torch.manual_seed(0)
    model = _load(folder)
    loop.prepare(model, masks, recipe)
    return model


def _loader(folder, batch_size):
    from torch.utils.data import DataLoader

    tokenizer = lm_data.load_tokenizer(folder)
    path = Path(folder).parent / "mixed.txt"
    path.write_text("\n".join(["Hi.", LINES[0], LINES[1] + " " + LINES[2], LINES[3], "Paris.", LINES[1],
                               "The dog.", LINES[2]]) + "\n")
    data = lm_data.open_lm_split(path, tokenizer, 128, len(tokenizer))
    return DataLoader(data, batch_size, shuffle=False, collate_fn=lm_data.Collate(lm_data.pad_id(tokenizer)))


def _values(model) -> dict[str, torch.Tensor]:
    return {n: d.values.detach().clone() for n, d in sparse.unique_deltas(model).items()}


def test_gradient_accumulation_matches_one_big_batch(folders):
    folder = folders / "llama"
    masks = _masks(_load(folder), SELECTED, 0.2)
    runs = []
    for batch, accumulate in ((4, 1), (2, 2)):
        recipe = CausalLMRecipe(batch_size=batch, accumulate=accumulate, epochs=1, lr=1e-2, warmup_epochs=0,
                                amp=False)
        model = _prepared(folder, masks, recipe)
        history = causal.fit(model, _loader(folder, batch), recipe=recipe)
        assert history["steps"] == 2
        runs.append((_values(model), history["epochs"][0]["train_loss"]))
    (one, loss_one), (two, loss_two) = runs
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-6)
    assert any(v.abs().max() > 1e-3 for v in one.values())  # the steps did move the deltas


def test_checkpointing_recomputes_with_the_same_weights(folders):
    folder = folders / "llama"
    masks = _masks(_load(folder), SELECTED, 0.2)
    runs = []
    for checkpointing in (False, True):
        recipe = CausalLMRecipe(batch_size=2, accumulate=2, epochs=2, lr=1e-2, warmup_epochs=0, amp=False,
                                checkpointing=checkpointing)
        model = _prepared(folder, masks, recipe)
        if checkpointing:
            causal.enable_checkpointing(model)
        calls = []
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        history = causal.fit(model, _loader(folder, 2), recipe=recipe)
        runs.append((_values(model), history["epochs"][-1]["train_loss"], len(calls)))
    (plain, loss_plain, calls_plain), (ckpt, loss_ckpt, calls_ckpt) = runs
    assert calls_plain == 8 and calls_ckpt == 16  # each forward recomputed once in the backward pass
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind, head", [("llama", "lm_head.weight"), ("llama-tied", "model.embed_tokens.weight")])
def test_a_chunked_loss_trains_what_the_whole_logits_train(folders, monkeypatch, kind, head):
    """--chunked-loss: the head's logits a few tokens at a time (3 a chunk here, so padded and prompt
    tokens fall inside chunks and batches end mid-chunk), each recomputed in the backward pass; a
    selected head (untied, or the tied embedding) trains through the chunks too."""
    folder = folders / kind
    monkeypatch.setattr(causal, "LOSS_CHUNK_BYTES", 4 * _load(folder).config.vocab_size * 3)
    masks = _masks(_load(folder), (*SELECTED[:2], head), 0.2)
    runs, calls = [], []
    for chunked in (False, True):
        recipe = CausalLMRecipe(batch_size=2, accumulate=2, epochs=2, lr=1e-2, warmup_epochs=0, amp=False,
                                chunked_loss=chunked)
        model = _prepared(folder, masks, recipe)
        model.get_output_embeddings().register_forward_hook(lambda m, i, o, c=calls, k=chunked: c.append((k, len(i[0]))))
        history = causal.fit(model, _loader(folder, 2), _loader(folder, 3), recipe=recipe)
        runs.append((_values(model), history["epochs"][-1]))
    (whole, rec_whole), (chunks, rec_chunks) = runs
    assert rec_chunks["train_loss"] == pytest.approx(rec_whole["train_loss"], rel=1e-5)
    assert rec_chunks["val_loss"] == pytest.approx(rec_whole["val_loss"], rel=1e-5)
    assert sorted(whole) == sorted(chunks) and any(head in n for n in whole)
    for name in whole:
        torch.testing.assert_close(chunks[name], whole[name], rtol=1e-5, atol=1e-6)
    sizes = [n for c, n in calls if c]  # the head's inputs: hidden states of at most 3 tokens
    assert sizes and max(sizes) == 3 and all(n <= 3 for n in sizes)
    assert all(n == 2 or n == 3 for c, n in calls if not c)  # whole batches: [batch, length, hidden]


def test_train_chunked_loss_from_the_command_line(case, tmp_path):
    model_dir, mask_path, _, train = case
    result = _train(model_dir, mask_path, train, tmp_path / "out", "--epochs", "1", "--chunked-loss")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["recipe"]["chunked_loss"] is True


def test_a_chunked_loss_refuses_a_model_that_changes_its_heads_output(folders, monkeypatch):
    folder = folders / "llama"
    recipe = CausalLMRecipe(chunked_loss=True, amp=False)
    model = _prepared(folder, _masks(_load(folder), SELECTED[:1], 0.2), recipe)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: type(out := forward(**kw))(logits=out.logits * 0.5))
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ExportError, match="changes its head's output before returning the logits"):
        causal.batch_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, recipe)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again


def test_a_tied_lm_head_mask_trains_the_one_shared_tensor(folders, tmp_path, caplog):
    folder = folders / "llama-tied"
    model = _load(folder)
    masks = _masks(model, ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"), 0.05)
    MaskFile(masks, {}).save(tmp_path / "m.safetensors")
    (tmp_path / "train.txt").write_text("\n".join(LINES) + "\n")
    with caplog.at_level("WARNING", logger="fps_onnx"):
        result = _train(folder, tmp_path / "m.safetensors", tmp_path / "train.txt", tmp_path / "out",
                        "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "model.embed_tokens.weight and lm_head.weight are one tied tensor" in caplog.text
    base, tuned = _state(folder), _state(tmp_path / "out" / "model")
    assert "lm_head.weight" not in tuned  # still tied: saved once
    changed = (tuned["model.embed_tokens.weight"] != base["model.embed_tokens.weight"]).numpy()
    assert changed.any() and not (changed & ~masks["lm_head.weight"]).any()
    loaded = _load(tmp_path / "out" / "model")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "delta.safetensors"), "pt") as fh:
        assert sorted(fh.keys()) == sorted(f"{n}:{p}" for n in ("model.embed_tokens.weight",
                                                                "model.layers.0.self_attn.q_proj.weight")
                                           for p in ("indices", "values"))
    # apply-delta, checking the delta against the model built without weights, writes the same folder
    rebuilt = tmp_path / "rebuilt"
    result = invoke("apply-delta", f"hf:{folder}", tmp_path / "out" / "delta.safetensors", "-o", rebuilt, "-q")
    assert result.exit_code == 0, result.output
    assert (rebuilt / "model.safetensors").read_bytes() == (tmp_path / "out" / "model" / "model.safetensors").read_bytes()


def _bert_folder(tmp_path) -> Path:
    config = transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.mark.parametrize("problem, message", [
    ("other-model", "is not a parameter of LlamaForCausalLM"),
    ("blank", "holds no text"),
    ("no-tokens", "has no tokens to predict"),
    ("bert", "is not a causal language model (bert)"),
    ("shape", "has shape [8, 8], but the model's weight is [64, 64]"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, problem, message):
    model_dir, mask_path, _, train = case
    spec = model_dir
    if problem == "other-model":
        MaskFile({"bert.encoder.layer.0.attention.self.query.weight": np.ones((16, 16), bool)}, {}).save(
            tmp_path / "bad.safetensors")
        mask_path = tmp_path / "bad.safetensors"
    elif problem == "shape":
        MaskFile({"model.layers.0.self_attn.q_proj.weight": np.ones((8, 8), bool)}, {}).save(
            tmp_path / "bad.safetensors")
        mask_path = tmp_path / "bad.safetensors"
    elif problem == "blank":
        train = tmp_path / "blank.txt"
        train.write_text("\n   \n\n")
    elif problem == "no-tokens":
        train = tmp_path / "prompts.jsonl"
        train.write_text(json.dumps({"prompt": "x" * 400, "completion": " Paris."}) + "\n")
    else:
        spec = _bert_folder(tmp_path)
    result = _train(spec, mask_path, train, tmp_path / "out", "--epochs", "1", "--max-length", "16")
    assert_one_error(result, re.escape(message), absent=[tmp_path / "out"])


def test_apply_delta_refuses_another_base(case, folders, tmp_path):
    model_dir, mask_path, _, train = case
    assert _train(model_dir, mask_path, train, tmp_path / "out", "--max-steps", "1").exit_code == 0
    delta = tmp_path / "out" / "delta.safetensors"
    assert hf_folder.base_sha256(folders / "llama2") != hf_folder.base_sha256(model_dir)
    result = invoke("apply-delta", f"hf:{folders / 'llama2'}", delta, "-o", tmp_path / "merged")
    assert_one_error(result, "was trained from another base model", absent=[tmp_path / "merged"])
    # a copy of the same weights is the same base: the hash is over the weight files only
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / "README.md").write_text("notes")
    assert hf_folder.base_sha256(copy) == hf_folder.base_sha256(model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(case, tmp_path):
    model_dir, mask_path, masks, train = case
    script = shutil.which("fps-onnx", path=str(Path(sys.executable).parent))
    assert script is not None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), script, "train", "--task", "causal-lm",
           "--model", f"hf:{model_dir}", "--masks", str(mask_path), "--train", str(train), "--val", str(train),
           "-o", str(tmp_path / "out"), "--epochs", "2", "--batch-size", "2", "--lr", "1e-2", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["epochs"][-1]["val_loss"] < metrics["epochs"][0]["train_loss"]
    base, tuned = _state(model_dir), _state(tmp_path / "out" / "model")
    for name, before in base.items():
        changed = (tuned[name] != before).numpy()
        assert not changed.any() if name not in masks else not (changed & ~masks[name]).any(), name


def test_several_forward_passes_before_one_backward_share_the_merged_weights(folders):
    """Each use re-writes the delta without bumping the weight's version counter: graphs
    still waiting for their backward pass stay valid and see the same weights."""
    folder = folders / "llama"
    masks = _masks(_load(folder), SELECTED, 0.2)
    model = _prepared(folder, masks, CausalLMRecipe())
    delta = sparse.unique_deltas(model)["lm_head.weight"]
    with torch.no_grad():
        delta.values.normal_(0, 0.1)  # as an optimizer step leaves them
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    first = model(input_ids=ids).logits
    second = model(input_ids=ids).logits
    (first.square().sum() + second.square().sum()).backward()  # no "modified by an inplace operation"
    grad = delta.values.grad.clone()
    delta.values.grad = None
    (2 * model(input_ids=ids).logits.square().sum()).backward()
    torch.testing.assert_close(grad, delta.values.grad)
    merged = sparse.merge(model)
    torch.testing.assert_close(merged(input_ids=ids).logits, first)


@pytest.mark.parametrize("key, value, message", [
    ("shapes", "[" * 100_000, "metadata 'shapes' nests arrays and objects deeper than 100 levels"),
    ("shapes", '{"a": ' * 10_000 + "[]" + "}" * 10_000, "metadata 'shapes' nests arrays and objects deeper"),
    ("shapes", '{"lm_head.weight": [' + "6" * 5000 + ", 8]}", "metadata 'shapes' holds an integer of 5,000 digits"),
    ("dense", "[" * 10_000 + "]" * 10_000, "metadata 'dense' nests arrays and objects deeper than 100 levels"),
    ("dense", '["' + "x" * (16 << 20) + '"]', "metadata 'dense' is larger than 16,777,216 characters"),
])
def test_apply_delta_refuses_metadata_past_the_json_limits(folders, tmp_path, key, value, message):
    from safetensors.torch import save_file

    meta = {"format": delta_file.DELTA_FORMAT, "format_version": delta_file.DELTA_FORMAT_VERSION, "shapes": "{}",
            "dense": "[]", hf_folder.BASE_HASH_KEY: hf_folder.base_sha256(folders / "llama"), key: value}
    delta = tmp_path / "delta.safetensors"
    save_file({"unused": torch.zeros(1)}, str(delta), metadata=meta)
    result = invoke("apply-delta", f"hf:{folders / 'llama'}", delta, "-o", tmp_path / "merged")
    assert_one_error(result, re.escape(message), absent=[tmp_path / "merged"])


def _stats_for(model_dir, masks, path, sha, loud: int = 0) -> None:
    """A stats file of model ``sha`` for ``masks``: input channel ``loud`` 1e6 times the others."""
    from fps_onnx.stats import ChannelStats, Stats

    params = dict(_load(model_dir).named_parameters(remove_duplicate=False))
    stats = Stats(sha, num_samples=1)
    for key in masks:
        acc = ChannelStats()
        abs_sum = np.ones(params[key].shape[1])
        abs_sum[loud] = 1e6
        acc.add(abs_sum=abs_sum, sq_sum=abs_sum ** 2, count=1)
        stats.weights[key] = acc
    stats.save(path)


def test_step_scale_slows_the_entries_of_loud_input_channels(case, tmp_path):
    """--step-scale: channel 0, a million times louder than the median, moves a millionth as far;
    every other selected entry trains as it does without the option, to the bit."""
    from safetensors.numpy import load_file

    model_dir, _, masks, train = case
    sha = "c" * 64
    MaskFile(masks, {}, {"model_sha256": sha, "norm": "l1"}).save(tmp_path / "m.safetensors")
    _stats_for(model_dir, masks, tmp_path / "s.safetensors", sha)
    runs = {}
    for name, extra in (("plain", ()), ("scaled", ("--step-scale", tmp_path / "s.safetensors"))):
        result = _train(model_dir, tmp_path / "m.safetensors", train, tmp_path / name, "--max-steps", "1", *extra)
        assert result.exit_code == 0, result.output
        runs[name] = load_file(str(tmp_path / name / "delta.safetensors"))
    for key in masks:
        plain, scaled = (runs[n][f"{key}:values"] for n in ("plain", "scaled"))
        loud = (runs["plain"][f"{key}:indices"] % masks[key].shape[1]) == 0
        assert loud.any() and (~loud).any()
        np.testing.assert_array_equal(scaled[~loud], plain[~loud])
        np.testing.assert_allclose(scaled[loud], plain[loud] * 1e-6, rtol=1e-3)
        assert np.abs(plain[loud]).min() > 0


@pytest.mark.parametrize("problem, message", [
    ("other-model", "are of another model than the masks"),
    ("no-model", "name no ONNX model they were selected on"),
    ("onnx", "--step-scale needs masks keyed by parameter names, not --onnx"),
    ("not-stats", "s.safetensors"),
])
def test_step_scale_bad_input_is_one_line_and_writes_nothing(case, tmp_path, problem, message):
    model_dir, _, masks, train = case
    sha = "c" * 64
    MaskFile(masks, {}, {} if problem == "no-model" else {"model_sha256": sha}).save(tmp_path / "m.safetensors")
    _stats_for(model_dir, masks, tmp_path / "s.safetensors", "d" * 64 if problem == "other-model" else sha)
    if problem == "not-stats":
        MaskFile(masks, {}, {"model_sha256": sha}).save(tmp_path / "s.safetensors")
    extra = {"onnx": ("--onnx", tmp_path / "m.safetensors")}.get(problem, ())
    result = _train(model_dir, tmp_path / "m.safetensors", train, tmp_path / "out", "--max-steps", "1",
                    "--step-scale", tmp_path / "s.safetensors", *extra)
    assert_one_error(result, re.escape(message), absent=[tmp_path / "out"])
