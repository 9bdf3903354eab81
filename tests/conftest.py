"""Fixtures shared by the test folders; ``tests/`` itself is on ``sys.path`` (pytest's rootdir
conftest, no ``__init__.py``), so every folder imports the builders as ``_models``, ``llm_models``,
``_layering`` and the CLI helpers as ``_cli``. Test file names are unique across the folders."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from _models import export, linear_chain, tiny_vit


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


@pytest.fixture()
def chain(tmp_path):
    """(the linear chain from ``_models.linear_chain``, a data folder with x.npy [20, 6])."""
    path = linear_chain(tmp_path)  # w1 [5, 6] (stored in_out), w2 [4, 5]
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32))
    return path, data


@pytest.fixture()
def place(tmp_path):
    """tmp/data/x.npy [10, 6] and tmp/out/ (empty) for commands on models built in ``tmp``."""
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "x.npy", np.random.default_rng(2).standard_normal((10, 6)).astype(np.float32))
    (tmp_path / "out").mkdir()
    return tmp_path
