"""PostgreSQL's answers by size, over loopback TCP and over its Unix socket (`python -m bench.loopback`).

Question: does this host hold back large answers sent over loopback TCP (README "PostgreSQL on the
same host": under BBR, the rest of an answer over about 128 KB now and then leaves about 40 ms
late)? A funder's page of 100 activations is a 170 KB answer from the database.

Method: BENCH_THREADS threads (4), each with its own psycopg connection (autocommit), send one query
every BENCH_INTERVAL_MS (20) whose answer is rows of 2,000 bytes (`repeat('x', 2000)`, about a
page's stored decision each) adding up to the case's size, and time each query to its last row.
Each size is measured over TCP (BENCH_PG_URL's address) and over the Unix socket (BENCH_PG_SOCKET_DIR,
/var/run/postgresql; skipped if absent), the two in alternating order from size to size, for
BENCH_SECONDS (5) each. The method says which congestion control a connection accepted on the TCP
address gets (entitlement/hostcheck.py): the sender's, PostgreSQL's backend, is what decides.
No code of the service runs here: this is the host, measured. BENCH_SIZES_KB (4,32,126,170,256),
BENCH_OUTPUT (BENCHMARKS.md, its "loopback" section; "-" to only print).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL, make_url

from bench.common import say
from bench.prepare import pg_problem
from bench.procs import commit, loadavg, loopback_cc_text, machine, pg_version
from bench.report import percentile
from bench.sections import replace_section
from entitlement import hostcheck
from entitlement.config import ROOT

SECTION = "loopback"
ROW_BYTES = 2000
SLOW_MS = 30.0  # an answer this late is a stall, not the query (p99 of small answers: 1-2 ms)
TCP, SOCKET = "loopback TCP", "Unix socket"


@dataclass(frozen=True)
class Config:
    pg_url: str
    socket_dir: str
    sizes_kb: tuple[int, ...]
    seconds: float
    threads: int
    interval_s: float
    output: Path | None

    @classmethod
    def from_env(cls) -> "Config":
        sizes = tuple(int(x) for x in os.environ.get("BENCH_SIZES_KB", "4,32,126,170,256").split(",") if x.strip())
        if not sizes or min(sizes) < 1:
            raise SystemExit("BENCH_SIZES_KB must list positive sizes in KB, e.g. 32,170")
        seconds = float(os.environ.get("BENCH_SECONDS", "5"))
        threads = int(os.environ.get("BENCH_THREADS", "4"))
        interval_ms = float(os.environ.get("BENCH_INTERVAL_MS", "20"))
        if seconds <= 0 or threads < 1 or interval_ms < 0:
            raise SystemExit("BENCH_SECONDS must be positive, BENCH_THREADS at least 1, BENCH_INTERVAL_MS not negative")
        out = os.environ.get("BENCH_OUTPUT", "").strip()
        return cls(pg_url=os.environ.get("BENCH_PG_URL", "").strip() or "postgresql://postgres@127.0.0.1:5432/test",
                   socket_dir=os.environ.get("BENCH_PG_SOCKET_DIR", "").strip() or "/var/run/postgresql",
                   sizes_kb=sizes, seconds=seconds, threads=threads, interval_s=interval_ms / 1000,
                   output=None if out == "-" else Path(out) if out else ROOT / "BENCHMARKS.md")


@dataclass(frozen=True)
class Case:
    transport: str
    size_kb: int
    latencies_ms: tuple[float, ...]

    @property
    def slow(self) -> int:
        return sum(1 for x in self.latencies_ms if x > SLOW_MS)

    def row(self) -> tuple[str, ...]:
        lat = sorted(self.latencies_ms)
        n = len(lat)
        return (self.transport, f"{self.size_kb:,}", f"{n:,}", f"{statistics.median(lat):.2f}",
                f"{percentile(lat, 99):.2f}", f"{lat[-1]:.1f}", f"{self.slow:,} ({self.slow / n * 100:.1f} %)")


def socket_url(pg_url: str, socket_dir: str) -> str:
    """The same user and database, through the Unix socket in `socket_dir`."""
    u = make_url(pg_url)
    return URL.create(u.drivername, username=u.username, password=u.password, database=u.database,
                      query={"host": socket_dir}).render_as_string(hide_password=False)


def libpq(url: str) -> str:
    """What psycopg.connect takes: the URL without SQLAlchemy's driver name."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def run_case(url: str, transport: str, size_kb: int, cfg: Config) -> Case:
    rows = max(1, size_kb * 1024 // ROW_BYTES)
    sql = f"SELECT repeat('x', {ROW_BYTES}) FROM generate_series(1, {rows})"
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    conns = [psycopg.connect(libpq(url), autocommit=True) for _ in range(cfg.threads)]
    for conn in conns:  # each connection's first answer of this size, unmeasured
        conn.execute(sql).fetchall()
    start = threading.Barrier(cfg.threads)

    def worker(conn: psycopg.Connection) -> None:
        mine: list[float] = []
        try:
            start.wait()
            end = time.monotonic() + cfg.seconds
            while time.monotonic() < end:
                t = time.perf_counter()
                got = conn.execute(sql).fetchall()
                mine.append((time.perf_counter() - t) * 1000)
                if len(got) != rows:
                    raise RuntimeError(f"bench.loopback: {len(got)} rows instead of {rows}")
                time.sleep(cfg.interval_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run_case
            errors.append(exc)
        with lock:
            latencies.extend(mine)
    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return Case(transport, size_kb, tuple(latencies))


def table(cases: list[Case]) -> str:
    head = ("transport", "answer KB", "queries", "p50 ms", "p99 ms", "max ms", f"over {SLOW_MS:.0f} ms")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(c.row()) + " |" for c in cases]
    return "\n".join(lines)


def conclusion(cases: list[Case], cc: str | None) -> str:
    by = {(c.transport, c.size_kb): c for c in cases}
    late = [c for c in cases if c.transport == TCP and c.slow]
    if not late:
        return (f"No answer over loopback TCP was held back beyond {SLOW_MS:.0f} ms (connections there got "
                f"`{cc}`).")
    parts = []
    for c in late:
        sock = by.get((SOCKET, c.size_kb))
        other = f"; over the Unix socket {sock.slow} of {len(sock.latencies_ms):,}" if sock else ""
        parts.append(f"{c.size_kb:,} KB: {c.slow} of {len(c.latencies_ms):,} over TCP{other}")
    smallest = min(c.size_kb for c in late)
    return (f"Answers held back beyond {SLOW_MS:.0f} ms over loopback TCP (connections there got `{cc}`): "
            + "; ".join(parts) + f". The smallest size with any: {smallest:,} KB. "
            + ("Under BBR, the README's remedies apply (\"PostgreSQL on the same host\")."
               if cc in hostcheck.STALLING else "This congestion control is not known to stall: look further."))


def markdown(cfg: Config, cases: list[Case], cc: str | None, cc_text: str, version: str, socket_note: str,
             started: str, load: tuple[str, str], elapsed: float) -> str:
    cpu, mem = machine()
    return f"""## PostgreSQL's answers by size, over loopback TCP and its Unix socket (`python -m bench.loopback`)

Written by `python -m bench.loopback` (part of `make bench`, code in `bench/loopback.py`); each run rewrites this section. Why: README "PostgreSQL on the same host".

### Method

- Machine: `nproc` = {len(os.sched_getaffinity(0))} ({cpu}), {mem:.0f} GiB; load average {load[0]} at the start, {load[1]} at the end. Run on {started}; {elapsed:.0f} s in all. Python {platform.python_version()}, psycopg {psycopg.__version__}, PostgreSQL {version}. Code: {commit()}.
- {cc_text} PostgreSQL's backend, the sender, sends its answers under it.
- Load: {cfg.threads} threads, each with its own connection (autocommit), one query every {cfg.interval_s * 1000:g} ms, whose answer is rows of {ROW_BYTES:,} bytes adding up to the size (a page of 100 activations is about 170 KB from the database); each query timed to its last row, {cfg.seconds:g} s per case after one unmeasured query per connection; TCP and the socket in alternating order from size to size.{socket_note}

### Results

{table(cases)}

{conclusion(cases, cc)}
"""


def main() -> int:
    cfg = Config.from_env()
    problem = pg_problem(libpq(cfg.pg_url))
    if problem:
        say(f"bench.loopback: PostgreSQL not reachable at {cfg.pg_url} ({problem}): nothing to measure")
        return 1
    began, load_start = time.monotonic(), loadavg()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    address = hostcheck.database_loopback_address(cfg.pg_url) or make_url(cfg.pg_url).host or "127.0.0.1"
    cc = hostcheck.accepted_congestion_control(address)
    cc_text = loopback_cc_text(address)  # at the start: the host as measured
    say(f"bench.loopback: {cc_text}")
    sock = socket_url(cfg.pg_url, cfg.socket_dir)
    socket_note = ""
    if not Path(cfg.socket_dir).is_dir() or pg_problem(libpq(sock)):
        socket_note = f" The Unix socket: not measured (none answers in {cfg.socket_dir})."
        sock = ""
    cases: list[Case] = []
    for i, size in enumerate(cfg.sizes_kb):
        order = [(cfg.pg_url, TCP), (sock, SOCKET)] if sock else [(cfg.pg_url, TCP)]
        for url, transport in (order if i % 2 == 0 else order[::-1]):
            case = run_case(url, transport, size, cfg)
            cases.append(case)
            c = case.row()
            say(f"  {transport:12s} {c[1]:>6s} KB  {c[2]:>6s} queries  p50 {c[3]:>6s}  p99 {c[4]:>6s}  "
                f"max {c[5]:>6s} ms  over {SLOW_MS:.0f} ms: {c[6]}")
    cases.sort(key=lambda c: (c.transport != TCP, c.size_kb))
    text = markdown(cfg, cases, cc, cc_text, pg_version(libpq(cfg.pg_url)), socket_note, started, (load_start, loadavg()),
                    time.monotonic() - began)
    say("")
    say(conclusion(cases, cc))
    if cfg.output is not None:
        replace_section(cfg.output, SECTION, text)
        say(f"bench.loopback: wrote {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
