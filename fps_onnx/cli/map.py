"""``fps-onnx map``: re-key a mask file by the parameter names of a PyTorch model."""

from __future__ import annotations

import json
import logging

import click

from .options import mask_format_option, quiet_option, spec_folder

__all__ = ["map_"]

log = logging.getLogger("fps_onnx")


@click.command("map")
@click.argument("masks", type=click.Path(dir_okay=False))
@click.option("--model", "spec", required=True, help="PyTorch model SPEC: timm:NAME, hf:PATH or module.path:function.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), help="The ONNX file the masks were selected on (needed to match by value).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Mask file to write.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Weights for the PyTorch model (must be those of the ONNX file).")
@click.option("--num-classes", type=int, help="Classifier outputs of the PyTorch model.")
@click.option("--img-size", type=int, help="Input image side of the PyTorch model.")
@click.option("--strict", is_flag=True, help="Fail when any weight cannot be mapped.")
@click.option("--json", "as_json", is_flag=True, help="Print the mapping on stdout.")
@mask_format_option
@quiet_option
def map_(masks, spec, onnx_path, output, checkpoint, num_classes, img_size, strict, as_json, mask_format, quiet):
    """Rewrite the keys of MASKS to the parameter names of the PyTorch model.

    Weights are matched by name, then by value (W or its transpose) against the
    ONNX file's weights; masks end in the parameter's layout, tied weights as one mask.
    """
    from fps_onnx.fileio import check_clashes, check_writable
    from fps_onnx.selection.maskfile import MaskFile
    from fps_onnx.torch.mapping import map_to_model

    check_writable(output)
    check_clashes({"-o": output}, {"MASKS": masks, "--onnx": onnx_path, "--checkpoint": checkpoint,
                                   "--model": spec_folder(spec)})
    loaded = MaskFile.load(masks)
    mapped, report = map_to_model(loaded, spec, onnx_path, checkpoint=checkpoint,
                                  num_classes=num_classes, img_size=img_size, strict=strict)
    mapped.save(output, version=mask_format)
    log.info("%s -> %s", report.summary(), output)
    if as_json:
        click.echo(json.dumps({"output": str(output), **report.to_json()}, indent=2))
