"""The training loop: which tensors train, optimizer and schedule, epochs, metrics.

:func:`prepare` freezes the model, attaches the sparse deltas and opts in what
the recipe trains fully (head, biases, norms); :func:`fit` trains with AdamW,
linear warm-up and cosine decay, evaluates each epoch and restores the best
one by validation accuracy. Works on a plain model or one wrapped in
DistributedDataParallel (its gradients are only the trainable tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
import logging
import math
import os
import resource
import sys
import time

from ...errors import DataError, MaskError, NumericError
from ...selection.maskfile import MaskFile, mask_file_of
from ...selection.stepscale import column_scales, factors_digest
from ...stats import Stats
from ..models import rekey_masks, resolve_keys
from . import checkpoint, sparse
from ._torch import nn, torch
from .masks import attach_masks
from .recipe import Recipe

__all__ = ["Trainable", "apply_gradients", "begin_epoch", "check_head", "evaluate", "fit", "forward",
    "head_names", "logits_of", "make_optimizer", "make_schedule", "param_groups", "peak_memory", "prepare",
    "attach_step_scales", "scale_optimizer_steps", "scale_steps", "to_device", "train_step"]

log = logging.getLogger(__name__)

_HEAD_ATTRS = ("classifier", "score", "head", "fc")


@dataclass
class Trainable:
    """What trains: the sparse deltas, and the tensors trained fully (plain names)."""

    deltas: dict[str, sparse.SparseDelta]
    dense: list[str]
    head: list[str] = field(default_factory=list)

    @property
    def selected(self) -> int:
        return sum(d.indices.numel() for d in self.deltas.values())


def head_names(model: nn.Module) -> list[str]:
    """Parameter names of the classification head: timm's ``get_classifier()``, a
    ``classifier``/``score``/``head``/``fc`` module, or else the last nn.Linear."""
    head = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    for attr in _HEAD_ATTRS:
        if head is None and isinstance(getattr(model, attr, None), nn.Module):
            head = getattr(model, attr)
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return []
    ids = {id(p) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def _freeze_norm_statistics(model: nn.Module) -> None:
    """Frozen norms keep their pretrained running statistics too: batch norms stay
    in eval mode while the rest trains (in train mode their statistics drift to
    the new data's batches, and training and test features part ways)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def prepare(model: nn.Module, masks: Mapping[str, object] | MaskFile | str,
            recipe: Recipe = Recipe(), *, onnx_model=None, sparse_linear: bool = True) -> Trainable:
    """Freeze ``model``, attach ``masks`` and unfreeze what ``recipe`` trains fully.

    ``masks``: name -> bool array, a MaskFile or its path; ``onnx_model``: the
    ONNX model the masks were selected on, to match its weights by value. Keys
    are parameter names; a backbone's name stands for the one parameter of a
    task wrapper that ends with it (``encoder.layer.0.output.dense.weight`` for
    ``bert.encoder.layer.0.output.dense.weight``; see
    :func:`fps_onnx.torch.models.resolve_keys`). ``sparse_linear``: nn.Linear/Conv1D
    modules compute only the selected entries' gradient (see :func:`sparse.attach`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    head = head_names(model) if recipe.train_head else []
    names = [n for n, _ in model.named_parameters()]
    maskfile = mask_file_of(masks)
    if isinstance(masks, Mapping):
        deltas = sparse.attach(model, maskfile.renamed(resolve_keys(maskfile.keys(), names)), skip=head,
                               sparse_linear=sparse_linear)
    else:
        deltas = attach_masks(model, rekey_masks(maskfile, names), skip=head, onnx_model=onnx_model,
                              sparse_linear=sparse_linear)
    dense = set(head)
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        for tensor_name, _ in module.named_parameters(recurse=False, prefix=module_name):
            if _is_delta(tensor_name):
                continue
            if (norm and recipe.train_norm) or (
                    not norm and recipe.train_bias and tensor_name.endswith("bias")):
                dense.add(tensor_name)
    params = dict(model.named_parameters())
    for name in dense:
        params[name].requires_grad_(True)
    if recipe.train_head and not head:
        log.warning("no classification head found; training the sparse deltas only")
    return Trainable(deltas, sorted(dense), head)


def check_head(model: nn.Module, num_classes: int) -> None:
    """DataError when the model's classification head has fewer outputs than there are classes."""
    names = head_names(model)
    weights = [n for n in names if n.endswith("weight")]
    if not weights:
        return
    outputs = dict(model.named_parameters())[weights[-1]].shape[0]
    if outputs < num_classes:
        raise DataError(f"the model's head has {outputs} outputs, the data has {num_classes} classes "
                        "(give --num-classes to build a new head)")


def _is_delta(name: str) -> bool:
    return sparse.plain_name(name) != name


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """AdamW groups: weight decay on the deltas and head weights, none on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if _is_delta(name) or p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`. A sharded run (``recipe.fsdp``, more than one process) wraps
    it in ``ZeroRedundancyOptimizer``: its trainable tensors are replicated (:mod:`.fsdp`), so each
    process keeps the AdamW state and the gradients of only its share of them (a gradient is
    dropped, once averaged, by every other process), steps that share, and broadcasts the new values
    to the others (ZeRO stage 2 for what trains). The same update as AdamW's but for the clipping
    norm, summed over the processes (its last bits); a checkpoint gathers the state to the first
    process (:meth:`.checkpoint.Checkpoints.save`). Either way, deltas given step factors
    (:func:`attach_step_scales`) have each step scaled by them (:func:`_scaled`; sharded, after the
    broadcast: every process holds the same values before and after it, so each scales alike)."""
    groups = param_groups(model, recipe)
    if getattr(recipe, "fsdp", False) and _world() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=recipe.lr)
        owned = {id(p) for p in _owned(optimizer)}
        for group in optimizer.param_groups:  # a gradient is kept only by the process that steps it
            for param in group["params"]:
                if id(param) not in owned:
                    param.register_post_accumulate_grad_hook(_drop_gradient)
        return _scaled(optimizer, model)
    return _scaled(torch.optim.AdamW(groups, lr=recipe.lr), model)


def _scaled(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """``optimizer``, each step of a delta with a ``step_scale`` (:func:`sparse.scale_steps`) multiplied
    by it entry by entry (:func:`scale_optimizer_steps`)."""
    return scale_optimizer_steps(optimizer, [(d.values, d.step_scale) for d in sparse.unique_deltas(model).values()
                                             if d.step_scale is not None])


def scale_optimizer_steps(optimizer: torch.optim.Optimizer,
                          pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.optim.Optimizer:
    """``optimizer``, each of its steps of tensor ``t`` multiplied by ``factor`` entry by entry, for each
    (t, factor) of ``pairs``: ``t <- t0 + factor * (t - t0)``, ``t0`` the values before the step
    (step pre/post hooks: the whole step, weight decay included, whatever wraps the optimizer)."""
    pairs = [(values, factor.to(values.device, values.dtype)) for values, factor in pairs]
    if not pairs:
        return optimizer
    if getattr(optimizer, "_fps_onnx_steps_scaled", False):
        raise MaskError("this optimizer's steps are scaled already; scale them once")
    optimizer._fps_onnx_steps_scaled = True
    before: list[torch.Tensor] = []

    def keep(*_):
        before[:] = [values.detach().clone() for values, _ in pairs]

    def scale(*_):
        with torch.no_grad():
            for (values, factor), old in zip(pairs, before):
                values.sub_(old).mul_(factor).add_(old)
        before.clear()

    optimizer.register_step_pre_hook(keep)
    optimizer.register_step_post_hook(scale)
    return optimizer


def attach_step_scales(model: nn.Module, masks: MaskFile, stats: Stats | str | os.PathLike) -> tuple[int, str]:
    """Give the deltas of ``model`` (attached from ``masks``) each entry's step factor
    (:func:`fps_onnx.selection.stepscale.column_scales` of ``stats``, the selection's statistics:
    a Stats or the path of ``select --stats-out``), which :func:`make_optimizer`'s optimizer applies.
    Returns (how many weights got factors, the factors' digest: what a checkpoint's identity names)."""
    scales = column_scales(masks, stats)
    names = resolve_keys(scales, sparse.deltas(model))
    count = sparse.scale_steps(model, {names.get(k, k): v for k, v in scales.items()})
    return count, factors_digest(scales)


def scale_steps(model: nn.Module, optimizer: torch.optim.Optimizer, masks: MaskFile | str | os.PathLike,
                stats: Stats | str | os.PathLike) -> torch.optim.Optimizer:
    """``fps-onnx train --step-scale`` for a loop of one's own: multiply each step ``optimizer`` makes
    of a selected entry by ``min(1, median(s) / s_j)``, ``s_j`` the statistic of its input channel
    (:mod:`fps_onnx.selection.stepscale`).

    Call it after :func:`prepare` ``(model, masks)``, on the optimizer built over the trainable
    tensors, before the first step. ``masks``: the MaskFile or path given to :func:`prepare` (its
    metadata names the model and statistic it was selected with); ``stats``: a Stats or the path
    of ``select ... --stats-out``, of the same model. StatsError where they do not fit the masks;
    MaskError where the masks were not attached. Returns ``optimizer``, its step hooks registered.
    """
    maskfile = mask_file_of(masks)
    count, _ = attach_step_scales(model, maskfile, stats)
    if not count:
        raise MaskError("scale_steps: the model has none of the masks' deltas; call prepare(model, masks) first")
    return _scaled(optimizer, model)


def _owned(optimizer) -> list:
    """The tensors this process steps: all of them, or a ``ZeroRedundancyOptimizer``'s share."""
    groups = optimizer.optim.param_groups if hasattr(optimizer, "consolidate_state_dict") else optimizer.param_groups
    return [p for group in groups for p in group["params"]]


def _drop_gradient(param: torch.Tensor) -> None:
    param.grad = None


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def make_schedule(optimizer, recipe: Recipe, steps_per_epoch: int, *, total: int | None = None):
    """Per step: linear warm-up from lr/steps to lr, then cosine down to ``min_lr``
    at ``total`` steps (default: all epochs)."""
    total = recipe.epochs * steps_per_epoch if total is None else total
    warmup = min(int(round(recipe.warmup_epochs * steps_per_epoch)), total)
    floor = recipe.min_lr / recipe.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def logits_of(output):
    """A model's class scores, whether it returns a tensor, a tuple or an HF output."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def forward(model: nn.Module, inputs):
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def to_device(inputs, device):
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def _autocast(device: torch.device, recipe: Recipe):
    """bf16 autocast on CUDA (``recipe.amp``); always in the base's dtype when it is half (:mod:`.precision`)."""
    from .precision import base_dtype

    dtype = base_dtype(recipe, device)
    half = dtype != torch.float32
    enabled = half or (recipe.amp and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=dtype if half else torch.bfloat16, enabled=enabled)


def train_step(model, inputs, labels, optimizer, schedule, recipe: Recipe, device, criterion) -> float:
    """One optimizer step on one batch; returns the loss."""
    with _autocast(device, recipe):
        loss = criterion(logits_of(forward(model, inputs)).float(), labels)
    if not torch.isfinite(loss):
        raise NumericError(f"the training loss became {loss.item()}; lower --lr or enable --clip-grad")
    loss.backward()
    apply_gradients(optimizer, schedule, recipe)
    return float(loss.detach())


def begin_epoch(model: nn.Module, train_loader, device: torch.device, epoch: int) -> None:
    """Reshuffle a distributed sampler for ``epoch``, reset the CUDA peak, set train mode."""
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()


def apply_gradients(optimizer, schedule, recipe: Recipe) -> None:
    """Clip (``recipe.clip_grad``), step the optimizer and the schedule, clear the gradients."""
    if recipe.clip_grad is not None:
        params = _owned(optimizer)
        if len(params) == sum(len(group["params"]) for group in optimizer.param_groups):
            torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad)
        else:  # each process holds the gradients of its share: the norm of all of them, summed over processes
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).to(torch.float64) if grads else torch.zeros((), dtype=torch.float64)
            squared = norm.square()
            torch.distributed.all_reduce(squared)
            torch.nn.utils.clip_grads_with_norm_(params, recipe.clip_grad, squared.sqrt().to(torch.float32))
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model, loader, device, recipe: Recipe = Recipe()) -> float:
    """Top-1 accuracy over ``loader`` (summed over all processes when distributed)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, labels in loader:
        inputs, labels = to_device(inputs, device), labels.to(device)
        with _autocast(device, recipe):
            pred = logits_of(forward(model, inputs)).argmax(-1)
        counts[0] += (pred == labels).sum()
        counts[1] += labels.numel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    model.train(was_training)
    return float(counts[0] / counts[1]) if counts[1] else float("nan")


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what): the CUDA allocator's peak on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak_rss"


def fit(
    model: nn.Module,
    train_loader,
    val_loader=None,
    *,
    recipe: Recipe = Recipe(),
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoints: checkpoint.Checkpoints | None = None,
) -> dict:
    """Train ``model`` (prepared, possibly DDP-wrapped) for ``recipe.epochs``.

    Returns ``{"epochs": [per-epoch records], "best_epoch": n}``; the model is
    left at the best epoch by validation accuracy (the last one without
    validation). ``on_step(epoch, loss, batch_size)`` and ``on_epoch(record)``
    report progress; ``checkpoints`` saves the run every few steps, or resumes
    it (see :mod:`.checkpoint`).
    """
    device = torch.device(device)
    steps = len(train_loader)
    if steps == 0:
        raise DataError("the training split holds no batches")
    optimizer = make_optimizer(model, recipe)
    schedule = make_schedule(optimizer, recipe, steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    checkpoints = checkpoints or checkpoint.Checkpoints.off()
    run = checkpoints.resume(model, optimizer, schedule, train_loader, checkpoint.Progress(best_score=-1.0),
                             epochs=recipe.epochs)
    for epoch in range(run.epoch, recipe.epochs + 1):
        begin_epoch(model, train_loader, device, epoch)
        if not recipe.train_norm:
            _freeze_norm_statistics(model)
        start = time.perf_counter()
        for inputs, labels in checkpoints.batches(train_loader, run):
            inputs, labels = to_device(inputs, device), labels.to(device)
            loss = train_step(model, inputs, labels, optimizer, schedule, recipe, device, criterion)
            run.add(1, loss=loss * len(labels), seen=len(labels))
            checkpoints.step_done(model, optimizer, schedule, run)
            if on_step is not None:
                on_step(epoch, loss, len(labels))
        seconds = run.seconds + time.perf_counter() - start
        seen = run.totals.get("seen", 0)
        memory, kind = peak_memory(device)
        record = {"epoch": epoch, "train_loss": run.totals.get("loss", 0.0) / max(seen, 1), "seconds": seconds,
                  "samples_per_second": seen / seconds if seconds else None,
                  "lr": optimizer.param_groups[0]["lr"], "peak_memory_bytes": memory,
                  "peak_memory_kind": kind}
        if val_loader is not None:
            record["val_accuracy"] = evaluate(model, val_loader, device, recipe)
        if val_loader is None:
            run.best = epoch
        elif record["val_accuracy"] > run.best_score:
            run.best, run.best_score, run.best_state = epoch, record["val_accuracy"], checkpoint.trainable_state(model)
        run.end_epoch(record)
        if on_epoch is not None:
            on_epoch(record)
    if run.best_state is not None and run.best != recipe.epochs:
        checkpoint.load_trainable_state(model, run.best_state)
    return {"epochs": run.records, "best_epoch": run.best}
