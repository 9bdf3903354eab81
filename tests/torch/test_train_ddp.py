"""DistributedDataParallel on CPU (gloo, 2 processes): k-sized all-reduce, same step as one process."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fps_onnx.torch.train import loop, sparse  # noqa: E402
from fps_onnx.torch.train.recipe import Recipe  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, groups=3)
        self.fc = nn.Linear(6, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).mean((2, 3)))))


def _setup():
    torch.manual_seed(0)
    model = Net()
    rng = np.random.default_rng(0)
    masks = {n: rng.random(tuple(p.shape)) < 0.3 for n, p in model.named_parameters() if p.ndim > 1}
    trainable = loop.prepare(model, masks, Recipe())
    return model, trainable


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, trainable = _setup()
    DDP._set_params_and_buffers_to_ignore_for_model(model, sparse.buffer_names(model))
    ddp = DDP(model)
    reduced: list[int] = []

    def counting(state, bucket):
        reduced.append(bucket.buffer().numel())
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting)
    opt = loop.make_optimizer(ddp, Recipe(lr=0.01))
    for x, y in _batches():
        nn.functional.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save({"state": sparse.merged_state_dict(model), "reduced": reduced}, out)
    # Both ranks leave together, and without tearing gloo down: its teardown in a
    # spawned worker aborts now and then ("terminate called without an active
    # exception", SIGABRT) after all the work is done and saved.
    torch.distributed.barrier()
    os._exit(0)


def test_ddp_all_reduces_only_k_sized_tensors_and_matches_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    model, trainable = _setup()
    opt = loop.make_optimizer(model, Recipe(lr=0.01))
    for x, y in _batches():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    expected = sparse.merged_state_dict(model)
    for name, value in expected.items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-6)

    params = dict(model.named_parameters())
    per_step = trainable.selected + sum(params[n].numel() for n in trainable.dense)
    dense_total = sum(v.numel() for v in expected.values())
    assert sum(got["reduced"]) == 3 * per_step  # deltas + head + biases, nothing else
    assert per_step < dense_total / 2


def _cli_case(tmp: Path) -> list[str]:
    (tmp / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(num_classes=3):\n"
        "    torch.manual_seed(0)\n"
        "    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, num_classes))\n"
        "    return net, torch.randn(2, 3, 8, 8)\n")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 64)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32) * 0.5
    x[np.arange(64), y] += 1.5
    np.savez(tmp / "train.npz", x=x, y=y)
    from fps_onnx.selection.maskfile import MaskFile

    MaskFile({"0.weight": rng.random((6, 3, 3, 3)) < 0.3}, {}).save(tmp / "m.safetensors")
    return ["train", "--model", f"{tmp / 'net.py'}:build", "--masks", str(tmp / "m.safetensors"),
            "--train", str(tmp / "train.npz"), "--val", str(tmp / "train.npz"), "-o", str(tmp / "out"),
            "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "-q"]


def test_cli_under_torchrun_two_processes(tmp_path):
    script = shutil.which("fps-onnx", path=str(Path(sys.executable).parent))
    assert script is not None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), script, *_cli_case(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["epochs"][-1]["val_accuracy"] > 0.6
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "delta.safetensors", "metrics.json", "model.safetensors"]
