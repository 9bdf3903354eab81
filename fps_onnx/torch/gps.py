"""GPS baseline: gradient-based parameter selection (needs PyTorch).

The reference the FPS paper compares against (Zhang et al., CVPR 2024), in two forms:

* :func:`gps_select`, classification: one pass over the labelled training set
  in ``model.train()``, cross-entropy loss with a new classification head,
  gradients summed over every batch (no zero_grad), then the top K of
  ``|grad|`` per output neuron of every Linear/Conv weight. GPS's rules for
  which tensors are selectable: the classification head is trained fully and
  gets no mask; weights of norms, position embeddings and class tokens are
  never selected; ``ScopeConfig`` applies as to FPS (``exclude`` on the
  parameter names; a Linear tied to an embedding only with ``include_lm_head``).
* :func:`gps_select_causal`, a decoder-only causal LM (``hf:DIR``) on token
  data as ``train --task causal-lm`` reads it (:mod:`.train.lm_data`; no labels
  beyond the text): for each batch, the gradient of its next-token loss (the
  mean over the batch's predicted tokens, as ``train`` computes it) in
  ``model.eval()`` (no dropout: the selection is deterministic); the scores are
  ``|grad|`` summed over the batches, accumulated in float32 per weight as each
  weight's gradient arrives, which is then dropped (no second gradient copy).
  The selectable weights are those FPS selects on the model's export
  (:func:`causal_lm_weights`): every Linear, Conv and GPT-2 Conv1D weight but
  the vocabulary projection and the embeddings, unless
  ``ScopeConfig.include_lm_head``; ``ScopeConfig.exclude`` applies to the names.

Masks use the same budget rules (``--shira-r`` included) and file format as
FPS, keyed by PyTorch parameter names (a tied weight by its first name, as
``named_parameters`` gives it), each in its parameter's shape (a Conv1D weight
stored [in, out] is selected as [out, in] and its mask transposed back:
``torch_transposed``). Peak memory is that of computing gradients: this is the
cost FPS avoids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import logging
import math
import os
import time

from ..errors import ModelError, NumericError, quoted
from ..onnx.scope import ScopeConfig, report_left_out
from ..selection import maskfile
from ..selection.score import SelectConfig, check_shira, describe_budget, select_scores

__all__ = ["FROZEN_NAMES", "GpsResult", "causal_lm_weights", "gps_select", "gps_select_causal"]

log = logging.getLogger(__name__)

FROZEN_NAMES = ("norm", "pos_embed", "cls_token")


@dataclass
class GpsResult:
    """GPS masks and what computing them cost."""

    masks: maskfile.MaskFile
    samples: int
    seconds: float


def gps_select(
    spec: str,
    train: str | os.PathLike,
    config: SelectConfig = SelectConfig(method="gps"),
    *,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    device: str | None = None,
    on_batch: Callable[[int], None] | None = None,
    scope: ScopeConfig = ScopeConfig(),
) -> GpsResult:
    """GPS masks for the model ``spec`` from the labelled split ``train`` (a causal LM
    ``hf:DIR`` is a ModelError: its loss is :func:`gps_select_causal`'s). ``scope``
    leaves weights out as FPS's scope does (:func:`_left_out`)."""
    from .hf import load_config
    from .models import build_for_data, is_causal_lm
    from .train._torch import nn, torch
    from .train.data import open_split
    from .train.loop import forward, head_names, logits_of, to_device
    from .train.run import image_spec

    if spec.startswith("hf:") and is_causal_lm(load_config(spec[3:])):
        raise ModelError(f"{spec} is a causal language model: give --task causal-lm (the next-token loss on "
                         "text, no labels)")
    data = open_split(train)
    classes = data.num_classes()
    data.check_labels(classes)
    model, example = build_for_data(spec, checkpoint, classes, False, image_size)
    data.set_image(image_spec(model, example, image_size))
    if isinstance(example, dict):
        data.set_inputs(list(example))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).train()
    head = set(head_names(model))
    vocab, selectable, left_out = _vocabulary(model), {}, []
    for module_name, module in model.named_modules():
        name = f"{module_name}.weight" if module_name else "weight"
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name in head or any(f in name for f in FROZEN_NAMES):
            continue
        why = _left_out(name, module.weight, scope, vocab)
        if why is None:
            selectable[name] = module
        else:
            left_out.append(f"{name} ({why})")
    report_left_out(selectable, left_out, "the model has no Linear or Conv weight")
    loader = torch.utils.data.DataLoader(data, batch_size, shuffle=False)
    criterion = nn.CrossEntropyLoss()

    samples, start = 0, time.perf_counter()
    for inputs, labels in loader:
        if max_samples is not None and samples >= max_samples:
            break
        loss = criterion(logits_of(forward(model, to_device(inputs, device))), labels.to(device))
        loss.backward()  # gradients add up over the whole set
        samples += len(labels)
        if on_batch is not None:
            on_batch(len(labels))
    seconds = time.perf_counter() - start

    masks, tensors = {}, {}
    for name, module in selectable.items():
        if module.weight.grad is None:
            continue
        score = module.weight.grad.detach().abs().double().cpu().numpy()
        masks[name] = maskfile.WeightMask.compact(select_scores(score, config, f"weight {name}"))
        tensors[name] = _entry(name, type(module).__name__, masks[name])
    meta = {"method": "gps", "loss": "cross_entropy", "labels": "true", "level": config.level,
            "norm": "grad", "budget": describe_budget(config), "num_samples": str(samples),
            **{k: str(v) for k, v in config.options.items()},
            "model": spec, "model_sha256": ""}
    return GpsResult(maskfile.MaskFile(masks, tensors, meta), samples, seconds)


def _entry(name: str, op: str, mask, transposed: bool = False) -> dict:
    """The ``tensors`` metadata of a GPS mask (keyed by parameter name, no ONNX initializer)."""
    layout = "conv" if len(mask.shape) > 2 else ("in_out" if transposed else "out_in")
    entry = {"torch_name": name, "op": op, "shape": list(mask.shape), "selected": mask.count,
             "onnx_initializer": None, "onnx_layout": layout}
    if transposed:
        entry["torch_transposed"] = True
    return entry


@dataclass(frozen=True)
class Weight:
    """A selectable weight of a causal LM: its parameter, the module type that uses it, and
    whether it is stored [in, out] (GPT-2's Conv1D)."""

    param: object
    op: str
    transposed: bool

    def score_shape(self) -> tuple[int, ...]:
        """The shape it is scored in: PyTorch layout, rows = output neurons."""
        shape = tuple(self.param.shape)
        return shape[::-1] if self.transposed else shape


def causal_lm_weights(model, scope: ScopeConfig = ScopeConfig()) -> dict[str, Weight]:
    """Parameter name -> :class:`Weight` of the weights of a causal LM that FPS selects
    on its export, in ``named_parameters`` order: the weights of Linear, Conv and
    Conv1D modules, less the output embedding (lm_head) and any embedding's weight
    unless ``scope.include_lm_head``, less the names ``scope.exclude`` matches.
    Logs what was left out; ModelError when nothing is left."""
    from transformers.pytorch_utils import Conv1D

    from .train._torch import nn

    kinds = (nn.Linear, nn.modules.conv._ConvNd, Conv1D)
    used = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and isinstance(weight, nn.Parameter):
            used.setdefault(id(weight), (type(module).__name__, isinstance(module, Conv1D)))
    vocab = _vocabulary(model)
    found, left_out = {}, []
    for name, param in model.named_parameters():
        if id(param) not in used:
            continue
        why = _left_out(name, param, scope, vocab)
        if why is not None:
            left_out.append(f"{name} ({why})")
        else:
            found[name] = Weight(param, *used[id(param)])
    report_left_out(found, left_out, "the model has no Linear weight")
    return found


def _vocabulary(model) -> set[int]:
    """ids of the vocabulary weights: the output embedding's (``get_output_embeddings``, where
    the model has one) and every nn.Embedding's, so also a Linear tied to one."""
    from .train._torch import nn

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(output, "weight", None)
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} | (
        {id(head)} if head is not None else set())


def _left_out(name: str, param, scope: ScopeConfig, vocab: set[int]) -> str | None:
    """Why ``scope`` leaves the weight ``name`` out (as :func:`fps_onnx.onnx.scope.in_scope`
    does on an export: ``--exclude`` on its name, the lm_head and embeddings unless
    ``include_lm_head``), or None."""
    pattern = scope.excluded(name)
    if pattern is not None:
        return f"--exclude {pattern}"
    if id(param) in vocab and not scope.include_lm_head:
        return "lm_head or embedding"
    return None


def gps_select_causal(
    spec: str,
    data: str | os.PathLike,
    config: SelectConfig = SelectConfig(method="gps"),
    *,
    scope: ScopeConfig = ScopeConfig(),
    batch_size: int = 32,
    max_samples: int | None = None,
    max_length: int | None = None,
    device: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> GpsResult:
    """GPS masks of the causal LM ``hf:DIR`` from the token data ``data`` (see the module docstring).

    ``max_length``: tokens per sample (default :data:`fps_onnx.data.text.DEFAULT_MAX_LENGTH`),
    capped at the model's positions. Budgets are checked before any gradient is computed.
    """
    from ..data.text import DEFAULT_MAX_LENGTH
    from .train import hf_folder, lm_data
    from .train._torch import torch

    folder = hf_folder.causal_lm_folder(spec)
    model = hf_folder.build_causal_lm(spec)
    weights = causal_lm_weights(model, scope)
    for name, weight in weights.items():
        shape = weight.score_shape()
        config.keep(shape[0], math.prod(shape[1:]))
        check_shira(config, shape, f"weight {quoted(name)}")
    tokenizer = lm_data.load_tokenizer(folder)
    length = lm_data.model_max_length(model, max_length or DEFAULT_MAX_LENGTH)
    dataset = lm_data.open_lm_split(data, tokenizer, length, model.get_input_embeddings().weight.shape[0])
    if max_samples is not None:
        dataset.samples = dataset.samples[:max_samples]
    loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=False,
                                         collate_fn=lm_data.Collate(lm_data.pad_id(tokenizer)))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()

    start = time.perf_counter()
    sums = _summed_abs_gradients(model, weights, loader, device, on_batch)
    seconds = time.perf_counter() - start
    masks, tensors = {}, {}
    for name, weight in weights.items():
        total = sums.pop(name)  # freed as it is used
        if total is None:
            log.warning("weight %s gets no gradient from the loss: left out", name)
            continue
        if not bool(torch.isfinite(total).all()):
            raise NumericError(f"the summed gradients of weight {quoted(name)} are not finite")
        score = total.cpu().numpy()
        mask = select_scores(score.T if weight.transposed else score, config, f"weight {quoted(name)}")
        masks[name] = maskfile.WeightMask.compact(mask.T if weight.transposed else mask)
        tensors[name] = _entry(name, weight.op, masks[name], weight.transposed)
    samples = len(dataset)
    meta = {"method": "gps", "loss": "next_token", "labels": "none", "level": config.level,
            "norm": "grad", "budget": describe_budget(config), "num_samples": str(samples),
            "batch_size": str(batch_size), "max_length": str(length),
            **{k: str(v) for k, v in config.options.items()},
            "model": spec, "model_sha256": "", hf_folder.BASE_HASH_KEY: hf_folder.base_sha256(folder)}
    return GpsResult(maskfile.MaskFile(masks, tensors, meta), samples, seconds)


def _summed_abs_gradients(model, weights: dict[str, Weight], loader, device, on_batch) -> dict:
    """Name -> float32 sum over the batches of |gradient of the batch's mean next-token loss|
    (None for a weight that never got one). Only the selectable weights require grad; each
    one's gradient is added into its sum by a hook as soon as it is complete, then dropped."""
    from .train import causal
    from .train._torch import torch
    from .train.loop import logits_of, to_device

    for param in model.parameters():
        param.requires_grad_(False)
    sums: dict[str, object] = {}
    hooks = []

    def adder(name: str):
        def add(param) -> None:
            if sums[name] is None:
                sums[name] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            sums[name].add_(param.grad.abs_())
            param.grad = None

        return add

    for name, weight in weights.items():
        sums[name] = None
        weight.param.requires_grad_(True)
        hooks.append(weight.param.register_post_accumulate_grad_hook(adder(name)))
    try:
        for batch in loader:
            tokens = causal.count_tokens(batch["labels"])
            if tokens:
                batch = to_device(batch, device)
                logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False))
                loss = causal.token_loss_sum(logits, batch["labels"]) / tokens
                if not torch.isfinite(loss):
                    raise NumericError(f"the next-token loss of a batch is {loss.item()}: "
                                       "the model or the data holds NaN or Inf")
                del logits
                loss.backward()
            if on_batch is not None:
                on_batch(len(batch["labels"]))
    finally:
        for hook in hooks:
            hook.remove()
    return sums
