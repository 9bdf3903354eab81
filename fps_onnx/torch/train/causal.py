"""The causal language modelling loop: next-token loss, accumulation, perplexity.

The loss is the causal LM's own next-token cross-entropy (position t predicts
token t + 1; labels -100 count for nothing), summed over the tokens of every
batch of one optimizer step and divided by their number, across processes too
under DistributedDataParallel: ``--accumulate N`` batches of B samples give the
gradient of one batch of N x B, whatever their padding. :func:`fit` trains
with the optimizer and schedule of :mod:`.loop` and keeps the epoch of lowest
validation loss; :func:`evaluate` gives the token-mean loss and perplexity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import logging
import math
import time

from ...errors import DataError, ExportError, NumericError
from . import checkpoint, loop
from ._torch import nn, torch
from .lm_data import IGNORE
from .recipe import Recipe

__all__ = ["batch_loss_sum", "count_tokens", "enable_checkpointing", "evaluate", "fit", "token_loss_sum",
           "train_step"]

log = logging.getLogger(__name__)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) of ``logits`` [B, L, V] on ``labels`` [B, L]:
    what transformers' ``labels=`` loss averages (it is that sum over :func:`count_tokens`)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum")


def count_tokens(labels: torch.Tensor) -> int:
    """Tokens a batch's loss is computed on."""
    return int((labels[:, 1:] != IGNORE).sum())


def _logits(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return loop.logits_of(out)


#: Bytes of float32 logits one piece of a chunked loss holds at a time (:func:`batch_loss_sum`).
LOSS_CHUNK_BYTES = 1 << 25


def batch_loss_sum(model, batch: dict, recipe: Recipe) -> torch.Tensor:
    """:func:`token_loss_sum` of ``model`` on ``batch``; with ``recipe.chunked_loss``, computed from the
    final hidden states a chunk of tokens at a time.

    Chunked, the model runs with its output head set aside (the head's input returned as it is),
    and the head then computes the logits of :data:`LOSS_CHUNK_BYTES` worth of
    predicted tokens at a time, each chunk under activation checkpointing, so that neither
    pass holds the whole [tokens x vocabulary] logits: its backward pass computes the chunk's
    logits again. The sum is that of the whole logits but for the order of the additions. A
    model that does anything to its head's output before returning it (scaling, soft-capping)
    is refused: the chunks would skip that.

    Under ``--fsdp`` the head must be one that stays sharded by rows
    (:class:`~.fsdp.RowShardedHead`: untied and frozen), whose every use is a collective: every
    process then computes as many chunks as the one with the most tokens (some of them empty).
    Any other head under FSDP (tied to the embedding, or trained) is refused.
    """
    if not recipe.chunked_loss:
        return token_loss_sum(_logits(model, batch), batch["labels"])
    from . import fsdp

    root = checkpoint.unwrap(model)
    head = getattr(root, "get_output_embeddings", lambda: None)()
    collective = isinstance(head, fsdp.RowShardedHead)
    if not collective and fsdp.is_unit(root):
        raise ExportError("--chunked-loss with --fsdp needs an untied, frozen output head (kept sharded by rows); "
                          "this model's is tied to its input embedding or trains")
    if not collective and not isinstance(head, nn.Linear):
        raise ExportError(f"--chunked-loss needs an output head that is a Linear layer, not {type(head).__name__}")
    vocab = head.weight.shape[0] if collective else head.out_features
    kept = {}

    def stand_in(hidden: torch.Tensor) -> torch.Tensor:
        # the head's input itself comes out of the model as its "logits": the loss then hangs on the
        # model's own output, where wrappers hook their backward passes (FSDP gathers its root's
        # weights there again, DDP finds what to reduce)
        kept["hidden"] = hidden
        return hidden

    head.forward = stand_in  # for this call only: the instance's attribute shadows the class's forward
    try:
        logits = _logits(model, batch)
    finally:
        del head.forward
    if logits is not kept.get("hidden"):
        raise ExportError(f"--chunked-loss: {type(root).__name__} changes its head's output "
                          "before returning the logits; train without --chunked-loss")
    hidden, labels = logits[:, :-1], batch["labels"][:, 1:].to(logits.device)
    predicted = labels != IGNORE
    hidden, labels = hidden[predicted], labels[predicted]  # [tokens, hidden], [tokens]
    size = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    chunks = -(-len(labels) // size)
    if collective:  # the head's calls are broadcasts: every process makes as many
        chunks = int(_all_reduce(torch.tensor([chunks], device=hidden.device), "MAX"))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, chunks * size, size):
        part = (hidden[start:start + size], labels[start:start + size])
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, *part, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, *part)
    return total


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing on a transformers model, non-reentrant.

    Non-reentrant checkpointing gives the sparse deltas their gradient even
    though no input of a checkpointed layer requires grad (the embeddings are
    frozen). The recomputation in the backward pass reads the same weights as
    the forward did: a delta is written into its weight on every use, and its
    values change only at the optimizer step, after the backward pass.
    """
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except (ValueError, AttributeError) as exc:
        raise ExportError(f"{type(model).__name__} does not support activation checkpointing: {exc}") from exc


def _groups(loader, size: int) -> Iterator[list[dict]]:
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _all_reduce(values: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """``values`` reduced over the processes by ``op`` (a ``ReduceOp`` name), in place; as they are without
    a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, getattr(torch.distributed.ReduceOp, op))
    return values


def train_step(model, group: list[dict], optimizer, schedule, recipe: Recipe, device) -> tuple[float, int]:
    """One optimizer step on the batches of ``group``; returns (summed token loss, tokens)
    of this process."""
    world = torch.distributed.get_world_size() if (
        torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
    local = sum(count_tokens(b["labels"]) for b in group)
    total = local
    if world > 1:  # DDP averages gradients over processes: scale by world / global tokens
        total = int(_all_reduce(torch.tensor([local], dtype=torch.int64, device=device)).item())
    loss_sum = 0.0
    for i, batch in enumerate(group):
        batch = loop.to_device(batch, device)
        # DDP all-reduces the gradients once per step, in the last batch's backward pass
        last = i == len(group) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            with loop._autocast(device, recipe):
                summed = batch_loss_sum(model, batch, recipe)
            if not torch.isfinite(summed):
                raise NumericError(f"the training loss became {summed.item()}; lower --lr or enable --clip-grad")
            (summed * (world / max(total, 1))).backward()
        loss_sum += float(summed.detach())
    loop.apply_gradients(optimizer, schedule, recipe)
    return loss_sum, local


@torch.no_grad()
def evaluate(model, loader, device, recipe: Recipe = Recipe()) -> dict:
    """``{"loss", "perplexity", "tokens"}``: token-mean next-token loss over ``loader``
    (over all processes when distributed)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        batch = loop.to_device(batch, device)
        with loop._autocast(device, recipe):
            sums[0] += batch_loss_sum(model, batch, recipe).double()
        sums[1] += count_tokens(batch["labels"])
    _all_reduce(sums)
    model.train(was_training)
    loss = float(sums[0] / sums[1]) if sums[1] else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(sums[1])}


def fit(
    model: nn.Module,
    train_loader,
    val_loader=None,
    *,
    recipe: Recipe,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoints: checkpoint.Checkpoints | None = None,
) -> dict:
    """Train a prepared (possibly DDP-wrapped) causal LM; returns the history.

    ``{"epochs": [...], "best_epoch": n, "steps": optimizer steps}``; each
    epoch's record holds train loss (token mean), validation loss and
    perplexity, tokens/s and peak memory. Training stops after
    ``recipe.max_steps`` optimizer steps when set. The model is left at the
    epoch of lowest validation loss (the last one without validation).
    ``on_step(epoch, loss, samples)`` and ``on_epoch(record)`` report progress;
    ``checkpoints`` saves the run every few steps, or resumes it (see :mod:`.checkpoint`).
    """
    device = torch.device(device)
    batches = len(train_loader)
    if batches == 0:
        raise DataError("the training split holds no batches")
    per_epoch = math.ceil(batches / recipe.accumulate)
    total = recipe.epochs * per_epoch
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    epochs = math.ceil(total / per_epoch)
    optimizer = loop.make_optimizer(model, recipe)
    schedule = loop.make_schedule(optimizer, recipe, per_epoch, total=total)
    checkpoints = checkpoints or checkpoint.Checkpoints.off()
    run = checkpoints.resume(model, optimizer, schedule, train_loader, checkpoint.Progress(), epochs=epochs)
    for epoch in range(run.epoch, epochs + 1):
        loop.begin_epoch(model, train_loader, device, epoch)
        start = time.perf_counter()
        for group in _groups(checkpoints.batches(train_loader, run), recipe.accumulate):
            if run.step >= total:
                break
            summed, n = train_step(model, group, optimizer, schedule, recipe, device)
            size = sum(len(b["labels"]) for b in group)
            run.add(len(group), loss=summed, tokens=n, samples=size)
            checkpoints.step_done(model, optimizer, schedule, run)
            if on_step is not None:
                on_step(epoch, summed / max(n, 1), size)
            if run.step >= total:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = run.seconds + time.perf_counter() - start
        tokens, samples = run.totals.get("tokens", 0), run.totals.get("samples", 0)
        memory, kind = loop.peak_memory(device)
        record = {"epoch": epoch, "train_loss": run.totals.get("loss", 0.0) / max(tokens, 1), "steps": run.step,
                  "tokens": tokens, "seconds": seconds,
                  "tokens_per_second": tokens / seconds if seconds else None,
                  "samples_per_second": samples / seconds if seconds else None,
                  "lr": optimizer.param_groups[0]["lr"], "peak_memory_bytes": memory,
                  "peak_memory_kind": kind}
        if val_loader is not None:
            val = evaluate(model, val_loader, device, recipe)
            record["val_loss"], record["val_perplexity"] = val["loss"], val["perplexity"]
        if val_loader is None:
            run.best = epoch
        elif record["val_loss"] < (math.inf if run.best_score is None else run.best_score):
            run.best, run.best_score, run.best_state = epoch, record["val_loss"], checkpoint.trainable_state(model)
        run.end_epoch(record)
        if on_epoch is not None:
            on_epoch(record)
    if run.best_state is not None and run.best != epochs:
        checkpoint.load_trainable_state(model, run.best_state)
    return {"epochs": run.records, "best_epoch": run.best, "steps": run.step}
