"""Causal language modelling data: text or token files, tokenized once, padded per batch.

* ``.txt``: one sample per line, blank lines skipped;
* ``.jsonl``: one JSON object per line, either ``{"text": ...}`` (the loss on
  every token) or ``{"prompt": ..., "completion": ...}`` (the loss on the
  completion's tokens only);
* ``.npz``: ``input_ids`` [N, L] and optionally ``attention_mask`` [N, L]
  (1 = real token) and ``labels`` [N, L] (-100 = no loss; unshifted, as
  transformers takes them). Each row keeps its real tokens, in order.

Text is tokenized with the model folder's tokenizer (``AutoTokenizer``, local
files only) with its special tokens; each sample ends with the EOS token
(unless the tokenizer adds it itself) so that the model learns where a sample
ends, then is cut to ``max_length`` tokens. A prompt is tokenized with the
special tokens, its completion without them, and the two are joined, so the
prompt/completion boundary is exact. Batches are right-padded to their longest
sample; padding (and the prompt) is -100 in the labels.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import os
from pathlib import Path

import numpy as np

from ...data import load_npz, text
from ...data.text import read_lines, tokenizer_errors
from ...errors import DataError
from .. import hf
from ._torch import torch

__all__ = ["Collate", "IGNORE", "SUFFIXES", "TokenSet", "load_tokenizer", "model_max_length", "open_lm_split",
           "pad_id"]

log = logging.getLogger(__name__)

IGNORE = -100
SUFFIXES = (".txt", ".jsonl", ".npz")


class TokenSet(torch.utils.data.Dataset):
    """Samples of one split: (input ids, labels) as int64 arrays of equal length."""

    def __init__(self, path: Path, samples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.path = path
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.samples[i]

    def predicted_tokens(self) -> int:
        """Tokens the loss is computed on: labels other than -100 after the first position."""
        return sum(int((labels[1:] != IGNORE).sum()) for _, labels in self.samples)


@dataclass(frozen=True)
class Collate:
    """Right-pads a list of samples into ``input_ids``, ``attention_mask`` and ``labels``."""

    pad_id: int

    def __call__(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in samples)
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.int64)
        mask = torch.zeros((len(samples), width), dtype=torch.int64)
        for row, (x, y) in enumerate(samples):
            ids[row, : len(x)] = torch.from_numpy(x)
            labels[row, : len(y)] = torch.from_numpy(y)
            mask[row, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_tokenizer(folder: str | os.PathLike):
    """The model folder's tokenizer (transformers ``AutoTokenizer``, local files only)."""
    with tokenizer_errors(f"cannot load the tokenizer of {folder}"):
        return hf.load_tokenizer(folder)


def pad_id(tokenizer) -> int:
    """The id to pad with: :func:`fps_onnx.data.text.pad_id` of the tokenizer's pad and EOS tokens."""
    return text.pad_id(tokenizer.pad_token_id, tokenizer.eos_token_id)


def model_max_length(model, wanted: int) -> int:
    """Tokens per sample: ``wanted``, capped at the model's positions (its config's
    ``max_position_embeddings`` or ``n_positions``, where it has one)."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(wanted, positions) if isinstance(positions, int) else wanted


def open_lm_split(path: str | os.PathLike, tokenizer, max_length: int, vocab_size: int) -> TokenSet:
    """One split of causal LM data (see the module docstring); DataError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists()
                        else f"{path}: causal LM data is a .txt, .jsonl or .npz file, not a folder")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: causal LM data is a .txt, .jsonl or .npz file")
    if suffix == ".npz":
        samples = _npz_samples(path, max_length, vocab_size)
    else:
        samples = _text_samples(path, tokenizer, max_length)
    dataset = TokenSet(path, samples)
    if dataset.predicted_tokens() == 0:
        raise DataError(f"{path} has no tokens to predict after tokenization "
                        "(every sample is empty, a single token, or a prompt alone)")
    return dataset


def _records(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, prompt or text, completion or None) of every non-blank line."""
    jsonl = path.suffix.lower() == ".jsonl"
    records = []
    for number, record in read_lines(path):
        if not jsonl:
            records.append((number, record, None))
            continue
        if isinstance(record, dict) and "prompt" in record and "completion" in record:
            prompt, completion = record["prompt"], record["completion"]
        elif isinstance(record, dict) and "text" in record:
            prompt, completion = record["text"], None
        else:
            raise DataError(f"{path}:{number}: expected an object with 'text', "
                            "or 'prompt' and 'completion'")
        if not isinstance(prompt, str) or not isinstance(completion, (str, type(None))):
            raise DataError(f"{path}:{number}: 'text', 'prompt' and 'completion' must be strings")
        records.append((number, prompt, completion))
    if not records:
        raise DataError(f"{path} holds no text (every line is blank)")
    return records


def _encode(tokenizer, texts: list[str], special: bool, path: Path) -> list[list[int]]:
    if not texts:
        return []
    with tokenizer_errors(f"{path}: cannot tokenize the text"):
        return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _text_samples(path: Path, tokenizer, max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    records = _records(path)
    firsts = _encode(tokenizer, [r[1] for r in records], True, path)
    completions = [r for r in records if r[2] is not None]
    seconds = iter(_encode(tokenizer, [r[2] for r in completions], False, path))
    eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None
    samples = []
    for (_, _, completion), first in zip(records, firsts):
        ids = list(first)
        labels = list(first)
        if completion is not None:
            second = list(next(seconds))
            labels = [IGNORE] * len(ids) + second
            ids += second
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        ids, labels = ids[:max_length], labels[:max_length]
        if ids:
            samples.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return samples


def _npz_samples(path: Path, max_length: int, vocab_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    arrays = load_npz(path)
    if "input_ids" not in arrays:
        raise DataError(f"{path} has no array 'input_ids' (it holds {sorted(arrays)})")
    ids = arrays["input_ids"]
    mask = arrays.get("attention_mask", np.ones_like(ids))
    labels = arrays.get("labels")
    for name, array in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
        if array is None:
            continue
        if array.dtype.kind not in "iub" or array.ndim != 2 or array.shape != ids.shape:
            raise DataError(f"{path}: {name} must be an integer array [N, L] like input_ids "
                            f"{list(ids.shape)}, not {array.dtype} {list(array.shape)}")
    ids = ids.astype(np.int64)
    real = mask.astype(bool)
    if real.any() and (ids[real].min() < 0 or ids[real].max() >= vocab_size):
        raise DataError(f"{path}: input_ids must lie in [0, {vocab_size}), the model's vocabulary")
    if labels is None:
        labels = np.where(real, ids, IGNORE)
    else:
        labels = labels.astype(np.int64)
        bad = (labels != IGNORE) & ((labels < 0) | (labels >= vocab_size))
        if bad.any():
            raise DataError(f"{path}: labels must be -100 or lie in [0, {vocab_size})")
    samples = []
    for row in range(len(ids)):
        keep = real[row]
        if keep.any():
            samples.append((ids[row][keep][:max_length].copy(), labels[row][keep][:max_length].copy()))
    return samples
