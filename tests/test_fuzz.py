"""Fuzzing the untrusted inputs: ONNX files, stats files and mask files.

Each example mutates a valid file (bytes flipped, cut or spliced; or a field set
to a hostile value: an external-data location outside the model's folder, a bad
offset, forged dims, a forged tensor or metadata entry) and runs the CLI on it.
The only acceptable outcomes: exit 0 with a valid output file, or exit 1 with
exactly one ``Error:`` line and no output file. Never a traceback, never a
file outside the working folder touched, never a read of one that succeeds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from _cli import assert_one_error, invoke
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fps_onnx.selection.maskfile import MaskFile  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

IN, HID, OUT = 32, 40, 16  # W1 is 5 KiB: large enough to be referenced in place


# --------------------------------------------------------------------------- fixtures


def _model() -> onnx.ModelProto:
    r = np.random.default_rng(0)
    w1 = r.standard_normal((IN, HID)).astype(np.float32)
    w2 = r.standard_normal((OUT, HID)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class Sandbox:
    """root/work holds the model, data and outputs; root/outside must never change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.work = root / "work"
        self.outside = root / "outside"
        self.work.mkdir()
        self.outside.mkdir()
        secret = np.full(IN * HID * 4, 1e30, np.float32)
        secret.tofile(self.outside / "secret.bin")
        os.symlink(self.outside / "secret.bin", self.work / "link_out.bin")
        data = np.random.default_rng(1).standard_normal((12, IN)).astype(np.float32)
        np.save(self.work / "x.npy", data)
        self.model = self.work / "model.onnx"
        onnx.save(_model(), self.model)
        ext = _model()
        onnx.save(ext, self.work / "ext.onnx", save_as_external_data=True,
                  all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
        self.ext = self.work / "ext.onnx"
        self.outside_state = self._state(self.outside)
        self.root_entries = sorted(os.listdir(self.root))

    @staticmethod
    def _state(folder: Path) -> dict:
        state = {}
        for path in sorted(folder.rglob("*")):
            st_ = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            state[str(path)] = (st_.st_size, st_.st_mtime_ns, digest)
        return state

    def check_untouched(self) -> None:
        assert self._state(self.outside) == self.outside_state
        assert sorted(os.listdir(self.root)) == self.root_entries


def _assert_clean(result, out: Path, valid) -> None:
    """Either a valid output or the one-line refusal with no output; never a leftover temporary file."""
    if result.exit_code == 0:
        assert "Traceback" not in result.output, result.output
        assert out.is_file(), result.output
        valid(out)
    else:
        assert_one_error(result, alone=False, absent=[out])
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left"


def _valid_masks(path: Path) -> None:
    masks = MaskFile.load(path)
    assert masks.masks and all(m.dtype == bool for m in masks.masks.values())


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    return Sandbox(tmp_path_factory.mktemp("fuzz"))


def _fresh_out(box: Sandbox, name: str) -> Path:
    out = box.work / name
    if out.exists():
        out.unlink()
    return out


# --------------------------------------------------------------------------- ONNX files

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("splice"), st.integers(0, 10**9), st.binary(min_size=1, max_size=16)),
)


def _mutate_bytes(blob: bytes, mutations) -> bytes:
    data = bytearray(blob)
    for kind, pos, arg in mutations:
        if not data:
            break
        pos %= len(data)
        if kind == "flip":
            data[pos] ^= arg
        elif kind == "cut":
            del data[pos:]
        else:
            data[pos:pos] = arg
    return bytes(data)


@FUZZ
@given(mutations=st.lists(_mutation, min_size=1, max_size=4),
       method=st.sampled_from(["fps", "magnitude"]))
def test_mutated_onnx_bytes(box, mutations, method):
    target = box.work / "mutated.onnx"
    target.write_bytes(_mutate_bytes(box.model.read_bytes(), mutations))
    out = _fresh_out(box, "m_bytes.safetensors")
    _assert_clean(invoke("select", target, box.work / "x.npy", "-o", out, "--method", method, "-q"),
                  out, _valid_masks)
    box.check_untouched()


_HOSTILE_LOCATIONS = ["../outside/secret.bin", "{outside}/secret.bin", "link_out.bin", "..", ".",
                      "/dev/zero", "missing.bin", "ext.data", "x.npy", "", "sub/../ext.data",
                      "ext.data/..", "\x00", "model.onnx"]
_NUMBERS = st.one_of(st.integers(-2**70, 2**70).map(str),
                     st.sampled_from(["abc", "-8", "1.5", "", " 4", "0x10", "1e3"]))


@FUZZ
@given(location=st.one_of(st.sampled_from(_HOSTILE_LOCATIONS), st.text(max_size=12)),
       offset=st.one_of(st.none(), _NUMBERS), length=st.one_of(st.none(), _NUMBERS),
       dims=st.one_of(st.none(), st.lists(st.integers(-2, 2**40), min_size=0, max_size=3)),
       which=st.sampled_from(["w1", "w2"]), method=st.sampled_from(["fps", "magnitude"]))
def test_hostile_external_data(box, location, offset, length, dims, which, method):
    model = onnx.load(str(box.ext), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == which)
    location = location.replace("{outside}", str(box.outside))
    info = {e.key: e.value for e in tensor.external_data}
    info["location"] = location
    for key, value in (("offset", offset), ("length", length)):
        if value is not None:
            info[key] = value
    del tensor.external_data[:]
    for key, value in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    if dims is not None:
        del tensor.dims[:]
        tensor.dims.extend(dims)
    target = box.work / "hostile.onnx"
    target.write_bytes(model.SerializeToString())
    out = _fresh_out(box, "m_ext.safetensors")
    result = invoke("select", target, box.work / "x.npy", "-o", out, "--method", method, "-q")
    _assert_clean(result, out, _valid_masks)
    inside = False
    if location and "\0" not in location and not os.path.isabs(location):
        resolved = os.path.realpath(box.work / location)
        inside = resolved.startswith(str(box.work.resolve()) + os.sep) and os.path.isfile(resolved)
    if not inside:
        assert result.exit_code == 1, f"selected with external data at {location!r}: {result.output}"
    box.check_untouched()


# --------------------------------------------------------------------------- stats files


@pytest.fixture(scope="module")
def valid_stats(box):
    stats = box.work / "stats.safetensors"
    result = invoke("select", box.model, box.work / "x.npy", "-o", box.work / "base.safetensors",
                    "--stats-out", stats, "-q")
    assert result.exit_code == 0 and stats.is_file(), result.output
    return stats


def _reload(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


_ARRAY_EDIT = st.one_of(
    st.tuples(st.just("value"), st.sampled_from([-1.0, np.nan, np.inf, 0.0, 1e300, -0.0])),
    st.tuples(st.just("shape"), st.integers(0, 3)),
    st.tuples(st.just("dtype"), st.sampled_from(["float32", "int64", "bool", "float16", "int8"])),
    st.tuples(st.just("drop"), st.just(None)),
    st.tuples(st.just("rename"), st.text(min_size=1, max_size=8)),
)
_META_VALUE = st.one_of(st.text(max_size=10), st.integers(-5, 10**20).map(str),
                        st.sampled_from(["[]", "{}", '{"w1": 5}', "null", '{"w1": {"shape": "x"}}', "99"]))


def _edit_arrays(arrays: dict, edits, key_index: int) -> dict:
    arrays = dict(arrays)
    keys = sorted(arrays)
    for kind, arg in edits:
        if not keys:
            break
        key = keys[key_index % len(keys)]
        if key not in arrays:
            continue
        value = arrays[key]
        if kind == "value":
            value = value.astype(np.float64) if value.dtype != np.float64 else value.copy()
            if value.size:
                value.reshape(-1)[0] = arg
            arrays[key] = value.astype(arrays[key].dtype) if arrays[key].dtype != bool else value != 0
        elif kind == "shape":
            arrays[key] = np.resize(value, (arg,) if arg != 3 else (2, 2))
        elif kind == "dtype":
            arrays[key] = value.astype(arg)
        elif kind == "drop":
            del arrays[key]
        else:
            arrays[arg] = arrays.pop(key)
    return arrays


def _save(path: Path, arrays: dict, meta: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=meta)


def _forge(valid: Path, target: Path, edits, key_index: int, meta_edits: dict, flips) -> Path:
    """``valid`` with its arrays and metadata edited, saved as ``target``, then its bytes flipped."""
    arrays, meta = _reload(valid)
    _save(target, _edit_arrays(arrays, edits, key_index), {**meta, **meta_edits})
    if flips:
        target.write_bytes(_mutate_bytes(target.read_bytes(), flips))
    return target


@FUZZ
@given(edits=st.lists(_ARRAY_EDIT, max_size=3), key_index=st.integers(0, 20),
       meta_edits=st.dictionaries(st.sampled_from(["format", "format_version", "model_sha256",
                                                   "num_samples", "extra"]), _META_VALUE, max_size=2),
       flips=st.lists(_mutation, max_size=1), norm=st.sampled_from(["l1", "l2"]))
def test_forged_stats(box, valid_stats, edits, key_index, meta_edits, flips, norm):
    target = _forge(valid_stats, box.work / "forged_stats.safetensors", edits, key_index, meta_edits, flips)
    out = _fresh_out(box, "m_stats.safetensors")
    _assert_clean(invoke("select", box.model, "--from-stats", target, "-o", out, "--norm", norm, "-q"),
                  out, _valid_masks)
    box.check_untouched()


# --------------------------------------------------------------------------- mask files


@pytest.fixture(scope="module")
def torch_spec(box):
    """A PyTorch twin of the fuzzed model, as a SPEC `file.py:build`."""
    pytest.importorskip("torch")
    weights = {t.name: numpy_helper.to_array(t) for t in _model().graph.initializer}
    np.savez(box.work / "twin.npz", **weights)
    source = f'''
import numpy as np
import torch


def build():
    w = np.load({str(box.work / "twin.npz")!r})
    model = torch.nn.Sequential(torch.nn.Linear({IN}, {HID}, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear({HID}, {OUT}, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w["w1"].T.copy()))
        model[2].weight.copy_(torch.from_numpy(w["w2"]))
    return model, {{"x": torch.zeros(2, {IN})}}
'''
    path = box.work / "twin.py"
    path.write_text(source)
    return f"{path}:build"


@pytest.fixture(scope="module")
def valid_masks(box):
    masks = box.work / "valid_masks.safetensors"
    result = invoke("select", box.model, box.work / "x.npy", "-o", masks, "-q")
    assert result.exit_code == 0 and masks.is_file(), result.output
    return masks


@FUZZ
@given(edits=st.lists(_ARRAY_EDIT, max_size=3), key_index=st.integers(0, 20),
       meta_edits=st.dictionaries(st.sampled_from(["format", "format_version", "tensors", "model_sha256",
                                                   "budget", "extra"]), _META_VALUE, max_size=2),
       flips=st.lists(_mutation, max_size=1))
def test_forged_masks(box, valid_masks, torch_spec, edits, key_index, meta_edits, flips):
    target = _forge(valid_masks, box.work / "forged_masks.safetensors", edits, key_index, meta_edits, flips)
    out = _fresh_out(box, "m_mapped.safetensors")
    _assert_clean(invoke("map", target, "--model", torch_spec, "--onnx", box.model, "-o", out, "-q"),
                  out, _valid_masks)
    box.check_untouched()

