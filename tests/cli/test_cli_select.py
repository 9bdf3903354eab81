"""`fps-onnx select` through click's CliRunner: outputs, JSON, stats, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
from onnx import helper
import pytest

from _cli import assert_one_error, invoke
from _models import linear_chain, make_model, tensor
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.stats import Stats


def test_select_writes_masks_and_json_summary(chain, tmp_path):
    model, data = chain
    out = tmp_path / "masks.safetensors"
    result = invoke("select", model, data, "-o", out, "--per-neuron", "2", "--json", "--quiet",
                    "--batch-size", "7")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == {"w1": {"shape": [5, 6], "selected": 10},
                                  "w2": {"shape": [4, 5], "selected": 8}}
    assert summary["samples"] == 20 and summary["provider"] == "CPUExecutionProvider"
    masks = MaskFile.load(out)
    assert (masks.masks["w1"].sum(1) == 2).all()
    assert masks.meta["num_samples"] == "20" and json.loads(masks.meta["budget"]) == {"per_neuron": 2}
    assert masks.tensors["w1"]["onnx_layout"] == "in_out"


def test_two_runs_write_the_same_bytes(chain, tmp_path):
    """What CI publishes has one digest per input: masks and stats are byte for byte the same."""
    model, data = chain
    for run in ("a", "b"):
        assert invoke("select", model, data, "-o", tmp_path / f"{run}.safetensors",
                      "--stats-out", tmp_path / f"{run}-stats.safetensors", "-q").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "a-stats.safetensors").read_bytes() == (tmp_path / "b-stats.safetensors").read_bytes()


def test_stats_out_then_from_stats_reselects_without_data(chain, tmp_path):
    model, data = chain
    stats, first, second = tmp_path / "s.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert invoke("select", model, data, "-o", first, "--stats-out", stats, "-q").exit_code == 0
    assert Stats.load(stats).statistics == {"abs_sum", "sq_sum"}
    result = invoke("select", model, "-o", second, "--from-stats", stats, "--norm", "l2",
                    "--level", "layer", "--fraction", "0.5", "-q")
    assert result.exit_code == 0, result.output
    again = MaskFile.load(second)
    assert again.meta["norm"] == "l2" and again.meta["level"] == "layer"
    assert again.masks["w1"].sum() == 15  # half of 30 entries


def test_stats_of_shards_merge_into_the_selection_of_the_whole_set(chain, tmp_path):
    model, data = chain
    whole = np.load(data / "x.npy")
    for name, part in (("a", whole[:12]), ("b", whole[12:])):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", part)
        assert invoke("select", model, tmp_path / name, "-o", tmp_path / f"{name}.m", "--stats-out",
                      tmp_path / f"{name}.s", "-q").exit_code == 0
    assert invoke("select", model, data, "-o", tmp_path / "all.m", "--stats-out", tmp_path / "all.s",
                  "--per-neuron", "2", "-q").exit_code == 0
    result = invoke("select", model, "-o", tmp_path / "merged.m", "--from-stats", tmp_path / "a.s",
                    "--from-stats", tmp_path / "b.s", "--stats-out", tmp_path / "merged.s",
                    "--per-neuron", "2", "-q")
    assert result.exit_code == 0, result.output
    merged, alone = Stats.load(tmp_path / "merged.s"), Stats.load(tmp_path / "all.s")
    assert merged.num_samples == alone.num_samples == 20
    for key, got in merged.weights.items():
        np.testing.assert_allclose(got.abs_sum, alone.weights[key].abs_sum, rtol=1e-6)
        assert got.count == alone.weights[key].count
    a, b = MaskFile.load(tmp_path / "merged.m"), MaskFile.load(tmp_path / "all.m")
    assert a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.meta["num_samples"] == "20"


def test_provider_and_summary_lines_on_stderr_and_no_bar_outside_a_terminal(chain, tmp_path):
    model, data = chain
    result = invoke("select", model, data, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 0
    lines = result.stderr.splitlines()
    assert lines[0] == "running on CPUExecutionProvider"
    assert lines[-1].startswith("selected ") and len(lines) == 2
    assert "\r" not in result.stderr and "sample/s" not in result.stderr  # CI logs stay clean


BAD = [
    (lambda m, d, t: [t / "none.onnx", d], "model file .*none.onnx does not exist"),
    (lambda m, d, t: [t / "corrupt.onnx", d], "cannot read ONNX model"),
    (lambda m, d, t: [t / "truncated.onnx", d], "cannot read ONNX model .*truncated.onnx"),
    (lambda m, d, t: [t / "zero.onnx", d], "model file .*zero.onnx is empty"),
    (lambda m, d, t: [m, t / "empty"], "no .npy, .npz or image files under"),
    (lambda m, d, t: [t / "relu.onnx", d], "no weight consumed by a MatMul, Gemm or Conv"),
    (lambda m, d, t: [m, t / "wrong.npy"], r"x has shape \[3, 7\], the model expects x \[N, 6\]"),
    (lambda m, d, t: [m, d, "--per-neuron", "9"], "--per-neuron 9 is larger than a fan-in of 6"),
    (lambda m, d, t: [m, d, "--fraction", "1.5"], r"fraction must be in \(0, 1\]"),
    (lambda m, d, t: [m, d, "--fraction", "0"], r"fraction must be in \(0, 1\]"),
    (lambda m, d, t: [m, d, "--provider", "cuda"], "CUDA provider cannot be used here"),
    (lambda m, d, t: [m, d, "--token-mask", "mask"], "token mask 'mask' is not a model input"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_gets_one_line_and_no_output(chain, tmp_path, args, message):

    model, data = chain
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08garbage")
    (tmp_path / "truncated.onnx").write_bytes(model.read_bytes()[:-40])
    (tmp_path / "zero.onnx").write_bytes(b"")
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 6])],
                         [tensor("y", ["N", 6])], {}), tmp_path / "relu.onnx")
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "wrong.npy", np.zeros((3, 7), np.float32))
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    result = invoke("select", *args(model, data, tmp_path), "-o", out)
    assert_one_error(result, message, alone=False, empty=[out.parent])


def test_unwritable_output_fails_before_running(chain, tmp_path):
    model, data = chain
    line = assert_one_error(invoke("select", model, data, "-o", tmp_path / "missing" / "m.safetensors"))
    assert "folder" in line and "does not exist" in line  # and nothing ran: no "running on" line


def test_from_stats_of_another_model_is_rejected(chain, tmp_path):
    model, data = chain
    stats = tmp_path / "s.safetensors"
    assert invoke("select", model, data, "-o", tmp_path / "a.safetensors", "--stats-out", stats, "-q").exit_code == 0
    other = linear_chain(tmp_path / "data", seed=1)
    result = invoke("select", other, "-o", tmp_path / "b.safetensors", "--from-stats", stats)
    assert_one_error(result, "was computed on another model", absent=[tmp_path / "b.safetensors"])


def test_data_and_from_stats_are_exclusive(chain, tmp_path):
    model, data = chain
    result = invoke("select", model, "-o", tmp_path / "m.safetensors")
    assert_one_error(result, "give either DATA or --from-stats", status=2, absent=[tmp_path / "m.safetensors"])


@pytest.mark.parametrize("kind", ["arrays", "text"])
def test_select_does_not_import_torch(chain, tmp_path, kind):
    model, data = chain
    if kind == "text":  # raw text, tokenized with tokenizer.json, token mask: no transformers either
        from _models import save_tokenizer, tiny_lm

        model = tiny_lm(tmp_path / "lm", with_mask=True)
        data = tmp_path / "a.txt"
        data.write_text("the cat sat\nmat\n")
        save_tokenizer(model.parent)
    code = (
        "import sys; from fps_onnx.cli.main import main\n"
        f"try:\n    main(['select', {str(model)!r}, {str(data)!r}, '-o', {str(tmp_path / 'm.safetensors')!r}, '-q',"
        " '--act-power', '0.5', '--column-cap', '2', '--low-rank', '2'])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "bad = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "m.safetensors").exists()


def test_act_power_and_column_cap_shape_the_masks_and_are_recorded(chain, tmp_path):
    model, data = chain
    plain, one, shaped = (tmp_path / f"{n}.safetensors" for n in ("plain", "one", "shaped"))
    assert invoke("select", model, data, "-o", plain, "--shira-r", "1", "-q").exit_code == 0
    assert invoke("select", model, data, "-o", one, "--shira-r", "1", "--act-power", "1", "-q").exit_code == 0
    result = invoke("select", model, data, "-o", shaped, "--shira-r", "1", "--act-power", "0.5",
                    "--column-cap", "1", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["act_power"] == 0.5 and json.loads(result.stdout)["column_cap"] == 1.0
    first, again, masks = MaskFile.load(plain), MaskFile.load(one), MaskFile.load(shaped)
    assert first.meta["act_power"] == again.meta["act_power"] == "1.0" and "column_cap" not in first.meta
    for key in first.masks:
        np.testing.assert_array_equal(first.masks[key], again.masks[key])
    assert masks.meta["act_power"] == "0.5" and masks.meta["column_cap"] == "1.0"
    w1 = masks.masks["w1"]  # [5, 6]: r*(in+out) = 11 entries, at most ceil(11 / 6) = 2 per column
    assert w1.sum() == 11 and w1.sum(axis=0).max() <= 2

    # a rank as large as the weights changes nothing; rank 1 does, and is recorded with its seed
    full, low = tmp_path / "full.safetensors", tmp_path / "low.safetensors"
    assert invoke("select", model, data, "-o", full, "--shira-r", "1", "--low-rank", "5", "-q").exit_code == 0
    result = invoke("select", model, data, "-o", low, "--shira-r", "1", "--low-rank", "1", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["low_rank"] == 1
    full, low = MaskFile.load(full), MaskFile.load(low)
    assert all(np.array_equal(full.masks[k], first.masks[k]) for k in first.masks if min(first.masks[k].shape) <= 5)
    assert low.meta["low_rank"] == "1" and low.meta["seed"] == "0"
    assert any(not np.array_equal(low.masks[k], first.masks[k]) for k in first.masks)


@pytest.mark.parametrize("args, match", [
    (["--act-power", "-1"], "activation power must be a number from 0 to 4, not -1.0"),
    (["--act-power", "4.5"], "activation power"),
    (["--act-power", "nan"], "activation power"),
    (["--act-power", "0.5", "--method", "random"], "--act-power scores method fps; method random takes none"),
    (["--column-cap", "0.5"], "column cap must be a number of at least 1, not 0.5"),
    (["--column-cap", "inf"], "column cap"),
    (["--low-rank", "0"], "low rank must be a whole number from 1"),
    (["--low-rank", "2", "--method", "random"], "--low-rank scores methods fps and magnitude; method random"),
])
def test_bad_act_power_or_column_cap_is_one_error(chain, tmp_path, args, match):
    model, data = chain
    out = tmp_path / "m.safetensors"
    assert_one_error(invoke("select", model, data, "-o", out, *args), match, absent=[out])


def test_magnitude_needs_no_data_and_records_its_method(chain, tmp_path):
    model, _ = chain
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, "-o", out, "--method", "magnitude", "--per-neuron", "1", "-q")
    assert result.exit_code == 0, result.output
    masks = MaskFile.load(out)
    assert masks.meta["method"] == "magnitude"
    assert (masks.masks["w2"].sum(1) == 1).all()


def test_shira_budget_is_checked_before_any_data_is_read(chain, tmp_path):
    model, _ = chain
    bad = tmp_path / "x.npy"
    bad.write_bytes(b"not an array")  # reading it would fail with another message
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, bad, "-o", out, "--shira-r", "3")
    assert_one_error(result, re.escape("--shira-r 3: weight 'w1' [5, 6] has 30 entries, fewer than r*(in+out) = 33"),
                     absent=[out])


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64), "-" + str(2**63)])
def test_seeds_out_of_range_are_one_line_on_every_command(chain, tmp_path, seed):
    model, data = chain
    out = tmp_path / "o" / "masks.safetensors"
    message = f"Error: the seed must be a whole number from 0 to 4,294,967,295, not {seed}"
    for args in (["select", model, data, "-o", out, "--method", "random", "--seed", seed],
                 ["train", "--model", "none.py:build", "--masks", out, "--train", data, "-o", out.parent,
                  "--seed", seed]):
        assert assert_one_error(invoke(*args), absent=[out.parent]) == message


def test_the_largest_seed_selects(chain, tmp_path):
    model, data = chain
    out = tmp_path / "masks.safetensors"
    result = invoke("select", model, data, "-o", out, "--method", "random", "--seed", str(2**32 - 1), "-q")
    assert result.exit_code == 0, result.output
    assert MaskFile.load(out).meta["seed"] == str(2**32 - 1)


@pytest.mark.parametrize("length", ["0", "1", str(2**24 + 1), str(2**64)])
def test_max_length_out_of_range_is_one_line_on_every_command(chain, tmp_path, length):
    model, data = chain
    out = tmp_path / "o" / "masks.safetensors"
    commands = {1: ["select", model, data, "-o", out, "--max-length", length],
                2: ["train", "--model", "none.py:build", "--masks", out, "--train", data, "-o", out.parent,
                    "--max-length", length]}
    for least, args in commands.items():
        if int(length) >= least and int(length) <= 2**24:
            continue  # in range for this command
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        message = f"Error: --max-length must be a whole number from {least} to 16,777,216, not {length}"
        assert result.stderr.strip().splitlines() == [message], result.stderr
        assert not out.parent.exists()


@pytest.mark.parametrize("extra, message", [
    (["--task", "causal-lm"], "--method gps needs DATA: .txt, .jsonl or .npz token data"),
    ([], "--method gps needs DATA: a labelled training split"),
    (["--from-stats", "s.safetensors"], "--from-stats applies to FPS statistics; --method gps computes gradients"),
])
def test_gps_without_data_names_the_data_to_give(tmp_path, extra, message):
    result = invoke("select", "--method", "gps", "hf:somewhere", "-o", tmp_path / "m.safetensors", *extra)
    line = assert_one_error(result, re.escape(message), status=2, absent=[tmp_path / "m.safetensors"])
    assert "--from-stats" not in line or extra[:1] == ["--from-stats"]


@pytest.mark.parametrize("extra, message", [
    (["--torch-model", "timm:resnet18"], "--torch-model do not apply to --method gps (MODEL is the PyTorch model"),
    (["--provider", "cpu", "--mean", "0.5,0.5,0.5"], "--provider, --mean do not apply to --method gps"),
    (["--token-mask", "attention_mask", "--max-length", "64"], "--token-mask, --max-length do not apply to --method gps"),
    (["--task", "causal-lm", "--provider", "cpu"], "--provider do not apply to --method gps (MODEL is the PyTorch "
                                                   "model the gradients are taken on; DATA token data"),
])
def test_gps_refuses_the_options_it_would_not_read(tmp_path, extra, message):
    """Options of the ONNX path are refused with one line, not silently ignored."""
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 3), np.float32), labels=np.zeros(2, np.int64))
    result = invoke("select", "--method", "gps", "hf:somewhere", data, "-o", tmp_path / "m.safetensors", *extra)
    assert_one_error(result, re.escape(message), status=2, absent=[tmp_path / "m.safetensors"])
