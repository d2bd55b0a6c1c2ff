"""Benchmark settings (BENCH_* environment variables) and the plain, picklable specs handed to the
server and load-generator processes."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from entitlement.affinity import AUTO, Setting
from entitlement.config import AUTO_LOOP, EVENT_LOOPS, LOOP_WRITES, ROOT, Settings, _choice, resolve_event_loop

# The instant every server of the benchmark lives at (a FixedClock, as in the tests): decisions,
# activations and their tokens are the same whatever the machine's date.
NOW = dt.datetime(2026, 3, 16, 10, 0, tzinfo=dt.timezone.utc)
TODAY = dt.date(2026, 3, 16)  # NOW in Europe/Paris
PROGRAM = "premium-job-seekers"
PLATFORM_ID = "openclassrooms"
ADVISOR_ID, PLATFORM_CALLER_ID, FUNDER_CALLER_ID = "bench-advisor", "bench-platform", "bench-funder"
FUNDER_ID = "ministry-of-labour"  # a funder of PROGRAM

# Server models: the two under test, and the echo floor of each.
SYNC, AIO = "sync", "aio"
AIO_INLINE = "aio-inline"  # aio with the hot reads (CheckEligibility, VerifyEntitlement) run on the event loop
SYNC_ECHO, AIO_ECHO = "sync-echo", "aio-echo"
AIO_ECHO_INLINE = "aio-echo-inline"  # aio echo answered on the event loop: what the thread hop costs
# The ladder of bench.readfloor (thread-pool servers answering CheckEligibility's and
# VerifyEntitlement's paths): bytes back; the RPC's one hot read, then bytes back; the servicer
# method with the caller's identity (no access log); the real server is SYNC.
FLOOR_ECHO, FLOOR_READ, FLOOR_HANDLER = "floor-echo", "floor-read", "floor-handler"
FLOOR_KINDS = (FLOOR_ECHO, FLOOR_READ, FLOOR_HANDLER)
# bench.readfloor's event-loop rungs (grpc.aio on the production loop, answering the same paths on
# the loop itself): bytes back; the RPC's one hot read made from the loop (PostgreSQL: libpq in
# non-blocking mode, no pool thread; SQLite: the production read, run on the loop as the
# event-loop server runs it), then bytes back.
LOOP_ECHO, LOOP_READ = "loop-echo", "loop-read"
LOOP_KINDS = (LOOP_ECHO, LOOP_READ)
MODELS = (SYNC, AIO, AIO_INLINE)
ECHO_MODELS = (SYNC_ECHO, AIO_ECHO, AIO_ECHO_INLINE)
ECHO_OF = {SYNC: SYNC_ECHO, AIO: AIO_ECHO, AIO_INLINE: AIO_ECHO_INLINE}

CHECK, VERIFY, ECHO = "CheckEligibility", "VerifyEntitlement", "Echo"
ACTIVATE, REDEEM, LIST = "ActivateEntitlement", "RedeemActivationToken", "ListActivations"
METHOD_PATHS = {
    CHECK: "/entitlement.v1.EligibilityService/CheckEligibility",
    VERIFY: "/entitlement.v1.ActivationService/VerifyEntitlement",
    ACTIVATE: "/entitlement.v1.ActivationService/ActivateEntitlement",
    REDEEM: "/entitlement.v1.ActivationService/RedeemActivationToken",
    LIST: "/entitlement.v1.AuditService/ListActivations",
    ECHO: "/bench.Echo/Echo",
}
ECHO_SERVICE = "bench.Echo"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


def _int(name: str, default: int) -> int:
    value = _float(name, default)
    if value != int(value) or value < 0:
        raise SystemExit(f"{name} must be a non-negative integer, got {value}")
    return int(value)


def bench_event_loop() -> str:
    """BENCH_EVENT_LOOP: the loop of every event-loop server of a benchmark, ours and the aio
    echoes alike (as ENTITLEMENT_EVENT_LOOP: auto, uvloop or asyncio; auto by default)."""
    return _choice("BENCH_EVENT_LOOP", AUTO_LOOP, EVENT_LOOPS)


def bench_loop_writes() -> str:
    """BENCH_LOOP_WRITES: as ENTITLEMENT_LOOP_WRITES (auto or off; auto by default), for our
    event-loop servers (SQLite: an activation's and a redemption's write on the loop)."""
    return _choice("BENCH_LOOP_WRITES", "auto", LOOP_WRITES)


def event_loop_text(setting: str, variable: str) -> str:
    """The event-loop servers' loop as a benchmark's method text says it: the loop `setting` (the
    value of `variable`) gives here."""
    return f"{resolve_event_loop(setting)}'s loop (`{variable}` {setting})"


def _list(name: str, default: str) -> list[str]:
    return [x.strip() for x in (os.environ.get(name, "").strip() or default).split(",") if x.strip()]


@dataclass(frozen=True)
class BenchConfig:
    seconds: float          # measured seconds per model and case (BENCH_SECONDS), split over the rounds
    warmup: float           # untimed calls before each round's window (BENCH_WARMUP)
    rounds: int             # alternating sync/aio rounds per case, ABBA... (BENCH_ROUNDS)
    concurrency: tuple[int, ...]  # in-flight calls of the load generator (BENCH_CONCURRENCY)
    people: int             # rows of the synthetic registry (BENCH_PEOPLE)
    activations: int        # activations created and redeemed before the runs (BENCH_ACTIVATIONS)
    workers: int            # unary thread-pool size of both models (BENCH_WORKERS; the DB pool adds the stream threads)
    backends: tuple[str, ...]  # wanted backends (BENCH_BACKENDS); postgres is skipped when unreachable
    pg_admin_url: str       # BENCH_PG_URL
    log_level: str          # servers' log level (BENCH_LOG_LEVEL); logs go to files in the temp dir
    output: Path | None     # BENCHMARKS.md, or None when BENCH_OUTPUT=- (print only)
    keep: bool              # keep the temp dir (databases, server logs) when BENCH_KEEP=1

    @classmethod
    def from_env(cls) -> "BenchConfig":
        conc = tuple(int(c) for c in _list("BENCH_CONCURRENCY", "8,32"))
        if not conc or min(conc) < 1:
            raise SystemExit("BENCH_CONCURRENCY must list positive integers, e.g. 8,32")
        backends = tuple(_list("BENCH_BACKENDS", "sqlite,postgres"))
        unknown = set(backends) - {"sqlite", "postgres"}
        if unknown:
            raise SystemExit(f"BENCH_BACKENDS: unknown backend(s) {', '.join(sorted(unknown))}")
        out = os.environ.get("BENCH_OUTPUT", "").strip()
        seconds = _float("BENCH_SECONDS", 5.0)
        if seconds <= 0:
            raise SystemExit("BENCH_SECONDS must be positive")
        return cls(
            seconds=seconds,
            warmup=_float("BENCH_WARMUP", 0.5),
            rounds=max(_int("BENCH_ROUNDS", 4), 1),
            concurrency=conc,
            people=max(_int("BENCH_PEOPLE", 20_000), 1000),
            activations=max(_int("BENCH_ACTIVATIONS", 200), 1),
            workers=max(_int("BENCH_WORKERS", Settings().max_workers), 1),
            backends=backends,
            pg_admin_url=os.environ.get("BENCH_PG_URL", "").strip() or "postgresql://postgres@127.0.0.1:5432/test",
            log_level=os.environ.get("BENCH_LOG_LEVEL", "").strip() or "info",
            output=None if out == "-" else Path(out) if out else ROOT / "BENCHMARKS.md",
            keep=os.environ.get("BENCH_KEEP", "") == "1",
        )


@dataclass(frozen=True)
class ServerSpec:
    """What a server process needs: built from plain values, so it crosses `spawn` as is."""

    kind: str               # sync | aio | aio-inline | sync-echo | aio-echo | aio-echo-inline | floor-*
    workers: int
    log_path: Path
    log_level: str = "info"
    database_url: str = ""
    callers_file: Path | None = None
    key_dir: Path | None = None
    pseudonym_key_file: Path | None = None
    port: int = 0           # 0: any free port; a fixed port when several processes share it
    processes: int = 1      # processes serving `port` (each its own ServerSpec; SO_REUSEPORT when > 1)
    index: int = 0          # which of those processes this one is (its CPU, when pinned)
    cpu_affinity: Setting = AUTO  # as ENTITLEMENT_CPU_AFFINITY (entitlement/affinity.py)
    check_rate_per_min: int = 0  # the per-caller rate limit (0: no limiter interceptor)
    check_burst: int = 20
    count_queries: bool = False  # count SQL statements, transactions and pool checkouts (sync only)
    server_model: str = "threads"  # kind sync: ENTITLEMENT_SERVER_MODEL of server_main.start (threads | event-loop)
    # ENTITLEMENT_EVENT_LOOP of every event-loop server, ours and the aio echoes alike (BENCH_EVENT_LOOP)
    event_loop: str = field(default_factory=bench_event_loop)
    loop_writes: str = field(default_factory=bench_loop_writes)  # ENTITLEMENT_LOOP_WRITES (BENCH_LOOP_WRITES)
    switch_interval_us: int = 0  # 0: Python's own, as server.py; else sys.setswitchinterval (bench.mixed's experiment)

    def settings(self) -> Settings:
        assert self.callers_file and self.key_dir and self.pseudonym_key_file
        return Settings(listen=f"127.0.0.1:{self.port}", database_url=self.database_url,
                        programs_dir=ROOT / "programs", callers_file=self.callers_file, key_dir=self.key_dir,
                        pseudonym_key_file=self.pseudonym_key_file, issuer="urn:entitlement:bench",
                        max_workers=self.workers, processes=self.processes, cpu_affinity=self.cpu_affinity,
                        grace_seconds=1, server_model=self.server_model, event_loop=self.event_loop,
                        loop_writes=self.loop_writes,
                        log_level=self.log_level, check_rate_per_min=self.check_rate_per_min,
                        check_burst=self.check_burst)


@dataclass(frozen=True)
class LoadSpec:
    """One timed run: `concurrency` calls kept in flight (closed loop) or, with `rate`, calls sent
    at that fixed rate whatever the answers (open loop), over `channels` grpc.aio channels (each its
    own connection), for `warmup` + `seconds`; requests are pre-serialized and cycled, or, with
    `pool`, taken once each from a named list kept by the load generator (the run's window ends
    early if the pool runs dry)."""

    port: int
    server_pid: int
    method: str             # a key of METHOD_PATHS
    requests: tuple[bytes, ...]
    token: str = ""
    concurrency: int = 8
    warmup: float = 0.5
    seconds: float = 1.25
    channels: int = 1
    server_pids: tuple[int, ...] = ()  # every process serving the port (server_pid when empty)
    rate: float = 0.0       # calls/s, open loop; 0: closed loop with `concurrency` in flight
    pool: str = ""          # take requests once each from this pool of the load generator
    keep_tokens: str = ""   # ActivateEntitlement: add a RedeemActivationToken request per granted
                            # activation to this pool (its token, a new account id)
    start_at: float = 0.0   # wall clock (time.time()) at which the warm-up begins, once the channels are
                            # ready; 0: at once (two load generators given one start their windows together)


@dataclass(frozen=True)
class SeedSpec:
    """Activations created and redeemed through the real RPCs before the runs: candidates are tried
    in order until `count` activations are granted (the server decides who is eligible)."""

    port: int
    advisor_token: str
    platform_token: str
    candidates: tuple[tuple[str, str], ...]  # (agency id, birth date ISO)
    count: int


@dataclass(frozen=True)
class FillSpec:
    """Unmeasured ActivateEntitlement calls, `concurrency` at a time, from pool `source` until pool
    `target` holds `count` RedeemActivationToken requests (or `source` is empty)."""

    port: int
    token: str
    source: str
    target: str
    count: int
    concurrency: int = 16


@dataclass(frozen=True)
class PagesSpec:
    """ListActivations `first` (serialized) followed page by page through next_page_token."""

    port: int
    token: str
    first: bytes
    pages: int


@dataclass
class RunResult:
    backend: str
    model: str
    method: str
    concurrency: int
    seconds: float          # measured seconds (all rounds)
    calls: int              # calls completed OK in the measured windows
    errors: dict[str, int] = field(default_factory=dict)  # status code name -> count (window)
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0    # all processes, all cores (/proc/stat), over the same windows
    round_rps: tuple[float, ...] = ()  # throughput of each round, to see how much a server varies
    rate: float = 0.0             # open-loop runs: the rate asked (calls/s)
    processes: int = 1            # server processes serving the port
    server_cpu_each: tuple[float, ...] = ()  # CPU seconds of each server process
    calls_made: int = 0           # every call completed in the run, warm-up included (OK or not)
    queries: dict[str, int] = field(default_factory=dict)  # server's SQL counters over the whole run
    note: str = ""                # e.g. a window ended early (its pool of requests ran dry)
    echo_rps: float = 0.0         # req/s of the echo server in the windows paired with this case's rounds
    round_ratios: tuple[float, ...] = ()  # each round's req/s over its paired echo window's
    server_switches: float = 0.0  # context switches of the server process(es) over the measured windows
    part: str = ""                # "" (main runs), "scaling" (1 vs 2 processes), "pinning" (pinned vs not)
    cpus: str = ""                # CPUs the server process(es) may run on, all threads ("0-1"; "0 and 1" for 2)
    postgres_cpu_s: float = 0.0   # every process named postgres (its backends and workers), same windows
    server_p99_ms: float = float("nan")  # open loop: p99 of the handlers' own latency (the servers' access log)
    p99_wo_worst_ms: float = float("nan")  # open loop: p99 without the calls due in the window's worst 0.1 s
    server_wait_s: float = 0.0    # seconds the server's threads were runnable but not running (schedstat), same windows
    client_wait_s: float = 0.0    # the same for the load generator's threads

    @property
    def other_cores(self) -> float:
        """Cores the rest of the machine used over the windows: all of it but the server, the
        load generator and, on PostgreSQL, the database's processes (which serve the server)."""
        ours = self.server_cpu_s + self.client_cpu_s + (self.postgres_cpu_s if self.backend == "postgres" else 0.0)
        return max(0.0, self.machine_cpu_s - ours) / self.seconds if self.seconds else 0.0

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_call(self) -> float:
        return self.server_cpu_s / self.calls * 1e6 if self.calls else 0.0
