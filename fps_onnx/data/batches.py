"""Calibration batches: data files found, read in order, and cut into batches.

Only one batch (plus one block of rows of a file) is held at a time, so memory
does not grow with the number of samples or files. Where each batch ends is
decided from the chunks' lengths and shapes alone; an image is decoded only
when its batch is assembled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
import functools
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..onnx.inputs import InputSpec
from . import images
from .arrays import ARRAY_SUFFIXES, fit, read_npy, read_npz
from .config import DataConfig
from .files import is_data_file
from .images import IMAGE_SUFFIXES
from .text import TEXT_SUFFIXES, TextReader

__all__ = ["find_files", "iter_batches"]


def find_files(path: str | os.PathLike) -> list[Path]:
    """The data files under ``path`` (or ``path`` itself), sorted."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if not path.is_dir():
        if path.suffix.lower() not in (*ARRAY_SUFFIXES, *IMAGE_SUFFIXES, *TEXT_SUFFIXES):
            raise DataError(f"{path}: unknown data file type (use .npy, .npz, images, .txt or .jsonl)")
        is_data_file(path)  # a device, FIFO or socket is refused
        return [path]
    suffixes = (*ARRAY_SUFFIXES, *IMAGE_SUFFIXES, *TEXT_SUFFIXES)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and is_data_file(p))
    if any(p.suffix.lower() not in TEXT_SUFFIXES for p in files):
        files = [p for p in files if p.suffix.lower() not in TEXT_SUFFIXES]
    if not files:
        raise DataError(f"no .npy, .npz or image files under {path}, nor .txt or .jsonl text")
    return files


def iter_batches(
    path: str | os.PathLike, inputs: Sequence[InputSpec], config: DataConfig = DataConfig(),
    model_path: str | os.PathLike | None = None, *, skip: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``config.batch_size`` samples (the last may be smaller), as model feeds.

    ``model_path`` locates what text data needs beside the model (its
    tokenizer.json and config.json). With ``config.shard = (K, N)`` only batches
    K, K+N, K+2N, ... of the unsharded sequence are assembled and yielded; a
    shard that gets none is a DataError. ``skip``: the first ``skip`` of the
    batches this would yield are passed over without being assembled (a
    resumed calibration's; images in them are not decoded).
    """
    dtypes = {s.name: s.dtype for s in inputs}
    k, n = config.shard or (0, 1)
    cut = 0
    got = 0
    for pieces in _cut(_chunks(find_files(path), inputs, config, TextReader(model_path, config)), config):
        if cut % n == k:
            got += 1
            if got > skip:
                yield _concat([_rows(chunk, start, stop) for chunk, start, stop in pieces], dtypes)
        cut += 1
    if config.shard is not None and not got:
        raise DataError(f"shard {k}/{n} gets no batch: {path} makes {cut} batch{'es' * (cut != 1)} "
                        f"of --batch-size {config.batch_size} and batch b goes to shard b mod {n}; "
                        "use fewer shards or a smaller --batch-size")


@dataclass(frozen=True)
class _Deferred:
    """One sample not read yet (an image): stand-ins of its arrays, and how to read them."""

    like: dict[str, np.ndarray]
    read: Callable[[], dict[str, np.ndarray]]


_Chunk = dict[str, np.ndarray] | _Deferred  # rows read, or an image to decode


def _cut(chunks: Iterator[_Chunk], config: DataConfig) -> Iterator[list[tuple[_Chunk, int, int]]]:
    """The batches, as lists of (chunk, start, stop) row ranges: where each batch
    ends is decided from the chunks' lengths and shapes alone, nothing is read."""
    remaining = config.max_samples
    buffer: list[tuple[_Chunk, int, int]] = []
    held = 0
    for chunk in chunks:
        if buffer and not _same_shapes(buffer[0][0], chunk):
            yield buffer  # e.g. another sequence length: never mix in one batch
            buffer, held = [], 0
        n = _length(chunk)
        start = 0
        while start < n:
            if remaining is not None and remaining <= 0:
                break
            take = min(n - start, config.batch_size - held)
            if remaining is not None:
                take = min(take, remaining)
                remaining -= take
            buffer.append((chunk, start, start + take))
            held += take
            start += take
            if held == config.batch_size:
                yield buffer
                buffer, held = [], 0
        if remaining is not None and remaining <= 0:
            break
    if buffer:
        yield buffer


def _arrays(chunk: _Chunk) -> Mapping[str, np.ndarray]:
    return chunk.like if isinstance(chunk, _Deferred) else chunk


def _rows(chunk: _Chunk, start: int, stop: int) -> dict[str, np.ndarray]:
    data = chunk.read() if isinstance(chunk, _Deferred) else chunk
    return {k: v[start:stop] for k, v in data.items()}


def _length(chunk: _Chunk) -> int:
    return len(next(iter(_arrays(chunk).values())))


def _same_shapes(a: _Chunk, b: _Chunk) -> bool:
    a, b = _arrays(a), _arrays(b)
    return all(a[k].shape[1:] == b[k].shape[1:] for k in a)


def _concat(parts: list[dict[str, np.ndarray]], dtypes) -> dict[str, np.ndarray]:
    """One batch, contiguous and in the model's dtypes (only the batch is copied)."""
    if len(parts) == 1:
        return {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in parts[0].items()}
    return {k: np.concatenate([p[k] for p in parts]).astype(dtypes[k], copy=False)
            for k in parts[0]}


def _chunks(files, inputs, config, text: TextReader) -> Iterator[_Chunk]:
    for file in files:
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            for chunk in text.chunks(file, inputs):  # one chunk per batch
                yield {spec.name: fit(file, spec, chunk[spec.name]) for spec in inputs}
            continue
        if suffix == ".npy":
            chunks = read_npy(file, inputs, config)
        elif suffix == ".npz":
            chunks = read_npz(file, inputs, config)
        else:
            like = images.check_image_input(file, inputs, config)  # decoded only when its batch is assembled
            yield _Deferred({inputs[0].name: like}, functools.partial(images.read_image, file, inputs[0], config))
            continue
        for chunk in chunks:
            yield {spec.name: fit(file, spec, chunk[spec.name]) for spec in inputs}
