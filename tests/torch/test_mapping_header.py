"""``select --torch-model hf:DIR`` on an export that kept the parameter names: where the safetensors
headers of the folder's weights settle the names, the masks are mapped from them without torch, and the
mask file is the one the meta-device model gives; every other case builds the model as before."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fps_onnx.errors import ModelError
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.torch import hf, mapping, models
from tests._cli import assert_one_error, invoke
from tests.llm_models import save_tiny_llm, token_batch

pytest.importorskip("transformers")


def _export(tmp: Path, kind: str) -> tuple[Path, Path]:
    """(tmp, folder) of the tiny ``kind`` exported with fps-onnx into ``tmp``, with token data and
    its masks keyed by ONNX name (``raw.safetensors``)."""
    folder = save_tiny_llm(kind, tmp / "hf")
    assert invoke("export", f"hf:{folder}", "-o", tmp / "m.onnx", "-q").exit_code == 0
    np.savez(tmp / "data.npz", **token_batch(4, 8, pad_first=2))
    assert invoke("select", tmp / "m.onnx", tmp / "data.npz", "-o", tmp / "raw.safetensors", "--fraction",
                  "0.2", "-q").exit_code == 0
    return tmp, folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("llama"), "llama")


def _select(tmp, spec, out, *extra):
    result = invoke("select", tmp / "m.onnx", tmp / "data.npz", "-o", out, "--fraction", "0.2",
                    "--torch-model", spec, "-q", *extra)
    assert result.exit_code == 0, result.output
    return MaskFile.load(out)


def _builds(monkeypatch) -> list[bool]:
    """The ``meta`` of every model built from now on."""
    built: list[bool] = []
    real = models.build_model

    def build(*args, **kwargs):
        built.append(kwargs.get("meta", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "build_model", build)
    return built


def test_the_headers_give_the_mask_file_the_meta_model_gives(llama, monkeypatch):
    tmp, folder = llama
    built = _builds(monkeypatch)
    fast = _select(tmp, f"hf:{folder}", tmp / "fast.safetensors")
    assert built == []  # no model built, not even on the meta device
    monkeypatch.setattr(mapping, "_header_names", lambda *args: None)
    meta = _select(tmp, f"hf:{folder}", tmp / "meta.safetensors")
    assert built == [True]
    assert len(fast.masks) == 14 and set(fast.masks) == set(meta.masks)
    for key, mask in meta.masks.items():
        np.testing.assert_array_equal(fast.masks[key], mask, err_msg=key)
    assert fast.tensors == meta.tensors
    assert all(t["match"] == "name" and t["torch_name"] == k for k, t in fast.tensors.items())
    assert fast.meta == meta.meta


@pytest.mark.parametrize("kind", ["llama", "llama-tied"])
def test_an_lm_head_is_mapped_from_the_headers_only_when_untied(llama, tmp_path, monkeypatch, kind):
    """A tied lm_head is one tensor with the embedding (its mask names both: torch_aliases), which
    only the model tells: a mask of the vocabulary's size builds it unless the config unties them."""
    tmp, folder = llama if kind == "llama" else _export(tmp_path, kind)
    spec = f"hf:{folder}"
    built = _builds(monkeypatch)
    fast = _select(tmp, spec, tmp_path / "fast.safetensors", "--include-lm-head")
    assert built == ([] if kind == "llama" else [True])
    monkeypatch.setattr(mapping, "_header_names", lambda *args: None)
    meta = _select(tmp, spec, tmp_path / "meta.safetensors", "--include-lm-head")
    assert fast.tensors == meta.tensors and fast.meta == meta.meta
    for key, mask in meta.masks.items():
        np.testing.assert_array_equal(fast.masks[key], mask, err_msg=key)
    head = "lm_head.weight" if kind == "llama" else "model.embed_tokens.weight"
    assert ("torch_aliases" in fast.tensors[head]) == (kind == "llama-tied")


def test_the_header_path_imports_neither_torch_nor_transformers(llama):
    tmp, folder = llama
    code = (
        "import sys\n"
        "from fps_onnx.cli.main import main\n"
        f"try:\n    main(['select', {str(tmp / 'm.onnx')!r}, {str(tmp / 'data.npz')!r}, '-o', "
        f"{str(tmp / 'light.safetensors')!r}, '-q', '--torch-model', {'hf:' + str(folder)!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "bad = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    got = MaskFile.load(tmp / "light.safetensors")
    assert got.meta["torch_mapping"] == json.dumps({"name": 14})


def _rewrite(folder: Path, tmp_path: Path, change) -> Path:
    """A copy of ``folder`` whose weights are ``change(dict of arrays)``."""
    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "hf"
    shutil.copytree(folder, copy)
    arrays = load_file(str(folder / "model.safetensors"))
    save_file(change(arrays), str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def _drop(key):
    return lambda arrays: {k: v for k, v in arrays.items() if k != key}


def _transpose(key):
    return lambda arrays: {k: (np.ascontiguousarray(v.T) if k == key else v) for k, v in arrays.items()}


@pytest.mark.parametrize("change", [_drop("model.layers.1.mlp.up_proj.weight"),
                                    _transpose("model.layers.0.mlp.gate_proj.weight")],
                         ids=["missing", "transposed"])
def test_a_header_that_does_not_settle_a_name_builds_the_model(llama, tmp_path, monkeypatch, change):
    tmp, folder = llama
    copy = _rewrite(folder, tmp_path, change)
    built = _builds(monkeypatch)
    got = mapping.map_to_model(MaskFile.load(tmp / "raw.safetensors"), f"hf:{copy}", str(tmp / "m.onnx"))[0]
    assert built == [True]
    assert len(got.masks) == 14


def test_a_folder_not_saved_from_a_causal_lm_class_builds_the_model(llama, tmp_path, monkeypatch):
    tmp, folder = llama
    copy = tmp_path / "hf"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["LlamaModel"]
    (copy / "config.json").write_text(json.dumps(config))
    built = _builds(monkeypatch)
    mapping.map_to_model(MaskFile.load(tmp / "raw.safetensors"), f"hf:{copy}", str(tmp / "m.onnx"))
    assert built == [True]


def test_a_square_weight_used_in_out_builds_the_model(tmp_path, monkeypatch):
    """GPT-2's Conv1D weights are stored [in, out]: square ones only the model tells apart."""
    folder = save_tiny_llm("gpt2", tmp_path / "hf")
    assert invoke("export", f"hf:{folder}", "-o", tmp_path / "m.onnx", "-q").exit_code == 0
    np.savez(tmp_path / "data.npz", **token_batch(4, 8, pad_first=2))
    built = _builds(monkeypatch)
    got = _select(tmp_path, f"hf:{folder}", tmp_path / "out.safetensors")
    assert built == [True]
    assert any(t.get("torch_transposed") for t in got.tensors.values())


def test_a_checkpoint_builds_the_model_with_its_weights(llama, monkeypatch):
    from safetensors.numpy import load_file

    tmp, folder = llama
    import torch

    state = {k: torch.from_numpy(v) for k, v in load_file(str(folder / "model.safetensors")).items()}
    torch.save(state, tmp / "ckpt.pt")
    built = _builds(monkeypatch)
    got = mapping.map_to_model(MaskFile.load(tmp / "raw.safetensors"), f"hf:{folder}", str(tmp / "m.onnx"),
                               checkpoint=str(tmp / "ckpt.pt"))[0]
    assert built == [False]  # matched on the model with the checkpoint's weights
    assert len(got.masks) == 14


# --------------------------------------------------------------------------- weight_shapes


def _header_file(path: Path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_weight_shapes_reads_the_shards_an_index_names(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _header_file(tmp_path / "a.safetensors", {"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                                              "__metadata__": {"format": "pt"}}, bytes(24))
    _header_file(tmp_path / "b.safetensors", {"y": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}},
                 bytes(8))
    (tmp_path / hf.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"x": "a.safetensors",
                                                                        "y": "b.safetensors"}}))
    assert hf.weight_shapes(tmp_path) == {"x": (2, 3), "y": (4,)}
    (tmp_path / hf.WEIGHTS_INDEX).unlink()
    assert hf.weight_shapes(tmp_path) is None  # neither model.safetensors nor an index


@pytest.mark.parametrize("case, message", [
    ("index-path", "plain names"),
    ("index-nul", "plain names"),
    ("long-header", "is not a safetensors file"),
    ("no-shape", "has no dtype and shape"),
    ("twice", "is in two weight files"),
    ("link-out", "leads outside the model's folder"),
])
def test_weight_shapes_refuses_a_bad_folder(tmp_path, case, message):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    good = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _header_file(folder / "a.safetensors", good, bytes(4))
    shards = {"x": "a.safetensors"}
    if case == "index-path":
        shards = {"x": "../a.safetensors"}
    elif case == "index-nul":
        shards = {"x": "a\0.safetensors"}
    elif case == "long-header":
        (folder / "a.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    elif case == "no-shape":
        _header_file(folder / "a.safetensors", {"x": {"dtype": "F32"}})
    elif case == "twice":
        _header_file(folder / "b.safetensors", good, bytes(4))
        shards = {"x": "a.safetensors", "z": "b.safetensors"}
    elif case == "link-out":
        _header_file(tmp_path / "out.safetensors", good, bytes(4))
        os.symlink(tmp_path / "out.safetensors", folder / "b.safetensors")
        shards = {"x": "a.safetensors", "y": "b.safetensors"}
    (folder / hf.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(ModelError, match=message):
        hf.weight_shapes(folder)


def test_select_reports_a_bad_weight_header_in_one_line(llama, tmp_path):
    tmp, folder = llama
    copy = tmp_path / "hf"
    shutil.copytree(folder, copy)
    (copy / "model.safetensors").write_bytes(b"\xff" * 16)
    out = tmp_path / "out.safetensors"
    result = invoke("select", tmp / "m.onnx", tmp / "data.npz", "-o", out, "--torch-model", f"hf:{copy}", "-q")
    assert_one_error(result, "is not a safetensors file", absent=[out])
