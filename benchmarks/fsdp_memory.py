"""Memory of sparse fine-tuning: FSDP against DDP (2 processes), and a bf16 against an fp32 frozen base (CPU).

Part ``fsdp``: a seeded random-init Llama of TinyLlama-1.1B's shape (:data:`LLAMA`: hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 key/value heads, 32000-token vocabulary, untied head:
1.1 B parameters, 4.4 GB in fp32; SmolLM2's tokenizer files, the data being token ids) saved with
``save_pretrained``; a mask of 1 % random entries of every
q/k/v/o/gate/up/down weight; STEPS optimizer steps of one block of SEQ random tokens per process.
Eight runs, each ``torchrun --nproc_per_node 2 fps-onnx train --task causal-lm`` as its own process:
DDP and ``--fsdp``, each with ``--base-dtype fp32`` and ``bf16``, each without and with
``--checkpointing`` (:data:`VARIANTS`). Per rank: the peak RSS after
training (``rank_peak_memory_bytes`` in metrics.json: loading and training, before the outputs are
written) and the step time (the epoch's seconds / steps, first step included). The whole run's
peak (``os.wait4`` of torchrun: the largest process, writing the merged model included) is
reported too: rank 0 writes the merged model from the base's files a tensor at a time.

Part ``base-dtype``: SmolLM2-135M (the fp32 folder of the LLM benchmark), ``--task causal-lm`` on
its ``kjv`` corpus, one process, ``--base-dtype fp32`` against ``bf16`` (each without and with ``--checkpointing`` and ``--chunked-loss``): the same mask (1 % random
entries of every projection weight), STEPS_135M steps of BATCH_135M blocks of 256 tokens, the test
perplexity on the first TEST_BLOCKS test blocks; peak RSS of the whole process (``os.wait4``) and
after training (metrics.json).

    python benchmarks/fsdp_memory.py                       # both parts, ~25 min on 2 cores
    python benchmarks/fsdp_memory.py --part fsdp --layers 4 # a smaller Llama (code paths)

Writes benchmarks/results/fsdp_memory.{md,json}; models and data are cached in benchmarks/work/fsdp/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
from pathlib import Path
import platform
import shutil
import sys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import GIB, fps_onnx_command, log, run_measured, versions  # noqa: E402
import llm_finetune  # noqa: E402

WORK = HERE / "work" / "fsdp"
# The LLM benchmark's fp32 SmolLM2 folder and kjv corpus, made by it where missing (main).
LLM = llm_finetune.Bench(dict(llm_finetune.FULL), HERE / "work" / "llm", HERE / "results" / llm_finetune.NAME)
SMOL, KJV = LLM.model_dir, LLM.data_dir("kjv")
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FRACTION = 0.01
SEED = 0
SEQ, STEPS = 128, 2
STEPS_135M, BATCH_135M, TEST_BLOCKS = 20, 2, 32
#: Every run once as given and once with --checkpointing (activation checkpointing, which docs/llms.md
#: recommends for LLMs): the fixed part of a process (Python, torch, transformers: ~0.9 GiB) weighs
#: less in a ratio the more of the memory is activations, so both are shown.
VARIANTS = (("", []), (" --checkpointing", ["--checkpointing"]))
#: The base-dtype part also runs each with --chunked-loss (one process; not with --fsdp): the loss over
#: SmolLM2's 49,152-token vocabulary is computed in fp32 in both dtypes, so its logits do not halve.
DTYPE_VARIANTS = VARIANTS + ((" --chunked-loss", ["--chunked-loss"]),
                             (" --checkpointing --chunked-loss", ["--checkpointing", "--chunked-loss"]))
TARGETS = {"fsdp/ddp per-rank peak RSS": 0.65, "bf16/fp32 peak RSS": 0.60, "bf16/fp32 test perplexity - 1": 0.01}


# --------------------------------------------------------------------------- children


def make_llama(folder: str, layers: int) -> None:
    """The random-init Llama folder, with SmolLM2's tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA, num_hidden_layers=layers, max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    tmp = Path(folder + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for file in SMOL.glob("tokenizer*"):
        shutil.copy(file, tmp / file.name)
    tmp.rename(folder)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


def make_mask(folder: str, out: str) -> None:
    """FRACTION random entries of every projection weight, keyed by parameter name."""
    import numpy as np
    from safetensors import safe_open

    from fps_onnx.selection.maskfile import MaskFile

    rng = np.random.default_rng(SEED)
    masks = {}
    with safe_open(str(Path(folder) / "model.safetensors"), framework="np") as f:
        for key in sorted(f.keys()):
            if key.split(".")[-2] in PROJECTIONS:
                shape = tuple(f.get_slice(key).get_shape())
                masks[key] = rng.random(shape, dtype=np.float32) < FRACTION
    MaskFile(masks, {}).save(out)


def make_tokens(out: str, samples: int, vocab: int) -> None:
    import numpy as np

    ids = np.random.default_rng(SEED).integers(3, vocab, size=(samples, SEQ), dtype=np.int64)
    np.savez(out, input_ids=ids, attention_mask=np.ones_like(ids), labels=ids)


def cut_test(out: str) -> None:
    import numpy as np

    data = np.load(KJV / "test.npz")
    np.savez(out, **{k: v[:TEST_BLOCKS] for k, v in data.items()})


# --------------------------------------------------------------------------- parent


def _child(role: str, *args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *map(str, args)]


def _prepared(cmd: list[str], what: str) -> None:
    result = run_measured(cmd, env={"HF_HUB_OFFLINE": "1"})
    if result["returncode"] != 0:
        raise SystemExit(f"{what} failed:\n{result['stderr'][-3000:]}")


def _train(args: list[str], out: Path, processes: int) -> dict:
    fps = fps_onnx_command()
    cmd = [fps, *args, "-o", str(out), "-q"]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", "29517", *cmd]
    shutil.rmtree(out, ignore_errors=True)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes)),
           "TOKENIZERS_PARALLELISM": "false"}
    log(" ".join(cmd))
    result = run_measured(cmd, env=env)
    if result["returncode"] != 0:
        raise SystemExit(f"training failed:\n{result['stderr'][-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    epoch = metrics["epochs"][-1]
    shutil.rmtree(out, ignore_errors=True)
    row = {"wall_s": result["wall_s"], "process_peak_rss_gib": result["peak_rss_gib"],
           "step_s": epoch["seconds"] / max(epoch["steps"], 1),
           "peak_after_training_gib": epoch["peak_memory_bytes"] / GIB, "command": " ".join(cmd)}
    if "rank_peak_memory_bytes" in metrics:
        row["rank_peak_gib"] = [b / GIB for b in metrics["rank_peak_memory_bytes"]]
    if "test_perplexity" in metrics:
        row["test_perplexity"] = metrics["test_perplexity"]
    return row


def part_fsdp(layers: int) -> dict:
    folder = WORK / f"tinyllama-{layers}l"
    if not folder.exists():
        log(f"saving the random-init Llama ({layers} layers)")
        _prepared(_child("make-llama", folder, layers), "make-llama")
    masks, tokens = WORK / f"mask-tinyllama-{layers}l.safetensors", WORK / f"tokens-{SEQ}x{2 * STEPS}.npz"
    if not masks.exists():
        _prepared(_child("make-mask", folder, masks), "make-mask")
    if not tokens.exists():
        _prepared(_child("make-tokens", tokens, 2 * STEPS, LLAMA["vocab_size"]), "make-tokens")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    base = ["train", "--task", "causal-lm", "--model", f"hf:{folder}", "--masks", str(masks), "--train", str(tokens),
            "--batch-size", "1", "--epochs", "1", "--max-steps", str(STEPS), "--lr", "1e-4"]
    rows = {}
    for suffix, flags in VARIANTS:
        for dtype in ("fp32", "bf16"):
            for mode in ("ddp", "fsdp"):
                extra = ["--base-dtype", dtype, *flags] + (["--fsdp"] if mode == "fsdp" else [])
                name = f"{mode} {dtype}{suffix}"
                rows[name] = _train(base + extra, WORK / "out", 2)
                log(f"{name}: {rows[name]}")
    ratios = {}
    for suffix, _ in VARIANTS:
        for dtype in ("fp32", "bf16"):
            ddp, fsdp = rows[f"ddp {dtype}{suffix}"], rows[f"fsdp {dtype}{suffix}"]
            key = f"{dtype}{suffix}"
            ratios[f"fsdp/ddp per-rank peak RSS, {key}"] = max(fsdp["rank_peak_gib"]) / max(ddp["rank_peak_gib"])
            ratios[f"fsdp/ddp step time, {key}"] = fsdp["step_s"] / ddp["step_s"]
            ratios[f"fsdp/ddp whole-run peak RSS, {key}"] = fsdp["process_peak_rss_gib"] / ddp["process_peak_rss_gib"]
    return {"parameters": parameters, "layers": layers, "runs": rows, "ratios": ratios}


def part_dtype() -> dict:
    tokens = WORK / "kjv-test32.npz"
    if not tokens.exists():
        _prepared(_child("cut-test"), "cut-test")
    masks = WORK / "mask-smollm2.safetensors"
    if not masks.exists():
        _prepared(_child("make-mask", SMOL, masks), "make-mask")
    base = ["train", "--task", "causal-lm", "--model", f"hf:{SMOL}", "--masks", str(masks),
            "--train", str(KJV / "train.npz"), "--test", str(tokens), "--batch-size", str(BATCH_135M),
            "--epochs", "1", "--max-steps", str(STEPS_135M), "--lr", "3e-3", "--clip-grad", "1"]
    rows, ratios = {}, {}
    for suffix, flags in DTYPE_VARIANTS:
        for dtype in ("fp32", "bf16"):
            rows[dtype + suffix] = _train(base + ["--base-dtype", dtype, *flags], WORK / "out", 1)
            log(f"{dtype}{suffix}: {rows[dtype + suffix]}")
        half, full = rows["bf16" + suffix], rows["fp32" + suffix]
        ratios |= {
            f"bf16/fp32 peak RSS{suffix}": half["process_peak_rss_gib"] / full["process_peak_rss_gib"],
            f"bf16/fp32 peak RSS after training{suffix}": half["peak_after_training_gib"] / full["peak_after_training_gib"],
            f"bf16/fp32 test perplexity - 1{suffix}": half["test_perplexity"] / full["test_perplexity"] - 1,
            f"bf16/fp32 step time{suffix}": half["step_s"] / full["step_s"]}
    return {"runs": rows, "ratios": ratios}


def _ratio_lines(ratios: dict, digits: int, target) -> list[str]:
    """The table of ``ratios`` (name -> value), each with ``target(name)``, and a blank line."""
    return ["", "| ratio | value | target |", "|---|---:|---|",
            *(f"| {name} | {value:.{digits}f} | {target(name)} |" for name, value in ratios.items()), ""]


def _made(part: dict) -> list[str]:
    """The line saying which run made a part (parts of older files do not say)."""
    return [f"Measured {part['date']} by `{part['command']}`.", ""] if "date" in part else []


def _report(report: dict, out: Path) -> None:
    lines = [f"# Sparse fine-tuning memory: FSDP vs DDP, bf16 vs fp32 base ({report['date']})", "",
             f"`{report['command']}` on {report['machine']}, torch {report['torch']}.", ""]
    if "fsdp" in report:
        part = report["fsdp"]
        lines += [f"## FSDP vs DDP: random-init Llama, {part['parameters'] / 1e9:.2f} B parameters "
                  f"({part['layers']} layers), 2 processes, gloo, {STEPS} steps of 1 x {SEQ} tokens per process", "",
                  *_made(part),
                  "| run | peak RSS per rank after training (GiB) | step (s) | whole-run peak RSS (GiB) | wall (s) |",
                  "|---|---|---:|---:|---:|"]
        for name, row in part["runs"].items():
            ranks = ", ".join(f"{g:.2f}" for g in row["rank_peak_gib"])
            lines.append(f"| {name} | {ranks} | {row['step_s']:.1f} | {row['process_peak_rss_gib']:.2f} | "
                         f"{row['wall_s']:.0f} |")
        lines += _ratio_lines(part["ratios"], 2, lambda name: f"<= {TARGETS['fsdp/ddp per-rank peak RSS']}"
                              if name.startswith("fsdp/ddp per-rank") else "")
    if "base_dtype" in report:
        part = report["base_dtype"]
        lines += [f"## bf16 vs fp32 frozen base: SmolLM2-135M, kjv, one process, {STEPS_135M} steps of "
                  f"{BATCH_135M} x 256 tokens, test perplexity on {TEST_BLOCKS} test blocks", "",
                  *_made(part),
                  "| base | whole-run peak RSS (GiB) | peak RSS after training (GiB) | step (s) | test perplexity |",
                  "|---|---:|---:|---:|---:|"]
        for name, row in part["runs"].items():
            lines.append(f"| {name} | {row['process_peak_rss_gib']:.2f} | {row['peak_after_training_gib']:.2f} | "
                         f"{row['step_s']:.1f} | {row['test_perplexity']:.3f} |")
        lines += _ratio_lines(part["ratios"], 3, lambda name: (
            f"<= {TARGETS['bf16/fp32 peak RSS']:.2f}" if name.startswith("bf16/fp32 peak RSS") and "after" not in name
            else f"within +-{TARGETS['bf16/fp32 test perplexity - 1']}" if "perplexity" in name else ""))
    lines += ["Commands of each run: fsdp_memory.json (`runs.*.command`)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--part", choices=("fsdp", "base-dtype", "both"), default="both")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "fsdp_memory")
    args = parser.parse_args()
    if args.role:
        {"make-llama": lambda a: make_llama(a[0], int(a[1])), "make-mask": lambda a: make_mask(*a),
         "make-tokens": lambda a: make_tokens(a[0], int(a[1]), int(a[2])), "cut-test": lambda a: cut_test(
             str(WORK / "kjv-test32.npz"))}[args.role](args.args)
        return
    LLM.data("kjv")  # the model folder and the kjv corpus, where a fresh machine lacks them
    WORK.mkdir(parents=True, exist_ok=True)
    report = {"date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "command": " ".join(sys.argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": versions("torch")["torch"]}
    previous = args.output.with_suffix(".json")
    if args.part != "both" and previous.exists():  # the other part's figures are kept
        kept = json.loads(previous.read_text())
        report.update({k: kept[k] for k in ("fsdp", "base_dtype") if k in kept})
    made = {"date": report["date"], "command": report["command"]}  # each part says which run made it
    if args.part in ("fsdp", "both"):
        report["fsdp"] = made | part_fsdp(args.layers)
    if args.part in ("base-dtype", "both"):
        report["base_dtype"] = made | part_dtype()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    _report(report, args.output)
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
