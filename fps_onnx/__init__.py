"""fps-onnx: gradient-free selection of the weights to fine-tune, on any ONNX model.

FPS (Feedforward-based Parameter Selection) scores every weight of every
MatMul, Gemm and Conv by ``|w| * mean|input activation|`` from one forward pass
over unlabelled calibration data, keeps the top entries per output neuron and
writes them as a portable mask file.

The stable names are importable from here; each loads its module on first use,
so ``import fps_onnx`` imports neither torch nor onnxruntime::

    import fps_onnx

    result = fps_onnx.run_select("model.onnx", "images/", fps_onnx.SelectConfig(fraction=0.01))
    fps_onnx.save_masks(result.masks, "masks.safetensors")
    fps_onnx.prepare(torch_model, "masks.safetensors")   # needs torch
    ...train...
    fps_onnx.merge(torch_model)

The package is layered, each layer importing only those below it (``tests/test_layers.py``):
``errors``/``_io`` -> ``onnx/`` -> ``data/`` -> ``calibrate``/``stats``/``providers`` ->
``selection/`` -> ``report/`` -> ``torch/``/``integrations/`` -> ``pipeline`` -> this API -> ``cli/``.
"""

from __future__ import annotations

from importlib import import_module

from . import _moved
from ._version import __version__

# public name -> module that defines it (imported on first use)
_EXPORTS = {
    "run_select": "fps_onnx.pipeline",
    "SelectConfig": "fps_onnx.selection.score",
    "MaskFile": "fps_onnx.selection.maskfile",
    "load_masks": "fps_onnx.selection.maskfile",
    "save_masks": "fps_onnx.selection.maskfile",
    "Stats": "fps_onnx.stats",
    "prepare": "fps_onnx.torch.train.loop",
    "merge": "fps_onnx.torch.train.sparse",
    "scale_steps": "fps_onnx.torch.train.loop",
    "export": "fps_onnx.torch.export",
    "map_masks": "fps_onnx.torch.mapping",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

_moved.install()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
