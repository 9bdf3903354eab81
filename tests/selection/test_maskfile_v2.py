"""Mask format version 2 (index-coded): encodings, sizes, both versions read alike, forged files."""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
import tracemalloc

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from _cli import assert_one_error, invoke
from fps_onnx.errors import MaskError
from fps_onnx.selection import maskfile
from fps_onnx.selection.maskfile import MaskFile, WeightMask

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "masks_v1.safetensors"
# the flat indices the version 1 writer stored in the fixture
FIXTURE_INDICES = {
    "fc1.weight": [8, 10, 13, 17, 28, 32, 38, 41, 53, 58, 61, 66, 72, 83, 86, 88],
    "onnx::MatMul_5": [3, 6, 19, 30, 31, 39, 44],
    "conv.weight": [0, 3, 11, 25, 27, 35, 43, 48, 52, 59, 60, 68],
    "empty.weight": [],
}
FIXTURE_SHAPES = {"fc1.weight": (8, 12), "onnx::MatMul_5": (6, 8), "conv.weight": (4, 2, 3, 3),
                  "empty.weight": (3, 5)}


def _per_row(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((shape[0], int(np.prod(shape[1:]))), bool)
    for row in mask:
        row[rng.choice(row.size, k, replace=False)] = True
    return mask.reshape(shape)


def _masks():
    uneven = np.zeros((3, 5), bool)
    uneven.flat[[0, 1, 7, 14]] = True
    return {
        "neuron": _per_row((4, 10), 3),
        "layer": uneven,
        "empty": np.zeros((3, 5), bool),
        "conv": _per_row((4, 2, 3, 3), 2, seed=1),
        "vector": np.array([True, False, True]),
        "no_rows": np.zeros((0, 4), bool),
    }


def _header(path):
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return size, json.loads(fh.read(size))


def test_each_weight_is_stored_as_rows_of_positions_or_flat_indices(tmp_path):
    masks = _masks()
    MaskFile(masks, {}, {"method": "fps"}).save(tmp_path / "m.safetensors")
    _, header = _header(tmp_path / "m.safetensors")
    stored = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    assert stored == {"neuron": ("U16", [4, 3]), "layer": ("U32", [4]), "empty": ("U16", [3, 0]),
                      "conv": ("U16", [4, 2]), "vector": ("U32", [2]), "no_rows": ("U32", [0])}
    entries = json.loads(header["__metadata__"]["tensors"])
    assert {k: e["encoding"] for k, e in entries.items()} == {
        "neuron": "rows", "layer": "flat", "empty": "rows", "conv": "rows", "vector": "flat", "no_rows": "flat"}
    back = MaskFile.load(tmp_path / "m.safetensors")
    for key, mask in masks.items():
        assert back.shape(key) == mask.shape and back.count(key) == mask.sum()
        assert back.indices(key).dtype == np.int64
        np.testing.assert_array_equal(back.indices(key), np.flatnonzero(mask))
        np.testing.assert_array_equal(back.dense(key), mask)
        np.testing.assert_array_equal(back.masks[key], mask)
    np.testing.assert_array_equal(back.rows("neuron"), np.nonzero(masks["neuron"])[1].reshape(4, 3))
    assert back.rows("layer") is None
    assert back.selected == sum(m.sum() for m in masks.values()) and back.total == 40 + 15 + 15 + 72 + 3


def test_the_row_dtype_is_the_smallest_that_holds_the_row_length(tmp_path):
    assert [maskfile.rows_dtype(n) for n in (1, 1 << 16, (1 << 16) + 1, 1 << 32, (1 << 32) + 1)] == \
        [np.uint16, np.uint16, np.uint32, np.uint32, np.uint64]
    assert [maskfile.flat_dtype(n) for n in (0, 1 << 32, (1 << 32) + 1)] == [np.uint32, np.uint32, np.uint64]
    wide = np.zeros((2, (1 << 16) + 1), bool)
    wide[:, -1] = True
    MaskFile({"w": wide}).save(tmp_path / "w.safetensors")
    assert _header(tmp_path / "w.safetensors")[1]["w"]["dtype"] == "U32"
    np.testing.assert_array_equal(MaskFile.load(tmp_path / "w.safetensors").rows("w"), [[1 << 16], [1 << 16]])


def test_file_bytes_are_at_most_the_index_bytes_plus_the_header(tmp_path):
    masks = {f"layers.{i}.w": _per_row((64, 1024), 5, seed=i) for i in range(4)}
    masks["odd"] = np.zeros((32, 100), bool)
    masks["odd"].flat[::7] = True
    MaskFile(masks, {}, {"method": "fps"}).save(tmp_path / "m.safetensors")
    header_bytes, _ = _header(tmp_path / "m.safetensors")
    index_bytes = 4 * 64 * 5 * 2 + masks["odd"].sum() * 4
    assert os.path.getsize(tmp_path / "m.safetensors") <= 1.05 * index_bytes + 8 + header_bytes
    assert header_bytes % 8 == 0  # safetensors pads the header, never the tensors
    MaskFile(masks).save(tmp_path / "v1.safetensors", version="1")
    assert os.path.getsize(tmp_path / "v1.safetensors") > 40 * os.path.getsize(tmp_path / "m.safetensors")


def test_both_versions_read_back_the_same_masks(tmp_path):
    masks = _masks()
    for version in ("1", "2", "v1", "v2", None):
        maskfile.save_masks(MaskFile(masks), tmp_path / f"{version}.safetensors", version=version)
        back = maskfile.load_masks(tmp_path / f"{version}.safetensors")
        assert back.meta["format_version"] == (version or maskfile.DEFAULT_VERSION).removeprefix("v")
        for key, mask in masks.items():
            np.testing.assert_array_equal(back.indices(key), np.flatnonzero(mask))
    with pytest.raises(MaskError, match="mask format version must be one of 1, 2, not '3'"):
        MaskFile(masks).save(tmp_path / "bad.safetensors", version="3")
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_version_1_file_is_read_one_dense_mask_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    masks = {f"w{i}": rng.random((512, 2048)) < 0.005 for i in range(8)}  # 1 MiB each as bool
    MaskFile(masks).save(tmp_path / "v1.safetensors", version="1")
    del masks["w0"]  # keep the test's own arrays out of the measurement's way
    tracemalloc.start()
    try:
        back = MaskFile.load(tmp_path / "v1.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20  # about one 1 MiB dense mask (and its indices), not all eight
    for key, mask in masks.items():
        np.testing.assert_array_equal(back.indices(key), np.flatnonzero(mask))
        np.testing.assert_array_equal(back.dense(key), mask)


def test_a_mask_file_built_from_indices_checks_them():
    built = MaskFile.from_indices({"r": ((2, 5), np.array([[0, 4], [1, 2]], np.uint16)),
                                   "f": ((3, 3), np.array([0, 5, 8]))}, {}, {"method": "x"})
    np.testing.assert_array_equal(built.indices("r"), [0, 4, 6, 7])
    assert built.count("f") == 3 and built.shape("f") == (3, 3) and built.meta == {"method": "x"}
    wide = MaskFile.from_indices({"w": ((2, 3), np.array([[0], [2]], np.uint64))})
    assert wide.indices("w").dtype == np.int64 and wide.indices("w").tolist() == [0, 5]
    for shape, indices, message in [
        ((2, 5), np.array([[0, 4], [2, 2]]), "positions of a row are not strictly increasing"),
        ((2, 5), np.array([[0, 5], [1, 2]]), "a position lies outside the row length 5"),
        ((3, 3), np.array([0, 9]), "an index lies outside the weight's 9 entries"),
        ((3, 3), np.array([4, 4]), "flat indices are not strictly increasing"),
        ((3, 3), np.array([-1, 4]), "an index lies outside"),
        ((3, 3), np.array([[1], [2]]), "neither flat indices nor the positions of each row"),
        ((3, 3), np.array([0.0]), "are float64, not integers"),
        ((10**6, 10**6), np.array([0]), "claims more than 68,719,476,736 entries"),
    ]:
        with pytest.raises(MaskError, match=re.escape(message)):
            MaskFile.from_indices({"w": (shape, indices)})


def test_dense_masks_are_built_on_demand_and_refused_beyond_memory(monkeypatch):
    held = MaskFile.from_indices({"w": ((1 << 30, 16), np.array([5, (1 << 34) - 1]))})
    assert held.count("w") == 2 and held.total == 1 << 34
    monkeypatch.setattr(maskfile, "physical_memory", lambda: 1 << 30)
    with pytest.raises(MaskError, match=r"a dense mask of \[1073741824, 16\] .* does not fit"):
        held.dense("w")
    with pytest.raises(TypeError):
        held.masks["w"] = np.zeros(1, bool)  # a read-only view
    assert "w" in held.masks and list(held.masks) == ["w"]  # asked without building it
    small = MaskFile.from_indices({"w": ((2, 3), np.array([[1], [2]]))})
    assert small.dense("w") is not small.dense("w")  # built each time, not kept


def test_compact_keeps_only_indices():
    mask = _per_row((5, 7), 2)
    compact = WeightMask.compact(mask)
    mask[:] = False  # the array may be reused (scratch) once compacted
    assert compact.count == 10 and compact.rows().dtype == np.uint16 and compact.shape == (5, 7)
    assert WeightMask.compact(np.eye(3, 4, dtype=bool)).encoded()[0] == "rows"
    flat = WeightMask.compact(np.array([[True, True], [False, True]]))
    assert flat.encoded()[0] == "flat" and flat.encoded()[1].dtype == np.uint32


# --------------------------------------------------------------------------- version 1 fixture


def test_the_version_1_fixture_reads_through_every_reader(tmp_path):
    import fps_onnx
    from fps_onnx import report
    from fps_onnx.integrations import load_masks as integration_masks

    loaded = [MaskFile.load(FIXTURE), fps_onnx.load_masks(FIXTURE), maskfile.mask_file_of(FIXTURE),
              maskfile.mask_file_of(str(FIXTURE))]
    for masks in loaded:
        assert masks.meta["format_version"] == "1" and sorted(masks.keys()) == sorted(FIXTURE_INDICES)
        for key, indices in FIXTURE_INDICES.items():
            assert masks.shape(key) == FIXTURE_SHAPES[key]
            assert masks.indices(key).tolist() == indices and np.flatnonzero(masks.dense(key)).tolist() == indices
    dense = integration_masks(FIXTURE)
    assert {k: np.flatnonzero(m).tolist() for k, m in dense.items()} == FIXTURE_INDICES
    # rewritten as version 2, it holds the same selection
    loaded[0].save(tmp_path / "v2.safetensors")
    v2 = MaskFile.load(tmp_path / "v2.safetensors")
    assert {k: v2.indices(k).tolist() for k in v2.keys()} == FIXTURE_INDICES
    assert {k: e["encoding"] for k, e in v2.tensors.items()} == {
        "fc1.weight": "rows", "onnx::MatMul_5": "flat", "conv.weight": "rows", "empty.weight": "rows"}
    assert report.summarise(loaded[0]) == report.summarise(v2, source="masks")
    assert report.diff(loaded[0], v2).overall.jaccard == 1.0
    for command in (("inspect", FIXTURE, "--json"), ("diff", FIXTURE, tmp_path / "v2.safetensors", "--json")):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
    summary = json.loads(invoke("inspect", FIXTURE, "--json").stdout)
    assert summary["selected"] == sum(len(v) for v in FIXTURE_INDICES.values())


def test_the_version_1_fixture_attaches_to_a_model():
    torch = pytest.importorskip("torch")
    from fps_onnx.torch.train import sparse

    model = torch.nn.Module()
    model.fc1 = torch.nn.Linear(12, 8)
    model.conv = torch.nn.Conv2d(2, 4, 3)
    masks = MaskFile.load(FIXTURE).subset(["fc1.weight", "conv.weight"])
    deltas = sparse.attach(model, masks)
    assert {k: d.indices.tolist() for k, d in deltas.items()} == {
        k: FIXTURE_INDICES[k] for k in ("fc1.weight", "conv.weight")}


def test_readme_expands_a_version_2_file_with_numpy_alone(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    source = re.search(r"^def expand\(.*?(?=^\S|\Z)", readme, re.M | re.S).group(0)
    namespace = {"np": np}
    exec(source, namespace)  # noqa: S102 - the README's own lines
    MaskFile.load(FIXTURE).save(tmp_path / "v2.safetensors")
    with safe_open(str(tmp_path / "v2.safetensors"), "np") as fh:
        entries = json.loads(fh.metadata()["tensors"])
        for key in fh.keys():
            mask = namespace["expand"](entries[key], fh.get_tensor(key))
            assert np.flatnonzero(mask).tolist() == FIXTURE_INDICES[key] and mask.shape == FIXTURE_SHAPES[key]


# --------------------------------------------------------------------------- forged version 2 files


def _v2(path, arrays=None, tensors=None, **meta):
    arrays = {"W": np.array([[1], [0], [3]], np.uint16)} if arrays is None else arrays
    entry = {"shape": [3, 4], "selected": 3, "encoding": "rows", "op": "MatMul"}
    tensors = {"W": entry} if tensors is None else tensors
    full = {"format": "fps-mask", "format_version": "2", "model_sha256": "",
            "tensors": tensors if isinstance(tensors, str) else json.dumps(tensors), **meta}
    save_file(arrays, str(path), metadata=full)
    return path


def _entry(**change):
    return {"W": {"shape": [3, 4], "selected": 3, "encoding": "rows", **change}}


U16 = np.uint16
FORGED = [
    (dict(tensors=_entry(encoding="dense")), "encoding of 'W' must be one of rows, flat, not 'dense'"),
    (dict(tensors={"W": {"shape": [3, 4], "selected": 3}}), "encoding of 'W' must be one of rows, flat, not None"),
    (dict(tensors={}), "mask 'W' has no entry"),
    (dict(tensors={**_entry(), "V": _entry()["W"]}), "describes 'V', which is not a mask of the file"),
    (dict(tensors=_entry(shape=[10**6, 10**6])), r"claims more than 68,719,476,736 entries"),
    (dict(tensors=_entry(shape=[2**40, 2**40, 0])), r"claims more than"),
    (dict(tensors=_entry(shape="x")), "the shape must be a list of non-negative integers"),
    (dict(tensors=_entry(selected=6)), r"mask 'W' is uint16 \[3, 1\]; its entry \(rows, shape \[3, 4\], "
                                       r"6 selected\) makes it uint16 \[3, 2\]"),
    (dict(tensors=_entry(selected=4)), "encoded by rows, which a \\[3, 4\\] weight selecting 4 entries cannot be"),
    (dict(tensors=_entry(selected=13)), "selected of 'W' must be an integer from 0 to 12, not 13"),
    (dict(tensors=_entry(selected="3")), "selected of 'W' must be an integer from 0 to 12"),
    (dict(tensors=_entry(shape=[3, 70_000])), r"mask 'W' is uint16 \[3, 1\]; .* makes it uint32 \[3, 1\]"),
    (dict(arrays={"W": np.array([[1], [0], [3]], np.uint32)}), r"mask 'W' is uint32 \[3, 1\]; .* makes it uint16"),
    (dict(arrays={"W": np.array([[1], [0], [3]], np.int64)}), r"mask 'W' is I64 \[3, 1\]"),
    (dict(arrays={"W": np.array([[1], [0], [4]], U16)}), "a position lies outside the row length 4"),
    (dict(arrays={"W": np.array([[1, 1], [0, 2], [3, 0]], U16)}, tensors=_entry(selected=6)),
     "the positions of a row are not strictly increasing"),
    (dict(arrays={"W": np.array([3, 1, 7], np.uint32)}, tensors=_entry(encoding="flat")),
     "the flat indices are not strictly increasing"),
    (dict(arrays={"W": np.array([1, 1, 7], np.uint32)}, tensors=_entry(encoding="flat")),
     "the flat indices are not strictly increasing"),
    (dict(arrays={"W": np.array([1, 2, 12], np.uint32)}, tensors=_entry(encoding="flat")),
     "an index lies outside the weight's 12 entries"),
    (dict(arrays={"W": np.array([1, 2, 7], np.uint64)}, tensors=_entry(encoding="flat")),
     r"mask 'W' is uint64 \[3\]; .* makes it uint32 \[3\]"),
    (dict(tensors=_entry(onnx_layout="rows")), "onnx_layout of 'W' must be one of out_in, in_out, conv"),
    (dict(tensors="[]"), "metadata 'tensors' must be a JSON object, not list"),
]


@pytest.mark.parametrize("kwargs, message", FORGED)
def test_forged_version_2_files_are_refused(tmp_path, kwargs, message):
    path = _v2(tmp_path / "m.safetensors", **kwargs)
    with pytest.raises(MaskError, match=message):
        MaskFile.load(path)
    assert_one_error(invoke("inspect", path), "Error: ", alone=False)


def test_a_claimed_shape_is_refused_before_anything_is_allocated(tmp_path):
    rows = np.zeros((1000, 1), U16)
    path = _v2(tmp_path / "m.safetensors", {"W": rows},
               {"W": {"shape": [1000, 10**9], "selected": 1000, "encoding": "rows"}})
    tracemalloc.start()
    try:
        with pytest.raises(MaskError, match="claims more than"):
            MaskFile.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # what the file can claim is bounded by its bytes: a shape within the limit, few indices
    _v2(tmp_path / "ok.safetensors", {"W": np.array([5, 10**10], np.uint64)},
        {"W": {"shape": [2**34, 2], "selected": 2, "encoding": "flat"}})
    assert MaskFile.load(tmp_path / "ok.safetensors").indices("W").tolist() == [5, 10**10]


def test_select_writes_either_version_with_the_same_selection(chain, tmp_path):
    model, data = chain
    for fmt in ("v1", "v2", None):
        out = tmp_path / f"{fmt}.safetensors"
        result = invoke("select", model, data, "-o", out, "-q", *(("--mask-format", fmt) if fmt else ()))
        assert result.exit_code == 0, result.output
    v1, v2, default = (MaskFile.load(tmp_path / f"{f}.safetensors") for f in ("v1", "v2", None))
    assert (v1.meta["format_version"], v2.meta["format_version"], default.meta["format_version"]) == ("1", "2", "2")
    assert v1.keys() == v2.keys() and v1.selected > 0
    for key in v1.keys():
        np.testing.assert_array_equal(v1.indices(key), v2.indices(key))
    assert_one_error(invoke("select", model, data, "-o", tmp_path / "x.safetensors", "--mask-format", "v3"),
                     "Error: Invalid value for .--mask-format.", status=2, alone=False)


def test_consumers_work_from_the_indices_without_dense_masks(tmp_path, monkeypatch):
    from fps_onnx import report
    from fps_onnx.onnx.scope import ScopeConfig
    from fps_onnx.selection.exclude import drop_excluded

    MaskFile.load(FIXTURE).save(tmp_path / "v2.safetensors")
    masks = MaskFile.load(tmp_path / "v2.safetensors")
    per_row = sum(np.bincount(masks.dense(k).reshape(masks.shape(k)[0], -1).sum(axis=1), minlength=5)
                  for k in masks.keys())

    def refuse(self):
        raise AssertionError("a dense mask was built")

    monkeypatch.setattr(WeightMask, "dense", refuse)
    summary = report.summarise(masks)
    assert {t.key: t.selected for t in summary.tensors} == {k: len(v) for k, v in FIXTURE_INDICES.items()}
    assert summary.per_neuron == tuple(int(c) for c in np.trim_zeros(per_row, "b"))
    assert report.diff(masks, masks).overall.jaccard == 1.0
    kept = drop_excluded(masks, ScopeConfig(exclude=("conv",)))
    assert sorted(kept.keys()) == ["empty.weight", "fc1.weight", "onnx::MatMul_5"]
    kept.save(tmp_path / "kept.safetensors")
    assert MaskFile.load(tmp_path / "kept.safetensors").indices("fc1.weight").tolist() == FIXTURE_INDICES["fc1.weight"]
    torch = pytest.importorskip("torch")
    from fps_onnx.torch.mapping import map_masks
    from fps_onnx.torch.train import sparse

    model = torch.nn.Module()
    model.fc1 = torch.nn.Linear(12, 8)
    deltas = sparse.attach(model, masks.subset(["fc1.weight"]))
    assert deltas["fc1.weight"].indices.tolist() == FIXTURE_INDICES["fc1.weight"]
    state = {"fc1.weight": np.zeros((8, 12), np.float32), "conv.weight": np.zeros((4, 2, 3, 3), np.float32)}
    mapped, _ = map_masks(masks.subset(["fc1.weight", "conv.weight"]), state)
    assert {k: mapped.indices(k).tolist() for k in mapped.keys()} == {
        k: FIXTURE_INDICES[k] for k in ("fc1.weight", "conv.weight")}


def test_mapping_cuts_rows_and_transposes_in_index_form():
    from fps_onnx.torch.mapping import _cut

    mask = np.random.default_rng(3).random((6, 4)) < 0.4
    flat = np.flatnonzero(mask)
    for rows, transposed, want in [(None, False, mask), ((2, 5), False, mask[2:5]), (None, True, mask.T),
                                   ((1, 3), True, mask[1:3].T), ((0, 0), False, mask[0:0])]:
        shape, got = _cut(mask.shape, flat, rows, transposed)
        assert shape == want.shape and got.tolist() == np.flatnonzero(want).tolist()
