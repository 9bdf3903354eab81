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

Only one batch (plus one file's chunk) is held at a time, so memory does not
grow with the number of samples or files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .text import TEXT_SUFFIXES, TextReader

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
ZERO_FILLED = ("token_type_ids",)

_ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (ints for static dims, None/str otherwise), dtype."""

    name: str
    shape: tuple
    dtype: np.dtype

    @classmethod
    def from_ort(cls, arg) -> InputSpec:
        """From an ``onnxruntime.NodeArg``."""
        dtype = _ONNX_DTYPES.get(arg.type)
        if dtype is None:
            raise DataError(f"model input {arg.name!r} has type {arg.type}, which cannot be fed")
        return cls(arg.name, tuple(arg.shape), np.dtype(dtype))

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} [{dims}] {self.dtype.name}"


@dataclass(frozen=True)
class DataConfig:
    """How calibration data is read and batched."""

    batch_size: int = 32
    max_samples: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    max_length: int = 512  # text: tokens per sample (longer ones are truncated)
    text_field: str = "text"  # .jsonl: the field holding the text
    tokenizer: str | None = None  # text: tokenizer.json (or its folder); None: beside the model

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch size must be at least 1, not {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise DataError(f"max samples must be at least 1, not {self.max_samples}")
        if self.image_size is not None and self.image_size < 1:
            raise DataError(f"image size must be at least 1, not {self.image_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise DataError(f"crop fraction must be in (0, 1], not {self.crop_pct}")
        if self.max_length < 1:
            raise DataError(f"--max-length must be at least 1, not {self.max_length}")


def find_files(path: str | os.PathLike) -> list[Path]:
    """The data files under ``path`` (or ``path`` itself), sorted."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in (*ARRAY_SUFFIXES, *IMAGE_SUFFIXES, *TEXT_SUFFIXES):
            raise DataError(f"{path}: unknown data file type (use .npy, .npz, images, .txt or .jsonl)")
        return [path]
    suffixes = (*ARRAY_SUFFIXES, *IMAGE_SUFFIXES, *TEXT_SUFFIXES)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
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
    tokenizer.json and config.json).
    """
    dtypes = {s.name: s.dtype for s in inputs}
    remaining = config.max_samples
    buffer: list[dict[str, np.ndarray]] = []
    held = 0
    for chunk in _chunks(find_files(path), inputs, config, TextReader(model_path, config)):
        if buffer and not _same_shapes(buffer[0], chunk):
            yield _concat(buffer, dtypes)  # e.g. another sequence length: never mix in one batch
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
            buffer.append({k: v[start : start + take] for k, v in chunk.items()})
            held += take
            start += take
            if held == config.batch_size:
                yield _concat(buffer, dtypes)
                buffer, held = [], 0
        if remaining is not None and remaining <= 0:
            break
    if buffer:
        yield _concat(buffer, dtypes)


def _length(chunk: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values())))


def _same_shapes(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return all(a[k].shape[1:] == b[k].shape[1:] for k in a)


def _concat(parts: list[dict[str, np.ndarray]], dtypes) -> dict[str, np.ndarray]:
    """One batch, contiguous and in the model's dtypes (only the batch is copied)."""
    if len(parts) == 1:
        return {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in parts[0].items()}
    return {k: np.concatenate([p[k] for p in parts]).astype(dtypes[k], copy=False)
            for k in parts[0]}


def _chunks(files, inputs, config, text: TextReader) -> Iterator[dict[str, np.ndarray]]:
    for file in files:
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            for chunk in text.chunks(file, inputs):  # one chunk per batch
                yield {spec.name: _fit(file, spec, chunk[spec.name]) for spec in inputs}
            continue
        if suffix == ".npy":
            chunk = _read_npy(file, inputs)
        elif suffix == ".npz":
            chunk = _read_npz(file, inputs)
        else:
            chunk = _read_image(file, inputs, config)
        yield {spec.name: _fit(file, spec, chunk[spec.name]) for spec in inputs}


def _read_npy(file: Path, inputs) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(f"{file}: .npy data fits a model with one input; this model has {names} "
                        "(use .npz with one array per input name)")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unreadable
        raise DataError(f"cannot read {file}: {exc}") from exc
    return {inputs[0].name: array}


def _read_npz(file: Path, inputs) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as archive:
            names = set(archive.files)
            keys = {s.name: s.name for s in inputs if s.name in names}
            if len(inputs) == 1 and not keys and len(names) == 1:
                keys = {inputs[0].name: next(iter(names))}  # one unnamed array, one input
            arrays = {name: archive[key] for name, key in keys.items()}
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {file}: {exc}") from exc
    missing = [s.name for s in inputs if s.name not in arrays and s.name not in ZERO_FILLED]
    if missing:
        raise DataError(f"{file} has no array {missing[0]!r} (it holds {sorted(names)}; "
                        f"the model expects {', '.join(s.describe() for s in inputs)})")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{file}: arrays hold different numbers of samples {lengths}")
    for spec in inputs:
        if spec.name not in arrays:  # zero-filled, shaped like the first token input
            like = next(iter(arrays.values()))
            arrays[spec.name] = np.zeros(like.shape, dtype=spec.dtype)
    return arrays


def image_geometry(spec: InputSpec, config: DataConfig) -> tuple[int, int, int]:
    """(channels, height, width) that images are turned into for ``spec``."""
    if len(spec.shape) != 4:
        raise DataError(f"images need a model input [N, C, H, W]; the model expects {spec.describe()}")
    channels = spec.shape[1] if isinstance(spec.shape[1], int) else 3
    height, width = (d if isinstance(d, int) else None for d in spec.shape[2:])
    size = config.image_size or DEFAULT_IMAGE_SIZE
    return channels, height or size, width or size


def _read_image(file: Path, inputs, config: DataConfig) -> dict[str, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    if len(inputs) != 1:
        raise DataError(f"{file}: images fit a model with one input, this one has {len(inputs)}")
    spec = inputs[0]
    channels, height, width = image_geometry(spec, config)
    if channels not in (1, 3) or len(config.mean) not in (1, channels):
        raise DataError(f"model input {spec.describe()} does not take RGB or grey images")
    try:
        with Image.open(file) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = _resize_crop(img, height, width, config.crop_pct)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {file}: {exc}") from exc
    pixels = pixels.reshape(height, width, channels)
    mean = np.asarray(config.mean[:channels], np.float32)
    std = np.asarray(config.std[:channels], np.float32)
    pixels = (pixels - mean) / std
    return {spec.name: pixels.transpose(2, 0, 1)[None]}


def _resize_crop(img, height: int, width: int, crop_pct: float):
    from PIL import Image

    scale = max(height, width) / crop_pct / min(img.size)
    new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new, Image.Resampling.BICUBIC)
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
