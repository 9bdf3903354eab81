"""One naming per SPEC: masks from `select --torch-model` / `map` fit `train`, and module layering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from _cli import invoke
from _layering import imports, modules
from fps_onnx.errors import MaskError
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.torch.models import resolve_keys

PACKAGE = Path(__file__).resolve().parents[1] / "fps_onnx"

BERT_PARAMS = [
    "bert.embeddings.word_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.attention.self.query.bias",
    "bert.encoder.layer.0.output.dense.weight",
    "classifier.weight",
]


# --------------------------------------------------------------------------- the rule


def test_a_parameter_name_stands_for_itself():
    keys = ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"]
    assert resolve_keys(keys, BERT_PARAMS) == {k: k for k in keys}


def test_a_backbone_name_stands_for_the_one_parameter_ending_with_it():
    got = resolve_keys(["encoder.layer.0.attention.self.query.weight", "onnx::MatMul_12"], BERT_PARAMS)
    assert got == {"encoder.layer.0.attention.self.query.weight":
                   "bert.encoder.layer.0.attention.self.query.weight"}  # ONNX names: left out


def test_a_suffix_must_end_at_a_dot():
    assert resolve_keys(["ncoder.layer.0.output.dense.weight"], BERT_PARAMS) == {}


def test_a_key_several_parameters_end_with_is_an_error():
    with pytest.raises(MaskError, match="ambiguous: 4 parameters end with it"):
        resolve_keys(["weight"], BERT_PARAMS)


def test_two_keys_for_one_parameter_are_an_error():
    keys = ["encoder.layer.0.output.dense.weight", "bert.encoder.layer.0.output.dense.weight"]
    with pytest.raises(MaskError, match="both stand for the parameter 'bert.encoder.layer.0.output.dense"):
        resolve_keys(keys, BERT_PARAMS)


# --------------------------------------------------------------------------- layering


def test_model_building_has_one_home():
    """Every torch-side module builds models through torch.models (layering: test_layers.py)."""
    found = modules(PACKAGE.parent, "fps_onnx")
    uses = {name: imports(name, path, is_pkg, set(found)) for name, (path, is_pkg) in found.items()}
    assert uses["fps_onnx.torch.models"] <= {"fps_onnx.errors", "fps_onnx.selection.maskfile", "fps_onnx.torch.hf",
                                             "fps_onnx.data.text"}  # the pad-token rule
    assert uses["fps_onnx.torch.hf"] <= {"fps_onnx.errors", "fps_onnx.onnx.external", "fps_onnx._limits"}
    assert "fps_onnx.torch.export" not in uses["fps_onnx.torch.mapping"]
    for user in ("export", "mapping", "gps", "train.run", "train.loop"):
        assert "fps_onnx.torch.models" in uses[f"fps_onnx.torch.{user}"], user
    assert not any("fps_onnx.torch.export" in used for name, used in uses.items()
                   if name not in ("fps_onnx.torch.export", "fps_onnx.cli.export"))
    defined = {name: {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
               for name, (path, _) in found.items()}
    for func in ("build_model", "build_for_data", "check_spec", "load_checkpoint", "_hf", "_timm"):
        assert [m for m, names in defined.items() if func in names] == ["fps_onnx.torch.models"], func


def test_transformers_reads_model_folders_in_one_place():
    """Every from_pretrained goes through fps_onnx.hf (trust_remote_code=False, the folder checked)."""
    files = list(PACKAGE.rglob("*.py"))
    callers = {p.name for p in files if "from_pretrained(" in p.read_text()}
    assert callers == {"hf.py"}, callers
    assert "trust_remote_code\": False" in (PACKAGE / "torch" / "hf.py").read_text()


# --------------------------------------------------------------------------- hf task models


def _save(tmp_path: Path, kind: str) -> Path:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=40)
        model = transformers.BertModel(config)
    elif kind == "vit":
        config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32)
        model = transformers.ViTModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, max_position_embeddings=40)
        model = transformers.LlamaModel(config)
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind, backbone, task", [
    ("bert", "encoder.layer.0.attention.self.query.weight",
     "bert.encoder.layer.0.attention.self.query.weight"),
    ("vit", "layers.0.attention.q_proj.weight", "vit.layers.0.attention.q_proj.weight"),
])
def test_hf_export_model_is_the_backbone_and_the_task_model_wraps_it(tmp_path, kind, backbone, task):
    from fps_onnx.torch.models import build_model

    spec = f"hf:{_save(tmp_path, kind)}"
    bare = dict(build_model(spec)[0].named_parameters())
    wrapped = dict(build_model(spec, task=True)[0].named_parameters())
    assert backbone in bare and task in wrapped and "classifier.weight" in wrapped
    assert resolve_keys(bare, wrapped)[backbone] == task
    np.testing.assert_array_equal(bare[backbone].detach().numpy(), wrapped[task].detach().numpy())


def test_a_decoder_only_folder_is_its_causal_lm(tmp_path):
    """A bare LlamaModel folder (no head named) is still fine-tuned as LlamaForCausalLM."""
    from fps_onnx.torch import models

    spec = f"hf:{_save(tmp_path, 'llama')}"
    model, inputs = models.build_for_data(spec, None, 3, False, None)
    names = [n for n, _ in model.named_parameters()]
    assert type(model).__name__ == "LlamaForCausalLM" and list(inputs) == ["input_ids", "attention_mask"]
    exported, _ = models.build_model(spec)  # export writes the causal LM too, not the backbone
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert resolve_keys(["layers.0.self_attn.q_proj.weight"], names) == {
        "layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight"}


# --------------------------------------------------------------------------- the README flow, by CLI


def test_export_select_torch_model_then_train_on_a_transformers_folder(tmp_path):
    folder = _save(tmp_path, "bert")
    spec = f"hf:{folder}"
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (16, 8))
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    np.savez(tmp_path / "train.npz", input_ids=ids, attention_mask=np.ones_like(ids),
             labels=(ids[:, 0] > 25).astype(np.int64))
    onnx_path = tmp_path / "bert.onnx"
    assert invoke("export", spec, "-o", onnx_path, "-q").exit_code == 0

    mapped = tmp_path / "mapped.safetensors"
    result = invoke("select", onnx_path, tmp_path / "calib.npz", "--torch-model", spec, "-o", mapped,
                    "--fraction", "0.1", "-q")
    assert result.exit_code == 0, result.output
    keys = set(MaskFile.load(mapped).masks)
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys
    assert all(k.startswith("bert.") for k in keys)

    plain = tmp_path / "plain.safetensors"  # keyed by the backbone's names, as exported
    assert invoke("select", onnx_path, tmp_path / "calib.npz", "-o", plain, "--fraction", "0.1",
                  "-q").exit_code == 0
    assert "encoder.layer.0.attention.self.query.weight" in MaskFile.load(plain).masks
    names_only = tmp_path / "names.safetensors"
    assert invoke("map", plain, "--model", spec, "-o", names_only, "-q").exit_code == 0
    assert set(MaskFile.load(names_only).masks) == keys

    for masks in (mapped, plain):
        out = tmp_path / f"run_{masks.stem}"
        result = invoke("train", "--model", spec, "--masks", masks, "--train", tmp_path / "train.npz",
                        "--epochs", "1", "--batch-size", "8", "-o", out, "-q", "--json")
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["trainable"]["selected"] == MaskFile.load(mapped).selected
        assert metrics["trainable"]["sparse_tensors"] == len(keys)
