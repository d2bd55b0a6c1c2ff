"""Pinning a server process to one CPU (ENTITLEMENT_CPU_AFFINITY).

Why: a server process runs its Python under one interpreter lock, whatever the number of cores;
its threads (gRPC's poller, the worker pool) hand that lock to each other thousands of times a
second. Left to the kernel, they run on different cores: every hand-over wakes a thread on another
core, and the interpreter's shared objects move from one core's cache to the other's. Pinned, the
same server does the same work with fewer switches and less CPU per call (measured by
`python -m bench.rpcs`, BENCHMARKS.md "One process pinned to one CPU"; docs/PERFORMANCE-LOG.md).

Settings:
- `auto` (the default): pinned only when ENTITLEMENT_PROCESSES equals the number of CPUs this
  process may run on (its cpuset: a container's, or the machine's): one server process per CPU,
  process i on the i-th. Anything else is left to the kernel: a single process on a larger machine
  knows nothing of its neighbours (two services pinned by default to the same first CPU would
  share it while the others idle), nor do N processes on a host with more CPUs than N (every
  replica would pin to the same first N), and more processes than CPUs would put two on one CPU
  for good.
- `off`: never pinned.
- a list of CPUs, `0`, `2,3` or `0-3`: process i is pinned to the i-th CPU of the list, wrapping
  round when there are more processes than CPUs listed; a single process too. Each must be one this
  process may run on.

Linux only (os.sched_setaffinity); elsewhere `auto` does nothing and a list is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

AUTO, OFF = "auto", "off"
ENV = "ENTITLEMENT_CPU_AFFINITY"
MAX_CPU = 8191  # the largest CPU number Linux builds for (CONFIG_NR_CPUS is at most 8192)
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_USAGE = f"{ENV} must be auto, off or a list of CPUs such as 0 or 0,2-3"

Setting = str | tuple[int, ...]


def parse(raw: str) -> Setting:
    """`auto`, `off`, or the CPUs of a list (in order, each once); SystemExit naming the variable
    on anything else."""
    value = raw.strip().lower()
    if value in (AUTO, OFF):
        return value
    cpus: list[int] = []
    for part in value.split(","):
        m = _RANGE.fullmatch(part.strip())
        first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, -1)
        if last < first or last > MAX_CPU:
            raise SystemExit(f"{_USAGE} (each from 0 to {MAX_CPU}); got {raw!r}")
        cpus.extend(range(first, last + 1))
    return tuple(dict.fromkeys(cpus))


def choose(setting: Setting, index: int, processes: int, allowed: set[int] | None = None) -> int | None:
    """The CPU server process `index` (of `processes`) is pinned to, or None: not pinned. `allowed`:
    the CPUs this process may run on (by default, read from the system). SystemExit naming the
    variable when a listed CPU is not among them, or when this system cannot pin."""
    if isinstance(setting, str):
        setting = parse(setting)  # (the text of a list, when a Settings was built by hand with one)
    if setting == OFF:
        return None
    can_pin = hasattr(os, "sched_setaffinity")
    if allowed is None:
        allowed = os.sched_getaffinity(0) if can_pin else set()
    if not isinstance(setting, tuple):  # auto
        if not can_pin or processes < 2 or processes != len(allowed):
            return None
        return sorted(allowed)[index]
    cpus = setting
    if not can_pin:
        raise SystemExit(f"{ENV}: this system cannot pin a process to a CPU")
    missing = [cpu for cpu in cpus if cpu not in allowed]
    if missing:
        names = ", ".join(map(str, missing))
        raise SystemExit(f"{ENV}: {'CPU' if len(missing) == 1 else 'CPUs'} {names} "
                         f"{'is not one' if len(missing) == 1 else 'are not ones'} this process may run on "
                         f"(it may run on {ranges(sorted(allowed))})")
    return cpus[index % len(cpus)]


def apply(setting: Setting, index: int = 0, processes: int = 1) -> int | None:
    """Pin this process (every thread it has now, and so every thread it starts later) to the CPU
    `choose` gives; returns it, or None when the process is left alone. Call it first thing in a
    server process, before gRPC or the database start their threads."""
    cpu = choose(setting, index, processes)
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


def cpus_of(pid: int | str) -> list[int]:
    """The CPUs any thread of process `pid` ("self": this one) may run on; [] where unknown."""
    found: set[int] = set()
    for tid in _threads(pid):
        try:
            found |= os.sched_getaffinity(tid)
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(found)


def _threads(pid: int | str = "self") -> list[int]:
    try:
        return [int(p.name) for p in Path(f"/proc/{pid}/task").iterdir()]
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
