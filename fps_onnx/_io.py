"""Writing output files atomically: a temporary file beside the target, then rename."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import contextlib
import hashlib
import os
from pathlib import Path
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
    """Call ``write(tmp_path)`` and move the result onto ``path``; nothing is left on failure."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
