"""Choosing the ONNX Runtime execution provider without a wall of errors.

``onnxruntime-gpu`` lists the CUDA provider even where no GPU or driver exists
and, asked for it there, logs a loud error and falls back to the CPU. So
"auto" first checks for the CUDA driver, then creates a one-node session with
ORT's logging silenced, and uses CUDA only if that session really runs on it.
"""

from __future__ import annotations

import ctypes
import functools
import logging

from .errors import FpsError

log = logging.getLogger(__name__)

CHOICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(FpsError):
    """The requested execution provider cannot be used."""


def resolve(choice: str) -> list[str]:
    """ORT providers for ``choice`` ("auto", "cuda" or "cpu"), best first."""
    if choice not in CHOICES:
        raise ProviderError(f"provider must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "cpu":
        return [CPU]
    reason = cuda_unavailable()
    if reason is None:
        return [CUDA, CPU]
    if choice == "cuda":
        raise ProviderError(f"the CUDA provider cannot be used here: {reason}")
    log.debug("CUDA provider not used: %s", reason)
    return [CPU]


@functools.cache
def cuda_unavailable() -> str | None:
    """None when a CUDA session can really be created, else the reason why not."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1) on this machine"
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=[CUDA, CPU]
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "no CUDA"
        return f"creating a CUDA session failed ({exc})"
    if session.get_providers()[0] != CUDA:
        return "the CUDA provider could not be initialised (missing CUDA/cuDNN libraries?)"
    return None
