"""Sparse deltas: only selected entries move, the GPS step is reproduced, merge is exact."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fps_onnx.errors import MaskError  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402
from fps_onnx.torch.train import delta as delta_file  # noqa: E402
from fps_onnx.torch.train import kernels, sparse  # noqa: E402
from fps_onnx.torch.train.masks import attach_masks  # noqa: E402


class Tiny(nn.Module):
    """Conv, grouped conv, depthwise conv, two Linears, one used twice (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.depth = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.group(x)) + self.depth(x)
        h = torch.tanh(self.fc(x.mean((2, 3))))
        return self.out(h + torch.tanh(self.fc.weight.sum(1)))


def _masks(model, fraction=0.25, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.random(tuple(p.shape)) < fraction
            for n, p in model.named_parameters() if n.endswith("weight")}


def _model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def test_only_selected_values_are_trainable_and_k_sized():
    model = _model()
    masks = _masks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    attached = sparse.attach(model, masks)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(attached) == set(masks)
    assert len(trainable) == len(masks)
    for name, delta in attached.items():
        assert delta.values.shape == (int(masks[name].sum()),)
        assert delta.indices.dtype == torch.int32  # half of int64's memory, held all run
        assert torch.equal(delta.flat(), torch.from_numpy(np.flatnonzero(masks[name])))


def test_training_moves_selected_entries_only_and_keeps_no_dense_grad():
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = _masks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    sparse.attach(model, masks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(6, 3, 8, 8)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    state = sparse.merged_state_dict(model)
    assert set(state) == set(start)
    for name, before in start.items():
        after = state[name]
        if name in masks:
            mask = torch.from_numpy(masks[name])
            assert torch.equal(after[~mask], before[~mask])  # bit-identical outside the mask
            assert (after[mask] != before[mask]).float().mean() > 0.9  # selected entries moved
        else:
            assert torch.equal(after, before)  # biases were frozen here
    for state_tensor in opt.state.values():
        for t in state_tensor.values():
            assert t.numel() <= max(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_step_equals_gps_dense_masked_gradient(optimizer):
    x, target = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    make = {"adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)}[optimizer]

    gps = _model()
    masks = _masks(gps)
    opt = make(list(gps.parameters()))
    for _ in range(2):
        nn.functional.cross_entropy(gps(x), target).backward()
        for name, p in gps.named_parameters():
            p.grad = p.grad * torch.from_numpy(masks[name]) if name in masks else torch.zeros_like(p)
        opt.step()
        opt.zero_grad()

    ours = _model()
    for p in ours.parameters():
        p.requires_grad_(False)
    sparse.attach(ours, masks)
    opt = make([p for p in ours.parameters() if p.requires_grad])
    for _ in range(2):
        nn.functional.cross_entropy(ours(x), target).backward()
        opt.step()
        opt.zero_grad()

    merged = sparse.merged_state_dict(ours)
    for name, p in gps.named_parameters():
        torch.testing.assert_close(merged[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_merge_gives_plain_modules_with_same_outputs_and_reloads():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    sparse.attach(model, _masks(model))
    with torch.no_grad():
        for delta in sparse.deltas(model).values():
            delta.values.normal_()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    sparse.merge(model)
    assert not sparse.deltas(model)
    assert type(model.fc) is nn.Linear and not hasattr(model.fc, "parametrizations")
    state = model.state_dict()
    assert set(state) == set(_model().state_dict())
    fresh = _model(seed=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_delta_file_applied_to_start_model_reproduces_merged(tmp_path):
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    sparse.attach(model, _masks(model))
    model.fc.bias.requires_grad_(True)
    with torch.no_grad():
        for delta in sparse.deltas(model).values():
            delta.values.uniform_(-1, 1)
        model.fc.bias.add_(1.0)
    delta_file.save_delta(model, tmp_path / "delta.safetensors", dense=["fc.bias"])
    rebuilt = delta_file.apply_delta(_model(), tmp_path / "delta.safetensors")
    merged = sparse.merged_state_dict(model)
    for name, value in rebuilt.state_dict().items():
        assert torch.equal(value, merged[name]), name


class Tokens(nn.Module):
    """Linears on [batch, tokens, features]: the exporter folds their transposes away."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean(1)


def test_onnx_keyed_masks_are_mapped_by_value(tmp_path):
    pytest.importorskip("onnx")
    import onnx

    from fps_onnx.onnx import graph

    torch.manual_seed(0)
    model = Tokens()
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 6),), str(path), dynamo=False, input_names=["x"])
    proto = onnx.load(str(path))
    sites = graph.find_weights(proto)
    assert not {s.key for s in sites} & {"a.weight", "b.weight"}  # anonymous initializer names
    rng = np.random.default_rng(0)
    masks = {s.key: rng.random(s.shape) < 0.3 for s in sites}
    tensors = {s.key: {"onnx_initializer": s.key, "onnx_layout": s.layout, "op": s.op,
                       "shape": list(s.shape), "selected": int(masks[s.key].sum())} for s in sites}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    attached = attach_masks(model, MaskFile(masks, tensors), onnx_model=path)
    assert set(attached) == {"a.weight", "b.weight"}
    by_shape = {tuple(m.shape): m for m in masks.values()}
    for name, delta in attached.items():
        expected = np.flatnonzero(by_shape[shapes[name]])
        assert np.array_equal(delta.indices.numpy(), expected)

    with pytest.raises(MaskError, match="fps-onnx map"):
        attach_masks(Tokens(), MaskFile(masks, tensors))


def test_the_old_load_masks_name_is_attach_masks_and_warns():
    with pytest.warns(DeprecationWarning, match="train.masks.attach_masks"):
        old = sparse.load_masks
    assert old is attach_masks
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sparse.nothing  # noqa: B018


def test_mask_shape_mismatch_is_refused():
    masks = _masks(_model())
    masks["fc.weight"] = np.ones((16, 9), bool)
    with pytest.raises(MaskError, match=r"mask 'fc.weight' has shape \[16, 9\].*\[16, 8\]"):
        sparse.attach(_model(), masks)


def test_empty_selection_and_unknown_names_are_refused():
    model = _model()
    empty = {n: np.zeros(tuple(p.shape), bool) for n, p in model.named_parameters()}
    with pytest.raises(MaskError, match="selects no entries"):
        sparse.attach(model, empty)
    with pytest.raises(MaskError, match="names no parameter"):
        sparse.attach(_model(), {"fc.weight": np.ones((16, 8), bool), "nope.weight": np.ones(3, bool)})


def test_works_under_autograd_reuse_and_no_grad_inference():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    sparse.attach(model, _masks(model))
    with torch.inference_mode():
        y = model(torch.randn(1, 3, 8, 8))
    assert y.shape == (1, 4)
    loss = model(torch.randn(2, 3, 8, 8)).sum() + model(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()  # the tied fc weight is read three times per step
    assert sparse.deltas(model)["fc.weight"].values.grad is not None


# --------------------------------------------------------------------------- forged delta files


def _delta_file(tmp_path):
    """(tensors, metadata) of a real delta file of Tiny (sparse weights, dense fc.bias)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = _model()
    sparse.attach(model, _masks(model))
    with torch.no_grad():
        for delta in sparse.deltas(model).values():
            delta.values.uniform_(-1, 1)
    delta_file.save_delta(model, tmp_path / "real.safetensors", dense=["fc.bias"])
    with safe_open(str(tmp_path / "real.safetensors"), "pt") as fh:
        meta = dict(fh.metadata())
    return load_file(str(tmp_path / "real.safetensors")), meta


def _tensor(name, value):
    return lambda t, m: t.__setitem__(name, value)


def _meta(name, value):
    return lambda t, m: m.__setitem__(name, value)


def _pop(name):
    return lambda t, m: t.pop(name)


N = 16 * 8  # fc.weight entries


FORGED_DELTAS = [
    (_meta("format_version", "99"), "has delta format version 99, this fps-onnx reads 1"),
    (_meta("format", "pt"), "is not an fps-onnx delta file"),
    (lambda t, m: m.pop("shapes"), "metadata 'shapes' is missing"),
    (_meta("shapes", "{oops"), "metadata 'shapes' is not JSON"),
    (_meta("shapes", "[]"), "metadata 'shapes' must map names to lists of non-negative integers"),
    (lambda t, m: m.__setitem__("shapes", m["shapes"].replace("[16, 8]", '"16x8"')), "'shapes' must map"),
    (lambda t, m: m.__setitem__("shapes", m["shapes"].replace("[16, 8]", "[-16, 8]")), "'shapes' must map"),
    (_meta("dense", '"fc.bias"'), "metadata 'dense' must be a list of distinct names"),
    (_meta("dense", '["fc.bias", "fc.bias"]'), "metadata 'dense' must be a list of distinct names"),
    (_pop("fc.weight:values"), "tensor 'fc.weight:values' is missing"),
    (_pop("fc.weight:indices"), "tensor 'fc.weight:indices' is missing"),
    (_pop("fc.bias"), "tensor 'fc.bias' is missing"),
    (_tensor("extra", torch.zeros(2)), "unexpected tensor 'extra'"),
    (_tensor("head.weight:values", torch.zeros(2)), "unexpected tensor 'head.weight:values'"),
    (lambda t, m: m.__setitem__("shapes", m["shapes"].replace("[16, 8]", "[16, 9]")),
     r"delta for fc.weight \[16, 9\] does not fit the model \(its fc.weight is \[16, 8\]\)"),
    (lambda t, m: [m.__setitem__("shapes", m["shapes"].replace('"fc.weight"', '"fc.w"')),
                   t.__setitem__("fc.w:indices", t.pop("fc.weight:indices")),
                   t.__setitem__("fc.w:values", t.pop("fc.weight:values"))], "its fc.w does not exist"),
    (lambda t, m: t["fc.weight:indices"].__setitem__(0, N), rf"fc.weight:indices must lie in \[0, {N}\)"),
    (lambda t, m: t["fc.weight:indices"].__setitem__(0, -1), rf"fc.weight:indices must lie in \[0, {N}\)"),
    (lambda t, m: t["fc.weight:indices"].__setitem__(1, int(t["fc.weight:indices"][0])),
     "fc.weight:indices repeat an entry"),
    (lambda t, m: t.__setitem__("fc.weight:indices", t["fc.weight:indices"].int()),
     "fc.weight:indices must be a 1-D int64 tensor, not torch.int32"),
    (lambda t, m: t.__setitem__("fc.weight:indices", t["fc.weight:indices"][None]),
     "fc.weight:indices must be a 1-D int64 tensor"),
    (lambda t, m: t.__setitem__("fc.weight:values", t["fc.weight:values"][1:]),
     "fc.weight:values must be a 1-D float tensor of"),
    (lambda t, m: t.__setitem__("fc.weight:values", t["fc.weight:values"].long()),
     "fc.weight:values must be a 1-D float tensor of .* not torch.int64"),
    (lambda t, m: t["fc.weight:values"].__setitem__(0, float("nan")), "fc.weight:values holds NaN or Inf"),
    (_tensor("fc.bias", torch.zeros(3)), r"tensor fc.bias \[3\] does not fit the model"),
    (_tensor("fc.bias", torch.full((16,), float("inf"))), "tensor fc.bias holds NaN or Inf"),
    # finite values that the float32 weight cannot hold, or that complex/bool/int tensors stand for
    (lambda t, m: t.__setitem__("fc.weight:values", t["fc.weight:values"].double().index_fill(0, torch.tensor([3]), 1e300)),
     "fc.weight:values do not fit the model's torch.float32 weight"),
    (lambda t, m: t.__setitem__("fc.weight:values", t["fc.weight:values"].double().index_fill(0, torch.tensor([0]), -1e300)),
     "fc.weight:values do not fit the model's torch.float32 weight"),
    (lambda t, m: t.__setitem__("fc.weight:values", t["fc.weight:values"].to(torch.complex64)),
     "fc.weight:values must be a 1-D float tensor of .* not torch.complex64"),
    (lambda t, m: t.__setitem__("fc.weight:values", t["fc.weight:values"] > 0),
     "fc.weight:values must be a 1-D float tensor of .* not torch.bool"),
    (_tensor("fc.bias", torch.full((16,), 1e300, dtype=torch.float64)),
     "tensor fc.bias holds NaN or Inf, or values beyond the model's torch.float32"),
    (_tensor("fc.bias", torch.ones(16, dtype=torch.bool)),
     "tensor fc.bias must be a real float tensor like the model's torch.float32 fc.bias, not torch.bool"),
    (_tensor("fc.bias", torch.ones(16, dtype=torch.complex64)),
     "tensor fc.bias must be a real float tensor .* not torch.complex64"),
    (_tensor("fc.bias", torch.ones(16, dtype=torch.int64)),
     "tensor fc.bias must be a real float tensor .* not torch.int64"),
]


@pytest.mark.parametrize("change, message", FORGED_DELTAS)
def test_forged_delta_files_are_refused_and_change_nothing(tmp_path, change, message):
    from safetensors.torch import save_file

    tensors, meta = _delta_file(tmp_path)
    tensors = {k: v.clone() for k, v in tensors.items()}
    change(tensors, meta)
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata=meta)
    model, start = _model(), _model().state_dict()
    with pytest.raises(MaskError, match=message) as info:
        delta_file.apply_delta(model, tmp_path / "d.safetensors")
    assert len(str(info.value).splitlines()) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name


@pytest.mark.parametrize("value, weight, message", [
    (1e38, 0.0, "do not fit the model's torch.float16 weight"),
    (-7e4, 0.0, "do not fit the model's torch.float16 weight"),
    (65500.0, 100.0, "weight \\+ delta overflows the model's torch.float16 weight"),
    (6e4, 0.0, None),
])
def test_delta_values_must_fit_a_float16_weight(tmp_path, value, weight, message):
    from safetensors.torch import save_file

    model = nn.Linear(4, 2).half()
    with torch.no_grad():
        model.weight.view(-1)[5] = weight
    start = model.weight.detach().clone()
    meta = {"format": delta_file.DELTA_FORMAT, "format_version": delta_file.DELTA_FORMAT_VERSION,
            "shapes": '{"weight": [2, 4]}', "dense": "[]"}
    save_file({"weight:indices": torch.tensor([1, 5]), "weight:values": torch.tensor([0.5, value])},
              str(tmp_path / "d.safetensors"), metadata=meta)
    if message is None:
        delta_file.apply_delta(model, tmp_path / "d.safetensors")
        assert model.weight.dtype == torch.float16 and bool(torch.isfinite(model.weight).all())
        assert float(model.weight.view(-1)[5]) == pytest.approx(weight + value, rel=1e-3)
        return
    with pytest.raises(MaskError, match=message):
        delta_file.apply_delta(model, tmp_path / "d.safetensors")
    assert torch.equal(model.weight, start)


def test_the_unforged_delta_file_applies(tmp_path):
    from safetensors.torch import save_file

    tensors, meta = _delta_file(tmp_path)
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata=meta)
    model = delta_file.apply_delta(_model(), tmp_path / "d.safetensors")
    assert not torch.equal(model.fc.weight, _model().fc.weight)


def test_missing_and_corrupt_delta_files(tmp_path):
    with pytest.raises(MaskError, match="delta file .*none.safetensors does not exist"):
        delta_file.apply_delta(_model(), tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(MaskError, match="cannot read delta file"):
        delta_file.apply_delta(_model(), tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- sparse Linear gradient


class Shared(nn.Module):
    """Linears on [batch, tokens, features]; ``b`` and ``c`` share one weight, the
    embedding is tied to the output head, ``a``'s weight is also read directly."""

    def __init__(self, d=12, hidden=20, vocab=17, bias=True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.a = nn.Linear(d, hidden, bias=bias)
        self.b = nn.Linear(hidden, d, bias=bias)
        self.c = nn.Linear(hidden, d, bias=False)
        self.c.weight = self.b.weight
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.a(self.emb(ids)))
        return self.head(self.b(h) * self.c(h).sigmoid() + self.a.weight.mean())


def _grads(model, masks, sparse_linear, ids, train_bias=False):
    for p in model.parameters():
        p.requires_grad_(False)
    sparse.attach(model, masks, sparse_linear=sparse_linear)
    if train_bias:
        model.a.bias.requires_grad_(True)
    model(ids).square().mean().backward()
    out = {n: d.values.grad.clone() for n, d in sparse.unique_deltas(model).items()}
    if train_bias:
        out["a.bias"] = model.a.bias.grad.clone()
    return out


@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_sparse_linear_gradient_equals_dense_path(seed, sampled, monkeypatch):
    if not sampled:  # the gathering kernel (used off CPU)
        monkeypatch.setattr(kernels, "_SAMPLED_DEVICES", ())
    rng = np.random.default_rng(seed)
    d, hidden, vocab = (int(v) for v in rng.integers(3, 40, 3))
    bias = bool(seed % 2)
    ids = torch.from_numpy(rng.integers(0, vocab, (int(rng.integers(1, 4)), int(rng.integers(1, 9)))))

    def build():
        torch.manual_seed(seed)
        return Shared(d, hidden, vocab, bias)

    masks = _masks(build(), fraction=float(rng.uniform(0.05, 0.9)), seed=seed)
    dense = _grads(build(), masks, False, ids, train_bias=bias)
    fast_model = build()
    fast = _grads(fast_model, masks, True, ids, train_bias=bias)
    assert all(isinstance(m, sparse._SparseForward) for m in (fast_model.a, fast_model.b, fast_model.c, fast_model.head))
    assert set(fast) == set(dense)
    for name in dense:
        torch.testing.assert_close(fast[name], dense[name], rtol=1e-5, atol=1e-7)


def test_sparse_linear_never_builds_a_dense_weight_gradient(monkeypatch):
    def fail(ctx, grad):
        raise AssertionError("dense weight gradient computed")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    sparse.attach(model, _masks(model, 0.3))
    monkeypatch.setattr(kernels.GatherGrad, "backward", staticmethod(fail))
    model(torch.randn(4, 5, 6)).sum().backward()
    assert all(d.values.grad is not None for d in sparse.deltas(model).values())
    monkeypatch.setattr(sparse, "_SPARSE_GRAD_DEVICES", ())  # other devices: the parametrisation
    with pytest.raises(AssertionError, match="dense weight gradient"):
        model(torch.randn(4, 5, 6)).sum().backward()
    sparse.merge(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_sparse_linear_training_gives_the_dense_paths_updates():
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 17, (3, 7)))
    merged = []
    for sparse_linear in (False, True):
        torch.manual_seed(3)
        model = Shared()
        for p in model.parameters():
            p.requires_grad_(False)
        sparse.attach(model, _masks(model, 0.2), sparse_linear=sparse_linear)
        model.a.bias.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(4):
            model(ids).square().mean().backward()
            opt.step()
            opt.zero_grad()
        merged.append(sparse.merged_state_dict(model))
    start = Shared().state_dict()
    for name, value in merged[0].items():
        torch.testing.assert_close(merged[1][name], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[1]["a.weight"], start["a.weight"])


def test_sparse_linear_under_checkpointing_and_cpu_autocast():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    grads = {}
    for mode in ("dense", "checkpoint", "autocast-dense", "autocast"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        for p in model.parameters():
            p.requires_grad_(False)
        sparse.attach(model, _masks(model, 0.3), sparse_linear=not mode.endswith("dense"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("autocast")):
            y = checkpoint(model, x, use_reentrant=False) if mode == "checkpoint" else model(x)
        assert y.dtype == (torch.bfloat16 if mode.startswith("autocast") else torch.float32)
        y.float().square().sum().backward()
        grads[mode] = [d.values.grad for d in sparse.deltas(model).values()]
        assert all(g.dtype == torch.float32 for g in grads[mode])
    for a, b in zip(grads["checkpoint"], grads["dense"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads["autocast"], grads["autocast-dense"]):  # bf16 matmuls on both paths
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))


@pytest.mark.parametrize("sampled", [True, False])
def test_sparse_linear_on_transformers_conv1d(sampled, monkeypatch):
    if not sampled:
        monkeypatch.setattr(kernels, "_SAMPLED_DEVICES", ())
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6)
    grads = []
    for sparse_linear in (False, True):
        torch.manual_seed(2)
        model = nn.Sequential(pytorch_utils.Conv1D(10, 6), nn.Tanh(), pytorch_utils.Conv1D(5, 10))
        for p in model.parameters():
            p.requires_grad_(False)
        sparse.attach(model, _masks(model, 0.4), sparse_linear=sparse_linear)
        model[0].bias.requires_grad_(True)
        model(x).square().sum().backward()
        grads.append([d.values.grad for d in sparse.deltas(model).values()] + [model[0].bias.grad])
        assert isinstance(model[0], sparse._SparseForward) == sparse_linear
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    sparse.merge(model)
    assert type(model[0]) is pytorch_utils.Conv1D


def test_entry_gradient_kernels_agree_on_large_and_unsorted_inputs(monkeypatch):
    torch.manual_seed(0)
    g, x = torch.randn(300, 40), torch.randn(300, 30)  # [tokens, out], [tokens, in]
    picked = torch.randperm(40 * 30)[:500]
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 300 * 64)  # several chunks
    for devices in (("cpu",), ()):  # sampled_addmm, then the gathering kernel
        monkeypatch.setattr(kernels, "_SAMPLED_DEVICES", devices)
        for indices in (picked.sort().values, picked):  # unsorted: always gathered
            for transposed, full in ((False, g.t() @ x), (True, x.t() @ g)):
                got = kernels._entry_grad(g, x, indices, full.shape[1], transposed)
                torch.testing.assert_close(got, full.reshape(-1)[indices], rtol=1e-5, atol=1e-5)


def test_a_weight_past_int32_keeps_int64_indices():
    weight = torch.empty(2**31, dtype=torch.float16, device="meta")  # too large for int32 flat indices
    delta = sparse.SparseDelta(weight, torch.tensor([0, 2**31 - 1]))
    assert delta.indices.dtype == torch.int64 and int(delta.flat()[-1]) == 2**31 - 1


def _stepped(model, x, steps: int, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    from fps_onnx.torch.train.loop import make_optimizer
    from fps_onnx.torch.train.recipe import Recipe

    optimizer = make_optimizer(model, Recipe(lr=lr, weight_decay=0.1))
    for _ in range(steps):
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: d.values.detach().clone() for n, d in sparse.deltas(model).items()}


@pytest.mark.parametrize("conv1d", [False, True])
def test_step_scales_multiply_each_entrys_step_by_its_input_channels_factor(conv1d):
    """A Linear's input channels are its columns, transformers' Conv1D's ([in, out]) its rows."""
    transformers = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(0)
        layer = transformers.pytorch_utils.Conv1D(3, 4) if conv1d else nn.Linear(4, 3)
        attach_masks(layer, {"weight": np.ones(tuple(layer.weight.shape), bool)})
        return layer

    factors = np.array([1.0, 0.5, 0.25, 0.0], np.float32)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    plain, scaled = build(), build()
    assert sparse.scale_steps(scaled, {"weight": factors, "bias": factors}) == 1  # no delta: left out
    first_plain, first_scaled = _stepped(plain, x, 1)["weight"], _stepped(scaled, x, 1)["weight"]
    channel = torch.arange(12) // 3 if conv1d else torch.arange(12) % 4
    torch.testing.assert_close(first_scaled, first_plain * torch.from_numpy(factors)[channel])
    assert first_plain.abs().min() > 0
    later = _stepped(scaled, x, 3)["weight"]  # weight decay included: a factor-0 channel never moves
    assert torch.all(later[channel == 3] == 0) and torch.all(later[channel != 3] != 0)


def test_step_scales_that_do_not_fit_the_weight_are_refused():
    layer = nn.Linear(4, 3)
    attach_masks(layer, {"weight": np.ones((3, 4), bool)})
    with pytest.raises(MaskError, match=r"3 input-channel factors do not fit weight, shaped \[3, 4\]"):
        sparse.scale_steps(layer, {"weight": np.ones(3, np.float32)})


def test_scale_steps_gives_a_loop_of_ones_own_the_step_factors_train_uses(tmp_path):
    """fps_onnx.scale_steps: prepare, an optimizer of one's own, then the factors of
    ``train --step-scale`` (channel 0 ten times the median: 0.1; the others 1) on its steps."""
    from _models import channel_stats
    import fps_onnx
    from fps_onnx.errors import StatsError
    from fps_onnx.stats import Stats
    from fps_onnx.torch.train.recipe import Recipe

    rng = np.random.default_rng(0)
    MaskFile({"0.weight": rng.random((3, 4)) < 0.6, "2.weight": rng.random((2, 3)) < 0.6}, {},
             {"model_sha256": "e" * 64}).save(tmp_path / "masks.safetensors")
    stats = channel_stats({"0.weight": 4, "2.weight": 3}, lambda j: np.where(j == 0, 10.0, 1.0))
    stats.save(tmp_path / "stats.safetensors")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

    def first_step(scaled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        fps_onnx.prepare(model, tmp_path / "masks.safetensors", Recipe(train_head=False, train_bias=False))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        if scaled:
            assert fps_onnx.scale_steps(model, optimizer, tmp_path / "masks.safetensors",
                                        tmp_path / "stats.safetensors") is optimizer
        before = {n: d.values.detach().clone() for n, d in sparse.deltas(model).items()}
        model(x).square().sum().backward()
        optimizer.step()
        return {n: (d.values.detach() - before[n], d.flat()) for n, d in sparse.deltas(model).items()}

    plain, scaled = first_step(False), first_step(True)
    assert set(plain) == {"0.weight", "2.weight"}
    for name, width in (("0.weight", 4), ("2.weight", 3)):
        step, flat = plain[name]
        channel = flat % width
        assert step.abs().min() > 0 and torch.any(channel == 0) and torch.any(channel != 0)
        torch.testing.assert_close(scaled[name][0], step * torch.where(channel == 0, 0.1, 1.0))

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    fps_onnx.prepare(model, tmp_path / "masks.safetensors", Recipe(train_head=False, train_bias=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    fps_onnx.scale_steps(model, optimizer, tmp_path / "masks.safetensors", stats)
    with pytest.raises(MaskError, match="this optimizer's steps are scaled already"):  # not twice: c * c
        fps_onnx.scale_steps(model, optimizer, tmp_path / "masks.safetensors", stats)

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(MaskError, match=r"call prepare\(model, masks\) first"):
        fps_onnx.scale_steps(model, optimizer, tmp_path / "masks.safetensors", tmp_path / "stats.safetensors")
    Stats("f" * 64, num_samples=1, weights=stats.weights).save(tmp_path / "other.safetensors")
    with pytest.raises(StatsError, match="of another model than the masks"):
        fps_onnx.scale_steps(model, optimizer, tmp_path / "masks.safetensors", tmp_path / "other.safetensors")
