"""Op rules of fps_onnx.ops: MatMulNBits, FusedMatMul, packed Attention, refused quantized ops."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import onnxruntime as ort
import pytest

from _cli import assert_one_error, invoke
from _models import make_model, rng, tensor
from fps_onnx.errors import ModelError
from fps_onnx.onnx import graph, ops
from fps_onnx.pipeline import run_select
from fps_onnx.selection.score import SelectConfig

MS_OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def ms_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    """A model importing com.microsoft; ``inits`` maps names to arrays."""
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=MS_OPSET)
    model.ir_version = 8
    return model


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- MatMulNBits


def nbits_parts(n, k, bits, block, zp=None, g_idx=False, dtype=np.float32, seed=0, prefix=""):
    """(node inputs, initializers, attrs) of a MatMulNBits with random packed data."""
    r = rng(seed)
    blocks = -(-k // block)
    inits = {
        f"{prefix}B": r.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8),
        f"{prefix}scales": (r.random(n * blocks) + 0.25).astype(dtype),
    }
    inputs = [f"{prefix}B", f"{prefix}scales"]
    if zp == "packed":
        inits[f"{prefix}zp"] = r.integers(0, 256, n * -(-blocks * bits // 8), dtype=np.uint8)
    elif zp == "float":
        inits[f"{prefix}zp"] = (r.random(n * blocks) * (2**bits - 1)).astype(dtype)
    inputs.append(f"{prefix}zp" if zp else "")
    if g_idx:
        inits[f"{prefix}g"] = r.permutation(np.arange(k) // block).astype(np.int32)
        inputs.append(f"{prefix}g")
    while inputs[-1] == "":
        inputs.pop()
    return inputs, inits, dict(K=k, N=n, bits=bits, block_size=block)


def nbits_model(n, k, bits, block, zp=None, g_idx=False, dtype=np.float32):
    inputs, inits, attrs = nbits_parts(n, k, bits, block, zp, g_idx, dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("MatMulNBits", ["a", *inputs], ["y"], domain="com.microsoft",
                            name="/model/layers.0/mlp/MatMul", **attrs)
    return ms_model([node], [tensor("a", ["M", k], elem)], [tensor("y", ["M", n], elem)], inits)


def numpy_dequant(model) -> np.ndarray:
    """W[n, k] = (q - zp) * scale, one entry at a time, straight from the format."""
    node = model.graph.node[0]
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    n, k, bits, block = a["N"], a["K"], a.get("bits", 4), a["block_size"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = list(node.input) + [""] * 5
    packed, scales = inits[names[1]].reshape(n, -1), inits[names[2]].reshape(n, -1)
    zp, g_idx = inits.get(names[3]), inits.get(names[4])
    blocks = scales.shape[1]
    w = np.zeros((n, k), np.float64)
    for row in range(n):
        for col in range(k):
            b = col // block if g_idx is None else int(g_idx[col])
            bit = (col // block * block + col % block) * bits
            q = (int(packed[row, bit // 8]) >> (bit % 8)) & ((1 << bits) - 1)
            if zp is None:
                z = 2 ** (bits - 1)
            elif zp.dtype == np.uint8:
                zbit = b * bits
                per_row = -(-blocks * bits // 8)
                z = (int(zp[row * per_row + zbit // 8]) >> (zbit % 8)) & ((1 << bits) - 1)
            else:
                z = float(zp[row * blocks + b])
            w[row, col] = (q - z) * float(scales[row, b])
    return w


def ort_weight(model) -> np.ndarray:
    """What ONNX Runtime itself computes: y = I @ W^T, so W = y^T."""
    node = model.graph.node[0]
    k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "K")
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return session(model).run(None, {"a": np.eye(k, dtype=dtype)})[0].T.astype(np.float32)


NBITS_CASES = [
    # (N, K, bits, block_size, zero points, g_idx)
    (5, 40, 4, 16, None, False),       # K not a multiple of the block
    (5, 40, 4, 16, "packed", False),   # odd number of blocks: half a zero-point byte per row
    (4, 64, 4, 32, "packed", False),
    (5, 40, 8, 16, None, False),
    (5, 40, 8, 16, "packed", False),
    (3, 24, 2, 16, "packed", False),
    (5, 40, 4, 16, "float", False),
    (5, 40, 4, 16, None, True),
    (5, 40, 4, 16, "float", True),
    (5, 40, 4, 16, "packed", True),  # NumPy only: ORT's CPU g_idx path drops packed zero points
]


@pytest.mark.parametrize("n, k, bits, block, zp, g_idx", NBITS_CASES)
def test_matmul_nbits_dequantizes_as_numpy_and_onnx_runtime(n, k, bits, block, zp, g_idx):
    model = nbits_model(n, k, bits, block, zp, g_idx)
    (site,) = graph.find_weights(model)
    assert (site.key, site.op, site.layout, site.shape, site.in_features) == \
        ("B", "MatMulNBits", "out_in", (n, k), k)
    assert site.activations == (graph.Activation("a", -1),) and site.dtype == TensorProto.FLOAT
    assert (site.quant.bits, site.quant.block_size, site.quant.zero_points) == \
        (bits, block, "zp" if zp else None)
    w = graph.weight_reader(model)(site)
    assert w.dtype == np.float32 and w.shape == (n, k) and w.flags.c_contiguous
    np.testing.assert_allclose(w, numpy_dequant(model), rtol=1e-6, atol=1e-6)
    if not (g_idx and zp == "packed"):
        np.testing.assert_allclose(w, ort_weight(model), rtol=1e-5, atol=1e-4)


def test_matmul_nbits_fp16_site_reads_float32_and_sums_in_fp32():
    model = nbits_model(6, 48, 4, 16, "packed", dtype=np.float16)
    (site,) = graph.find_weights(model)
    assert site.dtype == TensorProto.FLOAT16
    w = graph.weight_reader(model)(site)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, ort_weight(model), rtol=2e-3, atol=2e-3)
    a = rng(3).standard_normal((2, 7, 48)).astype(np.float16)
    model.graph.input[0].CopyFrom(tensor("a", ["B", "S", 48], TensorProto.FLOAT16))
    model.graph.output[0].CopyFrom(tensor("y", ["B", "S", 6], TensorProto.FLOAT16))
    rewritten, outputs = graph.add_statistics(model, [site], ("abs_sum",))
    got = dict(zip(outputs, session(rewritten).run(list(outputs), {"a": a})))
    np.testing.assert_allclose(got["fps_stat::0::abs_sum"], np.abs(a.astype(np.float64)).sum((0, 1)),
                               rtol=1e-5)
    assert got["fps_stat::0::count"] == a.size


@pytest.mark.parametrize("change, message", [
    (dict(bits=3), "bits=3"),
    (dict(N=6), r"B B holds 120 bytes, its attributes need 144"),
    (dict(K=49), r"B B holds 120 bytes, its attributes need 160"),
])
def test_matmul_nbits_that_cannot_be_read_is_refused(change, message):
    model = nbits_model(5, 40, 4, 16)
    node = model.graph.node[0]
    for name, value in change.items():
        next(a for a in node.attribute if a.name == name).i = value
    with pytest.raises(ModelError, match=f"node /model/layers.0/mlp/MatMul: MatMulNBits .*{message}"):
        graph.find_weights(model)


def test_tied_matmul_nbits_is_one_site_keyed_by_its_packed_weight():
    inputs, inits, attrs = nbits_parts(4, 32, 4, 16, "packed")
    nodes = [helper.make_node("MatMulNBits", [x, *inputs], [y], domain="com.microsoft", **attrs)
             for x, y in (("a", "y1"), ("b", "y2"))]
    model = ms_model(nodes, [tensor("a", ["M", 32]), tensor("b", ["M", 32])],
                     [tensor("y1", ["M", 4]), tensor("y2", ["M", 4])], inits)
    (site,) = graph.find_weights(model)
    assert site.key == "B" and [a.tensor for a in site.activations] == ["a", "b"]


def two_nbits_layers(tmp_path):
    """x [M, 128] -> MatMulNBits(W1 [64, 128]) -> MatMulNBits(W2 [48, 64], K % block != 0) -> y,
    saved with B1 large enough to be read where it lies in the file."""
    in1, init1, attrs1 = nbits_parts(64, 128, 4, 32, "packed", seed=1, prefix="l1.")
    in2, init2, attrs2 = nbits_parts(48, 64, 8, 48, None, seed=2, prefix="l2.")
    nodes = [
        helper.make_node("MatMulNBits", ["x", *in1], ["h"], domain="com.microsoft", **attrs1),
        helper.make_node("MatMulNBits", ["h", *in2], ["y"], domain="com.microsoft", **attrs2),
    ]
    model = ms_model(nodes, [tensor("x", ["M", 128])], [tensor("y", ["M", 48])], {**init1, **init2})
    path = tmp_path / "int4.onnx"
    onnx.save(model, path)
    return path, model


def test_run_select_on_matmul_nbits_matches_numpy(tmp_path):
    path, model = two_nbits_layers(tmp_path)
    x = rng(7).standard_normal((30, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = run_select(path, tmp_path / "x.npy", SelectConfig(per_neuron=5))

    read = graph.weight_reader(model)
    w1, w2 = (read(s) for s in graph.find_weights(model))
    h = x.astype(np.float64) @ w1.T.astype(np.float64)
    for key, act, w in (("l1.B", x.astype(np.float64), w1), ("l2.B", h, w2)):
        stats = result.stats.weights[key]
        np.testing.assert_allclose(stats.mean_abs(), np.abs(act).mean(0), rtol=1e-5)
        score = np.abs(w.astype(np.float64)) * np.abs(act).mean(0)[None, :]
        keep = np.argsort(-score, axis=1, kind="stable")[:, :5]
        want = np.zeros(w.shape, bool)
        np.put_along_axis(want, keep, True, axis=1)
        np.testing.assert_array_equal(result.masks.masks[key], want)
        meta = result.masks.tensors[key]
        assert (meta["op"], meta["onnx_layout"], meta["shape"]) == ("MatMulNBits", "out_in", list(w.shape))


def test_mapping_leaves_matmul_nbits_weights_unmapped(tmp_path):
    from fps_onnx.errors import MaskError
    from fps_onnx.torch.mapping import map_masks, match_weights, onnx_weights

    path, model = two_nbits_layers(tmp_path)
    np.save(tmp_path / "x.npy", rng(7).standard_normal((8, 128)).astype(np.float32))
    masks = run_select(path, tmp_path / "x.npy", SelectConfig(per_neuron=2)).masks
    state = {"fc1.weight": rng(8).standard_normal((64, 128)).astype(np.float32),
             "fc2.weight": rng(9).standard_normal((48, 64)).astype(np.float32)}
    weights, dtypes = onnx_weights(model)
    report = match_weights(weights, state, dtypes)
    assert not report.matches and set(report.unmapped) == {"l1.B", "l2.B"}
    with pytest.raises(MaskError, match="none of the 2 masks fits"):
        map_masks(masks, state, model)


# --------------------------------------------------------------------------- FusedMatMul, Attention


@pytest.mark.parametrize("trans_b, stored, layout", [(1, (4, 6), "out_in"), (0, (6, 4), "in_out")])
def test_fused_matmul_trans_b(trans_b, stored, layout):
    w = rng().standard_normal(stored).astype(np.float32)
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft",
                            alpha=0.5, transB=trans_b)
    model = ms_model([node], [tensor("x", ["N", 3, 6])], [tensor("y", ["N", 3, 4])], {"w": w})
    (site,) = graph.find_weights(model)
    assert (site.op, site.layout, site.shape, site.in_features) == ("FusedMatMul", layout, (4, 6), 6)
    assert site.activations == (graph.Activation("x", -1),)
    np.testing.assert_array_equal(graph.weight_reader(model)(site), w if trans_b else w.T)


def test_fused_matmul_trans_a_reduces_over_the_last_axis():
    w = rng().standard_normal((6, 4)).astype(np.float32)
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", transA=1)
    model = ms_model([node], [tensor("x", ["B", 6, "M"])], [tensor("y", ["B", "M", 4])], {"w": w})
    (site,) = graph.find_weights(model)
    assert site.activations == (graph.Activation("x", -2),) and site.shape == (4, 6)
    x = rng(1).standard_normal((2, 6, 5)).astype(np.float32)
    rewritten, outputs = graph.add_statistics(model, [site], ("abs_sum", "sq_sum"))
    got = dict(zip(outputs, session(rewritten).run(list(outputs), {"x": x})))
    np.testing.assert_allclose(got["fps_stat::0::abs_sum"], np.abs(x).sum((0, 2)), rtol=1e-5)
    np.testing.assert_allclose(got["fps_stat::0::sq_sum"], (x * x).sum((0, 2)), rtol=1e-5)
    assert got["fps_stat::0::count"] == x.size


def test_fused_matmul_trans_batch_is_refused():
    w = rng().standard_normal((6, 4)).astype(np.float32)
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft",
                            name="fm", transBatchA=1)
    model = ms_model([node], [tensor("x", ["B", 3, 6])], [tensor("y", ["B", 3, 4])], {"w": w})
    with pytest.raises(ModelError, match="node fm uses FusedMatMul with transBatchA"):
        graph.find_weights(model)


def test_packed_attention_weight_is_one_in_out_site():
    hidden, q, k, v = 8, 8, 4, 4
    w = rng().standard_normal((hidden, q + k + v)).astype(np.float32)
    bias = np.zeros(q + k + v, np.float32)
    node = helper.make_node("Attention", ["x", "w", "bias"], ["y"], domain="com.microsoft",
                            num_heads=2, qkv_hidden_sizes=[q, k, v])
    model = ms_model([node], [tensor("x", ["B", "S", hidden])], [tensor("y", ["B", "S", v])],
                     {"w": w, "bias": bias})
    (site,) = graph.find_weights(model)
    assert (site.key, site.op, site.layout, site.shape, site.in_features) == \
        ("w", "Attention", "in_out", (q + k + v, hidden), hidden)
    assert site.activations == (graph.Activation("x", -1),)
    np.testing.assert_array_equal(graph.weight_reader(model)(site), w.T)
    model.graph.node[0].attribute[-1].ints[:] = [q, k, q]
    with pytest.raises(ModelError, match=r"qkv_hidden_sizes \[8, 4, 8\] add up to 20"):
        graph.find_weights(model)


def test_fused_gemm_and_fused_conv_are_read_as_gemm_and_conv():
    w = rng().standard_normal((4, 6)).astype(np.float32)
    k = rng(1).standard_normal((8, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("FusedGemm", ["x", "w"], ["y"], domain="com.microsoft", transB=1,
                              activation="Relu"),
             helper.make_node("FusedConv", ["img", "k"], ["z"], domain="com.microsoft", group=2,
                              activation="Relu")]
    model = ms_model(nodes, [tensor("x", ["N", 6]), tensor("img", ["N", 4, 5, 5])],
                     [tensor("y", ["N", 4]), tensor("z", ["N", 8, 3, 3])], {"w": w, "k": k})
    gemm, conv = graph.find_weights(model)
    assert (gemm.op, gemm.layout, gemm.shape, gemm.activations) == \
        ("FusedGemm", "out_in", (4, 6), (graph.Activation("x", -1),))
    assert (conv.op, conv.layout, conv.shape, conv.groups, conv.in_features) == \
        ("FusedConv", "conv", (8, 2, 3, 3), 2, 4)


def test_every_rule_is_registered_once():
    assert {("", "MatMul"), ("", "Gemm"), ("", "Conv"), ("com.microsoft", "MatMulNBits"),
            ("com.microsoft", "FusedMatMul"), ("com.microsoft", "Attention")} <= set(ops.RULES)
    with pytest.raises(ValueError, match="has a rule already"):
        ops.rule(("", "MatMul"))(lambda node, lookup: None)
    assert not set(ops.RULES) & ops.REFUSED


# --------------------------------------------------------------------------- refused


def qlinear_matmul_model():
    q = {"w_q": rng().integers(-127, 127, (6, 4), dtype=np.int8), "w_s": np.float32(0.1),
         "w_z": np.int8(0), "x_s": np.float32(0.1), "x_z": np.uint8(128),
         "y_s": np.float32(0.2), "y_z": np.uint8(128)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        helper.make_node("QLinearMatMul", ["xq", "x_s", "x_z", "w_q", "w_s", "w_z", "y_s", "y_z"],
                         ["yq"], name="/model/layers.0/q_proj/MatMul"),
        helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["y"]),
    ]
    return make_model(nodes, [tensor("x", ["N", 6])], [tensor("y", ["N", 4])], q)


def dequantized_weight_model(through_quantize: bool):
    w = rng().standard_normal((6, 4)).astype(np.float32)
    inits = {"w_s": np.float32(0.05), "w_z": np.int8(0)}
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], name="w_dq")]
    if through_quantize:
        inits["w"] = w
        nodes.insert(0, helper.make_node("QuantizeLinear", ["w", "w_s", "w_z"], ["w_q"]))
    else:
        inits["w_q"] = np.round(w / 0.05).astype(np.int8)
    nodes.append(helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="/fc/MatMul"))
    return make_model(nodes, [tensor("x", ["N", 6])], [tensor("y", ["N", 4])], inits)


def test_qlinear_matmul_is_refused_naming_node_and_op():
    with pytest.raises(ModelError) as err:
        graph.find_weights(qlinear_matmul_model())
    assert str(err.value) == (
        "node /model/layers.0/q_proj/MatMul uses QLinearMatMul, whose quantized weights fps-onnx "
        "cannot score; export the model in float (fp32/fp16) or int4 MatMulNBits")


@pytest.mark.parametrize("op", sorted(op for _, op in ops.REFUSED))
def test_every_refused_op_is_refused(op):
    domain = "" if op in ("QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger") \
        else "com.microsoft"
    model = ms_model([helper.make_node(op, ["x", "w"], ["y"], domain=domain, name="n")],
                     [tensor("x", ["N", 6])], [tensor("y", ["N", 4])], {"w": np.zeros((6, 4), np.int8)})
    with pytest.raises(ModelError, match=f"^node n uses {op}, whose quantized weights"):
        graph.find_weights(model)


@pytest.mark.parametrize("through_quantize", [False, True])
def test_dequantize_linear_weight_is_refused(through_quantize):
    with pytest.raises(ModelError, match=r"^node /fc/MatMul uses MatMul on a DequantizeLinear "
                                         r"weight \(w_dq\), whose quantized weights"):
        graph.find_weights(dequantized_weight_model(through_quantize))


def test_dequantized_activation_is_not_a_weight():
    w = rng().standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", 6])], [tensor("y", ["N", 4])],
                       {"w": w, "s": np.float32(0.1), "z": np.uint8(128)})
    (site,) = graph.find_weights(model)
    assert site.key == "w" and site.activations == (graph.Activation("xd", -1),)


@pytest.mark.parametrize("build, message", [
    (qlinear_matmul_model, "node /model/layers.0/q_proj/MatMul uses QLinearMatMul"),
    (lambda: dequantized_weight_model(True), "node /fc/MatMul uses MatMul on a DequantizeLinear"),
])
def test_cli_refuses_quantized_models_in_one_line(tmp_path, build, message):
    onnx.save(build(), tmp_path / "q.onnx")
    np.save(tmp_path / "x.npy", np.zeros((4, 6), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("select", tmp_path / "q.onnx", tmp_path / "x.npy", "-o", out / "m.safetensors")
    assert_one_error(result, message, empty=[out])
