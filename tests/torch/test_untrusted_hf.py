"""Hostile ``hf:`` model folders: code in the folder never runs, side files never leave it,
delta values never overflow the merged model. Every refusal is one ``Error:`` line with
nothing written, whatever is typed on stdin."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
import re
import shutil

import numpy as np
import pytest

from _cli import assert_one_error, invoke

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _models import image_folder, linear_chain  # noqa: E402
from fps_onnx.errors import ModelError  # noqa: E402
from fps_onnx.selection.maskfile import MaskFile  # noqa: E402
from fps_onnx.torch import hf  # noqa: E402
from fps_onnx.torch.train import delta, hf_folder  # noqa: E402
from llm_models import save_tiny_llm  # noqa: E402

#: What a user (or a CI job piping ``yes``) answers to any prompt.
YES = "y\n" * 50
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_llm("llama", tmp_path_factory.mktemp("base") / "llama", seed=0)


def _code(folder: Path, module: str, marker: Path, cls: str) -> None:
    """A module that leaves ``marker`` behind when imported, defining ``cls``."""
    (folder / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'a').write({module!r})\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast, PreTrainedModel\n"
        f"class {cls}(PretrainedConfig if 'Config' in {cls!r} else PreTrainedTokenizerFast "
        f"if 'Tokenizer' in {cls!r} else PreTrainedModel):\n"
        "    model_type = 'evil'\n"
    )


def _edit(path: Path, **changes) -> None:
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def hostile(base: Path, where: Path, variant: str, marker: Path) -> Path:
    """A copy of the model folder ``base`` that asks transformers to run its code."""
    folder = where / variant
    shutil.copytree(base, folder)
    if variant == "auto_map in config.json":
        _edit(folder / "config.json", model_type="evil", architectures=["EvilModel"], auto_map={
            "AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
            "AutoModelForCausalLM": "modeling_evil.EvilModel",
            "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
        _code(folder, "configuration_evil", marker, "EvilConfig")
        _code(folder, "modeling_evil", marker, "EvilModel")
    elif variant == "auto_map in tokenizer_config.json":
        _edit(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
              auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]})
        _code(folder, "tokenization_evil", marker, "EvilTokenizer")
    elif variant == "unknown model_type":
        _edit(folder / "config.json", model_type="evil")
    elif variant == "a .py beside a known model_type":
        _code(folder, "modeling_llama", marker, "LlamaForCausalLM")
    else:
        raise AssertionError(variant)
    return folder


def assert_refused(result, message: str, out: Path, marker: Path | None = None) -> None:
    assert_one_error(result, re.escape(message))
    assert "[y/N]" not in result.output
    assert not out.exists() or list(out.iterdir()) == []
    assert marker is None or not marker.exists(), "code from the model folder ran"


def command(name: str, spec: str, tmp: Path, out: Path) -> list:
    """The arguments of ``name`` run on the model ``spec``, writing into ``out``."""
    masks = tmp / "m.safetensors"
    if not masks.exists():
        MaskFile({Q_PROJ: np.eye(64, dtype=bool)}, {}).save(masks)
        (tmp / "train.txt").write_text("the cat sat on the mat\n" * 4)
        image_folder(tmp / "images")
        np.save(tmp / "x.npy", np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    return {
        "export": ["export", spec, "-o", out / "model.onnx"],
        "select --torch-model": ["select", linear_chain(tmp), tmp / "x.npy", "-o", out / "m.safetensors",
                                 "--torch-model", spec],
        "map": ["map", masks, "--model", spec, "-o", out / "m.safetensors"],
        "train": ["train", "--model", spec, "--masks", masks, "--train", tmp / "images", "-o", out / "run"],
        "train --task causal-lm": ["train", "--task", "causal-lm", "--model", spec, "--masks", masks,
                                   "--train", tmp / "train.txt", "-o", out / "run"],
        "apply-delta": ["apply-delta", spec, tmp / "delta.safetensors", "-o", out / "merged"],
    }[name]


COMMANDS = ("export", "select --torch-model", "map", "train", "train --task causal-lm", "apply-delta")
VARIANTS = {
    "auto_map in config.json": "holds Python code ('configuration_evil.py', 'modeling_evil.py')",
    "auto_map in tokenizer_config.json": "holds Python code ('tokenization_evil.py')",
    "unknown model_type": "config.json has model_type 'evil', which this transformers does not know",
    "a .py beside a known model_type": "holds Python code ('modeling_llama.py')",
}


@pytest.mark.parametrize("name", COMMANDS)
def test_no_command_runs_code_from_a_model_folder(llama, tmp_path, name):
    marker = tmp_path / "MARKER"
    folder = hostile(llama, tmp_path, "auto_map in config.json", marker)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(*command(name, f"hf:{folder}", tmp_path, out), input=YES)
    assert_refused(result, VARIANTS["auto_map in config.json"], out, marker)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["export", "train --task causal-lm"])
def test_every_kind_of_folder_code_is_refused(llama, tmp_path, variant, name):
    marker = tmp_path / "MARKER"
    folder = hostile(llama, tmp_path, variant, marker)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(*command(name, f"hf:{folder}", tmp_path, out), input=YES)
    assert_refused(result, VARIANTS[variant], out, marker)


def test_check_folder_names_each_reason(llama, tmp_path):
    assert hf.check_folder(llama)["model_type"] == "llama"

    def refused(edit, message):
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        shutil.copytree(llama, folder)
        edit(folder)
        with pytest.raises(ModelError, match=message):
            hf.check_folder(folder)

    refused(lambda f: _edit(f / "config.json", auto_map={"AutoConfig": "x.Y"}),
            "config.json has auto_map, which names code in the folder to run")
    refused(lambda f: _edit(f / "tokenizer_config.json", auto_map={"AutoTokenizer": ["x.Y", None]}),
            "tokenizer_config.json has auto_map")
    refused(lambda f: (f / "preprocessor_config.json").write_text('{"auto_map": {"AutoImageProcessor": "x.Y"}}'),
            "preprocessor_config.json has auto_map")
    refused(lambda f: _edit(f / "config.json", model_type=["llama"]), "has model_type .*llama.*, which this transformers does not know")
    refused(lambda f: (f / "config.json").write_text('{"vocab_size": 8}'), "config.json has no model_type")
    refused(lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000), "nests arrays and objects deeper than")
    refused(lambda f: (f / "config.json").write_text("[1, 2]"), "is not a JSON object")
    refused(lambda f: (f / "helper.py").write_text(""), "holds Python code \\('helper.py'\\)")

    def link_out(f):
        (f / "tokenizer_config.json").unlink()
        (f / "tokenizer_config.json").symlink_to(tmp_path / "outside.json")
        (tmp_path / "outside.json").write_text("{}")

    refused(link_out, "leads outside the model's folder")


# --------------------------------------------------------------------------- side files


def _linked(llama: Path, tmp_path: Path, target: str | None) -> tuple[Path, Path]:
    """A copy of the folder whose special_tokens_map.json links to ``target``
    (an outside file holding a secret when None)."""
    folder = tmp_path / "linked"
    shutil.copytree(llama, folder)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "do not copy me"}')
    link = folder / "special_tokens_map.json"
    link.unlink(missing_ok=True)
    link.symlink_to(target or secret)
    return folder, secret


@pytest.mark.parametrize("target", ["/etc/hostname", None, "/nonexistent/file"])
def test_export_refuses_a_side_file_that_links_out_of_the_folder(llama, tmp_path, target):
    folder, _ = _linked(llama, tmp_path, target)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("export", f"hf:{folder}", "-o", out / "model.onnx", input=YES)
    assert_refused(result, "special_tokens_map.json' (a side file of the model) leads outside the model's folder",
                   out)


def test_apply_delta_refuses_a_tokenizer_file_that_links_out(llama, tmp_path):
    folder, _ = _linked(llama, tmp_path, None)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("apply-delta", f"hf:{folder}", tmp_path / "delta.safetensors", "-o", out / "merged", input=YES)
    assert_refused(result, "leads outside the model's folder", out)


def test_side_files_inside_the_folder_are_copied_and_others_refused(llama, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(llama, folder)
    (folder / "sub").mkdir()
    (folder / "sub" / "real.json").write_text('{"a": 1}')
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    (folder / "special_tokens_map.json").symlink_to("sub/real.json")  # a link inside the folder is fine
    (folder / "tokenizer_dir").mkdir()  # a folder matching "tokenizer*" is left out
    files = hf.side_files(folder, ("special_tokens_map.json", "tokenizer*", "absent.json"))
    assert [f.name for f in files] == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    hf.copy_side_file(files[0], tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_text() == '{"a": 1}' and not (tmp_path / "copy.json").is_symlink()
    os.mkfifo(folder / "tokenizer.fifo")
    with pytest.raises(ModelError, match="not a regular file"):
        hf.side_files(folder, ("tokenizer*",))


# --------------------------------------------------------------------------- delta values


def _delta(llama: Path, path: Path, values, dense: dict | None = None) -> Path:
    from safetensors.torch import save_file

    indices = torch.arange(len(values), dtype=torch.int64)
    meta = {"format": delta.DELTA_FORMAT, "format_version": delta.DELTA_FORMAT_VERSION,
            "shapes": json.dumps({Q_PROJ: [64, 64]}), "dense": json.dumps(sorted(dense or {})),
            hf_folder.BASE_HASH_KEY: hf_folder.base_sha256(llama)}
    save_file({f"{Q_PROJ}:indices": indices, f"{Q_PROJ}:values": values, **(dense or {})}, str(path),
              metadata=meta)
    return path


DELTAS = {
    "1e300": (lambda: torch.tensor([0.5, 1e300], dtype=torch.float64), None, "do not fit the model's torch.float32"),
    "-1e300": (lambda: torch.tensor([-1e300], dtype=torch.float64), None, "do not fit the model's torch.float32"),
    "bool": (lambda: torch.tensor([True, False]), None, "must be a 1-D float tensor of 2 values, not torch.bool"),
    "complex": (lambda: torch.tensor([1 + 2j]), None, "not torch.complex64"),
    "int": (lambda: torch.tensor([3, 4], dtype=torch.int32), None, "not torch.int32"),
    "dense 1e300": (lambda: torch.tensor([0.5]), {"model.norm.weight": torch.full((64,), 1e300, dtype=torch.float64)},
                    "tensor model.norm.weight holds NaN or Inf, or values beyond the model's torch.float32"),
    "dense bool": (lambda: torch.tensor([0.5]), {"model.norm.weight": torch.ones(64, dtype=torch.bool)},
                   "must be a real float tensor like the model's torch.float32 model.norm.weight, not torch.bool"),
    "dense complex": (lambda: torch.tensor([0.5]), {"model.norm.weight": torch.ones(64, dtype=torch.complex64)},
                      "not torch.complex64"),
}


@pytest.mark.parametrize("case", DELTAS)
def test_apply_delta_refuses_values_that_do_not_fit(llama, tmp_path, case):
    values, dense, message = DELTAS[case]
    delta = _delta(llama, tmp_path / "delta.safetensors", values(), dense)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("apply-delta", f"hf:{llama}", delta, "-o", out / "merged", input=YES)
    assert_refused(result, message, out)


def test_apply_delta_of_fitting_values_writes_the_sums(llama, tmp_path):
    delta = _delta(llama, tmp_path / "delta.safetensors", torch.tensor([0.25, -1e3], dtype=torch.float64))
    result = invoke("apply-delta", f"hf:{llama}", delta, "-o", tmp_path / "merged", "-q", input=YES)
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    before = load_file(str(llama / "model.safetensors"))[Q_PROJ].view(-1)
    after = load_file(str(tmp_path / "merged" / "model.safetensors"))[Q_PROJ].view(-1)
    torch.testing.assert_close(after[:2], before[:2] + torch.tensor([0.25, -1e3]))
    assert torch.equal(after[2:], before[2:])


# --------------------------------------------------------------------------- tokenizer panics


def test_train_refuses_a_folder_whose_tokenizer_panics(llama, tmp_path):
    folder = tmp_path / "panics"
    shutil.copytree(llama, folder)
    table = base64.b64encode(b"\xff\xff\xff\x7f" + bytes(8)).decode()
    _edit(folder / "tokenizer.json", normalizer={"type": "Precompiled", "precompiled_charsmap": table})
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(*command("train --task causal-lm", f"hf:{folder}", tmp_path, out), input=YES)
    assert_refused(result, "cannot load the tokenizer of", out)
    assert "the tokenizers library failed on it" in result.stderr
