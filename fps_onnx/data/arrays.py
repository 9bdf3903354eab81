"""Array files as calibration data: ``.npy`` (memory-mapped) and ``.npz`` (streamed).

A ``.npy`` header is checked against the bytes that follow before anything is
mapped; object arrays are never unpickled. ``.npz`` members are decompressed
only as far as the rows read; a Fortran-ordered member, whose rows run across
all of it, is gathered in passes that hold only the rows asked (see
:class:`_MemberRows`). Every failure is one ``DataError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import math
import os
from pathlib import Path
import zipfile

import numpy as np

from ..errors import DataError, FpsError, first_line
from ..onnx.inputs import InputSpec
from .config import DataConfig
from .files import open_data_file

__all__ = ["ARRAY_SUFFIXES", "ZERO_FILLED", "fit", "read_npy", "read_npz"]

ARRAY_SUFFIXES = (".npy", ".npz")
#: inputs an .npz may leave out: filled with zeros
ZERO_FILLED = ("token_type_ids",)


@contextmanager
def _reading(what: object) -> Iterator[None]:
    """Any failure of a parser on the bytes of ``what`` becomes one DataError line."""
    try:
        yield
    except FpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile bytes can fail a parser in any way
        raise DataError(f"cannot read {what}: {first_line(exc)}") from exc


def _block_rows(config: DataConfig) -> int:
    """Rows read from an array file at a time: one batch, or fewer if fewer are wanted."""
    return min(config.batch_size, config.max_samples or config.batch_size)


@dataclass(frozen=True)
class _NpyHeader:
    """What a .npy header declares, checked against the bytes that follow it."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # bytes before the data

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def like(self) -> np.ndarray:
        """A read-only stand-in of the declared shape and dtype (no memory)."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)


def _npy_header(fh, where: str, size: int) -> _NpyHeader:
    """Reads the header of the .npy data in ``fh`` (``size`` bytes in all).

    Refuses object arrays (never unpickled), 0-d arrays and negative sizes, and a
    header declaring more data than the ``size`` bytes hold, before any data is read.
    """
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise DataError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported")
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (a pickled object array), which are never "
                        "loaded; save plain numeric arrays")
    if not shape:
        raise DataError(f"{where} is a single value (a 0-d array); samples go on axis 0")
    if any(d < 0 for d in shape):
        raise DataError(f"{where}: its header declares a negative size {list(shape)}")
    header = _NpyHeader(tuple(shape), bool(fortran), dtype, fh.tell())
    declared = math.prod(shape) * dtype.itemsize
    if declared > size - header.offset:
        raise DataError(f"{where}: its header declares {list(shape)} {dtype.name} ({declared:,} bytes) "
                        f"but only {max(size - header.offset, 0):,} bytes follow")
    return header


def read_npy(file: Path, inputs, config: DataConfig) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of rows of a memory-mapped .npy file."""
    if len(inputs) != 1:
        names = ", ".join(s.name for s in inputs)
        raise DataError(f"{file}: .npy data fits a model with one input; this model has {names} "
                        "(use .npz with one array per input name)")
    spec = inputs[0]
    with open_data_file(file) as fh, _reading(file):
        header = _npy_header(fh, str(file), os.fstat(fh.fileno()).st_size)
        fit(file, spec, header.like())
        if math.prod(header.shape) == 0:
            return
        array = np.memmap(fh, header.dtype, mode="r", offset=header.offset, shape=header.shape,
                          order="F" if header.fortran else "C")
        rows = _block_rows(config)
        for start in range(0, len(array), rows):
            yield {spec.name: array[start : start + rows]}


class _MemberRows:
    """The rows of one .npy member of a zip archive, read in order, only as asked for.

    A C-ordered member is streamed: only the rows read are decompressed. A
    Fortran-ordered one stores each column whole, so one row lies across all of
    it: its rows are gathered in passes over the member, each pass keeping a
    window of at most ``limit`` rows (``max_samples``, the most a run asks of
    the file) and :data:`_WINDOW_BYTES` (or one block), so memory stays bounded
    by the rows asked whatever the member declares; decompression runs on to
    the member's end, one piece at a time.
    """

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, limit: int | None) -> None:
        self.archive, self.info, self.where, self.limit = archive, info, where, limit
        self.stream = archive.open(info)
        self.header = _npy_header(self.stream, where, info.file_size)
        # with at most one axis longer than 1, Fortran order lays the bytes out as C order does
        self.fortran = self.header.fortran and sum(d > 1 for d in self.header.shape) > 1
        self.window: tuple[int, np.ndarray] | None = None  # (first row, rows held) of a Fortran member
        self.passes = 0
        self.done = 0

    def read(self, rows: int) -> np.ndarray:
        start, self.done = self.done, self.done + rows
        shape, dtype = self.header.shape, self.header.dtype
        if not self.fortran:
            data = _read_exact(self.stream, rows * self.header.row_bytes, self._short)
            return np.frombuffer(data, dtype).reshape(rows, *shape[1:])
        if self.window is None or start + rows > self.window[0] + len(self.window[1]):
            count = max(rows, _WINDOW_BYTES // max(self.header.row_bytes, 1) // rows * rows)  # whole blocks
            asked = shape[0] if self.limit is None else min(self.limit, shape[0])
            count = min(count, max(asked - start, rows), shape[0] - start)
            self.window = (start, self._fortran_rows(start, count))
        first, held = self.window
        return held[start - first : start - first + rows]

    def _fortran_rows(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of a Fortran-ordered member, in one pass over it."""
        shape, dtype = self.header.shape, self.header.dtype
        n0, columns, item = shape[0], math.prod(shape[1:]), dtype.itemsize
        if self.passes:  # a stream reads forward only: the next pass opens the member again
            self.stream.close()
            self.stream = self.archive.open(self.info)
            _skip(self.stream, self.header.offset, self._short)
        self.passes += 1
        out = np.empty((columns, count), dtype)
        per_read = max(1, _PIECE // max(n0 * item, 1))  # whole columns per read, when they are short
        for j in range(0, columns, per_read):
            if per_read > 1:
                k = min(per_read, columns - j)
                block = np.frombuffer(_read_exact(self.stream, k * n0 * item, self._short), dtype)
                out[j : j + k] = block.reshape(k, n0)[:, start : start + count]
                continue
            _skip(self.stream, start * item, self._short)
            out[j] = np.frombuffer(_read_exact(self.stream, count * item, self._short), dtype)
            _skip(self.stream, (n0 - start - count) * item, self._short)
        # column j holds element (r, *idx) at [j, r], j running over idx in Fortran order
        return out.T.reshape((count, *shape[1:]), order="F")

    def _short(self) -> DataError:
        return DataError(f"{self.where} ends before the {self.header.shape[0]:,} rows its header declares")


_PIECE = 1 << 20  # bytes decompressed per read
_WINDOW_BYTES = 32 << 20  # rows of a Fortran-ordered .npz member held at once (at least one block)


def _read_exact(stream, n: int, short: Callable[[], DataError]) -> bytearray:
    """``n`` bytes of ``stream``, read in pieces (a forged size fails at the end of
    the data, not in malloc); ``short()`` is raised where the data ends first."""
    data = bytearray()
    while len(data) < n:
        try:
            piece = stream.read(min(n - len(data), _PIECE))
        except EOFError:  # the archive ends before the entry's declared size
            piece = b""
        if not piece:
            raise short()
        data += piece
    return data


def _skip(stream, n: int, short: Callable[[], DataError]) -> None:
    """Reads past ``n`` bytes of ``stream``, holding one piece at a time."""
    while n > 0:
        n -= len(_read_exact(stream, min(n, _PIECE), short))


def read_npz(file: Path, inputs, config: DataConfig) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of rows of the arrays of an .npz file, decompressed as they are read."""
    with open_data_file(file) as fh, _reading(file), zipfile.ZipFile(fh) as archive:
        members = {i.filename.removesuffix(".npy"): i for i in archive.infolist() if not i.is_dir()}
        keys = {s.name: s.name for s in inputs if s.name in members}
        if len(inputs) == 1 and not keys and len(members) == 1:
            keys = {inputs[0].name: next(iter(members))}  # one unnamed array, one input
        missing = [s.name for s in inputs if s.name not in keys and s.name not in ZERO_FILLED]
        if missing or not keys:
            name = missing[0] if missing else inputs[0].name
            raise DataError(f"{file} has no array {name!r} (it holds {sorted(members)}; "
                            f"the model expects {', '.join(s.describe() for s in inputs)})")
        arrays = {name: _MemberRows(archive, members[key], f"{file} [{key}]", config.max_samples)
                  for name, key in keys.items()}
        specs = {s.name: s for s in inputs}
        for name, member in arrays.items():
            fit(file, specs[name], member.header.like())
        lengths = {k: m.header.shape[0] for k, m in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{file}: arrays hold different numbers of samples {lengths}")
        total, rows = next(iter(lengths.values())), _block_rows(config)
        total = min(total, config.max_samples or total)  # never a row past what the run asks
        for start in range(0, total, rows):
            chunk = {name: m.read(min(rows, total - start)) for name, m in arrays.items()}
            for spec in inputs:
                if spec.name not in chunk:  # zero-filled, shaped like the first token input
                    like = next(iter(chunk.values()))
                    chunk[spec.name] = np.zeros(like.shape, dtype=spec.dtype)
            yield chunk


#: Bytes the compressed members of an .npz file loaded whole (training data) may declare in all:
#: a few hundred bytes of deflate can declare a gigabyte of zeros. Stored members (``np.savez``)
#: cost what the file holds, and are not counted.
MAX_INFLATED_BYTES = 1 << 30


def load_npz(file: str | os.PathLike, max_inflated: int | None = None) -> dict[str, np.ndarray]:
    """Every array of the .npz ``file``, read whole (training data); DataError naming the file otherwise.

    Every member's .npy header is read and checked first (no object arrays, data
    within the member's declared size), and compressed members declaring more than
    ``max_inflated`` (:data:`MAX_INFLATED_BYTES`) bytes in all are refused before any is
    decompressed; each member is then read in pieces, so a size the archive forges
    fails where its data ends.
    """
    file = Path(file)
    max_inflated = MAX_INFLATED_BYTES if max_inflated is None else max_inflated
    with open_data_file(file) as fh, _reading(file), zipfile.ZipFile(fh) as archive:
        members = [i for i in archive.infolist() if not i.is_dir()]
        headers = []
        for info in members:
            with archive.open(info) as stream:
                headers.append(_npy_header(stream, f"{file} [{info.filename}]", info.file_size))
        inflated = sum(i.file_size for i in members if i.compress_type != zipfile.ZIP_STORED)
        if inflated > max_inflated:
            raise DataError(f"{file}: its compressed arrays declare {inflated:,} bytes, over the limit of "
                            f"{max_inflated:,} for data read whole; save larger arrays uncompressed (np.savez)")
        arrays = {}
        for info, header in zip(members, headers):
            def short(info=info):
                return DataError(f"{file} [{info.filename}] ends before the data its header declares")

            with archive.open(info) as stream:
                _skip(stream, header.offset, short)
                data = _read_exact(stream, math.prod(header.shape) * header.dtype.itemsize, short)
            array = np.frombuffer(data, header.dtype).reshape(header.shape, order="F" if header.fortran else "C")
            native = header.dtype.newbyteorder("=")  # torch takes native byte order only
            arrays[info.filename.removesuffix(".npy")] = array if header.dtype == native else array.astype(native)
        return arrays


def fit(file: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    """``array`` if it fits ``spec`` (cast later, per batch), else a DataError saying what fits."""
    expects = f"the model expects {spec.describe()}"
    if array.ndim != len(spec.shape):
        raise DataError(f"{file}: {spec.name} has shape {list(array.shape)}, {expects}")
    for got, want in zip(array.shape[1:], spec.shape[1:]):
        if isinstance(want, int) and got != want:
            raise DataError(f"{file}: {spec.name} has shape {list(array.shape)}, {expects}")
    src, dst = array.dtype, spec.dtype
    ok = np.can_cast(src, dst, casting="same_kind") or (
        src.kind in "biu" and dst.kind in "fiu"
    )
    if not ok:
        raise DataError(f"{file}: {spec.name} holds {src.name}, {expects}")
    return array
