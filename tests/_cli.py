"""The CLI as the tests drive it: one way to run a command, one check of the contract on bad input.

Import from any test folder (``tests/`` is on ``sys.path`` through ``tests/conftest.py``)::

    from _cli import assert_one_error, invoke
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
import re

from click.testing import CliRunner, Result


def invoke(*args, input: str | None = None) -> Result:
    """Run ``fps-onnx ARGS`` (each argument through ``str``) in-process with click's CliRunner."""
    from fps_onnx.cli.main import main  # on call: importing this module stays cheap

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_one_error(result: Result, match: str | None = None, *, status: int = 1, alone: bool = True,
                     absent: Iterable[Path] = (), empty: Iterable[Path] = ()) -> str:
    """The one-line error contract; returns the ``Error:`` line.

    Exit ``status`` by ``SystemExit``, exactly one stderr line starting ``Error: `` (with ``alone`` the
    command's only output, stdout empty; otherwise the last stderr line, after info lines such as
    "running on ..."), the line
    free of escape codes, no traceback anywhere. ``match``: a regex the line must contain
    (``re.search``). Every path in ``absent`` must not exist; every folder in ``empty`` must be empty.
    """
    lines = result.stderr.splitlines()  # splits on \r, \x1c-\x1e, \x85, \u2028, \u2029 too
    assert result.exit_code == status, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in lines if line.startswith("Error:")]
    if alone:
        assert len(lines) == 1 and result.stdout == "", result.output
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("Error: "), result.stderr
    line = errors[0]
    assert "Traceback" not in result.output, result.output
    assert "\x1b" not in line, line
    if match is not None:
        assert re.search(match, line), line
    for path in absent:
        assert not Path(path).exists(), f"{path} was written"
    for folder in empty:
        assert list(Path(folder).iterdir()) == [], f"{folder} is not empty"
    return line
