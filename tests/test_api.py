"""The public API of ``fps_onnx`` and the old module paths that keep working for one release
(relayer: keep - the old names below must stay old)."""

from __future__ import annotations

import json
import subprocess
import sys

import fps_onnx

HEAVY = ("torch", "onnxruntime", "transformers")


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_the_package_and_the_cli_loads_no_heavy_dependency():
    got = _run("import json, sys, fps_onnx; a = sorted(sys.modules); import fps_onnx.cli.main; "
               "print(json.dumps([a, sorted(sys.modules)]))")
    for loaded in got:
        assert not [m for m in loaded if m.split(".")[0] in HEAVY]
    assert "fps_onnx.cli.main" in got[1] and "fps_onnx.pipeline" not in got[0]


def test_the_stable_names_resolve_to_their_modules():
    from fps_onnx.pipeline import run_select
    from fps_onnx.selection.maskfile import MaskFile, load_masks, save_masks
    from fps_onnx.selection.score import SelectConfig
    from fps_onnx.stats import Stats

    assert fps_onnx.run_select is run_select and fps_onnx.SelectConfig is SelectConfig
    assert (fps_onnx.MaskFile, fps_onnx.load_masks, fps_onnx.save_masks) == (MaskFile, load_masks, save_masks)
    assert fps_onnx.Stats is Stats
    assert set(fps_onnx.__all__) == {"__version__", "run_select", "SelectConfig", "MaskFile", "load_masks",
                                     "save_masks", "Stats", "prepare", "scale_steps", "merge", "export",
                                     "map_masks"}
    assert fps_onnx.__version__ == "0.1.0"


def test_the_torch_names_resolve_to_their_modules():
    from fps_onnx.torch.export import export
    from fps_onnx.torch.mapping import map_masks
    from fps_onnx.torch.train.loop import prepare, scale_steps
    from fps_onnx.torch.train.sparse import merge

    assert (fps_onnx.prepare, fps_onnx.scale_steps, fps_onnx.merge, fps_onnx.export, fps_onnx.map_masks) == (
        prepare, scale_steps, merge, export, map_masks)


def test_save_and_load_masks_round_trip(tmp_path):
    import numpy as np

    masks = fps_onnx.MaskFile({"w": np.array([[True, False]])}, {"w": {"op": "MatMul"}})
    fps_onnx.save_masks(masks, tmp_path / "m.safetensors")
    back = fps_onnx.load_masks(tmp_path / "m.safetensors")
    assert back.masks["w"].tolist() == [[True, False]] and back.tensors["w"]["op"] == "MatMul"


def test_an_unknown_name_is_an_attribute_error():
    try:
        fps_onnx.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("no AttributeError")


OLD = {
    "fps_onnx.train": "fps_onnx.torch.train",
    "fps_onnx.train.recipe": "fps_onnx.torch.train.recipe",
    "fps_onnx.mapping": "fps_onnx.torch.mapping",
    "fps_onnx.select": "fps_onnx.selection.score",
    "fps_onnx.maskfile": "fps_onnx.selection.maskfile",
    "fps_onnx.graph": "fps_onnx.onnx.graph",
    "fps_onnx.text": "fps_onnx.data.text",
}


def test_old_module_paths_are_the_new_modules_and_warn_once():
    code = f"""
import importlib, json, warnings
old = {OLD!r}
out = {{}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, new in old.items():
        first = importlib.import_module(name)
        again = importlib.import_module(name)
        out[name] = [first is importlib.import_module(new) is again, first.__name__, first.__spec__.name]
    from fps_onnx.calibrate import load_model
    from fps_onnx.maskfile import MaskFile
out["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
print(json.dumps(out))
"""
    got = _run(code)
    for name, new in OLD.items():
        assert got[name] == [True, new, new], name
    warned = [message for category, message in got["warnings"] if category == "DeprecationWarning"]
    assert warned == [f"{name} is deprecated: import {new}" for name, new in OLD.items()] + [
        "fps_onnx.calibrate.load_model moved to fps_onnx.onnx.load.load_model"]


def _cli_imports() -> list[tuple[str, str]]:
    """(module, name) of every ``from fps_onnx... import name`` in the command line's modules."""
    import ast
    from pathlib import Path

    found = []
    for path in (Path(fps_onnx.__file__).parent / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fps_onnx"):
                found += [(node.module, alias.name) for alias in node.names]
    return found


def test_the_cli_imports_public_names_only():
    import importlib
    import importlib.util

    found = _cli_imports()
    assert ("fps_onnx.fileio", "check_writable") in found  # the walk sees the CLI's imports
    private = [(m, n) for m, n in found
               if n.startswith("_") and n != "__version__" or any(p.startswith("_") for p in m.split("."))]
    assert private == []
    for module, name in found:
        imported = importlib.import_module(module)
        listed = getattr(imported, "__all__", None)
        submodule = hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
        assert listed is None or name in listed or submodule, (module, name)


def test_the_public_io_names_are_those_of_the_io_module():
    from fps_onnx import _io, fileio

    assert fileio.__all__ and all(getattr(fileio, n) is getattr(_io, n) for n in fileio.__all__)
