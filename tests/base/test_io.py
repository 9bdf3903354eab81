"""Atomic writes: single files (mode, no leftovers) and multi-file output folders."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import stat

import numpy as np
import pytest
from safetensors.numpy import save_file

from fps_onnx import _io
from fps_onnx._io import atomic_folder, atomic_write, check_folder
from fps_onnx.errors import OutputError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _plain(text):
    return lambda tmp: Path(tmp).write_text(text)


def _replacing(tmp):
    """Like safetensors: writes its own file (0600) and renames it onto ``tmp``."""
    save_file({"a": np.ones(2)}, tmp)


@pytest.mark.parametrize("writer", [_plain("new"), _replacing])
def test_atomic_write_keeps_the_mode_of_the_replaced_file(tmp_path, writer, umask_027):
    target = tmp_path / "out"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write(target, writer)
    assert _mode(target) == 0o600
    assert target.read_bytes() != b"old"
    os.chmod(target, 0o664)  # wider than the umask allows: still kept
    atomic_write(target, writer)
    assert _mode(target) == 0o664


@pytest.mark.parametrize("writer", [_plain("new"), _replacing])
def test_a_new_file_gets_0666_less_the_umask(tmp_path, writer, umask_027):
    atomic_write(tmp_path / "out", writer)
    assert _mode(tmp_path / "out") == 0o640
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("bad")])
def test_a_failed_write_leaves_no_temporary_and_the_old_file(tmp_path, error):
    target = tmp_path / "out"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("partial")
        raise error

    with pytest.raises(OutputError if isinstance(error, OSError) else ValueError):
        atomic_write(target, fail)
    assert sorted(os.listdir(tmp_path)) == ["out"] and target.read_text() == "old"
    with pytest.raises(OutputError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "out", _plain("x"))


def test_atomic_folder_creates_the_folder_in_one_step(tmp_path, umask_027):
    out = tmp_path / "run"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
        assert not out.exists()  # nothing is visible until the block ends
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt"]
    assert _mode(out) == 0o750


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_folder_swaps_and_carries_other_files_over(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "notes.txt").write_text("mine")
    (out / "logs").mkdir()
    (out / "logs" / "1.log").write_text("log")
    os.chmod(out, 0o700)
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("new a")
        (tmp / "b.txt").write_text("new b")
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary or old folder left
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt", "logs", "notes.txt"]
    assert (out / "a.txt").read_text() == "new a" and (out / "notes.txt").read_text() == "mine"
    assert (out / "logs" / "1.log").read_text() == "log"
    assert _mode(out) == 0o700


def test_atomic_folder_changes_nothing_on_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("new a")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert os.listdir(out) == ["a.txt"] and (out / "a.txt").read_text() == "old a"
    with pytest.raises(OutputError, match="No space"):
        with atomic_folder(tmp_path / "new") as tmp:
            raise OSError(28, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_atomic_folder_refuses_files_and_missing_parents(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="it is a file, not a folder"):
        with atomic_folder(tmp_path / "file"):
            pass
    with pytest.raises(OutputError, match="does not exist"):
        with atomic_folder(tmp_path / "a" / "b"):
            pass
    check_folder(tmp_path / "a" / "b")  # missing parents can be created
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_folder(tmp_path / "file" / "b")
    assert sorted(os.listdir(tmp_path)) == ["file"]


# --------------------------------------------------------------------------- ONNX model + data file


def _export_pair(tmp_path, monkeypatch, seed):
    torch = pytest.importorskip("torch")
    from fps_onnx.torch import export

    monkeypatch.setattr(export, "_MAX_PROTO_BYTES", 0)  # every model gets an external data file
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Linear(64, 3))  # > 1 KiB: external
    return model, lambda out: export.export_module(model, {"input": torch.randn(2, 4)}, out)


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_a_reexported_model_and_its_data_change_as_a_pair(tmp_path, monkeypatch):
    import torch

    out = tmp_path / "m.onnx"
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    first, export_first = _export_pair(tmp_path, monkeypatch, 0)
    export_first(out)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    want_first = first(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(_run(out, x), want_first, rtol=1e-5, atol=1e-6)

    second, export_second = _export_pair(tmp_path, monkeypatch, 1)
    real_replace = os.replace

    def fail_on_the_model(src, dst):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_model)
    with pytest.raises(OutputError, match="No space left"):
        export_second(out)
    monkeypatch.setattr(os, "replace", real_replace)
    # the new data file went under the other name: the old pair is whole
    np.testing.assert_allclose(_run(out, x), want_first, rtol=1e-5, atol=1e-6)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]

    export_second(out)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.1.data"]  # old data removed
    np.testing.assert_allclose(_run(out, x), second(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    export_first(out)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_allclose(_run(out, x), want_first, rtol=1e-5, atol=1e-6)

    from fps_onnx.torch import export

    monkeypatch.setattr(export, "_MAX_PROTO_BYTES", 1 << 40)  # small again: no data file left over
    export_first(out)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    np.testing.assert_allclose(_run(out, x), want_first, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- transactions and clashes


def test_a_transaction_writes_all_its_outputs_or_none(tmp_path):
    (tmp_path / "b").write_text("old b")
    with pytest.raises(RuntimeError, match="late"):
        with _io.transaction() as outputs:
            outputs.write(tmp_path / "a", _plain("new a"))
            outputs.write(tmp_path / "b", _plain("new b"))
            assert len(os.listdir(tmp_path)) == 3  # staged beside their targets
            raise RuntimeError("late failure")
    assert os.listdir(tmp_path) == ["b"] and (tmp_path / "b").read_text() == "old b"
    (tmp_path / "stale").write_text("x")
    with _io.transaction() as outputs:
        outputs.write(tmp_path / "a", _plain("new a"))
        folder = outputs.folder(tmp_path / "run")
        (folder / "f").write_text("f")
        outputs.remove(tmp_path / "stale")
        assert not (tmp_path / "a").exists()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "run"] and (tmp_path / "run" / "f").read_text() == "f"


def test_a_transaction_refuses_one_target_twice_and_outputs_that_are_inputs(tmp_path):
    (tmp_path / "in").write_text("input")
    os.link(tmp_path / "in", tmp_path / "hard")
    os.symlink(tmp_path / "in", tmp_path / "soft")
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputError, match="written twice"):
        with _io.transaction() as outputs:
            outputs.write(tmp_path / "out", _plain("1"))
            outputs.write(tmp_path / "x" / ".." / "out", _plain("2"))
    for alias in ("hard", "soft", "x/../in"):
        with pytest.raises(OutputError, match="same file as the input"):
            _io.transaction(planned={"-o": tmp_path / alias}, inputs={"the input": [tmp_path / "in"]}).__enter__()
    with pytest.raises(OutputError, match="same file as -o"):
        _io.check_clashes({"-o": tmp_path / "out", "--stats-out": tmp_path / "." / "out"})
    with _io.transaction(planned={"-o": tmp_path / "out"}) as outputs:
        with pytest.raises(OutputError, match="same file as data"):
            outputs.plan(inputs={"data": tmp_path / "out"})
    assert sorted(os.listdir(tmp_path)) == ["hard", "in", "soft", "x"]


# --- opening untrusted input files -------------------------------------------------------------


class _Refused(Exception):
    pass


def test_open_regular_reads_a_regular_file_and_a_link_to_one(tmp_path):
    (tmp_path / "a").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with _io.open_regular(tmp_path / "link", _Refused) as fh:
        assert fh.read() == b"data"
    with _io.open_regular(tmp_path / "a", _Refused, buffering=0) as fh:
        assert fh.read() == b"data" and os.get_blocking(fh.fileno())


@pytest.mark.parametrize("make, follow, message", [
    (os.mkfifo, True, r"p \(weights\) is a FIFO, not a regular file"),  # opened without waiting
    (os.mkdir, True, r"p \(weights\) is a folder, not a regular file"),
    (lambda p: p.symlink_to(p.parent / "a"), False, r"cannot read .*p \(weights\): "),
    (lambda p: None, True, r"cannot read .*p \(weights\): No such file"),
])
def test_open_regular_refuses_anything_else_with_the_error_given(tmp_path, make, follow, message):
    (tmp_path / "a").write_bytes(b"data")
    make(tmp_path / "p")
    with pytest.raises(_Refused, match=message):
        _io.open_regular(tmp_path / "p", _Refused, "weights", follow_links=follow)


def test_content_digest_names_a_file_by_its_bytes_and_a_folder_by_its_files_and_sizes(tmp_path, monkeypatch):
    from fps_onnx._io import content_digest
    from fps_onnx.errors import DataError

    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "x.png").write_bytes(b"12345")
    (tmp_path / "d" / "y.png").write_bytes(b"abc")
    file, folder = content_digest(tmp_path / "d" / "y.png", DataError), content_digest(tmp_path / "d", DataError)
    assert file == hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "d" / "y.png").write_bytes(b"abd")  # same size: the folder's digest stays
    assert content_digest(tmp_path / "d", DataError) == folder != content_digest(tmp_path / "d" / "y.png", DataError)
    (tmp_path / "d" / "y.png").write_bytes(b"abcd")
    resized = content_digest(tmp_path / "d", DataError)
    (tmp_path / "d" / "a" / "x.png").rename(tmp_path / "d" / "a" / "z.png")
    assert len({folder, resized, content_digest(tmp_path / "d", DataError)}) == 3
    monkeypatch.setattr(_io, "MAX_DIGEST_ENTRIES", 2)
    with pytest.raises(DataError, match="holds more than 2 entries"):
        content_digest(tmp_path / "d", DataError)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="a FIFO, not a regular file"):
        content_digest(tmp_path / "fifo", DataError)


def test_tensors_read_one_at_a_time_are_checked_against_the_header_before_allocating(tmp_path):
    import json

    def file(entries: dict, data: bytes) -> Path:
        header = json.dumps(entries).encode()
        path = tmp_path / "t.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + data)
        return path

    ok = file({"a": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}, b"\x01\x00\x02\x00")
    [(key, array)] = list(_io._each_tensor(ok, ["a"]))
    assert key == "a" and array.tolist() == [1, 2]
    huge = file({"a": {"dtype": "U32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}, b"\x00" * 4)
    with pytest.raises(ValueError, match="do not fit its dtype and shape within the file"):
        list(_io._each_tensor(huge, ["a"]))
    bf16 = file({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\x00\x00")
    with pytest.raises(ValueError, match="which NumPy does not hold"):
        list(_io._each_tensor(bf16, ["a"]))
    assert np.dtype(_io._NUMPY_DTYPES["BOOL"]) == np.bool_


def test_the_same_arrays_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata in a hash map's order: the header is rewritten in key order."""
    from safetensors import safe_open

    from fps_onnx._io import write_safetensors

    meta = {f"key{i}": f"välue {i} \"quoted\"\n" for i in range(12)}
    arrays = {"b": np.arange(6, dtype=np.int64).reshape(2, 3), "a": np.ones(5, np.float32)}
    files = [write_safetensors(tmp_path / f"{i}.safetensors", arrays, meta) for i in range(4)]
    assert len({f.read_bytes() for f in files}) == 1
    header = files[0].read_bytes()
    assert header.index(b'"key0"') < header.index(b'"key1"') < header.index(b'"key10"') < header.index(b'"key2"')
    with safe_open(str(files[0]), framework="numpy") as fh:
        assert fh.metadata() == meta
        assert np.array_equal(fh.get_tensor("b"), arrays["b"]) and np.array_equal(fh.get_tensor("a"), arrays["a"])
