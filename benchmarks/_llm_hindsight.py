"""Hindsight masks of the LLM benchmark: per weight, the entries that full fine-tuning moved most.

    python benchmarks/_llm_hindsight.py DELTA.safetensors OUT.safetensors R
    python benchmarks/_llm_hindsight.py overlap DELTA.safetensors MASK_DIR METHOD[,METHOD...]

DELTA holds W_after - W_before of a full fine-tuning run (``_llm_train.py`` with
``delta``), keyed by parameter name. Per weight [out, in] the top R * (in + out)
entries of |ΔW| are kept, by the budget rule of ``select --shira-r R``
(:func:`fps_onnx.selection.score.select_scores`), and written as a mask file;
prints {"selected": N, "total": M} as JSON.

Not a selector: it needs the very training it would spare. It tells how far a
static mask of LoRA's size can go at all when it is picked before training, the
bound every label-free selector sits under.

``overlap`` compares the masks ``MASK_DIR/METHOD.safetensors`` (the benchmark's
selections, ``hindsight`` among them) with the update, per module kind (mean over
layers), as a markdown table: the share of the update's energy (sum of ΔW²) on the
mask's entries, the share of the hindsight mask's entries the mask holds, and the
share of input columns it touches. A random mask of LoRA's count holds about its
density of both.
"""

from __future__ import annotations

import json
import sys


def main(delta: str, out: str, r: int) -> None:
    import numpy as np
    from safetensors import safe_open

    from fps_onnx.selection.maskfile import MaskFile, save_masks
    from fps_onnx.selection.score import SelectConfig, select_scores

    config = SelectConfig(shira_r=r)
    masks, total = {}, 0
    with safe_open(delta, "np") as fh:
        for key in fh.keys():
            change = np.abs(fh.get_tensor(key))
            masks[key] = select_scores(change, config, key)
            total += change.size
    files = MaskFile(masks, meta={"method": "hindsight", "source": delta, "shira_r": str(r)})
    save_masks(files, out)
    print(json.dumps({"selected": sum(files.count(k) for k in files.keys()), "total": total}))


def overlap(delta: str, folder: str, methods: list[str]) -> str:
    import numpy as np
    from safetensors import safe_open

    from fps_onnx.selection.maskfile import MaskFile

    masks = {m: MaskFile.load(f"{folder}/{m}.safetensors") for m in ["hindsight", *methods] if m}
    rows: dict[str, dict[str, list[float]]] = {}
    with safe_open(delta, "np") as fh:
        for key in fh.keys():
            energy = fh.get_tensor(key).astype(np.float64) ** 2
            kind = key.split(".")[-2]
            best = masks["hindsight"].dense(key).reshape(energy.shape)
            for m, file in masks.items():
                mask = file.dense(key).reshape(energy.shape)
                cell = rows.setdefault(kind, {}).setdefault(m, [])
                cell.append((energy[mask].sum() / energy.sum(), (mask & best).sum() / best.sum(),
                             mask.any(axis=0).mean(), mask.mean()))
    lines = ["| kind | mask | density | update energy held | hindsight entries held | input columns touched |",
             "|---|---|---:|---:|---:|---:|"]
    for kind, per in rows.items():
        for m, vals in per.items():
            e, h, c, d = np.mean(vals, axis=0)
            lines.append(f"| {kind} | {m} | {d:.2%} | {e:.1%} | {h:.1%} | {c:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "overlap":
        print(overlap(sys.argv[2], sys.argv[3], sys.argv[4].split(",")))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
