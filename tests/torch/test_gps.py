"""The GPS baseline: summed gradients over the labelled set, top-K of |grad| per neuron."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _cli import assert_one_error, invoke
from _models import image_folder, small_cnn
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.selection.score import SelectConfig
from fps_onnx.torch.gps import gps_select

SPEC = f"{Path(__file__).resolve().parents[1] / '_models.py'}:small_cnn"


def reference_masks(folder, k):
    """GPS done by hand: same model and batches, dense grads summed, stable top-K."""
    import torch

    from fps_onnx.torch.train.data import ImageSpec, open_split

    torch.manual_seed(0)
    model, _ = small_cnn()
    model.train()
    data = open_split(folder)
    data.set_image(ImageSpec(16, 3))
    for x, y in torch.utils.data.DataLoader(data, 4, shuffle=False):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    out = {}
    for name in ("stem.weight", "mix.weight", "fc.weight"):
        g = dict(model.named_parameters())[name].grad.abs().double()
        flat = g.reshape(g.shape[0], -1)
        order = torch.sort(-flat, dim=1, stable=True).indices[:, :k]
        out[name] = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True).reshape(g.shape).numpy()
    return out


def test_gps_matches_summed_gradient_top_k(tmp_path):
    folder = image_folder(tmp_path / "train")
    result = gps_select(SPEC, folder, SelectConfig(method="gps", per_neuron=2), batch_size=4)
    assert result.samples == 12
    assert sorted(result.masks.masks) == ["fc.weight", "mix.weight", "stem.weight"]  # no head
    for name, want in reference_masks(folder, 2).items():
        np.testing.assert_array_equal(result.masks.masks[name], want, err_msg=name)
    assert result.masks.meta["method"] == "gps" and result.masks.meta["labels"] == "true"


def test_gps_from_the_cli(tmp_path):
    folder = image_folder(tmp_path / "train")
    out = tmp_path / "gps.safetensors"
    result = invoke("select", "--method", "gps", SPEC, folder, "-o", out, "--per-neuron", "1", "--batch-size", "4",
                    "-q")
    assert result.exit_code == 0, result.output
    masks = MaskFile.load(out)
    assert (masks.masks["fc.weight"].sum(1) == 1).all()
    assert masks.tensors["mix.weight"]["torch_name"] == "mix.weight"


def test_gps_applies_exclude_as_fps_does(tmp_path):
    folder = image_folder(tmp_path / "train")
    out = tmp_path / "gps.safetensors"
    result = invoke("select", "--method", "gps", SPEC, folder, "-o", out, "--per-neuron", "1", "--batch-size", "4",
                    "--exclude", "^mix", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(MaskFile.load(out).keys()) == ["fc.weight", "stem.weight"]
    result = invoke("select", "--method", "gps", SPEC, folder, "-o", out, "--exclude", ".", "-q")
    assert_one_error(result, "no selectable weight is left", alone=False)


def test_gps_leaves_a_linear_tied_to_an_embedding_out_unless_include_lm_head(tmp_path):
    spec = f"{Path(__file__).resolve().parents[1] / '_models.py'}:tied_token_classifier"
    rng = np.random.default_rng(0)
    data = tmp_path / "train.npz"
    np.savez(data, input_ids=rng.integers(0, 20, (8, 5)), labels=np.arange(8) % 2)
    out = tmp_path / "gps.safetensors"
    result = invoke("select", "--method", "gps", spec, data, "-o", out, "--per-neuron", "1", "-q")
    assert result.exit_code == 0, result.output
    assert MaskFile.load(out).keys() == ["fc.weight"]  # proj.weight is the embedding's tensor
    result = invoke("select", "--method", "gps", spec, data, "-o", out, "--per-neuron", "1", "--include-lm-head",
                    "-q")
    assert result.exit_code == 0, result.output
    assert sorted(MaskFile.load(out).keys()) == ["fc.weight", "proj.weight"]


@pytest.mark.parametrize("spec, message", [("nope:xyz", "unknown model SPEC|cannot import"),
                                           ("timm", "unknown model SPEC")])
def test_gps_bad_spec(tmp_path, spec, message):
    folder = image_folder(tmp_path / "train", per_class=1)
    result = invoke("select", "--method", "gps", spec, folder, "-o", tmp_path / "m.safetensors")
    assert_one_error(result, message, alone=False, absent=[tmp_path / "m.safetensors"])
