"""The SHiRA budget (select --shira-r) and fps_onnx.integrations.peft.shira_config."""

from __future__ import annotations

import json
import re

import numpy as np
from onnx import helper
import pytest

from _cli import assert_one_error, invoke
from _models import channel_stats, make_model, rng, tensor
from fps_onnx.errors import BudgetError, MaskError
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.selection.score import SelectConfig, select_scores

# --- the budget -------------------------------------------------------------------------------


def test_shira_budget_keeps_the_top_r_times_in_plus_out_of_each_tensor():
    score = rng(0).random((6, 10))
    mask = select_scores(score, SelectConfig(shira_r=2))
    assert mask.sum() == 2 * (6 + 10)
    assert score[mask].min() > score[~mask].max()  # the top 32 of the whole tensor, not per row
    config = SelectConfig(shira_r=2)
    assert config.level == "layer" and config.budget == {"shira_r": 2}
    assert SelectConfig(shira_r=2, level="layer").level == "layer" and SelectConfig().level == "neuron"


@pytest.mark.parametrize("kwargs, message", [
    ({"shira_r": 0}, "at least 1"),
    ({"shira_r": 2, "fraction": 0.1}, "one budget"),
    ({"shira_r": 2, "per_neuron": 1}, "one budget"),
    ({"shira_r": 2, "level": "neuron", "column_cap": 2.0}, "leave out --level neuron"),
])
def test_shira_budget_settings_are_checked(kwargs, message):
    with pytest.raises(BudgetError, match=message):
        SelectConfig(**kwargs)


def test_shira_budget_refuses_conv_weights_and_too_small_layers():
    with pytest.raises(BudgetError, match=r"w \[4, 2, 3, 3\] is a Conv weight; SHiRA adapts Linear"):
        select_scores(np.ones((4, 2, 3, 3)), SelectConfig(shira_r=1), "w")
    with pytest.raises(BudgetError, match=r"--shira-r 3: layer \[5, 6\] has 30 entries, fewer than r\*\(in\+out\) = 33"):
        select_scores(np.ones((5, 6)), SelectConfig(shira_r=3), "layer")


def test_select_shira_r_writes_r_times_in_plus_out_per_weight(chain, tmp_path):
    model, data = chain
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, data, "-o", out, "--shira-r", "1", "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == {"w1": {"shape": [5, 6], "selected": 11}, "w2": {"shape": [4, 5], "selected": 9}}
    assert summary["level"] == "layer" and summary["budget"] == {"shira_r": 1}
    masks = MaskFile.load(out)
    assert json.loads(masks.meta["budget"]) == {"shira_r": 1} and masks.meta["level"] == "layer"
    # what True means and the layout are stated for readers in other stacks
    assert masks.meta["true_means"] == "trainable" and masks.meta["layout"] == "torch"
    assert masks.meta["format_version"] == "2"
    # rows of a SHiRA budget differ in count: the flat indices are stored
    assert {k: e["encoding"] for k, e in masks.tensors.items()} == {"w1": "flat", "w2": "flat"}


@pytest.mark.parametrize("args, message", [
    (("--shira-r", "3"), r"Error: --shira-r 3: weight 'w[12]' \[\d, \d\] has \d+ entries, fewer than r\*\(in\+out\)"),
    (("--shira-r", "1", "--level", "neuron", "--column-cap", "2"), "Error: --column-cap caps the columns"),
    (("--shira-r", "1", "--per-neuron", "2"), "Error: give one budget"),
])
def test_select_shira_r_bad_input_is_one_line(chain, tmp_path, args, message):
    model, data = chain
    out = tmp_path / "m.safetensors"
    assert_one_error(invoke("select", model, data, "-o", out, *args), message, alone=False, absent=[out])


def test_select_shira_r_names_a_conv_weight(tmp_path):
    conv = make_model(
        [helper.make_node("Conv", ["x", "cw"], ["y"], kernel_shape=[3, 3])],
        [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 4, 3, 3])],
        {"cw": rng(2).standard_normal((4, 2, 3, 3)).astype(np.float32)})
    path = tmp_path / "conv.onnx"
    path.write_bytes(conv.SerializeToString())
    result = invoke("select", path, "-o", tmp_path / "m.safetensors", "--method", "magnitude", "--shira-r", "1")
    assert_one_error(result, re.escape("Error: --shira-r: weight 'cw' [4, 2, 3, 3] is a Conv weight"), alone=False,
                     absent=[tmp_path / "m.safetensors"])


# --- shira_config -----------------------------------------------------------------------------

BUILD = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(2, 12)
'''


@pytest.fixture()
def mlp(tmp_path):
    """(build function, SPEC) of a seeded 3-Linear MLP: fc1 [16, 12], fc2 [8, 16], classifier [3, 8]."""
    (tmp_path / "mlp_spec.py").write_text(BUILD)
    namespace: dict = {}
    exec(compile(BUILD, "mlp_spec", "exec"), namespace)
    return namespace["build"], f"{tmp_path / 'mlp_spec.py'}:build"


def top_masks(model, r: int, seed: int = 0, names=("fc1", "fc2")) -> dict[str, np.ndarray]:
    """Random masks of exactly r*(in+out) entries per named Linear."""
    g = np.random.default_rng(seed)
    masks = {}
    for name in names:
        out, fan_in = getattr(model, name).weight.shape
        flat = np.zeros(out * fan_in, bool)
        flat[g.choice(out * fan_in, r * (out + fan_in), replace=False)] = True
        masks[f"{name}.weight"] = flat.reshape(out, fan_in)
    return masks


def train(peft_model, steps: int = 4, seed: int = 0):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    for _ in range(steps):
        torch.nn.functional.cross_entropy(peft_model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return x


def test_selected_masks_become_shira_adapters_that_train_only_their_entries(mlp, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from fps_onnx.integrations.peft import shira_config

    build, spec = mlp
    model, example = build()
    onnx_path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (example,), str(onnx_path), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "N"}})
    np.save(tmp_path / "x.npy", rng(3).standard_normal((24, 12)).astype(np.float32))
    masks_path = tmp_path / "masks.safetensors"
    result = invoke("select", onnx_path, tmp_path / "x.npy", "-o", masks_path, "--shira-r", "2",
                    "--torch-model", spec, "-q")
    assert result.exit_code == 0, result.output
    masks = MaskFile.load(masks_path).masks
    assert sorted(masks) == ["classifier.weight", "fc1.weight", "fc2.weight"]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = shira_config(model, masks_path)
    assert config.r == 2 and sorted(config.target_modules) == ["classifier", "fc1", "fc2"]
    peft_model = peft.get_peft_model(model, config)
    for name, mask in masks.items():
        layer = peft_model.get_submodule(f"base_model.model.{name.removesuffix('.weight')}")
        indices = layer.shira_indices["default"].numpy()
        assert np.array_equal(indices, np.stack(np.nonzero(mask)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == sum(int(m.sum()) for m in masks.values())

    train(peft_model)
    merged = peft_model.merge_and_unload()
    for name, old in before.items():
        new = merged.state_dict()[name]
        if name in masks:
            mask = torch.from_numpy(masks[name])
            assert torch.equal(new[~mask], old[~mask]), name
            assert (new[mask] != old[mask]).float().mean() > 0.9, name
        else:
            assert torch.equal(new, old), name


def test_saved_adapter_reloads_without_the_mask_function(mlp, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from fps_onnx.integrations.peft import shira_config

    build, _ = mlp
    model, _ = build()
    config = shira_config(model, top_masks(model, 1), modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(model, config)
    x = train(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(x)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 1 and saved["mask_type"] == "fps"

    fresh, _ = build()
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert loaded.peft_config["default"].mask_fn is None
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert not torch.equal(expected, build()[0](x))  # the adapter did change the model


def test_wrong_masks_get_one_mask_error_before_peft_sees_them(mlp):
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from fps_onnx.integrations.peft import shira_config

    build, _ = mlp
    model, _ = build()
    masks = top_masks(model, 2)
    masks["fc1.weight"][tuple(np.argwhere(~masks["fc1.weight"])[0])] = True  # one entry too many
    with pytest.raises(MaskError, match=r"'fc1.weight' selects 57 entries of fc1.weight \[16, 12\], not a multiple r\*\(in\+out\) of 28"):
        shira_config(model, masks)
    mixed = {**top_masks(model, 1, names=("fc1",)), **top_masks(model, 2, names=("fc2",))}
    with pytest.raises(MaskError, match="disagree on SHiRA r: 'fc1.weight' has r=1, 'fc2.weight' has r=2"):
        shira_config(model, mixed)
    with pytest.raises(MaskError, match="fc1.bias is not the weight of an nn.Linear"):
        shira_config(model, {"fc1.bias": np.ones(16, bool)})
    with pytest.raises(MaskError, match=r"has shape \[12, 16\], but fc1.weight is \[16, 12\]"):
        shira_config(model, {"fc1.weight": np.ones((12, 16), bool)})
    with pytest.raises(MaskError, match="names no parameter"):
        shira_config(model, {"onnx::MatMul_7": np.ones((16, 12), bool)})
    with pytest.raises(MaskError, match="classifier has a mask but is in modules_to_save"):
        shira_config(model, top_masks(model, 1, names=("classifier",)), modules_to_save=["classifier"])
    with pytest.raises(TypeError, match="sets r"):
        shira_config(model, top_masks(model, 1), r=4)

    other, _ = build()  # a config is bound to the layers of the model it was built from
    config = shira_config(model, top_masks(model, 1))
    import peft

    with pytest.raises(MaskError, match=r"layer \(Linear \[\d+, \d+\]\) that shira_config did not see"):
        peft.get_peft_model(other, config)
    assert isinstance(other.fc1, torch.nn.Linear)


def test_backbone_keys_resolve_under_a_wrapper(mlp):
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from fps_onnx.integrations.peft import shira_config

    build, _ = mlp
    inner, _ = build()
    wrapper = torch.nn.Sequential()
    wrapper.add_module("backbone", inner)
    config = shira_config(wrapper, top_masks(inner, 1))  # keys fc1.weight, fc2.weight
    assert sorted(config.target_modules) == ["backbone.fc1", "backbone.fc2"]


def test_select_a_shira_budget_at_neuron_level_from_the_cli(chain, tmp_path):
    model, data = chain
    out = tmp_path / "m.safetensors"
    result = invoke("select", model, data, "-o", out, "--shira-r", "1", "--level", "neuron", "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == {"w1": {"shape": [5, 6], "selected": 11}, "w2": {"shape": [4, 5], "selected": 9}}
    assert summary["level"] == "neuron" and summary["budget"] == {"shira_r": 1}
    masks = MaskFile.load(out)
    assert sorted(masks.dense("w1").sum(axis=1).tolist()) == [2, 2, 2, 2, 3]


def test_scale_steps_on_a_shira_adapter_trains_what_the_sparse_trainer_does(mlp, tmp_path):
    """train --step-scale's factors on SHiRA's values (each by its column's channel) give, after
    three AdamW steps with weight decay, the weights fps_onnx.scale_steps gives the sparse deltas."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import fps_onnx
    from fps_onnx.integrations.peft import scale_steps, shira_config
    from fps_onnx.torch.train.recipe import Recipe

    build, _ = mlp
    masks = top_masks(build()[0], 2)
    MaskFile(masks, {}, {"model_sha256": "e" * 64}).save(tmp_path / "m.safetensors")
    channel_stats({k: m.shape[1] for k, m in masks.items()}, lambda j: (j + 1.0) ** 2).save(tmp_path / "s.safetensors")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)

    def trained(kind: str) -> dict:
        model, _ = build()
        if kind == "sparse":
            fps_onnx.prepare(model, tmp_path / "m.safetensors", Recipe(train_head=False, train_bias=False))
            net = model
        else:
            net = peft.get_peft_model(model, shira_config(model, tmp_path / "m.safetensors"))
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        if kind == "sparse":
            fps_onnx.scale_steps(model, optimizer, tmp_path / "m.safetensors", tmp_path / "s.safetensors")
        elif kind == "shira":
            assert scale_steps(net, optimizer, tmp_path / "m.safetensors", tmp_path / "s.safetensors") is optimizer
        for _ in range(3):
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        if kind == "sparse":
            fps_onnx.merge(model)
            return model.state_dict()
        return net.merge_and_unload().state_dict()

    sparse, shira, plain = trained("sparse"), trained("shira"), trained("shira-unscaled")
    for key in masks:
        torch.testing.assert_close(shira[key], sparse[key], rtol=0, atol=1e-6)
        assert (shira[key] - plain[key]).abs().max() > 1e-3  # the factors acted


def test_scale_steps_on_a_shira_adapter_refuses_masks_it_was_not_built_from(mlp, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from fps_onnx.integrations.peft import scale_steps, shira_config

    build, _ = mlp
    model, _ = build()
    masks = top_masks(model, 1)
    MaskFile({"fc1.weight": masks["fc1.weight"]}, {}, {"model_sha256": "e" * 64}).save(tmp_path / "one.safetensors")
    MaskFile(masks, {}, {"model_sha256": "e" * 64}).save(tmp_path / "both.safetensors")
    stats = channel_stats({k: m.shape[1] for k, m in masks.items()}, np.ones_like)
    net = peft.get_peft_model(model, shira_config(model, tmp_path / "one.safetensors"))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    with pytest.raises(MaskError, match="mask 'fc2.weight' names no SHiRA layers of adapter 'default'"):
        scale_steps(net, optimizer, tmp_path / "both.safetensors", stats)
