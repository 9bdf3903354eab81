"""fps_onnx.train.prepare / merge under other training loops: Hugging Face Trainer,
Accelerate and a plain loop, with AdamW weight decay > 0."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fps_onnx  # noqa: E402
import fps_onnx.torch.train  # noqa: E402
from fps_onnx.torch.train import Recipe  # noqa: E402

LINEARS = ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def random_masks(model, fraction: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    masks = {}
    for layer in range(2):
        for linear in LINEARS:
            name = f"bert.encoder.layer.{layer}.{linear}.weight"
            masks[name] = rng.random(tuple(params[name].shape)) < fraction
    return masks


def samples(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def plain_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_only_selected_moved(before: dict, model, masks: dict, trained_fully=()) -> None:
    after = model.state_dict()
    assert set(after) == set(before)  # merged: plain names, no parametrisation left
    for name, old in before.items():
        new = after[name]
        if name in masks:
            mask = torch.from_numpy(masks[name])
            assert torch.equal(new[~mask], old[~mask]), f"{name}: a frozen entry moved"
            moved = (new[mask] != old[mask]).float().mean().item()
            assert moved > 0.9, f"{name}: only {moved:.0%} of the selected entries moved"
        elif name in trained_fully:
            assert not torch.equal(new, old), f"{name} was to train but did not move"
        else:
            assert torch.equal(new, old), f"{name} is frozen but moved"


def exp_avg_numel(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
    return sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)


def test_hf_trainer_with_weight_decay_moves_only_the_selected_entries(tmp_path):
    model = tiny_bert()
    masks = random_masks(model)
    before = plain_state(model)
    trainable = fps_onnx.torch.train.prepare(model, masks)  # default recipe: + head and biases
    selected = sum(int(m.sum()) for m in masks.values())
    assert trainable.selected == selected
    dense = sum(p.numel() for n, p in model.named_parameters() if n in trainable.dense)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == selected + dense

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.1, warmup_steps=0, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)  # the default optimizer
    trainer = transformers.Trainer(model=model, args=args, train_dataset=samples())
    trainer.train()
    # the optimizer state is k-sized: selected entries plus the head and biases, no dense weight
    assert exp_avg_numel(trainer.optimizer) == selected + dense
    decayed = [g for g in trainer.optimizer.param_groups if g["weight_decay"] > 0]
    assert any(p.numel() for g in decayed for p in g["params"])  # decay really ran on the deltas

    fps_onnx.torch.train.merge(model)
    check_only_selected_moved(before, model, masks, trained_fully=set(trainable.dense))
    assert {"classifier.weight", "bert.encoder.layer.0.output.dense.bias"} <= set(trainable.dense)


def _masks_alone(seed: int):
    """A tiny BERT prepared to train its masked entries alone, with random masks of ``seed``:
    (model, masks, state before, AdamW with decay over the trainable parameters)."""
    model = tiny_bert(seed)
    masks = random_masks(model, seed=seed)
    before = plain_state(model)
    fps_onnx.torch.train.prepare(model, masks, Recipe(train_head=False, train_bias=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    return model, masks, before, optimizer


def test_plain_loop_with_adamw_decay_and_mask_alone(tmp_path):
    model, masks, before, optimizer = _masks_alone(1)
    batch = {k: torch.stack([s[k] for s in samples(8, 1)]) for k in ("input_ids", "attention_mask", "labels")}
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert exp_avg_numel(optimizer) == sum(int(m.sum()) for m in masks.values())
    fps_onnx.torch.train.merge(model)
    check_only_selected_moved(before, model, masks)
    # the merged model is an ordinary one: save and reload it with transformers
    model.save_pretrained(tmp_path / "out")
    again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out")
    for name, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_accelerate_prepare_keeps_frozen_entries():
    accelerate = pytest.importorskip("accelerate")
    model, masks, before, optimizer = _masks_alone(2)
    loader = torch.utils.data.DataLoader(samples(8, 2), batch_size=4)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for _ in range(2):
        for batch in loader:
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert exp_avg_numel(optimizer) == sum(int(m.sum()) for m in masks.values())
    model = accelerator.unwrap_model(model)
    fps_onnx.torch.train.merge(model)
    check_only_selected_moved(before, model, masks)


def test_prepare_takes_a_mask_file_path(tmp_path):
    from fps_onnx.selection.maskfile import MaskFile

    model = tiny_bert(3)
    masks = random_masks(model, seed=3)
    path = tmp_path / "masks.safetensors"
    MaskFile(masks, {}, {"method": "random"}).save(path)
    trainable = fps_onnx.torch.train.prepare(model, str(path), Recipe(train_head=False, train_bias=False))
    assert trainable.selected == sum(int(m.sum()) for m in masks.values())
    assert sorted(trainable.deltas) == sorted(masks)


def test_fused_adamw_updates_reach_the_weights():
    """Fused AdamW updates parameters in place without bumping their version counter."""
    model = tiny_bert(4)
    masks = random_masks(model, seed=4)
    before = plain_state(model)
    fps_onnx.torch.train.prepare(model, masks, Recipe(train_head=False, train_bias=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    batch = {k: torch.stack([s[k] for s in samples(8, 4)]) for k in ("input_ids", "attention_mask", "labels")}
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    fps_onnx.torch.train.merge(model)
    check_only_selected_moved(before, model, masks)


def test_hf_trainer_steps_scaled_by_scale_steps(tmp_path):
    """fps_onnx.scale_steps on the optimizer handed to Trainer: its first step of each selected
    entry is the unscaled run's times the entry's channel factor (channel 0 of every weight ten
    times the others: 0.1; the rest 1), whatever wraps the optimizer."""
    from _models import channel_stats
    from fps_onnx.selection.maskfile import MaskFile

    masks = random_masks(tiny_bert(5), fraction=0.3, seed=5)
    MaskFile(masks, {}, {"model_sha256": "e" * 64}).save(tmp_path / "masks.safetensors")
    loud = channel_stats({k: m.shape[1] for k, m in masks.items()}, lambda j: np.where(j == 0, 10.0, 1.0))
    loud.save(tmp_path / "stats.safetensors")

    def first_step(scaled: bool) -> dict:
        model = tiny_bert(5)
        fps_onnx.torch.train.prepare(model, tmp_path / "masks.safetensors", Recipe(train_head=False, train_bias=False))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        if scaled:
            fps_onnx.scale_steps(model, optimizer, tmp_path / "masks.safetensors", tmp_path / "stats.safetensors")
        before = {n: d.values.detach().clone() for n, d in fps_onnx.torch.train.sparse.deltas(model).items()}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, warmup_steps=0,
            report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
            seed=0, dataloader_num_workers=0)
        transformers.Trainer(model=model, args=args, train_dataset=samples(),
                             optimizers=(optimizer, None)).train()
        return {n: (d.values.detach() - before[n], d.flat())
                for n, d in fps_onnx.torch.train.sparse.deltas(model).items()}

    plain, scaled = first_step(False), first_step(True)
    assert sorted(plain) == sorted(masks)
    for name, (step, flat) in plain.items():
        channel = flat % masks[name].shape[1]
        assert step.abs().min() > 0 and torch.any(channel == 0)
        torch.testing.assert_close(scaled[name][0], step * torch.where(channel == 0, 0.1, 1.0))


def test_hf_trainer_example_runs(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    from fps_onnx.selection.maskfile import MaskFile

    def dense_path(self):
        raise AssertionError("the example reads dense masks (MaskFile.masks); it should read indices")

    monkeypatch.setattr(MaskFile, "masks", property(dense_path))
    path = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["-o", str(tmp_path), "--steps", "2"])
    assert summary["frozen_moved"] == 0 and summary["moved"] > 0.9 * summary["selected"]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "model")
    assert not any("parametrizations" in k for k in reloaded.state_dict())
