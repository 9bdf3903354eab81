"""``models``: PyTorch models from a SPEC, and the parameter names masks are keyed by.

A SPEC names where the model comes from, never downloading anything:

* ``timm:NAME`` - ``timm.create_model(NAME, pretrained=False)``; weights only
  from ``checkpoint``;
* ``hf:PATH`` - a local transformers folder (``local_files_only``); text
  models take ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
  the model has it), vision models ``pixel_values``; a decoder-only language
  model is always its causal LM (``AutoModelForCausalLM``), called by keyword
  with ``input_ids`` and ``attention_mask``;
* ``module.path:function`` or ``file.py:function`` - a function returning
  ``(model, example_inputs)``.

Naming rule. Masks are keyed by the parameter names of the model users
fine-tune, ``build_model(spec, task=True)``: the one ``select --torch-model``,
``map`` and ``train`` all build. For ``hf:`` that is the task model of the
first :data:`HF_TASKS` entry that fits the folder's config (e.g.
``AutoModelForSequenceClassification``: ``bert.encoder.layer.0...``), while
``export`` without ``num_classes`` writes the bare backbone (``AutoModel``:
``encoder.layer.0...``). A mask key naming a backbone parameter still names the
task model's parameter that ends with ``"." + key``, when exactly one does
(:func:`resolve_keys`). timm and function SPECs name the same parameters
either way.

Only the builders import torch, timm or transformers, and only when called.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
import contextlib
from dataclasses import dataclass
import importlib
import importlib.util
import inspect
import os
from pathlib import Path
import sys

from ..data.text import pad_id
from ..errors import ExportError, FpsError, MaskError, MissingDependency, first_line
from ..selection.maskfile import MaskFile

__all__ = ["CAUSAL_LM_HEADS", "HF_TASKS", "HfTask", "build_for_data", "build_model", "causal_lm_inputs",
    "check_spec", "hf_task", "is_causal_lm", "is_causal_lm_model", "load_checkpoint", "rekey_masks",
    "require", "resolve_keys"]

_SPEC_FORMS = "use timm:NAME, hf:PATH or module.path:function"


@dataclass(frozen=True)
class HfTask:
    """The transformers Auto class of the model users fine-tune, for configs ``fits`` accepts."""

    auto_class: str  # e.g. "AutoModelForSequenceClassification"
    fits: Callable[[object], bool]  # config -> whether this task applies
    inputs: str = "tokens"  # example inputs: "tokens", "causal" or "pixels"
    num_labels: bool = True  # the class takes num_labels (a new classification head)
    export_task: bool = False  # export writes the task model itself, not the backbone


def _is_vision(config) -> bool:
    return getattr(config, "vocab_size", None) is None


#: Class-name endings of causal language model heads (LlamaForCausalLM, GPT2LMHeadModel).
CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(config) -> bool:
    """Whether a transformers config is that of a decoder-only language model.

    Not an encoder-decoder, and has a vocabulary; then the saved
    ``architectures`` decide when they name a causal LM head (yes) or any other
    head (``...ForSequenceClassification``: no); a bare backbone, or none named,
    is a causal LM when ``AutoModelForCausalLM`` knows its model type and
    ``AutoModelForMaskedLM`` does not (BERT-style encoders are in both).
    """
    if getattr(config, "is_encoder_decoder", False) or _is_vision(config):
        return False
    architectures = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if any(a.endswith(CAUSAL_LM_HEADS) for a in architectures):
        return True
    if any("For" in a for a in architectures):
        return False
    from transformers.models.auto import modeling_auto as auto

    model_type = getattr(config, "model_type", None)
    return (model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def is_causal_lm_model(model) -> bool:
    """Whether ``model`` is a transformers causal LM (with its lm_head)."""
    config = getattr(model, "config", None)
    return (config is not None and type(model).__name__.endswith(CAUSAL_LM_HEADS)
            and callable(getattr(model, "get_output_embeddings", None)))


#: Tried in order; the first that fits a folder's config builds its task model.
HF_TASKS: tuple[HfTask, ...] = (
    HfTask("AutoModelForCausalLM", is_causal_lm, inputs="causal", num_labels=False, export_task=True),
    HfTask("AutoModelForImageClassification", _is_vision, inputs="pixels"),
    HfTask("AutoModelForSequenceClassification", lambda config: True),
)


def hf_task(config) -> HfTask:
    """The :data:`HF_TASKS` entry for a transformers config."""
    return next(task for task in HF_TASKS if task.fits(config))


# --------------------------------------------------------------------------- building


def build_model(
    spec: str,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    seed: int = 0,
    *,
    task: bool = False,
    meta: bool = False,
    dtype=None,
):
    """The PyTorch model a SPEC names, in eval mode, and example inputs for it.

    Returns ``(model, example_inputs)``: ``example_inputs`` is a dict from input
    name to a tensor with a batch of 2, ordered like ``model.forward``'s
    positional parameters, so ``model(*example_inputs.values())`` runs it (a
    causal LM takes them by keyword: ``model(**example_inputs)``).
    ``seed`` seeds every random initialisation (a new head, a model without
    ``checkpoint``). ``checkpoint`` (a ``.safetensors`` or ``torch.save`` file holding a
    state_dict) must fit the model exactly. ``num_classes`` sets the classifier
    (timm; ``hf:`` builds its task model with that many labels); ``img_size``
    the input side. ``task``: build the model users fine-tune, whose parameter
    names masks are keyed by (``hf:`` gets its task model even without
    ``num_classes``; see the module docstring).
    ``meta``: a ``timm:`` or ``hf:`` model on PyTorch's meta device, its
    parameters' names and shapes only (no weights read, initialised or held;
    ``checkpoint`` must be None); a function SPEC is refused (ValueError), as
    its code may load weights of its own. ``dtype``: the torch dtype
    ``hf:`` weights are loaded in (others: as built).
    Raises :class:`ExportError` for an unknown SPEC, a model that cannot be
    built or a checkpoint that does not fit.
    """
    torch = require("torch", "building a PyTorch model")
    torch.manual_seed(seed)
    if meta and (checkpoint is not None or not spec.startswith(("timm:", "hf:"))):
        raise ValueError("a model on the meta device is built from a timm: or hf: SPEC without checkpoint")
    # Model code that prints (e.g. "Loaded pretrained weights") must not reach
    # stdout, where --json output goes.
    with contextlib.redirect_stdout(sys.stderr):
        if spec.startswith("timm:"):
            with torch.device("meta") if meta else contextlib.nullcontext():
                model, inputs = _timm(spec[5:], num_classes, img_size)
        elif spec.startswith("hf:"):
            model, inputs = _hf(spec[3:], num_classes, img_size, task, meta, dtype)
        elif _is_function_spec(spec):
            model, inputs = _function(spec, num_classes, img_size)
        else:
            raise ExportError(f"unknown model SPEC {spec!r}: {_SPEC_FORMS}")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, spec)
    return model.eval(), inputs


def build_for_data(spec: str, checkpoint, num_classes: int | None, given_classes: bool,
                   image_size: int | None, seed: int = 0):
    """(model, example inputs) to fine-tune on labelled data with ``num_classes`` classes.

    The task model of :func:`build_model`: timm and Hugging Face models get a
    new head for the data's classes; a ``module:function`` model is asked for
    ``num_classes`` only when the user gave it (its own head must then fit the
    labels).
    """
    if not spec.startswith(("timm:", "hf:")) and not given_classes:
        num_classes = None
    return build_model(spec, checkpoint=checkpoint, num_classes=num_classes, img_size=image_size,
                       seed=seed, task=True)


def check_spec(spec: str, *, imports: bool = True) -> None:
    """Fail fast (ExportError) on a SPEC that cannot name a model, without building it.

    ``imports=False``: only the checks that import neither torch nor timm nor
    transformers (importing them costs ~0.5 GiB; ``select --torch-model`` checks
    this way before its session and leaves the rest to building the model): the
    package is installed, the folder holds a config and no code to run
    (:func:`fps_onnx.torch.hf.check_folder` without its model type).
    """
    if spec.startswith("timm:"):
        if not imports:
            _installed("timm", "timm models")
            return
        timm = require("timm", "timm models")
        if not timm.is_model(spec[5:]):
            raise ExportError(f"unknown model SPEC {spec!r}: timm has no model {spec[5:]!r}")
    elif spec.startswith("hf:"):
        if not Path(spec[3:], "config.json").is_file():
            raise ExportError(f"unknown model SPEC {spec!r}: no transformers model folder (config.json) there")
        if imports:
            require("transformers", "Hugging Face models")
        else:
            _installed("transformers", "Hugging Face models")
        from .hf import check_folder

        check_folder(spec[3:], known_type=imports)
    elif not _is_function_spec(spec):
        raise ExportError(f"unknown model SPEC {spec!r}: {_SPEC_FORMS}")


def _installed(package: str, purpose: str) -> None:
    """MissingDependency unless ``package`` could be imported (it is not imported)."""
    if importlib.util.find_spec(package) is None:
        raise MissingDependency(package, purpose)


def load_checkpoint(model, path: str | os.PathLike, spec: str = "the model") -> None:
    """Load a state_dict file into ``model``; ExportError unless it fits exactly."""
    torch = require("torch", "loading a checkpoint")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - many formats, many exception types
        raise ExportError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc
    for wrapper in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state:
        raise ExportError(f"checkpoint {path} holds no state_dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items()
             if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            parts.append(f"shape mismatch for {', '.join(wrong[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:3])})")
        raise ExportError(f"checkpoint {path} does not fit {spec}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def require(package: str, purpose: str):
    """Import an optional dependency, or raise MissingDependency naming the install."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingDependency(package, purpose) from None


def _is_function_spec(spec: str) -> bool:
    return ":" in spec and not spec.startswith(":") and not spec.endswith(":")


def _timm(name: str, num_classes, img_size):
    torch = require("torch", "timm models")
    timm = require("timm", "timm models")
    kwargs = {"pretrained": False}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        try:
            model = timm.create_model(name, **kwargs, **({"img_size": img_size} if img_size else {}))
        except TypeError as exc:
            if img_size is None or "img_size" not in str(exc):
                raise
            model = timm.create_model(name, **kwargs)  # size-agnostic (ConvNets)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ExportError(f"unknown model SPEC 'timm:{name}': timm has no model {name!r}") from exc
        raise ExportError(f"cannot build timm:{name}: {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - model constructors raise anything
        raise ExportError(f"cannot build timm:{name}: {first_line(exc)}") from exc
    if img_size:
        size = (3, img_size, img_size)
    else:
        size = tuple(timm.data.resolve_model_data_config(model).get("input_size", (3, 224, 224)))
    return model, {"input": torch.randn(2, *size)}


def _hf(path: str, num_classes, img_size, task: bool, meta: bool = False, dtype=None):
    torch = require("torch", "Hugging Face models")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "Hugging Face models")
    transformers.utils.logging.disable_progress_bar()
    from . import hf

    if not Path(path, "config.json").is_file():
        raise ExportError(f"unknown model SPEC 'hf:{path}': no transformers model folder "
                          "(config.json) there")
    try:
        config = hf.load_config(path)
        kind = hf_task(config)
        with_head = task or num_classes is not None or kind.export_task
        new_head = with_head and kind.num_labels and num_classes is not None
        kwargs = {"num_labels": num_classes} if new_head else {}
        auto_class = kind.auto_class if with_head else "AutoModel"
        if meta:
            model = hf.meta_model(auto_class, path, **kwargs)
        else:
            model = hf.load_model(auto_class, path, **kwargs, **({"dtype": dtype} if dtype is not None else {}))
    except FpsError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot load hf:{path}: {first_line(exc)}") from exc
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(0)
    if kind.inputs == "pixels":
        side = img_size or int(getattr(config, "image_size", 224))
        return model, {"pixel_values": torch.randn(2, 3, side, side, generator=g)}
    seq = 16
    inputs = {"input_ids": torch.randint(0, min(config.vocab_size, 1000), (2, seq), generator=g)}
    if kind.inputs == "causal":
        return model, causal_lm_inputs(inputs["input_ids"], getattr(config, "pad_token_id", None))
    if "attention_mask" in params:
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 5:] = 0
        inputs["attention_mask"] = mask
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros(2, seq, dtype=torch.long)
    return model, _positional(model, inputs, f"hf:{path}")


def causal_lm_inputs(input_ids, pad_token_id: int | None = None, padded: int = 5) -> dict:
    """Example inputs of a causal LM: ``input_ids`` and ``attention_mask`` (int64), the
    first row left-padded by ``padded`` tokens (:func:`fps_onnx.data.text.pad_id`), as batched
    generation pads; the model takes them by keyword."""
    torch = require("torch", "Hugging Face models")
    input_ids = input_ids.clone().long()
    mask = torch.ones_like(input_ids)
    padded = min(padded, input_ids.shape[1] - 1)
    mask[0, :padded] = 0
    input_ids[0, :padded] = pad_id(pad_token_id)
    return {"input_ids": input_ids, "attention_mask": mask}


def _function(spec: str, num_classes, img_size):
    torch = require("torch", "model functions")
    where, _, func_name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise ExportError(f"unknown model SPEC {spec!r}: {file} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"_fps_spec_{file.stem}", file)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except FpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code
        raise ExportError(f"unknown model SPEC {spec!r}: cannot import {where}: {first_line(exc)}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ExportError(f"unknown model SPEC {spec!r}: {where} has no function {func_name!r}")
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    accepted = inspect.signature(func).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
    for key in kwargs:
        if key not in accepted and not takes_any:
            raise ExportError(f"{spec} does not take {key}")
    try:
        result = func(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code
        raise ExportError(f"{spec} failed: {first_line(exc)}") from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ExportError(f"{spec} must return (torch.nn.Module, example_inputs)")
    model, example = result
    if isinstance(example, torch.Tensor):
        inputs = {"input": example}
    elif isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        names = [n for n in inspect.signature(model.forward).parameters][: len(example)]
        names += [f"input_{i}" for i in range(len(names), len(example))]
        inputs = dict(zip(names, example))
    elif isinstance(example, Mapping) and all(isinstance(t, torch.Tensor) for t in example.values()):
        inputs = _positional(model, dict(example), spec)
    else:
        raise ExportError(f"{spec}: example inputs must be a tensor, a tuple of tensors or a dict of tensors")
    return model, inputs


def _positional(model, inputs: dict, spec: str) -> dict:
    """Order keyword inputs like forward's parameters; they must be its leading ones."""
    params = [p for p in inspect.signature(model.forward).parameters]
    order = [p for p in params if p in inputs]
    if set(order) != set(inputs) or order != params[: len(order)]:
        raise ExportError(f"{spec}: inputs {list(inputs)} must be the leading parameters of forward "
                          f"({', '.join(params[:5])}, ...)")
    return {k: inputs[k] for k in order}


# --------------------------------------------------------------------------- names


def resolve_keys(keys: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """Mask key -> the parameter name it stands for, under the naming rule.

    A key that is one of ``names`` stands for itself; any other key stands for
    the name that ends with ``"." + key`` when exactly one does (a backbone's
    parameter under a task wrapper: ``encoder.layer.0.attention.self.query.weight``
    is ``bert.encoder.layer.0.attention.self.query.weight``). Keys that fit no
    name (ONNX initializer names) are left out. Raises :class:`MaskError` when
    several names end with a key, or two keys stand for one name.
    """
    names = list(names)
    exact = set(names)
    by_suffix: dict[str, list[str]] = defaultdict(list)
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            by_suffix[".".join(parts[i:])].append(name)
    resolved: dict[str, str] = {}
    for key in keys:
        if key in exact:
            resolved[key] = key
            continue
        hits = by_suffix.get(key, [])
        if len(hits) > 1:
            raise MaskError(f"mask key {key!r} is ambiguous: {len(hits)} parameters end with it "
                            f"({', '.join(hits[:3])}); key the masks by full parameter names")
        if hits:
            resolved[key] = hits[0]
    owner: dict[str, str] = {}
    for key, name in resolved.items():
        if name in owner:
            raise MaskError(f"mask keys {owner[name]!r} and {key!r} both stand for the parameter {name!r}")
        owner[name] = key
    return resolved


def rekey_masks(masks: MaskFile, names: Iterable[str]) -> MaskFile:
    """``masks`` with every key :func:`resolve_keys` resolves renamed to its parameter name."""
    resolved = resolve_keys(masks.keys(), names)
    if all(resolved.get(k, k) == k for k in masks.keys()):
        return masks
    return masks.renamed(resolved)
