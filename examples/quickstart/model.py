"""The quickstart's model as a SPEC: ``fps-onnx export examples/quickstart/model.py:build``.

A small ViT (timm's ViT-Tiny layout at 32 px: patch 4, width 64, depth 4,
4 heads, 10 classes) with random weights: the example shows the tool, not
accuracy. ``fps-onnx`` seeds the initialisation (``--seed``, default 0), so
``export`` and ``train`` build the same weights. ``make.py`` exports
``model.onnx`` from it.
"""

from __future__ import annotations


def build(num_classes: int = 10):
    """(model, example inputs) of the quickstart ViT: images [N, 3, 32, 32]."""
    import timm
    import torch

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
        embed_dim=64, depth=4, num_heads=4, num_classes=num_classes,
    )
    return model, torch.randn(2, 3, 32, 32)
