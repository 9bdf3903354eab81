"""``fps-onnx train`` end to end: outputs, reload, bad input, interruption."""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest

from _cli import assert_one_error, invoke

torch = pytest.importorskip("torch")

from fps_onnx.selection.maskfile import MaskFile  # noqa: E402
from fps_onnx.torch.train import delta  # noqa: E402

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc = nn.Linear(8, 16)
            self.head = nn.Linear(16, num_classes)

        def forward(self, input):
            h = self.dw(torch.relu(self.stem(input))).mean((2, 3))
            return self.head(torch.relu(self.fc(h)))

    def build(num_classes=3):
        torch.manual_seed(0)
        return Net(num_classes), torch.randn(2, 3, 8, 8)
''')


@pytest.fixture
def case(tmp_path):
    """(model SPEC, mask path, train/val/test .npz paths) of a tiny learnable task."""
    (tmp_path / "tinynet.py").write_text(MODEL)
    spec = f"{tmp_path / 'tinynet.py'}:build"
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("val", 48), ("test", 48)):
        y = rng.integers(0, 3, n)
        x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32) * 0.5
        x[np.arange(n), y] += 1.5
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    shapes = {"stem.weight": (8, 3, 3, 3), "dw.weight": (8, 1, 3, 3), "fc.weight": (16, 8),
              "head.weight": (3, 16)}
    masks = {k: rng.random(s) < 0.3 for k, s in shapes.items()}
    MaskFile(masks, {k: {"shape": list(s), "selected": int(masks[k].sum())} for k, s in shapes.items()}
             ).save(tmp_path / "masks.safetensors")
    return spec, tmp_path / "masks.safetensors", tmp_path


def _train(spec, masks, tmp, *extra):
    args = ["train", "--model", spec, "--masks", str(masks), "--train", str(tmp / "train.npz"),
            "-o", str(tmp / "out"), "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "-q", *extra]
    return invoke(*args)


def _build(spec):
    from fps_onnx.torch.export import build_model

    return build_model(spec)[0]


def test_train_writes_merged_model_delta_and_metrics(case):
    spec, masks, tmp = case
    result = _train(spec, masks, tmp, "--val", str(tmp / "val.npz"), "--test", str(tmp / "test.npz"),
                    "--json")
    assert result.exit_code == 0, result.output
    out = tmp / "out"
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "metrics.json", "model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3
    assert {"train_loss", "val_accuracy", "seconds", "peak_memory_bytes"} <= set(metrics["epochs"][0])
    assert metrics["test_accuracy"] > 0.8
    assert metrics["best_epoch"] in (1, 2, 3)
    assert metrics["trainable"]["dense_tensors"] == ["dw.bias", "fc.bias", "head.bias", "head.weight",
                                                     "stem.bias"]

    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    start = _build(spec)
    assert set(state) == set(start.state_dict())
    model = _build(spec)
    model.load_state_dict(state)
    x = torch.from_numpy(np.load(tmp / "test.npz")["x"])
    y = torch.from_numpy(np.load(tmp / "test.npz")["y"])
    acc = float((model(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(metrics["test_accuracy"])
    rebuilt = delta.apply_delta(_build(spec), out / "delta.safetensors")
    for name, value in rebuilt.state_dict().items():
        assert torch.equal(value, state[name]), name
    loaded = MaskFile.load(masks).masks
    mask = torch.from_numpy(loaded["fc.weight"])
    assert torch.equal(state["fc.weight"][~mask], start.fc.weight[~mask])


@pytest.mark.parametrize("problem, message", [
    ("shape", "mask 'fc.weight' has shape [16, 9], but the model's weight is [16, 8]"),
    ("empty", "the mask selects no entries"),
    ("labels", "label 3 is out of range for 3 classes"),
    ("classes", "has no classes"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, problem, message):
    spec, masks, tmp = case
    train = tmp / "train.npz"
    if problem in ("shape", "empty"):
        shapes = {"fc.weight": (16, 9) if problem == "shape" else (16, 8)}
        fill = (lambda s: np.ones(s, bool)) if problem == "shape" else (lambda s: np.zeros(s, bool))
        masks = tmp / "bad.safetensors"
        MaskFile({k: fill(s) for k, s in shapes.items()}, {}).save(masks)
    elif problem == "labels":
        np.savez(tmp / "val.npz", x=np.zeros((2, 3, 8, 8), np.float32), y=[0, 3])
    else:
        (tmp / "empty").mkdir()
        train = tmp / "empty"
    args = ["train", "--model", spec, "--masks", str(masks), "--train", str(train),
            "-o", str(tmp / "out"), "-q"]
    if problem == "labels":
        args += ["--val", str(tmp / "val.npz"), "--num-classes", "3"]
    assert_one_error(invoke(*args), re.escape(message), absent=[tmp / "out"])


def test_interrupt_during_training_or_writing_leaves_no_model_file(case, monkeypatch):
    spec, masks, tmp = case
    from fps_onnx.torch.train import loop

    calls = {"n": 0}
    real_step = loop.train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted)
    result = _train(spec, masks, tmp)
    assert result.exit_code == 130
    assert "no output was written" in result.output
    assert not (tmp / "out").exists()
    monkeypatch.setattr(loop, "train_step", real_step)

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def half_then_interrupt(tensors, path, metadata=None):
        real_save(dict(list(tensors.items())[:1]), path, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_interrupt)
    result = _train(spec, masks, tmp)
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp.iterdir() if "out" in p.name) == []  # nor temporaries


def test_outputs_replace_a_previous_run_together(case, monkeypatch):
    spec, masks, tmp = case
    out = tmp / "runs" / "a" / "out"  # missing parents are created at the end
    args = ["train", "--model", spec, "--masks", str(masks), "--train", str(tmp / "train.npz"),
            "-o", str(out), "--epochs", "1", "--batch-size", "16", "-q"]
    assert invoke(*args).exit_code == 0
    (out / "notes.txt").write_text("mine")
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def fail_second(tensors, path, metadata=None):  # delta written, then the model fails
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    result = invoke(*args, "--seed", "1")
    assert_one_error(result, "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the first run, whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    assert invoke(*args, "--seed", "1").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "metrics.json",
                                                     "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["recipe"]["seed"] == 1
    assert (out / "model.safetensors").read_bytes() != first["model.safetensors"]


def test_text_model_from_a_transformers_folder(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 50, (64, 8))
    labels = (ids[:, 0] >= 27).astype(np.int64)  # the first token decides the class
    np.savez(tmp_path / "train.npz", input_ids=ids, attention_mask=np.ones_like(ids), labels=labels)
    masks = {"bert.encoder.layer.0.attention.self.query.weight": rng.random((16, 16)) < 0.2,
             "bert.encoder.layer.0.output.dense.weight": rng.random((16, 32)) < 0.2}
    MaskFile(masks, {}).save(tmp_path / "m.safetensors")
    result = invoke("train", "--model", f"hf:{tmp_path / 'bert'}", "--masks", tmp_path / "m.safetensors",
                    "--train", tmp_path / "train.npz", "--val", tmp_path / "train.npz", "-o", tmp_path / "out",
                    "--epochs", "3", "--batch-size", "16", "--lr", "0.01", "-q", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["trainable"]["selected"] == sum(int(m.sum()) for m in masks.values())
    assert "classifier.weight" in metrics["trainable"]["dense_tensors"]
    assert metrics["epochs"][0]["val_accuracy"] >= 0.0
