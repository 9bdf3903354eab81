"""GPS selection on a causal LM under this script's older command line (runs started before
``llm_finetune.py`` called ``fps-onnx select`` directly still call it):

    python benchmarks/_llm_gps.py MODEL_DIR CALIB.npz OUT.safetensors R BATCH

is ``fps-onnx select --method gps --task causal-lm hf:MODEL_DIR CALIB.npz -o OUT.safetensors
--shira-r R --batch-size BATCH --json --quiet``, run in this process's place (its JSON summary
holds ``selected``, ``total``, ``seconds`` and ``samples``, as this script's did).
"""

from __future__ import annotations

import os
from pathlib import Path
import sys


def main(model_dir: str, calib: str, out: str, r: str, batch: str) -> None:
    fps_onnx = str(Path(sys.executable).with_name("fps-onnx"))
    os.execv(fps_onnx, [fps_onnx, "select", "--method", "gps", "--task", "causal-lm", f"hf:{model_dir}", calib,
                        "-o", out, "--shira-r", r, "--batch-size", batch, "--json", "--quiet"])


if __name__ == "__main__":
    main(*sys.argv[1:6])
