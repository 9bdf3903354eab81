"""GPS baseline: gradient-based parameter selection (needs PyTorch and labels).

The reference the FPS paper compares against (Zhang et al., CVPR 2024): one pass
over the labelled training set in ``model.train()``, cross-entropy loss with a
new classification head, gradients summed over every batch (no zero_grad), then
the top K of ``|grad|`` per output neuron of every Linear/Conv weight. GPS's
rules for which tensors are selectable: the classification head is trained
fully and gets no mask; weights of norms, position embeddings and class tokens
are never selected. Masks use the same budget rules and file format as FPS,
keyed by PyTorch parameter names. Peak memory is that of full fine-tuning: this
is the cost FPS avoids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import logging
import os
import time

from ..selection import maskfile
from ..selection.score import SelectConfig, describe_budget, select_scores

__all__ = ["FROZEN_NAMES", "GpsResult", "gps_select"]

log = logging.getLogger(__name__)

FROZEN_NAMES = ("norm", "pos_embed", "cls_token")


@dataclass
class GpsResult:
    """GPS masks and what computing them cost."""

    masks: maskfile.MaskFile
    samples: int
    seconds: float


def gps_select(
    spec: str,
    train: str | os.PathLike,
    config: SelectConfig = SelectConfig(method="gps"),
    *,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    device: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> GpsResult:
    """GPS masks for the model ``spec`` from the labelled split ``train``."""
    from .models import build_for_data
    from .train._torch import nn, torch
    from .train.data import open_split
    from .train.loop import forward, head_names, logits_of, to_device
    from .train.run import image_spec

    data = open_split(train)
    classes = data.num_classes()
    data.check_labels(classes)
    model, example = build_for_data(spec, checkpoint, classes, False, image_size)
    data.set_image(image_spec(model, example, image_size))
    if isinstance(example, dict):
        data.set_inputs(list(example))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).train()
    head = set(head_names(model))
    loader = torch.utils.data.DataLoader(data, batch_size, shuffle=False)
    criterion = nn.CrossEntropyLoss()

    samples, start = 0, time.perf_counter()
    for inputs, labels in loader:
        if max_samples is not None and samples >= max_samples:
            break
        loss = criterion(logits_of(forward(model, to_device(inputs, device))), labels.to(device))
        loss.backward()  # gradients add up over the whole set
        samples += len(labels)
        if on_batch is not None:
            on_batch(len(labels))
    seconds = time.perf_counter() - start

    masks, tensors = {}, {}
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        if name in head or any(f in name for f in FROZEN_NAMES) or module.weight.grad is None:
            continue
        score = module.weight.grad.detach().abs().double().cpu().numpy()
        mask = maskfile.WeightMask.compact(select_scores(score, config, f"weight {name}"))
        masks[name] = mask
        tensors[name] = {"torch_name": name, "op": type(module).__name__, "shape": list(mask.shape),
                         "selected": mask.count, "onnx_initializer": None,
                         "onnx_layout": "conv" if len(mask.shape) == 4 else "out_in"}
    meta = {"method": "gps", "loss": "cross_entropy", "labels": "true", "level": config.level,
            "norm": "grad", "budget": describe_budget(config), "num_samples": str(samples),
            **{k: str(v) for k, v in config.options.items()},
            "model": spec, "model_sha256": ""}
    return GpsResult(maskfile.MaskFile(masks, tensors, meta), samples, seconds)

