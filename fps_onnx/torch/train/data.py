"""Labelled training data: an ImageFolder tree or one ``.npz`` file per split.

* a folder: one sub-folder per class (sorted names are the labels), images
  found recursively inside each; decoded like calibration images (resize,
  centre crop, mean/std);
* ``.npz`` with ``x`` and ``y``: ``x`` images [N, C, H, W] or [N, H, W] (uint8
  pixels are scaled to [0, 1] and normalised; float arrays are taken as already
  normalised; resized and grey->RGB as the model needs), or any other float
  input fed as it is;
* ``.npz`` with token arrays (``input_ids``, ``attention_mask``, ...) and
  ``labels`` (or ``y``): passed to the model as keyword arguments.

Labels are integers in [0, num_classes). Validation and test folders are
labelled with the training split's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...data import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, load_npz, resize_crop
from ...errors import DataError
from ._torch import torch

__all__ = ["ImageSpec", "LABEL_KEYS", "LabelledSet", "open_split"]

LABEL_KEYS = ("y", "labels", "label")


@dataclass(frozen=True)
class ImageSpec:
    """What images become for the model: [channels, size, size], normalised."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875


class LabelledSet(torch.utils.data.Dataset):
    """Samples (model input, label) of one split."""

    def __init__(self, path: Path, labels: np.ndarray, classes: list[str] | None) -> None:
        self.path = path
        self.labels = labels
        self.classes = classes
        self.spec: ImageSpec | None = None

    def set_image(self, spec: ImageSpec | None) -> None:
        """How images are prepared for the model (None: the model takes no images)."""
        self.spec = spec

    def set_inputs(self, names: list[str]) -> None:
        """The model's input names (token arrays not among them are not fed)."""

    def __len__(self) -> int:
        return len(self.labels)

    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else int(self.labels.max()) + 1

    def check_labels(self, num_classes: int) -> None:
        """DataError unless every label is in [0, num_classes)."""
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DataError(f"{self.path}: label {bad} is out of range for {num_classes} classes")


class _FolderSet(LabelledSet):
    def __init__(self, path, files, labels, classes) -> None:
        super().__init__(path, labels, classes)
        self.files = files

    def set_image(self, spec: ImageSpec | None) -> None:
        if spec is None:
            raise DataError(f"{self.path}: image folders need a model that takes images")
        self.spec = spec

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        spec = self.spec
        try:
            with Image.open(self.files[i]) as img:
                img = img.convert("L" if spec.channels == 1 else "RGB")
                img = resize_crop(img, spec.size, spec.size, spec.crop_pct)
                pixels = np.asarray(img, dtype=np.float32).reshape(spec.size, spec.size, spec.channels)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"cannot decode image {self.files[i]}: {exc}") from exc
        pixels = (pixels / 255.0 - np.float32(spec.mean[: spec.channels])) / np.float32(spec.std[: spec.channels])
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), int(self.labels[i])


class _ArraySet(LabelledSet):
    def __init__(self, path, x, labels) -> None:
        super().__init__(path, labels, None)
        self.x = x

    def set_image(self, spec: ImageSpec | None) -> None:
        self.spec = spec if self.x.ndim in (3, 4) else None

    def __getitem__(self, i):
        x = torch.from_numpy(np.asarray(self.x[i]))
        if self.spec is not None:
            x = _to_image(x, self.spec)
        elif x.is_floating_point():
            x = x.float()
        return x, int(self.labels[i])


class _TokenSet(LabelledSet):
    def __init__(self, path, tokens: dict[str, np.ndarray], labels) -> None:
        super().__init__(path, labels, None)
        self.tokens = tokens

    def set_inputs(self, names: list[str]) -> None:
        if names[0] not in self.tokens:
            raise DataError(f"{self.path} has no array {names[0]!r}, which the model takes first "
                            f"(it holds {sorted(self.tokens)})")
        self.tokens = {k: v for k, v in self.tokens.items() if k in names}

    def __getitem__(self, i):
        return {k: torch.from_numpy(np.asarray(v[i], dtype=np.int64)) for k, v in self.tokens.items()}, int(
            self.labels[i])


def _to_image(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """One image [C, H, W] or [H, W] -> normalised float [channels, size, size]."""
    if x.ndim == 2:
        x = x[None]
    pixels = x.dtype == torch.uint8
    x = x.float() / 255.0 if pixels else x.float()
    if x.shape[0] == 1 and spec.channels == 3:
        x = x.expand(3, -1, -1)
    if x.shape[0] != spec.channels:
        raise DataError(f"images have {x.shape[0]} channels, the model takes {spec.channels}")
    if x.shape[1:] != (spec.size, spec.size):
        x = torch.nn.functional.interpolate(x[None], size=(spec.size, spec.size), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
    if pixels:
        mean = torch.tensor(spec.mean[: spec.channels])[:, None, None]
        std = torch.tensor(spec.std[: spec.channels])[:, None, None]
        x = (x - mean) / std
    return x.contiguous()


def open_split(path, classes: list[str] | None = None) -> LabelledSet:
    """A split from a folder tree or an ``.npz`` file; ``classes``: the training split's.

    Call ``set_image`` on it once the model's input size is known.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        return _open_folder(path, classes)
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: training data is a class-folder tree or an .npz file")
    return _open_npz(path)


def _open_folder(path: Path, classes: list[str] | None) -> LabelledSet:
    found = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            found[sub.name] = files
    if not found:
        raise DataError(f"{path} has no classes: expected one sub-folder of images per class")
    classes = classes if classes is not None else sorted(found)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise DataError(f"{path}: class {unknown[0]!r} is not a class of the training split")
    files = [f for name in found for f in found[name]]
    labels = np.asarray([index[name] for name in found for _ in found[name]], dtype=np.int64)
    return _FolderSet(path, files, labels, list(classes))


def _open_npz(path: Path) -> LabelledSet:
    arrays = load_npz(path)
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    if label_key is None:
        raise DataError(f"{path} has no labels: expected an array named {' or '.join(LABEL_KEYS)}")
    labels = arrays.pop(label_key)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be a 1-D integer array, not {labels.dtype} {list(labels.shape)}")
    if len(labels) == 0:
        raise DataError(f"{path} holds no samples")
    if not arrays:
        raise DataError(f"{path} has labels but no inputs (expected x, or input_ids and friends)")
    lengths = {k: len(v) for k, v in arrays.items()}
    if any(n != len(labels) for n in lengths.values()):
        raise DataError(f"{path}: inputs {lengths} and {len(labels)} labels differ in length")
    labels = labels.astype(np.int64)
    if "x" in arrays:
        return _ArraySet(path, arrays["x"], labels)
    bad = [k for k, v in arrays.items() if v.dtype.kind not in "iub"]
    if bad:
        raise DataError(f"{path}: token array {bad[0]!r} is {arrays[bad[0]].dtype}, not integer")
    return _TokenSet(path, arrays, labels)
