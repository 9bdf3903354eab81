"""One training (or evaluation) run of the LLM fine-tuning benchmark, in its own process.

    python benchmarks/_llm_train.py ARGS.json OUT.json

ARGS: ``model`` (HF folder), ``mode`` (``zero`` | ``full`` | ``lora`` |
``sparse`` | ``eval``), ``train``/``val``/``test`` (.npz of ``input_ids``
[N, SEQ]), ``steps``, ``batch_size``, ``lr``, ``warmup``, ``seed``,
``masks`` (sparse), ``weights`` (eval: a model.safetensors to load), ``delta``
(full, optional: where to write the update W_after - W_before of each
``lora_targets`` weight, fp32 safetensors keyed by parameter name), ``blocks``
(optional: split -> how many of its first blocks to use, e.g. {"val": 32}), and the
LoRA settings ``lora_r``, ``lora_alpha``, ``lora_targets``.

Every mode runs the same loop: AdamW (weight decay 0), linear warm-up then
cosine to 0, gradient norm clipped at 1, batches drawn in a seeded order from
the training blocks. ``sparse`` trains only the entries a mask file selects,
through ``fps_onnx.train.prepare`` (no biases, norms or head). Perplexity is
exp(mean token NLL) over every predicted token of a split. A run whose training
loss becomes non-finite stops there and writes ``diverged`` with both
perplexities None.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import statistics
import sys
import time


def main(args_path: str, out_path: str) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    a = json.loads(Path(args_path).read_text())
    torch.manual_seed(a["seed"])
    torch.set_num_threads(a.get("threads", 2))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    if a["mode"] == "eval":
        from safetensors.torch import load_file

        state = load_file(a["weights"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            sys.exit(f"{a['weights']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    total = sum(p.numel() for p in model.parameters())
    info: dict = {"mode": a["mode"], "total_params": total, "load_s": time.perf_counter() - t0}

    before = {}
    if a["mode"] == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if a.get("delta"):  # the weights LoRA and the sparse rows adapt, as they start
            before = {n: p.detach().clone() for n, p in model.named_parameters()
                      if n.endswith(".weight") and n.split(".")[-2] in a["lora_targets"]}
    elif a["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=a["lora_r"], lora_alpha=a["lora_alpha"], lora_dropout=0.0,
                            target_modules=a["lora_targets"], bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    elif a["mode"] == "sparse":
        import fps_onnx.torch.train as ft

        ft.prepare(model, a["masks"], ft.Recipe(train_head=False, train_bias=False, train_norm=False))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable"] = sum(p.numel() for p in params)

    def blocks(split: str) -> torch.Tensor:
        return torch.from_numpy(np.load(a[split])["input_ids"][:a.get("blocks", {}).get(split)])

    @torch.no_grad()
    def perplexity(split: str) -> tuple[float, float]:
        model.eval()
        x = blocks(split)
        nll, count, start = 0.0, 0, time.perf_counter()
        for i in range(0, len(x), a["eval_batch_size"]):
            ids = x[i: i + a["eval_batch_size"]]
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += ids[:, 1:].numel()
        return math.exp(min(nll / count, 700.0)), time.perf_counter() - start

    if params:
        train = blocks("train")
        opt = torch.optim.AdamW(params, lr=a["lr"], weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
        steps, warm = a["steps"], max(1, round(a["warmup"] * a["steps"]))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        gen = torch.Generator().manual_seed(a["seed"])
        order = torch.cat([torch.randperm(len(train), generator=gen)
                           for _ in range(math.ceil(steps * a["batch_size"] / len(train)))])
        losses, times = [], []
        model.train()
        for step in range(steps):
            ids = train[order[step * a["batch_size"]: (step + 1) * a["batch_size"]]]
            start = time.perf_counter()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            losses.append(out.loss.item())
            if not math.isfinite(losses[-1]):
                info.update({"steps": step + 1, "losses": losses, "val_ppl": None, "test_ppl": None,
                             "diverged": f"the training loss became {losses[-1]} at step {step}"})
                Path(out_path).write_text(json.dumps(info))
                return
        state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                          if torch.is_tensor(t))
        later = times[2:] if len(times) > 4 else times
        info.update({"steps": steps, "train_loss_first": statistics.fmean(losses[:5]),
                     "train_loss_last": statistics.fmean(losses[-5:]), "losses": losses,
                     "step_s_median": statistics.median(later), "step_s_mean": statistics.fmean(later),
                     "step_s_all": sum(times) / steps,
                     "tokens_per_s": a["batch_size"] * (train.shape[1] - 1) * steps / sum(times), "train_s": sum(times),
                     "optimizer_state_bytes": state_bytes})
    if before:
        from safetensors.torch import save_file

        params_by_name = dict(model.named_parameters())
        save_file({n: (params_by_name[n].detach() - w).contiguous() for n, w in before.items()}, a["delta"])
        info["delta"] = {"path": a["delta"], "tensors": len(before)}
    info["val_ppl"], _ = perplexity("val")
    info["test_ppl"], info["test_eval_s"] = perplexity("test")
    info["seconds"] = time.perf_counter() - t0
    Path(out_path).write_text(json.dumps(info))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
