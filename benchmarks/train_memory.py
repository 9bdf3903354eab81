"""Training memory and step time: the sparse trainer against full and GPS-style fine-tuning.

ViT-B/16 (timm, random init, 224 px, a new 100-class head), batch B, the same
mask in every variant: the top ``round(fraction * fan_in)`` entries by |w| of
every output row of every backbone Linear/Conv weight (~0.8% at the default
fraction; torch top-k in each child, deterministic from the seed). Each variant
runs as its own process, measured by :func:`_measure.run_measured` (exact peak
RSS of the child); step times are measured inside it after warm-up steps.

* full:   every parameter trainable, dense AdamW;
* gps:    every parameter keeps requires_grad and a dense AdamW; the masks are
  dense fp32 tensors, 1 = frozen, as GPS keeps them (``--gps-masks bool``: one
  byte per entry instead); after each backward the frozen entries' gradients
  are zeroed (``where(mask, 0, grad)``) and so are those of the frozen tensors
  (norms, pos_embed, cls_token) - GPS's training, without its EMA copy;
* sparse: ``fps_onnx.train`` (k-sized deltas; head and biases trained fully,
  norms frozen: the same tensors as gps), its AdamW.

All fp32 on the CPU (``--device cuda`` adds the CUDA allocator's peak; ``--amp``
runs bf16 autocast there). The children run with ``MALLOC_MMAP_THRESHOLD_=131072``
so that glibc returns freed activation buffers to the OS and peak RSS follows
live memory in every variant alike (``--default-malloc`` leaves glibc's adaptive
threshold on). Usage::

    python benchmarks/train_memory.py [--steps 3] [--warmup 1] [--batch-size 32] [--device cpu]

Writes benchmarks/results/train_memory.md (or ``--output``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
import platform
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_measured  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "vit_base_patch16_224"
VARIANTS = ("full", "gps", "sparse")
FROZEN = ("norm", "pos_embed", "cls_token")  # GPS's frozen name substrings


# --------------------------------------------------------------------------- child


def _masks(model, fraction: float) -> dict:
    """Top-k |w| per output row of every backbone weight (not the head)."""
    import torch

    masks = {}
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith("head") or any(f in name for f in FROZEN):
            continue
        rows = p.detach().reshape(p.shape[0], -1)
        k = max(1, round(fraction * rows.shape[1]))
        mask = torch.zeros_like(rows, dtype=torch.bool)
        mask.scatter_(1, rows.abs().topk(k, dim=1).indices, True)
        masks[name] = mask.reshape(p.shape)
    return masks


def child(args) -> dict:
    import resource
    import time

    import timm
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(MODEL, pretrained=False, num_classes=100).to(device)
    masks = _masks(model, args.fraction)
    selected = sum(int(m.sum()) for m in masks.values())
    backbone = sum(m.numel() for m in masks.values())
    extra = {}
    if args.child == "full":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    elif args.child == "gps":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        frozen = [p for n, p in model.named_parameters() if any(f in n for f in FROZEN)]
        dtype = torch.float32 if args.gps_masks == "fp32" else torch.bool
        masked = [(model.get_parameter(n), (~m).to(dtype)) for n, m in masks.items()]  # 1 = frozen
    else:
        from fps_onnx.torch.train import loop
        from fps_onnx.torch.train.recipe import Recipe

        trainable = loop.prepare(model, {n: m.cpu().numpy() for n, m in masks.items()})
        optimizer = loop.make_optimizer(model, Recipe(lr=1e-4))
        extra["dense_trainable"] = sum(dict(model.named_parameters())[n].numel() for n in trainable.dense)
    masks = None  # the selection masks are not kept (GPS keeps its own copy, above)
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch_size,), generator=g).to(device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if args.child == "gps":
            with torch.no_grad():
                for p, m in masked:
                    p.grad = torch.where(m.bool() if m.dtype != torch.bool else m, 0.0, p.grad)
                for p in frozen:
                    p.grad.zero_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    trainable_bytes = nbytes(p for p in model.parameters() if p.requires_grad)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    state_bytes = nbytes(v for v in state if v.numel() > 1)  # exp_avg, exp_avg_sq
    counters = nbytes(v for v in state if v.numel() == 1)  # one step count per tensor
    buffers = nbytes(b for n, b in model.named_buffers() if n.endswith((".indices", ".base")))
    out = {
        "variant": args.child,
        "step_s": times,
        "selected": selected,
        "backbone_weights": backbone,
        "trainable_tensors_bytes": trainable_bytes,
        "optimizer_state_bytes": state_bytes,
        "step_counter_bytes": counters,
        "sparse_buffers_bytes": buffers,
        "peak_rss_self_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": float(loss),
        **extra,
    }
    if device.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# --------------------------------------------------------------------------- parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.008)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--gps-masks", choices=("fp32", "bool"), default="fp32")
    ap.add_argument("--default-malloc", action="store_true")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "train_memory.md")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
              "--fraction", str(args.fraction), "--device", args.device, "--gps-masks", args.gps_masks]
    common += ["--amp"] if args.amp else []
    env = None if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = {}
    for variant in VARIANTS:
        done = run_measured([sys.executable, __file__, "--child", variant, *common], env=env)
        if done["returncode"] != 0:
            sys.exit(f"{variant} failed:\n{done['stderr'][-3000:]}")
        rows[variant] = {**json.loads(done["stdout"].strip().splitlines()[-1]),
                         "peak_rss_gib": done["peak_rss_gib"], "wall_s": done["wall_s"]}
        print(variant, json.dumps(rows[variant]), flush=True)
    write_report(args, rows)


def _mean(values):
    return sum(values) / len(values)


def write_report(args, rows) -> None:
    full, gps, ours = rows["full"], rows["gps"], rows["sparse"]
    selected_bytes = ours["trainable_tensors_bytes"]
    checks = [
        ("peak RSS sparse / gps", ours["peak_rss_gib"] / gps["peak_rss_gib"], 0.85),
        ("(optimizer state + trainable) / trainable, sparse",
         (ours["optimizer_state_bytes"] + selected_bytes) / selected_bytes, 3.0),
        ("step time sparse / full", _mean(ours["step_s"]) / _mean(full["step_s"]), 1.05),
    ]
    if "cuda_peak_gib" in ours:
        checks.insert(1, ("CUDA peak sparse / gps", ours["cuda_peak_gib"] / gps["cuda_peak_gib"], 0.85))
    cmd = " ".join(["python benchmarks/train_memory.py", *sys.argv[1:]])
    lines = [
        "# Training memory: sparse trainer vs full and GPS-style fine-tuning",
        "",
        f"`{cmd}` on {dt.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"device {args.device}{' (bf16 autocast)' if args.amp else ' (fp32)'}.",
        f"{MODEL} random init, 100-class head, batch {args.batch_size}, 224 px; "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant, each variant its own process; "
        f"GPS masks {args.gps_masks}; "
        + ("glibc's default malloc." if args.default_malloc else "children with MALLOC_MMAP_THRESHOLD_=131072."),
        f"Mask: top-round({args.fraction} x fan-in) |w| per output row of every backbone weight: "
        f"{ours['selected']:,} of {ours['backbone_weights']:,} ({100 * ours['selected'] / ours['backbone_weights']:.2f}%).",
        "",
        "| variant | peak RSS (GiB) | " + ("CUDA peak (GiB) | " if "cuda_peak_gib" in ours else "")
        + "step (s, mean) | trainable tensors (MB) | optimizer state (MB) |",
        "|---|---|" + ("---|" if "cuda_peak_gib" in ours else "") + "---|---|---|",
    ]
    for name, row in rows.items():
        cuda = f"{row['cuda_peak_gib']:.2f} | " if "cuda_peak_gib" in row else ""
        lines.append(f"| {name} | {row['peak_rss_gib']:.2f} | {cuda}{_mean(row['step_s']):.2f} | "
                     f"{row['trainable_tensors_bytes'] / 1e6:.1f} | {row['optimizer_state_bytes'] / 1e6:.1f} |")
    lines += [
        "",
        f"Sparse trainer: {ours['selected']:,} selected values + {ours.get('dense_trainable', 0):,} "
        f"head/bias entries trainable; its constant index/base buffers take "
        f"{ours['sparse_buffers_bytes'] / 1e6:.1f} MB (12 bytes per selected entry). Optimizer state "
        f"counts AdamW's exp_avg and exp_avg_sq; its scalar step counters ({ours['step_counter_bytes']} "
        "bytes, one per tensor) are left out.",
        "",
        "| ratio | measured | target | met |",
        "|---|---|---|---|",
    ]
    for label, value, bound in checks:
        lines.append(f"| {label} | {value:.3f} | <= {bound} | {'yes' if value <= bound + 1e-9 else 'NO'} |")
    lines += ["", "Step times (s): " + "; ".join(
        f"{k} {', '.join(f'{t:.2f}' for t in v['step_s'])}" for k, v in rows.items()), ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
