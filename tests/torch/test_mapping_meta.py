"""``select --torch-model`` on an export that kept the parameter names: the PyTorch model is built on
the meta device (names and shapes, no weights) and gives the masks matching by value gives."""

from __future__ import annotations

import numpy as np
import pytest

from fps_onnx.onnx.load import load_checked
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.torch import mapping, models
from tests._cli import invoke
from tests.llm_models import save_tiny_llm, token_batch

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llama-tied", "gpt2"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    folder = save_tiny_llm(request.param, tmp / "hf")
    assert invoke("export", f"hf:{folder}", "-o", tmp / "m.onnx", "-q").exit_code == 0
    np.savez(tmp / "data.npz", **token_batch(4, 8, pad_first=2))
    return tmp, folder


def _by_value(masks: MaskFile, spec: str, onnx_path) -> MaskFile:
    """The masks matched by value onto the model with its weights (the path the meta model replaces)."""
    model, folder, _ = load_checked(onnx_path)
    state = models.build_model(spec, task=True)[0].state_dict()
    return mapping.map_masks(masks, state, model, base_dir=folder)[0]


def test_select_torch_model_builds_no_weights_and_maps_as_by_value(exported, monkeypatch):
    tmp, folder = exported
    spec = f"hf:{folder}"
    raw, out = tmp / "raw.safetensors", tmp / "out.safetensors"
    assert invoke("select", tmp / "m.onnx", tmp / "data.npz", "-o", raw, "--fraction", "0.2",
                  "-q").exit_code == 0
    built = []
    real = models.build_model

    def build(*args, **kwargs):
        built.append(kwargs.get("meta", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "build_model", build)
    result = invoke("select", tmp / "m.onnx", tmp / "data.npz", "-o", out, "--fraction", "0.2",
                    "--torch-model", spec, "-q")
    assert result.exit_code == 0, result.output
    # the model with weights was never built; a Llama's names the weights' headers settle (no model at all)
    assert built == ([True] if "gpt2" in str(tmp) else [])
    monkeypatch.undo()
    got, want = MaskFile.load(out), _by_value(MaskFile.load(raw), spec, tmp / "m.onnx")
    assert set(got.masks) == set(want.masks) and len(got.masks) >= 7
    for key, mask in want.masks.items():
        np.testing.assert_array_equal(got.masks[key], mask, err_msg=key)
        entry = got.tensors[key]
        assert entry["match"] == "name"
        assert entry.get("torch_transposed", False) == want.tensors[key].get("torch_transposed", False)
    assert any(t.get("torch_transposed") for t in got.tensors.values()) == ("gpt2" in str(tmp))


def test_an_export_that_renamed_a_weight_is_matched_by_value(exported, tmp_path):
    """A weight whose name is no parameter's: the model is built with its weights and matched by value."""
    import onnx

    tmp, folder = exported
    model = onnx.load(str(tmp / "m.onnx"))
    site = next(t for t in model.graph.initializer if t.name.endswith("mlp.down_proj.weight")
                or t.name.endswith("mlp.c_proj.weight"))
    old = site.name
    site.name = "onnx::renamed"
    for node in model.graph.node:
        node.input[:] = ["onnx::renamed" if n == old else n for n in node.input]
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    out = tmp_path / "out.safetensors"
    result = invoke("select", tmp_path / "renamed.onnx", tmp / "data.npz", "-o", out, "--fraction", "0.2",
                    "--torch-model", f"hf:{folder}", "-q")
    assert result.exit_code == 0, result.output
    got = MaskFile.load(out)
    assert got.tensors[old]["onnx_initializer"] == "onnx::renamed"
    assert got.tensors[old]["match"] in ("exact", "close")


def test_select_torch_model_imports_torch_only_after_the_session(exported):
    """The session runs before torch or transformers is imported (they cost ~0.5 GiB beside it)."""
    import subprocess
    import sys

    tmp, folder = exported
    code = (
        "import sys\n"
        "from fps_onnx import calibrate\n"
        "from fps_onnx.cli.main import main\n"
        "built = calibrate._session\n"
        "def session(*args):\n"
        "    bad = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]\n"
        "    assert not bad, bad\n"
        "    return built(*args)\n"
        "calibrate._session = session\n"
        f"try:\n    main(['select', {str(tmp / 'm.onnx')!r}, {str(tmp / 'data.npz')!r}, '-o', "
        f"{str(tmp / 'late.safetensors')!r}, '-q', '--torch-model', {'hf:' + str(folder)!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        f"assert ('torch' in sys.modules) == {'gpt2' in str(tmp)}\n"  # a Llama's headers settle the names
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp / "late.safetensors").exists()


def test_select_torch_model_refuses_a_folder_with_code_before_any_work(exported, tmp_path):
    import shutil

    from tests._cli import assert_one_error

    tmp, folder = exported
    bad = tmp_path / "hf"
    shutil.copytree(folder, bad)
    (bad / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    out = tmp_path / "m.safetensors"
    result = invoke("select", tmp / "m.onnx", tmp / "data.npz", "-o", out, "--torch-model", f"hf:{bad}")
    assert_one_error(result, "holds Python code", absent=[out])
