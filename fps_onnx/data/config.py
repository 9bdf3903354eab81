"""How calibration data is read and batched: :class:`DataConfig` and ``--shard K/N``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import math
import re

import numpy as np

from .. import _limits as limits
from ..errors import DataError

__all__ = ["DEFAULT_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "DataConfig", "parse_shard"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


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
        if self.max_length is not None:
            limits.whole_number(self.max_length, "--max-length", DataError, 1, limits.MAX_LENGTH)


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
