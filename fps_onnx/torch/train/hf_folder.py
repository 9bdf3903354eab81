"""Causal LMs from transformers folders: building, the base model's hash, merged output folders.

A fine-tuned causal LM is written as a folder ``AutoModelForCausalLM.from_pretrained``
loads directly (``save_pretrained`` of the merged model: weights and config, plus
the base folder's tokenizer files). Its delta file names the base model it was
trained from by :func:`base_sha256`, so that ``apply-delta`` refuses any other.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
import sys

from ...errors import ExportError, FpsError, MaskError, OutputError
from .. import hf
from ..models import build_model, is_causal_lm, is_causal_lm_model
from ._torch import nn, torch
from .delta import Trained, add_trained, delta_metadata, merged_entries, read_delta

__all__ = ["BASE_HASH_KEY", "TOKENIZER_PATTERNS", "WEIGHT_PATTERNS", "apply_delta_folder", "base_sha256",
    "build_causal_lm", "causal_lm_folder", "check_base", "merged_model", "save_model_folder",
    "write_merged_folder"]

log = logging.getLogger(__name__)

#: Weight files of a transformers folder, hashed by :func:`base_sha256`.
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")
#: Tokenizer files copied from the base folder into a merged one.
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.tiktoken", "spiece.model", "sentencepiece*.model", "chat_template.*")
BASE_HASH_KEY = "base_sha256"
#: The configs ``save_pretrained`` writes beside the weights, copied from the base folder by
#: :func:`write_merged_folder`.
CONFIG_PATTERNS = (hf.CONFIG_FILE, "generation_config.json")
#: The safetensors dtypes a delta is added to.
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def base_sha256(folder: str | os.PathLike) -> str:
    """sha256 (hex) over a transformers folder's weight files, sorted by name.

    The files are those matching :data:`WEIGHT_PATTERNS` (``model*.safetensors``,
    ``pytorch_model*.bin``; index files are not weights); for each, in name
    order, its name, a NUL byte, its size in decimal, a NUL byte and its bytes
    are hashed. ExportError when the folder holds none.
    """
    folder = Path(folder)
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern) if f.is_file()},
                   key=lambda f: f.name)
    if not files:
        raise ExportError(f"{folder} holds no weight files ({', '.join(WEIGHT_PATTERNS)})")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def causal_lm_folder(spec: str) -> Path:
    """The folder of ``hf:DIR`` when it holds a decoder-only causal LM; ExportError otherwise."""
    if not spec.startswith("hf:"):
        raise ExportError(f"--task causal-lm needs a transformers folder, hf:DIR, not {spec!r}")
    folder = Path(spec[3:])
    if not (folder / "config.json").is_file():
        raise ExportError(f"unknown model SPEC {spec!r}: no transformers model folder (config.json) there")
    try:
        config = hf.load_config(folder)
    except FpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - config loaders raise anything
        raise ExportError(f"cannot load hf:{folder}: {exc}") from exc
    if not is_causal_lm(config):
        kind = getattr(config, "model_type", None) or type(config).__name__
        raise ExportError(f"hf:{folder} is not a causal language model ({kind}): --task causal-lm needs "
                          "a decoder-only model that AutoModelForCausalLM builds with its lm_head")
    hf.side_files(folder, TOKENIZER_PATTERNS)  # refused now rather than after the work
    return folder


def build_causal_lm(spec: str, seed: int = 0, dtype=None) -> nn.Module:
    """The causal LM of ``hf:DIR`` (``AutoModelForCausalLM``, local files only), in eval mode;
    ``dtype``: the torch dtype its weights are loaded in (default: transformers')."""
    causal_lm_folder(spec)
    model, _ = build_model(spec, seed=seed, task=True, dtype=dtype)
    if not is_causal_lm_model(model):
        raise ExportError(f"{spec} built {type(model).__name__}, not a causal language model")
    return model


def save_model_folder(model: nn.Module, base: str | os.PathLike, out: str | os.PathLike) -> None:
    """``save_pretrained`` of ``model`` (plain, merged weights) into ``out``, and the
    tokenizer files of the base folder beside it."""
    out = Path(out)
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    for file in hf.side_files(base, TOKENIZER_PATTERNS):
        if not (out / file.name).exists():
            hf.copy_side_file(file, out / file.name)


def check_base(delta: str | os.PathLike, folder: str | os.PathLike) -> None:
    """MaskError unless the delta file names ``folder``'s weights as its base model."""
    meta = delta_metadata(delta)
    want = meta.get(BASE_HASH_KEY)
    if want is None:
        raise MaskError(f"{delta} names no base model (no {BASE_HASH_KEY} metadata); "
                        "it was not written by `fps-onnx train --task causal-lm`")
    have = base_sha256(folder)
    if want != have:
        raise MaskError(f"{delta} was trained from another base model: its base sha256 is "
                        f"{want[:12]}..., {folder} is {have[:12]}...")


def apply_delta_folder(spec: str, delta: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Rebuild the merged model folder of a causal LM run from ``hf:DIR`` and its delta file.

    The delta must name DIR as its base (:func:`check_base`) and fit the model, checked whole
    against its parameters built on the meta device (:func:`.delta.read_delta`); the folder is
    written like ``train``'s ``model/`` (:func:`write_merged_folder`), atomically.
    """
    from ..._io import atomic_folder, check_folder

    out = check_folder(output)
    folder = causal_lm_folder(spec)
    check_base(delta, folder)
    found = read_delta(delta, hf.meta_model("AutoModelForCausalLM", folder))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        if not write_merged_folder(found, folder, tmp, source=delta):
            save_model_folder(merged_model(spec, found), folder, tmp)
    log.info("wrote %s", out)
    return out


def merged_model(spec: str, trained: Trained) -> nn.Module:
    """The causal LM of ``hf:DIR`` built again (in its own dtype) with ``trained`` added to it."""
    return add_trained(build_causal_lm(spec), trained)


def write_merged_folder(trained: Trained, base: str | os.PathLike, out: str | os.PathLike, *,
                        source: object = "the trained deltas") -> bool:
    """Write the merged model folder ``out`` from the base folder's files and ``trained``, one
    tensor in memory at a time; False (nothing written) where the base cannot be streamed.

    The base's safetensors weight files (and their index) are copied as they are, each trained
    tensor is then read back, changed (a delta added as :func:`.delta.apply_delta` adds it, in
    the file's own dtype; a dense tensor replaced) and written in place; the configs
    (:data:`CONFIG_PATTERNS`) and tokenizer files are copied. So the folder has the base's own
    layout and dtype whatever trained it (one process or sharded ones), and no process ever holds
    the whole model. The base cannot be streamed when it has no safetensors weights, or when a
    trained tensor is stored under none of its names (transformers renamed it on loading): then
    the caller builds the merged model and saves it (:func:`save_model_folder`). ``source``
    names the deltas in errors (a weight plus its delta that overflows the file's dtype).
    """
    base, out = Path(base), Path(out)
    headers = hf.weight_headers(base)
    if headers is None or sys.byteorder != "little":
        return False
    plan: dict[str, str] = {}  # stored name -> the trained tensor it takes
    for name in [*trained.sparse, *trained.dense]:
        stored = [n for n in trained.tied.get(name, [name]) if n in headers]
        if not stored:
            log.info("%s is not stored under its own name in %s: the merged model is built whole", name, base)
            return False
        plan.update((n, name) for n in stored)
    out.mkdir(parents=True, exist_ok=True)
    for file in [*hf.weight_files(base), *hf.side_files(base, [hf.WEIGHTS_INDEX])]:
        hf.copy_side_file(file, out / file.name)
    for stored_name, name in plan.items():
        _rewrite(out / headers[stored_name].file.name, stored_name, headers[stored_name], name, trained, source)
    for file in hf.side_files(base, (*CONFIG_PATTERNS, *TOKENIZER_PATTERNS)):
        hf.copy_side_file(file, out / file.name)
    return True


def _rewrite(path: Path, stored_name: str, stored: hf.StoredTensor, name: str, trained: Trained,
             source: object) -> None:
    """Put the trained value of ``name`` into the tensor ``stored_name`` of the copied weight file ``path``."""
    dtype = _FLOAT_DTYPES.get(stored.dtype)
    if dtype is None:
        raise MaskError(f"{stored.file}: {stored_name} is {stored.dtype}, not a float weight a delta is added to")
    shape = trained.shapes[name] if name in trained.sparse else tuple(trained.dense[name].shape)
    if tuple(stored.shape) != tuple(shape):
        raise MaskError(f"{stored.file}: {stored_name} has shape {list(stored.shape)}, the trained "
                        f"{name} {list(shape)}")
    if not stored.stop > stored.start:
        return
    with open(path, "r+b") as fh:
        fh.seek(stored.start)
        raw = bytearray(fh.read(stored.stop - stored.start))
        weight = torch.frombuffer(raw, dtype=dtype)  # the file's bytes, changed in place
        with torch.no_grad():
            if name in trained.sparse:
                indices, values = trained.sparse[name]
                weight.put_(*merged_entries(stored_name, weight, indices, values, source))
            else:
                weight.copy_(trained.dense[name].reshape(-1).to(dtype))
                if not bool(torch.isfinite(weight).all()):
                    raise MaskError(f"{source}: tensor {name} holds values beyond the base's {dtype} "
                                    f"{stored_name} ({stored.file.name})")
        fh.seek(stored.start)
        fh.write(raw)
