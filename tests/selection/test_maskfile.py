"""The mask file format: round trip, metadata, rejection of other files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from _cli import assert_one_error, invoke
from fps_onnx.errors import MaskError
from fps_onnx.onnx.sites import WeightSite
from fps_onnx.selection import maskfile


@pytest.mark.parametrize("version", ["1", "2"])
def test_round_trip_and_metadata(tmp_path, version):
    site = WeightSite("onnx::MatMul_7", "MatMul", "in_out", (3, 4), 4)
    mask = np.zeros((3, 4), bool)
    mask[:, 1] = True
    built = maskfile.build({site.key: mask}, [site], {"method": "fps", "norm": "l1", "budget": '{"per_neuron": 1}'})
    built.save(tmp_path / "m.safetensors", version=version)
    back = maskfile.MaskFile.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(back.masks[site.key], mask)
    assert back.meta["format"] == "fps-mask" and back.meta["format_version"] == version
    assert back.meta["tool"].startswith("fps-onnx ")
    assert back.tensors[site.key] == {
        "onnx_initializer": "onnx::MatMul_7", "onnx_layout": "in_out", "op": "MatMul",
        "shape": [3, 4], "selected": 3, **({"encoding": "rows"} if version == "2" else {}),
    }
    assert json.loads(back.meta["budget"]) == {"per_neuron": 1}
    assert back.selected == 3 and back.total == 12


def test_other_safetensors_files_are_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(path))
    with pytest.raises(MaskError, match="not an fps-onnx mask file"):
        maskfile.MaskFile.load(path)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.numpy

    def half_write(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    site = WeightSite("w", "MatMul", "out_in", (1, 1), 1)
    built = maskfile.build({"w": np.ones((1, 1), bool)}, [site], {})
    with pytest.raises(Exception, match="No space left"):
        built.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_file_gets_the_usual_permissions(tmp_path):
    import os
    import stat

    site = WeightSite("w", "MatMul", "out_in", (1, 1), 1)
    maskfile.build({"w": np.ones((1, 1), bool)}, [site], {}).save(tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o666 & ~mask


# --------------------------------------------------------------------------- forged metadata


def _entry(**change):
    entry = {"onnx_initializer": "W", "onnx_layout": "in_out", "op": "MatMul", "shape": [3, 4], "selected": 3}
    entry.update(change)
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()


def _mask():
    mask = np.zeros((3, 4), bool)
    mask[:, 1] = True
    return mask


def _write(path, tensors=None, masks=None, **meta):
    """A mask file with crafted metadata; ``tensors`` is dumped to JSON unless a str."""
    masks = {"W": _mask()} if masks is None else masks
    tensors = {"W": _entry()} if tensors is None else tensors
    full = {"format": "fps-mask", "format_version": "1", "model_sha256": "",
            "tensors": tensors if isinstance(tensors, str) or tensors is _DROP else json.dumps(tensors),
            **meta}
    save_file(masks, str(path), metadata={k: v for k, v in full.items() if v is not _DROP})
    return path


FORGED = [
    (dict(tensors="[]"), "metadata 'tensors' must be a JSON object, not list"),
    (dict(tensors='{"W": 5}'), "the entry of 'W' must be a JSON object"),
    (dict(tensors="{not json"), "metadata 'tensors' is not JSON"),
    (dict(tensors=_DROP), "metadata 'tensors' is missing"),
    (dict(tensors={"W": _entry(), "V": _entry()}), "describes 'V', which is not a mask of the file"),
    (dict(tensors={"W": _entry(shape="x")}), "shape of 'W' must be a list of non-negative integers"),
    (dict(tensors={"W": _entry(shape=[-3, 4])}), "shape of 'W' must be a list of non-negative integers"),
    (dict(tensors={"W": _entry(shape=[3.0, 4])}), "shape of 'W' must be a list of non-negative integers"),
    (dict(tensors={"W": _entry(shape=[True, 4])}), "shape of 'W' must be a list of non-negative integers"),
    (dict(tensors={"W": _entry(shape=_DROP)}), "shape of 'W' must be a list"),
    (dict(tensors={"W": _entry(shape=[4, 3])}), r"shape of 'W' is \[4, 3\], the mask's \[3, 4\]"),
    (dict(tensors={"W": _entry(selected="3")}), "selected of 'W' must be an integer"),
    (dict(tensors={"W": _entry(selected=_DROP)}), "selected of 'W' must be an integer"),
    (dict(tensors={"W": _entry(selected=4)}), "selected of 'W' is 4, the mask selects 3"),
    (dict(tensors={"W": _entry(onnx_initializer=5)}), "onnx_initializer of 'W' must be a string or null"),
    (dict(tensors={"W": _entry(onnx_layout="rows")}), "onnx_layout of 'W' must be one of out_in, in_out, conv"),
    (dict(tensors={"W": _entry(op=["MatMul"])}), "op of 'W' must be a string"),
    (dict(tensors={"W": _entry(torch_name=None)}), "torch_name of 'W' must be a string"),
    (dict(tensors={"W": _entry(torch_transposed="yes")}), "torch_transposed of 'W' must be true or false"),
    (dict(tensors={"W": _entry(tied_onnx_initializers="a")}), "tied_onnx_initializers of 'W' must be a list"),
    (dict(tensors={"W": _entry(torch_aliases=[1])}), "torch_aliases of 'W' must be a list of strings"),
    # JSON within limits: depth, size, integer digits, and what a message may repeat of it
    (dict(tensors="[" * 100_000 + "]" * 100_000), "metadata 'tensors' nests arrays and objects deeper than 100"),
    (dict(tensors='{"W": ' * 10_000 + "{}" + "}" * 10_000), "metadata 'tensors' nests arrays and objects deeper"),
    (dict(tensors='{"W": {"shape": [' + "3" * 5000 + ', 4], "selected": 3}}'),
     "metadata 'tensors' holds an integer of 5,000 digits"),
    (dict(tensors='{"W": {"shape": [3, 4], "selected": ' + "-" + "9" * 41 + "}}"),
     "metadata 'tensors' holds an integer of 41 digits"),
    (dict(tensors='{"W": {"shape": [3, 4], "selected": 1e400}}'), "metadata 'tensors' holds a number beyond float64"),
    (dict(tensors={"W": _entry(selected=10**39)}), "selected of 'W' is 1000000000000000000000000000000000000000, "),
    (dict(tensors={"W": _entry(shape=[0] * 200_000)}),
     r"shape of 'W' is \[0, 0, 0, .*\.\.\. \(600,000 characters\), the mask's \[3, 4\]"),
    (dict(tensors={"W": _entry(), "V" * 1_000_000: _entry()}),
     r"describes 'VVVV.*'\.\.\. \(1,000,000 characters\), which is not a mask"),
    (dict(tensors='{"W": {"shape": [3, 4], "selected": 3, "pad": "' + "x" * (16 << 20) + '"}}'),
     "metadata 'tensors' is larger than 16,777,216 characters"),
    (dict(budget="[" * 100_000), "metadata 'budget' nests arrays and objects deeper than 100 levels"),
    (dict(budget='{"per_neuron": ' + "1" * 5000 + "}"), "metadata 'budget' holds an integer of 5,000 digits"),
    (dict(budget="[1]"), "metadata 'budget' must be a JSON object"),
    (dict(budget="{per_neuron: 1}"), "metadata 'budget' is not JSON"),
    (dict(masks={"W": _mask().astype(np.uint8)}), "mask 'W' is uint8, not bool"),
    (dict(format_version="3"), "has mask format version 3, this fps-onnx reads 1 and 2"),
]


@pytest.mark.parametrize("kwargs, message", FORGED)
def test_forged_metadata_is_refused_on_load(tmp_path, kwargs, message):
    with pytest.raises(MaskError, match=message):
        maskfile.MaskFile.load(_write(tmp_path / "m.safetensors", **kwargs))


def test_unknown_keys_and_masks_without_an_entry_are_accepted(tmp_path):
    masks = {"W": _mask(), "V": np.ones((2, 2), bool)}
    tensors = {"W": _entry(true_means=[1.0, 2.0], layout="anything", torch_name="w", match="exact",
                           torch_transposed=True, tied_onnx_initializers=["A", None], torch_aliases=["b"])}
    back = maskfile.MaskFile.load(_write(tmp_path / "m.safetensors", tensors, masks, layout="future"))
    assert back.tensors["W"]["true_means"] == [1.0, 2.0] and "V" not in back.tensors
    assert back.meta["layout"] == "future"
    gps = _entry(onnx_initializer=None, onnx_layout="out_in", torch_name="W")
    assert maskfile.MaskFile.load(_write(tmp_path / "g.safetensors", {"W": gps})).tensors["W"] == gps


def test_mask_file_of_takes_a_mask_file_its_path_or_a_mapping_of_bool_arrays(tmp_path):
    masks = {"w": np.array([[True, False]]), "v": np.zeros((2, 3), bool)}
    loaded = maskfile.MaskFile(masks, {}, {"method": "fps"})
    assert maskfile.mask_file_of(loaded) is loaded
    loaded.save(tmp_path / "m.safetensors")
    for source in (tmp_path / "m.safetensors", str(tmp_path / "m.safetensors"), masks):
        got = maskfile.mask_file_of(source)
        assert sorted(got.masks) == ["v", "w"] and np.array_equal(got.masks["w"], masks["w"])
    assert maskfile.mask_file_of(tmp_path / "m.safetensors").meta["method"] == "fps"
    with pytest.raises(MaskError, match="mask 'w' is float64, not bool"):
        maskfile.mask_file_of({"w": np.ones((1, 2))})
    with pytest.raises(MaskError, match="a MaskFile or a path, not list"):
        maskfile.mask_file_of([masks["w"]])


def test_save_writes_shape_and_selected_from_the_masks(tmp_path):
    masks = {"W": _mask(), "V": np.ones((2, 2), bool)}
    built = maskfile.MaskFile(masks, {"W": {"shape": [9], "selected": 0, "op": "MatMul"}})
    built.save(tmp_path / "m.safetensors")
    back = maskfile.MaskFile.load(tmp_path / "m.safetensors")
    assert back.tensors == {"W": {"shape": [3, 4], "selected": 3, "op": "MatMul", "encoding": "rows"},
                            "V": {"shape": [2, 2], "selected": 4, "encoding": "rows"}}
    with pytest.raises(MaskError, match="op of 'W' must be a string"):
        maskfile.MaskFile(masks, {"W": {"op": 3}}).save(tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


SPEC = '''
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4)
'''


@pytest.mark.parametrize("kwargs, message", FORGED)
def test_forged_masks_fail_map_and_train_with_one_line(tmp_path, kwargs, message):
    pytest.importorskip("torch")
    (tmp_path / "spec.py").write_text(SPEC)
    spec = f"{tmp_path / 'spec.py'}:build"
    kwargs = dict(kwargs)
    if "masks" in kwargs:
        kwargs["masks"] = {"0.weight": kwargs["masks"]["W"]}
    if isinstance(kwargs.get("tensors"), dict) and "W" in kwargs["tensors"]:
        kwargs["tensors"] = {"0.weight" if k == "W" else k: v for k, v in kwargs["tensors"].items()}
    elif isinstance(kwargs.get("tensors"), str):
        kwargs["tensors"] = kwargs["tensors"].replace('"W"', '"0.weight"')
    elif "tensors" not in kwargs:
        kwargs["tensors"] = {"0.weight": _entry()}
    kwargs.setdefault("masks", {"0.weight": _mask()})
    masks = _write(tmp_path / "m.safetensors", **kwargs)
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 2, 0]))
    out = tmp_path / "out.safetensors"
    for args in (["map", masks, "--model", spec, "-o", out],
                 ["train", "--model", spec, "--masks", masks, "--train", tmp_path / "train.npz", "-o", out]):
        assert_one_error(invoke(*args), message.replace("'W'", "'0.weight'"), alone=False, absent=[out])


def test_a_valid_forged_mask_file_maps(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "spec.py").write_text(SPEC)
    masks = _write(tmp_path / "m.safetensors", {"0.weight": _entry()}, {"0.weight": _mask()})
    out = tmp_path / "out.safetensors"
    result = invoke("map", masks, "--model", f"{tmp_path / 'spec.py'}:build", "-o", out)
    assert result.exit_code == 0, result.output
    assert maskfile.MaskFile.load(out).tensors["0.weight"]["torch_name"] == "0.weight"


@pytest.mark.parametrize("kwargs, message", [case for case in FORGED if "budget" in case[0] or (
    isinstance(case[0].get("tensors"), str) and len(case[0]["tensors"]) > 1000)])
def test_forged_metadata_fails_inspect_and_diff_with_one_line(tmp_path, kwargs, message):
    import time

    bad = _write(tmp_path / "bad.safetensors", **kwargs)
    good = _write(tmp_path / "good.safetensors", budget='{"per_neuron": 1}')
    for args in (["inspect", bad], ["inspect", bad, "--json"], ["diff", good, bad], ["diff", bad, good]):
        start = time.monotonic()
        assert_one_error(invoke(*args), message)
        assert time.monotonic() - start < 10
