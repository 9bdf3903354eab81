"""GPS-style selection on a causal LM (run as its own process).

    python benchmarks/_llm_gps.py MODEL_DIR CALIB.npz OUT.safetensors R BATCH

Forward + backward of the next-token loss over the calibration blocks in
PyTorch (fp32, all parameters requiring grad, as a gradient selector does),
|grad| summed over batches; for every q/k/v/o/gate/up/down Linear weight
[out, in] the top R * (in + out) entries by summed |grad| are kept (the
LoRA-r-sized per-tensor budget that ``fps-onnx select --shira-r R`` uses).
Prints a JSON summary (selected, total, seconds of the gradient loop).
"""

from __future__ import annotations

import json
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(model_dir: str, calib: str, out: str, r: int, batch: int) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from fps_onnx.selection.maskfile import MaskFile

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    names = [n for n, _ in model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in TARGETS]
    params = dict(model.named_parameters())
    x = torch.from_numpy(np.load(calib)["input_ids"])
    start = time.perf_counter()
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(0, len(x), batch):
        ids = x[i: i + batch]
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for n in names:
                sums[n] += params[n].grad.abs()
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    masks = {}
    for n in names:
        out_f, in_f = sums[n].shape
        k = min(r * (in_f + out_f), sums[n].numel())
        flat = sums[n].flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat, k, sorted=False).indices] = True
        masks[n] = mask.view(out_f, in_f).numpy()
    mf = MaskFile(masks, {n: {} for n in masks}, {"method": "gps", "shira_r": str(r), "samples": str(len(x))})
    mf.save(out)
    print(json.dumps({"selected": mf.selected, "total": mf.total, "seconds": seconds, "samples": len(x)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
