"""Writing output files atomically: a temporary file beside the target, then rename."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
import hashlib
import os
from pathlib import Path
import secrets
import shutil
import stat
import tempfile

from .errors import OutputError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any expensive work, when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path``; nothing is left on failure.

    The temporary file is created with the mode a new file gets (0666 less the
    umask, applied by the kernel: the process umask is never changed), or with
    the mode of the file it replaces; its bytes reach the disk before the rename.
    """
    path = check_writable(path)
    tmp = _new_temp(path.parent, path.name, _mode_of(path))
    try:
        write(str(tmp))
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` that becomes ``path`` as one rename.

    Write every file of a multi-file output into the folder this yields; when
    the block ends without error the files are flushed and the folder is renamed
    onto ``path``. A folder already at ``path`` is swapped out (files the new
    output does not hold are carried over) and removed; on error nothing at
    ``path`` changes and the temporary folder is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {path}: it is a file, not a folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: permission denied")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        old = None
        if path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            for item in old.iterdir():
                if not (path / item.name).exists():
                    os.rename(item, path / item.name)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mode_of(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def _new_temp(folder: Path, name: str, mode: int | None) -> Path:
    """An empty new file in ``folder``: ``mode``, or 0666 less the umask."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write {folder / name}: {exc.strerror or exc}") from exc
        try:
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return tmp
    raise OutputError(f"cannot write {folder / name}: no free temporary name")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_safetensors(path: str | os.PathLike, arrays: Mapping, meta: Mapping[str, str]) -> Path:
    """A safetensors file of NumPy ``arrays`` with string metadata, written atomically."""
    from safetensors.numpy import save_file

    return atomic_write(path, lambda tmp: save_file(dict(arrays), tmp, metadata=dict(meta)))


def read_safetensors(
    path: str | os.PathLike, fmt: str, version: str, error: type[Exception], what: str
) -> tuple[dict, dict]:
    """(arrays, metadata) of an fps-onnx safetensors file whose ``format`` is ``fmt``.

    Raises ``error`` when the file is missing, unreadable, another kind of file
    or another version of the format.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise error(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = dict(fh.metadata() or {})
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "not a safetensors file"
        raise error(f"cannot read {what} file {path}: {exc}") from exc
    if meta.get("format") != fmt:
        raise error(f"{path} is not an fps-onnx {what} file")
    if meta.get("format_version") != version:
        raise error(f"{path} has {what} format version {meta.get('format_version')}, "
                    f"this fps-onnx reads {version}")
    return arrays, meta
