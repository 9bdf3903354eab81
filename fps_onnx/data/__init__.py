"""Calibration data readers: folders or single files, streamed and re-batched.

* ``.npy``: samples stacked on axis 0, for a model with one input (memory-mapped);
* ``.npz``: arrays keyed by the model's input names (``input_ids``,
  ``attention_mask``, ...); a missing ``token_type_ids`` is filled with zeros;
* images (jpg, jpeg, png, webp, bmp; found recursively, so an ImageFolder tree
  works): decoded with Pillow, resized and centre-cropped to the model's input
  size, scaled to [0, 1] and normalised with ``mean``/``std``;
* raw text (``.txt``, ``.jsonl``; see :mod:`fps_onnx.text`), tokenized with the
  model's tokenizer.json; in a folder, text files are read only when it holds
  no array or image file (an ImageFolder tree may carry a labels.txt).

Only one batch (plus one block of rows of a file) is held at a time, so memory
does not grow with the number of samples or files; ``.npz`` members are
decompressed only as far as the rows read (``max_samples`` stops early), and a
Fortran-ordered member, whose rows run across all of it, is gathered in
passes that hold only the rows asked (see :class:`_MemberRows`).

Sharding (``DataConfig.shard = (K, N)``, ``--shard K/N``): the batches are cut
exactly as without it, and batch ``b`` goes to shard ``b % N`` (K counts from
0), so N shards partition the batches of one run with the same ``batch_size``
and ``max_samples``. Another shard's batches are never assembled, and its
images never decoded (array rows are sliced or streamed past, text is still
tokenized, as padding decides where batches end).

Data may be untrusted: only regular files are read (a symbolic link to one is
fine; a device, FIFO or socket is refused by name); ``.npy`` headers are checked
against the bytes that follow before anything is mapped or read, object arrays
are never unpickled; images are decoded only as JPEG, PNG, WebP or BMP, and one
whose declared size (or size once resized) exceeds ``max_image_pixels``
(8192x8192 by default; Pillow's own decompression-bomb limit applies too) is
refused before it is decoded. Every failure is one ``DataError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
import functools
import math
import os
from pathlib import Path
import re
import warnings
import zipfile

import numpy as np

from .. import _limits as limits
from ..errors import DataError, FpsError, first_line
from ..onnx.inputs import InputSpec
from .files import is_data_file, open_data_file
from .text import TEXT_SUFFIXES, TextReader

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # what Pillow may decode them as
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
ZERO_FILLED = ("token_type_ids",)

@dataclass(frozen=True)
class DataConfig:
    """How calibration data is read and batched."""

    batch_size: int = 32
    max_samples: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    max_image_pixels: int = 8192 * 8192  # larger images (declared size, or once resized) are refused
    max_length: int | None = None  # text: tokens per sample, longer ones truncated; None: see below
    text_field: str = "text"  # .jsonl: the field holding the text
    tokenizer: str | None = None  # text: tokenizer.json (or its folder); None: beside the model
    shard: tuple[int, int] | None = None  # (K, N): batches K, K+N, K+2N, ...; "K/N" is parsed

    def __post_init__(self) -> None:
        if self.shard is not None:
            object.__setattr__(self, "shard", parse_shard(self.shard))
        if self.batch_size < 1:
            raise DataError(f"batch size must be at least 1, not {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise DataError(f"max samples must be at least 1, not {self.max_samples}")
        if self.image_size is not None and self.image_size < 1:
            raise DataError(f"image size must be at least 1, not {self.image_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise DataError(f"crop fraction must be in (0, 1], not {self.crop_pct}")
        if self.max_image_pixels < 1:
            raise DataError(f"max image pixels must be at least 1, not {self.max_image_pixels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise DataError(f"image {name} must be numbers, not {values!r}") from None
            if not values or not all(math.isfinite(v) for v in values):
                raise DataError(f"image {name} must be finite numbers, not {list(values)}")
            object.__setattr__(self, name, values)
        if not all(v > 0 for v in self.std):
            raise DataError(f"image std must be above 0, not {list(self.std)}")
        if self.max_length is not None and self.max_length < 1:
            raise DataError(f"--max-length must be at least 1, not {self.max_length}")


def parse_shard(value: str | Sequence[int]) -> tuple[int, int]:
    """(K, N) from "K/N" or a pair: shard K (counted from 0) of N, N at most
    :data:`~fps_onnx._limits.MAX_SHARDS` (what a stats file may say); DataError if it is not one."""
    if isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", value)
        pair = (found[1], found[2]) if found else None
    else:
        pair = tuple(value) if isinstance(value, (tuple, list)) else None
        if pair is not None and (len(pair) != 2 or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair)):
            pair = None
    if pair is None:
        raise DataError(f"--shard must be K/N, two whole numbers (shard K of N, K counted from 0), "
                        f"not {limits.shown(value)}")
    shown = "/".join(limits.shown(v).strip("'") for v in pair)
    n = limits.whole_number(pair[1], f"--shard {shown}: N, the number of shards,", DataError, 1, limits.MAX_SHARDS)
    k = pair[0]
    if isinstance(k, str) and len(k.lstrip("0")) > len(str(n)):  # more digits than N: past it
        k = n
    if not 0 <= int(k) < n:
        raise DataError(f"--shard {shown}: K counts from 0, so shard K of {n} is one of 0..{n - 1}")
    return int(k), n


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
    model_path: str | os.PathLike | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``config.batch_size`` samples (the last may be smaller), as model feeds.

    ``model_path`` locates what text data needs beside the model (its
    tokenizer.json and config.json). With ``config.shard = (K, N)`` only batches
    K, K+N, K+2N, ... of the unsharded sequence are assembled and yielded; a
    shard that gets none is a DataError.
    """
    dtypes = {s.name: s.dtype for s in inputs}
    k, n = config.shard or (0, 1)
    cut = 0
    got = False
    for pieces in _cut(_chunks(find_files(path), inputs, config, TextReader(model_path, config)), config):
        if cut % n == k:
            got = True
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
                yield {spec.name: _fit(file, spec, chunk[spec.name]) for spec in inputs}
            continue
        if suffix == ".npy":
            chunks = _read_npy(file, inputs, config)
        elif suffix == ".npz":
            chunks = _read_npz(file, inputs, config)
        else:
            yield _image(file, inputs, config)  # decoded only when its batch is assembled
            continue
        for chunk in chunks:
            yield {spec.name: _fit(file, spec, chunk[spec.name]) for spec in inputs}


@contextmanager
def _reading(what: object) -> Iterator[None]:
    """Any failure of a parser on the bytes of ``what`` becomes one DataError line."""
    try:
        yield
    except FpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile bytes can fail a parser in any way
        raise DataError(f"cannot read {what}: {first_line(exc)}") from exc


def _block_rows(config: DataConfig) -> int:
    """Rows read from an array file at a time: one batch, or fewer if fewer are wanted."""
    return min(config.batch_size, config.max_samples or config.batch_size)


@dataclass(frozen=True)
class _NpyHeader:
    """What a .npy header declares, checked against the bytes that follow it."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # bytes before the data

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def like(self) -> np.ndarray:
        """A read-only stand-in of the declared shape and dtype (no memory)."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)


def _npy_header(fh, where: str, size: int) -> _NpyHeader:
    """Reads the header of the .npy data in ``fh`` (``size`` bytes in all).

    Refuses object arrays (never unpickled), 0-d arrays and negative sizes, and a
    header declaring more data than the ``size`` bytes hold, before any data is read.
    """
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise DataError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported")
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (a pickled object array), which are never "
                        "loaded; save plain numeric arrays")
    if not shape:
        raise DataError(f"{where} is a single value (a 0-d array); samples go on axis 0")
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: its header declares a negative size {list(shape)}")
    header = _NpyHeader(tuple(shape), bool(fortran), dtype, fh.tell())
    declared = math.prod(shape) * dtype.itemsize
    if declared > size - header.offset:
        raise DataError(f"{where}: its header declares {list(shape)} {dtype.name} ({declared:,} bytes) "
                        f"but only {max(size - header.offset, 0):,} bytes follow")
    return header


def _read_npy(file: Path, inputs, config: DataConfig) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of rows of a memory-mapped .npy file."""
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(f"{file}: .npy data fits a model with one input; this model has {names} "
                        "(use .npz with one array per input name)")
    spec = inputs[0]
    with open_data_file(file) as fh, _reading(file):
        header = _npy_header(fh, str(file), os.fstat(fh.fileno()).st_size)
        _fit(file, spec, header.like())
        if math.prod(header.shape) == 0:
            return
        array = np.memmap(fh, header.dtype, mode="r", offset=header.offset, shape=header.shape,
                          order="F" if header.fortran else "C")
        rows = _block_rows(config)
        for start in range(0, len(array), rows):
            yield {spec.name: array[start : start + rows]}


class _MemberRows:
    """The rows of one .npy member of a zip archive, read in order, only as asked for.

    A C-ordered member is streamed: only the rows read are decompressed. A
    Fortran-ordered one stores each column whole, so one row lies across all of
    it: its rows are gathered in passes over the member, each pass keeping a
    window of at most ``limit`` rows (``max_samples``, the most a run asks of
    the file) and :data:`_WINDOW_BYTES` (or one block), so memory stays bounded
    by the rows asked whatever the member declares; decompression runs on to
    the member's end, one piece at a time.
    """

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, limit: int | None) -> None:
        self.archive, self.info, self.where, self.limit = archive, info, where, limit
        self.stream = archive.open(info)
        self.header = _npy_header(self.stream, where, info.file_size)
        # with at most one axis longer than 1, Fortran order lays the bytes out as C order does
        self.fortran = self.header.fortran and sum(d > 1 for d in self.header.shape) > 1
        self.window: tuple[int, np.ndarray] | None = None  # (first row, rows held) of a Fortran member
        self.passes = 0
        self.done = 0

    def read(self, rows: int) -> np.ndarray:
        start, self.done = self.done, self.done + rows
        shape, dtype = self.header.shape, self.header.dtype
        if not self.fortran:
            data = _read_exact(self.stream, rows * self.header.row_bytes, self._short)
            return np.frombuffer(data, dtype).reshape(rows, *shape[1:])
        if self.window is None or start + rows > self.window[0] + len(self.window[1]):
            count = max(rows, _WINDOW_BYTES // max(self.header.row_bytes, 1) // rows * rows)  # whole blocks
            asked = shape[0] if self.limit is None else min(self.limit, shape[0])
            count = min(count, max(asked - start, rows), shape[0] - start)
            self.window = (start, self._fortran_rows(start, count))
        first, held = self.window
        return held[start - first : start - first + rows]

    def _fortran_rows(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of a Fortran-ordered member, in one pass over it."""
        shape, dtype = self.header.shape, self.header.dtype
        n0, columns, item = shape[0], math.prod(shape[1:]), dtype.itemsize
        if self.passes:  # a stream reads forward only: the next pass opens the member again
            self.stream.close()
            self.stream = self.archive.open(self.info)
            _skip(self.stream, self.header.offset, self._short)
        self.passes += 1
        out = np.empty((columns, count), dtype)
        per_read = max(1, _PIECE // max(n0 * item, 1))  # whole columns per read, when they are short
        for j in range(0, columns, per_read):
            if per_read > 1:
                k = min(per_read, columns - j)
                block = np.frombuffer(_read_exact(self.stream, k * n0 * item, self._short), dtype)
                out[j : j + k] = block.reshape(k, n0)[:, start : start + count]
                continue
            _skip(self.stream, start * item, self._short)
            out[j] = np.frombuffer(_read_exact(self.stream, count * item, self._short), dtype)
            _skip(self.stream, (n0 - start - count) * item, self._short)
        # column j holds element (r, *idx) at [j, r], j running over idx in Fortran order
        return out.T.reshape((count, *shape[1:]), order="F")

    def _short(self) -> DataError:
        return DataError(f"{self.where} ends before the {self.header.shape[0]:,} rows its header declares")


_PIECE = 1 << 20  # bytes decompressed per read
_WINDOW_BYTES = 32 << 20  # rows of a Fortran-ordered .npz member held at once (at least one block)


def _read_exact(stream, n: int, short: Callable[[], DataError]) -> bytearray:
    """``n`` bytes of ``stream``, read in pieces (a forged size fails at the end of
    the data, not in malloc); ``short()`` is raised where the data ends first."""
    data = bytearray()
    while len(data) < n:
        try:
            piece = stream.read(min(n - len(data), _PIECE))
        except EOFError:  # the archive ends before the entry's declared size
            piece = b""
        if not piece:
            raise short()
        data += piece
    return data


def _skip(stream, n: int, short: Callable[[], DataError]) -> None:
    """Reads past ``n`` bytes of ``stream``, holding one piece at a time."""
    while n > 0:
        n -= len(_read_exact(stream, min(n, _PIECE), short))


def _read_npz(file: Path, inputs, config: DataConfig) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of rows of the arrays of an .npz file, decompressed as they are read."""
    with open_data_file(file) as fh, _reading(file), zipfile.ZipFile(fh) as archive:
        members = {i.filename.removesuffix(".npy"): i for i in archive.infolist() if not i.is_dir()}
        keys = {s.name: s.name for s in inputs if s.name in members}
        if len(inputs) == 1 and not keys and len(members) == 1:
            keys = {inputs[0].name: next(iter(members))}  # one unnamed array, one input
        missing = [s.name for s in inputs if s.name not in keys and s.name not in ZERO_FILLED]
        if missing or not keys:
            name = missing[0] if missing else inputs[0].name
            raise DataError(f"{file} has no array {name!r} (it holds {sorted(members)}; "
                            f"the model expects {', '.join(s.describe() for s in inputs)})")
        arrays = {name: _MemberRows(archive, members[key], f"{file} [{key}]", config.max_samples)
                  for name, key in keys.items()}
        specs = {s.name: s for s in inputs}
        for name, member in arrays.items():
            _fit(file, specs[name], member.header.like())
        lengths = {k: m.header.shape[0] for k, m in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{file}: arrays hold different numbers of samples {lengths}")
        total, rows = next(iter(lengths.values())), _block_rows(config)
        total = min(total, config.max_samples or total)  # never a row past what the run asks
        for start in range(0, total, rows):
            chunk = {name: m.read(min(rows, total - start)) for name, m in arrays.items()}
            for spec in inputs:
                if spec.name not in chunk:  # zero-filled, shaped like the first token input
                    like = next(iter(chunk.values()))
                    chunk[spec.name] = np.zeros(like.shape, dtype=spec.dtype)
            yield chunk


def image_geometry(spec: InputSpec, config: DataConfig) -> tuple[int, int, int]:
    """(channels, height, width) that images are turned into for ``spec``."""
    if len(spec.shape) != 4:
        raise DataError(f"images need a model input [N, C, H, W]; the model expects {spec.describe()}")
    channels = spec.shape[1] if isinstance(spec.shape[1], int) else 3
    height, width = (d if isinstance(d, int) else None for d in spec.shape[2:])
    size = config.image_size or DEFAULT_IMAGE_SIZE
    return channels, height or size, width or size


def _normalisation(spec: InputSpec, channels: int, config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """``mean`` and ``std`` as per-channel arrays for ``channels``-channel images."""
    if channels not in (1, 3):
        raise DataError(f"model input {spec.describe()} does not take RGB or grey images")
    give = "one value" if channels == 1 else f"{channels} values, or 1 for every channel"
    for name, values in (("mean", config.mean), ("std", config.std)):
        if len(values) not in (1, channels):
            raise DataError(f"image {name} has {len(values)} values but the model takes {channels}-channel "
                            f"images (give {give})")
    return np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)


def _image(file: Path, inputs, config: DataConfig) -> _Deferred:
    """One image as a sample of the model's input, checked against it now and decoded on read."""
    if len(inputs) != 1:
        raise DataError(f"{file}: images fit a model with one input, this one has {len(inputs)}")
    spec = inputs[0]
    channels, height, width = image_geometry(spec, config)
    _normalisation(spec, channels, config)
    like = np.broadcast_to(np.zeros((), np.float32), (1, channels, height, width))
    return _Deferred({spec.name: _fit(file, spec, like)},
                     functools.partial(_read_image, file, spec, config))


def _read_image(file: Path, spec: InputSpec, config: DataConfig) -> dict[str, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    channels, height, width = image_geometry(spec, config)
    mean, std = _normalisation(spec, channels, config)
    with open_data_file(file) as fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fh, formats=_IMAGE_FORMATS) as img:
                    _check_image_size(file, img.size, height, width, config)  # before decoding
                    img = img.convert("L" if channels == 1 else "RGB")
                    img = _resize_crop(img, height, width, config.crop_pct)
                    pixels = np.asarray(img, dtype=np.float32) / 255.0
        except FpsError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"image {file} is too large: {first_line(exc)}") from exc
        except UnidentifiedImageError:
            raise DataError(f"cannot decode image {file}: not a JPEG, PNG, WebP or BMP image") from None
        except Exception as exc:  # noqa: BLE001 - Pillow fails on hostile files in many ways
            raise DataError(f"cannot decode image {file}: {first_line(exc)}") from exc
    pixels = pixels.reshape(height, width, channels)
    pixels = (pixels - mean) / std
    return {spec.name: pixels.transpose(2, 0, 1)[None]}


def _check_image_size(file: Path, size: tuple[int, int], height: int, width: int,
                      config: DataConfig) -> None:
    """Refuses an image whose declared size, or the size it would be resized to,
    exceeds ``config.max_image_pixels`` (a small file can declare any size)."""
    limit = config.max_image_pixels
    w, h = size
    if w < 1 or h < 1:
        raise DataError(f"image {file} declares an empty size {w}x{h}")
    if w * h > limit:
        raise DataError(f"image {file} declares {w}x{h} pixels, over the limit of {limit:,} pixels")
    new = _resized_size(size, height, width, config.crop_pct)
    if new[0] * new[1] > limit:
        raise DataError(f"image {file} ({w}x{h}) is too elongated: resizing it for a {width}x{height} "
                        f"input would make {new[0]}x{new[1]} pixels, over the limit of {limit:,}")


def _resized_size(size: tuple[int, int], height: int, width: int, crop_pct: float) -> tuple[int, int]:
    """(width, height) of an image of ``size`` with its shorter side scaled to the crop."""
    scale = max(height, width) / crop_pct / min(size)
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def _resize_crop(img, height: int, width: int, crop_pct: float):
    from PIL import Image

    img = img.resize(_resized_size(img.size, height, width, crop_pct), Image.Resampling.BICUBIC)
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def _fit(file: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    """``array`` if it fits ``spec`` (cast later, per batch), else a DataError saying what fits."""
    expects = f"the model expects {spec.describe()}"
    if array.ndim != len(spec.shape):
        raise DataError(f"{file}: {spec.name} has shape {list(array.shape)}, {expects}")
    for got, want in zip(array.shape[1:], spec.shape[1:]):
        if isinstance(want, int) and got != want:
            raise DataError(f"{file}: {spec.name} has shape {list(array.shape)}, {expects}")
    src, dst = array.dtype, spec.dtype
    ok = np.can_cast(src, dst, casting="same_kind") or (
        src.kind in "biu" and dst.kind in "fiu"
    )
    if not ok:
        raise DataError(f"{file}: {spec.name} holds {src.name}, {expects}")
    return array
