"""Calibration data from elsewhere: every hostile file is one ``Error:`` line.

Each bad file is built here, small and fast to make (a forged header, not a
large payload), and run through ``fps-onnx select``: exit 1, exactly one line on
stderr naming the problem, no traceback, no output file. ``--max-samples``
reads only the rows it needs from a compressed ``.npz``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
import struct
import zipfile
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper
import pytest

from _cli import assert_one_error, invoke
from _models import linear_chain, make_model, tensor
from fps_onnx.data import DataConfig, iter_batches, load_npz
from fps_onnx.errors import DataError
from fps_onnx.onnx.inputs import InputSpec
from fps_onnx.selection.maskfile import MaskFile


def image_model(tmp: Path) -> Path:
    """x[N, 3, 8, 8] -> Conv(w [2, 3, 3, 3]) -> y."""
    w = np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [tensor("x", ["N", 3, 8, 8])],
                       [tensor("y", ["N", 2, 6, 6])], {"w": w})
    onnx.save(model, tmp / "conv.onnx")
    return tmp / "conv.onnx"


def token_model(tmp: Path) -> Path:
    """Gather(emb [10, 4], input_ids) * attention_mask -> MatMul(w [4, 3]) -> y."""
    r = np.random.default_rng(0)
    emb = r.standard_normal((10, 4)).astype(np.float32)
    w = r.standard_normal((4, 3)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
            helper.make_node("Mul", ["e", "m3"], ["h"]),
            helper.make_node("MatMul", ["h", "w"], ["y"]),
        ],
        [tensor("input_ids", ["N", "S"], TensorProto.INT64),
         tensor("attention_mask", ["N", "S"], TensorProto.INT64)],
        [tensor("y", ["N", "S", 3])],
        {"emb": emb, "w": w, "axis": np.array([-1], np.int64)},
    )
    onnx.save(model, tmp / "tokens.onnx")
    return tmp / "tokens.onnx"


def forged_png(path: Path, width: int, height: int) -> Path:
    """A 4x4 PNG whose header says ``width`` x ``height`` (CRC recomputed): a few bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def npy_bytes(shape, descr="<f4", payload=b"\0" * 64, fortran=False) -> bytes:
    """A .npy header declaring ``shape`` and ``descr``, then ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue() + payload


def npz_member(path: Path, name: str, data: bytes, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr(name, data)
    return path


def pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def folder_with(tmp: Path, name: str, make) -> Path:
    folder = tmp / "data"
    folder.mkdir()
    make(folder / name)
    return folder


# (model: "image" | "chain" | "tokens", make(tmp) -> DATA path, extra args, message regex)
CASES = {
    # images (model input [N, 3, 8, 8])
    "bomb over Pillow's hard limit": (
        "image", lambda t: forged_png(t / "x.png", 30000, 30000), [], r"image .*x\.png is too large"),
    "bomb over Pillow's warning limit": (
        "image", lambda t: forged_png(t / "x.png", 10000, 10000), [], r"image .*x\.png is too large"),
    "bomb over our limit only": (
        "image", lambda t: forged_png(t / "x.png", 9000, 9000), [],
        r"image .*x\.png declares 9000x9000 pixels, over the limit of 67,108,864"),
    "elongated image": (
        "image", lambda t: forged_png(t / "x.png", 8_000_000, 1), [], r"x\.png \(8000000x1\) is too elongated"),
    "empty image size": (
        "image", lambda t: forged_png(t / "x.png", 0, 4), [], r"cannot decode image .*x\.png"),
    "zero-byte images": (
        "image", lambda t: folder_with(t, "a.png", lambda p: p.write_bytes(b"")), [],
        r"cannot decode image .*a\.png: not a JPEG, PNG, WebP or BMP image"),
    "truncated jpeg": ("image", lambda t: _truncated_jpeg(t / "x.jpg"), [], r"cannot decode image .*x\.jpg"),
    "gif named png": (
        "image", lambda t: _gif(t / "x.png"), [], r"x\.png: not a JPEG, PNG, WebP or BMP image"),
    "fifo image in a folder": (
        "image", lambda t: folder_with(t, "x.png", os.mkfifo), [], r"x\.png is a FIFO, not a regular file"),
    "fifo image given": ("image", lambda t: _fifo(t / "x.png"), [], r"x\.png is a FIFO, not a regular file"),
    "broken link": (
        "image", lambda t: folder_with(t, "x.png", lambda p: p.symlink_to(t / "gone.png")), [],
        r"x\.png is a broken symbolic link"),
    "std of 2 for 3 channels": (
        "image", lambda t: _png(t / "x.png"), ["--std", "1,1"],
        r"image std has 2 values but the model takes 3-channel images"),
    "mean of 2 for 3 channels": (
        "image", lambda t: _png(t / "x.png"), ["--mean", "1,1"],
        r"image mean has 2 values but the model takes 3-channel images"),
    "std of 0": ("image", lambda t: _png(t / "x.png"), ["--std", "0.5,0,0.5"], r"image std must be above 0"),
    "std of nan": ("image", lambda t: _png(t / "x.png"), ["--std", "nan"], r"image std must be finite"),
    "mean of inf": ("image", lambda t: _png(t / "x.png"), ["--mean", "inf,0,0"], r"image mean must be finite"),
    # .npy (model input x [N, 6])
    "npy is /dev/zero": (
        "chain", lambda t: folder_with(t, "x.npy", lambda p: p.symlink_to("/dev/zero")), [],
        r"x\.npy is a character device, not a regular file"),
    "npy given as /dev/zero": (
        "chain", lambda t: _link(t / "x.npy", "/dev/zero"), [], r"x\.npy is a character device"),
    "npy with a huge forged shape": (
        "chain", lambda t: _write(t / "x.npy", npy_bytes((10**12, 6))), [],
        r"x\.npy: its header declares \[1000000000000, 6\] float32 \(24,000,000,000,000 bytes\) "
        r"but only 64 bytes follow"),
    "npy with a negative shape": (
        "chain", lambda t: _write(t / "x.npy", npy_bytes((-1, 6))), [], r"x\.npy: its header declares a negative"),
    "npy of pickled objects": (
        "chain", lambda t: _write(t / "x.npy", pickled_npy()), [], r"x\.npy holds Python objects"),
    "npy 0-d": ("chain", lambda t: _save(t / "x.npy", np.float32(1)), [], r"x\.npy is a single value"),
    "npy of 0 bytes": ("chain", lambda t: _write(t / "x.npy", b""), [], r"cannot read .*x\.npy"),
    "npy with NaN": (
        "chain", lambda t: _save(t / "x.npy", _with_nan(5, 6, at=3)), [],
        r"NaN or Inf in the input of w1 in batch 0"),
    # .npz
    "npz 0-d": ("chain", lambda t: _savez(t / "a.npz", x=np.float32(1)), [], r"a\.npz \[x\] is a single value"),
    "npz of pickled objects": (
        "chain", lambda t: npz_member(t / "a.npz", "x.npy", pickled_npy()), [], r"a\.npz \[x\] holds Python objects"),
    "npz of the wrong rank": (
        "chain", lambda t: _savez(t / "a.npz", x=np.zeros((2, 3, 6), np.float32)), [],
        r"a\.npz: x has shape \[2, 3, 6\], the model expects x \[N, 6\]"),
    "npz with NaN": (
        "chain", lambda t: _savez(t / "a.npz", x=_with_nan(40, 6, at=37)), ["--batch-size", "8"],
        r"NaN or Inf in the input of w1 in batch 4"),
    "npz of mismatched lengths": (
        "tokens", lambda t: _savez(t / "a.npz", input_ids=np.ones((3, 4), np.int64),
                                   attention_mask=np.ones((2, 4), np.int64)), [],
        r"a\.npz: arrays hold different numbers of samples"),
    "npz that is not a zip": ("chain", lambda t: _write(t / "a.npz", b"PK\x03\x04" + b"x" * 60), [],
                              r"cannot read .*a\.npz"),
    "npz with corrupt compressed data": ("chain", lambda t: _corrupt_npz(t / "a.npz", 2000), [],
                                         r"cannot read .*a\.npz"),
    "npz with a huge forged shape, compressed": (
        "chain", lambda t: npz_member(t / "a.npz", "x.npy", npy_bytes((10**12, 6))), [],
        r"a\.npz \[x\]: its header declares \[1000000000000, 6\]"),
    "npz with a huge forged shape, stored": (
        "chain", lambda t: npz_member(t / "a.npz", "x.npy", npy_bytes((10**12, 6)), zipfile.ZIP_STORED), [],
        r"a\.npz \[x\]: its header declares \[1000000000000, 6\]"),
    "npz member shorter than its zip entry says": (
        "chain", lambda t: _short_member(t / "a.npz"), [], r"a\.npz \[x\] ends before the 100 rows its header declares"),
    "npz fortran member shorter than its zip entry says": (
        "chain", lambda t: _short_member(t / "a.npz", fortran=True), [],
        r"a\.npz \[x\] ends before the 100 rows its header declares"),
    "npz fortran member shorter than it says, one sample asked": (
        "chain", lambda t: _short_member(t / "a.npz", fortran=True), ["--max-samples", "1"],
        r"a\.npz \[x\] ends before the 100 rows its header declares"),
    "npz without the model's input": (
        "tokens", lambda t: _savez(t / "a.npz", token_type_ids=np.zeros((2, 4), np.int64)), [],
        r"a\.npz has no array 'input_ids'"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, array) -> Path:
    np.save(path, array)
    return path


def _savez(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def _gif(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(path, "GIF")
    return path


def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _with_nan(n: int, d: int, at: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x[at, 2] = np.nan
    return x


def _corrupt_npz(path: Path, rows: int, keep: int = 0) -> Path:
    """A compressed npz of ``rows`` x 6 whose compressed bytes are garbled after the
    first ``keep`` bytes (and before the last 64)."""
    x = np.random.default_rng(0).integers(0, 7, (rows, 6)).astype(np.float32)
    np.savez_compressed(path, x=x)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    end = start + info.compress_size
    assert info.compress_size > 2 * keep + 1024, info.compress_size
    lo = start + max(keep, 16)
    data[lo : end - 64] = np.random.default_rng(1).integers(0, 256, end - 64 - lo, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _short_member(path: Path, fortran: bool = False) -> Path:
    """A stored member whose zip entry and .npy header agree on 100 rows, in an
    archive that holds 4: the read runs off the end of the file."""
    member = npy_bytes((100, 6), payload=b"\0" * 96, fortran=fortran)
    npz_member(path, "x.npy", member, zipfile.ZIP_STORED)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    data = bytearray(path.read_bytes())
    claimed = len(member) - 96 + 100 * 6 * 4
    local, central = info.header_offset, data.rindex(b"PK\x01\x02")
    for offset in (local + 18, local + 22, central + 20, central + 24):  # compressed, uncompressed size
        struct.pack_into("<I", data, offset, claimed)
    path.write_bytes(bytes(data))
    return path


MODELS = {"image": image_model, "chain": linear_chain, "tokens": token_model}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_data_gets_one_error_line_and_no_output(tmp_path, case):
    kind, make, extra, message = CASES[case]
    (tmp_path / "m").mkdir()
    model = MODELS[kind](tmp_path / "m")
    data = make(tmp_path)
    out = tmp_path / "out" / "masks.safetensors"
    out.parent.mkdir()
    result = invoke("select", model, data, "-o", out, "-q", *extra)
    assert_one_error(result, message, empty=[out.parent])


def test_forged_headers_cost_no_memory(tmp_path):
    """The bombs above are a few bytes each; the data they declare is never allocated."""
    assert forged_png(tmp_path / "x.png", 30000, 30000).stat().st_size < 200
    assert len(npy_bytes((10**12, 6))) < 200


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    model = linear_chain(tmp_path)
    (tmp_path / "data").mkdir()
    data = _save(tmp_path / "data" / "x.npy", np.zeros((2, 6), np.float32))
    real_open = os.open

    def no_permission(path, flags, *args, **kwargs):  # root reads any file: deny it here
        if Path(path) == data:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    result = invoke("select", model, data.parent, "-o", out, "-q")
    assert_one_error(result, r"cannot read .*x\.npy: Permission denied", empty=[out.parent])


def test_max_samples_reads_only_the_first_rows_of_a_compressed_npz(tmp_path):
    """Past its first rows the compressed data is garbage: a whole read fails, a read of
    one sample never reaches it."""
    model = linear_chain(tmp_path)
    data = _corrupt_npz(tmp_path / "a.npz", 50_000, keep=32 * 1024)  # 1.2 MB of floats
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    result = invoke("select", model, data, "-o", out, "-q", "--max-samples", "1")
    assert result.exit_code == 0, result.output
    assert MaskFile.load(out).meta["num_samples"] == "1"
    out.unlink()
    assert_one_error(invoke("select", model, data, "-o", out, "-q"), r"cannot read .*a\.npz",
                     empty=[out.parent])


def test_max_samples_decompresses_a_row_not_the_member(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((40_000, 6)).astype(np.float32)
    np.savez_compressed(tmp_path / "a.npz", x=x)
    got = []
    read = zipfile.ZipExtFile.read

    def counted(self, n=-1):
        data = read(self, n)
        got.append(len(data))
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counted)
    spec = InputSpec("x", ("N", 6), np.dtype(np.float32))
    (batch,) = iter_batches(tmp_path / "a.npz", [spec], DataConfig(batch_size=32, max_samples=1))
    np.testing.assert_array_equal(batch["x"], x[:1])
    assert sum(got) <= 256 + 24  # the .npy header and one row of 6 floats, of 960,128 bytes


def zero_bomb(path: Path, rows: int, fortran: bool) -> Path:
    """A compressed .npz whose member x holds ``rows`` x 6 float32 zeros: written a
    megabyte at a time, it takes about a thousandth of the bytes it decompresses to."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(npy_bytes((rows, 6), payload=b"", fortran=fortran))
            zeros, left = bytes(1 << 20), rows * 24
            while left:
                member.write(zeros[: min(left, len(zeros))])
                left -= min(left, len(zeros))
    return path


@pytest.mark.parametrize("fortran", [True, False])
def test_a_compressed_zero_bomb_costs_one_row_of_memory_with_max_samples_1(tmp_path, fortran):
    """48 MB of zeros in a ~50 KB member: one sample is read holding a few pieces of it,
    whichever the member's order (a Fortran-ordered one is not decompressed whole)."""
    import tracemalloc

    bomb = zero_bomb(tmp_path / "a.npz", 2_000_000, fortran)
    assert bomb.stat().st_size < 100_000
    spec = InputSpec("x", ("N", 6), np.dtype(np.float32))
    tracemalloc.start()
    try:
        (batch,) = iter_batches(bomb, [spec], DataConfig(batch_size=32, max_samples=1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert batch["x"].shape == (1, 6) and not batch["x"].any()
    assert peak < 8 << 20, f"{peak:,} bytes held for one row of a 48,000,000-byte member"

    model = linear_chain(tmp_path)
    out = tmp_path / "out" / "masks.safetensors"
    out.parent.mkdir()
    result = invoke("select", model, bomb, "-o", out, "-q", "--max-samples", "1")
    assert result.exit_code == 0, result.output
    assert MaskFile.load(out).meta["num_samples"] == "1"


# --------------------------------------------------------------------------- .npz read whole (training data)


def test_load_npz_reads_every_array_as_np_load_does(tmp_path):
    r = np.random.default_rng(0)
    arrays = {"x": np.asfortranarray(r.standard_normal((5, 3, 2)).astype(np.float32)),
              "y": np.arange(5, dtype=">i8"), "empty": np.zeros((0, 4), np.uint8)}
    np.savez_compressed(tmp_path / "a.npz", **arrays)
    np.savez(tmp_path / "b.npz", **arrays)
    for name in ("a.npz", "b.npz"):
        got = load_npz(tmp_path / name)
        assert sorted(got) == sorted(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[key], value)
            assert got[key].shape == value.shape and got[key].dtype.isnative
        got["x"][0, 0, 0] = 7.0  # writable, as np.load's arrays are


def test_load_npz_refuses_a_compressed_bomb_before_decompressing_it(tmp_path):
    """48 MB of zeros in ~50 KB, over a limit of 1 MiB: refused from the zip entry's
    declared size, holding nothing of the member."""
    import tracemalloc

    bomb = zero_bomb(tmp_path / "a.npz", 2_000_000, fortran=True)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"a.npz: its compressed arrays declare 48,000,128 bytes, "
                                            r"over the limit of 1,048,576 for data read whole"):
            load_npz(bomb, max_inflated=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert load_npz(bomb)["x"].shape == (2_000_000, 6)  # under the default limit of 1 GiB


@pytest.mark.parametrize("make,message", [
    (lambda p: _short_member(p), r"a.npz \[x.npy\] ends before the data its header declares"),
    (lambda p: npz_member(p, "x.npy", npy_bytes((2,), descr="|O")), r"holds Python objects"),
    (lambda p: npz_member(p, "x.npy", npy_bytes((10**12, 6))), r"header declares \[1000000000000, 6\] float32"),
    (lambda p: npz_member(p, "x.npy", b"PK not an array"), r"cannot read .*a.npz"),
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), r"cannot read .*a.npz"),
])
def test_load_npz_refuses_hostile_members_by_name(tmp_path, make, message):
    make(tmp_path / "a.npz")
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "a.npz")


def test_training_npz_bombs_are_refused_before_decompressing(tmp_path, monkeypatch):
    """Both training readers (labelled arrays, causal LM token arrays) go through load_npz."""
    pytest.importorskip("torch")
    from fps_onnx.torch.train import data as train_data
    from fps_onnx.torch.train import lm_data

    monkeypatch.setattr("fps_onnx.data.arrays.MAX_INFLATED_BYTES", 1 << 20)
    bomb = zero_bomb(tmp_path / "a.npz", 2_000_000, fortran=False)
    for read in (lambda: train_data.open_split(bomb), lambda: lm_data.open_lm_split(bomb, None, 8, 100)):
        with pytest.raises(DataError, match=r"declare 48,000,128 bytes, over the limit of 1,048,576"):
            read()
