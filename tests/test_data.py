"""Calibration data readers: .npy, .npz, images, re-batching and bad files."""

from __future__ import annotations

import numpy as np
import pytest

from fps_onnx.data import DataConfig, InputSpec, find_files, image_geometry, iter_batches
from fps_onnx.errors import DataError

IMG = InputSpec("x", ("N", 3, 8, 8), np.dtype(np.float32))
TOKENS = (InputSpec("input_ids", ("N", "S"), np.dtype(np.int64)),
          InputSpec("attention_mask", ("N", "S"), np.dtype(np.int64)),
          InputSpec("token_type_ids", ("N", "S"), np.dtype(np.int64)))


def sizes(batches):
    return [len(next(iter(b.values()))) for b in batches]


def test_npy_files_are_rebatched_across_files_in_order(tmp_path):
    for i, n in enumerate((5, 2, 6)):
        np.save(tmp_path / f"{i}.npy", np.full((n, 3, 8, 8), i, np.float64))
    batches = list(iter_batches(tmp_path, [IMG], DataConfig(batch_size=4)))
    assert sizes(batches) == [4, 4, 4, 1]
    assert all(b["x"].dtype == np.float32 and b["x"].flags.c_contiguous for b in batches)
    firsts = np.concatenate([b["x"][:, 0, 0, 0] for b in batches])
    assert firsts.tolist() == [0] * 5 + [1] * 2 + [2] * 6


def test_max_samples(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 3, 8, 8), np.float32))
    assert sizes(iter_batches(tmp_path, [IMG], DataConfig(batch_size=4, max_samples=6))) == [4, 2]


def test_npz_token_arrays_and_zero_filled_token_type_ids(tmp_path):
    ids = np.arange(12).reshape(3, 4)
    np.savez(tmp_path / "a.npz", input_ids=ids.astype(np.int32), attention_mask=np.ones((3, 4), np.int64))
    np.savez(tmp_path / "b.npz", input_ids=ids[:, :2], attention_mask=np.ones((3, 2), np.int64))
    batches = list(iter_batches(tmp_path, TOKENS, DataConfig(batch_size=4)))
    # another sequence length never shares a batch
    assert [b["input_ids"].shape for b in batches] == [(3, 4), (3, 2)]
    assert batches[0]["input_ids"].dtype == np.int64
    assert not batches[0]["token_type_ids"].any()


def test_npz_missing_input_names_what_it_holds(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.zeros((2, 3), np.int64))
    with pytest.raises(DataError, match=r"a.npz has no array 'input_ids' \(it holds \['ids'\]"):
        list(iter_batches(tmp_path, TOKENS))


def test_images_are_found_recursively_resized_and_normalised(tmp_path):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "cat" / "a.png")
    Image.new("L", (9, 30), 128).save(tmp_path / "dog" / "b.jpg")
    (tmp_path / "labels.txt").write_text("ignored")
    config = DataConfig(batch_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    (batch,) = iter_batches(tmp_path, [IMG], config)
    assert batch["x"].shape == (2, 3, 8, 8)
    np.testing.assert_allclose(batch["x"][0, :, 4, 4], [1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(batch["x"][1], 128 / 255 * 2 - 1, atol=0.02)


def test_dynamic_image_size_comes_from_config():
    spec = InputSpec("x", ("N", 3, "H", "W"), np.dtype(np.float32))
    assert image_geometry(spec, DataConfig()) == (3, 224, 224)
    assert image_geometry(spec, DataConfig(image_size=96)) == (3, 96, 96)
    assert image_geometry(IMG, DataConfig(image_size=96)) == (3, 8, 8)


def test_undecodable_image_is_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode image .*broken.jpg"):
        list(iter_batches(tmp_path, [IMG]))


def test_unreadable_npy_is_named(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read .*bad.npy"):
        list(iter_batches(tmp_path, [IMG]))


def test_wrong_dtype_says_what_the_model_expects(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 4), np.float32))
    spec = InputSpec("input_ids", ("N", "S"), np.dtype(np.int64))
    with pytest.raises(DataError, match=r"input_ids holds float32, the model expects input_ids \[N, S\] int64"):
        list(iter_batches(tmp_path, [spec]))


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no .npy, .npz or image files"):
        find_files(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        find_files(tmp_path / "nope")


def test_npy_needs_a_single_input_model(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 4), np.int64))
    with pytest.raises(DataError, match="use .npz with one array per input name"):
        list(iter_batches(tmp_path, TOKENS))
