"""Writing output files atomically: a temporary file beside the target, then rename."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
import io
import os
from pathlib import Path
import secrets
import shutil
import stat
import sys
import tempfile

from .errors import OutputError, first_line


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
    A ``write`` that replaces the file instead of writing into it (safetensors
    writes its own temporary file and renames it, with mode 0600) gets that
    mode back.
    """
    path = check_writable(path)
    tmp = _new_temp(path.parent, path.name, _mode_of(path))
    try:
        mode = _mode_of(tmp)
        write(str(tmp))
        if mode is not None and _mode_of(tmp) not in (mode, None):
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def check_folder(path: str | os.PathLike) -> Path:
    """Fail early when the folder ``path`` cannot be written as one output
    (by :func:`atomic_folder`, after creating missing parent folders)."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {path}: it is a file, not a folder")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK | os.X_OK)):
        raise OutputError(f"cannot write {path}: permission denied")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` that becomes ``path`` as one rename.

    Write every file of a multi-file output into the folder this yields; when
    the block ends without error the files are flushed and the folder takes the
    place of ``path``. Files of a folder already at ``path`` that the new output
    does not hold are carried over (hard links, else copies) before the swap,
    which on Linux is one atomic exchange of the two folders (elsewhere: two
    renames); the old folder is then removed. On error nothing at ``path``
    changes and the temporary folder is removed. The new folder gets the mode
    of the folder it replaces, or 0777 less the umask. A symbolic link at
    ``path`` is followed.
    """
    path = check_folder(path)
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    tmp = _new_temp_dir(parent, path.name, _mode_of(path))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _fsync(file)
        _fsync_dir(tmp)
        if path.is_dir():
            _carry_over(path, tmp)
            if not _exchange(tmp, path):
                old = parent / f".{path.name}.{secrets.token_hex(6)}.old"
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except OSError:
                    os.rename(old, path)
                    raise
                os.rename(old, tmp)  # removed below
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _new_temp_dir(parent: Path, name: str, mode: int | None) -> Path:
    """An empty new folder in ``parent``: ``mode``, or 0777 less the umask."""
    for _ in range(100):
        tmp = parent / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            os.mkdir(tmp, 0o777 if mode is None else 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write {parent / name}: {exc.strerror or exc}") from exc
        if mode is not None:
            os.chmod(tmp, mode)
        return tmp
    raise OutputError(f"cannot write {parent / name}: no free temporary name")


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (else copy) into ``new`` every entry of ``old`` it does not hold."""
    for item in old.iterdir():
        target = new / item.name
        if os.path.lexists(target):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, target)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where
    the system or file system cannot."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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


@contextlib.contextmanager
def captured_output(into: list[str]):
    """Collect what the block prints, from Python or from native code writing to file
    descriptors 1 and 2 (exporters' progress and C++ dumps, a Rust panic's report),
    into the list ``into`` instead of showing it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
                try:
                    yield
                finally:
                    into.append(out.getvalue())
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            into.append(sink.read().decode(errors="replace"))


def write_safetensors(path: str | os.PathLike, arrays: Mapping, meta: Mapping[str, str]) -> Path:
    """A safetensors file of NumPy ``arrays`` with string metadata, written atomically."""
    from safetensors.numpy import save_file

    return atomic_write(path, lambda tmp: save_file(dict(arrays), tmp, metadata=dict(meta)))


def read_safetensors(
    path: str | os.PathLike, fmt: str, version: str, error: type[Exception], what: str,
    *, framework: str = "numpy", with_tensors: bool = True,
) -> tuple[dict, dict]:
    """(arrays, metadata) of an fps-onnx safetensors file whose ``format`` is ``fmt``.

    ``framework`` is safetensors' ("numpy", "pt"); without ``with_tensors`` only
    the metadata is read. Raises ``error`` when the file is missing, unreadable,
    another kind of file or another version of the format.
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise error(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework=framework) as fh:
            meta = dict(fh.metadata() or {})
            arrays = {k: fh.get_tensor(k) for k in fh.keys()} if with_tensors else {}
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "not a safetensors file"
        raise error(f"cannot read {what} file {path}: {first_line(exc)}") from exc
    if meta.get("format") != fmt:
        raise error(f"{path} is not an fps-onnx {what} file")
    if meta.get("format_version") != version:
        raise error(f"{path} has {what} format version {meta.get('format_version')}, "
                    f"this fps-onnx reads {version}")
    return arrays, meta
