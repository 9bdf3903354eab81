"""Model files from elsewhere: every external-data reference is checked before a byte is read.

Each malicious model is built here, beside a secret file it tries to read; both
the weight-only path (``--method magnitude``) and the calibration path (fps)
must refuse it with one ``Error:`` line, exit 1 and no output file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

from _cli import assert_one_error, invoke
from _models import make_model, tensor
from fps_onnx import calibrate
from fps_onnx.errors import ModelError
from fps_onnx.onnx import external
from fps_onnx.onnx.graph import tensor_value
from fps_onnx.onnx.load import load_graph
from fps_onnx.selection.maskfile import MaskFile

W1 = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
W2 = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
SECRET = np.arange(30, dtype=np.float32)


def chain_model() -> onnx.ModelProto:
    """x[N, 6] @ w1 [6, 5] -> Relu -> Gemm(w2 [4, 5], transB) -> y, both weights embedded."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    return make_model(nodes, [tensor("x", ["N", 6])], [tensor("y", ["N", 4])], {"w1": W1, "w2": W2})


def set_external(t: onnx.TensorProto, location, offset=None, length=None, dims=None) -> None:
    """Make ``t`` an external-data reference with exactly the given fields."""
    t.ClearField("raw_data")
    t.ClearField("float_data")
    if dims is not None:
        del t.dims[:]
        t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)


def w1_external(folder, location, **fields):
    """A chain model in ``folder`` whose w1 is external data at ``location``."""
    folder.mkdir(exist_ok=True)
    model = chain_model()
    set_external(model.graph.initializer[0], location, **fields)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def subgraph_external(folder, location):
    """The chain plus an If (constant condition) whose branch holds an external Constant."""
    folder.mkdir(exist_ok=True)
    inner = numpy_helper.from_array(SECRET.reshape(6, 5), "inner")
    set_external(inner, location)
    branch = helper.make_graph([helper.make_node("Constant", [], ["z"], value=inner)], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [6, 5])])
    plain = numpy_helper.from_array(W1)
    other = helper.make_graph([helper.make_node("Constant", [], ["z2"], value=plain)], "else", [],
                              [helper.make_tensor_value_info("z2", TensorProto.FLOAT, [6, 5])])
    model = chain_model()
    true = helper.make_tensor("f", TensorProto.BOOL, [], [True])
    model.graph.node.extend([
        helper.make_node("Constant", [], ["flag"], value=true),
        helper.make_node("If", ["flag"], ["side"], then_branch=branch, else_branch=other),
    ])
    model.graph.output.append(tensor("side", [6, 5]))
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def constant_external(folder, location):
    """The chain with w1 given by a Constant node whose value tensor is external."""
    folder.mkdir(exist_ok=True)
    model = chain_model()
    value = numpy_helper.from_array(W1, "w1c")
    set_external(value, location)
    del model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w1"], value=value))
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def place(place):
    """The shared place (tmp/data/x.npy, tmp/out/ empty) plus tmp/secret.bin, outside tmp/m/ (the
    model's folder)."""
    SECRET.tofile(place / "secret.bin")
    return place


def data_file(folder, nbytes=120):
    folder.mkdir(exist_ok=True)
    (folder / "w.bin").write_bytes(W1.tobytes()[:nbytes] + b"\0" * max(0, nbytes - 120))


def make_case(name, root):
    m = root / "m"
    if name == "dotdot":
        return w1_external(m, "../secret.bin"), r"'\.\./secret\.bin' leads outside the model's folder"
    if name == "absolute":
        return w1_external(m, str(root / "secret.bin")), "is an absolute path"
    if name == "symlink out":
        m.mkdir()
        (m / "w.bin").symlink_to(root / "secret.bin")
        return w1_external(m, "w.bin"), "'w.bin' leads outside the model's folder"
    if name == "symlinked folder out":
        m.mkdir()
        (m / "d").symlink_to(root)
        return w1_external(m, "d/secret.bin"), "leads outside the model's folder"
    if name == "dev zero":
        return w1_external(m, "/dev/zero"), "is an absolute path"
    if name == "link to dev zero":
        m.mkdir()
        (m / "w.bin").symlink_to("/dev/zero")
        return w1_external(m, "w.bin"), "leads outside the model's folder"
    if name == "fifo":
        m.mkdir()
        os.mkfifo(m / "w.bin")
        return w1_external(m, "w.bin"), "'w.bin' is not a regular file"
    if name == "folder":
        (m / "sub").mkdir(parents=True)
        return w1_external(m, "sub"), "'sub' is not a regular file"
    if name == "dotdot alone":
        return w1_external(m, ".."), "'\\.\\.' leads outside the model's folder"
    if name == "missing":
        return w1_external(m, "gone.bin"), "file 'gone.bin' does not exist"
    if name == "no location":
        return w1_external(m, ""), "no file is named"
    if name == "offset abc":
        data_file(m)
        return w1_external(m, "w.bin", offset="abc"), "offset 'abc' is not a whole number"
    if name == "offset negative":
        data_file(m)
        return w1_external(m, "w.bin", offset="-8"), "offset '-8' is not a whole number"
    if name == "offset float":
        data_file(m)
        return w1_external(m, "w.bin", offset="1.5"), "offset '1.5' is not a whole number"
    if name == "offset too large":
        data_file(m)
        return w1_external(m, "w.bin", offset=8), r"bytes 8\.\.128 lie past the end of 'w\.bin' \(120 bytes\)"
    if name == "length mismatch":
        data_file(m, 200)
        return w1_external(m, "w.bin", length=124), r"dims \[6, 5\] take 120 bytes, but its length is 124"
    if name == "length negative":
        data_file(m)
        return w1_external(m, "w.bin", length=-120), "length '-120' is not a whole number"
    if name == "dims mismatch":
        data_file(m)
        return w1_external(m, "w.bin", length=120, dims=[6, 6]), r"dims \[6, 6\] take 144 bytes"
    if name == "terabyte dims":
        data_file(m)
        return (w1_external(m, "w.bin", dims=[1 << 20, 1 << 20]),
                r"bytes 0\.\.4398046511104 lie past the end of 'w\.bin'")
    if name == "negative dims":
        data_file(m)
        return w1_external(m, "w.bin", dims=[-6, -5]), "a size is negative"
    if name == "subgraph":
        return subgraph_external(m, "../secret.bin"), "tensor 'inner': location '../secret.bin' leads outside"
    if name == "constant":
        return constant_external(m, "../secret.bin"), "tensor 'w1c': location '../secret.bin' leads outside"
    raise AssertionError(name)


CASES = ["dotdot", "absolute", "symlink out", "symlinked folder out", "dev zero", "link to dev zero", "fifo",
         "folder", "dotdot alone", "missing", "no location", "offset abc", "offset negative", "offset float",
         "offset too large", "length mismatch", "length negative", "dims mismatch", "terabyte dims",
         "negative dims", "subgraph", "constant"]


def refused(root, args, message):
    out = root / "out" / "masks.safetensors"
    result = invoke("select", *args, "-o", out)
    return assert_one_error(result, message, alone=False, empty=[root / "out"])


@pytest.mark.parametrize("case", CASES)
def test_weight_only_path_refuses_bad_external_data(place, case):
    model, message = make_case(case, place)
    refused(place, [model, "--method", "magnitude", "--per-neuron", "1"], message)


@pytest.mark.parametrize("case", CASES)
def test_calibration_path_refuses_bad_external_data_before_a_session(place, case, monkeypatch):
    model, message = make_case(case, place)
    monkeypatch.setattr(calibrate, "_session", lambda *a: pytest.fail("a session was built"))
    refused(place, [model, place / "data", "--per-neuron", "1"], message)


@pytest.mark.parametrize("case", ["dotdot", "offset too large"])
def test_from_stats_path_refuses_bad_external_data(place, case):
    good = w1_external(place / "good", "w.bin")
    data_file(place / "good")
    stats = place / "stats.safetensors"
    result = invoke("select", str(good), str(place / "data"), "-o",
                    str(place / "good" / "m.safetensors"), "--stats-out", str(stats))
    assert result.exit_code == 0, result.output
    model, message = make_case(case, place)
    refused(place, [model, "--from-stats", stats], message)


def test_fifo_as_the_model_file_is_refused_without_blocking(place):
    os.mkfifo(place / "pipe.onnx")
    refused(place, [place / "pipe.onnx", "--method", "magnitude"], "is not a regular file")


def test_in_folder_external_data_and_in_folder_links_select(place):
    plain = w1_external(place / "m", "w.bin")
    data_file(place / "m")
    (place / "m" / "sub").mkdir()
    (place / "m" / "sub" / "w.bin").symlink_to(place / "m" / "w.bin")
    linked = w1_external(place / "m2", "../m/w.bin")  # a second model folder: outside it
    for model, args in ((plain, ["--method", "magnitude"]), (plain, [place / "data"])):
        out = place / "out" / "a.safetensors"
        result = invoke("select", str(model), *map(str, args), "-o", str(out), "-q")
        assert result.exit_code == 0, result.output
        assert MaskFile.load(out).masks["w1"].shape == (5, 6)
        out.unlink()
    in_link = w1_external(place / "m", "sub/w.bin")
    graph, folder = load_graph(in_link)
    np.testing.assert_array_equal(tensor_value(graph.graph.initializer[0], folder), W1)
    refused(place, [linked, "--method", "magnitude"], "leads outside")


def test_hugging_face_cache_layout_with_external_data_selects(place):
    # snapshots/<rev>/model.onnx -> ../../blobs/<a>, snapshots/<rev>/model.onnx_data -> ../../blobs/<b>
    plain = w1_external(place / "plain", "model.onnx_data")
    (place / "plain" / "model.onnx_data").write_bytes(W1.tobytes())
    blobs, snap = place / "hub" / "blobs", place / "hub" / "snapshots" / "r1"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    shutil.copy(plain, blobs / "a1")
    shutil.copy(place / "plain" / "model.onnx_data", blobs / "b2")
    (snap / "model.onnx").symlink_to("../../blobs/a1")
    (snap / "model.onnx_data").symlink_to("../../blobs/b2")
    masks = {}
    for name, model in (("plain", plain), ("hub", snap / "model.onnx")):
        out = place / "out" / f"{name}.safetensors"
        result = invoke("select", str(model), str(place / "data"), "-o", str(out), "-q")
        assert result.exit_code == 0, result.output
        masks[name] = MaskFile.load(out)
    np.testing.assert_array_equal(masks["plain"].masks["w1"], masks["hub"].masks["w1"])
    assert masks["plain"].meta["model_sha256"] == masks["hub"].meta["model_sha256"]


# --------------------------------------------------------------------------- digest


def test_digest_of_a_model_without_external_data_is_the_file_sha256(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(chain_model(), str(path))
    assert external.model_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_digest_changes_when_only_the_external_data_changes(place):
    model = w1_external(place / "m", "w.bin")
    data_file(place / "m")
    first = external.model_sha256(model)
    assert first != hashlib.sha256(model.read_bytes()).hexdigest()
    shutil.copytree(place / "m", place / "copy")
    assert external.model_sha256(place / "copy" / "model.onnx") == first  # names, not folders
    (place / "m" / "w.bin").write_bytes((W1 + 1).tobytes())
    assert external.model_sha256(model) != first

    # --from-stats notices: the stats were computed on other weights
    (place / "m" / "w.bin").write_bytes(W1.tobytes())
    stats = place / "s.safetensors"
    result = invoke("select", str(model), str(place / "data"), "-o",
                    str(place / "a.safetensors"), "--stats-out", str(stats), "-q")
    assert result.exit_code == 0, result.output
    assert MaskFile.load(place / "a.safetensors").meta["model_sha256"] == first
    (place / "m" / "w.bin").write_bytes((W1 * 2).tobytes())
    refused(place, [model, "--from-stats", stats], "was computed on another model")


def test_digest_stops_when_asked(place):
    model = w1_external(place / "m", "w.bin")
    data_file(place / "m")
    stop = threading.Event()
    stop.set()
    with pytest.raises(external.HashStopped):
        external.model_sha256(model, stop=stop)


def test_an_error_during_calibration_stops_the_hash(place, monkeypatch):
    events = []

    def slow_hash(path, refs=None, stop=None):
        events.append(stop)
        stop.wait(30)
        return "x"

    monkeypatch.setattr(external, "model_sha256", slow_hash)
    np.save(place / "wrong.npy", np.zeros((3, 7), np.float32))
    path = place / "m.onnx"
    onnx.save(chain_model(), str(path))
    start = time.monotonic()
    refused(place, [path, place / "wrong.npy"], "x has shape")
    assert events and events[0].is_set()
    assert time.monotonic() - start < 20


# --------------------------------------------------------------------------- embedded tensors


def test_embedded_tensors_with_wrong_dims_name_the_tensor():
    bad = numpy_helper.from_array(W1, "w")
    del bad.dims[:]
    bad.dims.extend([7, 5])
    with pytest.raises(ModelError, match="tensor 'w' cannot be read"):
        tensor_value(bad)
    bad.dims[:] = [1 << 20, 1 << 20]
    with pytest.raises(ModelError, match=r"tensor 'w' has dims \[1048576, 1048576\]"):
        tensor_value(bad)


# --------------------------------------------------------------------------- runtime


def test_ir_version_newer_than_the_runtime_is_lowered(place):
    model = chain_model()
    model.ir_version = onnx.IR_VERSION  # what onnx.helper.make_model writes
    path = place / "ir.onnx"
    onnx.save(model, str(path))
    out = place / "out" / "m.safetensors"
    result = invoke("select", str(path), str(place / "data"), "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert MaskFile.load(out).masks["w1"].shape == (5, 6)


def test_ir_needed_follows_the_element_types_used():
    model = chain_model()
    model.ir_version = 14
    assert calibrate._ir_needed(model)[0] == 10
    model.graph.node.append(helper.make_node("Cast", ["y"], ["y6"], to=TensorProto.FLOAT6E2M3))
    assert calibrate._ir_needed(model) == (14, "element type FLOAT6E2M3")
    with pytest.raises(ModelError, match="needs ONNX IR version 14 .*reads IR version 13 at most"):
        calibrate._lower_ir(model, 13, "m.onnx", "1.31.1")
    model = chain_model()
    model.graph.value_info.append(tensor("h", ["N", 5], TensorProto.INT2))
    assert calibrate._ir_needed(model) == (13, "element type INT2")


def test_a_runtime_older_than_the_floor_is_refused(place, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.17.3")
    path = place / "m.onnx"
    onnx.save(chain_model(), str(path))
    refused(place, [path, place / "data"], r"ONNX Runtime 1\.17\.3 is too old: fps-onnx needs 1\.")


def test_mapped_external_weights_are_the_checked_bytes_and_read_only(place):
    folder = place / "m"
    folder.mkdir()
    value = np.arange(1000, dtype=np.float32).reshape(10, 100)
    (folder / "w.bin").write_bytes(b"\1" * 12 + value.tobytes() + b"\2" * 8)  # offset 12: not page-aligned
    t = numpy_helper.from_array(value, "w")
    set_external(t, "w.bin", offset=12, length=value.nbytes)
    ref = external.check_tensor(t, str(folder))
    assert bytes(external.map_bytes(ref)) == bytes(external.read_bytes(ref)) == value.tobytes()
    mapped = tensor_value(t, str(folder), mapped=True)
    np.testing.assert_array_equal(mapped, value)
    assert not mapped.flags.writeable
    del mapped

    def swapped(make, message):
        (folder / "w.bin").unlink()
        make(folder / "w.bin")
        with pytest.raises(ModelError, match=message):
            external.map_bytes(ref)

    swapped(lambda p: p.write_bytes(b"\1" * 12 + value.tobytes()[:-4]), "shorter than when it was checked")
    swapped(os.mkfifo, "not a regular file")  # opened without blocking
    (place / "other.bin").write_bytes(b"\0" * 4100)
    swapped(lambda p: p.symlink_to(place / "other.bin"), "cannot read")  # a link is not followed
