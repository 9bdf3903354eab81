"""``train --save-every`` / ``--resume``: a run killed mid-way goes on to the very same deltas.

A real process is killed with SIGKILL right after its checkpoint of step 7 of 12 (a driver
script wraps :meth:`Checkpoints.save`); the resumed run must write a ``delta.safetensors``
identical (metadata and tensors, bit for bit) to an uninterrupted run's. Checkpoints of another run, and
damaged ones, are refused with one line and nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _cli import assert_one_error, invoke

torch = pytest.importorskip("torch")

from fps_onnx.selection.maskfile import MaskFile  # noqa: E402

# Dropout and batch norm trained fully: the resumed run needs the generators and buffers too.
MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 16)
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(16, num_classes)

        def forward(self, input):
            h = torch.relu(self.norm(self.stem(input))).mean((2, 3))
            return self.head(self.drop(torch.relu(self.fc(h))))

    def build(num_classes=3):
        torch.manual_seed(0)
        return Net(num_classes), torch.randn(2, 3, 8, 8)
''')

# Runs the CLI and SIGKILLs this process right after the checkpoint of step KILL_AT is written.
DRIVER = textwrap.dedent('''
    import os, signal, sys
    from fps_onnx.torch.train import checkpoint

    real = checkpoint.Checkpoints.save

    def save(self, net, optimizer, schedule, progress):
        real(self, net, optimizer, schedule, progress)
        if progress.step == int(os.environ["KILL_AT"]) and self.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpoints.save = save
    from fps_onnx.cli.main import main
    main(sys.argv[1:])
''')


@pytest.fixture
def case(tmp_path):
    """(base CLI arguments of a 12-step run, tmp): 96 samples, batches of 16, 2 epochs."""
    (tmp_path / "net.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("val", 24)):
        y = rng.integers(0, 3, n)
        x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32) * 0.5
        x[np.arange(n), y] += 1.5
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    shapes = {"stem.weight": (8, 3, 3, 3), "fc.weight": (16, 8)}
    MaskFile({k: rng.random(s) < 0.3 for k, s in shapes.items()}, {}).save(tmp_path / "masks.safetensors")
    args = ["train", "--model", f"{tmp_path / 'net.py'}:build", "--masks", tmp_path / "masks.safetensors",
            "--train", tmp_path / "train.npz", "--val", tmp_path / "val.npz", "--epochs", "2",
            "--batch-size", "16", "--lr", "0.05", "--train-norm", "-q"]
    return [str(a) for a in args], tmp_path


def _same(a: Path, b: Path) -> None:
    """Two safetensors files hold the same metadata and tensors, bit for bit."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key


def _killed(args: list[str], tmp: Path, kill_at: int, launcher: list[str] | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess that SIGKILLs itself after the checkpoint of step ``kill_at``
    (with as many threads as this process: other thread counts round differently)."""
    (tmp / "driver.py").write_text(DRIVER)
    env = {**(env or os.environ), "KILL_AT": str(kill_at)}
    cmd = [*(launcher or [sys.executable]), str(tmp / "driver.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_a_run_killed_after_step_7_of_12_resumes_to_the_same_delta(case):
    args, tmp = case
    assert invoke(*args, "-o", tmp / "whole").exit_code == 0

    done = _killed([*args, "-o", str(tmp / "out"), "--save-every", "1"], tmp, 7)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (tmp / "out").exists()
    saved = tmp / "out.checkpoints"
    record = json.loads((saved / "last" / "record.json").read_text())
    assert record["position"] == {**record["position"], "epoch": 2, "batch": 1, "step": 7}
    assert len(record["history"]["records"]) == 1

    result = invoke(*args, "-o", tmp / "out", "--resume", saved)
    assert result.exit_code == 0, result.output
    _same(tmp / "out" / "delta.safetensors", tmp / "whole" / "delta.safetensors")
    _same(tmp / "out" / "model.safetensors", tmp / "whole" / "model.safetensors")
    whole = json.loads((tmp / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp / "out" / "metrics.json").read_text())
    for a, b in zip(whole["epochs"], resumed["epochs"]):
        assert (a["train_loss"], a["val_accuracy"]) == (b["train_loss"], b["val_accuracy"])
    assert whole["best_epoch"] == resumed["best_epoch"]


def _stopped_at(monkeypatch, step: int):
    """Make the run stop (an exception, in-process) right after its checkpoint of ``step``."""
    from fps_onnx.torch.train import checkpoint

    real = checkpoint.Checkpoints.save

    class Stop(Exception):
        pass

    def save(self, net, optimizer, schedule, progress):
        real(self, net, optimizer, schedule, progress)
        if progress.step == step:
            raise Stop

    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
    return real


@pytest.mark.parametrize("step", [6, 12])  # an epoch's last batch; the run's last step
def test_resuming_at_an_epoch_boundary_or_the_end(case, monkeypatch, step):
    args, tmp = case
    assert invoke(*args, "-o", tmp / "whole").exit_code == 0
    real = _stopped_at(monkeypatch, step)
    assert invoke(*args, "-o", tmp / "out", "--save-every", "3", "--save-dir", tmp / "ck").exit_code == 1
    from fps_onnx.torch.train import checkpoint

    monkeypatch.setattr(checkpoint.Checkpoints, "save", real)
    (tmp / "ck" / ".last.0123456789ab.tmp").mkdir()  # as a kill while writing leaves it
    result = invoke(*args, "-o", tmp / "out", "--resume", tmp / "ck", "--save-every", "3")
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in (tmp / "ck").iterdir())
    assert left == (["last"] if step < 12 else [".last.0123456789ab.tmp", "last"])  # the next save cleans up
    _same(tmp / "out" / "delta.safetensors", tmp / "whole" / "delta.safetensors")


@pytest.fixture
def checkpoint_of(case, monkeypatch):
    """(args, tmp, folder): a checkpoint written at step 4 of the case's run."""
    args, tmp = case
    from fps_onnx.torch.train import checkpoint

    real = _stopped_at(monkeypatch, 4)
    assert invoke(*args, "-o", tmp / "first", "--save-every", "4").exit_code == 1
    monkeypatch.setattr(checkpoint.Checkpoints, "save", real)
    return args, tmp, tmp / "first.checkpoints"


def _replace(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


@pytest.mark.parametrize("change, message", [
    ("lr", r"another recipe: --lr 0\.05 there, 0\.01 here"),
    ("epochs", r"another recipe: --epochs 2 there, 3 here"),
    ("data", "other training or validation data"),
    ("masks", r"other masks \(another selection or budget\)"),
    ("model", r"another model \(its weights differ\)"),
])
def test_a_checkpoint_of_another_run_is_refused(checkpoint_of, change, message):
    args, tmp, folder = checkpoint_of
    if change == "lr":
        args = _replace(args, "--lr", "0.01")
    elif change == "epochs":
        args = _replace(args, "--epochs", "3")
    elif change == "data":
        data = dict(np.load(tmp / "train.npz"))
        data["x"][0, 0, 0, 0] += 1
        np.savez(tmp / "other.npz", **data)
        args = _replace(args, "--train", str(tmp / "other.npz"))
    elif change == "masks":
        rng = np.random.default_rng(5)
        MaskFile({"fc.weight": rng.random((16, 8)) < 0.3}, {}).save(tmp / "other.safetensors")
        args = _replace(args, "--masks", str(tmp / "other.safetensors"))
    else:
        (tmp / "net2.py").write_text(MODEL.replace("manual_seed(0)", "manual_seed(1)"))
        args = _replace(args, "--model", f"{tmp / 'net2.py'}:build")
    before = {p: p.read_bytes() for p in (folder / "last").iterdir()}
    assert_one_error(invoke(*args, "-o", tmp / "out", "--resume", folder), message, absent=[tmp / "out"])
    assert {p: p.read_bytes() for p in (folder / "last").iterdir()} == before


def test_a_checkpoint_resumes_only_with_the_step_scale_it_was_written_with(case, monkeypatch):
    """--step-scale changes every step: a checkpoint written without it, or with statistics giving other
    factors, is refused by a run with them; it is taken up by a run with the same factors, read from the
    same file or another (sums doubled over twice the samples: other bytes, the same channel means)."""
    from fps_onnx.stats import ChannelStats, Stats
    from fps_onnx.torch.train import checkpoint

    args, tmp = case
    MaskFile({"fc.weight": np.random.default_rng(1).random((16, 8)) < 0.3}, {},
             {"model_sha256": "e" * 64}).save(tmp / "fc.safetensors")
    args = _replace(args, "--masks", str(tmp / "fc.safetensors"))
    for name, loud, samples in (("s1", 0, 1), ("s2", 1, 1), ("s1x2", 0, 2)):
        stats, acc = Stats("e" * 64, num_samples=samples), ChannelStats()
        acc.add(abs_sum=np.where(np.arange(8) == loud, 10.0, 1.0) * samples, count=samples)
        stats.weights["fc.weight"] = acc
        stats.save(tmp / f"{name}.safetensors")
    real = _stopped_at(monkeypatch, 4)
    for run, extra in (("plain", []), ("scaled", ["--step-scale", str(tmp / "s1.safetensors")])):
        assert invoke(*args, *extra, "-o", tmp / run, "--save-every", "4").exit_code == 1
    monkeypatch.setattr(checkpoint.Checkpoints, "save", real)
    assert (tmp / "s1.safetensors").read_bytes() != (tmp / "s1x2.safetensors").read_bytes()
    message = r"scaled by other factors \(other --step-scale statistics\), or not scaled"
    for folder, extra in (("plain", ["--step-scale", str(tmp / "s1.safetensors")]),
                          ("scaled", ["--step-scale", str(tmp / "s2.safetensors")])):
        result = invoke(*args, *extra, "-o", tmp / "out", "--resume", tmp / f"{folder}.checkpoints")
        assert_one_error(result, message, absent=[tmp / "out"])
    for same in ("s1", "s1x2"):
        result = invoke(*args, "--step-scale", tmp / f"{same}.safetensors", "-o", tmp / f"out-{same}", "--resume",
                        tmp / "scaled.checkpoints")
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"state\.safetensors is damaged"),
    ("flip", r"state\.safetensors is damaged"),
    ("record", r"record\.json is not JSON"),
    ("missing", r"holds no checkpoint \(last/ is missing\)"),
    ("version", "checkpoint format version '9'"),
    ("world", r"written by a run of 2 processes, this one has 1"),
    ("position", r"batch must be a whole number from 0 to 6"),
    ("generator", r"generator state torch is not valid \(Invalid mt19937 state\)"),
    ("optimizer", r"optimizer tensor '0/exp_avg' must be finite float"),
])
def test_a_damaged_checkpoint_is_refused_and_nothing_written(checkpoint_of, damage, message):
    args, tmp, folder = checkpoint_of
    last = folder / "last"
    state, record = last / "state.safetensors", last / "record.json"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[-5] ^= 1
        state.write_bytes(bytes(data))
    elif damage == "record":
        record.write_text(record.read_text()[:50])
    elif damage == "missing":
        shutil.rmtree(last)
    elif damage in ("generator", "optimizer"):  # a crafted file, its digest in the record
        from safetensors.torch import load_file, save_file

        from fps_onnx._io import content_digest
        from fps_onnx.errors import DataError

        tensors = load_file(str(state))
        if damage == "generator":
            tensors["rng/0/torch"] = torch.full_like(tensors["rng/0/torch"], 255)
        else:
            tensors["optimizer/0/exp_avg"] = torch.full_like(tensors["optimizer/0/exp_avg"], float("nan"))
        save_file(tensors, str(state), metadata={"format": "fps-train-checkpoint", "format_version": "1"})
        content = json.loads(record.read_text())
        content["files"]["state.safetensors"] = content_digest(state, DataError)
        record.write_text(json.dumps(content))
    else:
        content = json.loads(record.read_text())
        if damage == "version":
            content["format_version"] = "9"
        elif damage == "world":
            content["identity"]["world_size"] = 2
        else:
            content["position"]["batch"] = 10**6
        record.write_text(json.dumps(content))
    assert_one_error(invoke(*args, "-o", tmp / "out", "--resume", folder), message, absent=[tmp / "out"])


def test_save_dir_without_save_every_and_clashing_paths_are_refused(case):
    args, tmp = case
    assert_one_error(invoke(*args, "-o", tmp / "out", "--save-dir", tmp / "ck"), "--save-dir needs --save-every",
                     status=2, alone=False)
    assert_one_error(invoke(*args, "-o", tmp / "out", "--save-every", "2", "--save-dir", tmp / "out"),
                     "the same file as -o", absent=[tmp / "out"])
    assert_one_error(invoke(*args, "-o", tmp / "out", "--save-every", "0"), "--save-every must be",
                     absent=[tmp / "out"])


@pytest.mark.parametrize(("fsdp", "world", "message"), [
    (False, 2, "another recipe: --fsdp True there, False here"),
    (True, 4, "written by a run of 2 processes, this one has 4"),
    (True, 2, None)])
def test_a_sharded_runs_checkpoint_is_taken_up_only_by_a_sharded_run_of_as_many_processes(
        tmp_path, fsdp, world, message):
    from fps_onnx.errors import CheckpointError
    from fps_onnx.torch.train import checkpoint
    from fps_onnx.torch.train.recipe import CausalLMRecipe

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(net.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def ident(fsdp: bool, world: int) -> dict:
        return checkpoint.identity("causal-lm", "0" * 64, net, {"train": None}, CausalLMRecipe(fsdp=fsdp), world)

    written = checkpoint.Checkpoints(checkpoint.Checkpointing(1, tmp_path), ident(True, 2), tmp_path / "out")
    written.save(net, optimizer, schedule, checkpoint.Progress(step=1))
    resume = checkpoint.Checkpointing(resume=tmp_path)
    if message is None:
        checkpoint.Checkpoints(resume, ident(fsdp, world), tmp_path / "out")
        return
    with pytest.raises(CheckpointError, match=re.escape(message)):
        checkpoint.Checkpoints(resume, ident(fsdp, world), tmp_path / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port())]


def _fps_torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``fps-onnx ARGS`` under torchrun with 2 processes."""
    script = shutil.which("fps-onnx", path=str(Path(sys.executable).parent))
    return subprocess.run([*_torchrun(), script, *args], capture_output=True, text=True, timeout=300, env=env)


def _causal_lm_run(tmp_path: Path, names: tuple[str, ...], copies: int, *options: str):
    """(train arguments, environment, the model as loaded) of a causal-LM run of the tiny seeded Llama with seeded
    10% masks on ``names`` and ``copies`` x 4 lines of text, 2 epochs of batches of 2."""
    from llm_models import save_tiny_llm

    save_tiny_llm("llama", tmp_path / "llama", seed=0)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"), local_files_only=True)
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    MaskFile({n: rng.random(tuple(params[n].shape)) < 0.1 for n in names}, {}).save(tmp_path / "m.safetensors")
    lines = ["The capital of France is Paris.", "The quick brown fox jumps over the lazy dog.",
             "Every layer has attention and a feed-forward block.", "A small model learns to predict."]
    (tmp_path / "train.txt").write_text("\n".join(lines * copies) + "\n")
    args = ["train", "--task", "causal-lm", "--model", f"hf:{tmp_path / 'llama'}", "--masks",
            str(tmp_path / "m.safetensors"), "--train", str(tmp_path / "train.txt"), "--batch-size", "2",
            "--epochs", "2", "--lr", "1e-2", *options, "-q"]
    return args, {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, model


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_killed_after_step_7_of_12_resume_to_the_same_delta(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 192)
    x = rng.standard_normal((192, 3, 8, 8)).astype(np.float32) * 0.5
    x[np.arange(192), y] += 1.5
    np.savez(tmp_path / "train.npz", x=x, y=y)
    MaskFile({"fc.weight": rng.random((16, 8)) < 0.3}, {}).save(tmp_path / "masks.safetensors")
    args = ["train", "--model", f"{tmp_path / 'net.py'}:build", "--masks", str(tmp_path / "masks.safetensors"),
            "--train", str(tmp_path / "train.npz"), "--epochs", "2", "--batch-size", "16", "--lr", "0.05",
            "-q"]  # 192 samples, 2 processes, 16 a batch: 6 steps an epoch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = _fps_torchrun([*args, "-o", str(tmp_path / "whole")], env)
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = _killed([*args, "-o", str(tmp_path / "out"), "--save-every", "7"], tmp_path, 7, _torchrun(), env)
    assert killed.returncode != 0
    assert not (tmp_path / "out").exists()
    record = json.loads((tmp_path / "out.checkpoints" / "last" / "record.json").read_text())
    assert (record["position"]["step"], record["identity"]["world_size"], len(record["rng"])) == (7, 2, 2)

    # one process cannot take it up
    assert_one_error(invoke(*args, "-o", tmp_path / "out", "--resume", tmp_path / "out.checkpoints"),
                     re.escape("written by a run of 2 processes, this one has 1"))
    resumed = _fps_torchrun([*args, "-o", str(tmp_path / "out"), "--resume", str(tmp_path / "out.checkpoints")], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same(tmp_path / "out" / "delta.safetensors", tmp_path / "whole" / "delta.safetensors")


def test_a_causal_lm_run_stopped_mid_epoch_resumes_to_the_same_delta(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from fps_onnx.torch.train import checkpoint
    from llm_models import save_tiny_llm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    save_tiny_llm("llama", tmp_path / "llama", seed=0)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"), local_files_only=True)
    rng = np.random.default_rng(0)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
    params = dict(model.named_parameters())
    MaskFile({n: rng.random(tuple(params[n].shape)) < 0.1 for n in names}, {}).save(tmp_path / "m.safetensors")
    lines = ["The capital of France is Paris.", "The quick brown fox jumps over the lazy dog.",
             "Every layer has attention and a feed-forward block.", "A small model learns to predict."]
    (tmp_path / "train.txt").write_text("\n".join(lines * 2) + "\n")
    args = ["train", "--task", "causal-lm", "--model", f"hf:{tmp_path / 'llama'}", "--masks",
            tmp_path / "m.safetensors", "--train", tmp_path / "train.txt", "--val", tmp_path / "train.txt",
            "--batch-size", "2", "--accumulate", "2", "--epochs", "2", "--lr", "1e-2", "-q"]  # 2 steps an epoch
    assert invoke(*args, "-o", tmp_path / "whole").exit_code == 0
    real = _stopped_at(monkeypatch, 3)
    assert invoke(*args, "-o", tmp_path / "out", "--save-every", "1").exit_code == 1
    monkeypatch.setattr(checkpoint.Checkpoints, "save", real)
    record = json.loads((tmp_path / "out.checkpoints" / "last" / "record.json").read_text())
    assert (record["position"]["epoch"], record["position"]["batch"], record["position"]["step"]) == (2, 2, 3)
    result = invoke(*args, "-o", tmp_path / "out", "--resume", tmp_path / "out.checkpoints")
    assert result.exit_code == 0, result.output
    _same(tmp_path / "out" / "delta.safetensors", tmp_path / "whole" / "delta.safetensors")
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [e["val_loss"] for e in whole["epochs"]] == [e["val_loss"] for e in resumed["epochs"]]
    assert resumed["steps"] == whole["steps"] == 4


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_of_a_causal_lm_killed_after_step_4_of_6_resume_to_the_same_delta(tmp_path):
    pytest.importorskip("transformers")
    # 12 lines: 6 a process, 3 batches of 2
    args, env, _ = _causal_lm_run(tmp_path, ("model.layers.1.mlp.down_proj.weight",), 3)

    whole = _fps_torchrun([*args, "-o", str(tmp_path / "whole")], env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _killed([*args, "-o", str(tmp_path / "out"), "--save-every", "2"], tmp_path, 4, _torchrun(), env)
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    record = json.loads((tmp_path / "out.checkpoints" / "last" / "record.json").read_text())
    assert (record["position"]["epoch"], record["position"]["batch"], record["position"]["step"]) == (2, 1, 4)
    resumed = _fps_torchrun([*args, "-o", str(tmp_path / "out"), "--resume", str(tmp_path / "out.checkpoints")], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same(tmp_path / "out" / "delta.safetensors", tmp_path / "whole" / "delta.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_sharded_processes_killed_after_step_7_of_12_resume_to_the_same_delta(tmp_path):
    """--fsdp: the replicated trainable state in the one-file checkpoint, the frozen shards read
    again from the model folder; another world size, and the same run without --fsdp, are refused."""
    pytest.importorskip("transformers")
    names = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "lm_head.weight")  # sharded rows of each kind of unit
    # 24 lines: 12 a process, 6 batches of 2
    args, env, model = _causal_lm_run(tmp_path, names, 6, "--fsdp")

    whole = _fps_torchrun([*args, "-o", str(tmp_path / "whole")], env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _killed([*args, "-o", str(tmp_path / "out"), "--save-every", "7"], tmp_path, 7, _torchrun(), env)
    assert killed.returncode != 0 and not (tmp_path / "out").exists()
    saved = tmp_path / "out.checkpoints"
    record = json.loads((saved / "last" / "record.json").read_text())
    assert (record["position"]["epoch"], record["position"]["batch"], record["position"]["step"]) == (2, 1, 7)
    assert (record["identity"]["world_size"], record["identity"]["recipe"]["fsdp"]) == (2, True)
    from safetensors import safe_open

    with safe_open(str(saved / "last" / "state.safetensors"), "pt") as f:  # no frozen weight is saved
        stored = {k.partition("/")[2] for k in f.keys() if k.startswith("trainable/")}
    values = {k for k in stored if k.endswith(".values")}
    assert len(values) == len(names) and stored - values <= set(dict(model.named_buffers())), sorted(stored)

    plain = [a for a in args if a != "--fsdp"]
    refused = _fps_torchrun([*plain, "-o", str(tmp_path / "out"), "--resume", str(saved)], env)
    assert refused.returncode != 0 and "Error: " in refused.stderr and "--fsdp True there, False here" in (
        refused.stderr), refused.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    resumed = _fps_torchrun([*args, "-o", str(tmp_path / "out"), "--resume", str(saved)], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same(tmp_path / "out" / "delta.safetensors", tmp_path / "whole" / "delta.safetensors")
    whole_metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed_metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert resumed_metrics["steps"] == whole_metrics["steps"] == 12
