"""Safe file I/O, the public names: outputs written atomically and all or none, paths
checked before any work, untrusted input files opened only when regular.

The functions live in :mod:`fps_onnx._io`, which the library's modules import;
this module is their stable public name, for the command line and for library
users who write the same files the same way.
"""

from __future__ import annotations

from ._io import (
    Outputs,
    atomic_folder,
    atomic_write,
    check_clashes,
    check_folder,
    check_writable,
    open_regular,
    transaction,
)

__all__ = [
    "Outputs",
    "atomic_folder",
    "atomic_write",
    "check_clashes",
    "check_folder",
    "check_writable",
    "open_regular",
    "transaction",
]
