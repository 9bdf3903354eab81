"""`fps-onnx export`, `fps-onnx map` and `select --torch-model` through click's CliRunner."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("torch")

from _cli import assert_one_error, invoke  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402

SPEC_FILE = '''
import torch
from torch import nn


class Tokens(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.embed = nn.Conv1d(3, 16, 1)
        self.mix = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):  # x [N, 3, T]
        t = self.embed(x).transpose(1, 2)
        t = t + self.out(torch.relu(self.mix(t)))
        return self.head(t.mean(1))


def build(num_classes=4):
    torch.manual_seed(0)
    return Tokens(num_classes), torch.randn(2, 3, 6)
'''


@pytest.fixture()
def case(tmp_path):
    spec_file = tmp_path / "tiny_spec.py"
    spec_file.write_text(SPEC_FILE)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((12, 3, 6)).astype(np.float32))
    return f"{spec_file}:build", data


def _folded(spec, path):
    """The same model exported with constant folding: its Linear weights lose their names."""
    import torch

    from fps_onnx.torch.models import build_model

    model, inputs = build_model(spec)
    torch.onnx.export(model, tuple(inputs.values()), str(path), dynamo=False, do_constant_folding=True,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return path


def test_export_then_select_gives_parameter_names(case, tmp_path):
    spec, data = case
    onnx_path, masks = tmp_path / "m.onnx", tmp_path / "masks.safetensors"
    result = invoke("export", spec, "-o", onnx_path, "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["weights"] == 4 and summary["unnamed"] == []
    assert summary["max_abs_diff"] < 1e-4
    assert invoke("select", onnx_path, data, "-o", masks, "-q").exit_code == 0
    assert set(MaskFile.load(masks).masks) == {"embed.weight", "mix.weight", "out.weight", "head.weight"}


def test_map_and_select_torch_model_on_a_folded_export(case, tmp_path):
    spec, data = case
    folded = _folded(spec, tmp_path / "folded.onnx")
    raw, mapped, direct = (tmp_path / n for n in ("raw.safetensors", "mapped.safetensors", "direct.safetensors"))
    assert invoke("select", folded, data, "-o", raw, "-q").exit_code == 0
    assert any(k.startswith("onnx::") for k in MaskFile.load(raw).masks)

    result = invoke("map", raw, "--model", spec, "--onnx", folded, "-o", mapped, "--strict", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unmapped"] == {} and len(report["mapped"]) == 4

    result = invoke("select", folded, data, "-o", direct, "--torch-model", spec, "-q")
    assert result.exit_code == 0, result.output
    a, b = MaskFile.load(mapped), MaskFile.load(direct)
    assert set(a.masks) == {"embed.weight", "mix.weight", "out.weight", "head.weight"}
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert a.tensors["mix.weight"]["onnx_initializer"].startswith("onnx::MatMul")
    assert a.tensors["mix.weight"]["torch_name"] == "mix.weight"
    # the same mapping written as version 1, for older readers, holds the same selection
    old = tmp_path / "mapped_v1.safetensors"
    result = invoke("map", raw, "--model", spec, "--onnx", folded, "-o", old, "--mask-format", "v1", "-q")
    assert result.exit_code == 0, result.output
    v1 = MaskFile.load(old)
    assert v1.meta["format_version"] == "1" and a.meta["format_version"] == "2"
    assert all(np.array_equal(v1.indices(k), a.indices(k)) for k in a.keys())


def _one_line_failure(result, message, *absent):
    assert_one_error(result, re.escape(message), absent=absent)


def test_export_bad_input(case, tmp_path):
    spec, _ = case
    out = tmp_path / "o.onnx"
    _one_line_failure(invoke("export", "nothing", "-o", out), "unknown model SPEC", out)
    _one_line_failure(invoke("export", "timm:not_a_model_xyz", "-o", out), "timm has no model", out)
    bad = tmp_path / "bad.safetensors"
    from safetensors.numpy import save_file

    save_file({"mix.weight": np.zeros((2, 2), np.float32)}, str(bad))
    _one_line_failure(invoke("export", spec, "-o", out, "--checkpoint", bad), "does not fit", out)
    _one_line_failure(invoke("export", spec, "-o", out, "--img-size", "8"), "does not take img_size", out)
    assert list(tmp_path.glob(".o.onnx*")) == []


def test_map_bad_input(case, tmp_path):
    spec, data = case
    folded = _folded(spec, tmp_path / "folded.onnx")
    raw, out = tmp_path / "raw.safetensors", tmp_path / "out.safetensors"
    assert invoke("select", folded, data, "-o", raw, "-q").exit_code == 0
    # A PyTorch model with other weights (another seed): nothing maps by value.
    other = tmp_path / "other_spec.py"
    other.write_text(SPEC_FILE.replace("manual_seed(0)", "manual_seed(1)"))
    _one_line_failure(invoke("map", raw, "--model", f"{other}:build", "--onnx", folded, "-o", out),
                      "another model", out)
    # Another ONNX file than the masks were selected on.
    _one_line_failure(invoke("map", raw, "--model", spec, "--onnx", _folded(f"{other}:build", tmp_path / "o.onnx"),
                             "-o", out), "another ONNX model", out)
    _one_line_failure(invoke("select", folded, data, "-o", out, "--torch-model", "nothing"),
                      "unknown model SPEC", out)
