"""`python -m bench.rpcs` (part of `make bench`): the five hot RPCs of the real server against the
echo floor, on SQLite and PostgreSQL, the targets of issue #8, and 1 vs 2 server processes.

For each backend, a fresh database (migrated, a synthetic registry imported) is served by the real
server (`entitlement.server_main.start`, in the backend's production server model: BENCH_SERVER_MODEL,
auto by default = the event loop on SQLite, the thread pool on PostgreSQL; the production
behaviours: access log, caller, and the rate limiter set far above the load) in its own process;
one grpc.aio load-generator process drives it, closed loop at each concurrency level, then open
loop at half the best throughput measured (the p99 target). The echo server of the same model
(sync-echo for threads, aio-echo-inline for the event loop; no behaviour) is measured in the same
run; throughput is printed as a ratio to it. On PostgreSQL, CheckEligibility,
ActivateEntitlement and the echo are then measured with 1 and 2 server processes on one port
(SO_REUSEPORT, as server.py runs them with ENTITLEMENT_PROCESSES=2).

Requests: CheckEligibility cycles over registry people; ActivateEntitlement takes each eligible
person once (a pool in the load generator; request ids unique; premium-job-seekers has no cap);
RedeemActivationToken takes each token once, with a new account id: the tokens are those the
measured ActivateEntitlement calls returned, topped up before each window by unmeasured
ActivateEntitlement calls (the real RPC); VerifyEntitlement cycles over accounts redeemed before the
runs; ListActivations (a funder) cycles over pages 1 to 10 of 100, newest first (page tokens
fetched before the window).

Settings (environment):
  BENCH_QUICK=1      a few seconds per case, small registry, one concurrency level (the test's mode)
  BENCH_SECONDS      measured seconds per case (4; quick 0.6); BENCH_WARMUP unmeasured seconds before (1; quick 0.2)
  BENCH_CONCURRENCY  closed-loop calls in flight (8,32; quick 8)
  BENCH_CHANNELS     grpc.aio channels (connections) of the load generator (16)
  BENCH_PEOPLE       synthetic registry size (200000; quick 8000), about half of them eligible
  BENCH_SCALING=0    skip the 1 vs 2 processes part (on by default when PostgreSQL is measured)
  BENCH_PINNING=0    skip the pinning part: per backend, CheckEligibility and ActivateEntitlement (and
                     the echo once) on a server left to the kernel vs one pinned to one CPU
                     (ENTITLEMENT_CPU_AFFINITY), in alternating rounds (on by default, with 2 CPUs or more)
  ENTITLEMENT_CPU_AFFINITY  every other server's (ours and echo alike; default auto: pinned only when
                     the processes are as many as the CPUs, so a single process is not)
  BENCH_WORKERS, BENCH_BACKENDS, BENCH_PG_URL, BENCH_LOG_LEVEL, BENCH_KEEP: as for `python -m bench`
                     (without BENCH_KEEP, the servers' logs are still kept when calls failed; the
                     path is printed)
  BENCH_OUTPUT       BENCHMARKS.md (its "rpcs" section is rewritten); "-" to only print
  BENCH_JSON         also write every result as JSON to this file (the test reads it)
  BENCH_SERVER_MODEL auto (default), threads or event-loop: as ENTITLEMENT_SERVER_MODEL, the real
                     server's model on every backend (and so its echo floor)
  BENCH_EVENT_LOOP   auto (default), uvloop or asyncio: as ENTITLEMENT_EVENT_LOOP, the loop of the
                     event-loop servers, ours and the aio echo floor alike
  BENCH_LOOP_WRITES  auto (default) or off: as ENTITLEMENT_LOOP_WRITES, our event-loop servers' writes
                     of a signup on the loop (SQLite)
  BENCH_RPCS         only these RPCs, e.g. ListActivations (all five by default); the echo floor is
                     still measured. A partial run only prints: it never rewrites BENCHMARKS.md. Without
                     ActivateEntitlement, ListActivations lists activations made before its runs by
                     unmeasured ActivateEntitlement calls.
  BENCH_OPEN_RATE    partial runs only: the open-loop cases at this many calls a second instead of
                     half each one's best (to compare two versions at one rate; the "half rate"
                     columns and the p99 verdicts are then at that rate, as the run's last line says)
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import collector_out_of_the_way, say
from bench.config import (ACTIVATE, ADVISOR_ID, CHECK, ECHO, FUNDER_CALLER_ID, FUNDER_ID, LIST, METHOD_PATHS,
                          PLATFORM_CALLER_ID, PLATFORM_ID, PROGRAM, REDEEM, SYNC, SYNC_ECHO, VERIFY, AIO_ECHO_INLINE,
                          FillSpec,
                          LoadSpec, PagesSpec, RunResult, SeedSpec, ServerSpec, _float, _int, _list, bench_event_loop, bench_loop_writes,
                          event_loop_text)
from bench.prepare import Common, imported_database, prepare_common
from bench.procs import (Client, Server, commit, free_port, loadavg, loopback_cc_text, machine, server_cpus, server_group,
                         usable_backends)
from bench.report import p99_without_worst, percentile
from bench.sections import replace_section
from entitlement import affinity
from entitlement.affinity import OFF
from entitlement.config import EVENT_LOOP, ROOT, SERVER_MODELS, THREADS, Settings, resolve_server_model

SECTION = "rpcs"
CONTROL = "control"  # the backend column of the control: a second echo server, paired like an RPC
RPCS = (CHECK, ACTIVATE, REDEEM, VERIFY, LIST)
# Issue #8's targets: throughput as a ratio to the echo server of the same run (per backend).
TARGET_RATIO = {CHECK: {"sqlite": 0.5, "postgres": 0.5}, VERIFY: {"sqlite": 0.6, "postgres": 0.6},
                ACTIVATE: {"sqlite": 0.25, "postgres": 0.15}}
TARGET_P99_MS = 10.0  # at half the best measured throughput, open loop
WORST_SPAN_S = 0.1  # the p99 "without the worst tenth of a second" (a diagnostic of the misses)
UNLIMITED_RATE = 10**9  # the rate limiter stays in the chain, far above any load here
LIST_PAGES = 10
SCALING_ROUNDS = 2  # 1 vs 2 processes, pinned vs not: each case in rounds of alternating order (A B, B A)
SCALING, PINNING = "scaling", "pinning"  # the comparison parts (RunResult.part)
# A closed-loop case of a real RPC and its echo windows: this many rounds of alternating order
# (echo RPC, RPC echo, ...), each window after ROUND_WARMUP s of unmeasured calls (the first RPC
# window after cfg.warmup). The machine's speed drifts by a third within a minute here.
PAIRED_ROUNDS, QUICK_PAIRED_ROUNDS = 4, 2
ROUND_WARMUP = 0.25
CALL_TIMEOUT = 300.0
# Each server model's echo floor, built the same way (bench/servers.py): the thread-pool server's is
# the sync echo; the event-loop server's answers on the loop, as its hot reads are answered.
FLOOR = {THREADS: SYNC_ECHO, EVENT_LOOP: AIO_ECHO_INLINE}


def backend_model(setting: str, backend: str) -> str:
    """The server model a backend is served with: BENCH_SERVER_MODEL, `auto` resolved as production
    resolves it."""
    return resolve_server_model(setting, backend == "sqlite")


def _cpu_affinity() -> affinity.Setting:
    """ENTITLEMENT_CPU_AFFINITY, checked here (a CPU this machine does not offer is refused before
    any server starts)."""
    setting = affinity.parse(os.environ.get(affinity.ENV, "").strip() or affinity.AUTO)
    affinity.choose(setting, 0, 1)
    return setting


@dataclass(frozen=True)
class RpcsConfig:
    quick: bool
    seconds: float
    warmup: float
    concurrency: tuple[int, ...]
    channels: int
    people: int
    seed_accounts: int
    workers: int
    backends: tuple[str, ...]
    scaling: bool
    pg_admin_url: str
    log_level: str
    output: Path | None
    json_path: Path | None
    keep: bool
    rpcs: tuple[str, ...] = RPCS
    cpu_affinity: affinity.Setting = affinity.AUTO  # every server's, as ENTITLEMENT_CPU_AFFINITY (but the pinning part's)
    pinning: bool = True    # the pinning part (BENCH_PINNING=0: skipped)
    server_model: str = "auto"  # BENCH_SERVER_MODEL: as ENTITLEMENT_SERVER_MODEL, for every backend
    open_rate: float = 0.0  # BENCH_OPEN_RATE: the open-loop rate instead of half the best (partial runs)

    @property
    def paired_rounds(self) -> int:
        """Rounds of a closed-loop case of a real RPC (each paired with an echo window)."""
        return QUICK_PAIRED_ROUNDS if self.quick else PAIRED_ROUNDS

    @classmethod
    def from_env(cls) -> "RpcsConfig":
        quick = os.environ.get("BENCH_QUICK", "") == "1"
        conc = tuple(int(c) for c in _list("BENCH_CONCURRENCY", "8" if quick else "8,32"))
        if not conc or min(conc) < 1:
            raise SystemExit("BENCH_CONCURRENCY must list positive integers, e.g. 8,32")
        backends = tuple(_list("BENCH_BACKENDS", "sqlite,postgres"))
        unknown = set(backends) - {"sqlite", "postgres"}
        if unknown:
            raise SystemExit(f"BENCH_BACKENDS: unknown backend(s) {', '.join(sorted(unknown))}")
        seconds = _float("BENCH_SECONDS", 0.6 if quick else 4.0)
        if seconds <= 0:
            raise SystemExit("BENCH_SECONDS must be positive")
        out = os.environ.get("BENCH_OUTPUT", "").strip()
        js = os.environ.get("BENCH_JSON", "").strip()
        rpcs = tuple(_list("BENCH_RPCS", ",".join(RPCS)))
        if not rpcs or set(rpcs) - set(RPCS):
            raise SystemExit(f"BENCH_RPCS: unknown RPC(s) {', '.join(sorted(set(rpcs) - set(RPCS)))}; "
                             f"choose among {', '.join(RPCS)}")
        partial = set(rpcs) != set(RPCS)
        open_rate = _float("BENCH_OPEN_RATE", 0.0)
        if open_rate < 0 or (open_rate and not partial):
            raise SystemExit("BENCH_OPEN_RATE must be a positive rate in calls a second, and goes with BENCH_RPCS "
                             "(a partial run, which only prints): the p99 target is judged at half the best rate")
        return cls(
            quick=quick, seconds=seconds, warmup=_float("BENCH_WARMUP", 0.2 if quick else 1.0), concurrency=conc,
            channels=max(_int("BENCH_CHANNELS", 16), 1),
            people=max(_int("BENCH_PEOPLE", 8000 if quick else 200_000), 1000),
            seed_accounts=20 if quick else 200,
            workers=max(_int("BENCH_WORKERS", Settings().max_workers), 1),
            backends=backends, scaling=os.environ.get("BENCH_SCALING", "1") != "0",
            pg_admin_url=os.environ.get("BENCH_PG_URL", "").strip() or "postgresql://postgres@127.0.0.1:5432/test",
            log_level=os.environ.get("BENCH_LOG_LEVEL", "").strip() or "info",
            output=None if out == "-" or partial else Path(out) if out else ROOT / "BENCHMARKS.md",
            json_path=Path(js) if js else None, keep=os.environ.get("BENCH_KEEP", "") == "1",
            rpcs=tuple(r for r in RPCS if r in rpcs),
            cpu_affinity=_cpu_affinity(),
            pinning=os.environ.get("BENCH_PINNING", "1") != "0",
            server_model=_server_model(), open_rate=open_rate)


def _server_model() -> str:
    value = os.environ.get("BENCH_SERVER_MODEL", "").strip().lower() or "auto"
    if value not in SERVER_MODELS:
        raise SystemExit(f"BENCH_SERVER_MODEL must be one of {', '.join(SERVER_MODELS)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------- requests

def _date(d: dt.date) -> Any:
    from google.type import date_pb2
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def check_requests(people: list[tuple[str, dt.date]], n: int = 2000) -> tuple[bytes, ...]:
    from entitlement.v1 import common_pb2, eligibility_pb2
    step = max(1, len(people) // n)
    return tuple(eligibility_pb2.CheckEligibilityRequest(
        program=f"programs/{PROGRAM}", job_seeker=common_pb2.JobSeekerIdentity(agency_id=a, birth_date=_date(b))
    ).SerializeToString() for a, b in people[::step][:n])


def activate_requests(people: list[tuple[str, dt.date]], prefix: str) -> tuple[bytes, ...]:
    from entitlement.v1 import activation_pb2, common_pb2
    return tuple(activation_pb2.ActivateEntitlementRequest(
        request_id=f"{prefix}-{i}", program=f"programs/{PROGRAM}", platform=f"platforms/{PLATFORM_ID}",
        reason="benchmark", job_seeker=common_pb2.JobSeekerIdentity(agency_id=a, birth_date=_date(b))
    ).SerializeToString() for i, (a, b) in enumerate(people))


def verify_requests(accounts: list[str]) -> tuple[bytes, ...]:
    from entitlement.v1 import activation_pb2
    return tuple(activation_pb2.VerifyEntitlementRequest(account_id=a).SerializeToString() for a in accounts)


def list_first_page() -> bytes:
    from entitlement.v1 import audit_pb2
    return audit_pb2.ListActivationsRequest(page_size=100, funder=FUNDER_ID).SerializeToString()


# ------------------------------------------------------------------------------------------ runs

class Runner:
    """Runs cases through the load generator and keeps their results."""

    def __init__(self, cfg: RpcsConfig, client: Client) -> None:
        self.cfg, self.client = cfg, client
        self.results: list[RunResult] = []
        self.echo: tuple[list[Server], tuple[bytes, ...]] | None = None  # (group, requests) for paired windows
        self._log_read: dict[Path, int] = {}  # how far each server log was read (_handler_latencies)

    def _round(self, group: list[Server], method: str, seconds: float, concurrency: int = 0, rate: float = 0.0,
               warmup: float | None = None, **kw: Any) -> dict[str, Any]:
        cfg, head = self.cfg, group[0]
        collector_out_of_the_way()
        kw.setdefault("requests", ())
        before = head.counts() if head.spec.count_queries else {}
        m: dict[str, Any] = self.client.ask("run", LoadSpec(
            port=head.port, server_pid=head.pid, server_pids=tuple(s.pid for s in group), method=method,
            concurrency=concurrency or max(cfg.concurrency), warmup=cfg.warmup if warmup is None else warmup,
            seconds=seconds,
            channels=cfg.channels, rate=rate, **kw), timeout=CALL_TIMEOUT)
        after = head.counts() if head.spec.count_queries else {}
        m["queries"] = {k: after[k] - before.get(k, 0) for k in after}
        return m

    def _handler_latencies(self, group: list[Server], method: str, parts: list[dict[str, Any]],
                           parse: bool = True) -> list[float]:
        """The `latency_ms` of the access-log lines of `method` the group's servers wrote within the
        parts' windows (a line is written as its call ends): the time inside our handlers, without
        gRPC's queueing before them, the transport or the load generator. Each log is read from
        where the previous reading stopped (`parse` False: only skipped to its end)."""
        path = METHOD_PATHS[method]
        spans = [(m["wall_start"], m["wall_end"]) for m in parts]
        out: list[float] = []
        for server in group:
            log = server.spec.log_path
            if not log.exists():
                continue
            with log.open("rb") as fh:
                fh.seek(self._log_read.get(log, 0))
                if not parse:
                    self._log_read[log] = fh.seek(0, os.SEEK_END)
                    continue
                data = fh.read()
            end = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self._log_read[log] = self._log_read.get(log, 0) + end
            for line in data[:end].splitlines():
                if b'"event": "rpc"' not in line or path.encode() not in line:
                    continue
                try:
                    entry = json.loads(line)
                    at = dt.datetime.fromisoformat(entry["timestamp"].rstrip("Z")).replace(
                        tzinfo=dt.timezone.utc).timestamp()
                except (ValueError, KeyError):
                    continue
                if entry.get("method") == path and any(a <= at <= b for a, b in spans):
                    out.append(float(entry["latency_ms"]))
        return out

    def _record(self, backend: str, group: list[Server], method: str, concurrency: int, rate: float,
                parts: list[dict[str, Any]]) -> RunResult:
        """One result from the rounds of a case (calls, CPU and latencies merged)."""
        latencies = sorted(x for m in parts for x in array("d", m["latencies"]))
        errors: dict[str, int] = {}
        queries: dict[str, int] = {}
        for m in parts:
            for code, n in m["errors"].items():
                errors[code] = errors.get(code, 0) + n
            for k, n in m["queries"].items():
                queries[k] = queries.get(k, 0) + n
        each = [sum(m["server_cpu_each"][i] for m in parts) for i in range(len(group))]
        spec = group[0].spec
        r = RunResult(backend=backend, model=spec.server_model if spec.kind == SYNC else spec.kind, method=method,
                      concurrency=0 if rate else concurrency or max(self.cfg.concurrency),
                      seconds=sum(m["seconds"] for m in parts), calls=sum(m["calls"] for m in parts), errors=errors,
                      p50_ms=percentile(latencies, 50) * 1e3, p95_ms=percentile(latencies, 95) * 1e3,
                      p99_ms=percentile(latencies, 99) * 1e3, server_cpu_s=sum(each),
                      server_switches=sum(m.get("server_switches", 0.0) for m in parts),
                      server_wait_s=sum(m.get("server_wait_s", 0.0) for m in parts),
                      client_wait_s=sum(m.get("client_wait_s", 0.0) for m in parts),
                      client_cpu_s=sum(m["client_cpu_s"] for m in parts),
                      machine_cpu_s=sum(m["machine_cpu_s"] for m in parts),
                      postgres_cpu_s=sum(m["postgres_cpu_s"] for m in parts),
                      round_rps=tuple(m["calls"] / m["seconds"] for m in parts), rate=rate, processes=len(group),
                      server_cpu_each=tuple(each), calls_made=sum(m["made"] for m in parts), queries=queries)
        r.cpus = " and ".join(server_cpus(s.pid) for s in group)  # (no "|": it ends up in tables)
        if rate:
            calls = [(due, latency * 1e3) for m in parts
                     for due, latency in zip(array("d", m["dues"]), array("d", m["latencies"]))]
            r.p99_wo_worst_ms = p99_without_worst(calls, TARGET_P99_MS, WORST_SPAN_S)
        if method != ECHO:  # (echo servers log no call)
            handler = sorted(self._handler_latencies(group, method, parts, parse=bool(rate)))
            if handler:
                r.server_p99_ms = percentile(handler, 99)
        if any(m["dry"] for m in parts):
            r.note = f"early: {r.seconds:.2f} s"
            say(f"  (pool ran dry: window {r.seconds:.2f} s instead of {self.cfg.seconds:g} s)")
        load = f"{rate:,.0f}/s" if rate else f"c={r.concurrency}"
        per = _per_call(r)
        sql = f"  SQL/call {per['statements']:.1f}" if per else ""
        errs = f"  errors {r.errors}" if r.errors else ""
        say(f"  {backend:<8} {r.processes}p {method:<22} {load:<9} {r.rps:>8,.0f} req/s  p50 {r.p50_ms:6.2f}  "
            f"p99 {r.p99_ms:6.2f} ms  srv {r.server_cpu_s / r.seconds:4.2f} cores  "
            f"cli {r.client_cpu_s / r.seconds:4.2f}  other {r.other_cores:4.2f}{sql}{errs}")
        self.results.append(r)
        return r

    def run(self, backend: str, group: list[Server], method: str, concurrency: int = 0, rate: float = 0.0,
            paired: bool | None = None, **kw: Any) -> RunResult:
        """One case: cfg.seconds measured. A closed-loop case of a real RPC (or, `paired`, of the
        control's second echo server) is measured in rounds alternating with windows of the echo
        server at the same concurrency (half as long), so that its x echo ratio compares windows
        seconds apart: calls over seconds of its rounds, against the same of the echo's (the rounds'
        own ratios give the spread; a round that found its pool empty is left out of them)."""
        if paired is None:
            paired = method != ECHO
        if not paired or rate or self.echo is None:
            return self._record(backend, group, method, concurrency, rate,
                                [self._round(group, method, self.cfg.seconds, concurrency, rate, **kw)])
        echo_group, echo_requests = self.echo
        rounds = self.cfg.paired_rounds
        parts: list[dict[str, Any]] = []
        echoes: list[dict[str, Any]] = []
        for k in range(rounds):
            def echo() -> None:
                m = self._round(echo_group, ECHO, self.cfg.seconds / 2 / rounds, concurrency,
                                warmup=ROUND_WARMUP, requests=echo_requests)
                if m["errors"]:
                    raise SystemExit(f"bench.rpcs: the echo server answered errors {m['errors']}")
                echoes.append(m)

            def real() -> None:
                parts.append(self._round(group, method, self.cfg.seconds / rounds, concurrency,
                                         warmup=None if k == 0 else ROUND_WARMUP, **kw))
            for step in ((echo, real) if k % 2 == 0 else (real, echo)):
                step()
        r = self._record(backend, group, method, concurrency, rate, parts)
        r.echo_rps = sum(m["calls"] for m in echoes) / sum(m["seconds"] for m in echoes)
        r.round_ratios = tuple(p["calls"] / p["seconds"] / (e["calls"] / e["seconds"])
                               for p, e in zip(parts, echoes) if e["calls"] and not (p["dry"] and not p["calls"]))
        return r

    def compare(self, backend: str, groups: list[list[Server]], method: str, concurrency: int, part: str,
                **kw: Any) -> list[RunResult]:
        """One case on each group of servers, in SCALING_ROUNDS rounds whose order alternates
        (A B, B A, ...) so that drift in the machine's other load falls on both alike; the results
        are tagged with `part` (the report's section)."""
        parts: list[list[dict[str, Any]]] = [[] for _ in groups]
        for k in range(SCALING_ROUNDS):
            order = list(range(len(groups)))
            for i in (order if k % 2 == 0 else order[::-1]):
                parts[i].append(self._round(groups[i], method, self.cfg.seconds / SCALING_ROUNDS, concurrency, **kw))
        out = [self._record(backend, g, method, concurrency, 0.0, p) for g, p in zip(groups, parts)]
        for r in out:
            r.part = part
        return out

    def closed_then_half(self, backend: str, group: list[Server], method: str, **kw: Any) -> None:
        """Each concurrency level, then open loop at half the best throughput measured (or at
        BENCH_OPEN_RATE)."""
        best = max(self.run(backend, group, method, concurrency=c, **kw).rps for c in self.cfg.concurrency)
        if best > 0:
            self.run(backend, group, method, rate=self.cfg.open_rate or best / 2, **kw)


def _per_call(r: RunResult) -> dict[str, float]:
    if not r.queries or not r.calls_made:
        return {}
    return {k: v / r.calls_made for k, v in r.queries.items()}


def redeem_tokens_needed(cfg: RpcsConfig, rate: float, rounds: int = 1) -> int:
    """Tokens one RedeemActivationToken run at `rate` calls/s may use (warm-ups included: a closed-loop
    case's later rounds have their own), with margin."""
    return int(rate * (cfg.warmup + cfg.seconds + (rounds - 1) * ROUND_WARMUP) * 1.3) + 50


def analyze_as_autovacuum_would(backend: str, url: str) -> None:
    """PostgreSQL: ANALYZE before the funders' pages are measured. The runs before them made
    thousands of activations and ledger entries in a few minutes on a fresh database, faster than
    autovacuum's analyze comes round (its naptime is a minute, its threshold 10 % of a table's rows);
    with the statistics of nearly empty tables the planner sorted every activation of the funder's
    programs for each page (a page in 8 ms at 3,000 activations, growing with them) instead of
    walking the newest-first index and probing each row's ledger entry (0.6 ms): 48 pages a second
    against 280 once analyzed (docs/PERFORMANCE-LOG.md, twenty-fifth session). A deployment has its
    statistics kept by autovacuum; this measures that state. (SQLite has no statistics to age.)"""
    if backend != "postgres":
        return
    import psycopg
    from sqlalchemy.engine import make_url
    libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute("ANALYZE")


def measure_backend(runner: Runner, cfg: RpcsConfig, common: Common, backend: str, url: str,
                    seed_people: list[tuple[str, dt.date]], pool_people: list[tuple[str, dt.date]]) -> None:
    client = runner.client
    adv, plat, fund = (common.tokens[k] for k in (ADVISOR_ID, PLATFORM_CALLER_ID, FUNDER_CALLER_ID))
    model = backend_model(cfg.server_model, backend)
    spec = server_spec(cfg, common, backend, url, SYNC, count_queries=True, server_model=model)
    activate_pool, redeem_pool = f"{backend}:activate", f"{backend}:redeem"
    with server_group(spec) as group:
        srv = group[0]
        t = time.monotonic()
        seeded = client.ask("seed", SeedSpec(port=srv.port, advisor_token=adv, platform_token=plat,
                                             candidates=tuple((a, b.isoformat()) for a, b in seed_people),
                                             count=cfg.seed_accounts), timeout=CALL_TIMEOUT)
        accounts = [acc for acc, _, _ in seeded]
        size = client.ask("pool", (activate_pool, activate_requests(pool_people, f"bench-{backend}")))
        say(f"bench.rpcs: {backend}: {len(accounts)} accounts redeemed for VerifyEntitlement; {size:,} eligible "
            f"people in the ActivateEntitlement pool ({time.monotonic() - t:.1f} s)")

        if CHECK in cfg.rpcs:
            runner.closed_then_half(backend, group, CHECK, requests=check_requests(common.people), token=adv)
        if VERIFY in cfg.rpcs:
            runner.closed_then_half(backend, group, VERIFY, requests=verify_requests(accounts), token=plat)
        if ACTIVATE in cfg.rpcs:
            runner.closed_then_half(backend, group, ACTIVATE, token=adv, pool=activate_pool, keep_tokens=redeem_pool)
        if REDEEM in cfg.rpcs:
            measure_redeem(runner, cfg, backend, group, adv, plat, activate_pool, redeem_pool)
        if LIST in cfg.rpcs:
            if ACTIVATE not in cfg.rpcs:
                # Something to list: the pages the runs read, made by the real RPC (unmeasured).
                fill(client, FillSpec(port=srv.port, token=adv, source=activate_pool, target=f"{backend}:listed",
                                      count=LIST_PAGES * 100, concurrency=4))
            analyze_as_autovacuum_would(backend, url)
            pages = client.ask("pages", PagesSpec(port=srv.port, token=fund, first=list_first_page(),
                                                  pages=LIST_PAGES))
            runner.closed_then_half(backend, group, LIST, requests=pages, token=fund)

    if backend == "postgres" and cfg.scaling and {CHECK, ACTIVATE} <= set(cfg.rpcs):
        say("bench.rpcs: postgres: 1 vs 2 server processes on one port, alternating rounds")
        conc = max(cfg.concurrency)
        with server_group(server_spec(cfg, common, backend, url, SYNC, "scaling", port=free_port(),
                                      server_model=model)) as one, \
                server_group(server_spec(cfg, common, backend, url, SYNC, "scaling", port=free_port(), processes=2,
                                         server_model=model)) as two:
            runner.compare(backend, [one, two], CHECK, conc, SCALING, requests=check_requests(common.people), token=adv)
            runner.compare(backend, [one, two], ACTIVATE, conc, SCALING, token=adv, pool=activate_pool)
        with server_group(server_spec(cfg, common, "echo", "", SYNC_ECHO, "scaling", port=free_port())) as one, \
                server_group(server_spec(cfg, common, "echo", "", SYNC_ECHO, "scaling", port=free_port(), processes=2)) as two:
            runner.compare("-", [one, two], ECHO, conc, SCALING, requests=check_requests(common.people, 1))

    cpu = pin_cpu(cfg)
    if cpu is not None and {CHECK, ACTIVATE} <= set(cfg.rpcs):
        say(f"bench.rpcs: {backend}: 1 process left to the kernel vs pinned to CPU {cpu}, alternating rounds")
        conc = min(cfg.concurrency)
        with free_and_pinned(cfg, common, backend, url, SYNC, cpu, server_model=model) as pair:
            runner.compare(backend, pair, CHECK, conc, PINNING, requests=check_requests(common.people), token=adv)
            runner.compare(backend, pair, ACTIVATE, conc, PINNING, token=adv, pool=activate_pool)


def _models_text(cfg: RpcsConfig, backends: tuple[str, ...]) -> str:
    return ", ".join(f"{b} {backend_model(cfg.server_model, b)}" for b in backends)


def autogroup_text() -> str:
    """Linux's autogroup scheduling on this machine, for the scaling part's method: with it on, the
    PostgreSQL server (started in a session of its own) and the servers measured here are scheduled
    as two groups, and a backend woken on a CPU where its group has little weight may wait seconds
    to run (README, "Database outage")."""
    try:
        value = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        return "Linux's autogroup scheduling: not on this kernel."
    if value == "0":
        return "Linux's autogroup scheduling was off (`kernel.sched_autogroup_enabled` = 0)."
    return ("Linux's autogroup scheduling was on (`kernel.sched_autogroup_enabled` = 1): PostgreSQL, "
            "started in a session of its own, and these servers run as two scheduling groups; "
            "saturated, a few calls may wait 0.2-3 s for a backend that the kernel does not run "
            "(README, \"Database outage\"; none with it off).")


def _affinity_text(setting: affinity.Setting) -> str:
    text = setting if isinstance(setting, str) else ",".join(map(str, setting))
    return text + (" (pinned only when the processes are as many as the CPUs)" if setting == affinity.AUTO else "")


def pin_cpu(cfg: RpcsConfig) -> int | None:
    """The CPU of the pinning part (the first this process may run on), or None: the part is
    skipped (BENCH_PINNING=0, or a single CPU)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return allowed[0] if cfg.pinning and len(allowed) > 1 else None


def measure_echo_pinning(runner: Runner, cfg: RpcsConfig, common: Common, floor: str) -> None:
    cpu = pin_cpu(cfg)
    if cpu is None or not {CHECK, ACTIVATE} <= set(cfg.rpcs):  # (as the backends' pinning part)
        return
    say(f"bench.rpcs: echo ({floor}): 1 process left to the kernel vs pinned to CPU {cpu}, alternating rounds")
    with free_and_pinned(cfg, common, "echo", "", floor, cpu) as pair:
        runner.compare("-", pair, ECHO, min(cfg.concurrency), PINNING, requests=check_requests(common.people, 1))


@contextmanager
def free_and_pinned(cfg: RpcsConfig, common: Common, backend: str, url: str, kind: str,
                    cpu: int, **kw: Any) -> Iterator[list[list[Server]]]:
    """Two 1-process servers alike but for their affinity: left to the kernel, and pinned to `cpu`."""
    with server_group(server_spec(cfg, common, backend, url, kind, "off", port=free_port(), cpu_affinity=OFF,
                                  **kw)) as free, \
            server_group(server_spec(cfg, common, backend, url, kind, f"cpu{cpu}", port=free_port(),
                                     cpu_affinity=(cpu,), **kw)) as pinned:
        yield [free, pinned]


def measure_redeem(runner: Runner, cfg: RpcsConfig, backend: str, group: list[Server], adv: str, plat: str,
                   activate_pool: str, redeem_pool: str) -> None:
    client, srv = runner.client, group[0]
    # Tokens for the first run are sized on 3 x the activations' best throughput (a redemption
    # writes less: it reached 2.5 x on SQLite), for the later ones on what redemption itself
    # reached; a window whose tokens run out ends early, and the table says so.
    guess = 3 * max((r.rps for r in runner.results if r.backend == backend and r.method == ACTIVATE), default=100.0)
    best = 0.0
    for c in cfg.concurrency:
        fill(client, FillSpec(port=srv.port, token=adv, source=activate_pool, target=redeem_pool,
                              count=redeem_tokens_needed(cfg, best * 1.2 or guess, cfg.paired_rounds)))
        best = max(best, runner.run(backend, group, REDEEM, token=plat, concurrency=c, pool=redeem_pool).rps)
    if best > 0:
        fill(client, FillSpec(port=srv.port, token=adv, source=activate_pool, target=redeem_pool,
                              count=redeem_tokens_needed(cfg, best / 2)))
        runner.run(backend, group, REDEEM, token=plat, rate=best / 2, pool=redeem_pool)


def fill(client: Client, spec: FillSpec) -> None:
    t = time.monotonic()
    have = client.ask("fill", spec, timeout=CALL_TIMEOUT)
    if have < spec.count:
        raise SystemExit(f"bench.rpcs: the ActivateEntitlement pool ran out ({have} of {spec.count} tokens): "
                         "raise BENCH_PEOPLE")
    if time.monotonic() - t > 1:
        say(f"  ({have:,} activation tokens ready for RedeemActivationToken, {time.monotonic() - t:.1f} s)")


def server_spec(cfg: RpcsConfig, common: Common, backend: str, url: str, kind: str, tag: str = "",
                **kw: Any) -> ServerSpec:
    """`tag`: told apart in the log's name (servers of one kind and backend side by side)."""
    n = kw.get("processes", 1)
    kw.setdefault("cpu_affinity", cfg.cpu_affinity)
    name = f"{backend}-{kind if kind != SYNC else kw.get('server_model', THREADS)}-{n}p" + (f"-{tag}" if tag else "")
    return ServerSpec(kind=kind, workers=cfg.workers, log_path=common.tmp / "logs" / f"{name}.log",
                      log_level=cfg.log_level, database_url=url, callers_file=common.callers_file,
                      key_dir=common.key_dir, pseudonym_key_file=common.pseudonym_key_file,
                      check_rate_per_min=UNLIMITED_RATE, check_burst=UNLIMITED_RATE, **kw)


# ---------------------------------------------------------------------------------------- report

def _echo_best(results: list[RunResult], model: str, processes: int = 1) -> RunResult | None:
    echo = [r for r in results if r.method == ECHO and r.backend == "-" and r.model == model and not r.rate
            and r.processes == processes]
    return max(echo, key=lambda r: r.rps) if echo else None


def _main_rows(results: list[RunResult]) -> list[RunResult]:
    """Every run but those of the scaling and pinning parts."""
    return [r for r in results if not r.part]


def _part_runs(results: list[RunResult], part: str = SCALING) -> list[RunResult]:
    """The runs of a comparison part, in pairs (A, B) as Runner.compare made them."""
    return [r for r in results if r.part == part]


HEAD = ("backend", "model", "rpc", "load", "req/s", "echo req/s", "x echo", "p50 ms", "p95 ms", "p99 ms", "srv cores",
        "srv CPU us/call", "switches/call", "cli cores", "srv / cli queued", "other cores", "SQL/call", "txn/call",
        "errors")


def _cells(results: list[RunResult], r: RunResult) -> tuple[str, ...]:
    ratio = f"{r.rps / r.echo_rps:.2f}" if r.echo_rps else "-"
    echo = f"{r.echo_rps:,.0f}" if r.echo_rps else "-"
    load = (f"open {r.rate:,.0f}/s" if r.rate else f"c={r.concurrency}") + (f" ({r.note})" if r.note else "")
    per = _per_call(r)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
    return (r.backend, r.model, r.method, load, f"{r.rps:,.0f}", echo, ratio, f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}",
            f"{r.p99_ms:.2f}", f"{r.server_cpu_s / r.seconds:.2f}", f"{r.cpu_us_per_call:,.0f}",
            f"{r.server_switches / r.calls:.1f}" if r.calls else "-", f"{r.client_cpu_s / r.seconds:.2f}",
            _queued(r), f"{r.other_cores:.2f}", f"{per['statements']:.1f}" if per else "-", f"{per['transactions']:.1f}" if per else "-", errors)


def _queued(r: RunResult) -> str:
    """Seconds a second the server's / the load generator's threads waited for a CPU (runnable)."""
    return f"{r.server_wait_s / r.seconds:.2f} / {r.client_wait_s / r.seconds:.2f}" if r.seconds else "-"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]], numeric_from: int, md: bool) -> str:
    if md:
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(head))) + "|"]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in rows])
    allrows = [head, *rows]
    widths = [max(len(row[i]) for row in allrows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(allrows):
        lines.append("  ".join(c.rjust(widths[i]) if i >= numeric_from else c.ljust(widths[i])
                               for i, c in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(results: list[RunResult], md: bool) -> str:
    return _table(HEAD, [_cells(results, r) for r in _main_rows(results)], 4, md)


def targets(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per backend and RPC: best closed-loop throughput over the echo's best, and p99 at half."""
    main = _main_rows(results)
    out = []
    cases = [("-", floor) for floor in dict.fromkeys(r.model for r in main if r.method == ECHO and r.backend == "-")]
    cases += [(b, m) for b, m in dict.fromkeys((r.backend, r.model) for r in main
                                               if r.method != ECHO and r.backend != CONTROL)]
    for backend, model in cases:
        echo = _echo_best(main, FLOOR.get(model, model))
        for method in (ECHO,) if backend == "-" else RPCS:
            closed = [r for r in main if r.backend == backend and r.model == model and r.method == method and not r.rate]
            half = [r for r in main if r.backend == backend and r.model == model and r.method == method and r.rate]
            if not closed:
                continue
            best = max(closed, key=lambda r: r.rps / r.echo_rps if r.echo_rps else r.rps)
            ref = best.echo_rps or (echo.rps if echo else 0.0)
            ratio = best.rps / ref if ref else float("nan")
            want = TARGET_RATIO.get(method, {}).get(backend)
            p99 = half[-1].p99_ms if half else float("nan")
            out.append({"backend": backend, "model": model, "rpc": method, "best_rps": best.rps, "at": best.concurrency,
                        "echo_rps": ref, "ratio": ratio, "ratio_target": want,
                        "round_ratios": list(best.round_ratios),
                        "ratio_met": None if want is None else ratio >= want, "half_rate": half[-1].rate if half else 0,
                        "p99_half_ms": p99, "p99_met": p99 < TARGET_P99_MS if half else None,
                        "p99_half_achieved": half[-1].rps if half else 0.0,
                        "other_cores_half": half[-1].other_cores if half else float("nan"),
                        "queued_half": _queued(half[-1]) if half else "-",
                        "server_p99_half_ms": half[-1].server_p99_ms if half else float("nan"),
                        "p99_wo_worst_half_ms": half[-1].p99_wo_worst_ms if half else float("nan")})
    return out


def targets_table(rows: list[dict[str, Any]], md: bool) -> str:
    def met(v: bool | None) -> str:
        return "-" if v is None else "met" if v else "NOT met"
    head = ("backend", "model", "rpc", "req/s (best x echo)", "x echo", "rounds", "target", "met", "half rate /s",
            "p99 ms there", "p99 < 10 ms", "without its worst 0.1 s", "handlers' p99 ms there", "srv / cli queued there",
            "other cores there")
    body = [(t["backend"], t["model"], t["rpc"], f"{t['best_rps']:,.0f} (c={t['at']})", f"{t['ratio']:.2f}",
             f"{min(t['round_ratios']):.2f}-{max(t['round_ratios']):.2f}" if t["round_ratios"] else "-",
             f">= {t['ratio_target']:g}" if t["ratio_target"] is not None else "-", met(t["ratio_met"]),
             f"{t['half_rate']:,.0f}", f"{t['p99_half_ms']:.2f}", met(t["p99_met"]),
             "-" if math.isnan(t["p99_wo_worst_half_ms"]) else f"{t['p99_wo_worst_half_ms']:.2f}",
             "-" if math.isnan(t["server_p99_half_ms"]) else f"{t['server_p99_half_ms']:.2f}",
             t["queued_half"], f"{t['other_cores_half']:.2f}") for t in rows]
    return _table(head, body, 3, md)


def control_text(results: list[RunResult]) -> str:
    """What the pairing gives for an RPC exactly as fast as echo (ideally 1.00)."""
    runs = [r for r in results if r.backend == CONTROL and r.echo_rps]
    if not runs:
        return ""
    parts = [f"{r.model} c={r.concurrency}: {r.rps / r.echo_rps:.2f} (rounds {min(r.round_ratios):.2f}-"
             f"{max(r.round_ratios):.2f})" for r in runs if r.round_ratios]
    return ("Control (rows `control`): a second echo server of each floor, measured as each RPC is, in rounds alternating with "
            "the echo server's windows; x echo " + "; ".join(parts) + ". An RPC exactly as fast as echo would "
            "read this, not 1.00: how far it is from 1.00 is the pairing's own error in this run.")


def targets_summary(rows: list[dict[str, Any]]) -> str:
    judged = [t for t in rows if t["ratio_met"] is not None]
    met = [f"{t['rpc']} on {t['backend']}" for t in judged if t["ratio_met"]]
    p99 = [t for t in rows if t["p99_met"] is not None and t["rpc"] != ECHO]
    p99_met = [f"{t['rpc']} on {t['backend']}" for t in p99 if t["p99_met"]]
    return (f"Throughput targets met: {len(met)} of {len(judged)}" + (f" ({', '.join(met)})" if met else "")
            + f". p99 under {TARGET_P99_MS:g} ms at half the best throughput: {len(p99_met)} of {len(p99)}"
            + (f" ({', '.join(p99_met)})" if p99_met else "") + ".")


def scaling_summary(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    parts = [f"{s['rpc']} {s['factor']:.2f}x (server processes {s['srv_1']:.2f} -> {s['srv_2']:.2f} cores, "
             f"client {s['cli_1']:.2f} -> {s['cli_2']:.2f})" for s in rows]
    return ("From 1 to 2 processes, throughput: " + "; ".join(parts) + ". With the client and PostgreSQL on the same "
            "2 cores, a factor near 2 is out of reach here; the server cores show how much of the second core the "
            "second process got.")


def _sum_errors(*runs: RunResult) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs:
        for code, n in r.errors.items():
            out[code] = out.get(code, 0) + n
    return out


def scaling(results: list[RunResult]) -> list[dict[str, Any]]:
    runs = _part_runs(results)
    out = []
    for one, two in zip(runs[::2], runs[1::2]):
        out.append({"backend": one.backend, "rpc": one.method, "concurrency": two.concurrency,
                    "rps_1": one.rps, "rps_2": two.rps, "factor": two.rps / one.rps if one.rps else float("nan"),
                    "srv_1": one.server_cpu_s / one.seconds, "srv_2": two.server_cpu_s / two.seconds,
                    "srv_each_2": [c / two.seconds for c in two.server_cpu_each],
                    "cli_1": one.client_cpu_s / one.seconds, "cli_2": two.client_cpu_s / two.seconds,
                    "machine_1": one.machine_cpu_s / one.seconds, "machine_2": two.machine_cpu_s / two.seconds,
                    "p99_1": one.p99_ms, "p99_2": two.p99_ms, "cpus_1": one.cpus, "cpus_2": two.cpus,
                    "errors": _sum_errors(one, two)})
    return out


def scaling_table(rows: list[dict[str, Any]], md: bool) -> str:
    head = ("backend", "rpc", "conc", "1 proc req/s", "2 procs req/s", "x", "server cores 1 / 2 (each)",
            "client cores 1 / 2", "machine busy 1 / 2", "p99 ms 1 / 2", "CPUs 1 / 2 (each)")
    body = [(s["backend"], s["rpc"], str(s["concurrency"]), f"{s['rps_1']:,.0f}", f"{s['rps_2']:,.0f}",
             f"{s['factor']:.2f}",
             f"{s['srv_1']:.2f} / {s['srv_2']:.2f} ({' + '.join(f'{c:.2f}' for c in s['srv_each_2'])})",
             f"{s['cli_1']:.2f} / {s['cli_2']:.2f}", f"{s['machine_1']:.2f} / {s['machine_2']:.2f}",
             f"{s['p99_1']:.1f} / {s['p99_2']:.1f}", f"{s['cpus_1']} / {s['cpus_2']}") for s in rows]
    return _table(head, body, 2, md)


def pinning(results: list[RunResult]) -> list[dict[str, Any]]:
    runs = _part_runs(results, PINNING)
    return [{"backend": free.backend, "model": free.model, "rpc": free.method, "concurrency": free.concurrency,
             "rps_free": free.rps, "rps_pinned": pinned.rps,
             "factor": pinned.rps / free.rps if free.rps else float("nan"),
             "cpu_free": free.cpu_us_per_call, "cpu_pinned": pinned.cpu_us_per_call,
             "switches_free": free.server_switches / free.calls if free.calls else float("nan"),
             "switches_pinned": pinned.server_switches / pinned.calls if pinned.calls else float("nan"),
             "p99_free": free.p99_ms, "p99_pinned": pinned.p99_ms, "cpus_free": free.cpus, "cpus_pinned": pinned.cpus,
             "errors": _sum_errors(free, pinned)}
            for free, pinned in zip(runs[::2], runs[1::2])]


def pinning_table(rows: list[dict[str, Any]], md: bool) -> str:
    head = ("backend", "model", "rpc", "conc", "free req/s", "pinned req/s", "x", "srv CPU us/call free / pinned",
            "switches/call free / pinned", "p99 ms free / pinned", "CPUs free / pinned")
    body = [(s["backend"], s["model"], s["rpc"], str(s["concurrency"]), f"{s['rps_free']:,.0f}", f"{s['rps_pinned']:,.0f}",
             f"{s['factor']:.2f}", f"{s['cpu_free']:,.0f} / {s['cpu_pinned']:,.0f}",
             f"{s['switches_free']:.1f} / {s['switches_pinned']:.1f}", f"{s['p99_free']:.1f} / {s['p99_pinned']:.1f}",
             f"{s['cpus_free']} / {s['cpus_pinned']}") for s in rows]
    return _table(head, body, 3, md)


def pinning_summary(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    parts = [f"{s['model'] if s['backend'] == '-' else s['backend'] + ' ' + s['rpc']} {s['factor']:.2f}x"
             for s in rows]
    text = "Pinned to one CPU against left to the kernel, throughput: " + "; ".join(parts) + "."
    for echo in (s for s in rows if s["rpc"] == ECHO):
        if not (echo["rps_free"] and echo["rps_pinned"]):
            continue
        ratios = [f"{s['backend']} {s['rpc']} {s['rps_free'] / echo['rps_free']:.2f} left to the kernel, "
                  f"{s['rps_pinned'] / echo['rps_pinned']:.2f} pinned" for s in rows
                  if s["rpc"] != ECHO and FLOOR.get(s["model"]) == echo["model"]]
        if ratios:
            text += (f" The echo server {echo['model']} {'gains too' if echo['factor'] > 1 else 'does not gain'} "
                     f"({echo['factor']:.2f}x): against the echo of this part (its windows minutes apart from "
                     "the RPC's, not paired), x echo " + "; ".join(ratios) + ".")
    return text


def round_trips_text(results: list[RunResult]) -> str:
    """Per backend and RPC, the SQL counters per call of the 1-process server (all its runs)."""
    lines = []
    for backend in dict.fromkeys(r.backend for r in results if r.queries):
        parts = []
        for method in RPCS:
            rs = [r for r in results if r.backend == backend and r.method == method and r.queries]
            made = sum(r.calls_made for r in rs)
            if not made:
                continue
            tot = {k: sum(r.queries.get(k, 0) for r in rs) / made
                   for k in ("statements", "transactions", "checkouts", "queued", "pipelines", "begins_joined")}
            if backend == "postgres":
                # A transaction ended in pipeline mode leaves it after its COMMIT at no cost (the
                # COMMIT's Sync answered everything: entitlement/storage/direct.py).
                trips = tot["statements"] - tot["queued"] + 2 * tot["transactions"] - tot["begins_joined"]
                queued = (f" - {tot['queued']:.1f} queued in a pipeline"
                          f" - {tot['begins_joined']:.1f} BEGIN sent with the first statements"
                          if tot["queued"] else "")
                parts.append(f"{method} {tot['statements']:.1f} statements{queued} + {tot['transactions']:.1f} "
                             f"transactions x 2 = ~{trips:.1f} round trips")
            else:
                parts.append(f"{method} {tot['statements']:.1f} statements (BEGIN and savepoints included) in "
                             f"{tot['transactions']:.1f} transactions")
        lines.append(f"- {backend}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


@dataclass(frozen=True)
class Method:
    date: str
    nproc: int
    cpu: str
    memory_gib: float
    python: str
    grpcio: str
    commit: str
    backends: tuple[str, ...]
    skipped: str
    postgres_version: str
    loadavg_start: str
    loadavg_end: str
    elapsed_s: float
    loopback_cc: str = ""  # loopback_cc_text() at the start


def markdown(cfg: RpcsConfig, m: Method, results: list[RunResult]) -> str:
    conc = " and ".join(str(c) for c in cfg.concurrency)
    pg = f" (PostgreSQL {m.postgres_version})" if m.postgres_version else ""
    skipped = f" ({m.skipped})" if m.skipped else ""
    quick = " **Quick mode (BENCH_QUICK=1): figures are rough.**" if cfg.quick else ""
    rounds = cfg.paired_rounds
    pins = pinning(results)
    pin_txt = (f"""
### One process pinned to one CPU vs left to the kernel

{pinning_table(pins, True)}

Two 1-process servers (the real one per backend, and the echo), identical but for `ENTITLEMENT_CPU_AFFINITY` (`off` against one CPU: every thread of the process on it; entitlement/affinity.py), run side by side, idle in turn: each case in {SCALING_ROUNDS} rounds of {cfg.seconds / SCALING_ROUNDS:g} s (each after {cfg.warmup:g} s of warm-up) in alternating order, {min(cfg.concurrency)} calls in flight. "CPUs" is what the server's threads may run on, read from /proc after the case's rounds.

{pinning_summary(pins)}
""" if pins else "")
    scale = scaling(results)
    scale_txt = (f"""
### 1 vs 2 server processes (PostgreSQL)

{scaling_table(scale, True)}

Each process is a spawned `server_main.start` (in PostgreSQL's model; the echo rows: the sync echo, whatever that model) with `processes=2` in its settings (SO_REUSEPORT), as `server.py` runs them with `ENTITLEMENT_PROCESSES=2`, and pinned as it pins them (`ENTITLEMENT_CPU_AFFINITY` {_affinity_text(cfg.cpu_affinity)}: with `auto` on a 2-CPU machine, each of the 2 processes on a CPU of its own while the single process is left to the kernel; "CPUs" gives what each process's threads may run on); the load generator's {cfg.channels} connections are spread over them by the kernel (the per-process CPU in brackets shows how evenly). The 1-process and 2-process servers run side by side, idle in turn: each case is measured in {SCALING_ROUNDS} rounds of {cfg.seconds / SCALING_ROUNDS:g} s (each after {cfg.warmup:g} s of warm-up) in alternating order (1 2, 2 1), so that drift in the machine's other load falls on both. Client, servers and PostgreSQL share the {m.nproc} cores: "machine busy" is every process's CPU over the window (/proc/stat, other work on the machine included), out of {m.nproc}.

{scaling_summary(scale)} {autogroup_text()}
""" if scale else "")
    return f"""## The hot RPCs against the echo floor (`python -m bench.rpcs`)

Written by `python -m bench.rpcs` (part of `make bench`, code in `bench/rpcs.py`); each run rewrites this section.{quick}

### Method

- Machine: `nproc` = {m.nproc} ({m.cpu}), {m.memory_gib:.0f} GiB, shared with other work: load average (1/5/15 min) {m.loadavg_start} at the start, {m.loadavg_end} at the end. Run on {m.date}; {m.elapsed_s:.0f} s in all. Python {m.python}, grpcio {m.grpcio}. Code: {m.commit}. {m.loopback_cc}
- Backends: {", ".join(m.backends)}{pg}{skipped}. Each a fresh database, migrated, with a synthetic registry of {cfg.people:,} people imported (about half eligible). FixedClock at 2026-03-16.
- Server: the real one, `entitlement.server_main.start`, in the server model production gives each backend (`BENCH_SERVER_MODEL` {cfg.server_model}: {_models_text(cfg, m.backends)}; README "Server models"): **threads** = sync gRPC, ThreadPoolExecutor of {cfg.workers} for the unary calls; **event-loop** = grpc.aio on {event_loop_text(bench_event_loop(), 'BENCH_EVENT_LOOP')} (the aio echo's too) with CheckEligibility and VerifyEntitlement answered on the loop on SQLite, and ActivateEntitlement and RedeemActivationToken written on it when their write need not wait (`BENCH_LOOP_WRITES` {bench_loop_writes()}, as ENTITLEMENT_LOOP_WRITES; README "Server models") (on PostgreSQL, asked for with BENCH_SERVER_MODEL, nothing runs on the loop), the other unary calls on a ThreadPoolExecutor of {cfg.workers}; either with {Settings().stream_workers} threads for the streaming calls and a pool of {cfg.workers + Settings().stream_workers + 1} DB connections (one per thread that may hold one, the loop's included). In its own process, with the production behaviours: access log (one JSON line per call at `{cfg.log_level}`, to a file), caller, and the per-caller rate limiter (set to {UNLIMITED_RATE:.0e} a minute so it never refuses); CPU affinity `{_affinity_text(cfg.cpu_affinity)}`, the echo's too. Floor: per model, the echo server built the same way (`bench/servers.py`, no behaviour, bytes in, bytes out, same pool size and options), measured in the same run: **sync-echo** (`grpc.server`) for threads, **aio-echo-inline** (`grpc.aio`, answered on the loop) for event-loop; each backend's RPCs are paired with the floor of their model, and column "model" says which.
- Load: one grpc.aio load-generator process, {cfg.channels} channels (connections), pre-serialized requests. Closed loop: {conc} calls in flight. Open loop: calls sent at a fixed rate, half the best closed-loop throughput of that RPC on that backend, whatever the answers; latency counted from when each call was due. Each case: {cfg.seconds:g} s measured after {cfg.warmup:g} s of unmeasured calls (a closed-loop case of a real RPC, and the control: in rounds, below) (a RedeemActivationToken window ends early only if its tokens run out; none did unless an `(early)` note says so).
- Requests: CheckEligibility (advisor) cycles over registry people; ActivateEntitlement (advisor, premium-job-seekers: no cap) takes each eligible person once, with a unique request id; RedeemActivationToken (platform) takes each token once with a new account id (tokens from the measured ActivateEntitlement calls, topped up before each window by unmeasured ones); VerifyEntitlement (platform) cycles over {cfg.seed_accounts} accounts redeemed before the runs; ListActivations (funder {FUNDER_ID}) cycles over pages 1 to {LIST_PAGES} of 100, newest first, measured on PostgreSQL after an ANALYZE (the runs before made thousands of rows faster than autovacuum's analyze comes round; with the statistics of near-empty tables the planner sorted every activation for each page: `analyze_as_autovacuum_would`).
- Echo pairing: the echo server stays up for the whole run, and every closed-loop case of a real RPC is measured in {rounds} rounds of {cfg.seconds / rounds:g} s, alternating with {rounds} windows of the echo server at the same concurrency, {cfg.seconds / 2 / rounds:g} s each, in alternating order (echo RPC, RPC echo, ...; each window after {ROUND_WARMUP:g} s of unmeasured calls, the first RPC window after {cfg.warmup:g} s). x echo is the case's calls over its measured seconds, against the same for its echo windows; "rounds" (targets table: the concurrency level with the best x echo) gives the lowest and highest ratio of one round to its echo window. Control: a second echo server measured the same way (rows `control`). The speed of this shared machine drifts by up to a third within a minute: alternation makes both sides of a ratio see the same drift.
- Columns: req/s = calls answered OK in the measured windows / their length; echo req/s = the same for the paired echo windows; x echo = req/s over echo req/s; p50/p95/p99 = client-side latency; srv / cli cores = CPU seconds (utime + stime, /proc/PID/stat) of the server / load generator over the measured windows, per second; srv CPU us/call = the server's CPU over the calls answered OK; other cores = what the rest of the machine used meanwhile, per second: all its CPU (/proc/stat) but the server's, the load generator's and, on PostgreSQL, the database's own processes' (every process named postgres) (other work on this shared machine: a tail that comes with it is not ours); switches/call = the server's context switches (voluntary and not, all its threads: /proc/PID/task/*/status) over the calls answered OK, mostly threads waiting for the GIL or for work; srv / cli queued = thread-seconds, per second of the windows, that the server's / the load generator's threads spent runnable but not running, waiting in a run queue for a CPU (their schedstat run delay, /proc/PID/task/*/schedstat, summed over threads: 0.5 is, say, one thread waiting half the time; a thread waiting for the GIL or for work sleeps and is not counted): how much these processes' threads (ours, gRPC's, the load generator's, PostgreSQL's beside them) contend for the 2 CPUs, time in which a call has nothing running it (both columns: what each thread alive at a window's end added during it; a thread that ended within a window is not counted); SQL/call, txn/call = SQL statements and transactions the server sent per call (SQLAlchemy events on its engine, warm-up included).
- Targets (issue #8): the best x echo over the concurrency levels: CheckEligibility >= 0.5, VerifyEntitlement >= 0.6, ActivateEntitlement >= 0.25 on SQLite and >= 0.15 on PostgreSQL; p99 under 10 ms at half the best throughput (open loop; "handlers' p99 ms there": the p99 of the `latency_ms` our servers' access log gave the calls that ended in that window, the time inside our handlers only, without gRPC's queueing before them, the transport or the load generator; "without its worst 0.1 s": the p99 of that window once the calls due within the tenth of a second that holds the most calls slower than 10 ms are left out, a diagnostic and never the verdict: well under 10 ms when one short stall made the miss, about the p99 itself when the latency was spread over the window; "srv / cli queued there" and "other cores there": as in the results table, during that window).

### Results

{results_table(results, True)}

### Targets

{targets_table(targets(results), True)}

{targets_summary(targets(results))}

{control_text(results)}
{scale_txt}{pin_txt}
### Database round trips per call

{round_trips_text(results)}

On PostgreSQL a transaction costs two round trips besides its statements (psycopg sends BEGIN, then COMMIT). A statement queued in psycopg's pipeline mode (an activation's and a redemption's writes, an activation's program counter UPDATE: entitlement/storage/direct.py) travels with the next statement that reads rows or with the COMMIT; reads sent ahead together (an activation's first four) share one round trip, with the BEGIN; leaving pipeline mode after the COMMIT costs nothing. There is no pool pre-ping, and hot reads (CheckEligibility, VerifyEntitlement) run on the autocommit pool, outside any transaction; on SQLite nothing crosses a network, and writers that queue behind another share its transaction and its COMMIT, each in a savepoint of its own (group commit, entitlement/storage/db.py: fewer transactions than calls, one more statement per writer that joined one: a SAVEPOINT and its RELEASE, no BEGIN).
"""


# ------------------------------------------------------------------------------------------ main

def main() -> int:
    cfg = RpcsConfig.from_env()
    began = time.monotonic()
    load_start = loadavg()
    loopback_cc = loopback_cc_text()
    say(f"bench.rpcs: {loopback_cc}")
    code = commit()
    tmp = Path(tempfile.mkdtemp(prefix="entitlement-bench-rpcs-"))
    client: Client | None = None
    runner: Runner | None = None
    try:
        say(f"bench.rpcs: {cfg.seconds:g} s measured per case after {cfg.warmup:g} s warm-up; concurrency "
            f"{cfg.concurrency}; {cfg.channels} channels; {cfg.workers} workers; temp dir {tmp}")
        backends, skipped, pg_ver = usable_backends(cfg.backends, cfg.pg_admin_url, "bench.rpcs")
        common = prepare_common(tmp, cfg.people)
        seed_people = common.candidates[: cfg.seed_accounts * 2]
        pool_people = common.candidates[cfg.seed_accounts * 2:]
        say(f"bench.rpcs: synthetic registry of {cfg.people:,} people, {len(common.candidates):,} eligible")
        client = Client()
        runner = Runner(cfg, client)

        echo_requests = check_requests(common.people, 1)
        models = {backend: backend_model(cfg.server_model, backend) for backend in backends}
        for model in dict.fromkeys(models.values()):
            floor = FLOOR[model]
            say(f"bench.rpcs: echo floor of the {model} server ({floor})")
            with server_group(server_spec(cfg, common, "echo", "", floor)) as echo_group:
                runner.closed_then_half("-", echo_group, ECHO, requests=echo_requests)
                runner.echo = (echo_group, echo_requests)  # from now on, paired with each closed-loop case
                say("bench.rpcs: control: a second echo server, measured as the RPCs are")
                with server_group(server_spec(cfg, common, "echo", "", floor, "control", port=free_port())) as twin:
                    for c in cfg.concurrency:
                        runner.run(CONTROL, twin, ECHO, concurrency=c, paired=True, requests=echo_requests)
                for backend in (b for b in backends if models[b] == model):
                    with imported_database(backend, common, cfg.pg_admin_url, "bench.rpcs") as url:
                        measure_backend(runner, cfg, common, backend, url, seed_people, pool_people)
                runner.echo = None
        for floor in dict.fromkeys(FLOOR[m] for m in models.values()):
            measure_echo_pinning(runner, cfg, common, floor)
    except KeyboardInterrupt:
        say("bench.rpcs: interrupted")
        return 130
    finally:
        if client is not None:
            client.stop()
        if cfg.keep:
            say(f"bench.rpcs: kept {tmp}")
        else:
            if runner is not None and any(r.errors for r in runner.results) and (tmp / "logs").is_dir():
                # Calls failed: the servers' logs say why (a window that collapsed once went
                # unexplained for want of them). Kept without the databases.
                kept = Path(tempfile.mkdtemp(prefix="entitlement-bench-rpcs-logs-"))
                shutil.move(str(tmp / "logs"), kept / "logs")
                say(f"bench.rpcs: calls failed; the servers' logs are kept in {kept / 'logs'}")
            shutil.rmtree(tmp, ignore_errors=True)

    results = runner.results
    elapsed = time.monotonic() - began
    cpu, mem = machine()
    m = Method(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               nproc=len(os.sched_getaffinity(0)), cpu=cpu, memory_gib=mem, python=platform.python_version(),
               grpcio=metadata.version("grpcio"), commit=code, backends=tuple(backends), skipped=skipped,
               postgres_version=pg_ver, loadavg_start=load_start, loadavg_end=loadavg(), elapsed_s=elapsed,
               loopback_cc=loopback_cc)
    say("")
    say(results_table(results, False))
    say("")
    say(targets_table(targets(results), False))
    if control_text(results):
        say("")
        say(control_text(results))
    if scaling(results):
        say("")
        say(scaling_table(scaling(results), False))
    if pinning(results):
        say("")
        say(pinning_table(pinning(results), False))
    say("")
    say(round_trips_text(results))
    say(f"\nLoad average {m.loadavg_start} at the start, {m.loadavg_end} at the end; {elapsed:.0f} s in all.")
    if cfg.open_rate:
        say(f"BENCH_OPEN_RATE: every open-loop case ran at {cfg.open_rate:g} calls a second, not at half its best "
            "throughput: the \"half rate\" columns and the p99 verdicts above are at that rate.")
    if cfg.json_path is not None:
        cfg.json_path.write_text(json.dumps({"results": [asdict(r) for r in results], "targets": targets(results),
                                             "scaling": scaling(results), "pinning": pinning(results)},
                                            indent=1, default=str))
    if cfg.output is not None:
        replace_section(cfg.output, SECTION, markdown(cfg, m, results))
        say(f"bench.rpcs: wrote {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
