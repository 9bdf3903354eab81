"""What ``select --torch-model`` adds to ``select``, on an ONNX export of our own.

``fps-onnx export hf:DIR`` keeps every weight's parameter name, so the masks are keyed
by those names on the PyTorch model built on the meta device (names and shapes, no
weights): selection memory should stay that of ``select`` alone. Every variant runs as
its own process (:func:`_measure.run_measured`: wall, CPU time, exact peak RSS):

* select:      ``fps-onnx select MODEL DATA -o masks --batch-size B``;
* torch-model: the same with ``--torch-model hf:FOLDER``;
* before (with ``--before FPS_ONNX``): the same ``--torch-model`` command run by another
  install of fps-onnx (e.g. the main branch's), the figure this change started from.

DATA: N sequences of L seeded random token ids (.npz; the last sequence left-padded).

Usage::

    python benchmarks/select_torch_model.py --folder HF_DIR --onnx MODEL.onnx [--repeat 3]
        [--before /path/to/other/.venv/bin/fps-onnx] [--out benchmarks/results]

Writes select_torch_model.{md,json} into ``--out``. The ONNX file must be the export
of ``--folder`` (``fps-onnx export hf:HF_DIR -o MODEL.onnx``).
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
    fps_onnx_command,
    machine,
    measure_rounds,
    run_measured,
    write_report,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEED = 0


def make_data(path: Path, sequences: int, length: int, vocab: int) -> None:
    """Seeded random token ids, the last sequence left-padded by a quarter (pad id 0)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, vocab, size=(sequences, length), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, : length // 4] = 0
    ids[mask == 0] = 0
    np.savez(path, input_ids=ids, attention_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="the Hugging Face model folder")
    parser.add_argument("--onnx", type=Path, required=True, help="its export by fps-onnx export")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", help="another fps-onnx executable: its --torch-model run as the baseline")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "select-torch-model",
                        help="folder for the data and the mask files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "data":
        return make_data(Path(args.rest[0]), int(args.rest[1]), int(args.rest[2]), int(args.rest[3]))

    args.work.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((args.folder / "config.json").read_text())["vocab_size"]
    data = args.work / f"tokens-{args.sequences}x{args.length}.npz"
    if not data.exists():
        check("data", run_measured([sys.executable, __file__, "--folder", str(args.folder), "--onnx",
                                    str(args.onnx), "--role", "data", str(data), str(args.sequences),
                                    str(args.length), str(vocab)]))
    common = [str(args.onnx), str(data), "--batch-size", str(args.batch_size), "--quiet"]
    spec = f"hf:{args.folder}"
    variants = {
        "select": [fps_onnx_command(), "select", *common, "-o", str(args.work / "select.safetensors")],
        "torch-model": [fps_onnx_command(), "select", *common, "--torch-model", spec,
                        "-o", str(args.work / "torch-model.safetensors")],
    }
    if args.before:
        variants["before"] = [args.before, "select", *common, "--torch-model", spec,
                              "-o", str(args.work / "before.safetensors")]
    runs, median = measure_rounds(variants, args.repeat)
    base = median["select"]
    lines = [
        "# `fps-onnx select --torch-model` on an export of our own (CPU)", "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- model: {args.onnx} (export of {args.folder}); data: {args.sequences} sequences of "
        f"{args.length} seeded random token ids, batch {args.batch_size}",
        f"- {args.repeat} round(s); medians over rounds", "",
        "| variant | wall time (s) | CPU time (s) | peak RSS (GiB) | peak RSS / select |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in median.items():
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_gib']:.2f} | "
                     f"{m['peak_rss_gib'] / base['peak_rss_gib']:.2f} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{' '.join(cmd)}`" for name, cmd in variants.items()]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "variants": {k: " ".join(v) for k, v in variants.items()}, "runs": runs, "median": median}
    write_report(args.out, "select_torch_model", "\n".join(lines) + "\n", report)


if __name__ == "__main__":
    main()
