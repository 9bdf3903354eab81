"""Opening data files safely: regular files only, refused by name otherwise, never waited on."""

from __future__ import annotations

import os
from pathlib import Path
import stat

from ..errors import DataError


def open_regular(file: str | os.PathLike):
    """``file`` opened for binary reading, if it is a regular file (a symbolic link
    to one is fine); a device, FIFO or socket is refused by name, and never waited on."""
    _is_data_file(Path(file))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(file, flags)
    except OSError as exc:
        raise DataError(f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced since it was looked at
            raise DataError(f"{file} is {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_data_file(path: Path) -> bool:
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
        raise DataError(f"{path} is {_kind(mode)}, not a regular file; data files must be regular files")
    return True


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a plain file"
