"""Rebuild the quickstart example: a small ViT in ONNX and 32 Fashion-MNIST images.

The model is ``model.py:build`` with random weights (seed 0); the
images are the first 32 of the Fashion-MNIST test set (MIT licence, Debian
package dataset-fashion-mnist), saved as PNG in an ImageFolder tree.

    python examples/quickstart/make.py
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def images() -> None:
    from PIL import Image

    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as fh:
        pixels = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    for i in range(32):
        folder = HERE / "images" / CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{i:03d}.png")


def model() -> None:
    from model import build  # the SPEC beside this file
    import torch

    torch.manual_seed(0)
    vit, _ = build()
    torch.onnx.export(
        vit.eval(), (torch.randn(1, 3, 32, 32),), str(HERE / "model.onnx"), input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False,
    )


if __name__ == "__main__":
    images()
    model()
