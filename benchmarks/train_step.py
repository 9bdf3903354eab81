"""Step time of causal-LM fine-tuning: FPS-sparse (sparse Linear gradient and dense-gradient
parametrisation) against LoRA, interleaved step by step in one process.

    python benchmarks/train_step.py [--model DIR] [--masks FILE] [--steps 8] [--batch-size 4] [--seq 64]

Three copies of the model train side by side on the same batches, each with
``fps_onnx.train.causal.train_step`` (AdamW, gradient norm clipped at 1):

* ``lora``: PEFT LoRA r=8 (alpha 16, no dropout) on q/k/v/o/gate/up/down;
* ``sparse``: the masks through ``fps_onnx.train.prepare`` (Linear layers compute only the
  selected entries' gradient);
* ``sparse-dense-grad``: the same masks with ``sparse_linear=False`` (every weight through the
  parametrisation: dense weight gradient, then gathered).

Steps rotate the order of the three each round, so load from other jobs on a shared machine
falls on all of them alike; the table gives medians of wall and CPU time (``time.process_time``,
all threads) over the timed steps. The masks default to the LLM benchmark's FPS masks when
``benchmarks/work/llm`` holds them, else random masks of LoRA r=8's count (r x (in + out) per
weight). At the end the two sparse runs' deltas are compared: they must agree to float tolerance.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import time

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "llm"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_masks(model, r: int, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.split(".")[-2] in TARGETS:
            out, inp = p.shape
            flat = torch.zeros(p.numel(), dtype=torch.bool)
            flat[torch.randperm(p.numel(), generator=gen)[: r * (out + inp)]] = True
            masks[name] = flat.view(out, inp).numpy()
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(WORK / "smollm2-135m"))
    parser.add_argument("--masks", default=None,
                        help="mask file, or 'random' (default: the LLM benchmark's FPS masks if present)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="lora,sparse,sparse-dense-grad")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import fps_onnx.torch.train as ft
    from fps_onnx.torch.train import causal, sparse

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    masks = args.masks
    default_masks = WORK / "masks" / "seq64-calib32-r8" / "seed0" / "fps.safetensors"
    if masks is None and default_masks.is_file():
        masks = str(default_masks)
    elif masks == "random":
        masks = None
    recipe = ft.Recipe(train_head=False, train_bias=False, train_norm=False, clip_grad=1.0, lr=1e-3,
                       weight_decay=0.0, amp=False)
    methods = args.methods.split(",")
    models, opts = {}, {}
    for method in methods:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                     target_modules=TARGETS, task_type="CAUSAL_LM"))
        else:
            chosen = masks if masks is not None else random_masks(model, 8, args.seed)
            ft.prepare(model, chosen, recipe, sparse_linear=method == "sparse")
        model.train()
        models[method] = model
        opts[method] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                         weight_decay=0.0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{method}: {trainable:,} trainable", flush=True)
    print(f"masks: {masks or 'random, r=8 count per weight'}; batch {args.batch_size} x {args.seq} tokens, "
          f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps each", flush=True)

    vocab = models[methods[0]].config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        order = methods[step % len(methods):] + methods[: step % len(methods)]
        seen = {}
        for method in order:
            w0, c0 = time.perf_counter(), time.process_time()
            causal.train_step(models[method], [batch], opts[method], None, recipe, torch.device("cpu"))
            seen[method] = (time.perf_counter() - w0, time.process_time() - c0)
            if step >= args.warmup:
                wall[method].append(seen[method][0])
                cpu[method].append(seen[method][1])
        print(f"step {step}{' (warm-up)' if step < args.warmup else ''}: " + ", ".join(
            f"{m} {seen[m][0]:.2f} s wall / {seen[m][1]:.2f} s CPU" for m in methods), flush=True)

    base = "lora" if "lora" in methods else methods[0]
    print()
    print(f"| method | step wall median (s) | step CPU median (s) | wall / {base} | CPU / {base} |")
    print("|---|---:|---:|---:|---:|")
    for m in methods:
        mw, mc = statistics.median(wall[m]), statistics.median(cpu[m])
        print(f"| {m} | {mw:.3f} | {mc:.3f} | {mw / statistics.median(wall[base]):.2f} | "
              f"{mc / statistics.median(cpu[base]):.2f} |")
    if {"sparse", "sparse-dense-grad"} <= set(methods):
        a = sparse.unique_deltas(models["sparse"])
        b = sparse.unique_deltas(models["sparse-dense-grad"])
        diff = max(float((a[n].values - b[n].values).detach().abs().max()) for n in a)
        scale = max(float(b[n].values.detach().abs().max()) for n in b)
        print(f"\nsparse vs sparse-dense-grad after {args.warmup + args.steps} steps: "
              f"max |delta difference| {diff:.3g} (largest delta {scale:.3g})")


if __name__ == "__main__":
    main()
