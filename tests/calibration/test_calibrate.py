"""Calibration end to end against an independent PyTorch forward-hook computation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fps_onnx.calibrate import CalibrationConfig, calibrate
from fps_onnx.data import DataConfig
from fps_onnx.errors import DataError, ModelError, NumericError
from fps_onnx.pipeline import run_select
from fps_onnx.selection.score import SelectConfig

BOTH = CalibrationConfig(provider="cpu", statistics=("abs_sum", "sq_sum"))


def torch_reference(model, data, per_neuron, norm):
    """Eq. 3/4 with forward pre-hooks, float64, and a stable-sort top-K per row."""
    import torch

    sums = {}

    def hook(name, module):
        def pre(mod, args):
            x = args[0].detach().double()
            if isinstance(mod, torch.nn.Conv2d):
                x = x.transpose(1, -1)
            x = x.reshape(-1, x.shape[-1])
            acc = sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] = acc[0] + x.abs().sum(0)
            acc[1] = acc[1] + (x * x).sum(0)
            acc[2] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        model(torch.from_numpy(data))
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    out = {}
    for name, (abs_sum, sq_sum, count) in sums.items():
        w = modules[name].weight.detach().double()
        act = abs_sum / count if norm == "l1" else (sq_sum / count).sqrt()
        shape = [1, -1] + [1] * (w.dim() - 2)
        score = (w.abs() * act.reshape(shape)).reshape(w.shape[0], -1)
        order = torch.sort(-score, dim=1, stable=True).indices[:, :per_neuron]
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
        out[name] = (modules[name].weight.detach().numpy(), abs_sum.numpy(), sq_sum.numpy(), count,
                     mask.reshape(w.shape).numpy())
    return out


def by_value(reference, weights):
    """ONNX key -> torch module name, matching weights exactly (the export only transposes)."""
    names = {}
    for key, w in weights.items():
        hits = [n for n, ref in reference.items() if ref[0].shape == w.shape and np.array_equal(ref[0], w)]
        assert len(hits) == 1, key
        names[key] = hits[0]
    return names


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_masks_and_stats_equal_pytorch_hooks(vit_case, norm):
    from fps_onnx.onnx import graph
    from fps_onnx.onnx.load import load_model

    model, path, data_path = vit_case
    data = np.load(data_path)
    ref = torch_reference(model, data, per_neuron=3, norm=norm)
    result = run_select(path, data_path, SelectConfig(norm=norm, per_neuron=3), BOTH)
    weights = {s.key: w for s, w in graph.iter_weight_values(load_model(path), result.sites)}
    names = by_value(ref, weights)
    assert sorted(names.values()) == sorted(ref)  # every Linear and Conv is covered
    for key, name in names.items():
        _, abs_sum, sq_sum, count, mask = ref[name]
        got = result.stats.weights[key]
        assert got.count == count
        np.testing.assert_allclose(got.abs_sum, abs_sum, rtol=1e-4)
        np.testing.assert_allclose(got.sq_sum, sq_sum, rtol=1e-4)
        np.testing.assert_array_equal(result.masks.masks[key], mask, err_msg=key)


def test_same_result_for_batch_sizes_1_3_16(vit_case):
    _, path, data_path = vit_case
    runs = [run_select(path, data_path, SelectConfig(fraction=0.1), BOTH, DataConfig(batch_size=b))
            for b in (1, 3, 16)]
    first = runs[0]
    for other in runs[1:]:
        for key, mask in first.masks.masks.items():
            np.testing.assert_array_equal(other.masks.masks[key], mask)
            np.testing.assert_allclose(other.stats.weights[key].abs_sum,
                                       first.stats.weights[key].abs_sum, rtol=1e-5)
            assert other.stats.weights[key].count == first.stats.weights[key].count


def test_max_samples_stops_early(vit_case):
    _, path, data_path = vit_case
    result = calibrate(path, data_path, BOTH, DataConfig(batch_size=5, max_samples=7))
    assert result.stats.num_samples == 7


def test_python_memory_does_not_grow_with_data(vit_case, tmp_path):
    _, path, _ = vit_case
    r = np.random.default_rng(0)
    peaks = []
    for files in (2, 12):
        folder = tmp_path / f"d{files}"
        folder.mkdir()
        for i in range(files):
            np.save(folder / f"{i:03d}.npy", r.standard_normal((8, 3, 32, 32)).astype(np.float32))
        tracemalloc.start()
        result = calibrate(path, folder, BOTH, DataConfig(batch_size=8))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert result.stats.num_samples == 8 * files
    # six times the data; the peak is one batch plus accumulators either way
    assert peaks[1] < peaks[0] * 1.3 + 200_000, peaks


def test_embedded_and_external_weights_give_the_same_statistics(vit_case, tmp_path):
    import onnx

    from fps_onnx.onnx import graph

    _, path, data_path = vit_case
    external = tmp_path / "ext" / "vit.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(path)), str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="vit.data", size_threshold=0)
    before = sorted(path.parent.iterdir())
    embedded = calibrate(path, data_path, BOTH)  # weights referenced inside the .onnx file
    assert sorted(path.parent.iterdir()) == before  # nothing staged beside it
    refs = {e.value for t in embedded.model.graph.initializer for e in t.external_data if e.key == "location"}
    assert refs == {path.name}
    outside = calibrate(external, data_path, BOTH)  # weights read where they are
    for key, stats in embedded.stats.weights.items():
        np.testing.assert_array_equal(outside.stats.weights[key].abs_sum, stats.abs_sum)
        np.testing.assert_array_equal(outside.stats.weights[key].sq_sum, stats.sq_sum)
    assert embedded.stats.weights
    # the referenced bytes are the weights themselves
    full = onnx.load(str(path))
    want = dict(graph.iter_weight_values(full, embedded.sites))
    for site, got in graph.iter_weight_values(embedded.model, embedded.sites, embedded.base_dir):
        np.testing.assert_array_equal(got, want[site])


def test_symlinked_models_are_read_where_their_bytes_are(vit_case, tmp_path):
    # The Hugging Face cache layout: snapshot/model.onnx -> ../blobs/<hash>. Weights
    # referenced in place name the blob; a model's own external data stays relative
    # to the link's folder, as onnx.load reads it.
    import onnx

    _, path, data_path = vit_case
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (blobs / "3f9a").write_bytes(path.read_bytes())
    (snapshot / "model.onnx").symlink_to(blobs / "3f9a")
    onnx.save_model(onnx.load(str(path)), str(snapshot / "ext.onnx"), save_as_external_data=True,
                    location="ext.onnx.data", size_threshold=0)
    (blobs / "77c1").write_bytes((snapshot / "ext.onnx").read_bytes())
    (snapshot / "ext.onnx").unlink()
    (snapshot / "ext.onnx").symlink_to(blobs / "77c1")

    direct = run_select(path, data_path, calibration=BOTH)
    for linked in (snapshot / "model.onnx", snapshot / "ext.onnx"):
        got = run_select(linked, data_path, calibration=BOTH)
        assert got.masks.masks.keys() == direct.masks.masks.keys()
        for key, mask in direct.masks.masks.items():
            np.testing.assert_array_equal(got.masks.masks[key], mask)


def test_nan_in_activations_is_reported(vit_case, tmp_path):
    _, path, _ = vit_case
    bad = np.zeros((2, 3, 32, 32), np.float32)
    bad[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(NumericError, match="NaN or Inf in the input of .* in batch 0"):
        calibrate(path, tmp_path / "nan.npy", BOTH)


def test_corrupt_model_is_rejected(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="cannot read ONNX model"):
        calibrate(bad, tmp_path, BOTH)
    with pytest.raises(ModelError, match="does not exist"):
        calibrate(tmp_path / "none.onnx", tmp_path, BOTH)


def test_wrong_input_shape_says_what_the_model_expects(vit_case, tmp_path):
    _, path, _ = vit_case
    np.save(tmp_path / "small.npy", np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match=r"small.npy: x has shape \[2, 3, 16, 16\], the model expects x \[batch, 3, 32, 32\] float32"):
        calibrate(path, tmp_path / "small.npy", BOTH)


@pytest.mark.parametrize("contrib", [False, True])
def test_symbolic_shape_inference_runs_only_where_onnx_inference_loses_the_token_axes(
        tmp_path, monkeypatch, caplog, contrib):
    """x [B, S, 4] -> Relu (ONNX infers it) or com.microsoft Gelu (ONNX does not) -> MatMul(w)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fps_onnx.onnx import graph

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    act = (helper.make_node("Gelu", ["x"], ["h"], domain="com.microsoft") if contrib
           else helper.make_node("Relu", ["x"], ["h"]))
    g = helper.make_graph(
        [act, helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 4]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 3])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]], np.int64)
    np.savez(tmp_path / "d.npz", x=x, attention_mask=mask)
    calls = []
    symbolic = graph._symbolic_inference
    monkeypatch.setattr(graph, "_symbolic_inference", lambda m: calls.append(1) or symbolic(m))
    with caplog.at_level("INFO", logger="fps_onnx"):
        result = calibrate(tmp_path / "m.onnx", tmp_path / "d.npz", CalibrationConfig(provider="cpu"))
    assert len(calls) == (1 if contrib else 0)
    assert "token mask attention_mask applies to 1 of 1 weight inputs" in caplog.text
    got = result.stats.weights["w"]
    assert got.count == mask.sum()  # padded positions left out
    if not contrib:
        np.testing.assert_allclose(got.abs_sum, np.maximum(x, 0)[mask == 1].sum(0), rtol=1e-5)
