"""What ``fps-onnx select`` costs next to plain inference and next to GPS-style selection.

ViT-B/16 (timm, random init, 224 px), N images, one batch size; every variant
runs as its own process, measured by :func:`_measure.run_measured` (wall time
of the whole process and its exact peak RSS):

* plain:  ONNX Runtime inference over the same .npy (memory-mapped, same
  batches), session with ORT's default options on the CPU provider;
* select: ``fps-onnx select model.onnx data.npy --batch-size B --provider cpu``;
* gps:    GPS-style selection in PyTorch: train mode, forward + backward of a
  cross-entropy on random labels per batch, gradients summed over the set (no
  zero_grad), then the top-k |grad| of every row of every Linear/Conv weight
  (k from the same budget as ``select``). fp32 (the CPU has no AMP benefit).

Usage::

    python benchmarks/select_overhead.py [--images 64] [--batch-size 32] [--repeat 5] [--skip-gps]

Writes benchmarks/results/select_overhead.{md,json}. The model and the data are
cached in benchmarks/work/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    check,
    child_command,
    fps_onnx_command,
    machine,
    measure_rounds,
    ratios,
    round_tables,
    run_measured,
    write_report,
)

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
MODEL = "vit_base_patch16_224"
SEED = 0
TARGETS = {  # ratio: (bound, "<=" or ">=")
    "select/plain time": (1.10, "<="),
    "select/plain peak RSS": (1.25, "<="),
    "gps/select peak RSS": (5.0, ">="),
}


# --------------------------------------------------------------------------- children
# Each runs in its own process; heavy imports stay inside them, so the parent
# (whose RSS is every child's starting high-water mark) stays small.


def prepare(images: int) -> None:
    """Export the model and write the data, once (cached by name)."""
    import numpy as np

    WORK.mkdir(parents=True, exist_ok=True)
    onnx_path = WORK / f"{MODEL}.onnx"
    if not onnx_path.exists():
        import timm
        import torch

        torch.manual_seed(SEED)
        model = timm.create_model(MODEL, pretrained=False).eval()
        tmp = onnx_path.with_suffix(".tmp.onnx")
        torch.onnx.export(
            model, (torch.randn(1, 3, 224, 224),), str(tmp), input_names=["x"],
            output_names=["y"], dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False,
        )
        tmp.replace(onnx_path)
    data_path = WORK / f"images-{images}.npy"
    if not data_path.exists():
        data = np.random.default_rng(SEED).standard_normal((images, 3, 224, 224), dtype=np.float32)
        np.save(data_path.with_suffix(".tmp.npy"), data)
        data_path.with_suffix(".tmp.npy").replace(data_path)


def plain(model: str, data: str, batch_size: int) -> None:
    """Plain ORT inference, default session options, CPU provider."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    array = np.load(data, mmap_mode="r")
    for start in range(0, len(array), batch_size):
        session.run(None, {name: np.ascontiguousarray(array[start : start + batch_size])})


def gps(data: str, batch_size: int) -> None:
    """GPS-style selection: summed gradients, then per-row top-k of |grad|."""
    import numpy as np
    import timm
    import torch

    from fps_onnx.selection.score import SelectConfig

    torch.manual_seed(SEED)
    model = timm.create_model(MODEL, pretrained=False).train()
    array = np.load(data, mmap_mode="r")
    labels = torch.randint(0, 1000, (len(array),), generator=torch.Generator().manual_seed(SEED))
    loss_fn = torch.nn.CrossEntropyLoss()
    for start in range(0, len(array), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size]))
        loss_fn(model(x), labels[start : start + batch_size]).backward()  # grads accumulate
    config = SelectConfig()
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                grad = module.weight.grad.abs().reshape(module.weight.shape[0], -1)
                k = config.keep(*grad.shape)
                mask = torch.zeros_like(grad, dtype=torch.bool)
                mask.scatter_(1, grad.topk(k, dim=1).indices, True)
                masks[name] = mask
    print(json.dumps({"tensors": len(masks), "selected": int(sum(m.sum() for m in masks.values()))}))


# --------------------------------------------------------------------------- parent


def _child(role: str, *args) -> list[str]:
    return child_command(__file__, role, *args)


def _check(name: str, result: dict) -> dict:
    return check(name, result, 5)


def _markdown(report: dict) -> str:
    lines = [
        "# `fps-onnx select` overhead (CPU)",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}",
        f"- command: `{report['command']}`",
        f"- {report['images']} images, batch {report['batch_size']}, {report['model']} "
        f"(random init), {report['repeat']} interleaved round(s) (plain, select, gps back to back); "
        "times are medians over rounds, ratios the median of the per-round ratios (the machine's "
        "speed drifts between rounds; a round's runs share it)",
        "- plain: ORT default session options, CPU provider; select: `fps-onnx select "
        "--provider cpu`; gps: PyTorch fp32 train mode, forward + backward per batch, "
        "summed gradients, per-row top-k |grad|",
        "",
    ]
    lines += round_tables(report, TARGETS)
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5, help="rounds (each runs every variant once); medians reported")
    parser.add_argument("--skip-gps", action="store_true")
    parser.add_argument("--note", default="", help="free text added to the results (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for select_overhead.{md,json}")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "prepare":
        return prepare(int(args.rest[0]))
    if args.role == "plain":
        return plain(args.rest[0], args.rest[1], int(args.rest[2]))
    if args.role == "gps":
        return gps(args.rest[0], int(args.rest[1]))

    _check("prepare", run_measured(_child("prepare", args.images)))
    model = WORK / f"{MODEL}.onnx"
    data = WORK / f"images-{args.images}.npy"
    masks = WORK / "masks.safetensors"
    variants = {
        "plain": _child("plain", model, data, args.batch_size),
        "select": [fps_onnx_command(), "select", str(model), str(data), "-o", str(masks),
                   "--batch-size", str(args.batch_size), "--quiet", "--provider", "cpu"],
    }
    if not args.skip_gps:
        variants["gps"] = _child("gps", data, args.batch_size)

    runs, median = measure_rounds(variants, args.repeat, tail=5)
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": MODEL,
        "images": args.images,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "parent_floor_gib": run_measured([sys.executable, "-c", "pass"])["parent_floor_gib"],
        "commands": {k: " ".join(v) for k, v in variants.items()},
        "runs": runs,
        "median": median,
        "ratios": ratios(median, runs),
        "note": args.note,
    }
    write_report(args.out, "select_overhead", _markdown(report), report)


if __name__ == "__main__":
    main()
