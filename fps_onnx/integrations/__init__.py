"""Mask files in other training stacks.

``peft``: :func:`~fps_onnx.integrations.peft.shira_config`, a PEFT
``ShiraConfig`` whose adapters train exactly the entries a mask file selects
(needs ``pip install 'fps-onnx[peft]'``). ``optax``:
:func:`~fps_onnx.integrations.optax.mask_tree` (masks as a pytree of bool arrays
in Flax layout) and :func:`~fps_onnx.integrations.optax.zero_unselected` (an
optax transformation, last in the chain, that keeps every other entry frozen;
needs ``pip install 'fps-onnx[jax]'``). A plain PyTorch loop needs no
integration: see :mod:`fps_onnx.torch.train`. Each module imports its stack when
imported, and nothing here is imported by ``fps-onnx select``.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

import numpy as np

from ..errors import MissingDependency
from ..selection.maskfile import MaskFile, mask_file_of


class MissingExtra(MissingDependency):
    """An integration's stack is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        super(MissingDependency, self).__init__(
            f"fps_onnx.integrations.{extra} needs {package}; "
            f"install it with: pip install 'fps-onnx[{extra}]'")


def load_masks(masks: Mapping[str, object] | MaskFile | str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> bool NumPy array, from a mapping (NumPy or torch arrays), a MaskFile or its path
    (:func:`fps_onnx.selection.maskfile.mask_file_of`). Every dense mask at once: the
    integrations read one mask at a time from :func:`mask_file_of` instead."""
    return dict(mask_file_of(masks).masks)
