"""A short pre-screen of selectors, before the LLM benchmark spends full cells on them (CPU).

Every sparse row of ``llm_finetune.METHODS`` given (and LoRA r=8 for reference) trains
SmolLM2-135M for STEPS optimizer steps of 4 x 256 tokens of the first domain (``kjv``), seed 0,
at lr LR (the middle of the benchmark's grid: LoRA's and FPS's chosen lr on kjv in the full
protocol), with the masks the benchmark selects for that row (same calibration blocks, same
``--shira-r 8`` budget) and the loop of the benchmark's LoRA cells for every row (``_llm_train.py``:
AdamW, 10% warm-up, cosine, clipping at 1; sparse rows through ``fps_onnx.train.prepare``, the
sparse Linear of ``fps-onnx train``), and is scored on the first VAL validation blocks; the loop also evaluates 2
test blocks, which nothing here uses. One process per run (``_measure``), one JSON per run under
``benchmarks/work/llm/screen/``: a rerun skips finished runs.

What it was meant for: to spare the full protocol's cells for selectors that trail FPS or random
here. What it is not: a result, nor a reliable filter. One seed, one lr, a quarter of the steps, and
on kjv the ranking did not hold at 200 steps: act-power 0.5 led FPS by 3.8% here and trailed it by
0.05% on validation in the full cell at the same lr (16.127 vs 16.119), and LoRA's lead of 4.5%
shrank to 0.1%. So the benchmark drops no row on this screen alone.

    python benchmarks/llm_screen.py                          # the default rows, ~4 min each on 2 quiet cores
    python benchmarks/llm_screen.py --methods lora,fps,fps-a05
    python benchmarks/llm_screen.py --report                 # the table from finished runs alone
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
import platform
import sys

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import log, run_offline, write_cell, write_report  # noqa: E402
import llm_finetune as bench  # noqa: E402

STEPS, LR, VAL, SEED, DOMAIN = 50, 3e-3, 32, 0, bench.DOMAINS[0]
DEFAULT = "lora,fps,random,magnitude,fps-lr16,fps-a05,fps-cap2"
NAME = "llm_screen"


def run_one(b: bench.Bench, method: str, work: Path) -> dict:
    path = work / f"{method}__lr{LR:g}__s{SEED}__{STEPS}.json"
    if path.exists():
        return json.loads(path.read_text())
    spec, data = bench.METHODS[method], b.data(DOMAIN)
    args = {"model": str(b.model()), "mode": spec.train, "train": str(data / "train.npz"),
            "val": str(data / "val.npz"), "test": str(data / "test.npz"),
            "blocks": {"val": VAL, "test": 2},  # the loop evaluates the test split too: 2 blocks, unread here
            "steps": STEPS, "batch_size": b.cfg["batch_size"], "lr": LR, "warmup": b.cfg["warmup"], "seed": SEED,
            "eval_batch_size": b.cfg["eval_batch_size"], "lora_r": b.cfg["shira_r"],
            "lora_alpha": b.cfg["lora_alpha"], "lora_targets": bench.TARGETS}
    selection = None
    if spec.train == "sparse":
        masks, selection = b.select(DOMAIN, method, SEED)
        args["masks"] = str(masks)
    args_file, out_file = work / f"{method}.args.json", work / f"{method}.out.json"
    args_file.write_text(json.dumps(args))
    log(f"screen {method}")
    m = run_offline([bench.PY, str(HERE / "_llm_train.py"), str(args_file), str(out_file)], bench.ROOT)
    out = json.loads(out_file.read_text())
    rec = {"method": method, "val_ppl": out.get("val_ppl"), "train_loss_last": out.get("train_loss_last"),
           "trainable": out.get("trainable"), "wall_s": m["wall_s"], "peak_rss_gib": m["peak_rss_gib"],
           "selection": selection, "args": args,
           "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_cell(path, rec)
    return rec


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{value / base:.3f}"


def report(recs: dict[str, dict], results: Path) -> None:
    lora = recs.get("lora", {}).get("val_ppl")
    fps = recs.get("fps", {}).get("val_ppl")
    lines = [f"# Pre-screen of selectors: SmolLM2-135M, {DOMAIN}, {STEPS} steps (CPU)", "",
             f"- generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%MZ} by `python benchmarks/llm_screen.py` "
             f"on {platform.machine()}, 2 CPU cores",
             f"- each row: {STEPS} AdamW steps of {bench.FULL['batch_size']} x {bench.FULL['seq']} tokens of the "
             f"{DOMAIN} training blocks, lr {LR:g}, seed {SEED}, the benchmark's masks (`--shira-r 8`, LoRA r=8's "
             "count) and one loop for every row (`_llm_train.py`); validation perplexity on the first "
             f"{VAL} validation blocks ({VAL * (bench.FULL['seq'] - 1):,} predicted tokens); the 2 test blocks the loop "
             "evaluates are not used",
             "- a screen, not a result: one seed, one lr, a quarter of the full protocol's steps "
             "(`results/llm_domains.md` holds the results)", "",
             "| method | val ppl | / LoRA | / FPS | train loss (last 5 steps) | trainable |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, r in sorted(recs.items(), key=lambda x: x[1]["val_ppl"] or float("inf")):
        v = r["val_ppl"]
        mark = " *" if r.get("source") else ""
        lines.append(f"| {bench.METHODS[m].label} (`{m}`){mark} | {v:.3f} | {_ratio(v, lora)} | {_ratio(v, fps)} | "
                     f"{r['train_loss_last']:.3f} | {r['trainable']:,} |")
    sources = sorted({r["source"] for r in recs.values() if r.get("source")})
    lines += ["", *(f"\\* {s}" for s in sources)] if sources else []
    write_report(results, NAME, "\n".join(lines) + "\n", {"steps": STEPS, "lr": LR, "val_blocks": VAL,
                                                           "seed": SEED, "domain": DOMAIN, "runs": recs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT, help=f"comma-separated [default: {DEFAULT}]")
    parser.add_argument("--report", action="store_true", help="only build the table from finished runs")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in bench.METHODS or bench.METHODS[m].train not in ("lora", "sparse")]
    if bad:
        parser.error(f"not a LoRA or sparse row of llm_finetune.METHODS: {bad[0]!r}")
    b = bench.Bench(dict(bench.FULL), HERE / "work" / "llm", HERE / "results" / bench.NAME)
    work = b.work / "screen"
    work.mkdir(parents=True, exist_ok=True)
    recs = {}
    for m in methods:
        path = work / f"{m}__lr{LR:g}__s{SEED}__{STEPS}.json"
        if args.report:
            if path.exists():
                recs[m] = json.loads(path.read_text())
            continue
        recs[m] = run_one(b, m, work)
    report(recs, HERE / "results")


if __name__ == "__main__":
    main()
