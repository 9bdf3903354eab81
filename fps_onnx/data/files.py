"""Opening data files safely: regular files only, refused by name otherwise, never waited on."""

from __future__ import annotations

import os
from pathlib import Path
import stat

from .._io import file_kind, open_regular
from ..errors import DataError

__all__ = ["is_data_file", "open_data_file"]


def open_data_file(file: str | os.PathLike):
    """``file`` opened for binary reading, if it is a regular file (a symbolic link
    to one is fine); a device, FIFO or socket is refused by name, and never waited on."""
    is_data_file(Path(file))
    return open_regular(file, DataError)


def is_data_file(path: Path) -> bool:
    """True for a regular file (or a link to one), False for a folder; anything
    else (device, FIFO, socket, broken link) is refused by name."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        what = "a broken symbolic link" if path.is_symlink() else "gone"
        raise DataError(f"data file {path} is {what}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is {file_kind(mode)}, not a regular file; data files must be regular files")
    return True
