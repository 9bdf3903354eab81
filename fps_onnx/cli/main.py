"""``fps-onnx``: the command group and the one place errors become messages.

Whatever goes wrong, the user sees exactly one line ``Error: ...`` on stderr
(control characters of names read from files escaped, :func:`one_line`) and a
non-zero exit status: 1 for bad input, 2 for a bad command line (click's
usage errors). Log lines are escaped the same way.
"""

from __future__ import annotations

import logging
import sys

import click

from fps_onnx import __version__
from fps_onnx.errors import FpsError, first_line, one_line

__all__ = ["main"]

log = logging.getLogger("fps_onnx")


class OneLineFormatter(logging.Formatter):
    """Each log record as one line (an exception's traceback, logged at debug, aside)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))


def fail(message: str, status: int = 1):
    """Print ``Error: message`` as one line on stderr and exit with ``status``."""
    click.echo(f"Error: {one_line(message)}", err=True)
    sys.exit(status)


class _Group(click.Group):
    """Turns every error into one line on stderr and a non-zero exit status."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            fail(exc.format_message() + where, exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted; no output was written")
        sys.exit(status if isinstance(status, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FpsError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            sys.exit(130)
        except (click.ClickException, click.Abort, click.exceptions.Exit, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a bug, or a library's panic (a BaseException)
            log.debug("traceback of the unexpected error:", exc_info=True)
            fail(f"unexpected {type(exc).__name__}: {first_line(exc)} (a bug in fps-onnx or a library "
                 "it uses: please report it; -v shows the traceback)")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fps-onnx")
@click.option("-v", "--verbose", is_flag=True,
              help="Debug lines, ONNX Runtime's own warnings and errors, and the traceback of an unexpected error.")
def main(verbose: bool) -> None:
    """Choose the weights of a pretrained model to fine-tune (FPS), on any ONNX model."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


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
