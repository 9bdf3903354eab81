"""Mask file version 1 (one bool per weight) vs version 2 (the selected indices) at LLM scale.

A neuron-level selection at ``--fraction`` (default 0.005, select's default) of the weights
``fps-onnx select`` scores in a Llama (q/k/v/o/gate/up/down of every layer; lm_head and the
embeddings are left out, as select leaves them without --include-lm-head), synthesized
(seeded: K distinct sorted positions per row) for the 0.85 B Llama of ``llm_select.py``
(hidden 2048, intermediate 5632, 16 layers, 32 heads, 8 key/value heads). Each run is its own
process, measured by :func:`_measure.run_measured` (wall time and exact peak RSS):

* write v1 / write v2: build the selection (not timed), then ``MaskFile.save(version=...)``,
  timed in the process (``write_s``) as select writes it (from the indices it now keeps; v1
  expands them to bool arrays);
* load v1 / load v2: read the file the way ``train`` does: ``MaskFile.load`` then each
  weight's flat int64 indices (what its sparse delta holds), all kept;
* floor: a process that imports what the loaders import and reads nothing (what any
  reader's peak RSS starts from).

Then the projected size of both versions at the same fraction for a 7 B (4096 / 11008 /
32 layers / 32 heads / 8 kv) and a 70 B Llama (8192 / 28672 / 80 layers / 64 heads / 8 kv):
computed from the shapes (the indices' bytes plus the header safetensors writes), checked
against the real v2 file of the 0.85 B model, and with ``--write-7b`` against a written 7 B file.

Usage::

    python benchmarks/mask_format.py [--fraction 0.005] [--repeat 3] [--write-7b]

Writes benchmarks/results/mask_format.{md,json}; the files go to benchmarks/work/masks/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
import statistics
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import GIB, check, child_command, machine, run_measured, stdout_json, write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "masks"
RESULTS = HERE / "results"
SEED = 0
# name: (hidden, intermediate, layers, heads, kv heads)
LLAMAS = {
    "0.85b": (2048, 5632, 16, 32, 8),
    "7b": (4096, 11008, 32, 32, 8),
    "70b": (8192, 28672, 80, 64, 8),
}


def weight_shapes(size: str) -> dict[str, tuple[int, int]]:
    """The [out, in] shape of every weight select scores in a Llama of ``size``."""
    hidden, inter, layers, heads, kv = LLAMAS[size]
    kv_out = kv * (hidden // heads)
    shapes = {}
    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes |= {f"{attn}.q_proj.weight": (hidden, hidden), f"{attn}.k_proj.weight": (kv_out, hidden),
                   f"{attn}.v_proj.weight": (kv_out, hidden), f"{attn}.o_proj.weight": (hidden, hidden),
                   f"{mlp}.gate_proj.weight": (inter, hidden), f"{mlp}.up_proj.weight": (inter, hidden),
                   f"{mlp}.down_proj.weight": (hidden, inter)}
    return shapes


def per_row(fraction: float, fan_in: int) -> int:
    """K of a neuron-level selection at ``fraction`` (select's own rule)."""
    from fps_onnx.selection.score import SelectConfig

    return SelectConfig(fraction=fraction).keep(1, fan_in)


def synthesize(size: str, fraction: float):
    """A MaskFile of a seeded neuron-level selection (each row K distinct sorted positions)."""
    import numpy as np

    from fps_onnx.selection.maskfile import MaskFile

    rows = {}
    for n, (key, (out, fan_in)) in enumerate(weight_shapes(size).items()):
        k = per_row(fraction, fan_in)
        rng = np.random.default_rng([SEED, n])
        # K sorted draws from [0, fan_in - K], plus 0..K-1: K distinct increasing positions
        pos = np.sort(rng.integers(0, fan_in - k + 1, size=(out, k)), axis=1) + np.arange(k)
        rows[key] = ((out, fan_in), pos.astype(np.uint16 if fan_in <= 1 << 16 else np.uint32))
    meta = {"method": "fps", "norm": "l1", "level": "neuron", "budget": json.dumps({"fraction": fraction}),
            "num_samples": "8", "model_sha256": "0" * 64}
    return MaskFile.from_indices(rows, {}, meta)


def projected(size: str, fraction: float, version: str) -> int:
    """Bytes of the mask file of ``size`` at ``fraction``: the tensors' bytes plus the header
    (built as :meth:`MaskFile.save` and safetensors build it, without any array)."""
    from fps_onnx._version import __version__
    from fps_onnx.selection import maskfile

    tensors, header, offset = {}, {}, 0
    for key, (out, fan_in) in weight_shapes(size).items():
        k = per_row(fraction, fan_in)
        if version == "1":
            dtype, shape, nbytes = "BOOL", [out, fan_in], out * fan_in
            tensors[key] = {"shape": [out, fan_in], "selected": out * k}
        else:
            dtype = {2: "U16", 4: "U32", 8: "U64"}[maskfile.rows_dtype(fan_in).itemsize]
            shape, nbytes = [out, k], out * k * maskfile.rows_dtype(fan_in).itemsize
            tensors[key] = {"encoding": "rows", "selected": out * k, "shape": [out, fan_in]}
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    meta = {"budget": json.dumps({"fraction": fraction}), "format": maskfile.FORMAT, "format_version": version,
            "layout": "torch", "level": "neuron", "method": "fps", "model_sha256": "0" * 64, "norm": "l1",
            "num_samples": "8", "tensors": json.dumps(tensors, sort_keys=True), "tool": f"fps-onnx {__version__}",
            "true_means": "trainable"}
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"))
    return 8 + -(-len(text) // 8) * 8 + offset


# --------------------------------------------------------------------------- children


def write(size: str, fraction: float, version: str, path: str) -> None:
    import time

    masks = synthesize(size, fraction)
    start = time.perf_counter()
    masks.save(path, version=version)
    seconds = time.perf_counter() - start
    print(json.dumps({"write_s": seconds, "bytes": os.path.getsize(path), "selected": masks.selected,
                      "total": masks.total, "tensors": len(masks)}))


def load(path: str) -> None:
    import time

    from fps_onnx.selection.maskfile import MaskFile

    start = time.perf_counter()
    masks = MaskFile.load(path)
    indices = {k: masks.indices(k) for k in masks.keys()}  # what the sparse deltas hold
    seconds = time.perf_counter() - start
    print(json.dumps({"load_s": seconds, "selected": sum(int(i.size) for i in indices.values())}))


def floor() -> None:
    from fps_onnx.selection.maskfile import MaskFile  # noqa: F401 - what the loaders import

    print(json.dumps({}))


# --------------------------------------------------------------------------- parent


def _markdown(report: dict) -> str:
    m, r = report["median"], report["ratios"]
    lines = [
        "# Mask file version 1 (bool per weight) vs version 2 (indices)",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}",
        f"- command: `{report['command']}`",
        f"- selection: neuron level, fraction {report['fraction']}, the {report['tensors']} weights select scores "
        f"in the 0.85 B Llama (q/k/v/o/gate/up/down x 16 layers; no lm_head), {report['selected']:,} of "
        f"{report['total']:,} entries, synthesized (seeded)",
        f"- {report['repeat']} round(s), each process on its own; medians over rounds; write time is "
        "`MaskFile.save` alone (timed in the process); load = `MaskFile.load` + every weight's int64 "
        "indices, as `train` reads them; floor = a process importing the reader and reading nothing",
        "",
        "| | file bytes | write time (s) | write process peak RSS (GiB) | load wall (s) | load process peak RSS (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in ("1", "2"):
        w, ld = m[f"write v{v}"], m[f"load v{v}"]
        lines.append(f"| v{v} | {report['bytes'][v]:,} | {w['write_s']:.3f} | {w['peak_rss_gib']:.3f} | "
                     f"{ld['wall_s']:.2f} | {ld['peak_rss_gib']:.3f} |")
    lines += [f"| floor | | | | {m['floor']['wall_s']:.2f} | {m['floor']['peak_rss_gib']:.3f} |", "",
              "| ratio v2/v1 | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in r.items()]
    p = report["projected"]
    lines += ["", f"Projected file bytes at fraction {report['fraction']} (computed from the shapes: indices "
              "plus header; the 0.85 B figure computed the same way is "
              f"{p['0.85b']['2']:,} vs {report['bytes']['2']:,} written"
              + (f"; 7 B written: {report['written_7b']:,}" if report.get("written_7b") else "") + "):", "",
              "| model | v1 bytes | v2 bytes | v2/v1 |", "|---|---:|---:|---:|"]
    for size, b in p.items():
        lines.append(f"| Llama {size} | {b['1']:,} ({b['1'] / GIB:.2f} GiB) | {b['2']:,} "
                     f"({b['2'] / 2**20:.1f} MiB) | {b['2'] / b['1']:.4f} |")
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.005)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians reported")
    parser.add_argument("--write-7b", action="store_true", help="also write the 7 B v2 file to check its projection")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for mask_format.{md,json}")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "write":
        return write(args.rest[0], float(args.rest[1]), args.rest[2], args.rest[3])
    if args.role == "load":
        return load(args.rest[0])
    if args.role == "floor":
        return floor()
    if args.role == "project":
        print(json.dumps({s: {v: projected(s, float(args.rest[0]), v) for v in ("1", "2")} for s in LLAMAS}))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    files = {v: WORK / f"llama-0.85b-v{v}.safetensors" for v in ("1", "2")}
    variants = {**{f"write v{v}": child_command(__file__, "write", "0.85b", args.fraction, v, files[v])
                   for v in ("1", "2")},
                **{f"load v{v}": child_command(__file__, "load", files[v]) for v in ("1", "2")},
                "floor": child_command(__file__, "floor")}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(args.repeat):
        for name, cmd in variants.items():
            result = check(name, run_measured(cmd))
            runs[name].append({"wall_s": result["wall_s"], "peak_rss_gib": result["peak_rss_gib"],
                               **stdout_json(result)})
            print(f"[{i + 1}/{args.repeat}] {name:8s} {result['wall_s']:6.2f} s  "
                  f"{result['peak_rss_gib']:6.3f} GiB", flush=True)
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
              for name, rs in runs.items()}
    written = runs["write v2"][0]
    ratios = {
        "file bytes": runs["write v2"][0]["bytes"] / runs["write v1"][0]["bytes"],
        "write time": statistics.median(a["write_s"] / b["write_s"] for a, b in zip(runs["write v2"], runs["write v1"])),
        "load process peak RSS": statistics.median(
            a["peak_rss_gib"] / b["peak_rss_gib"] for a, b in zip(runs["load v2"], runs["load v1"])),
        "load process peak RSS above the floor": statistics.median(
            (a["peak_rss_gib"] - f["peak_rss_gib"]) / (b["peak_rss_gib"] - f["peak_rss_gib"])
            for a, b, f in zip(runs["load v2"], runs["load v1"], runs["floor"])),
    }
    project = stdout_json(check("project", run_measured(child_command(__file__, "project", args.fraction))))
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "fraction": args.fraction,
        "repeat": args.repeat,
        "tensors": written["tensors"],
        "selected": written["selected"],
        "total": written["total"],
        "bytes": {v: runs[f"write v{v}"][0]["bytes"] for v in ("1", "2")},
        "parent_floor_gib": run_measured([sys.executable, "-c", "pass"])["parent_floor_gib"],
        "commands": {k: " ".join(map(str, v)) for k, v in variants.items()},
        "runs": runs,
        "median": median,
        "ratios": ratios,
        "projected": project,
        "note": args.note,
    }
    if args.write_7b:
        path = WORK / "llama-7b-v2.safetensors"
        result = stdout_json(check("write 7b", run_measured(child_command(__file__, "write", "7b", args.fraction,
                                                                          "2", path))))
        report["written_7b"] = result["bytes"]
        path.unlink()
    for path in files.values():
        path.unlink(missing_ok=True)
    write_report(args.out, "mask_format", _markdown(report), report)


if __name__ == "__main__":
    main()
