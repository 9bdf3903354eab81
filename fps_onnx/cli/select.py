"""``fps-onnx select``: FPS masks for an ONNX model and a folder of calibration data."""

from __future__ import annotations

import json
import logging
import time

import click

from fps_onnx import providers
from fps_onnx.calibrate import DEFAULT_TOKEN_MASK, CalibrationConfig
from fps_onnx.checkpoint import CalibrationCheckpoint
from fps_onnx.data import DEFAULT_IMAGE_SIZE, DataConfig
from fps_onnx.data.text import DEFAULT_MAX_LENGTH
from fps_onnx.onnx.scope import ScopeConfig
from fps_onnx.pipeline import select as select_masks
from fps_onnx.selection.score import (
    ACT_POWER_MAX,
    GRADIENT_METHOD,
    LEVELS,
    METHODS,
    NORMS,
    SelectConfig,
    method_names,
)
from fps_onnx.torch.train.recipe import TASKS

from .options import bar_disabled, floats, given, mask_format_option, quiet_option, spec_folder

__all__ = ["select"]

log = logging.getLogger("fps_onnx")



@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(), required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Mask file to write (safetensors).")
@click.option("--method", type=click.Choice(method_names()), help=f"fps, or a baseline: activation (Eq. 5/6), magnitude, random, gps (gradients; needs PyTorch). [default: {SelectConfig().method}]")
@click.option("--task", type=click.Choice(TASKS), help="The loss of --method gps: classification (DATA a labelled split, a new head) or causal-lm (MODEL hf:DIR of a decoder-only LM, DATA text or tokens as `train --task causal-lm` reads them; next-token loss). [default: classification]")
@click.option("--seed", type=int, help=f"Seed of --method random. [default: {SelectConfig().seed}]")
@click.option("--norm", type=click.Choice(NORMS), help=f"l1: |w|*mean|a| (Eq. 3); l2: |w|*RMS(a) (Eq. 4). [default: {SelectConfig().norm}]")
@click.option("--level", type=click.Choice(LEVELS), help=f"Top-K per output neuron, or top-N per tensor. [default: {SelectConfig().level}]")
@click.option("--per-neuron", "per_neuron", type=int, help="Keep K entries per output neuron (layer level: K * out per tensor).")
@click.option("--fraction", type=float, help=f"Keep this fraction of each fan-in (layer level: of each tensor). [default: {SelectConfig().budget['fraction']}]")
@click.option("--shira-r", "shira_r", type=int, help="SHiRA budget: keep the top R*(in+out) entries of each Linear weight [out, in] (per tensor), the size PEFT's ShiraConfig(r=R) needs.")
@click.option("--act-power", "act_power", type=float, help=f"FPS scores |w| * s**A (s: the activation statistic): 1 is FPS, 0 ranks like magnitude, 0.5 tempers outlier channels; 0 to {ACT_POWER_MAX:g}. [default: {SelectConfig().act_power:g}]")
@click.option("--column-cap", "column_cap", type=float, help="No input column holds more than ceil(C * N / fan_in) of a tensor's N selected entries (neuron level: of its rows' entries), C >= 1; e.g. 2 = twice the even share. [default: no cap]")
@click.option("--low-rank", "low_rank", type=int, metavar="R", help="Score the entries of the best rank-R approximation of w * s (fps; magnitude: of w, LIFT's principal weights) instead of w's own: the entries along the weight's R leading directions. [default: none]")
@click.option("--provider", type=click.Choice(providers.CHOICES), help=f"ONNX Runtime provider; auto uses CUDA only where it really works. [default: {CalibrationConfig().provider}]")
@click.option("--batch-size", type=int, help=f"Samples per batch. [default: {DataConfig().batch_size}]")
@click.option("--max-samples", type=int, help="Stop after this many samples.")
@click.option("--shard", metavar="K/N", help="Calibrate on batches K, K+N, K+2N, ... only (K counts from 0), e.g. one job of a CI matrix; write --stats-out and merge the N files with --from-stats.")
@click.option("--image-size", type=int, help=f"Image side when the model's input size is not static. [default: {DEFAULT_IMAGE_SIZE}]")
@click.option("--mean", help="Per-channel mean for images, e.g. 0.5,0.5,0.5. [default: ImageNet]")
@click.option("--std", help="Per-channel std for images. [default: ImageNet]")
@click.option("--max-length", type=int, help=f"Text: tokens per sample, longer ones are truncated. [default: {DEFAULT_MAX_LENGTH}, or the model's positions if fewer]")
@click.option("--text-field", help=f"Text: the .jsonl field holding the text. [default: {DataConfig().text_field}]")
@click.option("--tokenizer", type=click.Path(), help="Text: a tokenizer.json, or a folder holding one. [default: the tokenizer.json beside MODEL]")
@click.option("--include-lm-head", is_flag=True, default=None, help="Also select the vocabulary projection (lm_head) and tied embeddings of a language model.")
@click.option("--exclude", multiple=True, help="Never select a weight whose key (or PyTorch name) matches this regular expression (re.search); repeatable.")
@click.option("--token-mask", help=f"Input whose zeros mark padded tokens. [default: {DEFAULT_TOKEN_MASK}, if present]")
@click.option("--stats-out", type=click.Path(dir_okay=False), help="Also write the accumulated statistics (both norms).")
@click.option("--from-stats", type=click.Path(dir_okay=False), multiple=True, help="Select from a statistics file instead of running the model; repeat it to merge the shards of one calibration (with --stats-out: also write the merged file).")
@click.option("--checkpoint-every", "checkpoint_every", type=int, metavar="N", help="Write the running statistics every N batches to OUTPUT.checkpoint (atomically; removed once the masks are written), for --resume.")
@click.option("--resume", is_flag=True, help="Go on from OUTPUT.checkpoint, when there is one, as if the calibration had never stopped (same model, data and options).")
@click.option("--torch-model", help="Key the masks by the parameter names of this PyTorch model SPEC (timm:NAME, hf:PATH, module:function): by name where the export kept the parameter names (hf: from the weights' headers, without loading them), else matched by value; the model `fps-onnx train --model SPEC` builds (hf: its task model).")
@click.option("--torch-checkpoint", type=click.Path(dir_okay=False), help="Weights for --torch-model.")
@mask_format_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@quiet_option
def select(model, data, output, method, task, seed, norm, level, per_neuron, fraction, shira_r, act_power, column_cap, low_rank,
           provider, batch_size, max_samples, shard, image_size, mean, std, max_length, text_field, tokenizer, include_lm_head,
           exclude, token_mask, stats_out, from_stats, checkpoint_every, resume, torch_model, torch_checkpoint,
           mask_format, as_json, quiet):
    """Select the weights of MODEL (ONNX) to fine-tune, from calibration DATA.

    DATA is a folder or one file: .npy (one input), .npz (arrays keyed by input
    name), images (found recursively) or text (.txt, one sample a line; .jsonl),
    tokenized with the model's tokenizer.json. No labels, no gradients.

    With --method gps, MODEL is a PyTorch SPEC (timm:NAME, hf:PATH,
    module:function; weights from --torch-checkpoint) and DATA a labelled
    training split (class folders, or .npz with labels): the gradient baseline
    (--exclude and --include-lm-head apply to its parameter names as to FPS).
    With --method gps --task causal-lm, MODEL is hf:DIR of a decoder-only LM and
    DATA .txt, .jsonl or .npz token data: |grad| of the next-token loss summed
    over the batches, the weights FPS would select (--include-lm-head, --exclude).
    """
    if task is not None and method != "gps":
        raise click.UsageError("--task applies to --method gps only")
    if task == "causal-lm":
        unused = [flag for flag, value in (
            ("--torch-model", torch_model), ("--torch-checkpoint", torch_checkpoint), ("--from-stats", from_stats),
            ("--stats-out", stats_out), ("--tokenizer", tokenizer), ("--text-field", text_field),
            ("--image-size", image_size), ("--token-mask", token_mask)) if value]
        if unused:
            raise click.UsageError(f"{', '.join(unused)} do not apply to --task causal-lm (MODEL is hf:DIR, "
                                   "its own tokenizer reads DATA)")
    if method == "gps":  # PyTorch computes the gradients: ONNX Runtime's and the ONNX data's options are not read
        unused = [flag for flag, value in (
            ("--provider", provider), ("--token-mask", token_mask), ("--mean", mean), ("--std", std),
            ("--torch-model", torch_model), ("--tokenizer", tokenizer), ("--text-field", text_field),
            ("--max-length", max_length if task != "causal-lm" else None)) if value]
        if unused:
            raise click.UsageError(f"{', '.join(unused)} do not apply to --method gps (MODEL is the PyTorch "
                                   "model the gradients are taken on; DATA " + (
                                       "token data for its own tokenizer)" if task == "causal-lm"
                                       else "a labelled split of images or .npz)"))
    config = SelectConfig(**given(method=method, seed=seed, norm=norm, level=level,
                                   per_neuron=per_neuron, fraction=fraction, shira_r=shira_r,
                                   act_power=act_power, column_cap=column_cap, low_rank=low_rank))
    gps = config.method == GRADIENT_METHOD
    needs_data = gps or METHODS[config.method].needs_activations
    if gps and (from_stats or stats_out):
        raise click.UsageError(f"{'--from-stats' if from_stats else '--stats-out'} applies to FPS statistics; "
                               "--method gps computes gradients on DATA")
    if gps and data is None:
        raise click.UsageError("--method gps needs DATA: " + (
            ".txt, .jsonl or .npz token data for the next-token loss" if task == "causal-lm"
            else "a labelled training split (class folders, or .npz with labels)"))
    if needs_data and (data is None) == (not from_stats):
        raise click.UsageError("give either DATA or --from-stats")
    calibration = CalibrationConfig(**given(provider=provider, token_mask=token_mask))
    data_config = DataConfig(**given(
        batch_size=batch_size, max_samples=max_samples, image_size=image_size,
        mean=floats(mean), std=floats(std), max_length=max_length, text_field=text_field,
        tokenizer=tokenizer, shard=shard,
    ))
    scope = ScopeConfig(**given(include_lm_head=include_lm_head, exclude=tuple(exclude) or None))
    checkpoint = None
    if checkpoint_every is not None or resume:
        if from_stats or not needs_data or gps:
            raise click.UsageError("--checkpoint-every and --resume apply to an FPS calibration on DATA")
        checkpoint = CalibrationCheckpoint.beside(output, checkpoint_every, resume)
    from fps_onnx.fileio import check_writable, transaction

    check_writable(output)
    inputs = {"MODEL": spec_folder(model) if gps else model, "DATA": data, "--tokenizer": tokenizer,
              "--from-stats": from_stats, "--torch-checkpoint": torch_checkpoint,
              "--torch-model": spec_folder(torch_model)}
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with transaction(planned={"-o": output, "--stats-out": stats_out}, inputs=inputs) as outputs, \
            logging_redirect_tqdm([log]), tqdm(
                total=max_samples if shard is None else None, unit="sample",
                disable=bar_disabled(quiet or bool(from_stats)), dynamic_ncols=True, leave=False,
            ) as bar:
        result = select_masks(
            model, data, config, calibration, data_config, from_stats=from_stats, stats_out=stats_out,
            on_batch=bar.update, scope=scope, torch_model=torch_model, torch_checkpoint=torch_checkpoint,
            outputs=outputs, checkpoint=checkpoint, **given(task=task),
        )
        start = time.perf_counter()
        result.masks.save(output, outputs, version=mask_format)
        log.debug("timing: mask write %.2f s", time.perf_counter() - start)
    masks, samples, provider, seconds = result.masks, result.samples, result.provider, result.seconds
    share = masks.selected / max(masks.total, 1)
    log.info("selected %s of %s weights (%.3f%%) in %d tensors from %d samples -> %s",
             f"{masks.selected:,}", f"{masks.total:,}", 100 * share, len(masks),
             samples, output)
    if as_json:
        click.echo(json.dumps({
            "output": str(output),
            "tensors": {k: {"shape": v["shape"], "selected": v["selected"]}
                        for k, v in masks.tensors.items()},
            "selected": masks.selected,
            "total": masks.total,
            "fraction": share,
            "provider": provider,
            "samples": samples,
            "seconds": seconds,
            "norm": config.norm,
            "level": config.level,
            "budget": config.budget,
            **config.options,
        }, indent=2))
