"""The mask file format: round trip, metadata, rejection of other files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from fps_onnx import maskfile
from fps_onnx.errors import MaskError
from fps_onnx.graph import WeightSite


def test_round_trip_and_metadata(tmp_path):
    site = WeightSite("onnx::MatMul_7", "MatMul", "in_out", (3, 4), 4)
    mask = np.zeros((3, 4), bool)
    mask[:, 1] = True
    built = maskfile.build({site.key: mask}, [site], {"method": "fps", "norm": "l1", "budget": '{"per_neuron": 1}'})
    built.save(tmp_path / "m.safetensors")
    back = maskfile.MaskFile.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(back.masks[site.key], mask)
    assert back.meta["format"] == "fps-mask" and back.meta["format_version"] == "1"
    assert back.meta["tool"].startswith("fps-onnx ")
    assert back.tensors[site.key] == {
        "onnx_initializer": "onnx::MatMul_7", "onnx_layout": "in_out", "op": "MatMul",
        "shape": [3, 4], "selected": 3,
    }
    assert json.loads(back.meta["budget"]) == {"per_neuron": 1}
    assert back.selected == 3 and back.total == 12


def test_other_safetensors_files_are_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(path))
    with pytest.raises(MaskError, match="not an fps-onnx mask file"):
        maskfile.MaskFile.load(path)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.numpy

    def half_write(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    site = WeightSite("w", "MatMul", "out_in", (1, 1), 1)
    built = maskfile.build({"w": np.ones((1, 1), bool)}, [site], {})
    with pytest.raises(Exception, match="No space left"):
        built.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_file_gets_the_usual_permissions(tmp_path):
    import os
    import stat

    site = WeightSite("w", "MatMul", "out_in", (1, 1), 1)
    maskfile.build({"w": np.ones((1, 1), bool)}, [site], {}).save(tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o666 & ~mask
