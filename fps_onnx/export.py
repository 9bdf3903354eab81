"""``export``: write the PyTorch model of a SPEC as a checked ONNX file.

The model comes from :func:`fps_onnx.models.build_model` (SPECs
``timm:NAME``, ``hf:PATH``, ``module.path:function``); without
``num_classes`` an ``hf:`` folder is exported as its bare backbone.

The exported graph keeps the PyTorch name of every selectable weight: the
legacy exporter runs without constant folding, so a Linear on a 3-D input
stays ``MatMul(x, Transpose(<param>))`` and no BatchNorm is folded into a
Conv (ONNX Runtime folds both when it loads the model, so inference is as
fast). Any weight an exporter still renamed (the dynamo exporter's ``val_13``)
gets its parameter's name back by value (:mod:`fps_onnx.mapping`). The file
is then run with ONNX Runtime and compared to PyTorch on the example inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
from dataclasses import dataclass, field
import inspect
import io
import logging
import os
from pathlib import Path
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx

from . import graph, mapping
from ._io import _fsync as _fsync_file, check_writable
from .errors import ExportError, OutputError, first_line
from .models import build_model, check_spec, load_checkpoint  # noqa: F401 - also importable from here
from .models import require as _require

log = logging.getLogger(__name__)

EXPORTERS = ("legacy", "dynamo")
_MAX_PROTO_BYTES = 1_800_000_000  # above this, weights go to an external data file


@dataclass(frozen=True)
class ExportConfig:
    """How the model is exported and checked."""

    exporter: str = "legacy"
    opset: int = 18
    tolerance: float = 1e-3  # max |onnx - torch|, relative to max(1, max |torch|)
    check: bool = True

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ExportError(f"unknown exporter {self.exporter!r} (use {' or '.join(EXPORTERS)})")
        if self.tolerance <= 0:
            raise ExportError(f"tolerance must be positive, not {self.tolerance}")


@dataclass
class ExportResult:
    """What an export wrote and how well ONNX Runtime agreed with PyTorch."""

    path: Path
    weights: int  # selectable weights in the graph
    unnamed: list[str]  # of those, the ones not named like a parameter
    renamed: dict[str, str] = field(default_factory=dict)  # exporter name -> parameter name
    max_abs_diff: float | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- export


def export(
    spec: str,
    output: str | os.PathLike,
    config: ExportConfig = ExportConfig(),
    *,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> ExportResult:
    """Export the model of ``spec`` to ``output`` and check it with ONNX Runtime.

    Nothing is written unless the export and the check succeed.
    """
    output = check_writable(output)
    model, inputs = build_model(spec, checkpoint, num_classes, img_size)
    return export_module(model, inputs, output, config, spec=spec)


def export_module(model, inputs: Mapping, output, config: ExportConfig = ExportConfig(), *,
                  spec: str = "the model") -> ExportResult:
    """Export an nn.Module called as ``model(*inputs.values())`` (see :func:`build_model`)."""
    torch = _require("torch", "exporting")
    output = check_writable(output)
    start = time.perf_counter()
    model.eval()
    inputs = dict(inputs)
    with torch.no_grad():
        expected = _flatten(model(*inputs.values()))
    if not expected:
        raise ExportError(f"{spec} returns no tensor")
    token = _is_token_model(inputs)
    out_names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    axes = {n: _axes(t, token) for n, t in inputs.items()}
    axes.update({n: _axes(t, token and t.ndim >= 3) for n, t in zip(out_names, expected)})

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        raw = tmp / "raw.onnx"
        _run_exporter(torch, model, inputs, raw, out_names, axes, config, spec)
        proto = onnx.load(str(raw))
        state = model.state_dict()
        renamed = restore_names(proto, state)
        sites = graph.find_weights(proto)
        unnamed = [s.key for s in sites if s.key not in state]
        final = tmp / output.name
        big = proto.ByteSize() > _MAX_PROTO_BYTES
        # The .onnx and its data file must change as a pair: an old model.onnx
        # reading a new data file (or the reverse) is a corrupt model. Weights go
        # to whichever of two names the old .onnx does not use, so moving the
        # new data file into place leaves the old pair whole; replacing the
        # .onnx (one rename) then switches from the old pair to the new one, and
        # only after that is the old data file removed. A crash at any point
        # leaves the old pair or the new one, plus at most an unused data file.
        names = [f"{output.name}.data", f"{output.name}.1.data"]
        in_use = _external_locations(output)
        data_name = next((n for n in names if n not in in_use), names[0])
        onnx.save(proto, str(final), save_as_external_data=big, location=data_name)
        del proto
        diff = _check(final, model, inputs, expected, config, spec) if config.check else None
        with_data = (tmp / data_name).exists()  # (small tensors stay in the .onnx)
        try:
            for file in (tmp / data_name, final) if with_data else (final,):
                _fsync_file(file)
            if with_data:
                os.replace(tmp / data_name, output.parent / data_name)
            os.replace(final, output)
        except OSError as exc:
            raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from exc
        for name in names:
            if name != data_name or not with_data:
                with contextlib.suppress(OSError):
                    os.unlink(output.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if unnamed:
        log.warning("%d weight(s) keep exporter names: %s", len(unnamed), ", ".join(unnamed[:5]))
    return ExportResult(output, len(sites), unnamed, renamed, diff, time.perf_counter() - start)


def _external_locations(path: Path) -> set[str]:
    """The external-data file names an existing ONNX file refers to (none if it is unreadable)."""
    from ._onnxfile import load_graph

    try:
        model, _ = load_graph(path)
    except Exception:  # noqa: BLE001 - no readable old model: nothing of it to keep
        return set()
    found: set[str] = set()

    def walk(g) -> None:
        tensors = list(g.initializer)
        for node in g.node:
            for attr in node.attribute:
                tensors += [attr.t, *attr.tensors]
                for sub in [attr.g, *attr.graphs]:
                    walk(sub)
        for t in tensors:
            found.update(e.value for e in t.external_data if e.key == "location")

    walk(model.graph)
    return found


def _run_exporter(torch, model, inputs, path, out_names, axes, config, spec) -> None:
    args = tuple(inputs.values())
    kwargs = dict(input_names=list(inputs), output_names=out_names, dynamic_axes=axes,
                  opset_version=config.opset)
    chatter: list[str] = []
    try:
        with _captured_output(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if config.exporter == "legacy":
                with _keyword_forward(model, list(inputs)):
                    torch.onnx.export(model, args, str(path), dynamo=False, do_constant_folding=False, **kwargs)
            else:
                torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - exporters raise anything
        raise ExportError(f"cannot export {spec} ({config.exporter} exporter): {first_line(exc)}") from exc
    finally:
        log.debug("exporter output:\n%s", "".join(chatter))
    if not path.is_file():
        raise ExportError(f"cannot export {spec}: the {config.exporter} exporter wrote nothing")


@contextlib.contextmanager
def _captured_output(into: list[str]):
    """Collect what the exporters print (progress, C++ graph dumps on failure) instead of showing it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
                try:
                    yield
                finally:
                    into.append(out.getvalue())
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            into.append(sink.read().decode(errors="replace"))


@contextlib.contextmanager
def _keyword_forward(model, names: list[str]):
    """Trace ``forward(*inputs)`` as ``forward(**inputs)``.

    The legacy exporter fills a forward's unnamed parameters with their
    defaults, which collides with models that set some of them themselves
    (transformers' ``use_cache``). The parameter names stay untouched.
    """
    original = model.forward
    params = inspect.signature(original).parameters
    by_name = all(n in params for n in names)

    def forward(*args):
        return original(**dict(zip(names, args))) if by_name else original(*args)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def restore_names(model: onnx.ModelProto, state_dict: Mapping[str, object]) -> dict[str, str]:
    """Rename weights an exporter renamed to their parameter's name (in place).

    Each selectable weight not named like a parameter is matched by value
    (exactly, W or W^T) and its initializer renamed when that name is free.
    A renamed weight may hold the transpose of the parameter; its layout in
    :func:`fps_onnx.graph.find_weights` says so. Returns old -> new names.
    """
    sites = [s for s in graph.find_weights(model) if s.key not in state_dict]
    if not sites:
        return {}
    values = dict((s.key, w) for s, w in graph.iter_weight_values(model, sites))
    strict = mapping.MatchConfig(rtol=0.0, atol=0.0, half_rtol=0.0, half_atol=0.0, scaled=False)
    report = mapping.match_weights(values, state_dict, {s.key: s.dtype for s in sites}, strict)
    taken = {t.name for t in model.graph.initializer}
    taken |= {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    renamed = {}
    for key, match in report.matches.items():
        if match.how == "order" or match.torch_name in taken:
            continue  # ambiguous, or the name is used (tied weights): leave it to `map`
        renamed[key] = match.torch_name
        taken.add(match.torch_name)
    _rename(model.graph, renamed)
    return renamed


def _rename(g: onnx.GraphProto, names: Mapping[str, str]) -> None:
    if not names:
        return
    for t in g.initializer:
        t.name = names.get(t.name, t.name)
    for vi in [*g.input, *g.value_info]:
        vi.name = names.get(vi.name, vi.name)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
        for attr in node.attribute:  # subgraphs (If/Loop) may use the weight too
            for sub in [attr.g, *attr.graphs] if attr.type in (5, 10) else []:
                _rename(sub, names)


def _check(path: Path, model, inputs, expected, config: ExportConfig, spec: str) -> float:
    """Max |ORT - torch| on the example inputs and on one sample; ExportError above tolerance."""
    import onnxruntime as ort

    torch = _require("torch", "checking an export")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX Runtime cannot load the export of {spec}: {first_line(exc)}") from exc
    one = {k: v[:1] for k, v in inputs.items()}  # another batch size: the axis must be dynamic
    with torch.no_grad():
        expected_one = _flatten(model(*one.values()))
    worst = 0.0
    for feed, want in ((inputs, expected), (one, expected_one)):
        try:
            got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime cannot run the export of {spec}: {first_line(exc)}") from exc
        for g, w in zip(got, want):
            w = w.float().numpy() if w.is_floating_point() else w.numpy()
            diff = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
            limit = config.tolerance * max(1.0, float(np.max(np.abs(w))) if w.size else 1.0)
            if not diff <= limit:
                raise ExportError(f"the ONNX export of {spec} differs from PyTorch by {diff:.3g} "
                                  f"(tolerance {limit:.3g})")
            worst = max(worst, diff)
    log.debug("ONNX Runtime vs PyTorch: max abs difference %.3g", worst)
    return worst


def _flatten(out) -> list:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return [out] if hasattr(out, "shape") else []


def _is_token_model(inputs: Mapping) -> bool:
    return any(not t.is_floating_point() and t.ndim == 2 for t in inputs.values())


def _axes(t, token: bool) -> dict[int, str]:
    axes = {0: "batch"} if t.ndim >= 1 else {}
    if token and t.ndim >= 2:
        axes[1] = "sequence"
    return axes

