"""Run a command as a child process and measure its wall time and peak RSS.

The peak comes from ``os.wait4``: the kernel's ``ru_maxrss`` of exactly that
child (and any children it waited for), not a sampled estimate. Linux starts a
child's high-water mark at its parent's when it is spawned, so the parent
should stay small (stdlib only, no big arrays): ``parent_floor_gib`` reports
that floor, and no figure below it means anything.

Also the scaffolding the benchmark scripts share: finding ``fps-onnx``,
rounds of measured variants with their medians and paired ratios, the
markdown tables of those, and the run-and-record steps of the fine-tuning
benchmarks. Stdlib only, so the parent stays small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import datetime as dt
import json
import os
from pathlib import Path
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

GIB = 1024**3
METRICS = ("wall_s", "cpu_s", "peak_rss_gib")


def run_measured(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    capture: bool = True,
    timeout_s: float | None = None,
) -> dict:
    """Run ``cmd`` to completion.

    Returns ``wall_s``, ``peak_rss_gib`` and ``cpu_s`` (user + system time)
    of the child, ``returncode``, ``stdout``/``stderr`` (text, when
    ``capture``) and ``parent_floor_gib``.
    ``env`` entries are added to the current environment. A child still
    running after ``timeout_s`` is killed (``timed_out`` says so).
    """
    full_env = None if env is None else {**os.environ, **env}
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    # Output goes to files, not pipes: the child is reaped with os.wait4
    # (to get its rusage), so nothing may be left waiting on a full pipe.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), env=full_env, cwd=cwd,
            stdout=out if capture else None, stderr=err if capture else None,
        )
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer is not None:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        if timer is not None:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits again
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return {
        "wall_s": wall,
        "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "returncode": proc.returncode,
        "stdout": texts[0],
        "stderr": texts[1],
        "parent_floor_gib": floor,
        "timed_out": killed.is_set(),
    }


# --------------------------------------------------------------------------- variants and rounds


def fps_onnx_command() -> str:
    """The ``fps-onnx`` beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "fps-onnx"
    found = str(beside) if beside.exists() else shutil.which("fps-onnx")
    if found is None:
        raise SystemExit("fps-onnx is not installed (pip install -e .)")
    return found


def child_command(script: str, role: str, *args) -> list[str]:
    """The command running ``script --role ROLE ARGS...`` with this Python."""
    return [sys.executable, str(Path(script).resolve()), "--role", role, *map(str, args)]


def output_tail(result: dict, lines: int) -> str:
    """The last ``lines`` lines of a run's stderr (its stdout when stderr is empty)."""
    return "\n".join((result["stderr"] or result["stdout"]).strip().splitlines()[-lines:])


def check(name: str, result: dict, lines: int = 8) -> dict:
    """``result``, or SystemExit with the tail of its output when it failed."""
    if result["returncode"] != 0:
        raise SystemExit(f"{name} failed (exit {result['returncode']}):\n" + output_tail(result, lines))
    return result


def machine() -> str:
    """Architecture, cores, platform and Python version of this machine, in one line."""
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}, "
            f"Python {platform.python_version()}")


def versions(*dists: str) -> dict[str, str | None]:
    """Python's version and each installed distribution's (None where it is not installed), read from
    package metadata: nothing is imported, so the caller stays small."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    return out


def measure_rounds(variants: dict[str, list[str]], repeat: int, tail: int = 8,
                   extra=None) -> tuple[dict, dict]:
    """Run every variant once per round, back to back; (runs, medians) of :data:`METRICS`.

    ``extra(name, result)``: more fields to record for a run, from its result
    (e.g. stage times it printed). A failed run ends the benchmark with the last
    ``tail`` lines of its output."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(repeat):
        for name, cmd in variants.items():
            r = check(name, run_measured(cmd), tail)
            runs[name].append({k: r[k] for k in METRICS} | (extra(name, r) if extra else {}))
            print(f"[{i + 1}/{repeat}] {name:6s} {r['wall_s']:6.1f} s  {r['cpu_s']:6.1f} s CPU  "
                  f"{r['peak_rss_gib']:5.2f} GiB", flush=True)
    median = {name: {k: statistics.median(r[k] for r in rs) for k in METRICS} for name, rs in runs.items()}
    return runs, median


def _paired(runs: dict, a: str, b: str, key: str) -> float:
    """Median over rounds of run i of ``a`` / run i of ``b`` (they ran back to back)."""
    return statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b]))


def ratios(med: dict, runs: dict) -> dict:
    """select/plain and gps/select ratios of time, CPU time and peak RSS, where both ran."""
    out = {}
    if "select" in med and "plain" in med:
        out["select/plain time"] = _paired(runs, "select", "plain", "wall_s")
        out["select/plain time (ratio of medians)"] = med["select"]["wall_s"] / med["plain"]["wall_s"]
        out["select/plain CPU time"] = _paired(runs, "select", "plain", "cpu_s")
        out["select/plain peak RSS"] = _paired(runs, "select", "plain", "peak_rss_gib")
    if "gps" in med and "select" in med:
        out["gps/select time"] = _paired(runs, "gps", "select", "wall_s")
        out["gps/select peak RSS"] = _paired(runs, "gps", "select", "peak_rss_gib")
    return out


def met(targets: dict, name: str, value: float) -> bool | None:
    """Whether ``value`` meets ``targets[name]`` = (bound, "<=" or ">="); None without a target."""
    bound, op = targets.get(name, (None, None))
    if bound is None:
        return None
    return value <= bound if op == "<=" else value >= bound


def round_tables(report: dict, targets: dict) -> list[str]:
    """Markdown lines: the variants' medians and runs, then the ratios against ``targets``."""
    lines = [
        "| variant | wall time (s) | CPU time (s) | peak RSS (GiB) | wall time of each run (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, m in report["median"].items():
        runs = ", ".join(f"{r['wall_s']:.1f}" for r in report["runs"][name])
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_gib']:.2f} | {runs} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    for name, value in report["ratios"].items():
        ok = met(targets, name, value)
        if ok is None:
            lines.append(f"| {name} | {value:.2f} | | |")
        else:
            bound, op = targets[name]
            lines.append(f"| {name} | {value:.2f} | {op} {bound} | {'yes' if ok else 'NO'} |")
    return lines


# --------------------------------------------------------------------------- fine-tuning cells


def log(msg: str) -> None:
    """Print ``msg`` with the UTC time, at once."""
    print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def run_offline(cmd: list[str], root: Path, env: dict[str, str] | None = None) -> dict:
    """:func:`run_measured` in ``root`` with the hub offline and ``root`` importable (``env``: more
    variables for the child); RuntimeError with the end of stderr when it fails."""
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    m = run_measured(cmd, env=env, cwd=root)
    if m["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({m['returncode']}):\n{m['stderr'][-3000:]}")
    return m


def stdout_json(result: dict):
    """The JSON on a run's stdout from its first ``{`` on (some packages print before it)."""
    return json.loads(result["stdout"][result["stdout"].index("{"):])


def write_report(out: Path, stem: str, text: str, report: dict) -> None:
    """Print a benchmark's markdown ``text`` and write it and its ``report`` as OUT/STEM.md and .json."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")


def write_cell(path: Path, cell: dict) -> None:
    """Write ``cell`` as JSON to ``path`` through a temporary file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".tmp")
    part.write_text(json.dumps(cell, indent=1))
    os.replace(part, path)
