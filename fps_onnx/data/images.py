"""Images as calibration data: decoded with Pillow, resized and centre-cropped to
the model's input, scaled to [0, 1] and normalised with ``mean``/``std``.

Images are decoded only as JPEG, PNG, WebP or BMP, and one whose declared size
(or size once resized) exceeds ``DataConfig.max_image_pixels`` (Pillow's own
decompression-bomb limit applies too) is refused before it is decoded.
"""

from __future__ import annotations

from pathlib import Path
import warnings

import numpy as np

from ..errors import DataError, FpsError, first_line
from ..onnx.inputs import InputSpec
from .arrays import fit
from .config import DEFAULT_IMAGE_SIZE, DataConfig
from .files import open_data_file

__all__ = ["IMAGE_SUFFIXES", "check_image_input", "image_geometry", "read_image", "resize_crop"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # what Pillow may decode them as


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


def check_image_input(file: Path, inputs, config: DataConfig) -> np.ndarray:
    """A stand-in (no memory) of the sample an image becomes for the model's one
    input, checked against it; DataError if images do not fit the model."""
    if len(inputs) != 1:
        raise DataError(f"{file}: images fit a model with one input, this one has {len(inputs)}")
    spec = inputs[0]
    channels, height, width = image_geometry(spec, config)
    _normalisation(spec, channels, config)
    return fit(file, spec, np.broadcast_to(np.zeros((), np.float32), (1, channels, height, width)))


def read_image(file: Path, spec: InputSpec, config: DataConfig) -> dict[str, np.ndarray]:
    """The image ``file`` decoded as one sample of ``spec`` (shape [1, C, H, W])."""
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
                    img = resize_crop(img, height, width, config.crop_pct)
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


def resize_crop(img, height: int, width: int, crop_pct: float):
    """The PIL image ``img`` with its shorter side resized (bicubic) to the crop's
    side / ``crop_pct``, then centre-cropped to ``height`` x ``width``."""
    from PIL import Image

    img = img.resize(_resized_size(img.size, height, width, crop_pct), Image.Resampling.BICUBIC)
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))
