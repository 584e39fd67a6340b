"""Helpers shared by the benchmarks: timing child processes, medians, tables.

Each ``bench_*.py`` script imports this module from its own directory, so it
runs as ``python bench/bench_x.py`` from anywhere.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChildRun:
    """One finished child process: wall time, peak RSS and bytes it wrote."""

    seconds: float
    cpu_seconds: float  # user + system time of the child (and its launcher)
    maxrss_bytes: int  # the child's own peak RSS (GNU time's %M)
    write_bytes: int  # /proc/<pid>/io write_bytes: bytes it sent towards storage
    returncode: int
    stdout: str
    stderr: str


def cli_argv() -> list[str]:
    """The installed ``adapterhub`` console script of this interpreter's venv."""
    script = Path(sys.executable).with_name("adapterhub")
    return [str(script)] if script.exists() else [sys.executable, "-m", "adapterhub.cli"]


def _proc_write_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


TIME = "/usr/bin/time"
_RSS_MARK = "__bench_maxrss_kb="


def run_child(argv: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True) -> ChildRun:
    """Run ``argv`` to completion; time it from spawn to exit.

    Peak RSS: ``wait4``'s ``ru_maxrss`` cannot be used directly, because
    Python spawns children with vfork and Linux carries the *parent's* peak
    RSS into the child at exec (``exec_mmap`` keeps the old mm's hiwater), so
    every child would look as big as this benchmark process. GNU time forks
    from its own small process, so its ``%M`` is the child's own peak.

    Bytes written: the launcher is waited for without being reaped
    (``WNOWAIT``) and its ``/proc/<pid>/io`` read; it includes the child,
    which the launcher has reaped. stdout and stderr are pipes (drained by
    threads), which count as no storage writes.
    """
    launcher = [TIME, "-f", _RSS_MARK + "%M"] if os.path.exists(TIME) else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        launcher + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env) if env is not None else None
    )
    chunks: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda k=k, f=f: chunks.__setitem__(k, f.read()))
        for k, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for t in readers:
        t.start()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    seconds = time.perf_counter() - t0
    written = _proc_write_bytes(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    stderr = chunks["err"].decode(errors="replace")
    maxrss = usage.ru_maxrss * 1024  # Linux reports KiB; an upper bound without GNU time
    if launcher and _RSS_MARK in stderr:
        stderr, _, kb = stderr.rpartition(_RSS_MARK)
        maxrss = int(kb.split()[0]) * 1024
    cpu = usage.ru_utime + usage.ru_stime
    run = ChildRun(seconds, cpu, maxrss, written, proc.returncode, chunks["out"].decode(errors="replace"), stderr)
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {run.returncode}:\n{run.stderr[-2000:]}")
    return run


def timed(fn, *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def timed_cpu(fn, *args: object) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn(*args)`` in this process, all threads."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def sync() -> None:
    """Flush dirty pages so one measurement does not pay for the last one's writeback."""
    os.sync()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def load() -> str:
    """The 1/5/15-minute load average: other work on the box skews every figure."""
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_line() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}, {load()}"
