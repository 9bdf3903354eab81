"""Old module paths, importable for one release (relayer: keep).

``import fps_onnx.train`` (or ``fps_onnx.select``, ``fps_onnx.mapping`` ...) gives the module
at its new place, the very same object, and warns once (DeprecationWarning) per old name.
A finder on ``sys.meta_path`` does it, so the package tree holds no shim files and a
submodule of a moved package (``fps_onnx.train.loop``) is imported only when asked for.

Not covered: ``fps_onnx.export`` is now the public function (:func:`fps_onnx.torch.export.export`);
the module it named is ``fps_onnx.torch.export``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module (or package) -> where it lives now
MOVED = {
    "fps_onnx.graph": "fps_onnx.onnx.graph",
    "fps_onnx.ops": "fps_onnx.onnx.ops",
    "fps_onnx.external": "fps_onnx.onnx.external",
    "fps_onnx.decoder": "fps_onnx.onnx.decoder",
    "fps_onnx.scope": "fps_onnx.onnx.scope",
    "fps_onnx.text": "fps_onnx.data.text",
    "fps_onnx.select": "fps_onnx.selection.score",
    "fps_onnx.maskfile": "fps_onnx.selection.maskfile",
    "fps_onnx.models": "fps_onnx.torch.models",
    "fps_onnx.mapping": "fps_onnx.torch.mapping",
    "fps_onnx.gps": "fps_onnx.torch.gps",
    "fps_onnx.train": "fps_onnx.torch.train",
}

_warned: set[str] = set()


def new_name(old: str) -> str | None:
    """Where the old module ``old`` lives now (a submodule of a moved package included), or None."""
    for before, after in MOVED.items():
        if old == before or old.startswith(before + "."):
            return after + old[len(before):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        if spec.name not in _warned:
            _warned.add(spec.name)
            warnings.warn(f"{spec.name} is deprecated: import {self.target}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system sets the alias spec on the module: put it back
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        moved = new_name(fullname)
        if moved is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(moved))


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
