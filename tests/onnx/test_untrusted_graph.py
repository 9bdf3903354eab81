"""Malformed graphs from elsewhere: cycles, nodes without their inputs, weights with
no entries or that do not fit their input. Each is built here with ``onnx.helper``
(no checker) and must be refused through the CLI with one ``Error:`` line, exit 1,
no traceback and no output file, within a few seconds, on the weight-only path,
the calibration path and ``--from-stats``.
"""

from __future__ import annotations

from dataclasses import replace
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

from _cli import assert_one_error, invoke
from fps_onnx import calibrate
from fps_onnx.errors import ModelError
from fps_onnx.onnx import external, validate
from fps_onnx.onnx.graph import find_weights
from fps_onnx.selection.maskfile import MaskFile

W1 = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
W2 = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def raw_model(nodes, initializers, x_shape=("N", 6), outputs=(("y", ["N", 5]),), opsets=(("", 17),),
              inputs=(), functions=()) -> onnx.ModelProto:
    """A model exactly as given: nothing checked, nothing sorted."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    g = helper.make_graph(nodes, "g", [vi("x", list(x_shape)), *inputs],
                          [vi(n, s) for n, s in outputs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              functions=list(functions))
    model.ir_version = 8
    return model


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


def cycle(length, ops=("Identity", "Cast", "Transpose", "Identity", "Transpose")):
    """MatMul(x, t0) whose weight t0 comes from a cycle t0 <- t1 <- ... <- t0."""
    names = [f"t{i}" for i in range(length)]
    ring = []
    for i in range(length):
        op = ops[i % len(ops)]
        attrs = {"to": TensorProto.FLOAT} if op == "Cast" else {}
        ring.append(node(op, [names[(i + 1) % length]], [names[i]], **attrs))
    return raw_model([*ring, node("MatMul", ["x", "t0"], ["y"])], {})


def activation_cycle(ops):
    """MatMul(r0, w) whose activation r0 comes from a cycle of sign-keeping ops."""
    n = len(ops)
    ring = []
    for i, op in enumerate(ops):
        inputs = [f"r{(i + 1) % n}"] + (["s"] if op == "Reshape" else [])
        ring.append(node(op, inputs, [f"r{i}"]))
    return raw_model([*ring, node("MatMul", ["r0", "w"], ["y"])],
                     {"w": W1, "s": np.array([-1, 6], np.int64)})


CASES = {
    # cycles: of length 1, 2 and 5, through different pass-through ops
    "cycle 1": (lambda: cycle(1), "topologically sorted|cycle"),
    "cycle 2 (issue)": (lambda: raw_model([node("Identity", ["w2"], ["w1c"]), node("Identity", ["w1c"], ["w2"]),
                                           node("MatMul", ["x", "w1c"], ["y"])], {}), "topologically sorted|cycle"),
    "cycle 5": (lambda: cycle(5), "topologically sorted|cycle"),
    "reshape cycle": (lambda: activation_cycle(["Reshape", "Reshape"]), "topologically sorted|cycle"),
    "mixed activation cycle": (lambda: activation_cycle(["Reshape", "Identity", "Flatten"]),
                               "topologically sorted|cycle"),
    # nodes without the inputs their op requires
    "identity without input": (lambda: raw_model([node("Identity", [], ["w1c"]), node("MatMul", ["x", "w1c"], ["y"])],
                                                 {}), r"Identity.*input size 0|no input"),
    "transpose without input": (lambda: raw_model([node("Transpose", [], ["wt"], perm=[1, 0]),
                                                   node("MatMul", ["x", "wt"], ["y"])], {}), "Transpose.*input size 0"),
    "matmul with one input": (lambda: raw_model([node("MatMul", ["x"], ["y"])], {"w": W1}), "MatMul.*input size 1"),
    "gemm with one input": (lambda: raw_model([node("Gemm", ["x"], ["y"])], {"w": W1}), "Gemm.*input size 1"),
    "conv without weight": (lambda: raw_model([node("Conv", ["x"], ["y"])], {"w": np.ones((4, 3, 1, 1), np.float32)},
                                              x_shape=("N", 3, 4, 4), outputs=(("y", ["N", 4, 4, 4]),)),
                            "Conv.*input size 1"),
    "if without condition": (lambda: raw_model(
        [node("If", [], ["z"], then_branch=_branch("then"), else_branch=_branch("else")),
         node("MatMul", ["x", "w"], ["y"])], {"w": W1}, inputs=[vi("use_cache_branch", [1], TensorProto.BOOL)],
        outputs=(("y", ["N", 5]), ("z", [1]))), "If.*input size 0"),
    # weights with no entries, bad groups, weights that do not fit their input
    "dims [6, 0]": (lambda: raw_model([node("MatMul", ["x", "w"], ["y"])], {"w": np.ones((6, 0), np.float32)},
                                      outputs=(("y", ["N", 0]),)), r"weight w has dims \[0, 6\].*no entries"),
    "dims [0, 5]": (lambda: raw_model([node("MatMul", ["x", "w"], ["y"])], {"w": np.ones((0, 5), np.float32)},
                                      x_shape=("N", 0)), r"weight w has dims \[5, 0\].*no entries"),
    "conv group=0": (lambda: raw_model([node("Conv", ["x", "w"], ["y"], group=0)],
                                       {"w": np.ones((4, 3, 1, 1), np.float32)}, x_shape=("N", 3, 4, 4),
                                       outputs=(("y", ["N", 4, 4, 4]),)), "group"),
    "conv group does not divide": (lambda: raw_model([node("Conv", ["x", "w"], ["y"], group=3)],
                                                     {"w": np.ones((4, 1, 1, 1), np.float32)},
                                                     x_shape=("N", 3, 4, 4), outputs=(("y", ["N", 4, 4, 4]),)),
                                   "group"),
    "matmul mismatch (issue)": (lambda: raw_model([node("MatMul", ["x", "w"], ["y"])],
                                                  {"w": np.ones((3, 5), np.float32)}), "Incompatible dimensions"),
    "mismatch pruned from the session": (lambda: raw_model(
        [node("MatMul", ["x", "w"], ["unused"]), node("MatMul", ["x", "w1"], ["y"])],
        {"w": np.ones((3, 5), np.float32), "w1": W1}), "Incompatible dimensions"),
    "gemm transB mismatch": (lambda: raw_model([node("Gemm", ["x", "w"], ["y"], transB=1)], {"w": W2},
                                               outputs=(("y", ["N", 4]),)), "Incompatible dimensions|Gemm"),
    "fused matmul mismatch": (lambda: raw_model(
        [node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft")], {"w": np.ones((3, 5), np.float32)},
        opsets=(("", 17), ("com.microsoft", 1))), r"weight w \(FusedMatMul.*takes 3 input channels.*'x' has 6"),
    "conv rank mismatch": (lambda: raw_model(
        [node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft")], {"w": np.ones((4, 6, 1, 1), np.float32)},
        opsets=(("", 17), ("com.microsoft", 1)), outputs=(("y", ["N", 4]),)), r"'x' of rank 2, not 4"),
}


def _branch(name):
    one = numpy_helper.from_array(np.ones([1], np.float32), f"{name}_one")
    return helper.make_graph([node("Identity", [f"{name}_one"], [f"{name}_z"])], name, [],
                             [vi(f"{name}_z", [1])], [one])


def refused(root, args, message):
    out = root / "out" / "masks.safetensors"
    start = time.perf_counter()
    result = invoke("select", *args, "-o", out)
    assert time.perf_counter() - start < 5
    assert_one_error(result, message, alone=False, empty=[root / "out"])


def save(model, root, name="model.onnx"):
    path = root / name
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_weight_only_path_refuses_a_malformed_graph(place, case):
    build, message = CASES[case]
    refused(place, [save(build(), place), "--method", "magnitude", "--per-neuron", "1"], message)


@pytest.mark.parametrize("case", list(CASES))
def test_calibration_path_refuses_a_malformed_graph_before_a_session(place, case, monkeypatch):
    build, message = CASES[case]
    monkeypatch.setattr(calibrate, "_session", lambda *a: pytest.fail("a session was built"))
    refused(place, [save(build(), place), place / "data", "--per-neuron", "1"], message)


@pytest.mark.parametrize("case", ["cycle 2 (issue)", "matmul mismatch (issue)", "dims [6, 0]",
                                  "fused matmul mismatch"])
def test_from_stats_path_refuses_a_malformed_graph(place, case):
    good = save(raw_model([node("MatMul", ["x", "w"], ["y"])], {"w": W1}), place, "good.onnx")
    stats = place / "stats.safetensors"
    result = invoke("select", str(good), str(place / "data"), "-o",
                    str(place / "good.safetensors"), "--stats-out", str(stats))
    assert result.exit_code == 0, result.output
    build, message = CASES[case]
    refused(place, [save(build(), place), "--from-stats", stats, "--per-neuron", "1"], message)


def test_the_checks_pass_the_good_models_they_guard(place):
    """The same shapes as the refused cases, well formed: selected on every path."""
    model = raw_model([node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("Identity", ["wt"], ["wi"]),
                       node("Gemm", ["x", "wi"], ["h"], transB=1), node("Relu", ["h"], ["r"]),
                       node("Reshape", ["r", "s"], ["rr"]), node("MatMul", ["rr", "w2t"], ["y"])],
                      {"w": W1, "w2t": W2.T.copy(), "s": np.array([-1, 5], np.int64)},
                      outputs=(("y", ["N", 4]),))
    path = save(model, place)
    for args in (["--method", "magnitude"], [place / "data"]):
        out = place / "out" / "m.safetensors"
        result = invoke("select", str(path), *map(str, args), "-o", str(out), "-q",
                        "--per-neuron", "1")
        assert result.exit_code == 0, result.output
        masks = MaskFile.load(out).masks  # one entry per output neuron of each weight
        assert {k: m.sum(axis=1).tolist() for k, m in masks.items()} == {"w": [1] * 5, "w2t": [1] * 4}, masks
        out.unlink()


def test_check_sites_reads_every_activation_of_a_tied_weight():
    """A weight read by two MatMuls: the second reads an input of the wrong width."""
    model = raw_model([node("MatMul", ["x", "w"], ["y"]), node("MatMul", ["z", "w"], ["y2"])], {"w": W1},
                      inputs=[vi("z", ["N", 7])], outputs=(("y", ["N", 5]), ("y2", ["N", 5])))
    sites = find_weights(model)
    with pytest.raises(ModelError, match=r"takes 6 input channels, but its input 'z' has 7"):
        validate.check_sites(model, sites)
    only_x = [replace(s, activations=tuple(a for a in s.activations if a.tensor == "x")) for s in sites]
    validate.check_sites(model, only_x)  # the first reader alone fits


def test_external_data_in_a_function_attribute_default_is_checked(tmp_path):
    """A function whose attribute default holds a tensor stored outside the model's folder."""
    (tmp_path / "secret.bin").write_bytes(np.arange(30, dtype=np.float32).tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    hidden = numpy_helper.from_array(np.zeros((6, 5), np.float32), "hidden")
    hidden.ClearField("raw_data")
    hidden.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "120")):
        entry = hidden.external_data.add()
        entry.key, entry.value = key, value
    default = helper.make_attribute("value", hidden)
    body = helper.make_node("Constant", [], ["out"])
    body.attribute.add().CopyFrom(helper.make_attribute_ref("value", onnx.AttributeProto.TENSOR))
    function = helper.make_function("custom", "Const", [], ["out"], [body], [helper.make_opsetid("", 17)],
                                    attributes=[])
    function.attribute_proto.append(default)
    model = raw_model([node("MatMul", ["x", "w"], ["y"]), node("Const", [], ["side"], domain="custom")],
                      {"w": W1}, opsets=(("", 17), ("custom", 1)), functions=[function],
                      outputs=(("y", ["N", 5]), ("side", [6, 5])))
    assert any(t.name == "hidden" for t in external.iter_tensors(model))
    with pytest.raises(ModelError, match=r"'hidden'.*'\.\./secret\.bin' leads outside"):
        external.resolve(model, str(folder))
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "x.npy", np.ones((4, 6), np.float32))
    (tmp_path / "out").mkdir()
    path = save(model, folder)
    refused(tmp_path, [path, "--method", "magnitude"], r"'\.\./secret\.bin' leads outside")
    refused(tmp_path, [path, tmp_path / "data"], r"'\.\./secret\.bin' leads outside")


def test_outputs_declared_without_a_shape_still_select(tmp_path):
    """ONNX Runtime loads a graph whose output has no declared shape; so does select."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32))
    for args in (["x.npy"], ["--method", "magnitude"]):
        out = tmp_path / "masks.safetensors"
        out.unlink(missing_ok=True)
        data = [str(tmp_path / a) if a.endswith(".npy") else a for a in args]
        result = invoke("select", tmp_path / "m.onnx", *data, "-o", out, "-q")
        assert result.exit_code == 0, result.output
        assert MaskFile.load(out).selected > 0
