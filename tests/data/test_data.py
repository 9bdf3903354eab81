"""Calibration data readers: .npy, .npz, images, re-batching and bad files."""

from __future__ import annotations

import numpy as np
import pytest

from fps_onnx.data import DataConfig, arrays, find_files, image_geometry, iter_batches
from fps_onnx.errors import DataError
from fps_onnx.onnx.inputs import InputSpec

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


@pytest.mark.parametrize("savez", [np.savez, np.savez_compressed])
@pytest.mark.parametrize("order", ["C", "F"])
def test_npz_rows_are_read_in_blocks_exactly(tmp_path, savez, order):
    r = np.random.default_rng(0)
    ids = np.asarray(r.integers(0, 100, (11, 5)), order=order)
    mask = np.asarray(r.integers(0, 2, (11, 5)), order=order)
    savez(tmp_path / "a.npz", input_ids=ids, attention_mask=mask)
    savez(tmp_path / "b.npz", input_ids=ids[:3], attention_mask=mask[:3])
    batches = list(iter_batches(tmp_path, TOKENS, DataConfig(batch_size=4)))
    assert sizes(batches) == [4, 4, 4, 2]
    got = np.concatenate([b["input_ids"] for b in batches])
    np.testing.assert_array_equal(got, np.concatenate([ids, ids[:3]]))
    np.testing.assert_array_equal(np.concatenate([b["attention_mask"] for b in batches]),
                                  np.concatenate([mask, mask[:3]]))
    (first,) = iter_batches(tmp_path, TOKENS, DataConfig(batch_size=4, max_samples=2))
    np.testing.assert_array_equal(first["input_ids"], ids[:2])


@pytest.mark.parametrize("shape", [(11, 5), (7, 3, 4), (9, 1, 6), (6, 2, 3, 2), (1, 4, 4), (13, 1)])
@pytest.mark.parametrize("piece, window", [(1 << 20, 32 << 20), (40, 64), (8, 1)])
def test_fortran_ordered_npz_members_are_gathered_in_bounded_passes(tmp_path, monkeypatch, shape, piece, window):
    """Whatever the window (rows held per pass) and piece (bytes per read: whole columns at a
    time, or one column in several reads), rows come back as a C-ordered member gives them."""
    monkeypatch.setattr(arrays, "_PIECE", piece)
    monkeypatch.setattr(arrays, "_WINDOW_BYTES", window)
    x = np.asfortranarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    np.savez_compressed(tmp_path / "a.npz", x=x)
    spec = InputSpec("x", ("N", *shape[1:]), np.dtype(np.float32))
    for batch_size, max_samples in ((4, None), (3, 5), (1, 1), (64, None)):
        batches = list(iter_batches(tmp_path / "a.npz", [spec], DataConfig(batch_size, max_samples)))
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x[:max_samples])


def test_fortran_ordered_npz_passes_hold_the_rows_asked_only(tmp_path, monkeypatch):
    x = np.asfortranarray(np.arange(40 * 6, dtype=np.float32).reshape(40, 6))
    np.savez(tmp_path / "a.npz", x=x)
    held = []
    gather = arrays._MemberRows._fortran_rows

    def counted(self, start, count):
        held.append((start, count))
        return gather(self, start, count)

    monkeypatch.setattr(arrays._MemberRows, "_fortran_rows", counted)
    spec = InputSpec("x", ("N", 6), np.dtype(np.float32))
    list(iter_batches(tmp_path / "a.npz", [spec], DataConfig(batch_size=4, max_samples=6)))
    assert held == [(0, 6)]  # one pass, six rows: not the 40 the member holds
    held.clear()
    monkeypatch.setattr(arrays, "_WINDOW_BYTES", 10 * 24)  # ten rows a pass: two blocks of 4
    batches = list(iter_batches(tmp_path / "a.npz", [spec], DataConfig(batch_size=4)))
    assert held == [(0, 8), (8, 8), (16, 8), (24, 8), (32, 8)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


def test_fortran_ordered_npy_is_read_row_by_row(tmp_path):
    x = np.asfortranarray(np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "a.npy", x)
    batches = list(iter_batches(tmp_path, [IMG], DataConfig(batch_size=2)))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


@pytest.mark.parametrize("kwargs, message", [
    ({"std": (0.5, 0.0, 0.5)}, "image std must be above 0"),
    ({"std": (-1.0,)}, "image std must be above 0"),
    ({"mean": (float("nan"),)}, "image mean must be finite"),
    ({"std": (float("inf"), 1.0, 1.0)}, "image std must be finite"),
    ({"mean": ()}, "image mean must be finite numbers"),
    ({"mean": ("a",)}, "image mean must be numbers"),
    ({"max_image_pixels": 0}, "max image pixels must be at least 1"),
])
def test_bad_normalisation_is_refused_up_front(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)


def test_normalisation_is_stored_as_float_tuples():
    config = DataConfig(mean=[0, 1, 2], std=np.array([1, 2, 3]))
    assert config.mean == (0.0, 1.0, 2.0) and config.std == (1.0, 2.0, 3.0)


def test_mean_and_std_lengths_must_fit_the_channels(tmp_path):
    from PIL import Image

    Image.new("L", (8, 8), 200).save(tmp_path / "a.png")
    grey = InputSpec("x", ("N", 1, 8, 8), np.dtype(np.float32))
    with pytest.raises(DataError, match="image std has 2 values but the model takes 3-channel images"):
        list(iter_batches(tmp_path, [IMG], DataConfig(std=(1.0, 1.0))))
    with pytest.raises(DataError, match=r"image mean has 3 values but the model takes 1-channel images \(give one value\)"):
        list(iter_batches(tmp_path, [grey], DataConfig(mean=(0.5, 0.5, 0.5), std=(0.5,))))
    (batch,) = iter_batches(tmp_path, [grey], DataConfig(mean=(0.5,), std=(0.5,)))
    np.testing.assert_allclose(batch["x"], 200 / 255 * 2 - 1, atol=0.02)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a.png declares 20x10 pixels, over the limit of 199 pixels"):
        list(iter_batches(tmp_path, [IMG], DataConfig(max_image_pixels=199)))
    # within the limit, but resized (short side to 8/0.875) it would be 1829x9 pixels
    (tmp_path / "a.png").unlink()
    Image.new("RGB", (200, 1)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"b.png \(200x1\) is too elongated: .* 1829x9 pixels"):
        list(iter_batches(tmp_path, [IMG], DataConfig(max_image_pixels=1000)))
    assert len(list(iter_batches(tmp_path, [IMG], DataConfig(max_image_pixels=20000)))) == 1


def test_only_regular_files_are_data(tmp_path):
    import os

    (tmp_path / "dir.npy").mkdir()  # a folder named like data is not data
    np.save(tmp_path / "a.npy", np.zeros((1, 3, 8, 8), np.float32))
    (tmp_path / "link.npy").symlink_to(tmp_path / "a.npy")  # a link to a regular file is
    assert [p.name for p in find_files(tmp_path)] == ["a.npy", "link.npy"]
    os.mkfifo(tmp_path / "b.npz")
    with pytest.raises(DataError, match=r"b.npz is a FIFO, not a regular file"):
        find_files(tmp_path)
