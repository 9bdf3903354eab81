"""Training loop and data readers: recipe switches, schedule, learning, best epoch, bad data."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fps_onnx.errors import DataError, MaskError  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402
from fps_onnx.torch.train import loop, sparse  # noqa: E402
from fps_onnx.torch.train.data import ImageSpec, open_split  # noqa: E402
from fps_onnx.torch.train.recipe import Recipe, RecipeError  # noqa: E402


class Net(nn.Module):
    def __init__(self, classes=3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x)).mean((2, 3))
        return self.head(torch.relu(self.fc(self.norm(h))))


def _masks(model, fraction=0.3):
    rng = np.random.default_rng(0)
    return {n: rng.random(tuple(p.shape)) < fraction for n, p in model.named_parameters()
            if n.endswith("weight") and p.ndim > 1}


def _task(n=96, seed=0):
    """Class = which colour channel is brightest: learnable by a tiny conv net."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y] += 1.5
    return torch.utils.data.TensorDataset(x, y)


def test_recipe_rejects_bad_values():
    with pytest.raises(RecipeError, match="learning rate"):
        Recipe(lr=0)
    with pytest.raises(RecipeError, match="epochs"):
        Recipe(epochs=0)


def test_schedule_warms_up_then_decays_to_min_lr():
    p = nn.Parameter(torch.zeros(1))
    recipe = Recipe(epochs=4, lr=1.0, warmup_epochs=1, min_lr=0.01)
    opt = torch.optim.SGD([p], lr=recipe.lr)
    sched = loop.make_schedule(opt, recipe, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)


def test_default_recipe_trains_deltas_head_and_biases_not_norms():
    torch.manual_seed(0)
    model = Net()
    trainable = loop.prepare(model, _masks(model))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.head == ["head.weight", "head.bias"]
    assert names == {"stem.bias", "fc.bias", "head.weight", "head.bias",
                     "stem.parametrizations.weight.0.values", "fc.parametrizations.weight.0.values"}
    assert "head.weight" not in trainable.deltas  # the head is trained fully, its mask ignored


def test_recipe_switches():
    torch.manual_seed(0)
    model = Net()
    loop.prepare(model, _masks(model), Recipe(train_head=False, train_bias=False, train_norm=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"norm.weight", "norm.bias", "stem.parametrizations.weight.0.values",
                     "fc.parametrizations.weight.0.values", "head.parametrizations.weight.0.values"}
    groups = loop.param_groups(model, Recipe(weight_decay=0.1))
    assert {id(p) for p in groups[1]["params"]} == {id(model.norm.weight), id(model.norm.bias)}


class Wrapped(nn.Module):
    """A task wrapper: the backbone ``Net`` under ``net.``, a new classifier beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.classifier = nn.Linear(3, 2)


@pytest.mark.parametrize("as_file", [False, True])
def test_backbone_mask_keys_name_the_wrapped_parameters(tmp_path, as_file):
    torch.manual_seed(0)
    model = Wrapped()
    masks = _masks(model.net)  # stem.weight, fc.weight, head.weight: the backbone's own names
    source = masks
    if as_file:
        source = tmp_path / "m.safetensors"
        MaskFile(masks, {}).save(source)
    trainable = loop.prepare(model, source)
    assert set(trainable.deltas) == {"net.stem.weight", "net.fc.weight", "net.head.weight"}
    assert trainable.selected == sum(int(m.sum()) for m in masks.values())
    assert trainable.head == ["classifier.weight", "classifier.bias"]


def test_a_mask_key_several_parameters_end_with_is_refused():
    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Net(), Net()

    model = Twin()
    with pytest.raises(MaskError, match="'fc.weight' is ambiguous: 2 parameters end with it"):
        loop.prepare(model, {"fc.weight": np.ones((8, 8), bool)})


def test_fit_learns_keeps_best_epoch_and_frozen_entries():
    torch.manual_seed(0)
    model = Net()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(model)
    trainable = loop.prepare(model, masks)
    train = torch.utils.data.DataLoader(_task(96), batch_size=16, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(_task(48, seed=1), batch_size=16)
    states = {}

    def remember(record):
        states[record["epoch"]] = {k: v.clone() for k, v in sparse.merged_state_dict(model).items()}

    history = loop.fit(model, train, val, recipe=Recipe(epochs=5, lr=0.05), on_epoch=remember)
    accs = [r["val_accuracy"] for r in history["epochs"]]
    assert max(accs) >= 0.9
    assert history["best_epoch"] == 1 + int(np.argmax(accs))
    assert history["epochs"][-1]["train_loss"] < history["epochs"][0]["train_loss"]
    assert all(r["peak_memory_bytes"] > 0 and r["seconds"] > 0 for r in history["epochs"])
    final = sparse.merged_state_dict(model)
    best = states[history["best_epoch"]]
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert loop.evaluate(model, val, "cpu") == pytest.approx(max(accs))
    for name, before in start.items():
        if name in trainable.dense:
            continue
        if name in trainable.deltas:
            mask = torch.from_numpy(masks[name])
            assert torch.equal(final[name][~mask], before[~mask])
            assert not torch.equal(final[name][mask], before[mask])
        else:
            assert torch.equal(final[name], before), name


# ------------------------------------------------------------------------------------ data


def _image(path, colour):
    from PIL import Image

    Image.new("RGB", (12, 10), colour).save(path)


def test_image_folder_labels_by_sorted_class_and_decodes(tmp_path):
    for cls, colour in (("cat", (255, 0, 0)), ("ant", (0, 0, 255))):
        (tmp_path / "train" / cls / "deep").mkdir(parents=True)
        _image(tmp_path / "train" / cls / "a.png", colour)
        _image(tmp_path / "train" / cls / "deep" / "b.jpg", colour)
    split = open_split(tmp_path / "train")
    split.set_image(ImageSpec(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    assert split.classes == ["ant", "cat"] and len(split) == 4
    x, y = split[0]
    assert x.shape == (3, 8, 8) and y == 0
    assert x[2].mean() > 0.9 and x[0].mean() < 0.1  # blue ant
    (tmp_path / "val" / "dog").mkdir(parents=True)
    _image(tmp_path / "val" / "dog" / "c.png", (0, 0, 0))
    with pytest.raises(DataError, match="'dog' is not a class of the training split"):
        open_split(tmp_path / "val", split.classes)


def test_folder_without_classes_is_refused(tmp_path):
    _image(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(DataError, match="has no classes"):
        open_split(tmp_path)


def test_npz_grey_uint8_images_become_normalised_rgb(tmp_path):
    x = np.full((5, 4, 4), 255, np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    split = open_split(tmp_path / "d.npz")
    split.set_image(ImageSpec(size=8))
    img, label = split[3]
    assert img.shape == (3, 8, 8) and label == 3 and split.num_classes() == 5
    expected = (1.0 - torch.tensor(ImageSpec(8).mean)) / torch.tensor(ImageSpec(8).std)
    torch.testing.assert_close(img[:, 0, 0], expected.float())


def test_token_npz_and_labels_out_of_range(tmp_path):
    ids = np.arange(12).reshape(3, 4)
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=np.ones_like(ids), extra=ids, labels=[0, 1, 7])
    split = open_split(tmp_path / "t.npz")
    split.set_inputs(["input_ids", "attention_mask"])
    inputs, label = split[1]
    assert set(inputs) == {"input_ids", "attention_mask"} and label == 1
    assert torch.equal(inputs["input_ids"], torch.tensor([4, 5, 6, 7]))
    with pytest.raises(DataError, match="label 7 is out of range for 3 classes"):
        split.check_labels(3)
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 3)))
    with pytest.raises(DataError, match="no labels"):
        open_split(tmp_path / "nolabels.npz")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_with_bf16_autocast_keeps_frozen_entries():
    torch.manual_seed(0)
    model = Net()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(model)
    trainable = loop.prepare(model, masks)
    model.cuda()
    train = torch.utils.data.DataLoader(_task(96), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(_task(48, seed=1), batch_size=16)
    history = loop.fit(model, train, val, recipe=Recipe(epochs=4, lr=0.05), device="cuda")
    assert max(r["val_accuracy"] for r in history["epochs"]) >= 0.9
    assert history["epochs"][0]["peak_memory_kind"] == "cuda_max_allocated"
    final = {k: v.cpu() for k, v in sparse.merged_state_dict(model).items()}
    for name in trainable.deltas:
        mask = torch.from_numpy(masks[name])
        assert torch.equal(final[name][~mask], start[name][~mask])
        assert not torch.equal(final[name][mask], start[name][mask])


class BnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("train_norm", [False, True])
def test_frozen_batch_norm_keeps_its_running_statistics(train_norm):
    torch.manual_seed(0)
    model = BnNet()
    model.bn.running_mean.fill_(0.5)
    before = model.bn.running_mean.clone()
    recipe = Recipe(epochs=1, lr=1e-2, train_norm=train_norm)
    loop.prepare(model, _masks(model), recipe)
    loader = torch.utils.data.DataLoader(_task(32), batch_size=8)
    loop.fit(model, loader, recipe=recipe)
    assert torch.equal(model.bn.running_mean, before) != train_norm


def test_the_trainer_fixes_the_mmap_threshold_unless_the_environment_sets_it(monkeypatch):
    """`fps-onnx train` returns freed buffers to the OS (glibc's M_MMAP_THRESHOLD at 128 KiB) for a lower
    peak RSS; a user's MALLOC_MMAP_THRESHOLD_ wins (docs/training.md), and off glibc nothing happens."""
    import ctypes

    from fps_onnx.torch.train import run

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    run._return_freed_memory()
    assert calls == [(-3, 128 * 1024)]  # M_MMAP_THRESHOLD
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    run._return_freed_memory()
    assert calls == [(-3, 128 * 1024)]  # left to the environment's setting

    def no_libc(name):
        raise OSError("no such library")

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    run._return_freed_memory()  # off glibc: a no-op, no error
    assert calls == [(-3, 128 * 1024)]
