"""Reading an ONNX model for every layer above: the whole file (:func:`load_model`), or the
graph with its weights referenced where they lie and every external-data reference checked
(:func:`load_graph`, :func:`load_checked`), and the inputs a caller feeds (:func:`graph_inputs`).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..errors import ModelError
from . import decoder, external, protofile, validate

__all__ = ["graph_inputs", "load_checked", "load_graph", "load_model"]


def load_model(path: str | os.PathLike, load_weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, or raise ModelError saying why it cannot be read."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ModelError(f"model file {path} is not a regular file")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelError(f"model file {path} is empty")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise ModelError(f"cannot read ONNX model {path}: {exc}") from exc


def load_graph(path: str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    """The model with its large embedded weights referenced where they lie in
    the file (see :mod:`fps_onnx.onnx.protofile`), and the folder its external-data
    locations are relative to. ONNX Runtime and the scoring read the weights
    from there, as plain inference does, and no copy is held in memory.

    A merged decoder (every node inside ``If(use_cache_branch)``) comes back
    with its no-past branch inlined (:func:`fps_onnx.onnx.decoder.inline_cache_branch`).
    Every external-data reference is checked first (:func:`load_checked`)."""
    model, folder, _ = load_checked(path)
    return model, folder


def load_checked(path: str | os.PathLike) -> tuple[onnx.ModelProto, str, list[external.ExternalRef]]:
    """:func:`load_graph` with every external-data reference of the model (all
    graphs) checked and pointed at the real file it names
    (:func:`fps_onnx.onnx.external.resolve`): (model, folder, references). Raises
    ModelError before anything is read from a file the references name."""
    try:
        model, folder = protofile.load_graph(path)
    except (protofile.MalformedProto, OSError):
        # load_model says what is wrong (missing, empty, corrupt), or reads it whole
        model = load_model(path, load_weights=False)
        folder = os.path.dirname(os.path.abspath(path))
    refs, folder = external.resolve(model, folder, path)
    validate.check_model(model, path)
    return decoder.inline_cache_branch(model)[0], folder, refs


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the inputs a caller must feed (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]
