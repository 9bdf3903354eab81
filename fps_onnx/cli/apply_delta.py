"""``fps-onnx apply-delta``: rebuild a fine-tuned causal LM folder from its base model and delta."""

from __future__ import annotations

import click

from .options import quiet_option, spec_folder

__all__ = ["apply_delta"]


@click.command("apply-delta")
@click.argument("spec", metavar="hf:DIR")
@click.argument("delta", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the merged model (AutoModelForCausalLM.from_pretrained loads it).")
@quiet_option
def apply_delta(spec, delta, output, quiet):
    """Add the deltas of DELTA (from `train --task causal-lm`) to the causal LM hf:DIR.

    The delta file names the base model it was trained from (a sha256 over its
    weight files); a delta of any other base is refused.
    """
    from fps_onnx.fileio import check_clashes

    check_clashes({"-o": output}, {"hf:DIR": spec_folder(spec), "DELTA": delta})
    from fps_onnx.torch.train.hf_folder import apply_delta_folder

    apply_delta_folder(spec, delta, output)
