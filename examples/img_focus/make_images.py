"""Write the calibration images of this example: the first 4 test images of each Fashion-MNIST class.

Needs the Debian package ``dataset-fashion-mnist`` (MIT licensed); the 40 PNG
files it writes (about 20 KB) are shipped in ``images/``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def main(per_class: int = 4) -> None:
    with gzip.open(SOURCE / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(SOURCE / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    out = Path(__file__).parent / "images"
    for label, name in enumerate(CLASSES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[index]).save(out / name / f"{i}.png", optimize=True)


if __name__ == "__main__":
    main()
