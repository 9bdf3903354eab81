"""Raw text as calibration data: ``.txt`` and ``.jsonl`` files, tokenized per batch.

* ``.txt``: one sample per line, blank lines skipped;
* ``.jsonl``: one JSON object per line, the sample in field ``text`` (or
  ``DataConfig.text_field``), blank lines skipped.

The tokenizer is the ``tokenizer.json`` that Optimum and onnxruntime-genai
folders ship beside the model, or ``DataConfig.tokenizer`` (a tokenizer.json
file or a folder holding one). Texts are encoded with the tokenizer's special
tokens (its post-processor adds BOS/CLS/...), truncated to
``DataConfig.max_length`` and padded to the longest sequence of each batch; the
pad id only matters through the attention mask. Lines are read lazily and
tokenized one batch at a time, so memory does not grow with the file.

Reading tokenizer.json needs the ``tokenizers`` library only (no
transformers, no PyTorch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import io
import logging
import os
from pathlib import Path
import sys

import numpy as np

from .._io import captured_output
from .._limits import MAX_JSON_CHARS, read_json, whole_number
from ..errors import DataError, FpsError, first_line
from .files import open_data_file

__all__ = [
    "DEFAULT_MAX_LENGTH", "TEXT_SUFFIXES", "TextReader", "find_tokenizer", "load_tokenizer",
    "max_positions", "pad_id", "read_lines", "read_texts", "tokenizer_errors",
]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKENIZER_FILE = "tokenizer.json"
#: Tokens per sample when --max-length is not given (capped at the model's positions).
DEFAULT_MAX_LENGTH = 512
#: The largest tokenizer.json read (real ones are a few MB, the largest vocabularies ~35 MB).
MAX_TOKENIZER_BYTES = 64 << 20
#: Inputs text data provides; ``token_type_ids`` is all zeros.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_POSITION_KEYS = ("max_position_embeddings", "n_positions")


def find_tokenizer(model_path: str | os.PathLike | None, tokenizer: str | os.PathLike | None) -> Path:
    """The tokenizer.json to use: ``tokenizer`` (a file or a folder holding one),
    else the one beside the model."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist")
        return path
    if model_path is not None:
        path = Path(model_path).parent / TOKENIZER_FILE
        if path.is_file():
            return path
        where = f"beside {model_path}"
    else:
        where = "given"
    raise DataError(f"text data needs a tokenizer and none is {where}; "
                    f"pass one with --tokenizer PATH (a {TOKENIZER_FILE} or a folder holding one)")


def max_positions(model_path: str | os.PathLike | None) -> int | None:
    """The longest sequence the model takes, from config.json
    (``max_position_embeddings`` or ``n_positions``) or genai_config.json
    (``model.context_length``) beside it; None when neither says."""
    if model_path is None:
        return None
    folder = Path(model_path).parent
    config = _read_json(folder / "config.json")
    for key in _POSITION_KEYS:
        if isinstance(config.get(key), int):
            return whole_number(config[key], f"{folder / 'config.json'}: {key}", DataError, 1)
    genai = _read_json(folder / "genai_config.json").get("model")
    if isinstance(genai, dict) and isinstance(genai.get("context_length"), int):
        return whole_number(genai["context_length"], f"{folder / 'genai_config.json'}: model.context_length",
                            DataError, 1)
    return None


def _read_json(path: Path) -> dict:
    """The JSON object of a side file beside the model ({} when there is none, or it holds
    no object); read within the limits of :func:`fps_onnx._limits.read_json`."""
    if not os.path.lexists(path):
        return {}
    with open_data_file(path) as handle:  # a FIFO, device or broken link is refused by name
        try:
            data = handle.read(MAX_JSON_CHARS + 1)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    value = read_json(data, str(path), DataError)
    return value if isinstance(value, dict) else {}


class TextReader:
    """Tokenized batches of text files; the tokenizer is loaded once, on the first file."""

    def __init__(self, model_path: str | os.PathLike | None, config) -> None:
        self.model_path = model_path
        self.config = config
        self._tokenizer = None
        self._pad_id = 0

    def _load(self):
        if self._tokenizer is None:
            positions = max_positions(self.model_path)
            length = self.config.max_length
            if length is None:
                length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
            elif positions is not None and length > positions:
                raise DataError(f"--max-length {length} is beyond the model's {positions} positions")
            path = find_tokenizer(self.model_path, self.config.tokenizer)
            self._tokenizer, self._pad_id = load_tokenizer(path, length)
            log.info("tokenizer %s, max length %d, pad id %d", path, length, self._pad_id)
        return self._tokenizer

    def chunks(self, file: Path, inputs: Sequence) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``config.batch_size`` texts of ``file`` as model feeds (the last
        may be smaller, and no more than ``config.max_samples`` texts are read)."""
        names = [s.name for s in inputs]
        if "input_ids" not in names:
            raise DataError(f"{file}: text data needs a model input input_ids; the model expects "
                            f"{', '.join(s.describe() for s in inputs)}")
        extra = [s for s in inputs if s.name not in TEXT_INPUTS]
        if extra:
            raise DataError(f"{file}: text gives input_ids, attention_mask and token_type_ids; "
                            f"the model also expects {extra[0].describe()}")
        tokenizer = self._load()
        limit = self.config.max_samples
        read = 0
        batch: list[tuple[int, str]] = []
        for item in read_texts(file, self.config.text_field):
            batch.append(item)
            read += 1
            if len(batch) == self.config.batch_size or read == limit:
                yield self._encode(file, batch, tokenizer, inputs)
                batch = []
            if read == limit:
                return
        if batch:
            yield self._encode(file, batch, tokenizer, inputs)
        if read == 0:
            raise DataError(f"{file} holds no text (every line is blank)")

    def _encode(self, file, batch, tokenizer, inputs) -> dict[str, np.ndarray]:
        with tokenizer_errors(f"{file}: cannot tokenize lines {batch[0][0]}-{batch[-1][0]}"):
            encodings = tokenizer.encode_batch([t for _, t in batch], add_special_tokens=True)
        lengths = [len(e.ids) for e in encodings]
        if 0 in lengths:
            raise DataError(f"{file}:{batch[lengths.index(0)][0]}: the text gives no tokens")
        ids = np.full((len(batch), max(lengths)), self._pad_id, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=np.int64)
        for row, (encoding, n) in enumerate(zip(encodings, lengths)):
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {s.name: values[s.name].astype(s.dtype, copy=False) for s in inputs}


def load_tokenizer(path: Path, max_length: int):
    """(tokenizers.Tokenizer truncating to ``max_length`` and not padding, pad id)."""
    from tokenizers import Tokenizer

    with open_data_file(path) as handle:  # a FIFO, device or broken link is refused by name
        data = handle.read(MAX_TOKENIZER_BYTES + 1)
    if len(data) > MAX_TOKENIZER_BYTES:
        raise DataError(f"tokenizer {path} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB")
    with tokenizer_errors(f"cannot read tokenizer {path}"):
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        pad_id = _pad_id(tokenizer, path.parent)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer, pad_id


@contextlib.contextmanager
def tokenizer_errors(what: str) -> Iterator[None]:
    """Turn a failure of the Rust ``tokenizers`` library inside the block into
    ``DataError("<what>: <reason>")``: its plain exceptions, and its panics.

    A panic (a tokenizer file whose normalizer data or regex breaks the Rust
    code) reaches Python as ``pyo3_runtime.PanicException``, a BaseException
    that ``except Exception`` misses; PyO3 offers no module to import the class
    from, so it is recognised by its module and name. Nothing else that is not
    an Exception (KeyboardInterrupt, SystemExit) is caught. What the block
    prints is held back (Rust writes a panic's report, with a backtrace, to the
    process's stderr) and shown only when the block succeeds.
    """
    printed: list[str] = []
    try:
        with captured_output(printed):
            yield
    except FpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise DataError(f"{what}: {first_line(exc)}") from exc
    except BaseException as exc:
        if (type(exc).__module__, type(exc).__name__) != ("pyo3_runtime", "PanicException"):
            raise
        raise DataError(f"{what}: the tokenizers library failed on it ({first_line(exc)})") from None
    if any(printed):
        sys.stderr.write("".join(printed))


def pad_id(pad: object, eos: object = None) -> int:
    """The id batches are padded with: the pad token's id, else the EOS token's, else 0
    (each used only if it is a token id, an int >= 0; padding is masked by the attention
    mask, so any id works). Calibration (:class:`TextReader`), causal LM training
    (``fps_onnx.torch.train.lm_data``) and export's example inputs
    (``fps_onnx.torch.models.causal_lm_inputs``) all pad by this rule."""
    for value in (pad, eos):
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def _pad_id(tokenizer, folder: Path) -> int:
    """:func:`pad_id` of tokenizer.json's padding id, else of the pad and eos tokens of
    tokenizer_config.json / special_tokens_map.json beside it."""
    if tokenizer.padding is not None:
        return pad_id(int(tokenizer.padding["pad_id"]))
    files = [_read_json(folder / name) for name in ("tokenizer_config.json", "special_tokens_map.json")]
    return pad_id(*(_token_id(tokenizer, files, key) for key in ("pad_token", "eos_token")))


def _token_id(tokenizer, configs: list[dict], key: str) -> int | None:
    """The id of the token ``configs`` name under ``key`` (the first that the tokenizer knows)."""
    for config in configs:
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token))
    return None


def read_lines(file: Path) -> Iterator[tuple[int, object]]:
    """(line number, content) of every non-blank line of a .txt or .jsonl file, lazily.

    Content: the line without its line break (.txt) or the parsed JSON value (.jsonl).
    DataError for a file that cannot be read, is not UTF-8 or holds a line that is not JSON.
    """
    jsonl = file.suffix.lower() == ".jsonl"
    try:
        with io.TextIOWrapper(open_data_file(file), encoding="utf-8") as handle:
            lines = iter(lambda: handle.readline(MAX_JSON_CHARS + 1), "")
            for number, line in enumerate(lines, 1):
                if len(line) > MAX_JSON_CHARS:
                    raise DataError(f"{file}:{number}: the line is longer than {MAX_JSON_CHARS:,} characters")
                if not line.strip():
                    continue
                if not jsonl:
                    yield number, line.rstrip("\r\n")
                    continue
                yield number, read_json(line, f"{file}:{number}: the line", DataError)
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {file}: {exc}") from exc


def read_texts(file: Path, field: str = "text") -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a .txt or .jsonl file, lazily."""
    jsonl = file.suffix.lower() == ".jsonl"
    for number, content in read_lines(file):
        if not jsonl:
            yield number, content
            continue
        text = content.get(field) if isinstance(content, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{file}:{number}: no text field {field!r} "
                            "(name another with --text-field NAME)")
        if text.strip():
            yield number, text
