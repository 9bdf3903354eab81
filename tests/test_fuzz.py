"""Fuzzing the untrusted inputs: ONNX files, stats, mask and delta files, names.

Each example mutates a valid file (bytes flipped, cut or spliced; a field set
to a hostile value: an external-data location outside the model's folder, a bad
offset, forged dims, a forged tensor or metadata entry; a graph rewired into a
cycle, nodes reordered, inputs dropped, dims zeroed or mismatched, a bad Conv
group; metadata JSON nested deep, made huge, given out-of-range numbers or
missing and extra keys; names holding newlines and control characters) and runs
the CLI on it, in this process or, for some, in a real one under a memory limit.
The only acceptable outcomes: exit 0 with a valid output file, or exit 1 with
exactly one ``Error:`` line (not an unexpected error) and no output file; within
a time bound; nothing left in the working folder but the inputs and (on exit 0)
the outputs; never a file outside the working folder touched, never a read of
one that succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from _cli import invoke  # noqa: E402
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


def _run(*args) -> tuple[int, str, BaseException | None]:
    result = invoke(*args)
    return result.exit_code, result.output, result.exception


def _assert_clean(code: int, output: str, exc, out: Path, valid) -> None:
    assert "Traceback" not in output, output
    assert "a bug in fps-onnx" not in output, output
    if code == 0:
        assert out.is_file(), output
        valid(out)
    else:
        assert code == 1, (code, output, exc)
        assert isinstance(exc, SystemExit), repr(exc)
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, output
        assert not out.exists(), output
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left"


def _valid_masks(path: Path) -> None:
    masks = MaskFile.load(path)
    assert len(masks) and all(masks.dense(k).dtype == bool and masks.count(k) == masks.dense(k).sum()
                              for k in masks.keys())


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
    code, output, exc = _run("select", target, box.work / "x.npy", "-o", out, "--method", method, "-q")
    _assert_clean(code, output, exc, out, _valid_masks)
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
    code, output, exc = _run("select", target, box.work / "x.npy", "-o", out, "--method", method, "-q")
    _assert_clean(code, output, exc, out, _valid_masks)
    inside = False
    if location and "\0" not in location and not os.path.isabs(location):
        resolved = os.path.realpath(box.work / location)
        inside = resolved.startswith(str(box.work.resolve()) + os.sep) and os.path.isfile(resolved)
    if not inside:
        assert code == 1, f"selected with external data at {location!r}: {output}"
    box.check_untouched()


# --------------------------------------------------------------------------- stats files


@pytest.fixture(scope="module")
def valid_stats(box):
    stats = box.work / "stats.safetensors"
    code, output, _ = _run("select", box.model, box.work / "x.npy", "-o", box.work / "base.safetensors",
                           "--stats-out", stats, "-q")
    assert code == 0, output
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
    st.tuples(st.just("reverse"), st.just(None)),  # index order (and any array's) turned around
    st.tuples(st.just("repeat"), st.just(None)),  # an index (or a value) given twice
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
        elif kind == "reverse":
            arrays[key] = value.reshape(-1)[::-1].reshape(value.shape)
        elif kind == "repeat":
            value = value.copy()
            if value.size > 1:
                value.reshape(-1)[1] = value.reshape(-1)[0]
            arrays[key] = value
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
    code, output, exc = _run("select", box.model, "--from-stats", target, "-o", out, "--norm", norm, "-q")
    _assert_clean(code, output, exc, out, _valid_masks)
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


@pytest.fixture(scope="module", params=["v1", "v2"])
def valid_masks(box, request):
    """A valid mask file of each format version (v2: per-row positions, and flat indices of
    a weight whose rows differ in count)."""
    masks = box.work / f"valid_masks_{request.param}.safetensors"
    code, output, _ = _run("select", box.model, box.work / "x.npy", "-o", masks, "-q",
                           "--mask-format", request.param)
    assert code == 0, output
    if request.param == "v2":
        loaded = MaskFile.load(masks)
        key = loaded.keys()[0]
        dense = loaded.dense(key)
        dense.reshape(-1)[np.flatnonzero(~dense.reshape(-1))[0]] = True  # one row holds one more
        MaskFile({**{k: loaded.dense(k) for k in loaded.keys()}, key: dense}, loaded.tensors,
                 loaded.meta).save(masks)
        assert {e["encoding"] for e in MaskFile.load(masks).tensors.values()} == {"rows", "flat"}
    return masks


@FUZZ
@given(edits=st.lists(_ARRAY_EDIT, max_size=3), key_index=st.integers(0, 20),
       meta_edits=st.dictionaries(st.sampled_from(["format", "format_version", "tensors", "model_sha256",
                                                   "budget", "extra"]), _META_VALUE, max_size=2),
       flips=st.lists(_mutation, max_size=1))
def test_forged_masks(box, valid_masks, torch_spec, edits, key_index, meta_edits, flips):
    target = _forge(valid_masks, box.work / "forged_masks.safetensors", edits, key_index, meta_edits, flips)
    out = _fresh_out(box, "m_mapped.safetensors")
    code, output, exc = _run("map", target, "--model", torch_spec, "--onnx", box.model, "-o", out, "-q")
    _assert_clean(code, output, exc, out, _valid_masks)
    box.check_untouched()



# --------------------------------------------------------------------------- bounds and a fresh folder per example

LIMIT_S = 20  # seconds one run may take
LIMIT_AS = 4 << 30  # address space of a real process (RLIMIT_AS)
LIMIT_RSS = 3 << 30  # peak resident memory of this process (in-process runs)
SENTINEL = b"SENTINEL-outside-the-work-folder"
_CLI = "import sys; from fps_onnx.cli.main import main; sys.argv[0] = 'fps-onnx'; main()"


def _address_limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def _run_process(*args, cwd: Path) -> tuple[int, str, str]:
    """The CLI in a real process under RLIMIT_AS: (exit status, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CLI, *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_address_limit)
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"fps-onnx {' '.join(map(str, args))[:300]} ran past {LIMIT_S} s")
    return proc.returncode, out, err


def _run_bounded(*args) -> tuple[int, str, BaseException | None]:
    """The CLI in this process: it must end within LIMIT_S, the process's peak within LIMIT_RSS."""
    start = time.monotonic()
    code, output, exc = _run(*args)
    assert time.monotonic() - start < LIMIT_S, f"ran past {LIMIT_S} s: {args}"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < LIMIT_RSS
    return code, output, exc


def _assert_one_line(code: int, err: str) -> None:
    """A real process's stderr: nothing on success (-q), else exactly one ``Error:`` line."""
    assert "Traceback" not in err and "a bug in fps-onnx" not in err, err
    if code == 0:
        assert "Error:" not in err, err
        return
    assert code == 1, (code, err)
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("Error: "), repr(err)
    for forged in ("\r", "\x1b", "\u2028", "\u2029", "\x00", "\x85"):
        assert forged not in err, repr(err)


class Case:
    """A fresh folder inside the sandbox's work folder for one example; on leaving, it must
    hold the inputs and (on exit 0) the outputs only, and no byte of the sentinel outside."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.dir = Path(tempfile.mkdtemp(dir=box.work, prefix="case"))

    def inputs(self) -> set[str]:
        return set(os.listdir(self.dir))

    def finish(self, code: int, inputs: set[str], outputs: set[str], texts: tuple[str, ...] = ()) -> None:
        try:
            left = set(os.listdir(self.dir))
            assert left == (inputs | outputs if code == 0 else inputs), (code, sorted(left))
            for path in self.dir.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    assert SENTINEL not in path.read_bytes(), f"{path} holds a file read from outside"
            assert not any(SENTINEL.decode() in t for t in texts), "a message shows a file from outside"
            self.box.check_untouched()
        finally:
            shutil.rmtree(self.dir)


@pytest.fixture(scope="module")
def sentinel(box):
    path = box.outside / "sentinel.txt"
    if not path.exists():
        path.write_bytes(SENTINEL + b"\n")
        box.outside_state = box._state(box.outside)
    return path


# --------------------------------------------------------------------------- graph mutations

C_IN, C_OUT, GROUP, SIDE = 4, 8, 2, 6


def _graph_model() -> onnx.ModelProto:
    """x [N, 4, 6, 6] -> Conv(group 2) -> Relu -> GlobalAveragePool -> Flatten -> MatMul -> Identity -> Gemm."""
    r = np.random.default_rng(2)
    weights = {"wc": r.standard_normal((C_OUT, C_IN // GROUP, 3, 3)).astype(np.float32),
               "w1": r.standard_normal((C_OUT, 10)).astype(np.float32),
               "w2": r.standard_normal((6, 10)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "wc"], ["c"], group=GROUP, name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flat"),
         helper.make_node("MatMul", ["f", "w1"], ["h"], name="mm"),
         helper.make_node("Identity", ["h"], ["h2"], name="id"),
         helper.make_node("Gemm", ["h2", "w2"], ["y"], transB=1, name="gemm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


_GRAPH_EDIT = st.one_of(
    st.tuples(st.just("cycle"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("drop_input"), st.integers(0, 99), st.integers(0, 1)),
    st.tuples(st.just("zero_dim"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("dims"), st.integers(0, 99), st.lists(st.integers(0, 12), min_size=1, max_size=4)),
    st.tuples(st.just("group"), st.sampled_from([0, -1, 3, 4, 8, 2**31, 2**62]), st.just(0)),
    st.tuples(st.just("dup_output"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("input_dim"), st.integers(0, 3), st.sampled_from([0, 1, 5, 7])),
)


def _edit_graph(model: onnx.ModelProto, edits) -> onnx.ModelProto:
    nodes, inits = model.graph.node, model.graph.initializer
    for kind, a, b in edits:
        if kind == "cycle":  # an input of node i becomes an output of node j >= i (a later one, or its own)
            i = a % len(nodes)
            j = i + b % (len(nodes) - i)
            if nodes[i].input:
                nodes[i].input[0] = nodes[j].output[0]
        elif kind == "drop_input":
            node = nodes[a % len(nodes)]
            if node.input:
                if b:
                    node.input[-1] = ""
                else:
                    del node.input[-1]
        elif kind in ("zero_dim", "dims") and inits:
            k = a % len(inits)
            old = numpy_helper.to_array(inits[k])
            if kind == "zero_dim":
                dims = list(old.shape)
                dims[b % len(dims)] = 0
            else:
                dims = b
            inits[k].CopyFrom(numpy_helper.from_array(np.resize(old, dims).astype(old.dtype), inits[k].name))
        elif kind == "group":
            conv = next((n for n in nodes if n.op_type == "Conv"), None)
            if conv is not None:
                for attr in conv.attribute:
                    if attr.name == "group":
                        attr.i = a
        elif kind == "dup_output":
            nodes[b % len(nodes)].output[0] = nodes[a % len(nodes)].output[0]
        elif kind == "swap":
            i, j = a % len(nodes), b % len(nodes)
            first, second = onnx.NodeProto(), onnx.NodeProto()
            first.CopyFrom(nodes[i])
            second.CopyFrom(nodes[j])
            nodes[i].CopyFrom(second)
            nodes[j].CopyFrom(first)
        elif kind == "input_dim":
            dim = model.graph.input[0].type.tensor_type.shape.dim[a]
            dim.dim_value = b
    return model


def _graph_data(folder: Path) -> None:
    np.save(folder / "x.npy", np.random.default_rng(3).standard_normal((6, C_IN, SIDE, SIDE)).astype(np.float32))


@FUZZ
@given(edits=st.lists(_GRAPH_EDIT, min_size=1, max_size=3), method=st.sampled_from(["fps", "magnitude"]),
       process=st.sampled_from([False, False, False, True]))
def test_graph_mutations(box, sentinel, edits, method, process):
    case = Case(box)
    onnx.save(_edit_graph(_graph_model(), edits), case.dir / "model.onnx")
    _graph_data(case.dir)
    args = ("select", "model.onnx", "x.npy", "-o", "masks.safetensors", "--method", method, "-q")
    _run_in_case(case, args, {"masks.safetensors"}, process, _valid_masks)


def test_the_unmutated_graph_model_selects(box, sentinel):
    """The mutations start from a model that selects (so a refusal is the mutation's doing)."""
    case = Case(box)
    onnx.save(_graph_model(), case.dir / "model.onnx")
    _graph_data(case.dir)
    inputs, out = case.inputs(), case.dir / "masks.safetensors"
    code, _, err = _run_process("select", "model.onnx", "x.npy", "-o", out.name, "-q", cwd=case.dir)
    assert code == 0, err
    assert set(MaskFile.load(out).masks) == {"wc", "w1", "w2"}
    case.finish(code, inputs, {out.name})


# --------------------------------------------------------------------------- metadata mutations

_NUMBER_TEXTS = ["-1", "0", str(2**63 - 1), str(2**63), str(2**64), "7" * 5000, "-" + "9" * 41, "1.5", "1e3",
                 "-0", "1e999", "NaN", "Infinity", "2.5e-300"]
_META_EDIT = st.one_of(
    st.tuples(st.just("deep"), st.sampled_from([1, 99, 100, 101, 5000, 100_000]), st.sampled_from("[{(")),
    st.tuples(st.just("huge"), st.sampled_from(["values", "chars"]), st.just(0)),
    st.tuples(st.just("number"), st.sampled_from(_NUMBER_TEXTS), st.integers(0, 99)),
    st.tuples(st.just("drop_field"), st.integers(0, 99), st.just(0)),
    st.tuples(st.just("extra_field"), st.sampled_from(["extra", "shape", "selected", ""]), st.just(0)),
    st.tuples(st.just("raw"), st.sampled_from(["", "{}", "[]", "null", "true", '"x"', "{", "[1, 2]", "5/0",
                                               "0/1000001", "3/2", "1/" + "9" * 30, "abc"]), st.just(0)),
    st.tuples(st.just("drop"), st.just(0), st.just(0)),
)


def _leaves(value, path=()):
    """Paths of the number leaves (and, with them, of the objects) of a parsed JSON value."""
    if isinstance(value, dict):
        yield path, value
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, None


def _at(value, path):
    for step in path:
        value = value[step]
    return value


def _mutate_meta(text: str | None, edit) -> str | None:
    """``text`` (a metadata value) edited by ``edit``; None drops the entry."""
    kind, a, b = edit
    if kind == "drop":
        return None
    if kind == "deep":
        opening, closing = {"[": ("[", "]"), "{": ('{"a": ', "}"), "(": ("[", "")}[b]
        return opening * a + ("0" if b == "{" else "") + closing * a
    if kind == "huge":
        return "[" + "0," * 1_100_000 + "0]" if a == "values" else '"' + "x" * (17 << 20) + '"'
    if kind == "raw":
        return a
    try:
        parsed = json.loads(text) if text is not None else None
    except ValueError:
        parsed = None
    if kind == "number":
        if not isinstance(parsed, (dict, list)):
            return a  # a plain number entry (num_samples, batch_size, ...)
        numbers = [p for p, obj in _leaves(parsed) if obj is None and p]
        if not numbers:
            return a
        path = numbers[b % len(numbers)]
        _at(parsed, path[:-1])[path[-1]] = "\0NUMBER\0"
        return json.dumps(parsed).replace('"\\u0000NUMBER\\u0000"', a)
    objects = [obj for _, obj in _leaves(parsed) if obj is not None]
    if not objects:
        return text
    if kind == "drop_field":
        obj = objects[a % len(objects)]
        if obj:
            del obj[sorted(obj)[a % len(obj)]]
    else:
        objects[-1][a] = 1
    return json.dumps(parsed)


def _edit_meta(meta: dict, key: str, edits) -> dict:
    meta = dict(meta)
    value = meta.get(key)
    for edit in edits:
        value = _mutate_meta(value, edit)
        if value is None:
            break
    if value is None:
        meta.pop(key, None)
    else:
        meta[key] = value
    return meta


@pytest.fixture(scope="module")
def shard_stats(box):
    """Two shards' statistics of the sandbox model (merged by --from-stats)."""
    paths = []
    for k in (0, 1):
        path = box.work / f"shard{k}.safetensors"
        code, output, _ = _run("select", box.model, box.work / "x.npy", "-o", box.work / f"sm{k}.safetensors",
                               "--stats-out", path, "--shard", f"{k}/2", "--batch-size", "4", "-q")
        assert code == 0, output
        paths.append(path)
    return paths


@FUZZ
@given(key=st.sampled_from(["num_samples", "shard", "batch_size", "model_sha256", "format_version", "extra"]),
       edits=st.lists(_META_EDIT, min_size=1, max_size=2), both=st.booleans(),
       process=st.sampled_from([False, False, False, True]))
def test_stats_metadata_mutations(box, sentinel, shard_stats, key, edits, both, process):
    case = Case(box)
    shutil.copy(box.model, case.dir / "model.onnx")
    arrays, meta = _reload(shard_stats[0])
    _save(case.dir / "a.safetensors", arrays, _edit_meta(meta, key, edits))
    args = ["select", "model.onnx", "--from-stats", "a.safetensors", "-o", "masks.safetensors", "-q"]
    if both:
        shutil.copy(shard_stats[1], case.dir / "b.safetensors")
        args += ["--from-stats", "b.safetensors"]
    _run_in_case(case, args, {"masks.safetensors"}, process, _valid_masks)


def _run_in_case(case: Case, args, outputs: set[str], process: bool, valid=None) -> int:
    """Runs the CLI in ``case``'s folder (in a real process or this one) and checks every bound."""
    inputs = case.inputs()
    if process:
        code, stdout, err = _run_process(*args, cwd=case.dir)
        _assert_one_line(code, err)
        texts = (stdout, err)
    else:
        cwd = os.getcwd()
        os.chdir(case.dir)
        try:
            code, output, exc = _run_bounded(*args)
        finally:
            os.chdir(cwd)
        assert "Traceback" not in output and "a bug in fps-onnx" not in output, output
        if code != 0:
            assert code == 1 and isinstance(exc, SystemExit), (code, output, exc)
            assert [line for line in output.splitlines() if line.startswith("Error:")] == \
                [output.strip().splitlines()[-1]], output
        texts = (output,)
    if code == 0 and valid is not None:
        for name in outputs:
            valid(case.dir / name)
    case.finish(code, inputs, outputs, texts)
    return code


@FUZZ
@given(key=st.sampled_from(["tensors", "budget", "format", "format_version", "extra"]),
       edits=st.lists(_META_EDIT, min_size=1, max_size=2), process=st.sampled_from([False, False, False, True]))
def test_mask_metadata_mutations(box, sentinel, valid_masks, key, edits, process):
    case = Case(box)
    arrays, meta = _reload(valid_masks)
    meta.setdefault("budget", json.dumps({"fraction": 0.05, "k": None}))
    _save(case.dir / "m.safetensors", arrays, _edit_meta(meta, key, edits))
    _run_in_case(case, ["inspect", "m.safetensors", "--json"], set(), process)


@pytest.fixture(scope="module")
def llm_folder(box):
    """A tiny Hugging Face causal LM folder and a valid delta of it."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file
    import torch

    from fps_onnx.torch.train import delta, hf_folder
    from llm_models import save_tiny_llm

    folder = save_tiny_llm("llama", box.work / "llm")
    with open(folder / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    shape = header["lm_head.weight"]["shape"]
    tensors = {"lm_head.weight:indices": torch.tensor([0, 3, 7]),
               "lm_head.weight:values": torch.tensor([0.5, -0.25, 1e-3])}
    meta = {"format": delta.DELTA_FORMAT, "format_version": delta.DELTA_FORMAT_VERSION,
            "shapes": json.dumps({"lm_head.weight": shape}), "dense": "[]",
            hf_folder.BASE_HASH_KEY: hf_folder.base_sha256(folder)}
    delta = box.work / "delta.safetensors"
    save_file(tensors, str(delta), metadata=meta)
    code, output, _ = _run("apply-delta", f"hf:{folder}", delta, "-o", box.work / "merged", "-q")
    assert code == 0, output
    shutil.rmtree(box.work / "merged")
    return folder, delta


@settings(FUZZ, max_examples=20)
@given(key=st.sampled_from(["shapes", "dense", "base_sha256", "format_version", "extra"]),
       edits=st.lists(_META_EDIT, min_size=1, max_size=2))
def test_delta_metadata_mutations(box, sentinel, llm_folder, key, edits):
    folder, valid = llm_folder
    case = Case(box)
    arrays, meta = _reload(valid)
    _save(case.dir / "d.safetensors", arrays, _edit_meta(meta, key, edits))

    def merged(path: Path) -> None:
        assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))

    _run_in_case(case, ["apply-delta", f"hf:{folder}", "d.safetensors", "-o", "merged", "-q"], {"merged"},
                 False, merged)


# --------------------------------------------------------------------------- name mutations

_FORGING = ["\n", "\nError: forged", "\r", "\r\n", "\x1b[2J", "\u2028", "\u2029", "\x00", "\x85", "\u202e",
            "\t", "/../outside/sentinel.txt"]


@settings(FUZZ, max_examples=16)
@given(where=st.sampled_from(["weight", "input", "stats key"]), forging=st.sampled_from(_FORGING),
       prefix=st.text(alphabet="ab.:/", max_size=3), fault=st.booleans())
def test_name_mutations(box, sentinel, valid_stats, where, forging, prefix, fault):
    """Weight, input and stats key names holding newlines, CR, ESC, U+2028, NUL...: in a real
    process, stderr is nothing or exactly one ``Error:`` line, with no control character."""
    name = f"{prefix}w{forging}1"
    case = Case(box)
    model = _model()
    if where == "weight":
        model.graph.initializer[0].name = model.graph.node[0].input[1] = name
        if fault:  # a NaN weight: refused naming it
            w = numpy_helper.to_array(model.graph.initializer[0]).copy()
            w[0, 0] = np.nan
            model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, name))
    elif where == "input":
        model.graph.input[0].name = model.graph.node[0].input[0] = name
    onnx.save(model, case.dir / "model.onnx")
    width = IN + 1 if fault and where == "input" else IN  # data that does not fit the input: named
    np.save(case.dir / "x.npy", np.random.default_rng(1).standard_normal((6, width)).astype(np.float32))
    args = ["select", "model.onnx", "x.npy", "-o", "masks.safetensors", "-q"]
    if where == "stats key":
        arrays, meta = _reload(valid_stats)
        arrays = {k.replace("w1:", f"{name}:") if fault else k.replace("w2:", f"{name}:"): v
                  for k, v in arrays.items()}
        _save(case.dir / "s.safetensors", arrays, meta)
        args = ["select", "model.onnx", "--from-stats", "s.safetensors", "-o", "masks.safetensors", "-q"]
    code = _run_in_case(case, args, {"masks.safetensors"}, True, _valid_masks)
    if where == "stats key" or fault:
        assert code == 1  # a foreign stats key, a NaN weight, data of the wrong width
