"""``export``: write the PyTorch model of a SPEC as a checked ONNX file.

The model comes from :func:`fps_onnx.torch.models.build_model` (SPECs
``timm:NAME``, ``hf:PATH``, ``module.path:function``); without
``num_classes`` an ``hf:`` folder is exported as its bare backbone.

The exported graph keeps the PyTorch name of every selectable weight: the
legacy exporter runs without constant folding, so a Linear on a 3-D input
stays ``MatMul(x, Transpose(<param>))`` and no BatchNorm is folded into a
Conv (ONNX Runtime folds both when it loads the model, so inference is as
fast). Any weight an exporter still renamed (the dynamo exporter's ``val_13``)
gets its parameter's name back by value (:mod:`fps_onnx.torch.names`). The file
is then run with ONNX Runtime and compared to PyTorch on the example inputs
(:mod:`fps_onnx.torch.ortcheck`).

Decoder-only language models (``hf:`` folders of a causal LM, or any
transformers ``...ForCausalLM`` / ``...LMHeadModel``) are exported as their
causal LM without a key/value cache: inputs ``input_ids`` and
``attention_mask`` (int64, dynamic batch and sequence), output ``logits``;
position ids are computed in the graph from the attention mask (as
``generate`` does), so left-padded batches give the logits of unpadded ones.
They are checked on real tokens only, and the folder's ``config.json`` and
tokenizer files are copied beside the ``.onnx`` (``select`` reads text with
them).

Models above ``_MAX_PROTO_BYTES`` are written with their weights in one
external data file beside the ``.onnx``. Memory: the legacy exporter writes
the graph alone (every parameter and buffer it uses a graph input named by
its state_dict key, tied weights under the first name), and each weight is
written from the model's own tensor straight into the output (the data file,
or the ``.onnx`` as ``onnx.save`` would serialize it; :mod:`fps_onnx.torch.datafile`),
so the weights exist once; a graph input the state_dict does not explain makes the exporter write
the weights itself instead (as the dynamo exporter always does). The PyTorch
model is then freed (when :func:`export` built it), and ONNX Runtime checks
the file reading each weight where it lies in it.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
from dataclasses import dataclass, field
import gc
import inspect
import logging
import os
from pathlib import Path
import shutil
import tempfile
import time
import warnings

import numpy as np
import onnx

from .._io import Outputs, captured_output, check_writable, transaction
from ..errors import ExportError, first_line
from ..onnx import graph
from . import datafile, hf, ortcheck
from .models import build_model, check_spec, is_causal_lm_model, load_checkpoint  # noqa: F401 - also importable from here
from .models import require as _require
from .names import restore_names  # noqa: F401 - also importable from here

__all__ = ["CAUSAL_INPUTS", "EXPORTERS", "ExportConfig", "ExportResult", "LLM_SIDE_FILES", "export",
    "export_module"]

log = logging.getLogger(__name__)

EXPORTERS = ("legacy", "dynamo")
_MAX_PROTO_BYTES = 1_800_000_000  # above this, weights go to an external data file
#: Files of an ``hf:`` causal LM folder copied beside its export (those that exist).
LLM_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
                  "merges.txt", "chat_template.jinja")
CAUSAL_INPUTS = ("input_ids", "attention_mask")


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
    external_data: str | None = None  # the weights' file beside the .onnx, if any
    copied: list[str] = field(default_factory=list)  # files copied beside it (causal LMs)


# --------------------------------------------------------------------------- export


def export(
    spec: str,
    output: str | os.PathLike,
    config: ExportConfig = ExportConfig(),
    *,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    outputs: Outputs | None = None,
) -> ExportResult:
    """Export the model of ``spec`` to ``output`` and check it with ONNX Runtime.

    Nothing is written unless the export and the check succeed. For an ``hf:``
    causal LM the folder's config and tokenizer files are copied beside it. The
    ``.onnx``, its data file and the copied files are one output transaction
    (staged in ``outputs`` when given); an output that is one of the files the
    model is read from is refused before any work.
    """
    output = check_writable(output)
    folder = Path(spec[3:]) if spec.startswith("hf:") else None
    read = {"--checkpoint": checkpoint, spec: _folder_files(folder) if folder is not None else None}
    with transaction(outputs, planned={"-o": output}, inputs=read) as staged:
        model, inputs = build_model(spec, checkpoint, num_classes, img_size)
        side = []
        if is_causal_lm_model(model) and folder is not None:
            side = hf.side_files(folder, LLM_SIDE_FILES)  # checked before anything is written
        holder = [model]
        del model  # the export frees it once it is no longer needed
        result = _export(holder, inputs, output, config, spec, staged)
        result.copied = _copy_side_files(side, output, staged)
    return result


def _folder_files(folder: Path) -> list[Path]:
    """The files of a model folder an export reads (config, tokenizer, weights)."""
    patterns = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja")
    return [file for pattern in patterns for file in folder.glob(pattern)] if folder.is_dir() else []


def export_module(model, inputs: Mapping, output, config: ExportConfig = ExportConfig(), *,
                  spec: str = "the model") -> ExportResult:
    """Export an nn.Module called as ``model(*inputs.values())`` (see :func:`build_model`).

    A transformers causal LM is called by keyword and exported as
    ``input_ids, attention_mask -> logits`` (see the module docstring).
    """
    return _export([model], inputs, output, config, spec)


def _export(holder: list, inputs: Mapping, output, config: ExportConfig, spec: str,
            outputs: Outputs | None = None) -> ExportResult:
    """Export the model in ``holder`` (a one-item list: it is taken out and dropped as
    soon as it is no longer needed, which frees it when nothing else refers to it)."""
    torch = _require("torch", "exporting")
    output = check_writable(output)
    start = time.perf_counter()
    model = holder.pop()
    model.eval()
    causal = is_causal_lm_model(model)
    inputs = _causal_inputs(inputs, spec) if causal else dict(inputs)
    one = {k: v[:1] for k, v in inputs.items()}  # another batch size: the axis must be dynamic
    real = inputs["attention_mask"].numpy() != 0 if causal else None  # logits compared there

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        raw = tmp / "raw" / "raw.onnx"  # (the exporter may put one file per weight beside it)
        raw.parent.mkdir()
        with _causal_forward(model) if causal else contextlib.nullcontext():
            with torch.no_grad():
                expected = _flatten(model(*inputs.values()))
                expected_one = _flatten(model(*one.values()))
            if not expected:
                raise ExportError(f"{spec} returns no tensor")
            if causal:
                out_names = ["logits"]
                axes = {n: {0: "batch", 1: "sequence"} for n in [*inputs, *out_names]}
            else:
                token = _is_token_model(inputs)
                out_names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
                axes = {n: _axes(t, token) for n, t in inputs.items()}
                axes.update({n: _axes(t, token and t.ndim >= 3) for n, t in zip(out_names, expected)})
            checks = [(inputs, [_numpy(t) for t in expected], real),
                      (one, [_numpy(t) for t in expected_one], None if real is None else real[:1])]
            del expected, expected_one
            # The legacy exporter writes the graph alone (every weight a graph input named
            # by its state_dict key) and the weights are streamed from the model into the
            # output, so no copy of them is ever made; the exporter's own copies (the
            # model's ModelProto, its serialized string) cost three times the weights.
            streamed = config.exporter == "legacy"
            _run_exporter(torch, model, inputs, raw, out_names, axes, config, spec, params=not streamed)
            proto, base = _load_light(raw, spec)
            state = model.state_dict()
            weights = datafile.input_weights(proto, state, inputs) if streamed else None
            if streamed and weights is None:  # inputs the state_dict does not explain
                _run_exporter(torch, model, inputs, raw, out_names, axes, config, spec)
                proto, base = _load_light(raw, spec)
        if weights is not None:
            datafile.inputs_to_initializers(proto, weights)
        # The graph, its weights left in the exporter's files or the model; names restored by value.
        renamed = restore_names(proto, state, base)
        parameter_names = set(state)
        del state
        if weights is None:
            model = None
            gc.collect()  # the PyTorch weights go here when export() built the model
        sites = graph.find_weights(proto)
        unnamed = [s.key for s in sites if s.key not in parameter_names]
        final = tmp / output.name
        big = datafile.total_bytes(proto) + sum(t.nbytes for t in (weights or {}).values()) > _MAX_PROTO_BYTES
        # The .onnx and its data file must change as a pair: an old model.onnx
        # reading a new data file (or the reverse) is a corrupt model. Weights go
        # to whichever of two names the old .onnx does not use, so moving the
        # new data file into place leaves the old pair whole; replacing the
        # .onnx (one rename) then switches from the old pair to the new one, and
        # only after that is the old data file removed. A crash at any point
        # leaves the old pair or the new one, plus at most an unused data file.
        names = [f"{output.name}.data", f"{output.name}.1.data"]
        in_use = datafile.external_locations(output)
        data_name = next((n for n in names if n not in in_use), names[0])
        try:
            if weights is not None and big:
                datafile.weights_to_data_file(proto, weights, tmp / data_name, data_name)
                onnx.save(proto, str(final))
            elif weights is not None:
                datafile.save_streamed(proto, weights, final)
            else:
                if big:
                    datafile.to_one_data_file(proto, base, tmp / data_name, data_name)
                else:
                    datafile.embed(proto, base)
                onnx.save(proto, str(final))
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot write the ONNX export of {spec}: {first_line(exc)}") from exc
        proto = weights = model = None
        shutil.rmtree(raw.parent, ignore_errors=True)
        gc.collect()  # the PyTorch weights go here when export() built the model
        diff = ortcheck.check(final, checks, config.tolerance, spec) if config.check else None
        with_data = (tmp / data_name).exists()  # (small tensors stay in the .onnx)
        with transaction(outputs) as staged:  # the data file is put in place first
            if with_data:
                staged.write(output.parent / data_name, lambda f: os.replace(tmp / data_name, f))
            staged.write(output, lambda f: os.replace(final, f))
            for name in names:
                if name != data_name or not with_data:
                    staged.remove(output.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if unnamed:
        log.warning("%d weight(s) keep exporter names: %s", len(unnamed), ", ".join(unnamed[:5]))
    return ExportResult(output, len(sites), unnamed, renamed, diff, time.perf_counter() - start,
                        external_data=data_name if with_data else None)


def _causal_inputs(inputs: Mapping, spec: str) -> dict:
    """``input_ids`` and ``attention_mask`` (int64; all ones when not given)."""
    extra = [n for n in inputs if n not in CAUSAL_INPUTS]
    if "input_ids" not in inputs or extra:
        raise ExportError(f"{spec}: a causal LM is exported from input_ids and attention_mask only, "
                          f"not {', '.join(map(str, inputs)) or 'nothing'}")
    ids = inputs["input_ids"].long()
    mask = inputs.get("attention_mask")
    mask = ids.new_ones(ids.shape) if mask is None else mask.long()
    if tuple(mask.shape) != tuple(ids.shape) or ids.ndim != 2:
        raise ExportError(f"{spec}: input_ids and attention_mask must both be [batch, sequence], "
                          f"not {list(ids.shape)} and {list(mask.shape)}")
    return {"input_ids": ids, "attention_mask": mask}


_NO_ATTRIBUTE = object()


@contextlib.contextmanager
def _causal_forward(model):
    """Make ``model(input_ids, attention_mask)`` return the logits of a causal LM
    without a key/value cache; position ids count the real tokens (padding: 1)."""
    original = model.forward
    params = inspect.signature(original).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    fixed = {"use_cache": False} if "use_cache" in params or takes_any else {}

    def forward(input_ids, attention_mask):
        kwargs = dict(fixed)
        if "position_ids" in params:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        out = original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    with _replaced_forward(model, forward):
        yield


@contextlib.contextmanager
def _replaced_forward(model, forward):
    """Set ``model.forward`` to ``forward``; afterwards the instance attribute is as it was."""
    saved = model.__dict__.get("forward", _NO_ATTRIBUTE)
    model.forward = forward
    try:
        yield
    finally:
        if saved is _NO_ATTRIBUTE:
            model.__dict__.pop("forward", None)
        else:
            model.forward = saved


def _load_light(raw: Path, spec: str) -> tuple[onnx.ModelProto, str]:
    """The exporter's model, its weights referenced where they lie (see :mod:`fps_onnx.onnx.protofile`)."""
    from ..onnx.protofile import MalformedProto, load_graph

    try:
        return load_graph(raw)
    except (MalformedProto, OSError) as exc:
        raise ExportError(f"cannot read the ONNX export of {spec}: {first_line(exc)}") from exc


def _copy_side_files(files: list[Path], output: Path, outputs: Outputs) -> list[str]:
    """Copy the model folder's checked config and tokenizer files (:func:`hf.side_files`)
    beside ``output`` (staged in ``outputs``)."""
    copied = []
    for source in files:
        target = output.parent / source.name
        with contextlib.suppress(OSError):
            if target.exists() and os.path.samefile(source, target):
                continue
        outputs.write(target, lambda tmp, source=source: hf.copy_side_file(source, tmp))
        copied.append(source.name)
    return copied


def _run_exporter(torch, model, inputs, path, out_names, axes, config, spec, params: bool = True) -> None:
    """Export ``model`` to ``path``; ``params=False`` (legacy exporter only) leaves the
    weights out, each one a graph input named by its state_dict key."""
    args = tuple(inputs.values())
    kwargs = dict(input_names=list(inputs), output_names=out_names, dynamic_axes=axes,
                  opset_version=config.opset)
    chatter: list[str] = []
    try:
        with captured_output(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if config.exporter == "legacy":
                with _keyword_forward(model, list(inputs)):
                    torch.onnx.export(model, args, str(path), dynamo=False, do_constant_folding=False,
                                      export_params=params, **kwargs)
            else:
                torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - exporters raise anything
        raise ExportError(f"cannot export {spec} ({config.exporter} exporter): {first_line(exc)}") from exc
    finally:
        log.debug("exporter output:\n%s", "".join(chatter))
    if not path.is_file():
        raise ExportError(f"cannot export {spec}: the {config.exporter} exporter wrote nothing")


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

    with _replaced_forward(model, forward):
        yield


def _numpy(t) -> np.ndarray:
    t = t.detach()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


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

