"""fps-onnx: gradient-free selection of the weights to fine-tune, on any ONNX model.

FPS (Feedforward-based Parameter Selection) scores every weight of every
MatMul, Gemm and Conv by ``|w| * mean|input activation|`` from one forward pass
over unlabelled calibration data, keeps the top entries per output neuron and
writes them as a portable mask file.
"""

from __future__ import annotations

__version__ = "0.1.0"
