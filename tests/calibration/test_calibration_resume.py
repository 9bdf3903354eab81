"""``select --checkpoint-every`` / ``--resume``: a calibration killed mid-way goes on to the same
statistics, bit for bit, and the same masks; checkpoints of another run are refused in one line."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _cli import assert_one_error, invoke
from _models import linear_chain
from fps_onnx import checkpoint
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.stats import Stats

# Runs the CLI and SIGKILLs this process right after the checkpoint of batch KILL_AT is written.
DRIVER = textwrap.dedent('''
    import os, signal, sys
    from fps_onnx import checkpoint

    real = checkpoint.save

    def save(config, ours, sums, samples, batches, data_config):
        real(config, ours, sums, samples, batches, data_config)
        if batches == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save = save
    from fps_onnx.cli.main import main
    main(sys.argv[1:])
''')


def _same_stats(a: Path, b: Path) -> None:
    x, y = Stats.load(a), Stats.load(b)
    assert (x.model_sha256, x.num_samples, sorted(x.weights)) == (y.model_sha256, y.num_samples, sorted(y.weights))
    for key, acc in x.weights.items():
        other = y.weights[key]
        assert acc.count == other.count, key
        for name in ("abs_sum", "sq_sum"):
            assert getattr(acc, name).tobytes() == getattr(other, name).tobytes(), (key, name)


def _same_masks(a: Path, b: Path) -> None:
    x, y = MaskFile.load(a), MaskFile.load(b)
    assert x.masks.keys() == y.masks.keys()
    assert all(np.array_equal(x.masks[k], y.masks[k]) for k in x.masks)
    assert x.meta == y.meta


def test_a_calibration_killed_after_batch_3_of_8_resumes_to_the_same_stats_and_masks(vit_case, tmp_path):
    _, model, data = vit_case  # 24 samples: 8 batches of 3
    common = [model, data, "--batch-size", "3", "--fraction", "0.1", "-q"]
    assert invoke("select", *common, "-o", tmp_path / "whole.m", "--stats-out", tmp_path / "whole.s").exit_code == 0

    out, stats = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    (tmp_path / "driver.py").write_text(DRIVER)
    killed = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), "select", *map(str, common), "-o", str(out), "--stats-out",
         str(stats), "--checkpoint-every", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_AT": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = Path(f"{out}.checkpoint")
    assert not out.exists() and not stats.exists() and saved.exists()
    assert Stats.load(saved).num_samples == 9

    result = invoke("select", *common, "-o", out, "--stats-out", stats, "--resume", "--checkpoint-every", "2")
    assert result.exit_code == 0, result.output
    _same_stats(stats, tmp_path / "whole.s")
    _same_masks(out, tmp_path / "whole.m")
    assert not saved.exists()  # removed once the masks are written


def _stop_after(monkeypatch, batch: int):
    real = checkpoint.save

    def save(config, ours, sums, samples, batches, data_config):
        real(config, ours, sums, samples, batches, data_config)
        if batches == batch:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save)
    return real


@pytest.mark.parametrize("extra", [[], ["--shard", "1/2"], ["--max-samples", "13", "--norm", "l2"]])
def test_resumed_in_process_the_statistics_are_bit_identical(chain, tmp_path, monkeypatch, extra):
    model, data = chain  # 20 samples: 7 batches of 3
    common = [model, data, "--batch-size", "3", "--per-neuron", "2", "-q", *extra]
    assert invoke("select", *common, "-o", tmp_path / "a.m", "--stats-out", tmp_path / "a.s").exit_code == 0
    real = _stop_after(monkeypatch, 2)
    stopped = invoke("select", *common, "-o", tmp_path / "b.m", "--stats-out", tmp_path / "b.s",
                     "--checkpoint-every", "2")
    assert stopped.exit_code == 130 and not (tmp_path / "b.m").exists()
    monkeypatch.setattr(checkpoint, "save", real)
    result = invoke("select", *common, "-o", tmp_path / "b.m", "--stats-out", tmp_path / "b.s", "--resume")
    assert result.exit_code == 0, result.output
    _same_stats(tmp_path / "a.s", tmp_path / "b.s")
    _same_masks(tmp_path / "a.m", tmp_path / "b.m")


def test_resume_without_a_checkpoint_starts_from_the_first_batch(chain, tmp_path):
    model, data = chain
    result = invoke("select", model, data, "-o", tmp_path / "m", "--stats-out", tmp_path / "s", "--resume")
    assert result.exit_code == 0, result.output
    assert Stats.load(tmp_path / "s").num_samples == 20


@pytest.fixture
def stopped(chain, tmp_path, monkeypatch):
    """(model, data, mask path): a calibration stopped after its checkpoint of batch 2."""
    model, data = chain
    real = _stop_after(monkeypatch, 2)
    out = tmp_path / "m.safetensors"
    assert invoke("select", model, data, "-o", out, "--batch-size", "3", "--checkpoint-every", "1",
                  "-q").exit_code == 130
    monkeypatch.setattr(checkpoint, "save", real)
    return model, data, out


@pytest.mark.parametrize("change, message", [
    ("model", "another calibration: it is of another model"),
    ("data", "another calibration: it is of other calibration data"),
    ("batch", "other options: --batch-size 3 there, 4 here"),
    ("exclude", r"other options: --exclude \[\] there, \['w2'\] here"),
    ("stats", r"it holds other sums \(--stats-out, --norm\)"),
    ("truncated", "cannot read statistics file"),
    ("stats file", "is a stats file, not a checkpoint of `fps-onnx select`"),
])
def test_a_checkpoint_of_another_calibration_or_a_damaged_one_is_refused(stopped, tmp_path, change, message):
    model, data, out = stopped
    saved = Path(f"{out}.checkpoint")
    args = ["select", model, data, "-o", out, "--batch-size", "3", "--resume", "-q"]
    if change == "model":
        (tmp_path / "other").mkdir()
        args[1] = linear_chain(tmp_path / "other", seed=1)
    elif change == "data":
        (tmp_path / "d2").mkdir()
        np.save(tmp_path / "d2" / "x.npy", np.load(data / "x.npy")[:19])
        args[2] = tmp_path / "d2"
    elif change == "batch":
        args[args.index("--batch-size") + 1] = "4"
    elif change == "exclude":
        args += ["--exclude", "w2"]
    elif change == "stats":
        args += ["--stats-out", tmp_path / "s.safetensors"]
    elif change == "truncated":
        saved.write_bytes(saved.read_bytes()[:-7])
    else:
        assert invoke("select", model, data, "-o", tmp_path / "x.m", "--stats-out", tmp_path / "x.s",
                      "-q").exit_code == 0
        saved.write_bytes((tmp_path / "x.s").read_bytes())
    before = saved.read_bytes()
    assert_one_error(invoke(*args), message, absent=[out, tmp_path / "s.safetensors"])
    assert saved.read_bytes() == before


def test_checkpoint_options_apply_to_a_calibration_only(chain, tmp_path):
    model, data = chain
    assert invoke("select", model, data, "-o", tmp_path / "m", "--stats-out", tmp_path / "s", "-q").exit_code == 0
    assert_one_error(invoke("select", model, "-o", tmp_path / "m2", "--from-stats", tmp_path / "s", "--resume"),
                     "apply to an FPS calibration on DATA", status=2, alone=False)
    assert_one_error(invoke("select", model, data, "-o", tmp_path / "m2", "--checkpoint-every", "0"),
                     "--checkpoint-every must be a whole number from 1", absent=[tmp_path / "m2"])
    assert_one_error(invoke("select", model, data, "-o", tmp_path / "m2", "--checkpoint-every", "1",
                            "--stats-out", tmp_path / "m2.checkpoint"), "the same file as")


def test_text_with_padding_masked_resumes_bit_identical(tmp_path, monkeypatch):
    from _models import tiny_lm

    model = tiny_lm(tmp_path / "lm", with_mask=True)  # padded positions left out by attention_mask
    lines = ["the cat sat on the mat", "mat", "the cat", "on the mat the cat sat", "sat", "the mat on"]
    (tmp_path / "a.txt").write_text("\n".join(lines * 3) + "\n")
    common = [model, tmp_path / "a.txt", "--batch-size", "4", "--per-neuron", "1", "-q"]  # 5 batches
    assert invoke("select", *common, "-o", tmp_path / "a.m", "--stats-out", tmp_path / "a.s").exit_code == 0
    real = _stop_after(monkeypatch, 3)
    assert invoke("select", *common, "-o", tmp_path / "b.m", "--stats-out", tmp_path / "b.s",
                  "--checkpoint-every", "3").exit_code == 130
    monkeypatch.setattr(checkpoint, "save", real)
    assert Stats.load(Path(f"{tmp_path / 'b.m'}.checkpoint")).num_samples == 12
    result = invoke("select", *common, "-o", tmp_path / "b.m", "--stats-out", tmp_path / "b.s", "--resume")
    assert result.exit_code == 0, result.output
    _same_stats(tmp_path / "a.s", tmp_path / "b.s")
    _same_masks(tmp_path / "a.m", tmp_path / "b.m")
