"""ONNX Runtime runs an export and is compared with PyTorch's outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ExportError, first_line

__all__ = ["check"]

log = logging.getLogger(__name__)


def check(path: Path, checks, tolerance: float, spec: str) -> float:
    """Max |ORT - torch| over ``checks`` ((feed, expected outputs, real-token mask or
    None)); ExportError above tolerance. ONNX Runtime reads the file by path, so
    external data is read where it lies. Where a token mask is given, outputs
    shaped [batch, sequence, ...] are compared on real tokens only. The runtime gets
    the file's graph with its embedded weights referenced where they lie in it (see
    :mod:`fps_onnx.onnx.protofile`), so it reads them from the file instead of a parsed copy."""
    import onnxruntime as ort

    from ..onnx.protofile import MalformedProto, load_graph
    from ..providers import session_options

    options = session_options()
    try:
        light, folder = load_graph(path)
    except MalformedProto:
        model = str(path)
    else:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        model = light.SerializeToString()
        del light
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime cannot load the export of {spec}: {first_line(exc)}") from exc
    del model
    worst = 0.0
    for feed, want, real in checks:
        try:
            got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime cannot run the export of {spec}: {first_line(exc)}") from exc
        for g, w in zip(got, want):
            if real is not None and g.shape[:2] == real.shape == w.shape[:2]:
                g, w = g[real], w[real]
            diff = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
            limit = tolerance * max(1.0, float(np.max(np.abs(w))) if w.size else 1.0)
            if not diff <= limit:
                raise ExportError(f"the ONNX export of {spec} differs from PyTorch by {diff:.3g} "
                                  f"(tolerance {limit:.3g})")
            worst = max(worst, diff)
    del session
    log.debug("ONNX Runtime vs PyTorch: max abs difference %.3g", worst)
    return worst
