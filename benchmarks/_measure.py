"""Run a command as a child process and measure its wall time and peak RSS.

The peak comes from ``os.wait4``: the kernel's ``ru_maxrss`` of exactly that
child (and any children it waited for), not a sampled estimate. Linux starts a
child's high-water mark at its parent's when it is spawned, so the parent
should stay small (stdlib only, no big arrays): ``parent_floor_gib`` reports
that floor, and no figure below it means anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import resource
import subprocess
import tempfile
import threading
import time

GIB = 1024**3


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
