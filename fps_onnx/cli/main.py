"""``fps-onnx``: the command group and the one place library errors become messages."""

from __future__ import annotations

import logging
import sys

import click

from fps_onnx import __version__
from fps_onnx.errors import FpsError


class _Group(click.Group):
    """Turns library errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FpsError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fps-onnx")
def main() -> None:
    """Choose the weights of a pretrained model to fine-tune (FPS), on any ONNX model."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("fps_onnx")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _register() -> None:
    from .apply_delta import apply_delta
    from .diff import diff
    from .export import export
    from .inspect import inspect
    from .map import map_
    from .select import select
    from .train import train

    for command in (select, export, map_, train, apply_delta, inspect, diff):
        main.add_command(command)


_register()
