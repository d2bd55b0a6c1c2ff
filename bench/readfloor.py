"""Where a hot read's server time goes in the thread-pool server (`python -m bench.readfloor`).

Question: on PostgreSQL the thread-pool server's CheckEligibility and VerifyEntitlement sit at their
targets' line (issue #8: >= 0.5 and >= 0.6 of the echo server's calls a second). How much of the
echo's throughput does the database round trip alone leave, and what does each further piece cost
in the server process, where every call also pays gRPC's thread hand-overs and the interpreter
lock? (bench.breakdown counts the pieces in-process, without either.)

A ladder of thread-pool servers (bench/servers.py, each `grpc.server` with the same pool size,
options and concurrency bound as server_main.start), all answering the two RPCs' own paths, all sent
the same requests with the same bearer token by the same load generator, measured in alternating
rounds (bench.__main__.measure: A B C D, D C B A, ...):
- floor-echo:    the request's bytes sent back;
- floor-read:    the request decoded and the RPC's one hot read run on the real database
                 (`ctx.db.hot`, the production read path: registry.lookup after the person key's
                 HMAC, VerifyEntitlement's statement), then the bytes sent back; a check of
                 premium-job-seekers (no cap) reads nothing else (a capped program would add the
                 counters' statement);
- floor-handler: the servicer method itself, wrapped (entitlement.api.wrapping) in the caller's
                 identity only: validation, the use case, its read, the answer, the deadline;
- sync:          the real server (server_main.start, ENTITLEMENT_SERVER_MODEL=threads), which adds
                 the access log and, for checks, the rate limiter (set to 1e9 a minute: never
                 refuses, always runs); health, reflection and the database monitor's ping (once a
                 second) are served beside.

Settings (environment), as for `python -m bench`: BENCH_SECONDS (measured seconds per server and
case, 5), BENCH_ROUNDS (4), BENCH_WARMUP (0.5), BENCH_CONCURRENCY (8,32), BENCH_PEOPLE (20000),
BENCH_ACTIVATIONS (accounts VerifyEntitlement cycles over, 200), BENCH_WORKERS, BENCH_BACKENDS
(postgres here by default; sqlite too if asked), BENCH_PG_URL, BENCH_LOG_LEVEL, BENCH_OUTPUT
(BENCHMARKS.md, its "read-floor" section; "-" to only print), BENCH_KEEP.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import hot_loads, measure, server_spec
from bench.config import (ADVISOR_ID, CHECK, FLOOR_ECHO, FLOOR_HANDLER, FLOOR_KINDS, FLOOR_READ, LOOP_ECHO,
                          LOOP_KINDS, LOOP_READ, PLATFORM_CALLER_ID, SYNC, VERIFY, BenchConfig, RunResult, SeedSpec)
from bench.common import say
from bench.prepare import imported_database, prepare_common
from bench.procs import Client, commit, loadavg, machine, servers, usable_backends
from bench.sections import replace_section

SECTION = "read-floor"
LADDER = (FLOOR_ECHO, FLOOR_READ, FLOOR_HANDLER, SYNC)
LOOP = (LOOP_ECHO, LOOP_READ)  # the event loop's rungs, against their own echo (loop-echo)
SERVERS = LADDER + LOOP
ECHOES = (FLOOR_ECHO, LOOP_ECHO)
STEP = {
    FLOOR_ECHO: "bytes back (echo at the RPC's path)",
    FLOOR_READ: "+ the RPC's hot read (request decoded, one statement)",
    FLOOR_HANDLER: "+ the rest of the servicer method and the caller's identity",
    SYNC: "+ access log (checks: + rate limiter): the real server",
    LOOP_ECHO: "event loop: bytes back, on the loop",
    LOOP_READ: "event loop: + the hot read made from the loop (PostgreSQL: libpq non-blocking)",
}
TARGETS = {CHECK: 0.5, VERIFY: 0.6}


def cpu_us(r: RunResult) -> float:
    return r.server_cpu_s / r.calls * 1e6 if r.calls else float("nan")


def _us(x: float, signed: bool = False) -> str:
    return "-" if x != x else f"{x:+,.0f}" if signed else f"{x:,.0f}"  # (x != x: NaN, no call answered)


def sql_per_call(r: RunResult) -> str:
    """The SQL statements the server sent per call of the case, warm-up calls included ("-": the
    echo, which has no database)."""
    if r.model in ECHOES or not r.calls_made:
        return "-"
    return f"{r.queries.get('statements', 0) / r.calls_made:.2f}"


def _ratio(r: RunResult, echo: RunResult) -> str:
    return f"{r.rps / echo.rps:.2f}" if echo.rps else "-"


def cases(results: list[RunResult]) -> dict[tuple[str, str, int], dict[str, RunResult]]:
    """The runs by case (backend, RPC, concurrency), then by server, in the order they were run."""
    out: dict[tuple[str, str, int], dict[str, RunResult]] = {}
    for r in results:
        out.setdefault((r.backend, r.method, r.concurrency), {})[r.model] = r
    return out


def rows(results: list[RunResult]) -> list[tuple[str, ...]]:
    """One table row per run: its step's throughput over the floor-echo's of the same case, and
    its server CPU per call over the step before's."""
    out: list[tuple[str, ...]] = []
    for (backend, method, conc), case in cases(results).items():
        previous = None
        for kind in SERVERS:
            r = case[kind]
            if kind in ECHOES:  # each ladder against its own echo
                echo, previous = r, None
            added = "-" if previous is None else _us(cpu_us(r) - cpu_us(previous), signed=True)
            errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
            rounds = "-".join(f"{x:,.0f}" for x in (min(r.round_rps), max(r.round_rps))) if r.round_rps else "-"
            out.append((backend, method, str(conc), kind, STEP[kind], f"{r.rps:,.0f}", rounds, _ratio(r, echo),
                        f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", _us(cpu_us(r)), added, sql_per_call(r), errors))
            previous = r
    return out


HEADER = ("backend", "rpc", "conc", "server", "step", "req/s", "rounds req/s", "x echo", "p50 ms", "p99 ms", "srv CPU us/call",
          "step's CPU us/call", "SQL/call", "errors")


def conclusions(results: list[RunResult]) -> list[str]:
    """Per backend, RPC and concurrency: what the read alone leaves of the echo's throughput, and
    the server CPU per call of each step against the target's budget (echo's CPU per call / target:
    a server that spends more per call than that cannot reach the target when, as here, the server
    process is the limit). Issue #8 takes the best ratio over the concurrency levels."""
    lines = []
    for (backend, method, conc), case in cases(results).items():
        echo, read, handler, real = (case[k] for k in LADDER)
        target = TARGETS[method]
        budget = cpu_us(echo) / target
        lines.append(
            f"- **{backend} {method}**, c={conc}: the echo answers {echo.rps:,.0f} calls/s at "
            f"{_us(cpu_us(echo))} us of server CPU each; with the one hot read {_ratio(read, echo)} x echo "
            f"({_us(cpu_us(read))} us); with the servicer method and the caller's identity "
            f"{_ratio(handler, echo)} x ({_us(cpu_us(handler))} us); the real server {_ratio(real, echo)} x "
            f"({_us(cpu_us(real))} us). Target {target} x echo: a budget of {_us(budget)} us a call, of which "
            f"the echo itself takes {_us(cpu_us(echo))}, the read's step {_us(cpu_us(read) - cpu_us(echo))}, "
            f"the method's {_us(cpu_us(handler) - cpu_us(read))}, the access log's "
            f"{_us(cpu_us(real) - cpu_us(handler))}. On the event loop: its echo {case[LOOP_ECHO].rps:,.0f} calls/s "
            f"({_us(cpu_us(case[LOOP_ECHO]))} us), with the read made from the loop "
            f"{_ratio(case[LOOP_READ], case[LOOP_ECHO])} x its echo ({_us(cpu_us(case[LOOP_READ]))} us, the read's "
            f"step {_us(cpu_us(case[LOOP_READ]) - cpu_us(case[LOOP_ECHO]))}).")
    return lines


def markdown(results: list[RunResult], cfg: BenchConfig, code: str, started: dt.datetime, elapsed: float,
             pg_ver: str, load: str) -> str:
    cpu, mem = machine()
    lines = [
        "## Where a hot read's server time goes (`python -m bench.readfloor`)",
        "",
        f"- Run on {started:%Y-%m-%d %H:%M} UTC (its start), {code}; {elapsed:.0f} s in all. "
        f"Machine: `nproc` = {len(os.sched_getaffinity(0))} ({cpu}), {mem:.0f} GiB; load average {load} at the start."
        + (f" PostgreSQL {pg_ver}." if pg_ver else ""),
        "- A ladder of thread-pool servers (`grpc.server`, the same pool of "
        f"{cfg.workers} threads, options and concurrency bound as `server_main.start`), each answering "
        "CheckEligibility's and VerifyEntitlement's own paths, all sent the same requests with the same "
        "bearer token by one grpc.aio load generator (closed loop, one channel): **floor-echo** sends the "
        "request's bytes back; **floor-read** decodes the request and runs the RPC's one hot read on the real "
        "database (`ctx.db.hot`: registry.lookup after the person key's HMAC, the only statement of a check of "
        "this uncapped program; VerifyEntitlement's statement), then sends the bytes back; "
        "**floor-handler** runs the servicer method wrapped in the caller's identity only (validation, the use "
        "case and its read, the answer, the deadline); **sync** is the real server (`server_main.start`, "
        "threads: adds the access log, one JSON line a call to a file, and for checks the rate limiter, set "
        "never to refuse; health, reflection and the database monitor's ping are served beside). "
        "And two event-loop rungs (`grpc.aio.server` on the production loop, options and concurrency bound as "
        "aio-echo-inline, answering on the loop itself), each against its own echo: **loop-echo** sends the "
        "bytes back; **loop-read** first makes the RPC's one hot read from the loop: on PostgreSQL its statement "
        "sent by libpq in non-blocking mode (prepared once per connection, values and rows through psycopg's "
        f"adapters as `ctx.db.hot` does, on {cfg.workers} connections, a call waiting for a free one), the loop "
        "awaiting the answer where a pool thread blocks on it; on SQLite the production read, on the loop as the "
        "event-loop server runs it. What the event-loop server could reach on PostgreSQL were its hot reads made "
        "that way (it hands them to its pool: README \"Server models\"). "
        f"Each case: {cfg.seconds:g} s per server in {cfg.rounds} rounds, the servers alternating round by round "
        f"(A B C D, D C B A, ...), each round after {cfg.warmup:g} s of unmeasured calls. CheckEligibility cycles "
        f"over {min(2000, cfg.people):,} of {cfg.people:,} registry people; VerifyEntitlement over "
        f"{cfg.activations} accounts redeemed through the real RPCs first.",
        "- Columns: x echo = req/s over floor-echo's (loop rungs: loop-echo's) in the same case; srv CPU us/call = utime + stime of the "
        "server process over the measured windows, per call answered; step's CPU = that over the step before's; "
        "SQL/call = statements the server sent (its engine's events and the hot reads' listeners) over every "
        "call of the case, warm-up included (the health monitor's ping, once a second, adds a little). "
        "Issue #8's targets compare the real server with the sync echo of `python -m bench.rpcs` (one request, "
        "its own path, no metadata, a generic handler); floor-echo is sent the RPC's requests and bearer token "
        "at the RPC's path, its methods registered with gRPC core as the real server's are. "
        "rounds req/s = the lowest and highest round (the shared machine's speed drifts within a run).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---:" if h not in ("backend", "rpc", "server", "step", "errors") else "---" for h in HEADER) + "|",
        *("| " + " | ".join(row) + " |" for row in rows(results)),
        "",
        "### Reading",
        "",
        *conclusions(results),
    ]
    return "\n".join(lines)


def main() -> int:
    os.environ.setdefault("BENCH_BACKENDS", "postgres")
    cfg = BenchConfig.from_env()
    began, started = time.monotonic(), dt.datetime.now(dt.timezone.utc)
    load = loadavg()
    code = commit()
    tmp = Path(tempfile.mkdtemp(prefix="entitlement-readfloor-"))
    client: Client | None = None
    results: list[RunResult] = []
    try:
        backends, skipped, pg_ver = usable_backends(list(cfg.backends), cfg.pg_admin_url, "bench.readfloor")
        if not backends:
            raise SystemExit(f"bench.readfloor: no backend to measure ({skipped})")
        common = prepare_common(tmp, cfg.people)
        client = Client()
        for backend in backends:
            with imported_database(backend, common, cfg.pg_admin_url, "bench.readfloor") as url:
                real = dataclasses.replace(server_spec(SYNC, cfg, common, backend, url), check_rate_per_min=10**9,
                                           count_queries=True)
                with servers([real]) as sync_srv:
                    seeded = client.ask("seed", SeedSpec(
                        port=sync_srv[SYNC].port, advisor_token=common.tokens[ADVISOR_ID],
                        platform_token=common.tokens[PLATFORM_CALLER_ID],
                        candidates=tuple((a, b.isoformat()) for a, b in common.candidates), count=cfg.activations))
                    accounts = [acc for acc, _, _ in seeded]
                    with servers([server_spec(k, cfg, common, backend, url) for k in (*FLOOR_KINDS, *LOOP_KINDS)]) as floor:
                        srv = {**sync_srv, **floor}
                        for method, (reqs, token) in hot_loads(common, accounts).items():
                            for conc in cfg.concurrency:
                                before = {k: srv[k].counts() for k in SERVERS}
                                case = measure(client, srv, SERVERS, backend, method, reqs, token, conc, cfg)
                                after = {k: srv[k].counts() for k in SERVERS}
                                # SQL statements the server sent over the case (warm-up calls included)
                                results += [dataclasses.replace(r, queries={"statements": after[r.model].get(
                                    "statements", 0) - before[r.model].get("statements", 0)}) for r in case]
    except KeyboardInterrupt:
        say("bench.readfloor: interrupted")
        return 130
    finally:
        if client is not None:
            client.stop()
        if cfg.keep:
            say(f"bench.readfloor: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - began
    text = markdown(results, cfg, code, started, elapsed, pg_ver, load)
    say("")
    say(text)
    if cfg.output is not None:
        replace_section(cfg.output, SECTION, text)
        say(f"\nbench.readfloor: wrote {cfg.output} ({elapsed:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
