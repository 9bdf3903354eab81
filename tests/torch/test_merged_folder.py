"""The merged model folder written from the base folder's files and the trained deltas
(``hf_folder.write_merged_folder``), a tensor at a time, on tiny seeded Llamas."""

from __future__ import annotations

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fps_onnx.errors import MaskError, ModelError  # noqa: E402
from fps_onnx.torch import hf  # noqa: E402
from fps_onnx.torch.train import hf_folder  # noqa: E402
from fps_onnx.torch.train.delta import Trained  # noqa: E402
from llm_models import save_tiny_llm  # noqa: E402

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    save_tiny_llm("llama", root / "llama", seed=0)
    save_tiny_llm("llama-tied", root / "tied", seed=0)
    return root


def _load(folder) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _stored(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in hf.weight_files(folder):
        out.update(load_file(str(file)))
    return out


def _trained(state: dict, names, seed: int = 0, dense=()) -> Trained:
    gen = torch.Generator().manual_seed(seed)
    sparse, shapes = {}, {}
    for name in names:
        numel = state[name].numel()
        indices = torch.randperm(numel, generator=gen)[: numel // 10].sort().values
        sparse[name] = (indices, torch.randn(indices.numel(), generator=gen))
        shapes[name] = tuple(state[name].shape)
    return Trained(sparse, shapes, {n: torch.randn(state[n].shape, generator=gen) for n in dense})


def _expected(state: dict, trained: Trained) -> dict[str, torch.Tensor]:
    want = {k: v.clone() for k, v in state.items()}
    for name, (indices, values) in trained.sparse.items():
        flat = want[name].view(-1)
        flat[indices] = (flat[indices].float() + values).to(flat.dtype)
    for name, value in trained.dense.items():
        want[name] = value.to(want[name].dtype)
    return want


def test_the_folder_is_the_base_plus_the_deltas_and_loads(bases, tmp_path):
    base = bases / "llama"
    state = _stored(base)
    trained = _trained(state, [Q, DOWN], dense=[NORM])
    assert hf_folder.write_merged_folder(trained, base, tmp_path / "out")

    got, want = _stored(tmp_path / "out"), _expected(state, trained)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not torch.equal(got[Q], state[Q]) and torch.equal(got[EMBED], state[EMBED])
    # the base's own files beside the weights, byte for byte; the weights in the base's layout
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes()
    head = (base / "model.safetensors").read_bytes()[:64]
    assert (tmp_path / "out" / "model.safetensors").read_bytes()[:64] == head
    loaded = _load(tmp_path / "out")
    assert torch.equal(loaded[Q], want[Q]) and torch.equal(loaded[NORM], want[NORM])


def test_a_sharded_base_keeps_its_shards_and_index(bases, tmp_path):
    base = tmp_path / "sharded"
    shutil.copytree(bases / "llama", base)
    (base / "model.safetensors").unlink()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(bases / "llama"), local_files_only=True)
    model.save_pretrained(str(base), max_shard_size="40KB")
    files = hf.weight_files(base)
    assert len(files) > 2  # several shards and an index
    state = _stored(base)
    trained = _trained(state, [Q, DOWN])
    assert hf_folder.write_merged_folder(trained, base, tmp_path / "out")
    assert sorted(p.name for p in hf.weight_files(tmp_path / "out")) == sorted(p.name for p in files)
    assert (tmp_path / "out" / hf.WEIGHTS_INDEX).read_bytes() == (base / hf.WEIGHTS_INDEX).read_bytes()
    got, want = _stored(tmp_path / "out"), _expected(state, trained)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_bf16_base_stays_bf16_and_the_sum_is_taken_in_fp32(bases, tmp_path):
    base = tmp_path / "bf16"
    shutil.copytree(bases / "llama", base)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(bases / "llama"), local_files_only=True)
    (base / "model.safetensors").unlink()
    model.to(torch.bfloat16).save_pretrained(str(base))
    state = _stored(base)
    assert state[Q].dtype == torch.bfloat16
    trained = _trained(state, [Q])
    assert hf_folder.write_merged_folder(trained, base, tmp_path / "out")
    got = _stored(tmp_path / "out")
    indices, values = trained.sparse[Q]
    assert got[Q].dtype == torch.bfloat16
    want = (state[Q].view(-1)[indices].float() + values).to(torch.bfloat16)
    assert torch.equal(got[Q].view(-1)[indices], want)


def test_a_delta_on_a_tied_weight_reaches_every_stored_name(bases, tmp_path):
    base = tmp_path / "tied"
    shutil.copytree(bases / "tied", base)
    state = _stored(base)
    assert "lm_head.weight" not in state  # stored once, under the embedding's name
    trained = _trained(state, [EMBED])
    trained.tied = {EMBED: [EMBED, "lm_head.weight"], "lm_head.weight": [EMBED, "lm_head.weight"]}
    assert hf_folder.write_merged_folder(trained, base, tmp_path / "out")
    loaded = _load(tmp_path / "out")
    want = _expected(state, trained)[EMBED]
    assert torch.equal(loaded[EMBED], want) and torch.equal(loaded["lm_head.weight"], want)


def test_a_base_whose_names_differ_is_not_streamed(bases, tmp_path):
    state = _stored(bases / "llama")
    trained = _trained(state, [Q])
    trained.sparse = {"renamed." + Q: trained.sparse[Q]}
    trained.shapes = {"renamed." + Q: trained.shapes[Q]}
    assert not hf_folder.write_merged_folder(trained, bases / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written: the caller builds the model


@pytest.mark.parametrize("case, error, message", [
    ("shape", MaskError, r"has shape \[\d+, \d+\], the trained"),
    ("int", MaskError, "not a float weight"),
    ("overflow", MaskError, "overflows"),
    ("offsets", ModelError, "does not fit its data_offsets"),
])
def test_a_base_or_delta_that_does_not_fit_is_refused(bases, tmp_path, case, error, message):
    base = tmp_path / "base"
    shutil.copytree(bases / "llama", base)
    state = _stored(base)
    trained = _trained(state, [Q])
    if case == "shape":
        trained.shapes[Q] = (1, state[Q].numel())
    elif case in ("int", "offsets"):
        path = base / "model.safetensors"
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        if case == "int":
            header[Q]["dtype"] = "I32"  # same size as F32
        else:
            header[Q]["data_offsets"][1] += 4
        text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
        assert len(text) == length
        path.write_bytes(data[:8] + text + data[8 + length :])
    else:
        indices, values = trained.sparse[Q]
        trained.sparse[Q] = (indices, torch.full_like(values, 3e38))
        stored = state[Q].view(-1)
        stored[indices[0]] = 3e38
        from safetensors.torch import save_file

        save_file({**state, Q: stored.view(state[Q].shape)}, str(base / "model.safetensors"), {"format": "pt"})
    with pytest.raises(error, match=message):
        hf_folder.write_merged_folder(trained, base, tmp_path / "out")
