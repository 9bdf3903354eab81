"""What ``fps-onnx select`` costs on a decoder-only LLM, next to plain inference and to GPS.

A random-init Llama (seeded; by default hidden 2048, intermediate 5632, 16 layers, 32 heads, 8
key/value heads, vocabulary 32000: 0.86 B parameters, 3.4 GB of fp32 weights), saved with
``save_pretrained`` and exported with ``fps-onnx export hf:DIR -o model.onnx`` (weights as
external data beside it). Data: N sequences of L seeded random token ids in an .npz
(``input_ids``, ``attention_mask``); one sequence is right-padded and one left-padded, so the
attention mask matters. Every variant runs as its own process, measured by
:func:`_measure.run_measured` (wall and CPU time of the whole process, its exact peak RSS):

* plain:  ONNX Runtime inference of the same model file on the same batches (input_ids,
  attention_mask -> logits), default session options, CPU provider;
* select: ``fps-onnx select model.onnx data.npz -o masks.safetensors --batch-size B``;
* gps:    GPS-style selection in PyTorch, fp32: train mode, forward + backward of the causal LM
  loss (next-token cross-entropy on real tokens) per batch, gradients summed over the set (no
  zero_grad), then per row the top-k ``|grad|`` of every Linear weight of the decoder layers
  (the weights ``select`` scores; lm_head is left out by both), with ``select``'s budget and its
  ``select_scores``, as :mod:`fps_onnx.gps` does.

Usage::

    python benchmarks/llm_select.py [--repeat 3] [--size full|small] [--skip-gps] [--note "..."]
    python benchmarks/llm_select.py --size small --repeat 1 --out /tmp/x   # code paths, ~1 min

Writes benchmarks/results/llm_select.{md,json} (``--out`` elsewhere). The model folder, its
ONNX export and the data are cached in benchmarks/work/llm-<size>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
import re
import shutil
import statistics
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    METRICS,
    _paired,
    check,
    child_command,
    fps_onnx_command,
    machine,
    measure_rounds,
    met,
    ratios,
    round_tables,
    run_measured,
    write_report,
)

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
SEED = 0
PAD = 0
SIZES = {  # LlamaConfig fields
    "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=32000),
}
TARGETS = {  # ratio: (bound, "<=" or ">=")
    "select/plain time": (1.00, "<="),
    "select/plain peak RSS": (0.90, "<="),
    "gps/select peak RSS": (2.5, ">="),
}
#: --selectors: FPS's selection options as llm_finetune.py's rows run them, at LoRA r=8's count per
#: tensor (``--shira-r 8``; the budget decides which top-k runs: a column cap at neuron level is
#: another algorithm), each measured against FPS at that budget ("fps-r8"); each must stay within
#: 1.2x of its time and peak RSS. "fps-ss" is FPS's selection writing its statistics beside the masks,
#: what ``train --step-scale`` reads (``{work}``: the run's work folder).
_R8 = ["--shira-r", "8"]
SELECTORS = {"fps-r8": _R8, "fps-a05": [*_R8, "--act-power", "0.5"], "fps-cap2": [*_R8, "--column-cap", "2"],
             "fps-neuron": [*_R8, "--level", "neuron"], "fps-lr16": [*_R8, "--low-rank", "16"],
             "fps-ss": [*_R8, "--stats-out", "{work}/stats-fps-ss.safetensors"]}
REFERENCE = {name: "fps-r8" for name in SELECTORS if name != "fps-r8"}
for _name, _reference in REFERENCE.items():
    TARGETS[f"{_name}/{_reference} time"] = (1.2, "<=")
    TARGETS[f"{_name}/{_reference} peak RSS"] = (1.2, "<=")


# --------------------------------------------------------------------------- children
# Each runs in its own process; heavy imports stay inside them, so the parent
# (whose RSS is every child's starting high-water mark) stays small.


def prepare_model(size: str, folder: str) -> None:
    """Save the seeded random-init Llama of ``size`` as a Hugging Face folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SIZES[size], max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    tmp = Path(folder + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(folder)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


def prepare_data(path: str, sequences: int, length: int, vocab: int) -> None:
    """Seeded random token ids; sequence 1 right-padded (last quarter), the last left-padded (first 3/8)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, vocab, size=(sequences, length), dtype=np.int64)
    mask = np.ones((sequences, length), dtype=np.int64)
    if sequences > 1:
        mask[1, length - length // 4:] = 0
        mask[-1, : length * 3 // 8] = 0
    ids[mask == 0] = PAD
    tmp = path + ".tmp.npz"
    np.savez(tmp, input_ids=ids, attention_mask=mask)
    os.replace(tmp, path)


def _feed(session, batch: dict) -> dict:
    """The session's inputs for one batch (positions and an empty cache, should the file take them)."""
    import numpy as np

    mask = batch["attention_mask"]
    feed = {}
    for arg in session.get_inputs():
        if arg.name in batch:
            feed[arg.name] = batch[arg.name]
        elif arg.name == "position_ids":
            pos = np.cumsum(mask, axis=1) - 1
            pos[mask == 0] = 1
            feed[arg.name] = pos.astype(np.int64)
        elif arg.name.startswith(("past_key_values.", "past_key.", "past_value.")):
            _, heads, _, dim = arg.shape
            dtype = np.float16 if "float16" in arg.type else np.float32
            feed[arg.name] = np.zeros((mask.shape[0], heads, 0, dim), dtype)
        else:
            raise SystemExit(f"plain: no value for input {arg.name}")
    return feed


def plain(model: str, data: str, batch_size: int) -> None:
    """Plain ORT inference over the .npz in batches, default session options, CPU provider."""
    import time

    import numpy as np
    import onnxruntime as ort

    start = time.perf_counter()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    built = time.perf_counter()
    arrays = dict(np.load(data))
    rows = len(arrays["input_ids"])
    for first in range(0, rows, batch_size):
        batch = {k: v[first : first + batch_size] for k, v in arrays.items()}
        session.run(None, _feed(session, batch))
    timing = {"session build": built - start, "session runs": time.perf_counter() - built}
    print(json.dumps({"timing": timing}))


def gps(folder: str, data: str, batch_size: int) -> None:
    """GPS-style selection on the causal LM loss: summed gradients, then per-row top-k of |grad|."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from fps_onnx.selection.score import SelectConfig, select_scores

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    arrays = {k: torch.from_numpy(v) for k, v in np.load(data).items()}
    rows = len(arrays["input_ids"])
    for start in range(0, rows, batch_size):
        ids = arrays["input_ids"][start : start + batch_size]
        mask = arrays["attention_mask"][start : start + batch_size]
        labels = ids.masked_fill(mask == 0, -100)  # next-token cross-entropy on real tokens only
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # grads accumulate
    config = SelectConfig(method="gps")
    selected, tensors = 0, 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                score = module.weight.grad.detach().abs().double().numpy()
                selected += int(select_scores(score, config, name).sum())
                tensors += 1
    print(json.dumps({"tensors": tensors, "selected": selected}))


#: Stages of a profiled run: label -> (files the function may be in, by suffix; function name).
#: cProfile sees the main thread only (not the digest's thread, nor the scoring threads' work).
STAGES = {
    "whole process": (("bin/fps-onnx", "llm_select.py"), "<module>"),
    "ORT session build": (("onnxruntime_inference_collection.py",), "_create_inference_session"),
    "ORT runs": (("~",), "<built-in method onnxruntime.capi.onnxruntime_pybind11_state.run>"),
    "select: calibrate (session build + runs + sums)": (("fps_onnx/calibrate.py",), "calibrate"),
    "select: shape inference": (("fps_onnx/onnx/graph.py",), "inferred_shapes"),
    "select: scoring and top-k": (("fps_onnx/pipeline.py",), "_select_all"),
    "select: writing the mask file": (("fps_onnx/selection/maskfile.py",), "save"),
}


def timings(name: str, result: dict) -> dict:
    """The stage times a run printed: plain's ``{"timing": ...}`` line on stdout, select's
    ``timing: STAGE SECONDS s`` debug lines (``fps-onnx -v``) on stderr."""
    if name == "plain":
        lines = [json.loads(line) for line in result["stdout"].splitlines() if line.startswith('{"timing"')]
        return {"timing": lines[-1]["timing"]} if lines else {}
    if name == "select":
        found = {}
        for line in result["stderr"].splitlines():
            m = re.match(r"timing: (.+?) (\d+(?:\.\d+)?) s\b", line)
            if m:
                found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
        return {"timing": found} if found else {}
    return {}


def stages(prof: str) -> None:
    """Cumulative seconds of each of :data:`STAGES` in a cProfile file, as JSON."""
    import pstats

    stats = pstats.Stats(prof).stats  # (file, line, function) -> (cc, nc, tt, cumulative, callers)
    out = {}
    for label, (files, func) in STAGES.items():
        hits = [v[3] for (file, _, name), v in stats.items() if name == func and file.endswith(files)]
        if hits:
            out[label] = max(hits)
    print(json.dumps(out))


def profile(variants: dict, work: Path) -> dict:
    """Run plain and select once each under cProfile; the cumulative seconds of their stages."""
    found = {}
    for name in ("plain", "select"):
        prof = work / f"{name}.prof"
        cmd = variants[name][1:] if variants[name][0] == sys.executable else variants[name]
        r = _check(f"{name} (profiled)", run_measured([sys.executable, "-m", "cProfile", "-o", str(prof), *cmd]))
        s = _check("stages", run_measured(_child("stages", prof)))
        found[name] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_gib": r["peak_rss_gib"],
                       "stages_s": json.loads(s["stdout"])}
        print(f"profiled {name}: {found[name]}", flush=True)
    return found


# --------------------------------------------------------------------------- parent


def _child(role: str, *args) -> list[str]:
    return child_command(__file__, role, *args)


def _check(name: str, result: dict) -> dict:
    return check(name, result, 8)


def prepare(size: str, sequences: int, length: int, root: Path = WORK) -> dict:
    """Make the model folder, its ONNX export and the data once (then cached in ``root``); what making
    them cost."""
    work = root / f"llm-{size}"
    work.mkdir(parents=True, exist_ok=True)
    folder, onnx_path = work / "hf", work / "model.onnx"
    data = work / f"tokens-{sequences}x{length}.npz"
    made = {}
    if not folder.is_dir():
        r = _check("save model", run_measured(_child("prepare-model", size, folder)))
        made["save model"] = {k: r[k] for k in METRICS}
    if not onnx_path.exists():
        r = _check("export", run_measured([fps_onnx_command(), "export", f"hf:{folder}", "-o", str(onnx_path), "--json"]))
        made["export"] = {k: r[k] for k in METRICS} | {"summary": r["stdout"].strip()}
    if not data.exists():
        _check("data", run_measured(_child("prepare-data", data, sequences, length, SIZES[size]["vocab_size"])))
    return made


def _markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# `fps-onnx select` on a decoder-only LLM (CPU)",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}",
        f"- command: `{report['command']}`",
        f"- model: random-init Llama ({report['size']}: hidden {cfg['hidden_size']}, intermediate "
        f"{cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} "
        f"heads, {cfg['num_key_value_heads']} key/value heads, vocabulary {cfg['vocab_size']}; "
        f"{report['parameters'] / 1e9:.2f} B parameters, {report['weights_gb']:.2f} GB of fp32 "
        "weights as external data), exported with `fps-onnx export hf:DIR -o model.onnx`",
        f"- data: {report['sequences']} sequences of {report['length']} seeded random token ids "
        f"(one right-padded, one left-padded), batch {report['batch_size']}",
        f"- {report['repeat']} round(s) (plain, select, gps back to back); times are medians over "
        "rounds, ratios the median of the per-round ratios; CPU time counts every core",
        "",
    ]
    lines += round_tables(report, TARGETS)
    stages = report.get("stages") or {}
    if stages:
        lines += ["", "Stages (median seconds over rounds, from each run's own timings: plain times its "
                  "session build and runs, `fps-onnx -v select` logs `timing:` lines; the digest runs in "
                  "a thread beside the session build and runs):", "",
                  "| variant | stage | seconds |", "|---|---|---:|"]
        for variant, found in stages.items():
            lines += [f"| {variant} | {stage} | {secs:.2f} |" for stage, secs in found.items()]
    if report.get("profile"):
        lines += ["", "One more run of plain and of select under cProfile (cumulative seconds; "
                  "the profiler adds a little):", "", "| stage | plain (s) | select (s) |", "|---|---:|---:|"]
        prof = report["profile"]
        for label in STAGES:
            cells = [prof.get(v, {}).get("stages_s", {}).get(label) for v in ("plain", "select")]
            if any(c is not None for c in cells):
                lines.append(f"| {label} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |")
        lines.append("| (process wall, CPU time, peak RSS) | " + " | ".join(
            f"{prof[v]['wall_s']:.1f} s, {prof[v]['cpu_s']:.1f} s, {prof[v]['peak_rss_gib']:.2f} GiB"
            for v in ("plain", "select")) + " |")
    lines += ["", "Commands:", ""]
    lines += [f"- {name}: `{cmd}`" for name, cmd in report["commands"].items()]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each runs every variant once)")
    parser.add_argument("--skip-gps", action="store_true")
    parser.add_argument("--selectors", action="store_true",
                        help=f"also run select with each of {', '.join(SELECTORS)} (ratios to FPS at the same budget)")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, run plain and select once more under cProfile and report their stages")
    parser.add_argument("--note", default="", help="free text added to the results (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for llm_select.{md,json}")
    parser.add_argument("--work", type=Path, default=WORK,
                        help="folder for the cached model folders, exports and data (llm-SIZE/ in it)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "prepare-model":
        return prepare_model(args.rest[0], args.rest[1])
    if args.role == "prepare-data":
        return prepare_data(args.rest[0], int(args.rest[1]), int(args.rest[2]), int(args.rest[3]))
    if args.role == "plain":
        return plain(args.rest[0], args.rest[1], int(args.rest[2]))
    if args.role == "gps":
        return gps(args.rest[0], args.rest[1], int(args.rest[2]))
    if args.role == "stages":
        return stages(args.rest[0])

    work = args.work / f"llm-{args.size}"
    folder, model, data = work / "hf", work / "model.onnx", work / f"tokens-{args.sequences}x{args.length}.npz"
    made = prepare(args.size, args.sequences, args.length, args.work)
    for step, r in made.items():
        print(f"{step}: {r['wall_s']:.1f} s, {r['peak_rss_gib']:.2f} GiB", flush=True)
    masks = work / "masks.safetensors"
    variants = {
        "plain": _child("plain", model, data, args.batch_size),
        # -v: the stage timings (debug lines); stderr is a file, so no progress bar.
        "select": [fps_onnx_command(), "-v", "select", str(model), str(data), "-o", str(masks),
                   "--batch-size", str(args.batch_size)],
    }
    if args.selectors:
        for name, options in SELECTORS.items():
            variants[name] = [fps_onnx_command(), "-v", "select", str(model), str(data),
                              "-o", str(work / f"masks-{name}.safetensors"), "--batch-size", str(args.batch_size),
                              *(o.format(work=work) for o in options)]
    if not args.skip_gps:
        variants["gps"] = _child("gps", folder, data, args.batch_size)

    runs, median = measure_rounds(variants, args.repeat, extra=timings)
    per_stage = {name: {stage: statistics.median(r["timing"][stage] for r in rs if stage in r.get("timing", {}))
                     for stage in dict.fromkeys(s for r in rs for s in r.get("timing", {}))}
              for name, rs in runs.items()}
    profiled = profile(variants, work) if args.profile else {}
    config = json.loads((folder / "config.json").read_text())
    weights = sum(f.stat().st_size for f in work.glob("model.onnx*"))
    parameters = sum(
        config[a] * config["hidden_size"] * 2 for a in ("vocab_size",)
    ) + config["num_hidden_layers"] * _layer_params(config) + config["hidden_size"]
    found = ratios(median, runs)
    for name, reference in REFERENCE.items():
        if name in median and reference in median:
            found[f"{name}/{reference} time"] = _paired(runs, name, reference, "wall_s")
            found[f"{name}/{reference} peak RSS"] = _paired(runs, name, reference, "peak_rss_gib")
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "size": args.size,
        "config": {k: config[k] for k in SIZES[args.size]},
        "parameters": parameters,
        "weights_gb": weights / 1e9,
        "sequences": args.sequences,
        "length": args.length,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "parent_floor_gib": run_measured([sys.executable, "-c", "pass"])["parent_floor_gib"],
        "prepared": made,
        "commands": {k: " ".join(v) for k, v in variants.items()},
        "runs": runs,
        "median": median,
        "ratios": found,
        "profile": profiled,
        "stages": {k: v for k, v in per_stage.items() if v},
        "targets": {k: {"bound": b, "op": op, "met": met(TARGETS, k, found[k])} for k, (b, op) in TARGETS.items()
                    if k in found},
        "note": args.note,
    }
    write_report(args.out, "llm_select", _markdown(report), report)


def _layer_params(c: dict) -> int:
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


if __name__ == "__main__":
    main()
