"""Pinning a server process to one CPU (ENTITLEMENT_CPU_AFFINITY).

Why: a server process runs its Python on one interpreter lock, whatever the number of cores; its
threads (gRPC's poller, the worker pool) hand that lock to each other thousands of times a second.
Left to the kernel, they run on different cores: every hand-over wakes a thread on another core,
and the interpreter's shared objects move from one core's cache to the other's. Measured on the
2-core machine (README "Status", 2026-12-05): a SQLite server pinned to one core served 15 to 30 %
more checks and activations at a third less CPU per call, with 6 thread switches per check
instead of 16; the echo floor gains as much (its ratio to echo is unchanged).

Settings:
- `auto` (the default): with ENTITLEMENT_PROCESSES=N > 1, server process i is pinned to the i-th
  CPU this process may run on (wrapping around): N processes, N cores, one interpreter each. A
  single process is not pinned: two services pinned by default to the same first CPU would share
  it while the others idle, and a single process knows nothing of its neighbours.
- `off`: never pinned.
- a list of CPUs, `0`, `2,3` or `0-3`: process i is pinned to the i-th CPU of the list (wrapping
  around); also for a single process. Each must be one this process may run on.

Linux only (os.sched_setaffinity); elsewhere `auto` does nothing and a list is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

AUTO, OFF = "auto", "off"
ENV = "ENTITLEMENT_CPU_AFFINITY"
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse(raw: str) -> str | tuple[int, ...]:
    """`auto`, `off`, or the CPUs of a list (in order, each once); SystemExit naming the variable
    on anything else."""
    value = raw.strip().lower()
    if value in (AUTO, OFF):
        return value
    cpus: list[int] = []
    for part in value.split(","):
        m = _RANGE.fullmatch(part.strip())
        first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if last < first:
            raise SystemExit(f"{ENV} must be auto, off or a list of CPUs such as 0 or 0,2-3; got {raw!r}")
        cpus.extend(range(first, last + 1))
    return tuple(dict.fromkeys(cpus))


def choose(setting: str | tuple[int, ...], index: int, processes: int, allowed: set[int]) -> int | None:
    """The CPU server process `index` (of `processes`) is pinned to, or None: not pinned."""
    if setting == OFF:
        return None
    if setting == AUTO:
        if processes < 2 or len(allowed) < 2:
            return None
        return sorted(allowed)[index % len(allowed)]
    assert isinstance(setting, tuple)
    missing = [cpu for cpu in setting if cpu not in allowed]
    if missing:
        raise SystemExit(f"{ENV}: CPU {', '.join(map(str, missing))} is not one this process may run on "
                         f"(it may run on {ranges(sorted(allowed))})")
    return setting[index % len(setting)]


def apply(setting: str | tuple[int, ...], index: int = 0, processes: int = 1) -> int | None:
    """Pin this process (every thread it has now, and so every thread it starts later) to the CPU
    `choose` gives; returns it, or None when the process is left alone. Call it first thing in a
    server process, before gRPC or the database start their threads."""
    if not hasattr(os, "sched_setaffinity"):
        if isinstance(setting, tuple):
            raise SystemExit(f"{ENV}: this system cannot pin a process to a CPU")
        return None
    cpu = choose(setting, index, processes, os.sched_getaffinity(0))
    if cpu is None:
        return None
    # sched_setaffinity(0) sets the calling thread only: each thread that already runs is set by
    # its id (a thread started later inherits its parent's mask).
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, {cpu})
        except ProcessLookupError:  # ended meanwhile
            pass
    os.sched_setaffinity(0, {cpu})
    return cpu


def current() -> list[int]:
    """The CPUs this thread may run on (the "serving" log line reports them)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _threads() -> list[int]:
    try:
        return [int(p.name) for p in Path("/proc/self/task").iterdir()]
    except OSError:
        return []


def ranges(cpus: list[int]) -> str:
    """Sorted CPUs as Linux lists them: [0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    for cpu in cpus:
        if out and cpu == int(out[-1].rsplit("-", 1)[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)
