"""Options shared by several commands."""

from __future__ import annotations

import logging

import click

__all__ = ["bar_disabled", "floats", "given", "mask_format_option", "quiet_option", "spec_folder"]


def given(**values) -> dict:
    """Only the options the user gave: every default lives in the library's config dataclasses."""
    return {k: v for k, v in values.items() if v is not None}


def quiet_option(fn):
    """``--quiet``: no progress bar and no info lines."""

    def silence(ctx, param, value):
        if value:
            logging.getLogger("fps_onnx").setLevel(logging.WARNING)
        return value

    return click.option(
        "--quiet", "-q", is_flag=True, callback=silence, expose_value=True,
        help="No progress bar, warnings only.",
    )(fn)


def mask_format_option(fn):
    """``--mask-format v1|v2``: the version of the mask file written (None: the library's default)."""
    from fps_onnx.selection.maskfile import DEFAULT_VERSION, VERSIONS

    return click.option(
        "--mask-format", "mask_format", type=click.Choice([f"v{v}" for v in VERSIONS]),
        help="Mask file version: v2 stores the selected indices, v1 one bool per weight (for readers "
             f"older than v2; 200x larger at 0.5% selected). [default: v{DEFAULT_VERSION}]",
    )(fn)


def bar_disabled(off: bool) -> bool | None:
    """tqdm's ``disable``: off when asked, and (None) wherever stderr is not a
    terminal, so CI logs get the summary lines without progress-bar redraws."""
    return True if off else None


def floats(text: str | None) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def spec_folder(spec: str | None) -> str | None:
    """The folder of an ``hf:PATH`` model SPEC (an input no output may replace), else None."""
    return spec[3:] if spec and spec.startswith("hf:") else None
