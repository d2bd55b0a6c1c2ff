"""Registry benchmark (`python -m bench.registry`, part of `make bench`): import a synthetic
national-scale extract on SQLite and on PostgreSQL, in a child process whose peak memory is
measured, then time lookups in-process at that size and at 1,000 people.

Settings (environment):
  BENCH_REGISTRY_ROWS     rows of the big extract (6000000)
  BENCH_REGISTRY_LOOKUPS  timed lookups per size and backend (20000)
  BENCH_BACKENDS          sqlite,postgres ; BENCH_PG_URL admin URL (postgresql://postgres@127.0.0.1:5432/test)
  BENCH_OUTPUT            BENCHMARKS.md (its "registry" section is rewritten); "-" to only print
The synthetic extract is cached under var/bench/ (git-ignored) between runs.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.common import BACKENDS, OUTPUT, PG_ADMIN, pg_reachable, pg_url, say
from bench.sections import replace_section
from entitlement import registry, synthetic
from entitlement.clock import SystemClock
from entitlement.config import ROOT
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade

ROWS = int(os.environ.get("BENCH_REGISTRY_ROWS", "6000000"))
LOOKUPS = int(os.environ.get("BENCH_REGISTRY_LOOKUPS", "20000"))


@dataclass
class ImportRun:
    backend: str
    rows: int
    seconds: float
    peak_rss_mb: float
    rows_per_s: float
    cpu_s: float  # the importing process's own CPU (user + system), not the database server's


@dataclass
class LookupRun:
    backend: str
    people: int
    p50_us: float
    p99_us: float
    max_us: float


def extract(rows: int) -> Path:
    path = ROOT / "var" / "bench" / f"registry-{rows}.csv"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        synthetic.write(tmp, rows, seed=6)
        tmp.rename(path)
        say(f"  generated {rows:,} rows in {time.perf_counter() - started:.0f} s ({path.stat().st_size / 1e6:.0f} MB)")
    return path


class Target:
    """A throwaway database of one backend."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend, self.pg_name = backend, ""
        if backend == "sqlite":
            self.url = f"sqlite:///{tmp / f'registry-{uuid.uuid4().hex[:6]}.db'}"
        else:
            self.pg_name = f"entitlement_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_name}"')
            self.url = pg_url(PG_ADMIN, self.pg_name)
        upgrade(self.url)

    def drop(self) -> None:
        if self.pg_name:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')


def timed_import(target: Target, path: Path, key_file: Path, rows: int) -> ImportRun:
    """`entitlement registry import` in a child process: wall time and the child's peak RSS."""
    env = {**os.environ, "ENTITLEMENT_DATABASE_URL": target.url, "ENTITLEMENT_PSEUDONYM_KEY_FILE": str(key_file)}
    cmd = [sys.executable, "-m", "entitlement.cli", "registry", "import", str(path), "--quiet",
           "--extracted-on", SystemClock(os.environ.get("ENTITLEMENT_TIMEZONE", "Europe/Paris")).today().isoformat(), "--rejects", os.devnull]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"import failed on {target.backend}: {err}")
    return ImportRun(target.backend, rows, seconds, usage.ru_maxrss / 1024, rows / seconds,
                     usage.ru_utime + usage.ru_stime)


def timed_lookups(target: Target, pseudo: Pseudonymizer, people: int) -> LookupRun:
    """In-process `registry.lookup` (what a check does), half known people, half unknown ids."""
    rnd = random.Random(1)
    known = [r for r, _ in zip(synthetic.rows(people, seed=6), range(min(people, 50_000)))]
    db = Database(target.url, pool_size=1)
    samples: list[float] = []
    try:
        with db.read() as s:
            for i in range(LOOKUPS + 500):
                if i % 2:
                    r = rnd.choice(known)
                    key, birth = pseudo.person_key(r["identifiant"]), dt.date.fromisoformat(r["dateNaissance"])
                else:
                    key, birth = pseudo.person_key(f"UNKNOWN{i}"), dt.date(1990, 1, 1)
                t0 = time.perf_counter_ns()
                registry.lookup(s.connection(), key, birth)
                if i >= 500:  # warm-up
                    samples.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        db.dispose()
    samples.sort()
    return LookupRun(target.backend, people, samples[len(samples) // 2], samples[int(len(samples) * 0.99)],
                     samples[-1])


def main() -> int:
    say(f"registry benchmark: {ROWS:,} rows, {LOOKUPS:,} lookups, backends {', '.join(BACKENDS)}")
    big = extract(ROWS)
    small = extract(1000)
    imports: list[ImportRun] = []
    lookups: list[LookupRun] = []
    with tempfile.TemporaryDirectory(prefix="entitlement-bench-registry-") as tmp_name:
        tmp = Path(tmp_name)
        key_file = tmp / "pseudonym.key"
        pseudo = Pseudonymizer.from_file(key_file, create=True)
        for backend in BACKENDS:
            if backend == "postgres" and not pg_reachable():
                say("  postgres: not reachable, skipped")
                continue
            for path, rows in ((small, 1000), (big, ROWS)):
                target = Target(backend, tmp)
                try:
                    run = timed_import(target, path, key_file, rows)
                    if rows == ROWS:
                        imports.append(run)
                    say(f"  {backend}: imported {rows:,} rows in {run.seconds:.1f} s = {run.rows_per_s:,.0f} rows/s, "
                        f"peak RSS {run.peak_rss_mb:.0f} MB, importer CPU {run.cpu_s:.1f} s")
                    lk = timed_lookups(target, pseudo, rows)
                    lookups.append(lk)
                    say(f"  {backend}: lookup with {rows:,} people p50 {lk.p50_us:.0f} us, p99 {lk.p99_us:.0f} us")
                finally:
                    target.drop()
    md = markdown(imports, lookups)
    print(md)
    if OUTPUT != "-":
        replace_section(Path(OUTPUT), "registry", md)
    return 0


def markdown(imports: list[ImportRun], lookups: list[LookupRun]) -> str:
    lines = [
        "## Registry import and lookup (`python -m bench.registry`)",
        "",
        f"- Run on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, `nproc` = {os.cpu_count()}, "
        f"Python {platform.python_version()}; load average (1/5/15 min) at the end: "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share the 2 cores: compare runs only when low).",
        "- Import: `entitlement registry import FILE` in a child process on a fresh migrated database; wall "
        "time includes the checksum pass, parsing and validating every row, the keyed HMAC of each "
        "identifiant, the writes and the switch; peak RSS and CPU (user + system) are the child's (`wait4`). "
        "Its CPU time depends much less on the machine's load than the wall time does; it includes SQLite's "
        "work (embedded), not PostgreSQL's server processes. Synthetic extract from `entitlement.synthetic` "
        "(9 columns, names included and dropped).",
        f"- Lookup: `registry.lookup` in-process (one SQL round trip, as a check does), {LOOKUPS:,} timed "
        "calls after 500 warm-up, half known people, half unknown ids.",
        "- Targets (issue #4): at least 100,000 rows/s, peak memory under 300 MB; lookup p99 under 1 ms at "
        "6 M people as at 1,000.",
        "- Since migration 0009, `registry_people` has no foreign key to `registry_snapshots` (the invariant "
        "checker, `entitlement doctor`, checks the rows' snapshots instead). PostgreSQL checked it with one "
        "trigger call per merged row: the merge of 2,000,000 staged rows took 11.5-11.7 s of server CPU with "
        "the key and 4.5-4.7 s without (two runs each, alternating); whole imports of 2 M rows, paired at "
        "load average 1.5: 86,497 and 77,866 rows/s with it, 119,710 and 118,664 without. SQLite's check cost"
        " no measurable importer CPU (22.3 / 23.3 s with it at 2 M rows, 22.4 / 21.3 s without; paired at "
        "load 1.7: 95,627 rows/s with it, 99,060 without).",
        "",
        "| backend | rows | seconds | rows/s | peak RSS MB | importer CPU s |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {r.backend} | {r.rows:,} | {r.seconds:.1f} | {r.rows_per_s:,.0f} | {r.peak_rss_mb:.0f} | {r.cpu_s:.1f} |"
          for r in imports),
        "",
        "| backend | people | lookup p50 us | p99 us | max us |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r.backend} | {r.people:,} | {r.p50_us:.0f} | {r.p99_us:.0f} | {r.max_us:.0f} |" for r in lookups),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
