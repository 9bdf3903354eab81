"""The LLM fine-tuning benchmark's bookkeeping: run order, lr choice, paired differences, report (no training)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
import sys

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def lf():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("llm_finetune_under_test", BENCH / "llm_finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    sys.path.remove(str(BENCH))


def _bench(lf, tmp_path):
    return lf.Bench(dict(lf.SMOKE), tmp_path / "work", tmp_path / "results" / lf.NAME)


def _finish(lf, bench, domain, method, lr, seed, val, test, **extra):
    cell = lf.Cell(domain, method, lr, seed)
    rec = {**extra, "domain": domain, "method": method, "lr": lr, "seed": seed, "val_ppl": val, "test_ppl": test,
           "config": bench.config(), "selection": None, "corpus": None,
           "train": {"trainable": 10, "step_s_all": 1.0, "optimizer_state_bytes": 80},
           "train_process": {"wall_s": 1.0, "peak_rss_gib": 1.0, "cpu_s": 1.0, "parent_floor_gib": 0.1},
           "cell_seconds": 60.0, "finished": "now"}
    path = bench.path(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_plan_runs_zero_shot_then_each_phase_grids_then_later_seeds(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    plan = bench.plan(["kjv", "man"], ["zero", "full", "random", "fps", "lora"], [0, 1])
    names = [(c.domain, c.method, c.seed) for c in plan]
    assert names[:2] == [("kjv", "zero", 0), ("man", "zero", 0)]
    firsts = {m: min(i for i, n in enumerate(names) if n[1] == m) for m in ("lora", "fps", "random", "full")}
    assert firsts["lora"] < firsts["fps"] < firsts["random"] < firsts["full"]
    # LoRA and FPS of the first domain come before either of the second one
    assert max(i for i, n in enumerate(names) if n[:2] in {("kjv", "lora"), ("kjv", "fps")} and n[2] == 0) \
        < min(i for i, n in enumerate(names) if n[:2] == ("man", "lora"))
    grid = [c for c in plan if c.seed == 0 and c.method == "lora" and c.domain == "kjv"]
    assert [c.lr for c in grid] == list(lf.GRID)
    later = [c for c in plan if c.seed == 1]
    assert len(later) == 2 * 4 and all(c.lr is None for c in later)  # no lr chosen yet
    assert all(names.index((c.domain, c.method, 1)) > names.index((c.domain, c.method, 0)) for c in later)
    # phase by phase: LoRA's and FPS's other seeds before the baselines' grids, random's before full's
    assert max(names.index((d, m, 1)) for d in ("kjv", "man") for m in ("lora", "fps")) < firsts["random"]
    assert max(names.index((d, "random", 1)) for d in ("kjv", "man")) < firsts["full"]


def test_lr_is_chosen_on_validation_only_once_the_grid_is_finished(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    _finish(lf, bench, "kjv", "fps", 1e-3, 0, val=20.0, test=30.0)
    _finish(lf, bench, "kjv", "fps", 3e-3, 0, val=19.0, test=35.0)
    assert bench.chosen_lr("kjv", "fps", 0) is None
    _finish(lf, bench, "kjv", "fps", 1e-2, 0, val=None, test=None)  # diverged
    assert bench.chosen_lr("kjv", "fps", 0) == 3e-3  # lowest validation, not test, perplexity
    plan = bench.plan(["kjv"], ["fps"], [0, 1, 2])
    assert [(c.lr, c.seed) for c in plan if c.seed > 0] == [(3e-3, 1), (3e-3, 2)]


def test_new_selectors_are_screened_on_the_first_domain_and_only_the_best_goes_on(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    methods, seeds = ["lora", "fps", "fps-neuron", "fps-a05"], [0, 1]

    def runnable(plan):
        return {(c.domain, c.method, c.seed) for c in plan if c.lr is not None}

    plan = bench.plan(["kjv", "man"], methods, seeds)
    # LoRA's and FPS's grids on every domain come before any candidate's cell
    assert max(i for i, c in enumerate(plan) if c.method in ("lora", "fps") and c.seed == 0) \
        < min(i for i, c in enumerate(plan) if c.method in ("fps-neuron", "fps-a05"))
    assert ("kjv", "fps-neuron", 0) in runnable(plan) and ("man", "fps-neuron", 0) not in runnable(plan)
    assert ("man", "fps", 0) in runnable(plan)  # plain FPS is no candidate: it runs everywhere
    waiting = [c for c in plan if c.lr is None and c.method in ("fps-neuron", "fps-a05")]
    assert {(c.domain, c.seed) for c in waiting} == {("man", 0), ("kjv", 1), ("man", 1)}
    for lr, val in zip(lf.GRID, (20.0, 18.0, 19.0)):
        _finish(lf, bench, "kjv", "fps-neuron", lr, 0, val=val, test=30.0)
    for lr, val in zip(lf.GRID, (19.0, 18.5, None)):
        _finish(lf, bench, "kjv", "fps-a05", lr, 0, val=val, test=25.0)  # better test, worse validation
    assert bench.screened("kjv", ["fps-neuron", "fps-a05"], 0) == "fps-neuron"
    plan = bench.plan(["kjv", "man"], methods, seeds)
    assert all(c.method != "fps-a05" for c in plan if (c.domain, c.seed) != ("kjv", 0))
    assert {("man", "fps-neuron", 0), ("kjv", "fps-neuron", 1)} <= runnable(plan)
    assert [c.lr for c in plan if (c.domain, c.method, c.seed) == ("man", "fps-neuron", 1)] == [None]  # man's grid
    assert [c.lr for c in plan if (c.method, c.seed) == ("fps-neuron", 1) and c.domain == "kjv"] == [lf.GRID[1]]


def test_cells_of_a_pick_a_later_candidate_displaced_stay_in_the_tables(lf, tmp_path):
    """A candidate added after the screen picked another: once it leads, the former pick's cells on other
    domains and seeds leave the plan but not the report (counted beside the plan's)."""
    bench = _bench(lf, tmp_path)
    methods, seeds = ["lora", "fps-neuron", "fps-a05"], [0, 1]
    for lr in lf.GRID:
        _finish(lf, bench, "kjv", "fps-neuron", lr, 0, val=18.0 if lr == lf.GRID[1] else 19.0, test=30.0)
        _finish(lf, bench, "man", "fps-neuron", lr, 0, val=8.0 if lr == lf.GRID[1] else 9.0, test=8.5)
    _finish(lf, bench, "man", "fps-neuron", lf.GRID[1], 1, val=8.1, test=8.6)
    for lr in lf.GRID:  # the later candidate leads on kjv's validation
        _finish(lf, bench, "kjv", "fps-a05", lr, 0, val=17.0 if lr == lf.GRID[1] else 19.0, test=29.0)
    assert all(c.method != "fps-neuron" for c in bench.plan(["kjv", "man"], methods, seeds) if c.domain == "man")
    summary = lf.summarize(bench, ["kjv", "man"], methods, seeds)
    man = summary["domains"]["man"]["methods"]["fps-neuron"]
    assert man["lr"] == lf.GRID[1] and man["test_ppl"] == {"0": 8.5, "1": 8.6}
    assert summary["extra_cells"] == 4  # man's grid (3) and seed 1
    md = lf._markdown(summary, methods, bench, "")
    assert "4 cells outside the plan (rows run on request, candidates the screen passed over)" in md


def test_rows_the_pre_screen_dropped_get_no_cells_and_are_named_in_the_report(lf, tmp_path, monkeypatch):
    monkeypatch.setitem(lf.METHODS, "fps-lr16", dataclasses.replace(lf.METHODS["fps-lr16"], full=False))
    dropped = [m for m in lf.METHODS if not lf.METHODS[m].full]
    assert dropped == ["fps-lr16"] and {"lora", "fps", "gps"} <= set(lf.planned()) and dropped[0] not in lf.planned()
    bench = _bench(lf, tmp_path)
    assert not any(c.method == "fps-lr16" for c in bench.plan(["kjv"], lf.planned(), [0]))
    _finish(lf, bench, "kjv", "zero", 0.0, 0, val=25.0, test=26.0)
    lf.report(bench, tmp_path / "out", ["kjv"], [m for m in lf.planned() if m != "full"], [0])
    md = (tmp_path / "out" / f"{lf.NAME}.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- dropped by the pre-screen"))
    assert all(lf.METHODS[m].label in line for m in dropped)
    assert not any(f"| {lf.METHODS[m].label} |" in md for m in dropped)


def test_a_cell_made_with_other_settings_does_not_count(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    _finish(lf, bench, "kjv", "lora", 1e-3, 0, val=20.0, test=30.0)
    assert bench.done(lf.Cell("kjv", "lora", 1e-3, 0)) is not None
    other = lf.Bench({**lf.SMOKE, "steps": 3}, tmp_path / "work", tmp_path / "results" / lf.NAME)
    assert other.done(lf.Cell("kjv", "lora", 1e-3, 0)) is None


def test_the_ladder_steps_one_rung_of_1_3_10(lf):
    assert [lf.ladder(x, up=True) for x in (1e-3, 3e-3, 1e-2, 3e-5, 1e-4)] == [3e-3, 1e-2, 3e-2, 1e-4, 3e-4]
    assert [lf.ladder(x, up=False) for x in (1e-3, 3e-3, 1e-2, 1e-5)] == [3e-4, 1e-3, 3e-3, 3e-6]


def test_a_best_lr_at_an_end_extends_the_search_past_it_up_to_the_limit(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    for lr, val in zip(lf.GRID, (20.0, 21.0, 23.0)):  # best at the grid's bottom
        _finish(lf, bench, "kjv", "fps", lr, 0, val=val, test=30.0)
    assert bench.chosen_lr("kjv", "fps", 0) is None  # 3e-4 is due first
    plan = bench.plan(["kjv"], ["fps"], [0, 1])
    assert [(c.lr, c.seed) for c in plan] == [(1e-3, 0), (3e-3, 0), (1e-2, 0), (3e-4, 0), (None, 1)]
    _finish(lf, bench, "kjv", "fps", 3e-4, 0, val=19.0, test=30.0)  # better again: one more rung
    assert bench.seed0_lrs("kjv", "fps", 0) == ([1e-3, 3e-3, 1e-2, 3e-4, 1e-4], None)
    _finish(lf, bench, "kjv", "fps", 1e-4, 0, val=18.0, test=30.0)  # better still, but the limit is reached
    assert lf.EXTEND == 2 and bench.seed0_lrs("kjv", "fps", 0)[1] == bench.chosen_lr("kjv", "fps", 0) == 1e-4
    assert [(c.lr, c.seed) for c in bench.plan(["kjv"], ["fps"], [0, 1])][-1] == (1e-4, 1)
    e = lf.summarize(bench, ["kjv"], ["fps"], [0, 1])["domains"]["kjv"]["methods"]["fps"]
    assert e["lr_at_edge"] and list(e["grid_val_ppl"]) == ["0.0001", "0.0003", "0.001", "0.003", "0.01"]
    # a worse (or diverged) rung past the top settles the search inside, with no edge
    for lr, val in zip(lf.GRID, (23.0, 21.0, 20.0)):
        _finish(lf, bench, "kjv", "lora", lr, 0, val=val, test=30.0)
    assert bench.seed0_lrs("kjv", "lora", 0) == ([1e-3, 3e-3, 1e-2, 3e-2], None)
    _finish(lf, bench, "kjv", "lora", 3e-2, 0, val=None, test=None)
    assert bench.chosen_lr("kjv", "lora", 0) == 1e-2
    e = lf.summarize(bench, ["kjv"], ["lora"], [0])["domains"]["kjv"]["methods"]["lora"]
    assert e["lr_at_edge"] is False and e["grid_diverged"] == ["0.03"]


def test_a_new_selector_is_held_to_fps_mean_plus_fps_std_with_the_paired_difference_beside(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    for m in ("lora", "fps", "fps-cap2"):  # each best at the grid's middle lr on seed 0
        for lr, val in zip(lf.GRID, (22.0, 20.0, 22.0)):
            _finish(lf, bench, "kjv", m, lr, 0, val=val, test=40.0)
    methods = ["lora", "fps", "fps-cap2"]
    for m, tests in (("lora", (31.0, 31.0)), ("fps", (30.0, 30.2)), ("fps-cap2", (30.5, 30.1))):
        for seed, test in enumerate(tests):
            _finish(lf, bench, "kjv", m, 3e-3, seed, val=20.0, test=test)

    def fps_target():
        s = lf.summarize(bench, ["kjv"], methods, [0, 1])
        return next(t for t in s["targets"] if "FPS-sparse, column cap 2 not above FPS-sparse" in t["target"])

    t = fps_target()  # mean 30.3 > 30.1 + 0.141
    assert t["met"] is False
    assert t["detail"] == "30.300 vs 30.100 ± 0.141; paired difference +0.200 ± 0.424"
    _finish(lf, bench, "kjv", "fps-cap2", 3e-3, 1, val=20.0, test=29.9)  # mean 30.2 <= 30.241
    t = fps_target()
    assert t["met"] is True and t["detail"].endswith("paired difference +0.100 ± 0.566")


def test_a_seed_that_diverged_fails_its_methods_targets_instead_of_leaving_the_mean(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    methods = ["lora", "fps", "fps-cap2", "random"]
    for m in methods:  # each best at the grid's middle lr on seed 0
        for lr, val in zip(lf.GRID, (22.0, 20.0, 22.0)):
            _finish(lf, bench, "kjv", m, lr, 0, val=val, test=40.0)
    for m, tests in (("lora", (31.0, 31.0)), ("fps", (30.0, None)), ("fps-cap2", (20.0, None)),
                     ("random", (32.0, 32.0))):
        for seed, test in enumerate(tests):
            _finish(lf, bench, "kjv", m, 3e-3, seed, val=20.0 if test else None, test=test)
    s = lf.summarize(bench, ["kjv"], methods, [0, 1])
    cap = s["domains"]["kjv"]["methods"]["fps-cap2"]
    assert cap["diverged_seeds"] == ["1"] and "test_ppl_mean" not in cap  # not 20.0, its one finite seed
    assert cap["minus_lora"] == {"0": -11.0}
    targets = {t["target"].split(" (")[0]: t for t in s["targets"]}
    ratio = targets["FPS-sparse, column cap 2 <= 0.97x LoRA's test perplexity"]
    assert ratio == {"target": ratio["target"], "met": False, "detail": "diverged on seed 1 vs 31.000"}
    near = targets["FPS-sparse, column cap 2 not above FPS-sparse by more than FPS-sparse's std"]
    assert near["met"] is False
    assert near["detail"] == "diverged on seed 1 vs diverged on seed 1; paired difference -10.000 ± 0.000 over seed(s) 0"
    below = targets["FPS-sparse below random-sparse in every seed"]
    assert below["met"] is False and below["detail"] == "seed 0: 30.000 vs 32.000, seed 1: diverged vs 32.000"
    md = lf._markdown(s, methods, bench, "")
    assert "| FPS-sparse, column cap 2 | 0.003 | 20.000 | diverged on seed 1 | 2 | 20.000, diverged | -11.000 |" in md


def test_the_figure_plots_each_seed_over_loras_same_seed_and_writes_a_png(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    methods = ["zero", "lora", "fps", "random"]
    _finish(lf, bench, "kjv", "zero", 0.0, 0, val=30.0, test=30.0)
    for m in methods[1:]:
        for lr, val in zip(lf.GRID, (22.0, 20.0, 22.0)):
            _finish(lf, bench, "kjv", m, lr, 0, val=val, test=40.0)
    for m, tests in (("lora", (20.0, 25.0)), ("fps", (19.0, 25.0)), ("random", (None, None))):
        for seed, test in enumerate(tests):
            _finish(lf, bench, "kjv", m, 3e-3, seed, val=20.0 if test else None, test=test)
    s = lf.summarize(bench, ["kjv"], methods, [0, 1])
    assert lf._ratios(s["domains"]["kjv"]["methods"], methods) == [("fps", {"0": 0.95, "1": 1.0})]  # random: none
    lf.report(bench, tmp_path / "out", ["kjv"], methods, [0, 1])
    assert (tmp_path / "out" / f"{lf.NAME}.png").read_bytes()[:4] == b"\x89PNG"
    # the legend names every seed a row has, not only the first row's
    handles = lf._seed_handles([("fps", {"0": 0.95}), ("fps-ss", {"0": 0.9, "2": 0.97, "1": 1.0})])
    assert [(h.get_label(), h.get_marker()) for h in handles] == [("seed 0", "o"), ("seed 1", "^"), ("seed 2", "s")]


def test_summary_pairs_seeds_against_lora_and_flags_an_edge_lr(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    for lr, val in zip((*lf.GRID, 3e-2, 1e-1), (25.0, 23.0, 22.0, 21.5, 21.0)):  # LoRA best at the top, twice past it
        _finish(lf, bench, "kjv", "lora", lr, 0, val=val, test=val + 10)
    for lr, val in zip((*lf.GRID, 3e-4), (20.0, 24.0, 26.0, 21.0)):  # FPS best at the grid's bottom, not past it
        _finish(lf, bench, "kjv", "fps", lr, 0, val=val, test=val + 10)
    for lr, val in zip(lf.GRID, (23.0, 22.0, 24.0)):
        _finish(lf, bench, "kjv", "random", lr, 0, val=val, test=val + 10)
    _finish(lf, bench, "kjv", "lora", 1e-1, 1, val=21.0, test=33.0)
    _finish(lf, bench, "kjv", "fps", 1e-3, 1, val=20.0, test=32.0)
    _finish(lf, bench, "kjv", "random", 3e-3, 1, val=20.0, test=31.0)
    s = lf.summarize(bench, ["kjv"], ["lora", "fps", "random"], [0, 1])
    fps, lora = s["domains"]["kjv"]["methods"]["fps"], s["domains"]["kjv"]["methods"]["lora"]
    assert lora["lr"] == 1e-1 and lora["lr_at_edge"]
    assert fps["lr"] == 1e-3 and not fps["lr_at_edge"]
    assert s["domains"]["kjv"]["methods"]["random"]["lr_at_edge"] is False
    assert fps["test_ppl"] == {"0": 30.0, "1": 32.0}
    assert fps["minus_lora"] == {"0": -1.0, "1": -1.0}
    assert fps["minus_lora_mean"] == pytest.approx(-1.0) and fps["minus_lora_std"] == pytest.approx(0.0)
    assert "minus_lora" not in lora
    ratio = next(t for t in s["targets"] if "0.97x" in t["target"])
    assert ratio["met"] is True and "31.000 vs 32.000 (0.969x)" in ratio["detail"]
    below = next(t for t in s["targets"] if "below random" in t["target"])
    assert below["met"] is False  # seed 1: 32.0 vs 31.0
    md = lf._markdown(s, ["lora", "fps", "random"], bench, "a note")
    assert "1e-2" not in md and "| 0.1 **edge** |" in md and "a note" in md
    assert "| FPS-sparse | 0.001 | 20.000 | 31.000 ± 1.414 | 2 | 30.000, 32.000 | -1.000 ± 0.000 |" in md
    assert "- FPS-sparse: 0.0003: 21.000, **0.001: 20.000**, 0.003: 24.000, 0.01: 26.000" in md
    one = lf._markdown(lf.summarize(bench, ["kjv"], ["lora", "fps", "random"], [0]), ["lora", "fps", "random"], bench, "")
    assert "| FPS-sparse | 0.001 | 20.000 | 30.000 | 1 | 30.000 | -1.000 | -1.000 |" in one  # no std of one seed


def test_the_report_says_which_versions_made_how_many_cells(lf, tmp_path):
    bench = _bench(lf, tmp_path)
    made = lf.versions(*lf.DISTS)
    assert made["python"] and made["torch"] and made["fps-onnx"]  # read from package metadata
    _finish(lf, bench, "kjv", "lora", 1e-3, 0, val=20.0, test=21.0)  # a cell from before recording began
    for lr in (3e-3, 1e-2):
        _finish(lf, bench, "kjv", "lora", lr, 0, val=20.0, test=21.0, versions={"python": "3.11.7", "torch": "9.9",
                                                                               "peft": None})
    md = lf._markdown(lf.summarize(bench, ["kjv"], ["lora"], [0]), ["lora"], bench, "")
    assert "not recorded: 1 cell; python 3.11.7, torch 9.9: 2 cells" in md


def test_every_select_row_is_a_valid_select_command(lf, chain, tmp_path):
    from _cli import invoke
    from fps_onnx.selection.maskfile import MaskFile

    model, data = chain
    rows = {m: spec for m, spec in lf.METHODS.items() if spec.select and not spec.torch}
    assert {"fps", "fps-neuron", "fps-lr16", "fps-a05", "fps-cap2"} <= {m for m in rows if rows[m].label_free}
    for m, spec in rows.items():
        out = tmp_path / f"{m}.safetensors"
        result = invoke("select", model, data, "-o", out, *spec.select, "--seed", "0", "--shira-r", "1", "-q")
        assert result.exit_code == 0, (m, result.output)
        assert MaskFile.load(out).masks["w1"].sum() == 11  # r*(in+out) of w1 [5, 6]: LoRA's count
    assert MaskFile.load(tmp_path / "fps-a05.safetensors").meta["act_power"] == "0.5"
    assert MaskFile.load(tmp_path / "fps-cap2.safetensors").meta["column_cap"] == "2.0"
    assert MaskFile.load(tmp_path / "fps-lr16.safetensors").meta["low_rank"] == "16"
    assert MaskFile.load(tmp_path / "fps-neuron.safetensors").meta["level"] == "neuron"


def test_the_gps_row_selects_on_the_pytorch_model(lf, tmp_path):
    """GPS is `fps-onnx select` too, given the model folder (hf:DIR) and the calibration blocks."""
    pytest.importorskip("transformers")
    from _cli import invoke
    from fps_onnx.selection.maskfile import MaskFile
    from llm_models import save_tiny_llm

    assert [m for m, spec in lf.METHODS.items() if spec.torch] == ["gps"]
    folder = save_tiny_llm("llama", tmp_path / "llama")
    ids = np.random.default_rng(0).integers(4, 300, (4, 12))
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))  # as _llm_data.py writes it
    out = tmp_path / "gps.safetensors"
    result = invoke("select", f"hf:{folder}", tmp_path / "calib.npz", "-o", out, *lf.METHODS["gps"].select,
                    "--seed", "0", "--shira-r", "1", "--batch-size", "2", "-q")
    assert result.exit_code == 0, result.output
    masks = MaskFile.load(out)
    assert len(masks.masks) == 14 and masks.meta["method"] == "gps"  # q/k/v/o/gate/up/down of 2 layers
    assert masks.masks["model.layers.0.self_attn.q_proj.weight"].sum() == 64 + 64  # r*(in+out): LoRA's count


def test_the_hindsight_row_runs_on_request_only_after_full_fine_tuning(lf, tmp_path):
    assert "hindsight" not in lf.planned() and "full" in lf.planned()
    bench = _bench(lf, tmp_path)
    plan = bench.plan(["kjv"], ["fps", "full", "hindsight"], [0, 1])
    order = [c.method for c in plan if c.seed == 0]
    assert max(i for i, m in enumerate(order) if m == "full") < min(i for i, m in enumerate(order) if m == "hindsight")
    assert [c.lr for c in plan if c.method == "hindsight" and c.seed == 0] == list(lf.GRID)
    _finish(lf, bench, "kjv", "hindsight", 3e-3, 0, val=15.0, test=16.0)
    s = lf.summarize(bench, ["kjv"], ["fps", "full", "hindsight"], [0, 1])
    assert s["cells_done"] == 0 and s["cells_planned"] == 2 * (3 + 1)  # fps and full: grid + seed 1
    assert s["cell_minutes"] == 0 and (s["extra_cells"], s["extra_minutes"]) == (1, 1.0)  # counted apart
    assert s["domains"]["kjv"]["methods"]["hindsight"]["grid_val_ppl"]["0.003"] == 15.0
    assert not any("hindsight" in t["target"] for t in s["targets"])  # no selector: no targets
    assert bench.has_cells("hindsight") and not bench.has_cells("fps")


def test_a_hindsight_mask_is_made_again_when_its_full_cell_made_a_new_update(lf, tmp_path, monkeypatch):
    bench = _bench(lf, tmp_path)
    monkeypatch.setattr(bench, "calib", lambda domain, seed: tmp_path / "calib32-s0.npz")
    delta = bench.delta(lf.Cell("kjv", "full", lf.METHODS["hindsight"].hindsight_of, 0))
    delta.parent.mkdir(parents=True)
    delta.write_bytes(b"first update")
    made = []

    def run(cmd):
        made.append(cmd)
        Path(cmd[3]).write_bytes(b"masks")
        return {"wall_s": 1.0, "peak_rss_gib": 0.1, "cpu_s": 1.0, "parent_floor_gib": 0.0, "stdout": "{}"}

    monkeypatch.setattr(bench, "_run", run)
    masks, rec = bench.select("kjv", "hindsight", 0)
    assert len(made) == 1 and made[0][2] == str(delta) and masks.exists()
    assert bench.select("kjv", "hindsight", 0)[1] == rec and len(made) == 1  # cached
    os.utime(delta, ns=(delta.stat().st_atime_ns, delta.stat().st_mtime_ns + 10**9))  # full ran again
    bench.select("kjv", "hindsight", 0)
    assert len(made) == 2
    delta.unlink()  # deleted to free its space: the masks stay, no full cell runs again
    monkeypatch.setattr(bench, "run", lambda cell: pytest.fail(f"{cell} ran"))
    assert bench.select("kjv", "hindsight", 0)[0] == masks and len(made) == 2


def test_lrs_limits_a_run_to_the_cells_of_those_lrs(lf, tmp_path, monkeypatch):
    bench = _bench(lf, tmp_path)
    bench.lrs = {"0.003"}
    ran = []
    monkeypatch.setattr(bench, "run", lambda cell: ran.append(cell) or _finish(
        lf, bench, cell.domain, cell.method, cell.lr, cell.seed, val=10.0, test=11.0) or bench.done(cell))
    bench.run_all(["kjv"], ["lora", "fps"], [0, 1])
    assert [(c.method, c.lr, c.seed) for c in ran] == [("lora", 3e-3, 0), ("fps", 3e-3, 0)]


def test_hindsight_masks_keep_the_largest_updates_at_loras_count(tmp_path):
    from safetensors.numpy import save_file

    from fps_onnx.selection.maskfile import MaskFile

    sys.path.insert(0, str(BENCH))
    try:
        import _llm_hindsight
    finally:
        sys.path.remove(str(BENCH))
    rng = np.random.default_rng(0)
    delta = {"a.q_proj.weight": rng.standard_normal((6, 10)).astype(np.float32),
             "a.down_proj.weight": rng.standard_normal((10, 4)).astype(np.float32)}
    save_file(delta, tmp_path / "delta.safetensors")
    _llm_hindsight.main(str(tmp_path / "delta.safetensors"), str(tmp_path / "m.safetensors"), 2)
    masks = MaskFile.load(tmp_path / "m.safetensors")
    for key, d in delta.items():
        mask, k = masks.masks[key], 2 * sum(d.shape)  # r * (in + out)
        assert mask.sum() == k
        assert np.abs(d[mask]).min() > np.abs(d[~mask]).max()  # the largest |ΔW|, sign ignored


def test_overlap_tells_how_much_of_the_update_and_the_hindsight_mask_a_mask_holds(tmp_path):
    from safetensors.numpy import save_file

    from fps_onnx.selection.maskfile import MaskFile, save_masks

    sys.path.insert(0, str(BENCH))
    try:
        import _llm_hindsight
    finally:
        sys.path.remove(str(BENCH))
    delta = np.zeros((4, 6), np.float32)
    delta[0, :] = 3.0  # the whole update on row 0
    save_file({"l.q_proj.weight": delta}, tmp_path / "delta.safetensors")
    _llm_hindsight.main(str(tmp_path / "delta.safetensors"), str(tmp_path / "hindsight.safetensors"), 1)
    other = np.zeros((4, 6), bool)
    other[1:, :2] = True  # 6 entries, none on row 0, columns 0-1 only
    save_masks(MaskFile({"l.q_proj.weight": other}), tmp_path / "other.safetensors")
    table = _llm_hindsight.overlap(str(tmp_path / "delta.safetensors"), str(tmp_path), ["other"])
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    # hindsight keeps r * (in + out) = 10 entries: row 0 (all the energy) and 4 more
    assert rows["hindsight"] == "| q_proj | hindsight | 41.67% | 100.0% | 100.0% | 100.0% |"
    assert rows["other"].startswith("| q_proj | other | 25.00% | 0.0% | ")
    assert rows["other"].endswith(" | 33.3% |")  # 2 of 6 input columns


def test_a_run_narrowed_to_one_domain_and_row_still_reports_the_whole_benchmark(lf, tmp_path, monkeypatch):
    ran, reported = [], []
    monkeypatch.setattr(lf.Bench, "run_all", lambda self, d, m, s: ran.append((d, m, s)))
    monkeypatch.setattr(lf, "report", lambda bench, out, d, m, s: reported.append((d, m, s)))
    monkeypatch.setattr(lf, "HERE", tmp_path)
    monkeypatch.setattr(sys, "argv", ["llm_finetune.py", "--smoke", "--domains", "man", "--methods", "fps", "--seeds", "0"])
    lf.main()
    assert ran == [(["man"], ["fps"], [0])]
    assert reported == [(list(lf.DOMAINS), lf.planned(), [0, 1, 2])]
    assert "man" in lf.DOMAINS and len(lf.DOMAINS) == 3 and "lora" in lf.planned()
    # a row run on request joins the report once it has a cell
    bench = _bench(lf, tmp_path)
    assert "hindsight" not in lf.report_scope(bench)[1]
    _finish(lf, bench, "kjv", "hindsight", 3e-3, 0, val=1.0, test=1.0)
    assert lf.report_scope(bench)[1] == [m for m in lf.METHODS if m in lf.planned() or m == "hindsight"]


def test_report_refuses_the_filters_that_only_choose_cells_to_run(lf, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["llm_finetune.py", "--report", "--domains", "kjv"])
    with pytest.raises(SystemExit) as exc:
        lf.main()
    assert exc.value.code == 2 and "--report covers the whole benchmark; --domains chooses which cells run" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["1", "1,0", "0,0,1", "", "0,x"])
def test_a_seed_list_must_start_with_the_grid_seed(lf, monkeypatch, capsys, seeds):
    """--seeds 1 alone would make seed 1 the grid seed: a fresh lr grid on it, not seed 1 at seed 0's lrs."""
    ran = []
    monkeypatch.setattr(lf.Bench, "run_all", lambda self, d, m, s: ran.append(s))
    monkeypatch.setattr(sys, "argv", ["llm_finetune.py", "--smoke", "--seeds", seeds])
    with pytest.raises(SystemExit) as exc:
        lf.main()
    assert exc.value.code == 2 and "--seeds: " in capsys.readouterr().err and not ran


def test_training_processes_run_with_the_allocator_setting_and_the_cost_table_marks_those_rows(lf, tmp_path, monkeypatch):
    bench = _bench(lf, tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.json").write_text("{}")
    monkeypatch.setattr(bench, "data", lambda domain: data)
    monkeypatch.setattr(bench, "model", lambda: tmp_path / "model")  # nothing built or read
    monkeypatch.setattr(bench, "select", lambda domain, method, seed: (tmp_path / "masks.safetensors", None))
    envs = []

    def run(cmd, env=None):
        envs.append(env)
        if "--task" in cmd:  # fps-onnx train: its metrics.json in -o
            val = 9.0 if float(cmd[cmd.index("--lr") + 1]) == lf.GRID[1] else 10.0  # the grid's middle wins
            out = Path(cmd[cmd.index("-o") + 1])
            out.mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps(
                {"epochs": [{"seconds": 4.0, "val_perplexity": val}], "steps": 2, "test_perplexity": 9.5}))
        else:  # _llm_train.py ARGS OUT
            val = 9.0 if json.loads(Path(cmd[-2]).read_text())["lr"] == lf.GRID[1] else 10.0
            Path(cmd[-1]).write_text(json.dumps({"val_ppl": val, "test_ppl": 9.6, "step_s_all": 2.0}))
        return {"wall_s": 1.0, "peak_rss_gib": 2.0, "cpu_s": 1.0, "parent_floor_gib": 0.0}

    monkeypatch.setattr(bench, "_run", run)
    for lr in lf.GRID:
        bench.run(lf.Cell("kjv", "fps", lr, 0))
        bench.run(lf.Cell("kjv", "lora", lr, 0))
        _finish(lf, bench, "kjv", "random", lr, 0, val=9.0 if lr == lf.GRID[1] else 10.0, test=9.4)  # from before it
    assert envs == [lf.TRAIN_ENV] * 2 * len(lf.GRID) and "MALLOC_MMAP_THRESHOLD_" in lf.TRAIN_ENV
    assert json.loads(bench.path(lf.Cell("kjv", "fps", lf.GRID[0], 0)).read_text())["train_env"] == lf.TRAIN_ENV
    methods = ["lora", "fps", "random"]

    def cost_rows(seeds):
        md = lf._markdown(lf.summarize(bench, ["kjv"], methods, seeds), methods, bench, "")
        table = md.split("## Cost")[1].split("\n\n")[1]
        return {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}, md

    rows, md = cost_rows([0])
    for m in ("fps", "lora"):  # peak RSS and step time (2 s either way) marked, nothing else
        assert rows[lf.METHODS[m].label].count("‡") == 2 and rows[lf.METHODS[m].label].count("| 2.00 ‡ |") == 2
    assert "‡" not in rows[lf.METHODS["random"].label]
    assert "‡: the row's training processes ran with `MALLOC_MMAP_THRESHOLD_=33554432`" in md
    lr = bench.chosen_lr("kjv", "fps", 0)
    _finish(lf, bench, "kjv", "fps", lr, 1, val=9.0, test=9.4)  # the row's seed 1 from before it
    rows, _ = cost_rows([0, 1])
    assert "‡ (some cells)" in rows[lf.METHODS["fps"].label]


def test_the_step_scaled_row_selects_with_statistics_and_trains_on_them(lf, tmp_path, monkeypatch):
    """fps-ss: FPS's own selection writing --stats-out beside its masks, then `train --step-scale`
    on that file; the other sparse rows pass neither, and masks without the statistics are made again."""
    bench = _bench(lf, tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.json").write_text("{}")
    for name, value in (("data", lambda domain: data), ("model", lambda: tmp_path / "model"),
                        ("onnx", lambda: tmp_path / "model.onnx"), ("calib", lambda domain, seed: data / "calib32-s0.npz")):
        monkeypatch.setattr(bench, name, value)
    cmds = []

    def run(cmd, env=None):
        cmds.append(cmd)
        if cmd[1] == "select":
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"masks")
            if "--stats-out" in cmd:
                Path(cmd[cmd.index("--stats-out") + 1]).write_bytes(b"stats")
            return {"wall_s": 1.0, "peak_rss_gib": 1.0, "cpu_s": 1.0, "parent_floor_gib": 0.0,
                    "stdout": json.dumps({"selected": 11, "total": 30, "seconds": 0.5})}
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(
            {"epochs": [{"seconds": 4.0, "val_perplexity": 9.0}], "steps": 2, "test_perplexity": 9.5}))
        return {"wall_s": 1.0, "peak_rss_gib": 2.0, "cpu_s": 1.0, "parent_floor_gib": 0.0}

    monkeypatch.setattr(bench, "_run", run)
    assert lf.METHODS["fps-ss"].select == lf.METHODS["fps"].select and lf.METHODS["fps-ss"].candidate
    bench.run(lf.Cell("kjv", "fps", lf.GRID[0], 0))
    bench.run(lf.Cell("kjv", "fps-ss", lf.GRID[0], 0))
    (fps_select, fps_train, select, train) = cmds
    assert "--stats-out" not in fps_select and "--step-scale" not in fps_train
    stats = select[select.index("--stats-out") + 1]
    assert stats.endswith("fps-ss.stats.safetensors") and train[train.index("--step-scale") + 1] == stats
    Path(stats).unlink()  # masks whose statistics are gone: selected again
    bench.run(lf.Cell("kjv", "fps-ss", lf.GRID[1], 0))
    assert cmds[4][1] == "select" and Path(stats).exists()
