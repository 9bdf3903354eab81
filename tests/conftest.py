from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from _models import export, tiny_vit


@pytest.fixture(autouse=True)
def _quiet_exporter():
    warnings.filterwarnings("ignore")
    logging.getLogger("fps_onnx").setLevel(logging.INFO)
    yield


@pytest.fixture(scope="session")
def vit_case(tmp_path_factory):
    """(torch model, onnx path, data .npy path [24, 3, 32, 32]) of a tiny ViT."""
    import torch

    tmp = tmp_path_factory.mktemp("vit")
    model = tiny_vit()
    path = export(model, torch.randn(2, 3, 32, 32), tmp / "vit.onnx")
    data = np.random.default_rng(1).standard_normal((24, 3, 32, 32)).astype(np.float32)
    np.save(tmp / "data.npy", data)
    return model, path, tmp / "data.npy"
