"""``fps-onnx diff``: how far two mask files agree, and a gate for CI."""

from __future__ import annotations

import json

import click

__all__ = ["diff"]


@click.command("diff")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--min-overlap", type=click.FloatRange(0, 1), default=None,
              help="Exit 1 (after the report) when the overall Jaccard |A∩B|/|A∪B| is below this.")
@click.option("--allow-different-models", is_flag=True,
              help="Compare masks whose model_sha256 differs instead of refusing.")
@click.option("--markdown", is_flag=True, help="GitHub-flavoured markdown (for $GITHUB_STEP_SUMMARY).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def diff(a, b, min_overlap, allow_different_models, markdown, as_json):
    """Compare mask files A and B: per tensor and overall Jaccard |A∩B|/|A∪B| and the
    share of A's entries kept in B |A∩B|/|A|, tensors of one file only, and metadata
    differences (model, method, norm, level, budget, samples)."""
    from fps_onnx import report
    from fps_onnx.selection.maskfile import MaskFile

    if markdown and as_json:
        raise click.UsageError("--markdown and --json are exclusive")
    result = report.diff(MaskFile.load(a), MaskFile.load(b), (str(a), str(b)),
                         allow_different_models=allow_different_models)
    if as_json:
        click.echo(json.dumps({**report.to_json(result), "min_overlap": min_overlap}, indent=2))
    elif markdown:
        click.echo(report.to_markdown(result), nl=False)
    else:
        click.echo(report.to_text(result))
    jaccard = result.overall.jaccard
    if min_overlap is not None and jaccard < min_overlap:
        o = result.overall
        raise click.ClickException(
            f"overall Jaccard {jaccard:.4f} is below --min-overlap {min_overlap:g} "
            f"(|A∩B| {o.both:,} of |A∪B| {o.union:,} selected entries)")
