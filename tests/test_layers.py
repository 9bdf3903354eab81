"""The package's layers: every module has one, and every import points down (relayer: keep).

Layers, bottom up; a module may import its own layer and those below, never above, and no
set of modules may import each other in a circle (even within a layer). A folder's entry
covers the modules in it; a new top-level module needs a row here.
"""

from __future__ import annotations

from pathlib import Path
import textwrap

import pytest

from _layering import layer_of, modules, problems

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    # 0 base: errors, safe file I/O, the version
    "fps_onnx.errors": 0,
    "fps_onnx._io": 0,
    "fps_onnx.fileio": 0,
    "fps_onnx._version": 0,
    "fps_onnx._limits": 0,
    # 1 ONNX: loading, external data, site types, op rules, the statistics rewrite, decoder, scope
    "fps_onnx.onnx": 1,
    # 2 data readers: arrays, images, text
    "fps_onnx.data": 2,
    # 3 calibration: the ORT session and loop, the statistics file and its checkpoint, providers
    "fps_onnx.calibrate": 3,
    "fps_onnx.stats": 3,
    "fps_onnx.checkpoint": 3,
    "fps_onnx.providers": 3,
    # 4 selection: scores and top-k, the mask file
    "fps_onnx.selection": 4,
    # 5 reports on stats and masks
    "fps_onnx.report": 5,
    # 6 the PyTorch side (models, export, mapping, training, GPS) and other frameworks
    "fps_onnx.torch": 6,
    "fps_onnx.integrations": 6,
    # 7 workflows
    "fps_onnx.pipeline": 7,
    # 8 the public API and the old import paths
    "fps_onnx": 8,
    "fps_onnx._moved": 8,
    # 9 the command line
    "fps_onnx.cli": 9,
}


def test_every_module_has_a_layer_and_imports_point_down():
    assert problems(ROOT, "fps_onnx", LAYERS) == []


def test_the_table_covers_the_layer_folders():
    found = modules(ROOT, "fps_onnx")
    assert layer_of("fps_onnx.onnx.graph", LAYERS) == 1 and layer_of("fps_onnx.torch.train.loop", LAYERS) == 6
    assert layer_of("fps_onnx", LAYERS) == 8 and layer_of("fps_onnx.cli.main", LAYERS) == 9
    assert {layer_of(name, LAYERS) for name in found} == set(range(10))


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


FAKE_LAYERS = {"pkg": 2, "pkg.low": 0, "pkg.mid": 1, "pkg.sub": 1}


@pytest.mark.parametrize("importer, text, expected", [
    ("low.py", "def f():\n    from .mid import x\n", "pkg.low (layer 0) imports pkg.mid (layer 1)"),
    ("low.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import a\n",
     "pkg.low (layer 0) imports pkg.sub.a (layer 1)"),
    ("sub/a.py", "from .. import version\n", "pkg.sub.a (layer 1) imports pkg (layer 2)"),
    ("mid.py", "import pkg.sub.a\nfrom . import low\n", None),
])
def test_the_check_finds_an_upward_import_anywhere(tmp_path, importer, text, expected):
    files = {"__init__.py": "version = 1\n", "low.py": "", "mid.py": "x = 1\n", "sub/__init__.py": "",
             "sub/a.py": ""}
    root = _package(tmp_path, {**files, importer: text})
    assert problems(root, "pkg", FAKE_LAYERS) == ([expected] if expected else [])


def test_the_check_finds_a_cycle_within_a_layer_and_a_module_without_a_layer(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "low.py": "", "mid.py": "from .sub import a\n",
                               "sub/__init__.py": "", "sub/a.py": "def f():\n    import pkg.mid\n",
                               "new.py": "from . import low\n"})
    assert problems(root, "pkg", FAKE_LAYERS) == ["pkg.new has no layer", "import cycle: pkg.mid -> pkg.sub.a"]
    assert problems(root, "pkg", {**FAKE_LAYERS, "pkg.new": 1}) == ["import cycle: pkg.mid -> pkg.sub.a"]
