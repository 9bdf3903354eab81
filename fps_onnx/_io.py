"""Safe file I/O: output files written atomically (a temporary file beside the
target, then rename), untrusted input files opened only when regular."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
import contextlib
import hashlib
import io
import json
import math
import os
from pathlib import Path
import secrets
import shutil
import stat
import sys
import tempfile

from .errors import OutputError, first_line

__all__ = [
    "Outputs", "atomic_folder", "atomic_write", "captured_output", "check_clashes", "check_folder",
    "check_writable", "content_digest", "file_kind", "listed_paths", "open_regular", "read_safetensors", "same_path",
    "transaction", "write_safetensors",
]


def open_regular(path: str | os.PathLike, error: type[Exception], what: str | None = None, *,
                 follow_links: bool = True, buffering: int = -1):
    """``path`` opened for binary reading if it is a regular file: opened without
    blocking (a FIFO put in its place is never waited on), checked once open, then
    made blocking. ``follow_links=False`` refuses a symbolic link (for a real path
    that was checked, so a link put in its place cannot redirect the read).
    Anything else raises ``error`` naming ``path`` (and ``what`` it is, if given)."""
    flags = os.O_RDONLY
    for flag in ("O_NONBLOCK", "O_CLOEXEC", "O_BINARY", *(() if follow_links else ("O_NOFOLLOW",))):
        flags |= getattr(os, flag, 0)
    shown = f"{os.fspath(path)} ({what})" if what else os.fspath(path)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"cannot read {shown}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced since it was looked at
            raise error(f"{shown} is {file_kind(mode)}, not a regular file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is, in words ("a FIFO", "a folder" ...), for messages."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "not a plain file"


#: Entries a folder's digest walks at most (:func:`content_digest`).
MAX_DIGEST_ENTRIES = 10_000_000
_CHUNK = 1 << 20


def content_digest(path: str | os.PathLike, error: type[Exception]) -> str:
    """Hex SHA-256 naming what ``path`` holds, to tell one run's inputs from another's.

    A file: the SHA-256 of its bytes (a regular file only). A folder: of the
    list of its regular files and links to them (relative path, NUL, size in decimal, newline),
    sorted, found without following links into other folders and refused
    (``error``) past :data:`MAX_DIGEST_ENTRIES` entries; their bytes are not
    read, so a file rewritten in place to the same size is not told apart.
    """
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        with open_regular(path, error) as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    root, entries, seen = os.fspath(path), [], 0
    for folder, dirs, files in os.walk(root):
        seen += len(dirs) + len(files)
        if seen > MAX_DIGEST_ENTRIES:
            raise error(f"{path} holds more than {MAX_DIGEST_ENTRIES:,} entries")
        for name in files:
            full = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                info = os.stat(full)
                if stat.S_ISREG(info.st_mode):
                    entries.append(f"{os.path.relpath(full, root)}\0{info.st_size}\n")
    for entry in sorted(entries):
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


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


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file or folder: the same real path
    (symbolic links and relative parts resolved), or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


Paths = str | os.PathLike | Iterable[str | os.PathLike] | None


def listed_paths(given: Paths) -> list:
    """One path, several, or none, as a list."""
    if given is None:
        return []
    if isinstance(given, (str, os.PathLike)):
        return [given]
    return [p for p in given if p is not None]


def check_clashes(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Mapping[str, Paths] = {}) -> None:
    """Refuse, before any work, an output that is one of the command's inputs
    (``inputs``: what each is -> one path or several) or another of its outputs.

    The one place every command checks its paths (:func:`same_path`: symbolic
    links, relative paths and hard links included).
    """
    given = [(what, path) for what, path in outputs.items() if path is not None]
    for i, (what, path) in enumerate(given):
        for other, earlier in given[:i]:
            if same_path(path, earlier):
                raise OutputError(f"{what} {path} is the same file as {other} {earlier}: "
                                  "give each output its own path")
        for source, paths in inputs.items():
            for read in listed_paths(paths):
                if same_path(path, read):
                    raise OutputError(f"{what} {path} is the same file as {source} {read}: "
                                      "an output never replaces an input; write it elsewhere")


class Outputs:
    """The outputs of one command, appearing together or not at all.

    Each file (:meth:`write`) or folder (:meth:`folder`) is staged as a
    temporary file or folder beside its target and flushed to disk;
    :meth:`commit` renames them all onto their targets, in the order they were
    staged, then removes the files given to :meth:`remove`; :meth:`discard`
    removes whatever is still staged (and the folders :meth:`commit` replaced).
    Use it through :func:`transaction`. ``planned`` names the outputs the
    command will write, checked at once against ``inputs`` and each other
    (:func:`check_clashes`), and again whenever :meth:`plan` adds outputs or
    inputs found while working (a model's external data files).
    """

    def __init__(self, planned: Mapping[str, str | os.PathLike | None] = {},
                 inputs: Mapping[str, Paths] = {}) -> None:
        self._planned: dict[str, str | os.PathLike] = {}
        self._inputs: list[tuple[str, Paths]] = []
        self._staged: list[tuple[Path, Path, bool]] = []  # (temporary, target, is a folder)
        self._removals: list[Path] = []
        self.plan(planned, inputs)

    def plan(self, planned: Mapping[str, str | os.PathLike | None] = {},
             inputs: Mapping[str, Paths] = {}) -> None:
        """Add outputs the command will write and inputs it reads; refuse any clash
        among all of them (:func:`check_clashes`) at once, before any work."""
        self._planned.update((what, path) for what, path in planned.items() if path is not None)
        self._inputs += inputs.items()
        check_clashes(self._planned)
        for what, paths in self._inputs:
            check_clashes(self._planned, {what: paths})

    def write(self, path: str | os.PathLike, write: Callable[[str], None]) -> Path:
        """Stage ``path``: call ``write(tmp_path)`` on a new temporary file beside it.

        The temporary file is created with the mode a new file gets (0666 less
        the umask, applied by the kernel: the process umask is never changed),
        or with the mode of the file it replaces; its bytes reach the disk
        before :meth:`commit`. A ``write`` that replaces the file instead of
        writing into it (safetensors writes its own temporary file and renames
        it, with mode 0600) gets that mode back.
        """
        path = self._claim(check_writable(path))
        tmp = _new_temp(path.parent, path.name, _mode_of(path))
        self._staged.append((tmp, path, False))
        try:
            mode = _mode_of(tmp)
            write(str(tmp))
            if mode is not None and _mode_of(tmp) not in (mode, None):
                os.chmod(tmp, mode)
            _fsync(tmp)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return path

    def folder(self, path: str | os.PathLike) -> Path:
        """Stage the folder ``path``: the new temporary folder to fill, which
        :meth:`commit` puts in its place (see :func:`atomic_folder`)."""
        path = self._claim(check_folder(path))
        if not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
        tmp = _new_temp_dir(path.parent, path.name, _mode_of(path))
        self._staged.append((tmp, path, True))
        return tmp

    def remove(self, path: str | os.PathLike) -> None:
        """Remove ``path`` (if it exists) once every output is in place."""
        self._removals.append(Path(path))

    def commit(self) -> None:
        """Move every staged output onto its target, in the order staged."""
        target = None
        try:
            for tmp, target, is_folder in self._staged:
                if is_folder:
                    _swap_in(tmp, target)
                else:
                    os.replace(tmp, target)
            for folder in dict.fromkeys(t.parent for _, t, _ in self._staged):
                _fsync_dir(folder)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
        for path in self._removals:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def discard(self) -> None:
        """Remove every temporary file and folder still staged."""
        for tmp, _, is_folder in self._staged:
            if is_folder:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self._staged.clear()

    def _claim(self, path: Path) -> Path:
        for _, staged, _ in self._staged:
            if same_path(path, staged):
                raise OutputError(f"{path} would be written twice by one command: "
                                  "give each output its own path")
        return path


@contextlib.contextmanager
def transaction(within: Outputs | None = None, *, planned: Mapping[str, str | os.PathLike | None] = {},
                inputs: Mapping[str, Paths] = {}) -> Iterator[Outputs]:
    """One output transaction (:class:`Outputs`): committed when the block ends
    without error, discarded otherwise. ``within`` an outer transaction, its
    outputs join that one (which commits them with the rest)."""
    if within is not None:
        within.plan(planned, inputs)
        yield within
        return
    outputs = Outputs(planned, inputs)
    try:
        yield outputs
        outputs.commit()
    finally:
        outputs.discard()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path``; nothing is left
    on failure (a transaction of one file: :meth:`Outputs.write`)."""
    with transaction() as outputs:
        return outputs.write(path, write)


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
    ``path`` is followed. (A transaction of one folder: :meth:`Outputs.folder`.)
    """
    with transaction() as outputs:
        tmp = outputs.folder(path)
        try:
            yield tmp
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the filled folder ``tmp`` in the place of ``path`` (the old folder, if
    any, ends at ``tmp``, which the transaction then removes)."""
    for file in tmp.rglob("*"):
        if file.is_file() and not file.is_symlink():
            _fsync(file)
    _fsync_dir(tmp)
    if not path.is_dir():
        os.rename(tmp, path)
        return
    _carry_over(path, tmp)
    if _exchange(tmp, path):
        return
    old = path.parent / f".{path.name}.{secrets.token_hex(6)}.old"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    os.rename(old, tmp)


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


def write_safetensors(path: str | os.PathLike, arrays: Mapping, meta: Mapping[str, str],
                      outputs: Outputs | None = None, *, framework: str = "numpy") -> Path:
    """A safetensors file of ``arrays`` with string metadata, written atomically (or
    staged in the transaction ``outputs``, which puts it in place with the rest).
    ``framework`` is safetensors' for the arrays: "numpy", or "pt" for torch tensors."""
    if framework == "pt":
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file

    def write(tmp) -> None:
        save_file(dict(arrays), tmp, metadata=dict(meta))
        _canonical_header(tmp)

    with transaction(outputs) as staged:
        return staged.write(path, write)


def _canonical_header(path: str | os.PathLike) -> None:
    """Rewrite the header of the safetensors file ``path`` with its metadata in key order, in
    place: safetensors writes the metadata in a hash map's order, which changes from one
    process to the next, so the same arrays and metadata would not give the same bytes (a
    published file's digest would change with every run). The tensors' entries keep their
    order; the header keeps its length (JSON written as compactly, then the same padding)."""
    with open(path, "r+b") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
        text = json.dumps({**ordered, **header}, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # not expected: the same JSON, written as compactly
            return
        fh.seek(8)
        fh.write(text + b" " * (length - len(text)))


# safetensors' dtypes that NumPy holds, as NumPy dtypes (little-endian, as the format stores them)
_NUMPY_DTYPES = {"BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
                 "U64": "<u8", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8"}


def _each_tensor(path: str | os.PathLike, keys: Iterable[str]) -> Iterator[tuple[str, object]]:
    """(key, NumPy array) of each of ``keys`` of a safetensors file that safetensors has opened
    and checked, each read into its own buffer when asked for (no memory map). The header is
    read again, so each tensor's byte count is checked against its dtype and shape and the
    file's size before anything is allocated (the file may have changed since)."""
    import numpy as np

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        length = int.from_bytes(fh.read(8), "little")
        if length > size - 8:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(fh.read(length))
        for key in keys:
            entry = header[key]
            dtype = _NUMPY_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key!r} is {entry['dtype']}, which NumPy does not hold")
            start, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            if not 0 <= start <= end <= size - 8 - length or end - start != math.prod(shape) * np.dtype(dtype).itemsize:
                raise ValueError(f"tensor {key!r}: its bytes do not fit its dtype and shape within the file")
            data = os.pread(fh.fileno(), end - start, 8 + length + start)
            if len(data) != end - start:
                raise ValueError(f"tensor {key!r}: the file ends early")
            yield key, np.frombuffer(data, dtype).reshape(shape)


def read_safetensors(
    path: str | os.PathLike, fmt: str, version: str | Collection[str], error: type[Exception], what: str,
    *, framework: str = "numpy", with_tensors: bool = True,
    check: Callable[[dict[str, tuple[str, list[int]]], dict], None] | None = None,
    convert: Callable[[str, object, dict], object] | None = None,
) -> tuple[dict, dict]:
    """(arrays, metadata) of an fps-onnx safetensors file whose ``format`` is ``fmt``.

    ``version``: the ``format_version`` read (one, or several). ``framework`` is
    safetensors' ("numpy", "pt"); without ``with_tensors`` only the metadata is
    read. ``check(header, metadata)``, where given, runs before any tensor is
    read: ``header`` maps each tensor to its (safetensors dtype, shape), as the
    file's header claims (safetensors has checked that they fit the file).
    ``convert(key, array, metadata)``, where given, turns each tensor (a NumPy array)
    into what is kept as soon as it is read, and the tensors are read with plain reads
    instead of safetensors' memory map: one tensor as stored is held at a time, and
    the file's pages are not counted as this process's memory.
    Raises ``error`` when the file is missing, unreadable, another kind of file
    or another version of the format.
    """
    from safetensors import safe_open

    versions = (version,) if isinstance(version, str) else tuple(version)
    if not os.path.isfile(path):
        raise error(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework=framework) as fh:
            meta = dict(fh.metadata() or {})
            if meta.get("format") != fmt:
                raise error(f"{path} is not an fps-onnx {what} file")
            if meta.get("format_version") not in versions:
                raise error(f"{path} has {what} format version {meta.get('format_version')}, "
                            f"this fps-onnx reads {' and '.join(versions)}")
            if check is not None:
                header = {}
                for key in fh.keys():
                    part = fh.get_slice(key)
                    header[key] = (part.get_dtype(), list(part.get_shape()))
                check(header, meta)
            if not with_tensors:
                arrays = {}
            elif convert is None:
                arrays = {k: fh.get_tensor(k) for k in fh.keys()}
            else:
                arrays = {k: convert(k, a, meta) for k, a in _each_tensor(path, fh.keys())}
    except error:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "not a safetensors file"
        raise error(f"cannot read {what} file {path}: {first_line(exc)}") from exc
    return arrays, meta
