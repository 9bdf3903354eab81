"""Tiny decoder-only LLMs and their ONNX files, for the tests (seeded, offline, no tests here).

Models: ``llama`` (grouped-query attention, untied lm_head), ``llama-tied`` (lm_head tied to the
embedding), ``qwen2`` (q/k/v biases) and ``gpt2`` (Conv1D weights stored [in, out]), each with
64-d hidden states, 2 layers, 4 heads (Llama and Qwen2: 2 key/value heads) and a 300-token
byte-level BPE tokenizer trained here. Biases and norm weights are perturbed so that no two
tensors are equal. ``save_tiny_llm`` writes a folder that looks like one from the Hugging Face hub
(config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json).

The ONNX files come from third-party exporters that are never dependencies of the project: each
runs in a subprocess under its own interpreter, named by an environment variable:

- ``FPS_OPTIMUM_PYTHON`` (default ``/opt/venvs/optimum/bin/python``): optimum-onnx, for
  ``model.onnx`` with or without past key/values; ``optimum_merged`` combines the two into the
  older ``decoder_model_merged.onnx`` layout (one ``If`` on ``use_cache_branch``).
- ``FPS_GENAI_PYTHON`` (default ``/opt/venvs/genai/bin/python``): the onnxruntime-genai model
  builder (Llama and Qwen2; it does not build GPT-2), fp32, fp16 or int4 (``MatMulNBits``).

``require_exporter`` skips a test cleanly where the interpreter is missing. Exports write only
into the folders they are given (Hugging Face caches included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import tempfile

import numpy as np

KINDS = ("llama", "llama-tied", "qwen2", "gpt2")
GENAI_KINDS = ("llama", "llama-tied", "qwen2")
VOCAB = 300
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 128

_CORPUS = [
    "The capital of France is Paris.",
    "A small model learns to predict the next token of a sentence.",
    "Weights that matter are found by looking at their inputs.",
    "The quick brown fox jumps over the lazy dog.",
    "Sparse fine-tuning changes a few entries of each weight matrix.",
    "ONNX Runtime runs the graph on the CPU or on a GPU.",
    "Calibration data flows through the network once.",
    "Every layer has attention and a feed-forward block.",
]
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

EXPORTERS = {
    "optimum": ("FPS_OPTIMUM_PYTHON", "/opt/venvs/optimum/bin/python", "optimum-onnx"),
    "genai": ("FPS_GENAI_PYTHON", "/opt/venvs/genai/bin/python", "onnxruntime-genai"),
}


# --------------------------------------------------------------------------- models


def tiny_tokenizer():
    """A byte-level BPE tokenizer with ``VOCAB`` entries, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **SPECIALS)
    fast.padding_side = "left"
    return fast


def tiny_config(kind: str, vocab_size: int = VOCAB):
    """The transformers config of a tiny model of ``kind`` (one of ``KINDS``)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if kind in ("llama", "llama-tied"):
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POSITIONS, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=kind == "llama-tied", initializer_range=0.1, **ids,
        )
    if kind == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POSITIONS, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.1, **ids,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
            n_positions=MAX_POSITIONS, n_inner=INTERMEDIATE, initializer_range=0.1, **ids,
        )
    raise ValueError(f"unknown tiny LLM kind {kind!r}; expected one of {KINDS}")


def tiny_llm(kind: str, seed: int = 0, vocab_size: int = VOCAB):
    """A seeded causal LM of ``kind`` in eval mode, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size))
    # transformers starts biases at 0 and norm weights at 1; exporters then share one initializer
    # among all equal tensors. Give each its own values, as a trained model has.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param), alpha=0.1)
    return model.eval()


def save_tiny_llm(kind: str, directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a Hugging Face model folder (weights, config, generation config, tokenizer)."""
    from transformers import GenerationConfig

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    model = tiny_llm(kind, seed, vocab_size=len(tok))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # Name the class every transformers release knows (5.x writes its own alias).
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def token_batch(
    batch: int = 2, seq: int = 8, seed: int = 0, vocab_size: int = VOCAB, pad_first: int = 0,
    padding_side: str = "left",
) -> dict[str, np.ndarray]:
    """``input_ids``/``attention_mask``/``position_ids`` (int64 [batch, seq]).

    The first row gets ``pad_first`` pad tokens (id 0, mask 0) on ``padding_side``; position ids
    count the real tokens from 0 and are 1 on padding, as Hugging Face ``generate`` makes them.
    The onnxruntime-genai fp32/int4 graphs (GroupQueryAttention) give correct logits only with
    right padding.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad_first:
        mask[0, slice(0, pad_first) if padding_side == "left" else slice(seq - pad_first, seq)] = 0
    ids[mask == 0] = 0
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos.astype(np.int64)}


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def decoder_feeds(session, tokens: dict[str, np.ndarray], head_dim: int = HIDDEN // HEADS) -> dict:
    """Feeds for a decoder ONNX session's first step: ``tokens`` plus an empty past.

    Works for optimum (with or without past, merged: ``use_cache_branch`` False) and genai files
    (no ``position_ids`` input except fp16; past head dim is the dim_param ``kv_cache_dim``).
    Past tensors are [batch, kv_heads, 0, head_dim] in the input's dtype.
    """
    batch = next(iter(tokens.values())).shape[0]
    feeds = {}
    for inp in session.get_inputs():
        dtype = _ORT_DTYPES[inp.type]
        if inp.name in tokens:
            feeds[inp.name] = tokens[inp.name].astype(dtype)
        elif inp.name == "use_cache_branch":
            feeds[inp.name] = np.array([False])
        elif inp.name.startswith("past_key_values"):
            kv_heads = inp.shape[1] if isinstance(inp.shape[1], int) else None
            last = inp.shape[3] if isinstance(inp.shape[3], int) else head_dim
            feeds[inp.name] = np.zeros((batch, kv_heads, 0, last), dtype)
        else:
            raise KeyError(f"no feed for decoder input {inp.name!r}")
    return feeds


# --------------------------------------------------------------------------- exporters


def exporter_python(name: str) -> str | None:
    """The interpreter of exporter ``name`` ("optimum" or "genai"), or None where there is none."""
    var, default, _ = EXPORTERS[name]
    path = os.environ.get(var) or default
    return path if Path(path).is_file() and os.access(path, os.X_OK) else None


def require_exporter(name: str) -> str:
    """The interpreter of exporter ``name``; skips the calling test where it is missing."""
    import pytest

    python = exporter_python(name)
    if python is None:
        var, _, package = EXPORTERS[name]
        pytest.skip(f"{package} not installed: set {var}")
    return python


def _run(python: str, args: list[str], timeout: float) -> None:
    """Run ``python args`` offline; Hugging Face caches go to a temporary folder, removed after.

    ``{work}`` in an argument stands for that folder.
    """
    with tempfile.TemporaryDirectory(prefix="fps-exporter-") as work:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(
            HF_HOME=work, XDG_CACHE_HOME=work, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", CUDA_VISIBLE_DEVICES="",
            TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
        )
        args = [a.replace("{work}", work) for a in args]
        proc = subprocess.run(
            [python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout,
        )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"exporter failed ({' '.join(args[:4])} ...), exit {proc.returncode}:\n{tail}")


def optimum_export(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, with_past: bool = True,
    python: str | None = None, timeout: float = 600,
) -> Path:
    """``optimum-cli export onnx`` of ``model_dir``; returns ``out_dir/model.onnx``.

    ``with_past``: task ``text-generation-with-past`` (inputs past_key_values.{i}.key/value,
    outputs present.{i}.key/value) or ``text-generation`` (logits only).
    """
    python = python or require_exporter("optimum")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = "text-generation-with-past" if with_past else "text-generation"
    _run(
        python,
        ["-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(Path(model_dir).resolve()),
         "--task", task, "--device", "cpu", str(out.resolve())],
        timeout,
    )
    return out / "model.onnx"


_MERGED_SCRIPT = """
import sys
from pathlib import Path
from optimum.exporters.onnx.convert import export_models
from optimum.exporters.tasks import TasksManager
from optimum.onnx import merge_decoders
from transformers import AutoModelForCausalLM

src, out = sys.argv[1], Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(src).eval()
make = TasksManager.get_exporter_config_constructor(
    exporter="onnx", model=model, task="text-generation-with-past", library_name="transformers")
first = make(model.config, task="text-generation", use_past=True, use_past_in_inputs=False)
later = make(model.config, task="text-generation", use_past=True, use_past_in_inputs=True)
export_models({"decoder_model": (model, first), "decoder_with_past_model": (model, later)}, out,
              opset=max(first.DEFAULT_ONNX_OPSET, 14))
merge_decoders(out / "decoder_model.onnx", out / "decoder_with_past_model.onnx",
               save_path=out / "decoder_model_merged.onnx")
"""


def optimum_merged(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, python: str | None = None,
    timeout: float = 600,
) -> Path:
    """The older optimum layout: returns ``out_dir/decoder_model_merged.onnx``.

    optimum's command line no longer writes it for decoder-only models, so its own API does what
    it used to: export ``decoder_model.onnx`` (no past inputs, outputs present.*) and
    ``decoder_with_past_model.onnx``, then ``optimum.onnx.merge_decoders`` puts both graphs in
    one ``If`` on the extra bool input ``use_cache_branch`` [1] (then: with past; else: without),
    with the initializers the two share deduplicated in the outer graph. The two unmerged files
    stay beside it.
    """
    python = python or require_exporter("optimum")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _run(python, ["-c", _MERGED_SCRIPT, str(Path(model_dir).resolve()), str(out.resolve())], timeout)
    return out / "decoder_model_merged.onnx"


def genai_export(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, precision: str = "fp32",
    python: str | None = None, timeout: float = 600,
) -> Path:
    """The onnxruntime-genai builder's CPU model (``fp32``, ``fp16`` or ``int4``); returns model.onnx.

    The folder also gets ``model.onnx.data``, ``genai_config.json`` and the tokenizer files.
    """
    python = python or require_exporter("genai")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _run(
        python,
        ["-m", "onnxruntime_genai.models.builder", "-i", str(Path(model_dir).resolve()),
         "-o", str(out.resolve()), "-p", precision, "-e", "cpu", "-c", "{work}"],
        timeout,
    )
    return out / "model.onnx"
