"""`python -m bench.rpcs` in its quick mode on SQLite, so the benchmark cannot rot: every RPC it
measures got successful calls through the real server, nothing failed that should not, the SQL
counters saw the database, and its section of BENCHMARKS.md was written. Nothing about speed is
asserted (that is what the benchmark prints)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench.config import ACTIVATE, CHECK, ECHO, LIST, REDEEM, VERIFY
from bench.rpcs import CONTROL, PINNING, QUICK_PAIRED_ROUNDS
from entitlement import hostcheck

ROOT = Path(__file__).resolve().parent.parent
RPCS = (CHECK, ACTIVATE, REDEEM, VERIFY, LIST)
# Open loop only: calls the server refused past its maximum_concurrent_rpcs, or that the load
# generator could not send, when a shared machine stalls the server; never a bug of ours.
OVERLOAD = {"RESOURCE_EXHAUSTED", "CLIENT_BACKLOG"}


def test_quick_rpcs_benchmark_measures_every_rpc(tmp_path: Path) -> None:
    out, js = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_BACKENDS": "sqlite", "BENCH_OUTPUT": str(out),
           "BENCH_JSON": str(js)}
    for name in ("BENCH_SECONDS", "BENCH_WARMUP", "BENCH_CONCURRENCY", "BENCH_PEOPLE", "BENCH_KEEP"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "bench.rpcs"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(js.read_text())
    results = doc["results"]

    for method in (ECHO, *RPCS):
        runs = [r for r in results if r["method"] == method and not r["part"]]
        closed, opened = [r for r in runs if not r["rate"]], [r for r in runs if r["rate"]]
        assert closed and opened, f"{method}: closed loop {len(closed)} run(s), open loop {len(opened)}"
        for r in runs:
            assert r["calls"] > 0, f"{method}: no successful call ({r})"
            assert r["server_switches"] > 0, f"{method}: no context switch of the server counted ({r})"
            assert r["postgres_cpu_s"] >= 0 and r["machine_cpu_s"] > 0, r
            assert r["server_wait_s"] >= 0 and r["client_wait_s"] >= 0, r
        for r in closed:
            assert r["errors"] == {}, f"{method}: errors {r['errors']}"
            if method == ECHO and r["backend"] == "-":  # the echo floor: one window
                assert not r["round_ratios"] and not r["echo_rps"]
                continue
            # Measured in rounds alternating with echo windows: the case's ratio is its calls over
            # its seconds against the echo windows' own, so (equal windows) it lies between the
            # lowest and the highest ratio of one round to its echo window.
            ratios = r["round_ratios"]
            assert len(ratios) == QUICK_PAIRED_ROUNDS and r["echo_rps"] > 0, (method, ratios, r["echo_rps"])
            if not r["note"]:
                overall = r["calls"] / r["seconds"] / r["echo_rps"]
                assert min(ratios) - 1e-9 <= overall <= max(ratios) + 1e-9, (method, overall, ratios)
        for r in opened:
            assert set(r["errors"]) <= OVERLOAD, f"{method} (open loop): errors {r['errors']}"
            assert 0 < r["p99_wo_worst_ms"] < 60_000, (method, r["p99_wo_worst_ms"])  # from each call's due time
            if method != ECHO:  # the handlers' own p99, from the server's access log of that window
                assert 0 < r["server_p99_ms"] < 60_000, (method, r["server_p99_ms"])
        if method != ECHO:
            for r in runs:  # the real server talked to its database on every call
                q = r["queries"]
                assert r["calls_made"] > 0 and q["statements"] >= r["calls_made"], (method, q, r["calls_made"])
                if method not in (CHECK, VERIFY, LIST):  # reads run outside any transaction (autocommit pool)
                    # A transaction per write on PostgreSQL (more: the server's own writes); on
                    # SQLite, writers queued behind another share its COMMIT (group commit,
                    # entitlement/storage/db.py): at least one.
                    least = 1 if r["backend"] == "sqlite" else r["calls_made"]
                    assert q["transactions"] >= least, (method, q, r["calls_made"])

    # The control, a second echo server paired like an RPC: a row per concurrency level, and the
    # text that reads its ratio.
    control = [r for r in results if r["backend"] == CONTROL]
    assert [r["concurrency"] for r in control] == [8] and all(r["method"] == ECHO for r in control)
    assert "Control (rows `control`)" in out.read_text()

    # The pinning part: the same server left to the kernel, then pinned to one CPU (every thread of
    # it, read from /proc during the run), for a check, an activation and the echo.
    pinned = [r for r in results if r["part"] == PINNING]
    if len(os.sched_getaffinity(0)) > 1:
        assert [(r["backend"], r["method"]) for r in pinned] == [
            ("sqlite", CHECK), ("sqlite", CHECK), ("sqlite", ACTIVATE), ("sqlite", ACTIVATE), ("-", ECHO), ("-", ECHO)]
        for free, pin in zip(pinned[::2], pinned[1::2]):
            assert free["calls"] > 0 and pin["calls"] > 0 and not free["errors"] and not pin["errors"], (free, pin)
            assert pin["cpus"] == str(min(os.sched_getaffinity(0))), pin["cpus"]
            assert free["cpus"] not in ("", pin["cpus"]), free["cpus"]
        assert [(p["backend"], p["rpc"]) for p in doc["pinning"]] == [("sqlite", CHECK), ("sqlite", ACTIVATE), ("-", ECHO)]
        assert "### One process pinned to one CPU vs left to the kernel" in out.read_text()
    else:
        assert not pinned  # one CPU: nothing to compare

    assert {t["rpc"] for t in doc["targets"]} == {ECHO, *RPCS}
    judged = [t for t in doc["targets"] if t["rpc"] in (CHECK, VERIFY, ACTIVATE)]
    assert len(judged) == 3 and all(t["ratio_met"] in (True, False) and t["p99_met"] in (True, False) for t in judged)
    text = out.read_text()
    assert text.count("<!-- section:rpcs -->") == 1 and "<!-- /section:rpcs -->" in text
    for method in RPCS:  # served by SQLite's production model (auto), paired with that model's floor
        assert f"| sqlite | event-loop | {method} |" in text
    assert f"| - | aio-echo-inline | {ECHO} |" in text
    assert {(r["backend"], r["model"]) for r in results if not r["part"]} == {
        ("-", "aio-echo-inline"), (CONTROL, "aio-echo-inline"), ("sqlite", "event-loop")}
    assert "| cli cores | srv / cli queued | other cores |" in text
    assert "| without its worst 0.1 s | handlers' p99 ms there | srv / cli queued there | other cores there |" in text
    if os.path.exists("/proc/self/schedstat"):  # the kernel keeps run delays: some were counted
        main = [r for r in results if not r["part"]]
        assert sum(r["server_wait_s"] for r in main) > 0 and sum(r["client_wait_s"] for r in main) > 0
    assert "Quick mode" in text
    # The method says which congestion control loopback connections got (it shapes the p99s).
    cc = hostcheck.accepted_congestion_control("127.0.0.1")
    if cc is not None:
        assert f"TCP connections on loopback (127.0.0.1) got `{cc}`" in text
        assert ("may wait about 40 ms" in text) == (cc in hostcheck.STALLING)


def test_the_query_counter_tells_queued_statements_from_round_trips(db: Any) -> None:
    """bench.servers.QueryCounter, which the round-trip figures of BENCHMARKS.md come from: a
    statement sent in pipeline mode that reads no rows is counted as queued (no round trip of its
    own), one that reads rows is not, except a read prefetched with an earlier read of its batch; a
    BEGIN queued with a pipelined transaction's first statements is counted, and a transaction
    committed in pipeline mode is counted as such (leaving it then costs nothing). Nothing of that on SQLite, or outside a
    pipeline."""
    from sqlalchemy import func, insert, select, update

    from bench.servers import QueryCounter
    from entitlement.storage import direct
    from entitlement.storage.models import LogHead, LogNode

    counter = QueryCounter(db)
    bump = update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1).returning(LogHead.size)
    nodes = select(func.count()).select_from(LogNode)
    with db.write() as s:  # outside a pipeline: nothing queued
        st = direct.of(s)
        st.execute(insert(LogNode), {"level": 0, "idx": 0, "hash": b"\0" * 32})
        st.first(bump)
    with db.write() as s:
        st = direct.of(s)
        st.pipeline()
        st.prefetch((nodes, {}), (bump, {}))  # one round trip, with BEGIN: the second read joins it
        st.first(nodes, {})
        st.first(bump, {})
        st.execute(insert(LogNode), {"level": 0, "idx": 1, "hash": b"\1" * 32})  # queued
        st.first(bump)  # reads: a round trip
        assert st.changed(update(LogHead).where(LogHead.id == 1).values(size=LogHead.size)) == 1  # waits: a round trip
        st.execute_many(insert(LogNode), [{"level": 0, "idx": i, "hash": bytes([i]) * 32} for i in (2, 3)])  # queued
    counts = counter.snapshot()
    pg = not db.is_sqlite
    assert counts["statements"] >= 8 and counts["transactions"] == 2
    assert (counts["queued"], counts["pipelines"], counts["begins_joined"]) == ((3, 1, 1) if pg else (0, 0, 0))


def test_the_databases_cpu_is_read_from_its_processes(pg_server: str) -> None:
    """bench.load.postgres_cpu_seconds, which the "other cores" column leaves out on PostgreSQL:
    a query that keeps a backend busy shows in it."""
    import time

    import psycopg

    from bench.load import postgres_cpu, postgres_cpu_between

    with psycopg.connect(pg_server) as conn:
        before = postgres_cpu()
        started = time.process_time()
        conn.execute("SELECT count(*) FROM generate_series(1, 5000000)").fetchone()  # the backend's work
        after = postgres_cpu()
    assert time.process_time() - started < 0.2  # (this process only waited)
    assert postgres_cpu_between(before, after) >= 0.2, (before, after)
    # A backend that ended between the readings is left out, not counted negative.
    gone = {pid + 10**7: cpu + 100.0 for pid, cpu in before.items()}
    assert 0.2 <= postgres_cpu_between({**before, **gone}, after) == postgres_cpu_between(before, after)


def test_the_benchmarks_derive_database_urls_that_keep_the_servers_address() -> None:
    """BENCH_PG_URL names a server and an admin database; each run's own database must be reached
    the same way: user, password, host, port, and a query (PostgreSQL's Unix socket:
    `?host=/var/run/postgresql`), which cutting the URL at its last "/" lost."""
    from sqlalchemy.engine import make_url

    from bench.common import pg_database, pg_url
    assert pg_url("postgresql://u:secret@db.example:5433/test", "run_1") == "postgresql://u:secret@db.example:5433/run_1"
    socket_url = pg_url("postgresql://postgres@/test?host=/var/run/postgresql", "run_2")
    assert pg_database(socket_url) == "run_2"
    assert dict(make_url(socket_url).query) == {"host": "/var/run/postgresql"}
    if not Path("/var/run/postgresql/.s.PGSQL.5432").exists():
        pytest.skip("no PostgreSQL Unix socket here to connect through (the URLs above were checked)")
    with psycopg.connect(pg_url("postgresql://postgres@/postgres?host=/var/run/postgresql", "test")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("test",)


def test_a_partial_run_can_set_the_open_loop_rate(tmp_path: Path) -> None:
    """BENCH_OPEN_RATE (two versions compared at one rate): every open-loop case runs at that rate,
    and the run says its p99 verdicts are at it; a full run (which writes BENCHMARKS.md, whose p99
    target is at half the best rate) refuses it."""
    js = tmp_path / "rpcs.json"
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_RPCS": "CheckEligibility", "BENCH_BACKENDS": "sqlite",
           "BENCH_OPEN_RATE": "70", "BENCH_SCALING": "0", "BENCH_PINNING": "0", "BENCH_OUTPUT": "-",
           "BENCH_JSON": str(js)}
    proc = subprocess.run([sys.executable, "-m", "bench.rpcs"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    opened = [r for r in json.loads(js.read_text())["results"] if r["rate"]]
    assert {r["method"] for r in opened} == {"CheckEligibility", "Echo"}
    assert all(r["rate"] == 70 for r in opened), [r["rate"] for r in opened]
    assert "every open-loop case ran at 70 calls a second" in proc.stdout + proc.stderr
    full = subprocess.run([sys.executable, "-m", "bench.rpcs"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "BENCH_OPEN_RATE": "70", "BENCH_OUTPUT": "-"})
    assert full.returncode != 0 and "BENCH_OPEN_RATE" in full.stderr + full.stdout


def test_the_p99_without_its_worst_tenth_of_a_second_tells_a_stall_from_spread_latency() -> None:
    from bench.report import p99_without_worst
    steady = [(i / 1000, 1.0 + (i % 7) / 10) for i in range(2000)]  # 2 s at 1,000 calls a second
    # A 50 ms stall: the calls due in it answered 30 ms late; p99 30 ms, and 1.6 ms once it is left out.
    stall = [(due, 30.0 if 0.8 <= due < 0.85 else latency) for due, latency in steady]
    assert p99_without_worst(stall, 10.0, 0.1) == 1.6
    # As many slow calls spread over the window: leaving a tenth of a second out changes nothing.
    spread = [(due, 30.0 if i % 40 == 0 else latency) for i, (due, latency) in enumerate(steady)]
    assert p99_without_worst(spread, 10.0, 0.1) == 30.0
    # Nothing that slow: nothing left out.
    assert p99_without_worst(steady, 10.0, 0.1) == 1.6
    assert p99_without_worst([], 10.0, 0.1) == 0.0
