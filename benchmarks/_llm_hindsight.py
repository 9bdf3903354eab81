"""Hindsight masks of the LLM benchmark: per weight, the entries that full fine-tuning moved most.

    python benchmarks/_llm_hindsight.py DELTA.safetensors OUT.safetensors R

DELTA holds W_after - W_before of a full fine-tuning run (``_llm_train.py`` with
``delta``), keyed by parameter name. Per weight [out, in] the top R * (in + out)
entries of |ΔW| are kept, by the budget rule of ``select --shira-r R``
(:func:`fps_onnx.selection.score.select_scores`), and written as a mask file;
prints {"selected": N, "total": M} as JSON.

Not a selector: it needs the very training it would spare. It tells how far a
static mask of LoRA's size can go at all when it is picked before training, the
bound every label-free selector sits under.
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
