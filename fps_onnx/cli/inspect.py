"""``fps-onnx inspect``: what a mask file selects, per tensor, depth and kind."""

from __future__ import annotations

import json

import click

__all__ = ["inspect"]


@click.command("inspect")
@click.argument("masks", type=click.Path(dir_okay=False))
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False),
              help="Statistics file of the same model (--stats-out): adds the activation statistic "
                   "per tensor and how much of the selection falls on its top 10% input channels.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False),
              help="The ONNX model the masks were selected on: its node names tell depth and kind "
                   "where weight names (onnx::MatMul_123) do not.")
@click.option("--png", type=click.Path(dir_okay=False),
              help="Also write a figure: selected fraction by depth and kind, and selected entries "
                   "per output neuron (needs matplotlib: pip install 'fps-onnx[plot]').")
@click.option("--markdown", is_flag=True, help="GitHub-flavoured markdown (for $GITHUB_STEP_SUMMARY).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def inspect(masks, stats_path, onnx_path, png, markdown, as_json):
    """Summarise MASKS: per tensor shape, selected entries and fraction; totals per layer
    depth and per kind (attention q/k/v/o, MLP up/gate/down, conv, lm_head, other)."""
    from fps_onnx import report
    from fps_onnx.selection.maskfile import MaskFile
    from fps_onnx.stats import Stats

    if markdown and as_json:
        raise click.UsageError("--markdown and --json are exclusive")
    if png:
        from fps_onnx.fileio import check_clashes, check_writable

        check_writable(png)
        check_clashes({"--png": png}, {"MASKS": masks, "--stats": stats_path, "--onnx": onnx_path})
        report.require_matplotlib()
    loaded = MaskFile.load(masks)
    stats = Stats.load(stats_path) if stats_path else None
    nodes = report.node_names(onnx_path) if onnx_path else None
    summary = report.summarise(loaded, stats, source=str(masks), nodes=nodes)
    if png:
        report.plot(summary, png)
    if as_json:
        click.echo(json.dumps(report.to_json(summary), indent=2))
    elif markdown:
        click.echo(report.to_markdown(summary), nl=False)
    else:
        click.echo(report.to_text(summary))
