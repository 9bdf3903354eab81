"""``fps-onnx export``: a PyTorch model (timm, transformers, or your function) as a checked ONNX file."""

from __future__ import annotations

import json
import logging

import click

from fps_onnx.torch.export import EXPORTERS, ExportConfig

from .options import given, quiet_option

__all__ = ["export"]

log = logging.getLogger("fps_onnx")


@click.command("export")
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Weights to load (.safetensors or torch.save state_dict); must fit the model.")
@click.option("--num-classes", type=int, help="Classifier outputs (timm; adds a classification head to hf: models).")
@click.option("--img-size", type=int, help="Input image side.")
@click.option("--exporter", type=click.Choice(EXPORTERS), help=f"PyTorch ONNX exporter. [default: {ExportConfig().exporter}]")
@click.option("--opset", type=int, help=f"ONNX opset. [default: {ExportConfig().opset}]")
@click.option("--tolerance", type=float, help=f"Max |ONNX - PyTorch| on the example inputs, relative to max(1, max |output|). [default: {ExportConfig().tolerance}]")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@quiet_option
def export(spec, output, checkpoint, num_classes, img_size, exporter, opset, tolerance, as_json, quiet):
    """Export the model SPEC to ONNX, keeping PyTorch parameter names on its weights.

    SPEC is timm:NAME, hf:PATH (a local transformers folder) or
    module.path:function / file.py:function returning (model, example_inputs).
    Nothing is downloaded. The export is checked against PyTorch with ONNX Runtime.
    A decoder-only LLM folder is exported as its causal LM (input_ids,
    attention_mask -> logits, no key/value cache), with its config and tokenizer
    files copied beside the .onnx.
    """
    from fps_onnx.torch.export import export as run_export

    result = run_export(spec, output, ExportConfig(**given(exporter=exporter, opset=opset, tolerance=tolerance)), checkpoint=checkpoint,
                        num_classes=num_classes, img_size=img_size)
    named = result.weights - len(result.unnamed)
    data = f" (weights in {result.external_data})" if result.external_data else ""
    log.info("wrote %s%s: %d selectable weights, %d named like their parameter; "
             "max abs difference to PyTorch %.3g (%.1f s)",
             result.path, data, result.weights, named, result.max_abs_diff or 0.0, result.seconds)
    if result.copied:
        log.info("beside it: %s", ", ".join(result.copied))
    if as_json:
        click.echo(json.dumps({
            "output": str(result.path), "weights": result.weights, "unnamed": result.unnamed,
            "renamed": result.renamed, "max_abs_diff": result.max_abs_diff, "seconds": result.seconds,
            "external_data": result.external_data, "copied": result.copied,
        }, indent=2))
