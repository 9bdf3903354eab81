"""Choosing the ONNX Runtime execution provider without a wall of errors.

``onnxruntime-gpu`` lists the CUDA provider even where no GPU or driver exists
and, asked for it there, logs a loud error and falls back to the CPU. So
"auto" first checks for the CUDA driver, then creates a one-node session with
ORT's logging silenced, and uses CUDA only if that session really runs on it.

Every session fps-onnx makes takes its options from :func:`session_options`,
which routes ONNX Runtime's own logging through ours: ORT writes its lines
straight to stderr (``[E:onnxruntime:...]``, several lines, colour codes), so
it is silenced unless fps-onnx logs at debug level (``fps-onnx -v``); its
errors reach the user as the exception each failure raises, in one line.
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


#: ONNX Runtime's severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ORT_DEBUG, _ORT_QUIET = 2, 4


def session_options():
    """``onnxruntime.SessionOptions`` whose logging follows ours: ORT's warnings
    and errors on stderr only when the ``fps_onnx`` logger is at debug level,
    nothing otherwise (the process-wide default logger included)."""
    import onnxruntime as ort

    severity = _ORT_DEBUG if log.isEnabledFor(logging.DEBUG) else _ORT_QUIET
    ort.set_default_logger_severity(severity)
    options = ort.SessionOptions()
    options.log_severity_level = severity
    return options


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
    options = session_options()
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=[CUDA, CPU]
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "no CUDA"
        return f"creating a CUDA session failed ({exc})"
    if session.get_providers()[0] != CUDA:
        return "the CUDA provider could not be initialised (missing CUDA/cuDNN libraries?)"
    return None
