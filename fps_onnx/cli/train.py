"""``fps-onnx train``: sparse fine-tuning of the entries a mask file selects."""

from __future__ import annotations

import json
import logging

import click

from fps_onnx.torch.train.recipe import BASE_DTYPES, TASKS, CausalLMRecipe, Recipe

from .options import bar_disabled, given, quiet_option, spec_folder

__all__ = ["train"]

log = logging.getLogger("fps_onnx")
_R = Recipe()
_C = CausalLMRecipe()


def _on(value: bool) -> str:
    return "train" if value else "freeze"


def _both(name: str, show=str) -> str:
    """A default as help text, with the causal-LM one where it differs."""
    ours, theirs = getattr(_R, name), getattr(_C, name)
    return show(ours) if ours == theirs else f"{show(ours)}; causal-lm: {show(theirs)}"



@click.command()
@click.option("--task", type=click.Choice(TASKS), default="classification", show_default=True,
              help="classification (labelled images or tokens, a head trained fully), or causal-lm "
                   "(next-token loss on text; --model hf:DIR of a decoder-only LM).")
@click.option("--model", "spec", required=True, metavar="SPEC",
              help="timm:NAME (with --checkpoint), hf:PATH or module:function, as for export.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Pretrained weights for timm:NAME.")
@click.option("--masks", required=True, type=click.Path(dir_okay=False), help="Mask file from `fps-onnx select`.")
@click.option("--onnx", "onnx_model", type=click.Path(dir_okay=False),
              help="The ONNX model the masks were selected on, to match its weights by value.")
@click.option("--step-scale", type=click.Path(dir_okay=False), metavar="STATS",
              help="The selection's statistics (`select --stats-out`): each selected entry's steps are "
                   "multiplied by min(1, median(s) / s_j), s_j its input channel's statistic, so that entries "
                   "on loud channels move the output no faster than those on a median one (2-D weights; "
                   "docs/training.md). [default: off]")
@click.option("--train", "train_path", required=True, type=click.Path(),
              help="Training split: class-folder tree of images, or .npz (x/y, or token arrays + labels); "
                   "causal-lm: .txt (a sample per line), .jsonl (text, or prompt + completion) or .npz "
                   "(input_ids, attention_mask, labels).")
@click.option("--val", "val_path", type=click.Path(), help="Validation split; the best epoch by it is kept.")
@click.option("--test", "test_path", type=click.Path(), help="Test split, evaluated once at the end.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for model.safetensors (causal-lm: model/), delta.safetensors and "
                   "metrics.json, which appear together once training has finished (other files in it "
                   "are kept).")
@click.option("--epochs", type=int, help=f"Training epochs. [default: {_both('epochs')}]")
@click.option("--batch-size", type=int, help=f"Samples per batch (per process). [default: {_both('batch_size')}]")
@click.option("--lr", type=float, help=f"Peak learning rate (AdamW). [default: {_both('lr', '{:g}'.format)}]")
@click.option("--weight-decay", type=float, help=f"Weight decay on deltas and head weights. [default: {_R.weight_decay:g}]")
@click.option("--warmup-epochs", type=float, help=f"Linear warm-up epochs, then cosine decay. [default: {_both('warmup_epochs', '{:g}'.format)}]")
@click.option("--min-lr", type=float, help=f"Learning rate at the end of the cosine. [default: {_R.min_lr:g}]")
@click.option("--clip-grad", type=float, help=f"Clip the gradient norm to this. [default: {_R.clip_grad or 'off'}]")
@click.option("--label-smoothing", type=float, help=f"Cross-entropy label smoothing. [default: {_R.label_smoothing:g}]")
@click.option("--seed", type=int, help=f"Seed for the head's initialisation and shuffling. [default: {_R.seed}]")
@click.option("--train-head/--freeze-head", default=None,
              help=f"Train the classification head (causal-lm: lm_head, and a tied embedding) fully. "
                   f"[default: {_both('train_head', _on)}]")
@click.option("--train-bias/--freeze-bias", default=None, help=f"Train all biases. [default: {_both('train_bias', _on)}]")
@click.option("--train-norm/--freeze-norm", default=None, help=f"Train normalisation layers. [default: {_on(_R.train_norm)}]")
@click.option("--amp/--no-amp", default=None, help=f"bf16 autocast on CUDA. [default: {'on' if _R.amp else 'off'}]")
@click.option("--workers", type=int, help=f"Data-loading worker processes. [default: {_R.workers}]")
@click.option("--max-steps", type=int, help="causal-lm: stop after this many optimizer steps. [default: all epochs]")
@click.option("--accumulate", type=int, metavar="N",
              help=f"causal-lm: batches per optimizer step (gradient accumulation). [default: {_C.accumulate}]")
@click.option("--checkpointing", is_flag=True, default=None,
              help="causal-lm: activation checkpointing (less memory, a second forward in the backward pass).")
@click.option("--chunked-loss", is_flag=True, default=None,
              help="causal-lm: the next-token loss from the final hidden states a chunk of tokens at a time: "
                   "the [tokens x vocabulary] logits are never held whole (less memory; the head's matmul "
                   "runs again in the backward pass). With --fsdp: an untied, frozen head.")
@click.option("--max-length", type=int,
              help=f"causal-lm: tokens per sample, capped at the model's positions. [default: {_C.max_length}]")
@click.option("--fsdp", is_flag=True, default=None,
              help="Shard the model over the torchrun processes (FSDP2): each holds 1/N of the frozen "
                   "weights; the deltas are replicated. Needs torchrun --nproc_per_node N, N >= 2.")
@click.option("--base-dtype", type=click.Choice(BASE_DTYPES[1:]),
              help="dtype of the frozen weights; deltas, their optimizer state and the merged output stay "
                   "fp32 (the base's own dtype). [default: fp32 on CPU, bf16 on CUDA]")
@click.option("--num-classes", type=int, help="Classes of the new head. [default: from the training split]")
@click.option("--image-size", type=int, help="Input side; overrides the model's own.")
@click.option("--device", help="cpu, cuda or cuda:N. [default: cuda when available]")
@click.option("--save-every", type=int, metavar="N",
              help="Write a checkpoint every N optimizer steps (atomically; the last complete one is kept).")
@click.option("--save-dir", type=click.Path(file_okay=False),
              help="Folder for the checkpoints. [default: the --resume folder, else OUTPUT.checkpoints]")
@click.option("--resume", type=click.Path(file_okay=False),
              help="Go on from the last checkpoint in this folder (of the same model, masks, data, recipe and "
                   "number of processes), as if the run had never stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics on stdout.")
@quiet_option
def train(task, spec, checkpoint, masks, onnx_model, step_scale, train_path, val_path, test_path, output, epochs, batch_size,
          lr, weight_decay, warmup_epochs, min_lr, clip_grad, label_smoothing, seed, train_head, train_bias,
          train_norm, amp, workers, max_steps, accumulate, checkpointing, chunked_loss, max_length, fsdp, base_dtype,
          num_classes,
          image_size, device, save_every, save_dir, resume, as_json, quiet):
    """Fine-tune only the weights a mask file selects (plus head and biases).

    Memory grows with the selection: the optimizer sees k-sized tensors only.
    Runs under torchrun with DistributedDataParallel, or sharded with --fsdp. With --task causal-lm the
    selected entries of a causal LM alone train, on the next-token loss.
    """
    from fps_onnx.fileio import check_clashes

    check_clashes({"-o": output, "--save-dir": save_dir}, {"--resume": resume, "--model": spec_folder(spec), "--checkpoint": checkpoint, "--masks": masks,
                                   "--onnx": onnx_model, "--step-scale": step_scale, "--train": train_path, "--val": val_path,
                                   "--test": test_path})
    from fps_onnx.torch.train.checkpoint import Checkpointing
    from fps_onnx.torch.train.run import Splits, run_train, run_train_causal

    causal = task == "causal-lm"
    if causal and (checkpoint or num_classes is not None or image_size is not None):
        raise click.UsageError("--checkpoint, --num-classes and --image-size do not apply to --task causal-lm")
    recipe = (CausalLMRecipe if causal else Recipe)(**given(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, min_lr=min_lr, clip_grad=clip_grad,
        label_smoothing=label_smoothing, seed=seed, train_head=train_head, train_bias=train_bias,
        train_norm=train_norm, amp=amp, workers=workers, max_steps=max_steps, accumulate=accumulate,
        checkpointing=checkpointing, chunked_loss=chunked_loss, max_length=max_length, fsdp=fsdp,
        base_dtype=base_dtype,
    ))
    from tqdm import tqdm

    bars = {}

    def on_step(epoch, loss, n):
        bar = bars.get(epoch)
        if bar is None:
            bar = bars[epoch] = tqdm(desc=f"epoch {epoch}/{recipe.epochs}", unit="sample",
                                     disable=bar_disabled(quiet), dynamic_ncols=True, leave=False)
        bar.update(n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def on_epoch(record):
        bar = bars.pop(record["epoch"], None)
        if bar is not None:
            bar.close()
        if causal:
            val = (f", val loss {record['val_loss']:.4f} (perplexity {record['val_perplexity']:.2f})"
                   if "val_loss" in record else "")
            log.info("epoch %d: loss %.4f%s, %.1f s, %.0f tokens/s", record["epoch"], record["train_loss"],
                     val, record["seconds"], record["tokens_per_second"] or 0.0)
            return
        val = f", val acc {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
        log.info("epoch %d: loss %.4f%s, %.1f s, %.1f samples/s", record["epoch"], record["train_loss"],
                 val, record["seconds"], record["samples_per_second"] or 0.0)

    splits = Splits(train_path, val_path, test_path)
    checkpointing = (Checkpointing(save_every, save_dir, resume)
                     if save_every is not None or resume is not None else None)
    if save_dir is not None and checkpointing is None:
        raise click.UsageError("--save-dir needs --save-every")
    try:
        if causal:
            metrics = run_train_causal(spec, masks, splits, output, recipe, onnx_model=onnx_model, step_scale=step_scale,
                                       device=device,
                                       on_step=on_step, on_epoch=on_epoch, checkpointing=checkpointing)
        else:
            metrics = run_train(
                spec, masks, splits, output, recipe,
                checkpoint=checkpoint, onnx_model=onnx_model, step_scale=step_scale, num_classes=num_classes, image_size=image_size,
                device=device, on_step=on_step, on_epoch=on_epoch, checkpointing=checkpointing,
            )
    finally:
        for bar in bars.values():
            bar.close()
    if "test_accuracy" in metrics:
        log.info("best epoch %d, test accuracy %.4f", metrics["best_epoch"], metrics["test_accuracy"])
    if "test_perplexity" in metrics:
        log.info("best epoch %d, test loss %.4f, perplexity %.2f", metrics["best_epoch"], metrics["test_loss"],
                 metrics["test_perplexity"])
    if as_json:
        click.echo(json.dumps(metrics, indent=2, default=str))
