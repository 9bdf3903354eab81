"""fps_onnx.integrations.optax: masks as a Flax-layout pytree, and zero_unselected after adamw.

Needs the jax extra (pip install -e ".[test,jax]"); skipped without it.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")

import flax.linen as fnn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fps_onnx.errors import MaskError  # noqa: E402
from fps_onnx.integrations.optax import mask_tree, scale_updates, step_scale_tree, zero_unselected  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class FlaxMLP(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        return fnn.Dense(4, name="fc2")(fnn.relu(fnn.Dense(8, name="fc1")(x)))


def converted(seed: int = 0):
    """(torch model, Flax params with the same weights: kernel = weight.T)."""
    torch.manual_seed(seed)
    model = TorchMLP()
    params = {"params": {name: {"kernel": jnp.asarray(layer.weight.detach().numpy().T),
                                "bias": jnp.asarray(layer.bias.detach().numpy())}
                         for name, layer in (("fc1", model.fc1), ("fc2", model.fc2))}}
    return model, params


def random_masks(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {"fc1.weight": g.random((8, 6)) < 0.3, "fc2.weight": g.random((4, 8)) < 0.3}


def batch(seed: int = 0):
    g = np.random.default_rng(seed)
    return jnp.asarray(g.standard_normal((16, 6)), jnp.float32), jnp.asarray(g.standard_normal((16, 4)), jnp.float32)


def run(params, tx, steps: int = 3):
    x, y = batch()
    loss = lambda p: jnp.mean((FlaxMLP().apply(p, x) - y) ** 2)  # noqa: E731
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_converted_flax_model_computes_what_the_torch_model_does():
    model, params = converted()
    x, _ = batch()
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(x))).numpy()
    np.testing.assert_allclose(np.asarray(FlaxMLP().apply(params, x)), expected, rtol=1e-5, atol=1e-5)


def test_mask_tree_transposes_dense_masks_and_freezes_the_rest(tmp_path):
    _, params = converted()
    masks = random_masks()
    MaskFile(masks, {}, {"method": "random"}).save(tmp_path / "m.safetensors")
    tree = mask_tree(params, tmp_path / "m.safetensors")
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    for name in ("fc1", "fc2"):
        kernel = np.asarray(tree["params"][name]["kernel"])
        assert kernel.dtype == np.bool_ and kernel.shape == params["params"][name]["kernel"].shape
        assert np.array_equal(kernel, masks[f"{name}.weight"].T)
        assert not np.asarray(tree["params"][name]["bias"]).any()


def test_mask_tree_takes_explicit_names_for_flax_module_names():
    _, params = converted()
    renamed = {"params": {"Dense_0": params["params"]["fc1"], "Dense_1": params["params"]["fc2"]}}
    masks = random_masks(1)
    with pytest.raises(MaskError, match="'fc1.weight' matches no leaf of the params; give names="):
        mask_tree(renamed, masks)
    tree = mask_tree(renamed, masks, {"params/Dense_0/kernel": "fc1.weight", "params/Dense_1/kernel": "fc2.weight"})
    assert np.array_equal(np.asarray(tree["params"]["Dense_1"]["kernel"]), masks["fc2.weight"].T)


def test_conv_masks_land_on_the_entries_flax_computes_with():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, groups=2)  # weight [6, 2, 3, 3]
    kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # Flax [3, 3, 2, 6]
    flax_conv = fnn.Conv(6, (3, 3), padding="VALID", feature_group_count=2, use_bias=False)
    params = {"params": {"kernel": jnp.asarray(kernel)}}
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(torch.from_numpy(x), conv.weight, groups=2).numpy()
    got = np.asarray(flax_conv.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)  # so the layouts really correspond

    mask = np.zeros((6, 2, 3, 3), bool)
    mask[5, 1, 0, 2] = True
    tree = mask_tree(params, {"weight": mask})
    assert np.argwhere(np.asarray(tree["params"]["kernel"])).tolist() == [[0, 2, 1, 5]]


def test_zero_unselected_last_keeps_frozen_entries_under_weight_decay():
    _, params = converted()
    masks = random_masks(2)
    tree = mask_tree(params, masks)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), zero_unselected(tree))
    trained = run(params, tx)
    for name in ("fc1", "fc2"):
        old, new = np.asarray(params["params"][name]["kernel"]), np.asarray(trained["params"][name]["kernel"])
        mask = masks[f"{name}.weight"].T
        assert np.array_equal(new[~mask], old[~mask]), name
        assert (new[mask] != old[mask]).mean() > 0.9, name
        assert np.array_equal(np.asarray(trained["params"][name]["bias"]), np.asarray(params["params"][name]["bias"]))


def test_zero_unselected_before_adamw_lets_weight_decay_move_frozen_entries():
    _, params = converted()
    masks = random_masks(2)
    tx = optax.chain(zero_unselected(mask_tree(params, masks)), optax.adamw(1e-2, weight_decay=0.1))
    trained = run(params, tx)
    old, new = np.asarray(params["params"]["fc1"]["kernel"]), np.asarray(trained["params"]["fc1"]["kernel"])
    frozen = ~masks["fc1.weight"].T
    assert (new[frozen] != old[frozen]).mean() > 0.9  # the wrong order: decay moved them


def test_masks_that_do_not_fit_the_params_are_one_mask_error():
    _, params = converted()
    with pytest.raises(MaskError, match=r"mask 'fc1.weight' \[6, 8\] does not fit the leaf params/fc1/kernel \[6, 8\] \(as \[8, 6\]"):
        mask_tree(params, {"fc1.weight": np.ones((6, 8), bool)})
    with pytest.raises(MaskError, match="'fc3.weight' matches no leaf"):
        mask_tree(params, {"fc3.weight": np.ones((4, 4), bool)})
    with pytest.raises(MaskError, match="names: 'params/fc9/kernel' is not a leaf"):
        mask_tree(params, random_masks(), {"params/fc9/kernel": "fc1.weight"})
    with pytest.raises(MaskError, match="names: mask 'nope' is not in the masks"):
        mask_tree(params, random_masks(), {"params/fc1/kernel": "nope"})
    with pytest.raises(MaskError, match="is float64, not bool"):
        mask_tree(params, {"fc1.weight": np.ones((8, 6))})

    tree = mask_tree(params, random_masks())
    smaller = {"params": {"fc1": params["params"]["fc1"]}}
    with pytest.raises(MaskError, match="the mask tree's leaf params/fc2/bias is not in the params"):
        zero_unselected(tree).init(smaller)
    other = jax.tree.map(lambda p: jnp.zeros((*p.shape, 1)), params)
    with pytest.raises(MaskError, match=r"the mask tree's leaf params/fc1/bias is \[8\], the params' \[8, 1\]"):
        zero_unselected(tree).init(other)


def _selected_with_stats(tmp_path, seed: int = 3) -> dict[str, np.ndarray]:
    """Masks of model "e"*64 and its statistics: input channel j's mean |a| is (j + 1)^2."""
    from _models import channel_stats

    masks = random_masks(seed)
    MaskFile(masks, {}, {"model_sha256": "e" * 64}).save(tmp_path / "m.safetensors")
    channel_stats({k: m.shape[1] for k, m in masks.items()}, lambda j: (j + 1.0) ** 2).save(tmp_path / "s.safetensors")
    return masks


def test_scale_updates_trains_what_train_step_scale_trains_in_torch(tmp_path):
    """The factors on a Flax kernel's rows (its input channels; 0 where not selected), and three
    AdamW steps scaled by them: the weights fps_onnx.scale_steps gives the same model in PyTorch."""
    import fps_onnx
    from fps_onnx.torch.train.recipe import Recipe

    masks = _selected_with_stats(tmp_path)
    model, params = converted(3)
    tree = step_scale_tree(params, tmp_path / "m.safetensors", tmp_path / "s.safetensors")
    factors = np.asarray(tree["params"]["fc1"]["kernel"])  # s = 1, 4, 9, 16, 25, 36: median 12.5
    expected = np.minimum(1.0, 12.5 / np.arange(1.0, 7) ** 2)[:, None] * masks["fc1.weight"].T
    np.testing.assert_allclose(factors, expected, rtol=1e-6)
    assert factors.dtype == np.float32 and not np.asarray(tree["params"]["fc1"]["bias"]).any()

    trained = run(params, optax.chain(optax.adamw(1e-2, weight_decay=0.0), scale_updates(tree)))
    plain = run(params, optax.chain(optax.adamw(1e-2, weight_decay=0.0), zero_unselected(mask_tree(params, masks))))
    fps_onnx.prepare(model, tmp_path / "m.safetensors", Recipe(train_head=False, train_bias=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    fps_onnx.scale_steps(model, optimizer, tmp_path / "m.safetensors", tmp_path / "s.safetensors")
    x, y = (torch.from_numpy(np.asarray(a)) for a in batch())
    for _ in range(3):
        torch.mean((model(x) - y) ** 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    fps_onnx.merge(model)
    for name in ("fc1", "fc2"):
        got = np.asarray(trained["params"][name]["kernel"])
        np.testing.assert_allclose(got, getattr(model, name).weight.detach().numpy().T, atol=1e-6)
        assert np.abs(got - np.asarray(plain["params"][name]["kernel"])).max() > 1e-3  # the factors acted
        frozen = ~masks[f"{name}.weight"].T
        assert np.array_equal(got[frozen], np.asarray(params["params"][name]["kernel"])[frozen])


def test_step_scale_tree_refuses_statistics_of_another_model(tmp_path):
    from fps_onnx.errors import StatsError
    from fps_onnx.stats import Stats

    _selected_with_stats(tmp_path)
    _, params = converted()
    stats = Stats.load(tmp_path / "s.safetensors")
    stats.model_sha256 = "f" * 64
    with pytest.raises(StatsError, match="of another model than the masks"):
        step_scale_tree(params, tmp_path / "m.safetensors", stats)
    with pytest.raises(StatsError, match="name no ONNX model"):
        step_scale_tree(params, MaskFile(random_masks(), {}, {}), tmp_path / "s.safetensors")
