"""Sharded calibration: --shard K/N takes batches K, K+N, ...; the shards' statistics merge
into exactly the statistics and masks of one run over all the data."""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
from onnx import helper
import pytest

from _cli import assert_one_error, invoke
from _models import image_folder, linear_chain, make_model, rng, tensor
from fps_onnx.calibrate import CalibrationConfig
from fps_onnx.data import DataConfig, images, iter_batches, parse_shard
from fps_onnx.errors import DataError, StatsError
from fps_onnx.onnx.inputs import InputSpec
from fps_onnx.pipeline import run_select
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.selection.score import SelectConfig
from fps_onnx.stats import Stats, merge_all

X = InputSpec("x", ("N", 6), np.dtype(np.float32))
IMG = InputSpec("x", ("N", 3, 8, 8), np.dtype(np.float32))
IDS = InputSpec("input_ids", ("N", "S"), np.dtype(np.int64))
MASK = InputSpec("attention_mask", ("N", "S"), np.dtype(np.int64))


def chain_data(tmp_path):
    """The linear chain and 38 rows in two .npy files (17 + 21): batch size 4 makes 10 batches,
    one crossing the files and the last of 2 rows."""
    model = linear_chain(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    x = rng(0).standard_normal((38, 6)).astype(np.float32)
    np.save(folder / "a.npy", x[:17])
    np.save(folder / "b.npy", x[17:])
    return model, folder


def image_model(tmp_path):
    """x[N, 3, 8, 8] -> Conv(wc [4, 3, 3, 3]) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(wg [2, 4])."""
    r = rng(1)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1),
        ],
        [tensor("x", ["N", 3, 8, 8])],
        [tensor("y", ["N", 2])],
        {"wc": r.standard_normal((4, 3, 3, 3)).astype(np.float32),
         "wg": r.standard_normal((2, 4)).astype(np.float32)},
    )
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    return path


def same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])


def text_data(tmp_path):
    from _models import save_tokenizer

    tok = save_tokenizer(tmp_path / "tok")
    # padded lengths differ from batch to batch, so where batches end depends on the tokens
    (tmp_path / "a.txt").write_text("the cat sat\ncat\nthe cat sat on the mat\nmat\nthe\n")
    (tmp_path / "b.txt").write_text("sat on\nthe mat\ncat cat cat cat\non\n")
    return [IDS, MASK], {"tokenizer": str(tok)}


def npz_data(tmp_path):
    r = rng(2)
    for name, n, seq in (("a", 5, 4), ("b", 3, 4), ("c", 4, 2)):  # c: another sequence length
        np.savez(tmp_path / f"{name}.npz", input_ids=r.integers(0, 9, (n, seq)),
                 attention_mask=np.ones((n, seq), np.int64))
    return [IDS, MASK], {}


def npy_data(tmp_path):
    x = rng(3).standard_normal((23, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", x[:9])
    np.save(tmp_path / "b.npy", x[9:])
    return [X], {}


def image_data(tmp_path):
    image_folder(tmp_path, per_class=4, size=12)
    return [IMG], {}


@pytest.mark.parametrize("make", [npy_data, npz_data, text_data, image_data])
@pytest.mark.parametrize("batch_size, max_samples", [(3, None), (2, 7)])
def test_shards_partition_the_batches_of_one_run(tmp_path, make, batch_size, max_samples):
    inputs, extra = make(tmp_path)
    config = DataConfig(batch_size=batch_size, max_samples=max_samples, **extra)
    whole = list(iter_batches(tmp_path, inputs, config))
    assert len(whole) >= 3
    for n in (1, 2, 3):
        for k in range(n):
            part = list(iter_batches(tmp_path, inputs, DataConfig(
                batch_size=batch_size, max_samples=max_samples, shard=(k, n), **extra)))
            same_batches(part, whole[k::n])


def test_images_of_other_shards_are_never_decoded(tmp_path, monkeypatch):
    image_folder(tmp_path, classes=("a",), per_class=6, size=12)
    (tmp_path / "a" / "2.png").write_bytes(b"not a png")  # in batch 1 of 3 (batch size 2)
    decoded = []
    read = images.read_image
    monkeypatch.setattr(images, "read_image",
                        lambda file, *a: decoded.append(file.name) or read(file, *a))
    for k in (0, 2):
        decoded.clear()
        assert len(list(iter_batches(tmp_path, [IMG], DataConfig(batch_size=2, shard=(k, 3))))) == 1
        assert decoded == [f"{2 * k}.png", f"{2 * k + 1}.png"]
    with pytest.raises(DataError, match=r"cannot decode image .*2.png"):
        list(iter_batches(tmp_path, [IMG], DataConfig(batch_size=2, shard=(1, 3))))


def test_the_model_runs_on_its_shard_only(tmp_path):
    model, folder = chain_data(tmp_path)
    for k, sizes in ((0, [4, 4, 4, 2]), (1, [4, 4, 4]), (2, [4, 4, 4])):
        seen = []
        result = run_select(model, folder, SelectConfig(per_neuron=2), CalibrationConfig(provider="cpu"),
                            DataConfig(batch_size=4, shard=f"{k}/3"), on_batch=seen.append)
        assert seen == sizes
        assert result.stats.num_samples == sum(sizes) and result.stats.shard == (k, 3)
        assert result.masks.meta["shard"] == f"{k}/3"


def shard_runs(model, folder, tmp_path, n, *options):
    """Runs shards 0/n .. n-1/n, each writing its statistics; their paths."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    parts = []
    for k in range(n):
        stats = tmp_path / f"part-{k}.safetensors"
        result = invoke("select", model, folder, "--shard", f"{k}/{n}", "--stats-out", stats,
                        "-o", tmp_path / f"part-{k}.masks.safetensors", "-q", *options)
        assert result.exit_code == 0, result.output
        parts.append(stats)
    return parts


def merge_equals_one_run(model, folder, tmp_path, parts, *options):
    whole_stats, whole_masks = tmp_path / "all.safetensors", tmp_path / "all.masks.safetensors"
    assert invoke("select", model, folder, "--stats-out", whole_stats, "-o", whole_masks, "-q",
                  *options).exit_code == 0
    merged_stats, merged_masks = tmp_path / "merged.safetensors", tmp_path / "masks.safetensors"
    sources = [arg for p in parts for arg in ("--from-stats", p)]
    result = invoke("select", model, *sources, "--stats-out", merged_stats, "-o", merged_masks, "-q",
                    *[o for o in options if o not in ("--batch-size", "4", "3")])
    assert result.exit_code == 0, result.output
    merged, alone = Stats.load(merged_stats), Stats.load(whole_stats)
    assert merged.num_samples == alone.num_samples
    assert merged.weights.keys() == alone.weights.keys()
    for key, got in merged.weights.items():
        # float64 sums of the same float32 batch sums, added in another order
        np.testing.assert_allclose(got.abs_sum, alone.weights[key].abs_sum, rtol=1e-12)
        np.testing.assert_allclose(got.sq_sum, alone.weights[key].sq_sum, rtol=1e-12)
        assert got.count == alone.weights[key].count
    a, b = MaskFile.load(merged_masks), MaskFile.load(whole_masks)
    assert a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.masks[next(iter(a.masks))].any()
    assert "shard" not in a.meta and "shard" not in b.meta
    assert a.meta["num_samples"] == b.meta["num_samples"]
    return merged_stats


def test_three_shards_of_ten_batches_merge_into_the_masks_of_one_run(tmp_path):
    model, folder = chain_data(tmp_path)
    parts = shard_runs(model, folder, tmp_path, 3, "--batch-size", "4", "--per-neuron", "2")
    shards = [Stats.load(p) for p in parts]
    assert [s.shard for s in shards] == [(0, 3), (1, 3), (2, 3)]
    assert [s.batch_size for s in shards] == [4, 4, 4]
    assert [s.num_samples for s in shards] == [14, 12, 12]  # batches 0,3,6,9 | 1,4,7 | 2,5,8
    for k in range(3):
        assert MaskFile.load(tmp_path / f"part-{k}.masks.safetensors").meta["shard"] == f"{k}/3"
    merged = merge_equals_one_run(model, folder, tmp_path, parts, "--batch-size", "4",
                                  "--per-neuron", "2")
    loaded = Stats.load(merged)
    assert loaded.num_samples == 38 and loaded.shard is None and loaded.batch_size is None
    from safetensors import safe_open

    with safe_open(str(merged), "np") as f:
        assert "shard" not in f.metadata() and "batch_size" not in f.metadata()


def test_image_folder_shards_merge_into_the_masks_of_one_run(tmp_path):
    model = image_model(tmp_path)
    folder = image_folder(tmp_path / "images", per_class=5, size=12)  # 10 images, batches 3,3,3,1
    parts = shard_runs(model, folder, tmp_path, 3, "--batch-size", "3", "--per-neuron", "2")
    assert [Stats.load(p).num_samples for p in parts] == [4, 3, 3]
    merge_equals_one_run(model, folder, tmp_path, parts, "--batch-size", "3", "--per-neuron", "2")


def test_merging_refuses_shards_that_are_not_parts_of_one_run(tmp_path):
    model, folder = chain_data(tmp_path)
    half = shard_runs(model, folder, tmp_path / "half", 2, "--batch-size", "4")
    third = shard_runs(model, folder, tmp_path / "third", 3, "--batch-size", "4")
    (tmp_path / "b5").mkdir()
    other = tmp_path / "b5" / "part-1.safetensors"
    assert invoke("select", model, folder, "--shard", "1/2", "--batch-size", "5", "--stats-out", other,
                  "-o", tmp_path / "b5" / "m.safetensors", "-q").exit_code == 0
    out = tmp_path / "masks.safetensors"
    cases = [
        ((half[0], half[0]), r"both are shard 0/2, the same part of the data twice"),
        ((half[0], third[1]), r"\(shard 0/2\) with .*part-1.safetensors \(shard 1/3\): .* share N"),
        ((half[0], other), r"\(batch size 4\) with .*b5/part-1.safetensors \(batch size 5\)"),
    ]
    for files, message in cases:
        result = invoke("select", model, *[a for f in files for a in ("--from-stats", f)], "-o", out,
                        "--stats-out", tmp_path / "merged.safetensors")
        assert_one_error(result, message, alone=False, absent=[out, tmp_path / "merged.safetensors"])
    with pytest.raises(StatsError, match="both are shard 1/3"):
        Stats.load(third[1]).merge(Stats.load(third[1]))


def test_a_missing_shard_is_logged_and_a_single_shard_keeps_its_shard(tmp_path, caplog):
    model, folder = chain_data(tmp_path)
    parts = shard_runs(model, folder, tmp_path, 3, "--batch-size", "4")
    shards = [Stats.load(p) for p in parts]
    with caplog.at_level(logging.WARNING, logger="fps_onnx"):
        partial = merge_all([shards[0], shards[2]], ["p0", "p2"])
    assert "shard 1/3 not among the statistics merged" in caplog.text
    assert partial.num_samples == 26 and partial.shard is None
    assert merge_all(shards[1:2]).shard == (1, 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fps_onnx"):
        assert merge_all(shards).num_samples == 38
    assert "not among" not in caplog.text


@pytest.mark.parametrize("value, message", [
    ("3/3", r"--shard 3/3: K counts from 0, so shard K of 3 is one of 0..2"),
    ("1/0", r"--shard 1/0: N, the number of shards, must be a whole number from 1 to 1,000,000, not '0'"),
    ("0/" + "1" + "0" * 20, r"--shard 0/100000000000000000000: N, the number of shards, must be a whole number "
                            r"from 1 to 1,000,000"),
    ("0/1000001", r"--shard 0/1000001: N, the number of shards, must be a whole number from 1 to 1,000,000"),
    ("0/" + "9" * 5000, r"--shard 0/9999.*\.\.\. \(5,000 characters\): N, the number of shards, must be"),
    ("9" * 5000 + "/3", r"--shard 9999.*: K counts from 0, so shard K of 3 is one of 0..2"),
    ("00000000004/4", r"--shard 00000000004/4: K counts from 0, so shard K of 4 is one of 0..3"),
    ("0/2\nError: forged", r"--shard must be K/N, two whole numbers .*not '0/2\\nError: forged'"),
    ("٣/٤", r"--shard must be K/N, two whole numbers"),
    ("a/b", r"--shard must be K/N, two whole numbers .*not 'a/b'"),
    ("-1/2", r"--shard must be K/N"),
    ("2", r"--shard must be K/N"),
])
def test_bad_shard_is_one_line_and_no_output(tmp_path, value, message):
    model, folder = chain_data(tmp_path)
    out, stats = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    result = invoke("select", model, folder, "--shard", value, "--stats-out", stats, "-o", out)
    assert_one_error(result, message, alone=False, absent=[out, stats])
    assert "running on" not in result.stderr


def test_shard_with_from_stats_or_without_batch_is_one_line(tmp_path):
    model, folder = chain_data(tmp_path)
    parts = shard_runs(model, folder, tmp_path, 2, "--batch-size", "4")
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, "--from-stats", parts[0], "--from-stats", parts[1],
                    "--shard", "0/2", "-o", out)
    assert_one_error(result, r"--shard splits calibration data, which --from-stats does not read", alone=False,
                     absent=[out])
    result = invoke("select", model, folder, "--batch-size", "4", "--shard", "10/11", "-o", out,
                    "--stats-out", tmp_path / "s.safetensors")
    assert_one_error(result, r"shard 10/11 gets no batch: .* makes 10 batches of --batch-size 4", alone=False,
                     absent=[out, tmp_path / "s.safetensors"])
    result = invoke("select", model, "--method", "magnitude", "--shard", "0/2", "-o", out)
    assert_one_error(result, r"method magnitude does not read", alone=False, absent=[out])


def test_shard_parsing_and_forged_shard_metadata(tmp_path):
    assert DataConfig(shard="1/3").shard == (1, 3) and DataConfig(shard=(0, 1)).shard == (0, 1)
    assert DataConfig().shard is None
    assert parse_shard(" 2 / 5 ") == (2, 5)
    assert parse_shard("0001/0004") == (1, 4) and parse_shard("999999/1000000") == (999_999, 1_000_000)
    assert parse_shard((np.int64(3), 10**6)) == (3, 10**6)
    for huge in ((0, 10**6 + 1), (10**5000, 3), (0, 10**5000)):
        with pytest.raises(DataError, match="--shard "):
            parse_shard(huge)
    for bad in ((1, 2, 3), (True, 2), (0.0, 2), "1/3/4"):
        with pytest.raises(DataError, match="--shard must be K/N"):
            DataConfig(shard=bad)
    model, folder = chain_data(tmp_path)
    (part,) = shard_runs(model, folder, tmp_path, 1)
    stats = Stats.load(part)
    assert stats.shard == (0, 1) and stats.batch_size == 32
    for shard, batch, message in (((3, 3), 4, "'shard' (K/N): K must be a whole number from 0 to 2, not '3'"),
                                  ((0, 2), 0, "'batch_size' must be a whole number from 1 to "
                                              "9,223,372,036,854,775,807, not '0'")):
        stats.shard, stats.batch_size = shard, batch
        stats.save(tmp_path / "forged.safetensors")
        with pytest.raises(StatsError, match=re.escape(message)):
            Stats.load(tmp_path / "forged.safetensors")
