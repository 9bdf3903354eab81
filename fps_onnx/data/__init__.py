"""Calibration data readers: folders or single files, streamed and re-batched.

* ``.npy``: samples stacked on axis 0, for a model with one input (memory-mapped);
* ``.npz``: arrays keyed by the model's input names (``input_ids``,
  ``attention_mask``, ...); a missing ``token_type_ids`` is filled with zeros;
* images (jpg, jpeg, png, webp, bmp; found recursively, so an ImageFolder tree
  works): decoded with Pillow, resized and centre-cropped to the model's input
  size, scaled to [0, 1] and normalised with ``mean``/``std``;
* raw text (``.txt``, ``.jsonl``; see :mod:`fps_onnx.data.text`), tokenized with the
  model's tokenizer.json; in a folder, text files are read only when it holds
  no array or image file (an ImageFolder tree may carry a labels.txt).

Only one batch (plus one block of rows of a file) is held at a time, so memory
does not grow with the number of samples or files; ``.npz`` members are
decompressed only as far as the rows read (``max_samples`` stops early), and a
Fortran-ordered member, whose rows run across all of it, is gathered in
passes that hold only the rows asked (see :mod:`fps_onnx.data.arrays`).

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

The modules: :mod:`~fps_onnx.data.config` (:class:`DataConfig`, shards),
:mod:`~fps_onnx.data.batches` (finding files, batching), :mod:`~fps_onnx.data.arrays`,
:mod:`~fps_onnx.data.images`, :mod:`~fps_onnx.data.text` (the readers) and
:mod:`~fps_onnx.data.files` (opening data files). The public names are importable
from here.
"""

from __future__ import annotations

from .arrays import ARRAY_SUFFIXES, MAX_INFLATED_BYTES, ZERO_FILLED, load_npz
from .batches import find_files, iter_batches
from .config import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, DataConfig, parse_shard
from .images import IMAGE_SUFFIXES, image_geometry, resize_crop
from .text import TEXT_SUFFIXES

__all__ = [
    "ARRAY_SUFFIXES", "DEFAULT_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES",
    "MAX_INFLATED_BYTES", "TEXT_SUFFIXES", "ZERO_FILLED", "DataConfig", "find_files", "image_geometry",
    "iter_batches", "load_npz", "parse_shard", "resize_crop",
]
