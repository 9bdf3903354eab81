"""The CLI's contract on bad input: exactly one ``Error:`` line on stderr, exit 1
(2 for a bad command line), no traceback, nothing from ONNX Runtime, and no
output written; outputs that would replace an input or each other are refused."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import helper
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from _cli import assert_one_error, invoke
from _models import linear_chain, make_model, tensor
from fps_onnx.cli.main import OneLineFormatter
from fps_onnx.errors import one_line

FORGERIES = ["\n", "\r", "\x1b[31m", "\u2028", "\x85", "\r\n"]


def _data(folder, rows: int = 8, width: int = 6):
    folder.mkdir(exist_ok=True)
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32))
    return folder


def _nan_model(path, name):
    w = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    w[2, 3] = np.nan
    onnx.save(make_model([helper.make_node("MatMul", ["x", name], ["y"])],
                         [tensor("x", ["N", 6])], [tensor("y", ["N", 5])], {name: w}), path)
    return path


# --------------------------------------------------------------------------- one line


@pytest.mark.parametrize("forge", FORGERIES)
def test_a_weight_name_cannot_forge_a_second_line_and_a_failed_select_leaves_no_stats(tmp_path, forge):
    model = _nan_model(tmp_path / "m.onnx", f"w1{forge}Error: forged by the model")
    data = _data(tmp_path / "data")
    before = sorted(os.listdir(tmp_path))
    result = invoke("select", model, data, "-o", tmp_path / "masks.safetensors",
                    "--stats-out", tmp_path / "s.safetensors", "-q")
    line = assert_one_error(result)
    assert "NaN" in line and "forged by the model" in line
    assert sorted(os.listdir(tmp_path)) == before  # neither output, no temporary file
    assert os.listdir(data) == ["x.npy"]


@pytest.mark.parametrize("forge", ["\n", "\x1b]0;title\x07", "\u2029"])
def test_an_input_name_and_a_stats_key_cannot_forge_a_line(tmp_path, forge):
    name = f"x{forge}Error: forged input"
    model = tmp_path / "m.onnx"
    onnx.save(make_model([helper.make_node("MatMul", [name, "w"], ["y"])], [tensor(name, ["N", 6])],
                         [tensor("y", ["N", 5])], {"w": np.ones((6, 5), np.float32)}), model)
    np.savez(tmp_path / "d.npz", **{name: np.ones((4, 7), np.float32)})
    line = assert_one_error(invoke("select", model, tmp_path / "d.npz", "-o", tmp_path / "o", "-q"))
    assert "forged input" in line

    chain, data = linear_chain(tmp_path), _data(tmp_path / "data")
    stats = tmp_path / "s.safetensors"
    assert invoke("select", chain, data, "-o", tmp_path / "a", "--stats-out", stats, "-q").exit_code == 0
    with safe_open(str(stats), "numpy") as fh:
        meta = fh.metadata()
    arrays = {k.replace("w1", f"w1{forge}Error: forged key"): v for k, v in load_file(stats).items()}
    save_file(arrays, stats, metadata=meta)
    before = sorted(os.listdir(tmp_path))
    line = assert_one_error(invoke("select", chain, "-o", tmp_path / "b", "--from-stats", stats, "-q"))
    assert "forged key" in line and sorted(os.listdir(tmp_path)) == before


def test_a_file_name_cannot_forge_a_line(tmp_path):
    model, data = linear_chain(tmp_path), tmp_path / "data"
    data.mkdir()
    (data / "bad\nError: forged file.npy").write_bytes(b"not an array")
    line = assert_one_error(invoke("select", model, data, "-o", tmp_path / "o", "-q"))
    assert "forged file" in line and not (tmp_path / "o").exists()


def test_usage_errors_are_one_line_with_status_2(tmp_path):
    model = linear_chain(tmp_path)
    line = assert_one_error(invoke("select", model, tmp_path), status=2)
    assert "--output" in line and "select --help" in line
    line = assert_one_error(invoke("select", model, tmp_path, "-o", "x", "--seed", "1\nError: forged"),
                                 status=2)
    assert "--seed" in line
    assert_one_error(invoke("no-such-command\x1b[2J"), status=2)


class _Panic(BaseException):
    """Like the tokenizers' PanicException: not an Exception."""


@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth exceeded\nError: x"),
                                   OverflowError("int too large"), _Panic("regex panicked")])
def test_an_unexpected_error_is_one_line(tmp_path, monkeypatch, error):
    import fps_onnx.cli.select as select_cli

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(select_cli, "select_masks", boom)
    data = _data(tmp_path / "data")
    line = assert_one_error(invoke("select", linear_chain(tmp_path), data, "-o", tmp_path / "o", "-q"))
    assert f"unexpected {type(error).__name__}" in line and "report" in line


def test_log_lines_are_one_line_each():
    record = logging.LogRecord("fps_onnx", logging.INFO, __file__, 1, "left out %s", ("w\nError: x\u2028y",), None)
    text = OneLineFormatter("%(message)s").format(record)
    assert text == "left out w\\nError: x\\u2028y" and len(text.splitlines()) == 1
    assert one_line("a\tb\x1b[0m\x9b\u202e") == "a\\tb\\x1b[0m\\x9b\\u202e"


def _cli(*args, cwd):
    code = "import sys; from fps_onnx.cli.main import main; sys.argv[0] = 'fps-onnx'; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_onnx_runtime_writes_nothing_of_its_own(tmp_path):
    """A run-time failure inside ONNX Runtime (a Reshape the batch does not fit)
    reaches the user as our one line; ORT's own ``[E:onnxruntime:...]`` lines
    (written by its C++ logger, so only a real process shows them) do not."""
    model = tmp_path / "m.onnx"
    onnx.save(make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        [tensor("x", ["N", 6])], [tensor("y", ["M", 5])],
        {"shape": np.array([-1, 4], np.int64), "w": np.ones((4, 5), np.float32)}), model)
    data = _data(tmp_path / "data", rows=3)
    before = sorted(os.listdir(tmp_path))
    done = _cli("select", model, data, "-o", "m.safetensors", "--stats-out", "s.safetensors",
                "--batch-size", "1", "-q", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("Error: ") and ":onnxruntime:" not in done.stderr and "\x1b" not in done.stderr
    assert "Reshape" in done.stderr and sorted(os.listdir(tmp_path)) == before
    ok = _cli("select", linear_chain(tmp_path), data, "-o", "m.safetensors", cwd=tmp_path)
    assert ok.returncode == 0 and ":onnxruntime:" not in ok.stderr, ok.stderr


# --------------------------------------------------------------------------- clashing outputs


def test_outputs_that_are_inputs_are_refused_before_any_work(tmp_path):
    model, data = linear_chain(tmp_path), _data(tmp_path / "data")
    stats = tmp_path / "s.safetensors"
    assert invoke("select", model, data, "-o", tmp_path / "m.safetensors", "--stats-out", stats, "-q").exit_code == 0
    os.symlink(model, tmp_path / "link.onnx")
    os.link(data / "x.npy", tmp_path / "hard.npy")
    (tmp_path / "sub").mkdir()
    digests = {p: p.read_bytes() for p in (model, stats, data / "x.npy")}
    before = sorted(os.listdir(tmp_path))
    clashes = [
        (["select", model, data, "-o", tmp_path / "link.onnx"], "MODEL"),
        (["select", model, data, "-o", tmp_path / "sub" / ".." / "chain.onnx"], "MODEL"),
        (["select", tmp_path / "link.onnx", data, "-o", model], "MODEL"),
        (["select", model, data / "x.npy", "-o", tmp_path / "hard.npy"], "DATA"),
        (["select", model, "-o", stats, "--from-stats", stats], "--from-stats"),
        (["select", model, data, "-o", tmp_path / "o", "--stats-out", tmp_path / "sub" / ".." / "o"], "-o"),
        (["select", model, "-o", tmp_path / "o", "--stats-out", stats, "--from-stats", stats], "--from-stats"),
        (["map", stats, "--model", "timm:x", "-o", stats], "MASKS"),
        (["inspect", tmp_path / "m.safetensors", "--stats", stats, "--png", stats], "--stats"),
        (["train", "--model", "timm:x", "--masks", stats, "--train", data, "-o", data], "--train"),
        (["apply-delta", f"hf:{tmp_path / 'sub'}", stats, "-o", tmp_path / "sub"], "hf:DIR"),
    ]
    for args, what in clashes:
        line = assert_one_error(invoke(*args))
        assert "is the same file as" in line and what in line, line
    assert sorted(os.listdir(tmp_path)) == before
    assert all(p.read_bytes() == content for p, content in digests.items())


def test_an_output_that_is_the_models_external_data_is_refused(tmp_path):
    model = tmp_path / "ext.onnx"
    proto = onnx.load(linear_chain(tmp_path))
    onnx.save(proto, model, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data = _data(tmp_path / "data")
    content = (tmp_path / "ext.onnx.data").read_bytes()
    for extra in ([data], ["--method", "magnitude"]):
        line = assert_one_error(invoke("select", model, *extra, "-o", tmp_path / "ext.onnx.data", "-q"))
        assert "external data" in line
    assert (tmp_path / "ext.onnx.data").read_bytes() == content
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
