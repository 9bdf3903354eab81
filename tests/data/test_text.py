"""Raw text as calibration data: .txt/.jsonl, tokenized with the model's tokenizer.json."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _cli import assert_one_error, invoke
from _models import save_tokenizer, tiny_lm
from fps_onnx.data import DataConfig, find_files, iter_batches
from fps_onnx.data.text import find_tokenizer, max_positions, pad_id
from fps_onnx.errors import DataError
from fps_onnx.onnx.inputs import InputSpec
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.stats import Stats

IDS = InputSpec("input_ids", ("N", "S"), np.dtype(np.int64))
MASK = InputSpec("attention_mask", ("N", "S"), np.dtype(np.int64))
TYPES = InputSpec("token_type_ids", ("N", "S"), np.dtype(np.int64))
LINES = ["the cat sat", "", "cat", "the cat sat on the mat", "   ", "mat dog"]
# BOS, then word ids ("dog" is unknown)
TOKENS = [[2, 3, 4, 5], [2, 4], [2, 3, 4, 5, 6, 3, 7], [2, 7, 1]]


def batches(path, inputs=(IDS, MASK), model=None, **config):
    return list(iter_batches(path, list(inputs), DataConfig(**config), model))


def test_txt_lines_are_tokenized_with_bos_and_padded_to_each_batch_longest(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("\n".join(LINES) + "\n")
    got = batches(tmp_path / "a.txt", batch_size=2, tokenizer=str(tok))
    assert [b["input_ids"].shape for b in got] == [(2, 4), (2, 7)]
    for batch, rows in zip(got, (TOKENS[:2], TOKENS[2:])):
        assert batch["input_ids"].dtype == np.int64 and batch["attention_mask"].dtype == np.int64
        for row, tokens in enumerate(rows):
            n = len(tokens)
            assert batch["input_ids"][row, :n].tolist() == tokens
            assert (batch["input_ids"][row, n:] == 0).all()  # [PAD]
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)


def test_jsonl_text_field_dtype_and_zero_token_type_ids(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    records = [{"body": "the cat", "id": 1}, {"body": "mat"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    ids32 = InputSpec("input_ids", ("N", "S"), np.dtype(np.int32))
    (batch,) = batches(tmp_path / "a.jsonl", (ids32, MASK, TYPES), tokenizer=str(tmp_path / "tok"),
                       text_field="body")
    assert batch["input_ids"].dtype == np.int32
    assert batch["input_ids"].tolist() == [[2, 3, 4], [2, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].shape == (2, 3) and not batch["token_type_ids"].any()
    assert find_tokenizer(None, tok) == tok


def test_max_length_truncates_counting_the_bos(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("the cat sat on the mat\ncat\n")
    (batch,) = batches(tmp_path / "a.txt", tokenizer=str(tok), max_length=3)
    assert batch["input_ids"].tolist() == [[2, 3, 4], [2, 4, 0]]


def test_max_samples_stops_reading_and_pads_to_what_was_read(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("cat\nthe cat\nthe cat sat on the mat\n")
    (batch,) = batches(tmp_path / "a.txt", tokenizer=str(tok), max_samples=2)
    assert batch["input_ids"].tolist() == [[2, 4, 0], [2, 3, 4]]


def test_pad_id_from_tokenizer_json_then_tokenizer_config_then_eos(tmp_path):
    (tmp_path / "a.txt").write_text("cat\nthe cat\n")
    folder = tmp_path / "m"
    save_tokenizer(folder, padding=7)
    assert batches(tmp_path / "a.txt", model=folder / "model.onnx")[0]["input_ids"][0].tolist() == [2, 4, 7]
    save_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "sat"}}))
    assert batches(tmp_path / "a.txt", model=folder / "model.onnx")[0]["input_ids"][0].tolist() == [2, 4, 5]
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": None}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))
    assert batches(tmp_path / "a.txt", model=folder / "model.onnx")[0]["input_ids"][0].tolist() == [2, 4, 8]


@pytest.mark.parametrize("pad, eos, expected", [
    (7, 3, 7), (0, 3, 0), (None, 3, 3), (-1, 3, 3), (None, None, 0), (-1, [2], 0), ("7", None, 0),
])
def test_pad_id_is_the_pad_token_else_eos_else_zero(pad, eos, expected):
    assert pad_id(pad, eos) == expected


def test_text_files_in_a_folder_unless_it_holds_other_data(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "cat"}\n')
    (tmp_path / "a.txt").write_text("cat\n")
    assert [p.name for p in find_files(tmp_path)] == ["a.txt", "b.jsonl"]
    np.save(tmp_path / "x.npy", np.zeros((1, 2)))
    assert [p.name for p in find_files(tmp_path)] == ["x.npy"]  # a labels.txt beside data is not data


def test_max_positions_from_config_or_genai_config(tmp_path):
    model = tmp_path / "model.onnx"
    assert max_positions(model) is None
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 128}}))
    assert max_positions(model) == 128
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 64}))
    assert max_positions(model) == 64


def test_text_needs_input_ids_and_nothing_else(tmp_path):
    tok = save_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("cat\n")
    with pytest.raises(DataError, match="needs a model input input_ids"):
        batches(tmp_path / "a.txt", [InputSpec("x", ("N", 3), np.dtype(np.float32))], tokenizer=str(tok))
    with pytest.raises(DataError, match=r"also expects position_ids \[N, S\] int64"):
        batches(tmp_path / "a.txt", [IDS, MASK, InputSpec("position_ids", ("N", "S"), np.dtype(np.int64))],
                tokenizer=str(tok))


# --------------------------------------------------------------------------- CLI


def test_cli_text_selection_equals_the_same_tokens_as_npz(tmp_path):
    model = tiny_lm(tmp_path / "m")
    (tmp_path / "a.txt").write_text("\n".join(LINES) + "\n")
    text = invoke("select", model, tmp_path / "a.txt", "-o", tmp_path / "t.safetensors", "--stats-out",
                  tmp_path / "t.stats", "--batch-size", "3", "--json", "-q")
    assert text.exit_code == 0, text.output
    assert json.loads(text.stdout)["samples"] == 4
    # the same four sequences, padded once to 7 tokens, as one .npz
    ids = np.zeros((4, 7), np.int64)
    for row, tokens in enumerate(TOKENS):
        ids[row, : len(tokens)] = tokens
    np.savez(tmp_path / "a.npz", input_ids=ids, attention_mask=(np.arange(7) < np.array([4, 2, 7, 3])[:, None]))
    arrays = invoke("select", model, tmp_path / "a.npz", "-o", tmp_path / "n.safetensors", "--stats-out",
                    tmp_path / "n.stats", "-q")
    assert arrays.exit_code == 0, arrays.output
    a, b = Stats.load(tmp_path / "t.stats"), Stats.load(tmp_path / "n.stats")
    assert sorted(a.weights) == ["w1", "w2"] and a.weights["w1"].count == 16  # unpadded tokens
    for key in a.weights:
        np.testing.assert_allclose(a.weights[key].abs_sum, b.weights[key].abs_sum, rtol=1e-6)
        assert a.weights[key].count == b.weights[key].count
    t, n = MaskFile.load(tmp_path / "t.safetensors"), MaskFile.load(tmp_path / "n.safetensors")
    assert all(np.array_equal(t.masks[k], n.masks[k]) for k in n.masks)


def test_cli_jsonl_with_text_field_tokenizer_and_token_type_ids(tmp_path):
    model = tiny_lm(tmp_path / "m", with_types=True)
    (model.parent / "tokenizer.json").unlink()
    save_tokenizer(tmp_path / "tok")
    (tmp_path / "a.jsonl").write_text('{"t": "the cat"}\n{"t": "mat"}\n')
    result = invoke("select", model, tmp_path / "a.jsonl", "-o", tmp_path / "o.safetensors", "--text-field", "t",
                    "--tokenizer", tmp_path / "tok", "--max-length", "2", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 2


BAD = {
    "empty": ("a.txt", "\n  \n\n", (), r"a.txt holds no text \(every line is blank\)"),
    "not json": ("a.jsonl", '{"text": "cat"}\n\n{"text": \n', (), r"a.jsonl:3: the line is not JSON"),
    "no field": ("a.jsonl", '{"text": "cat"}\n{"body": "cat"}\n', (), r"a.jsonl:2: no text field 'text' \(name another with --text-field NAME\)"),
    "field type": ("a.jsonl", '{"body": 3}\n', ("--text-field", "body"), r"a.jsonl:1: no text field 'body'"),
    "max length 0": ("a.txt", "cat\n", ("--max-length", "0"), "--max-length must be a whole number from 1 to 16,777,216, not 0"),
    "max length 2^64": ("a.txt", "cat\n", ("--max-length", str(2**64)), "--max-length must be a whole number from 1 to 16,777,216, not 18446744073709551616"),
    "json nested 10k deep": ("a.jsonl", '{"text": "cat"}\n' + "[" * 10_000 + "]" * 10_000 + "\n", (),
                             r"a.jsonl:2: the line nests arrays and objects deeper than 100 levels"),
    "json nested 100k deep, unclosed": ("a.jsonl", "{\"a\": " * 100_000 + "\n", (),
                                        r"a.jsonl:1: the line nests arrays and objects deeper than 100 levels"),
    "json of 5,000 digits": ("a.jsonl", '{"text": "cat", "n": ' + "7" * 5000 + "}\n", (),
                             r"a.jsonl:1: the line holds an integer of 5,000 digits \(at most 40\)"),
    "json NaN": ("a.jsonl", '{"text": "cat", "n": NaN}\n', (), r"a.jsonl:1: the line holds NaN, which is not"),
    "json 1e999": ("a.jsonl", '{"text": "cat", "n": -1e999}\n', (), r"a.jsonl:1: the line holds a number beyond"),
}


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_text_is_one_line_and_no_output(tmp_path, case):
    name, content, extra, message = BAD[case]
    model = tiny_lm(tmp_path / "m")
    (tmp_path / name).write_text(content)
    out = tmp_path / "o.safetensors"
    result = invoke("select", model, tmp_path / name, "-o", out, "-q", *extra)
    assert_one_error(result, message, absent=[out])


def bad_setup(case, folder):
    """Break the model folder of ``tiny_lm`` as ``case`` says; extra CLI arguments."""
    if case == "no tokenizer":
        (folder / "tokenizer.json").unlink()
        return (), r"none is beside .*model.onnx; pass one with --tokenizer PATH"
    if case == "missing --tokenizer":
        return ("--tokenizer", folder / "nope"), r"tokenizer .*/nope does not exist"
    if case == "--tokenizer folder without one":
        (folder / "empty").mkdir()
        return ("--tokenizer", folder / "empty"), r"tokenizer .*/empty/tokenizer.json does not exist"
    if case == "unreadable tokenizer":
        (folder / "tokenizer.json").write_text('{"model": ')
        return (), r"cannot read tokenizer .*tokenizer.json: "
    if case.startswith("panicking tokenizer"):
        # a malformed normalizer table makes the Rust code panic (PanicException, a BaseException)
        # as the file is read, or only when it normalizes text
        table = b"\xff\xff\xff\x7f" + bytes(8) if case.endswith("read") else b"\x08\0\0\0" + b"\xff" * 8 + b"abc"
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(table).decode()}
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        what = "cannot read tokenizer .*tokenizer.json" if case.endswith("read") else "a.txt: cannot tokenize lines 1-1"
        return (), what + ": the tokenizers library failed on it"
    if case == "beyond positions":
        (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 16}))
        return ("--max-length", "17"), "--max-length 17 is beyond the model's 16 positions"
    if case == "beyond context":
        (folder / "genai_config.json").write_text(json.dumps({"model": {"context_length": 8}}))
        return ("--max-length", "9"), "--max-length 9 is beyond the model's 8 positions"
    if case == "config.json nested 100k deep":
        (folder / "config.json").write_text("[" * 100_000)
        return (), r"config.json nests arrays and objects deeper than 100 levels"
    if case == "config.json with a 5,000-digit length":
        (folder / "config.json").write_text('{"max_position_embeddings": ' + "1" * 5000 + "}")
        return (), r"config.json holds an integer of 5,000 digits"
    if case == "config.json with a negative length":
        (folder / "config.json").write_text('{"n_positions": -3}')
        return (), r"config.json: n_positions must be a whole number from 1 to 9,223,372,036,854,775,807, not -3"
    if case == "config.json past int64":
        (folder / "config.json").write_text('{"n_positions": ' + str(2**64) + "}")
        return (), r"config.json: n_positions must be a whole number from 1 to .*, not 18446744073709551616"
    if case == "genai_config.json nested 10k deep":
        (folder / "genai_config.json").write_text('{"model": ' + '{"a": ' * 10_000 + "1" + "}" * 10_001)
        return (), r"genai_config.json nests arrays and objects deeper than 100 levels"
    if case == "config.json too large":
        (folder / "config.json").write_text('{"a": "' + "x" * (16 << 20) + '"}')
        return (), r"config.json is larger than 16,777,216 characters"
    if case == "config.json is a FIFO":
        os.mkfifo(folder / "config.json")
        return (), r"config.json is a FIFO, not a regular file"
    if case in ("tokenizer_config.json nested 100k deep", "special_tokens_map.json with 5,000 digits"):
        save_tokenizer(folder)  # no padding: the pad token is looked up in the side files
        name = case.split()[0]
        (folder / name).write_text("[" * 100_000 + "]" * 100_000 if "deep" in case
                                   else '{"pad_token": ' + "9" * 5000 + "}")
        return (), name.replace(".", r"\.") + (" nests arrays" if "deep" in case else " holds an integer of 5,000")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no tokenizer", "missing --tokenizer", "--tokenizer folder without one",
                                  "unreadable tokenizer", "panicking tokenizer read", "panicking tokenizer run",
                                  "beyond positions", "beyond context",
                                  "config.json nested 100k deep", "config.json with a 5,000-digit length",
                                  "config.json with a negative length", "config.json past int64",
                                  "genai_config.json nested 10k deep", "config.json too large",
                                  "config.json is a FIFO", "tokenizer_config.json nested 100k deep",
                                  "special_tokens_map.json with 5,000 digits"])
def test_cli_bad_tokenizer_or_length_is_one_line_and_no_output(tmp_path, case):
    model = tiny_lm(tmp_path / "m")
    extra, message = bad_setup(case, model.parent)
    (tmp_path / "a.txt").write_text("cat\n")
    out = tmp_path / "o.safetensors"
    result = invoke("select", model, tmp_path / "a.txt", "-o", out, "-q", *extra)
    assert_one_error(result, message, absent=[out])


def test_a_tokenizer_panic_is_one_line_on_the_real_stderr(tmp_path):
    """Rust prints a panic's report (with a backtrace) to file descriptor 2, which
    CliRunner does not see: run the command in its own process."""
    model = tiny_lm(tmp_path / "m")
    bad_setup("panicking tokenizer run", model.parent)
    (tmp_path / "a.txt").write_text("cat\n")
    out = tmp_path / "o.safetensors"
    code = "import sys; from fps_onnx.cli.main import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "select", str(model), str(tmp_path / "a.txt"), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RUST_BACKTRACE": "1"})
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and "the tokenizers library failed on it" in lines[-1], done.stderr
    assert sum(line.startswith("Error: ") for line in lines) == 1
    assert not any("panicked" in line or "backtrace" in line for line in lines), done.stderr
    assert not out.exists()


def test_positions_within_the_model_pass(tmp_path):
    model = tiny_lm(tmp_path / "m")
    (model.parent / "config.json").write_text(json.dumps({"max_position_embeddings": 16}))
    (tmp_path / "a.txt").write_text("cat\n")
    out = tmp_path / "o.safetensors"
    result = invoke("select", model, tmp_path / "a.txt", "-o", out, "--max-length", "16", "--json")
    assert result.exit_code == 0, result.output
    assert "max length 16" in result.stderr  # all 16 of the model's positions, not cut below
    summary = json.loads(result.stdout)
    assert summary["samples"] == 1 and summary["output"] == str(out)
    assert {k: v["selected"] for k, v in summary["tensors"].items()} == {"w1": 5, "w2": 4}  # one per neuron
    assert MaskFile.load(out).meta["num_samples"] == "1"


@pytest.mark.slow
def test_text_on_an_exported_bert_matches_its_npz(tmp_path):
    """A real token model: text tokenized here gives the statistics of the same ids as .npz."""
    import torch

    from _models import TOKEN_INPUTS, export, tiny_bert

    folder = tmp_path / "bert"
    folder.mkdir()
    example = (torch.randint(0, 9, (2, 5)), torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    model = export(tiny_bert(), example, folder / "model.onnx", TOKEN_INPUTS,
                   {n: {0: "batch", 1: "sequence"} for n in TOKEN_INPUTS})
    save_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    (tmp_path / "a.txt").write_text("\n".join(LINES) + "\n")
    assert invoke("select", model, tmp_path / "a.txt", "-o", tmp_path / "t.m", "--stats-out", tmp_path / "t.s",
                  "--max-length", "64", "-q").exit_code == 0
    ids = np.zeros((4, 7), np.int64)
    for row, tokens in enumerate(TOKENS):
        ids[row, : len(tokens)] = tokens
    np.savez(tmp_path / "a.npz", input_ids=ids, attention_mask=(ids > 0).astype(np.int64))
    assert invoke("select", model, tmp_path / "a.npz", "-o", tmp_path / "n.m", "--stats-out", tmp_path / "n.s",
                  "-q").exit_code == 0
    a, b = Stats.load(tmp_path / "t.s"), Stats.load(tmp_path / "n.s")
    assert len(a.weights) == 12
    for key in a.weights:
        np.testing.assert_allclose(a.weights[key].abs_sum, b.weights[key].abs_sum, rtol=1e-4)


def test_default_max_length_is_capped_at_the_model_positions(tmp_path):
    """Without --max-length, samples are cut at min(512, the model's positions) and the
    model's limit is not an error; given explicitly beyond it, it is."""
    import json

    from fps_onnx.data import DataConfig
    from fps_onnx.data.text import TextReader

    model = tiny_lm(tmp_path / "lm")
    save_tokenizer(model.parent)
    (model.parent / "config.json").write_text(json.dumps({"max_position_embeddings": 3}))
    text = tmp_path / "a.txt"
    text.write_text("the cat sat on the mat the cat\n")
    reader = TextReader(model, DataConfig())
    assert reader._load().truncation["max_length"] == 3
    with pytest.raises(DataError, match="beyond the model's 3 positions"):
        TextReader(model, DataConfig(max_length=4))._load()


@pytest.mark.parametrize("case", ["too large", "a FIFO", "not UTF-8"])
def test_a_tokenizer_file_is_read_within_bounds(tmp_path, monkeypatch, case):
    """tokenizer.json is read as a regular file of bounded size before the Rust library parses it."""
    model = tiny_lm(tmp_path / "m")
    tok = model.parent / "tokenizer.json"
    (tmp_path / "a.txt").write_text("\n".join(LINES) + "\n")
    if case == "too large":
        monkeypatch.setattr("fps_onnx.data.text.MAX_TOKENIZER_BYTES", tok.stat().st_size - 1)
        message = r"tokenizer .*tokenizer.json is larger than"
    elif case == "a FIFO":
        tok.unlink()
        os.mkfifo(tok)
        message = r"needs a tokenizer and none is beside"  # never opened, so never waited on
    else:
        tok.write_bytes(b"\xff\xfe" + tok.read_bytes())
        message = r"cannot read tokenizer .*tokenizer.json"
    out = tmp_path / "o.safetensors"
    assert_one_error(invoke("select", model, tmp_path / "a.txt", "-o", out, "-q"), message, absent=[out])
