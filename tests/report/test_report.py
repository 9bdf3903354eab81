"""`fps-onnx inspect` and `fps-onnx diff` (fps_onnx.report) on hand-made mask files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from _cli import assert_one_error, invoke
from _models import make_model, tensor
from fps_onnx import report
from fps_onnx.errors import MaskError, StatsError
from fps_onnx.selection.maskfile import MaskFile
from fps_onnx.stats import ChannelStats, Stats

SHA = "a" * 64
META = {"model_sha256": SHA, "method": "fps", "norm": "l1", "level": "neuron",
        "budget": '{"fraction": 0.005}', "num_samples": "32"}


def mask(shape, *entries):
    m = np.zeros(shape, dtype=bool)
    for e in entries:
        m[e] = True
    return m


def save(path, masks, tensors=None, **meta):
    MaskFile(masks, tensors or {}, {**META, **meta}).save(path)
    return path


@pytest.fixture()
def masks_file(tmp_path):
    """Two layers of a decoder, an lm_head and a conv; 11 of 112 entries selected."""
    masks = {
        "model.layers.0.self_attn.q_proj.weight": mask((4, 4), (0, 0), (1, 2)),
        "model.layers.0.mlp.up_proj.weight": mask((8, 4), (0, 1), (3, 3), (7, 0)),
        "model.layers.1.self_attn.q_proj.weight": mask((4, 4), (2, 2)),
        "lm_head.weight": mask((6, 4)),
        "stem.weight": mask((2, 3, 2, 2), (0, 0, 0, 0), (0, 1, 1, 1), (1, 2, 0, 1), (1, 0, 0, 0),
                            (1, 1, 1, 0)),
    }
    return save(tmp_path / "masks.safetensors", masks, {"stem.weight": {"op": "Conv"}})


@pytest.mark.parametrize("name, op, ndim, expected", [
    ("model.layers.3.self_attn.q_proj.weight", "MatMul", 2, (3, "attn.q")),
    ("model.layers.3.self_attn.o_proj.weight", "MatMul", 2, (3, "attn.o")),
    ("model.layers.12.mlp.gate_proj.weight", "MatMul", 2, (12, "mlp.gate")),
    ("model.layers.12.mlp.down_proj.weight", "MatMul", 2, (12, "mlp.down")),
    ("encoder.layer.2.attention.self.key.weight", "MatMul", 2, (2, "attn.k")),
    ("encoder.layer.2.attention.self.value.weight", "MatMul", 2, (2, "attn.v")),
    ("encoder.layer.2.attention.output.dense.weight", "MatMul", 2, (2, "attn.o")),
    ("encoder.layer.2.intermediate.dense.weight", "MatMul", 2, (2, "mlp.up")),
    ("encoder.layer.2.output.dense.weight", "MatMul", 2, (2, "mlp.down")),
    ("transformer.h.5.attn.c_attn.weight", "MatMul", 2, (5, "attn.qkv")),
    ("transformer.h.5.attn.c_proj.weight", "MatMul", 2, (5, "attn.o")),
    ("transformer.h.5.mlp.c_fc.weight", "MatMul", 2, (5, "mlp.up")),
    ("transformer.h.5.mlp.c_proj.weight", "MatMul", 2, (5, "mlp.down")),
    ("blocks.7.attn.qkv.weight", "Gemm", 2, (7, "attn.qkv")),
    ("blocks.7.attn.proj.weight", "Gemm", 2, (7, "attn.o")),
    ("blocks.7.mlp.fc1.weight", "Gemm", 2, (7, "mlp.up")),
    ("blocks.7.mlp.fc2.weight", "Gemm", 2, (7, "mlp.down")),
    ("/model/layers.4/self_attn/v_proj/MatMul", None, 2, (4, "attn.v")),
    ("p_model_layers_9_mlp_up_proj_weight", None, 2, (9, "mlp.up")),
    ("lm_head.weight", "MatMul", 2, (None, "lm_head")),
    ("onnx::MatMul_123", "MatMul", 2, (None, "other")),
    ("model.layers.1.attn.Attention.weight", "Attention", 2, (1, "attn.qkv")),
    ("stem.weight", "Conv", 4, (None, "conv")),
    ("features.3.conv.weight", None, 4, (None, "conv")),
])
def test_classify_reads_depth_and_kind_from_names(name, op, ndim, expected):
    assert report.classify([name], op, ndim) == expected


def test_classify_takes_the_first_name_that_says_something():
    assert report.classify(["onnx::MatMul_7", "/model/layers.2/mlp/down_proj/MatMul"]) == (2, "mlp.down")


def test_summary_totals_per_depth_kind_and_neuron(masks_file):
    s = report.summarise(MaskFile.load(masks_file))
    assert (s.count.selected, s.count.total, s.count.tensors) == (11, 112, 5)
    depth = {d: (c.selected, c.total, c.tensors) for d, c in s.by_depth().items()}
    assert depth == {0: (5, 48, 2), 1: (1, 16, 1), None: (5, 48, 2)}
    kind = {k: (c.selected, c.total) for k, c in s.by_kind().items()}
    assert kind == {"attn.q": (3, 32), "mlp.up": (3, 32), "conv": (5, 24), "lm_head": (0, 24)}
    cells = {dk: c.selected for dk, c in s.by_depth_kind().items()}
    assert cells == {(0, "attn.q"): 2, (0, "mlp.up"): 3, (1, "attn.q"): 1, (None, "conv"): 5,
                     (None, "lm_head"): 0}
    # rows: q0 [1,1,0,0], up [1,0,0,1,0,0,0,1], q1 [0,0,1,0], lm_head 6x0, conv [2, 3]
    assert s.per_neuron == (16, 6, 1, 1)
    assert [t.key for t in s.tensors][:2] == ["model.layers.0.self_attn.q_proj.weight",
                                              "model.layers.0.mlp.up_proj.weight"]


def _stats(weights: dict[str, np.ndarray], sha: str = SHA) -> Stats:
    stats = Stats(sha, num_samples=4)
    for key, abs_sum in weights.items():
        acc = ChannelStats()
        acc.add(abs_sum=np.asarray(abs_sum, dtype=np.float64), count=2)
        stats.weights[key] = acc
    return stats


def test_activation_summary_and_top_channel_share():
    masks = MaskFile({
        "fc": mask((2, 10), (0, 9), (0, 1), (1, 9), (1, 2)),
        # grouped conv: 4 input channels in 2 groups; row 2 is in group 1, so its channel 1 is channel 3
        "conv": mask((4, 2, 1, 1), (2, 1, 0, 0), (0, 1, 0, 0)),
        # mapped weight stored [in, out]: input channels on axis 0
        "conv1d": mask((10, 2), (9, 0), (3, 1), (4, 1), (5, 0)),
        "nostats": mask((2, 2), (0, 0)),
    }, {"conv": {"op": "Conv"}, "conv1d": {"torch_transposed": True}}, dict(META))
    stats = _stats({"fc": np.arange(10), "conv": np.arange(4), "conv1d": np.arange(10)})
    s = {t.key: t.activation for t in report.summarise(masks, stats).tensors}
    assert s["fc"] == report.ChannelActivation(2.25, 4.5, 0.5, "mean_abs")
    assert s["conv"].top10_share == 0.5 and s["conv"].max == 1.5
    assert s["conv1d"].top10_share == 0.25
    assert s["nostats"] is None


def test_statistics_of_another_model_or_shape_are_refused():
    masks = MaskFile({"fc": mask((2, 10), (0, 0))}, {}, dict(META))
    with pytest.raises(StatsError, match="another model"):
        report.summarise(masks, _stats({"fc": np.ones(10)}, sha="b" * 64))
    with pytest.raises(StatsError, match="8 channels"):
        report.summarise(masks, _stats({"fc": np.ones(8)}))


def test_inspect_text_json_and_markdown(masks_file, tmp_path):
    result = invoke("inspect", masks_file)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith("11 of 112 weights selected (9.821%) in 5 tensors")
    assert any(line.split()[:5] == ["model.layers.0.mlp.up_proj.weight", "[8,", "4]", "3", "9.375%"]
               for line in lines)

    data = json.loads(invoke("inspect", masks_file, "--json").stdout)
    assert data["selected"] == 11 and data["total"] == 112
    assert data["by_depth"]["0"] == {"tensors": 2, "selected": 5, "total": 48, "fraction": 5 / 48}
    assert data["by_kind"]["conv"]["selected"] == 5
    assert data["tensors"]["stem.weight"]["kind"] == "conv"
    assert data["neurons_by_selected"] == {"0": 16, "1": 6, "2": 1, "3": 1}

    md = invoke("inspect", masks_file, "--markdown").stdout
    assert "| depth | attn.q | mlp.up | conv | lm_head | all |" in md
    assert "| 0 | 12.500% | 9.375% |  |  | 10.417% |" in md
    assert "| **all** | 9.375% | 9.375% | 20.833% | 0.000% | **9.821%** |" in md
    assert "**11** of **112** weights selected" in md


def test_inspect_reads_depth_and_kind_from_the_node_names_of_the_onnx_model(tmp_path):
    from onnx import helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["h"],
                              name="/model/layers.2/mlp/up_proj/MatMul"),
             helper.make_node("MatMul", ["h", "onnx::MatMul_8"], ["y"],
                              name="/model/layers.2/mlp/down_proj/MatMul")]
    model = make_model(nodes, [tensor("x", [1, 4])], [tensor("y", [1, 4])],
                       {"onnx::MatMul_7": w, "onnx::MatMul_8": w.T.copy()})
    onnx.save(model, tmp_path / "m.onnx")
    path = save(tmp_path / "m.safetensors", {"onnx::MatMul_7": mask((3, 4), (0, 0)),
                                             "onnx::MatMul_8": mask((4, 3), (1, 1), (2, 2))})
    assert json.loads(invoke("inspect", path, "--json").stdout)["by_kind"].keys() == {"other"}
    result = invoke("inspect", path, "--onnx", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {k: (t["depth"], t["kind"]) for k, t in data["tensors"].items()} == {
        "onnx::MatMul_7": (2, "mlp.up"), "onnx::MatMul_8": (2, "mlp.down")}
    missing = invoke("inspect", path, "--onnx", tmp_path / "none.onnx")
    assert_one_error(missing, "none.onnx")


def test_inspect_with_stats_adds_the_activation_columns(tmp_path):
    path = save(tmp_path / "m.safetensors", {"fc": mask((2, 10), (0, 9), (1, 2))})
    _stats({"fc": np.arange(10)}).save(tmp_path / "s.safetensors")
    result = invoke("inspect", path, "--stats", tmp_path / "s.safetensors")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("fc "))
    assert row.split()[-3:] == ["2.25", "4.5", "50.0%"]
    data = json.loads(invoke("inspect", path, "--stats", tmp_path / "s.safetensors", "--json").stdout)
    assert data["tensors"]["fc"]["activation"]["top10_share"] == 0.5


def test_inspect_png_is_a_png(masks_file, tmp_path):
    from PIL import Image

    png = tmp_path / "masks.png"
    result = invoke("inspect", masks_file, "--png", png, "--markdown")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 500
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_inspect_png_without_matplotlib_is_one_line(masks_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("inspect", masks_file, "--png", tmp_path / "x.png")
    line = assert_one_error(result, absent=[tmp_path / "x.png"])
    assert line == "Error: --png needs matplotlib; install it with: pip install 'fps-onnx[plot]'"


@pytest.mark.parametrize("args", [["inspect", "missing.safetensors"],
                                  ["diff", "missing.safetensors", "missing.safetensors"]])
def test_missing_file_is_one_error_line(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    line = assert_one_error(invoke(*args))
    assert line == "Error: mask file missing.safetensors does not exist"


def test_inspect_missing_stats_file_is_one_error_line(masks_file, tmp_path):
    assert_one_error(invoke("inspect", masks_file, "--stats", tmp_path / "none.safetensors"), "does not exist")


@pytest.fixture()
def pair(tmp_path):
    """A and B: w overlaps 2 of 4 entries; one tensor only in A (1 entry), one only in B (2)."""
    a = save(tmp_path / "a.safetensors", {"w": mask((2, 3), (0, 0), (0, 1), (1, 1)),
                                          "gone": mask((2, 2), (0, 0))})
    b = save(tmp_path / "b.safetensors", {"w": mask((2, 3), (0, 0), (1, 1), (1, 2)),
                                          "new": mask((3, 2), (0, 0), (2, 1))},
             budget='{"fraction":0.005}', num_samples="64")
    return a, b


def test_diff_jaccard_and_kept_share(pair):
    d = report.diff(MaskFile.load(pair[0]), MaskFile.load(pair[1]))
    (w,) = d.tensors
    assert (w.overlap.a, w.overlap.b, w.overlap.both, w.overlap.union) == (3, 3, 2, 4)
    assert w.overlap.jaccard == 0.5 and w.overlap.kept == pytest.approx(2 / 3)
    assert [t.key for t in d.only_a] == ["gone"] and [t.key for t in d.only_b] == ["new"]
    assert (d.overall.a, d.overall.b, d.overall.both) == (4, 5, 2)
    assert d.overall.jaccard == pytest.approx(2 / 7) and d.overall.kept == 0.5
    # the budget only differs in spacing; num_samples really differs
    assert d.meta == {"num_samples": ("32", "64")} and d.same_model is True


def test_diff_cli_min_overlap_gate(pair):
    ok = invoke("diff", *pair, "--min-overlap", "0.25")
    assert ok.exit_code == 0, ok.output
    assert "overall: jaccard 0.286, kept 0.500" in ok.stdout
    assert "only in A (1): gone" in ok.stdout and "num_samples: 32 -> 64" in ok.stdout

    bad = invoke("diff", *pair, "--min-overlap", "0.5")
    assert "overall: jaccard 0.286" in bad.stdout  # the report comes first
    assert bad.stderr.count("\n") == 1 and assert_one_error(bad, alone=False) == (
        "Error: overall Jaccard 0.2857 is below --min-overlap 0.5 (|A∩B| 2 of |A∪B| 7 selected entries)")

    data = json.loads(invoke("diff", *pair, "--json").stdout)
    assert data["tensors"]["w"]["jaccard"] == 0.5 and data["only_b"] == {"new": {"shape": [3, 2],
                                                                                  "selected": 2}}
    md = invoke("diff", *pair, "--markdown").stdout
    assert "**Jaccard 0.286**" in md and "| `w` | [2, 3] | 3 | 3 | 2 | 0.500 | 0.667 |" in md


def test_diff_of_identical_files_is_one(pair):
    result = invoke("diff", pair[0], pair[0], "--min-overlap", "1")
    assert result.exit_code == 0 and "overall: jaccard 1.000, kept 1.000" in result.stdout


def test_diff_refuses_masks_of_different_models_unless_allowed(pair, tmp_path):
    other = save(tmp_path / "o.safetensors", {"w": mask((2, 3), (0, 0))}, model_sha256="b" * 64)
    assert assert_one_error(invoke("diff", pair[0], other)) == (
        f"Error: {pair[0]} and {other} are masks of different models (model_sha256 aaaaaaaaaaaa vs "
        "bbbbbbbbbbbb); --allow-different-models compares them anyway")
    allowed = invoke("diff", pair[0], other, "--allow-different-models")
    assert allowed.exit_code == 0, allowed.output
    assert "warning: the masks are of different models" in allowed.stdout
    assert "overall: jaccard 0.250, kept 0.250" in allowed.stdout


def test_diff_refuses_different_shapes(pair, tmp_path):
    other = save(tmp_path / "o.safetensors", {"w": mask((3, 2), (0, 0))})
    assert assert_one_error(invoke("diff", pair[0], other)) == (
        f"Error: mask 'w' has shape [2, 3] in {pair[0]} and [3, 2] in {other}; cannot compare")
    with pytest.raises(MaskError, match="cannot compare"):
        report.diff(MaskFile.load(pair[0]), MaskFile.load(other))


def test_inspect_and_diff_import_neither_torch_nor_matplotlib(pair):
    code = (
        "import sys\n"
        "from fps_onnx.cli.main import main\n"
        "for args in (['inspect', sys.argv[1]], ['diff', sys.argv[1], sys.argv[2]]):\n"
        "    main.main(args, standalone_mode=False)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib'))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(pair[0]), str(pair[1])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "overall: jaccard" in done.stdout


@pytest.mark.parametrize("fmt", [[], ["--markdown"]])
def test_inspect_and_diff_print_names_from_files_on_one_line_each(tmp_path, fmt):
    """A mask key or metadata value with control characters cannot start a line of its own on stdout."""
    forged = "w\nError: forged\x1b[31m"
    a = save(tmp_path / "a.safetensors", {forged: mask((2, 3), (0, 1))}, method="fps\r\nforged")
    b = save(tmp_path / "b.safetensors", {forged: mask((2, 3), (0, 1)), "v": mask((2, 2), (1, 1))})
    for args in (["inspect", a, *fmt], ["diff", a, b, *fmt]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\r" not in result.output
        assert not any(line.startswith("Error:") for line in result.output.splitlines()), result.output
        assert "w\\nError: forged\\x1b[31m" in result.output
