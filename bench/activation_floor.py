"""What an activation's storage work alone costs, and what part of ActivateEntitlement is what
(`python -m bench.activation_floor`; issue #8: ActivateEntitlement >= 0.25 x echo on SQLite,
>= 0.15 x echo on PostgreSQL).

1. Capture: a series of activations of distinct people runs in-process through the real servicer
   (ActivationServicer.ActivateEntitlement on the real Context, SystemClock), with SQLAlchemy's
   `before_cursor_execute` / `commit` / pool `reset` events on the server's engines recording the
   exact statements, parameters and transaction ends each activation sends.
2. Floor: those statements are replayed through the raw DBAPI connection (sqlite3 / psycopg),
   with nothing of SQLAlchemy in the loop, on a clone of the database taken before the capture
   (so every key the capture wrote is fresh there, and the log's sequence numbers, Merkle nodes
   and counters come out the same). The connection is opened by the service's own Database, so
   durability and session settings are the service's: SQLite WAL with `synchronous=FULL`,
   foreign keys on, `BEGIN IMMEDIATE`; PostgreSQL READ COMMITTED with the server's
   `synchronous_commit` (reported). On PostgreSQL the statements the service pipelines are sent
   as it sends them, on libpq itself (`_RawPipeline`: PREPAREd once, then by name), the others
   through a psycopg cursor.
3. The full path in-process (no gRPC), on another clone, the same series: wall and CPU per
   activation, and a cProfile breakdown (CPU timer) into buckets.
4. The parts every activation needs, each on its own in a child process (token signing, Merkle
   hashing, rules, protobuf conversion, the access log line), timed natively (CPU time); and the
   same work served by the real server (server.py, the backend's production model) on a clone,
   1 then 8 calls in flight: the server process's CPU per activation. The budget is a server's
   CPU time, so these, not instruction counts, say what fits in it.
5. Under valgrind (stable figures on a shared machine): instructions per call of the echo server,
   of the real gRPC server (server.py) answering ActivateEntitlement, of the in-process servicer
   call, of the raw replay, and of the same parts. Instructions compare Python paths with each
   other; they weigh compute-bound parts (the Ed25519 signature) far above gRPC's call, whose CPU
   is largely the kernel's, which valgrind does not count.
6. The budget the targets imply, from an echo server measured in this run (closed loop, c=8, as
   bench.rpcs), and the conclusion, both printed and written to BENCHMARKS.md (section
   "activation-floor").

Settings: BENCH_FLOOR_ACTIVATIONS (measured activations per run, default 200),
BENCH_FLOOR_WARMUP (unmeasured ones before them, 20), BENCH_FLOOR_ROUNDS (replay / in-process
runs alternated, 3), BENCH_FLOOR_VG_ACTIVATIONS (measured under valgrind, 60; 0 skips valgrind),
BENCH_FLOOR_ECHO_SECONDS (3), BENCH_BACKENDS, BENCH_PG_URL, BENCH_OUTPUT (`-`: print only).
"""

from __future__ import annotations

import base64
import cProfile
import datetime as dt
import json
import os
import pickle
import platform
import pstats
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg

from bench.common import pg_database, pg_url, say
from bench.prepare import Common, prepare_common
from bench.procs import commit, loadavg, machine, stop_process, usable_backends

ADVISOR = "bench-advisor"
PROGRAM_NAME = "programs/premium-job-seekers"
PLATFORM_NAME = "platforms/openclassrooms"
TARGET = {"sqlite": 0.25, "postgres": 0.15}
SERVED_CONCURRENCY = (1, 8)  # calls in flight of served_cpu's batches
SERVED_WARMUP = 60  # unmeasured activations served first (at the highest concurrency)
ECHO_PAYLOAD = b"x" * 80


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise SystemExit(f"{name} must not be negative")
    return value


@dataclass(frozen=True)
class FloorConfig:
    measured: int
    warmup: int
    rounds: int
    vg_measured: int
    echo_seconds: float
    backends: tuple[str, ...]
    pg_admin_url: str
    output: Path | None

    @classmethod
    def from_env(cls) -> FloorConfig:
        from entitlement.config import ROOT
        out = os.environ.get("BENCH_OUTPUT", "").strip()
        backends = tuple(b.strip() for b in os.environ.get("BENCH_BACKENDS", "sqlite,postgres").split(",") if b.strip())
        if set(backends) - {"sqlite", "postgres"}:
            raise SystemExit(f"BENCH_BACKENDS: unknown backend(s) in {backends}")
        return cls(measured=max(1, _int("BENCH_FLOOR_ACTIVATIONS", 200)), warmup=_int("BENCH_FLOOR_WARMUP", 20),
                   rounds=max(1, _int("BENCH_FLOOR_ROUNDS", 3)), vg_measured=_int("BENCH_FLOOR_VG_ACTIVATIONS", 60),
                   echo_seconds=float(os.environ.get("BENCH_FLOOR_ECHO_SECONDS", "") or 3),
                   backends=backends,
                   pg_admin_url=os.environ.get("BENCH_PG_URL", "").strip() or "postgresql://postgres@127.0.0.1:5432/test",
                   output=None if out == "-" else Path(out) if out else ROOT / "BENCHMARKS.md")


# ------------------------------------------------------------------------------ databases, clones

@dataclass
class Store:
    """One backend's database at the state every run starts from (migrated, registry imported, a
    first activation made), and clones of it."""

    backend: str
    url: str
    tmp: Path
    admin_url: str
    clones: list[str] = field(default_factory=list)

    def clone(self) -> str:
        if self.backend == "sqlite":
            path = self.tmp / f"clone-{uuid.uuid4().hex[:8]}.db"
            src, dst = sqlite3.connect(self.url.removeprefix("sqlite:///")), sqlite3.connect(path)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
            url = f"sqlite:///{path}"
        else:
            base = pg_database(self.url)
            name = f"floor_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{base}"')
            url = pg_url(self.url, name)
        self.clones.append(url)
        return url

    def drop(self, url: str) -> None:
        if self.backend == "sqlite":
            path = Path(url.removeprefix("sqlite:///"))
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                p.unlink(missing_ok=True)
        else:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_database(url)}" WITH (FORCE)')
        if url in self.clones:
            self.clones.remove(url)

    def drop_all(self) -> None:
        for url in list(self.clones):
            self.drop(url)


@contextmanager
def base_database(backend: str, tmp: Path, admin_url: str) -> Iterator[Store]:
    if backend == "sqlite":
        store = Store(backend, f"sqlite:///{tmp / 'base.db'}", tmp, admin_url)
        try:
            yield store
        finally:
            store.drop_all()
        return
    name = f"floor_base_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    store = Store(backend, pg_url(admin_url, name), tmp, admin_url)
    try:
        yield store
    finally:
        store.drop_all()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings_for(url: str, common_paths: dict[str, str]) -> Any:
    from entitlement.config import ROOT, Settings
    return Settings(listen="127.0.0.1:0", database_url=url, programs_dir=ROOT / "programs",
                    callers_file=Path(common_paths["callers_file"]), key_dir=Path(common_paths["key_dir"]),
                    pseudonym_key_file=Path(common_paths["pseudonym_key_file"]), issuer="urn:entitlement:bench",
                    max_workers=16, processes=1, log_level="info", check_rate_per_min=0,
                    log_key_file=common_paths["log_key_file"])


def build_context(url: str, paths: dict[str, str]) -> Any:
    """The server's Context, as server.py builds it (SystemClock, the settings' pool and bounds)."""
    from entitlement import app
    return app.build(settings_for(url, paths))


def paths_of(common: Common) -> dict[str, str]:
    return {"callers_file": str(common.callers_file), "key_dir": str(common.key_dir),
            "pseudonym_key_file": str(common.pseudonym_key_file), "log_key_file": str(common.tmp / "log.key")}


# ---------------------------------------------------------------------------------------- calls

def advisor() -> Any:
    from bench.prepare import CALLERS
    return next(c for c in CALLERS if c.id == ADVISOR)


def requests_for(people: list[tuple[str, dt.date]], prefix: str = "floor") -> list[bytes]:
    from google.type import date_pb2

    from entitlement.v1 import activation_pb2, common_pb2
    out = []
    for i, (agency_id, birth) in enumerate(people):
        out.append(activation_pb2.ActivateEntitlementRequest(
            request_id=f"{prefix}-{i:06d}", program=PROGRAM_NAME, platform=PLATFORM_NAME, reason="bench floor",
            job_seeker=common_pb2.JobSeekerIdentity(agency_id=agency_id, birth_date=date_pb2.Date(
                year=birth.year, month=birth.month, day=birth.day))).SerializeToString())
    return out


class InProcess:
    """ActivateEntitlement through the real servicer, in this thread, as the caller's identity
    behaviour would leave it (the advisor bound); no gRPC, no access log."""

    def __init__(self, ctx: Any) -> None:
        from entitlement.api.identity import _caller
        from entitlement.api.servicers import ActivationServicer
        from entitlement.v1 import activation_pb2
        self.ctx = ctx
        self.servicer = ActivationServicer(ctx)
        self.parse = activation_pb2.ActivateEntitlementRequest.FromString
        _caller.set(advisor())

    def call(self, request: bytes) -> Any:
        return self.servicer.ActivateEntitlement(self.parse(request), None)


def eligible_people(ctx: Any, people: list[tuple[str, dt.date]], wanted: int) -> list[tuple[str, dt.date]]:
    from entitlement import eligibility
    found = []
    for agency_id, birth in people:
        result = eligibility.check(ctx, eligibility.JobSeeker(agency_id, birth), PROGRAM_NAME.split("/")[1], None)
        if result.decisions[0].eligible:
            found.append((agency_id, birth))
            if len(found) == wanted:
                return found
    raise SystemExit(f"bench.activation_floor: only {len(found)} eligible people of {len(people)}, {wanted} needed")


# -------------------------------------------------------------------------------------- capture

Op = tuple[str, str, Any]  # ("execute" | "executemany" | "commit" | "reset", statement, parameters)


def _frozen(params: Any) -> Any:
    """A copy of DBAPI parameters that outlives the call (and pickles: memoryviews become bytes)."""
    if isinstance(params, memoryview):
        return bytes(params)
    if isinstance(params, dict):
        return {k: _frozen(v) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(_frozen(p) for p in params)
    return params


@contextmanager
def capturing(db: Any) -> Iterator[list[Op]]:
    """Every DBAPI call the Database's engines make while the block runs, in order."""
    from sqlalchemy import event
    ops: list[Op] = []
    listeners: list[tuple[Any, str, Callable[..., None]]] = []

    def on_execute(conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool) -> None:
        # The write path's pipeline (PostgreSQL, entitlement/storage/direct.py): where the
        # transaction entered it, the replay enters it too.
        pgconn = getattr(conn.connection.driver_connection, "pgconn", None)
        if pgconn is not None and pgconn.pipeline_status and not any(k == "pipeline" for k, _s, _p in ops[last_end:]):
            ops.append(("pipeline", "", None))
        # SQLAlchemy's "insertmanyvalues" batches report executemany=True but are sent with
        # cursor.execute (one parameter set): a list of parameter sets is what executemany sends.
        many = executemany and isinstance(parameters, list)
        ops.append(("executemany" if many else "execute", statement, _frozen(parameters)))

    last_end = 0  # where the current transaction's ops start

    def on_commit(_conn: Any) -> None:
        nonlocal last_end
        ops.append(("commit", "", None))
        last_end = len(ops)

    def on_reset(*_a: Any) -> None:
        ops.append(("reset", "", None))

    for engine in (db.engine, db.reader):
        listeners.append((engine, "before_cursor_execute", on_execute))
        listeners.append((engine, "commit", on_commit))
        listeners.append((engine.pool, "reset", on_reset))
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    try:
        yield ops
    finally:
        for target, name, fn in listeners:
            event.remove(target, name, fn)


def outcome(url: str, paths: dict[str, str]) -> tuple[int, int, int]:
    """(events logged, activations, ledger entries) in a database: a run's visible result."""
    with raw_connection(url, paths) as conn:
        cur = conn.cursor()
        counts = []
        for sql in ("SELECT size FROM log_head WHERE id = 1", "SELECT count(*) FROM activations",
                    "SELECT count(*) FROM ledger_entries"):
            cur.execute(sql)
            counts.append(int(cur.fetchone()[0]))
        conn.rollback()
    return counts[0], counts[1], counts[2]


def capture(store: Store, paths: dict[str, str], requests: list[bytes]) -> tuple[list[list[Op]], tuple[int, int, int]]:
    """The DBAPI calls of each activation of the series, on a fresh clone, and the outcome."""
    url = store.clone()
    ctx = build_context(url, paths)
    try:
        runner = InProcess(ctx)
        # The program's counter row, known to this process before the first captured activation
        # (the service checks it once per program and process, in a transaction of its own:
        # entitlement/counters.py ensure_row), so that each activation's capture is one transaction.
        from entitlement import counters
        counters.ensure_row(ctx.db, PROGRAM_NAME.split("/")[1])
        series = []
        for req in requests:
            with capturing(ctx.db) as ops:
                runner.call(req)
            series.append(ops)
        ctx.db.dispose()
        return series, outcome(url, paths)
    finally:
        ctx.db.dispose()
        store.drop(url)


def check_outcome(url: str, paths: dict[str, str], expected: tuple[int, int, int], what: str) -> None:
    """A run must leave what the captured one left (the replay really wrote every row)."""
    got = outcome(url, paths)
    if got != expected:
        raise SystemExit(f"bench.activation_floor: {what} left (events, activations, ledger entries) = {got}, "
                         f"the captured run {expected}")


def summarize_ops(series: list[list[Op]]) -> dict[str, Any]:
    per = [ops for ops in series]
    statements = [sum(1 for k, _s, _p in ops if k in ("execute", "executemany")) for ops in per]
    commits = [sum(1 for k, _s, _p in ops if k == "commit") for ops in per]
    kinds: dict[str, int] = {}
    for ops in per:
        for k, s, _p in ops:
            if k in ("execute", "executemany"):
                head = " ".join(s.split()[:3])[:48]
                kinds[head] = kinds.get(head, 0) + 1
    return {"statements": statistics.mean(statements), "commits": statistics.mean(commits),
            "kinds": {k: v / len(per) for k, v in kinds.items()}}


# ----------------------------------------------------------------------------------- raw replay

@contextmanager
def raw_connection(url: str, paths: dict[str, str]) -> Iterator[Any]:
    """The DBAPI connection exactly as the service opens it (its Database: same connect arguments,
    PRAGMAs, psycopg set-up), handed over raw."""
    from entitlement.storage.db import Database
    s = settings_for(url, paths)
    db = Database(s.database_url, pool_size=2, lock_timeout_ms=s.db_lock_timeout_ms,
                  statement_timeout_ms=s.db_statement_timeout_ms, connect_timeout_s=s.db_connect_timeout_s)
    fairy = db.engine.raw_connection()
    try:
        yield fairy.driver_connection
    finally:
        fairy.close()
        db.dispose()


def replay_one(conn: Any, ops: list[Op]) -> None:
    cur = conn.cursor()
    wire: _RawPipeline | None = None
    for kind, statement, params in ops:
        if kind in ("execute", "executemany") and wire is not None:
            for row in (params if kind == "executemany" else [params]):
                wire.send(statement, row)
            # In a pipeline a result is known only once fetched: a statement reading rows is waited
            # for (what the service does), one that does not stays queued.
            if statement.lstrip()[:6].upper() == "SELECT" or " RETURNING " in statement:
                wire.read()
        elif kind == "execute":
            cur.execute(statement, params)
            if cur.description is not None:
                cur.fetchall()
        elif kind == "executemany":
            cur.executemany(statement, params)
        elif kind == "pipeline":  # as the service: queued until a read or the COMMIT
            wire = _RawPipeline.of(conn)
            wire.enter()
        elif kind == "commit":
            if wire is not None:
                wire.commit()
                wire = None
            else:
                conn.commit()
        else:  # the pool's reset on return: a rollback, a no-op after a commit
            conn.rollback()
    cur.close()


class _RawPipeline:
    """The pipelined part of a replayed transaction (PostgreSQL), sent as the service sends it
    (entitlement/storage/direct.py) with nothing around libpq: each statement PREPAREd on its first
    use on the connection, then sent by name, its values dumped by psycopg's adapters; the BEGIN
    sent without waiting; a read flushes the queue and waits; the COMMIT goes with a Sync."""

    _of: dict[int, _RawPipeline] = {}

    def __init__(self, conn: Any) -> None:
        from psycopg.adapt import Transformer
        self.conn, self.pgconn = conn, conn.pgconn
        self.tx = Transformer(conn)
        self.names: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self.texts: dict[str, tuple[bytes, tuple[str, ...]]] = {}
        self.pending = 0  # statements (and PREPAREs) sent whose results are not read yet

    @classmethod
    def of(cls, conn: Any) -> _RawPipeline:
        wire = cls._of.get(id(conn))
        if wire is None or wire.conn is not conn:
            wire = cls._of[id(conn)] = cls(conn)
        return wire

    def enter(self) -> None:
        from psycopg import pq
        pg = self.pgconn
        pg.enter_pipeline_mode()
        if pg.transaction_status == pq.TransactionStatus.IDLE:
            pg.send_query_params(b"BEGIN", None)
            self.pending += 1

    def send(self, statement: str, params: dict[str, Any]) -> None:
        from psycopg.adapt import PyFormat

        from entitlement.storage.hotread import numbered
        text = self.texts.get(statement)
        if text is None:
            text = self.texts[statement] = numbered(statement)
        sql, order = text
        tx, pg = self.tx, self.pgconn
        values = tx.dump_sequence([params[n] for n in order], [PyFormat.AUTO] * len(order)) if order else None
        key = (statement, tuple(tx.types or ()) if order else ())
        name = self.names.get(key)
        if name is None:
            name = self.names[key] = f"r_{len(self.names)}".encode()
            pg.send_prepare(name, sql, key[1] or None)
            self.pending += 1
        pg.send_query_prepared(name, values, param_formats=tx.formats if order else None)
        self.pending += 1
        pg.flush()

    def read(self) -> list[tuple[Any, ...]]:
        """Every answer sent for, the last one's rows loaded."""
        pg = self.pgconn
        pg.send_flush_request()
        self._flush()
        last = None
        while self.pending:
            last = self._result()
            self.pending -= 1
        from entitlement.storage.hotread import loaded
        return [] if last is None else loaded(self.tx, last, one=False)

    def commit(self) -> None:
        from psycopg import pq
        pg = self.pgconn
        pg.send_query_params(b"COMMIT", None)
        self.pending += 1
        pg.pipeline_sync()
        self._flush()
        while self.pending:
            self._result()
            self.pending -= 1
        self._wait()
        sync = pg.get_result()
        if sync is None or sync.status != pq.ExecStatus.PIPELINE_SYNC:
            raise RuntimeError("replay: no Sync after the COMMIT")
        pg.exit_pipeline_mode()

    def _flush(self) -> None:
        import select
        while self.pgconn.flush():
            select.select([], [self.pgconn.socket], [])

    def _wait(self) -> None:
        import select
        pg = self.pgconn
        pg.consume_input()
        while pg.is_busy():
            select.select([pg.socket], [], [])
            pg.consume_input()

    def _result(self) -> Any:
        """One statement's result (and the end of its results)."""
        from psycopg import errors, pq
        self._wait()
        result = self.pgconn.get_result()
        if result.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.PIPELINE_ABORTED):
            raise errors.error_from_result(result, encoding=self.conn.info.encoding)
        self._wait()
        if self.pgconn.get_result() is not None:
            raise RuntimeError("replay: more than one result for a statement")
        return result


GROUP = 4  # activations per transaction in the grouped replay: the event-loop server's write threads


def grouped(series: list[list[Op]], size: int) -> list[list[Op]]:
    """The series as SQLite's group commit sends it when `size` writers queue behind one another
    (entitlement/storage/db.py `_Group`): one BEGIN IMMEDIATE and one COMMIT per `size` activations,
    each one after the first in a savepoint of its own."""
    out = []
    for i, ops in enumerate(series):
        first, last = i % size == 0, i % size == size - 1 or i == len(series) - 1
        kept: list[Op] = [] if first else [("execute", 'SAVEPOINT "sa_savepoint_1"', ())]
        kept += [(k, st, p) for k, st, p in ops if k not in ("commit", "reset")
                 and not (k == "execute" and st.startswith("BEGIN") and not first)]
        if not first:
            kept.append(("execute", 'RELEASE SAVEPOINT "sa_savepoint_1"', ()))
        if last:
            kept.append(("commit", "", None))
        out.append(kept)
    return out


def backend_pid(conn: Any) -> int | None:
    return int(conn.info.backend_pid) if hasattr(conn, "info") and hasattr(conn.info, "backend_pid") else None


def cpu_of(pids: list[int]) -> float:
    from bench.load import cpu_seconds
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def pg_backends(admin_url: str, url: str) -> list[int]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            (pg_database(url),)).fetchall()
    return [int(r[0]) for r in rows]


@dataclass
class Timing:
    """One run's measured activations: wall per activation, and CPU over all of them."""

    walls: list[float]
    client_cpu_s: float
    server_cpu_s: float  # PostgreSQL backends serving the run (0 on SQLite)

    @property
    def n(self) -> int:
        return len(self.walls)

    def per(self) -> dict[str, float]:
        n = self.n
        return {"wall_us": sum(self.walls) / n * 1e6, "wall_p50_us": statistics.median(self.walls) * 1e6,
                "client_cpu_us": self.client_cpu_s / n * 1e6, "server_cpu_us": self.server_cpu_s / n * 1e6,
                "cpu_us": (self.client_cpu_s + self.server_cpu_s) / n * 1e6}


def timed(items: list[Any], warmup: int, one: Callable[[Any], None], server_pids: Callable[[], list[int]]) -> Timing:
    for item in items[:warmup]:
        one(item)
    pids = server_pids()
    walls = []
    s0, c0 = cpu_of(pids), time.process_time()
    for item in items[warmup:]:
        t = time.perf_counter()
        one(item)
        walls.append(time.perf_counter() - t)
    c1, s1 = time.process_time(), cpu_of(pids)
    return Timing(walls, c1 - c0, s1 - s0)


def run_replay(store: Store, paths: dict[str, str], series: list[list[Op]], warmup: int,
               expected: tuple[int, int, int]) -> Timing:
    url = store.clone()
    try:
        with raw_connection(url, paths) as conn:
            pid = backend_pid(conn) if store.backend == "postgres" else None
            timing = timed(series, warmup, lambda ops: replay_one(conn, ops), lambda: [pid] if pid else [])
        check_outcome(url, paths, expected, "the raw replay")
        return timing
    finally:
        store.drop(url)


def run_inprocess(store: Store, paths: dict[str, str], requests: list[bytes], warmup: int,
                  expected: tuple[int, int, int], profile: cProfile.Profile | None = None) -> Timing:
    url = store.clone()
    ctx = build_context(url, paths)
    try:
        runner = InProcess(ctx)

        def servers() -> list[int]:
            return pg_backends(store.admin_url, url) if store.backend == "postgres" else []
        if profile is None:
            timing = timed(requests, warmup, runner.call, servers)
        else:
            for req in requests[:warmup]:
                runner.call(req)
            profile.enable()
            for req in requests[warmup:]:
                runner.call(req)
            profile.disable()
            timing = Timing([0.0], 0.0, 0.0)
        ctx.db.dispose()
        check_outcome(url, paths, expected, "the in-process run")
        return timing
    finally:
        ctx.db.dispose()
        store.drop(url)


# ------------------------------------------------------------------------------ profile buckets

SA, DBAPI, SIGN, HASH, RULES, PROTO, LOGGING, REST = (
    "SQLAlchemy ORM/Core", "raw DBAPI (driver + SQLite engine, or PG client)", "Ed25519 token signing (tokens.sign)",
    "hashing (Merkle log leaf and nodes)", "rules", "protobuf conversion", "logging", "rest (our code, stdlib)")
BUCKETS = (SA, DBAPI, SIGN, HASH, RULES, PROTO, LOGGING, REST)


def _path_bucket(path: str) -> str | None:
    p = path.replace("\\", "/")
    if "/sqlalchemy/" in p:
        return SA
    if "/psycopg/" in p or "/psycopg_binary/" in p or "/sqlite3/" in p:
        return DBAPI
    if "/jwt/" in p or "/cryptography/" in p or p.endswith("/entitlement/tokens.py"):
        return SIGN
    if p.endswith(("/entitlement/merkle.py", "/entitlement/logformat.py")):
        return HASH
    if p.endswith("/entitlement/rules.py"):
        return RULES
    if "/google/protobuf/" in p or p.endswith("/entitlement/api/convert.py"):
        return PROTO
    if "/structlog/" in p or "/logging/" in p:
        return LOGGING
    return None


def bucket_of(func: tuple[str, int, str]) -> str | None:
    """The bucket of a profiled function; None for a builtin, which goes to its callers' buckets
    (a sha256 call is hashing when the Merkle code makes it, signing when tokens.sign does)."""
    filename, _line, name = func
    if filename == "~":
        if "sqlite3." in name or "psycopg" in name:
            return DBAPI
        return None
    return _path_bucket(filename) or REST


def buckets(stats: pstats.Stats) -> dict[str, float]:
    """Seconds (of the profile's timer) per bucket, from each function's own time."""
    out = dict.fromkeys(BUCKETS, 0.0)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for func, (_cc, _nc, tt, _ct, callers) in raw.items():
        b = bucket_of(func)
        if b is not None:
            out[b] += tt
            continue
        shares = {c: v[2] for c, v in callers.items()} if callers else {}
        total = sum(shares.values())
        if not total:
            out[REST] += tt
            continue
        for caller, share in shares.items():
            out[bucket_of(caller) or REST] += tt * share / total
    return out


# ------------------------------------------------------------------------------------- valgrind

def have_valgrind() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


class Counted:
    """A child process stepping through named parts: it says `ready NAME ITEMS`, waits for `go`,
    does the part, says `done CPU_NS` (its own CPU over the part). Under callgrind (counting off
    but in between) each part yields its instructions; run natively (`valgrind=False`), its CPU
    time in nanoseconds."""

    def __init__(self, argv: list[str], out: Path, env: dict[str, str] | None = None, valgrind: bool = True) -> None:
        from entitlement.config import ROOT
        self.out = out
        self.log = out.with_suffix(".log")
        self.valgrind = valgrind
        prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"] if valgrind else []
        self.proc = subprocess.Popen(
            [*prefix, *argv],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "wb"),  # noqa: SIM115
            text=True, bufsize=1)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"counted child exited ({self.proc.wait()}):\n{tail}")
        return line.strip()

    def _callgrind(self, *args: str) -> None:
        if self.valgrind:
            subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True, capture_output=True)

    def parts(self) -> Iterator[tuple[str, int, int]]:
        """(part, items, instructions or CPU ns) for each part the child runs."""
        from bench.instructions import _totals
        while True:
            line = self._line()
            if line == "exit":
                self.proc.wait(timeout=120)
                return
            if not line.startswith("ready "):
                continue  # anything else the child printed
            _, name, items = line.split()
            for f in self.out.parent.glob(self.out.name + ".*"):
                f.unlink()
            self._callgrind("-i", "on")
            assert self.proc.stdin is not None
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            done = self._line().split()
            if not done or done[0] != "done":
                raise RuntimeError(f"counted child: no `done` after {name}")
            self._callgrind("-i", "off")
            self._callgrind("-d")
            yield name, int(items), _totals(self.out) if self.valgrind else int(done[1])

    def close(self) -> None:
        stop_process(self.proc)


def _part(name: str, items: int, work: Callable[[], None]) -> None:
    """Child side of Counted.parts."""
    print(f"ready {name} {items}", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("counted child: expected `go`")
    cpu = time.process_time_ns()
    work()
    print(f"done {time.process_time_ns() - cpu}", flush=True)


def child(job_file: str) -> int:
    """The counted child (`python -m bench.activation_floor --child JOB`)."""
    job = pickle.loads(Path(job_file).read_bytes())
    warm, n = job["warmup"], job["measured"]
    if job["mode"] == "replay":
        series = job["series"]
        with raw_connection(job["url"], job["paths"]) as conn:
            for ops in series[:warm]:
                replay_one(conn, ops)
            _part("replay", n, lambda: [replay_one(conn, ops) for ops in series[warm:warm + n]])
        print("exit", flush=True)
        return 0
    # In-process: the servicer call, then each part on its own.
    from entitlement import logs
    from entitlement.server_main import tune_gc
    logs.configure("info")  # as the server: JSON lines on stderr (the child's log file), loggers cached
    ctx = build_context(job["url"], job["paths"])
    tune_gc()
    runner = InProcess(ctx)
    requests = job["requests"]
    for req in requests[:warm]:
        runner.call(req)
    responses: list[Any] = []
    _part("activate", n, lambda: responses.extend(runner.call(req) for req in requests[warm:warm + n]))
    if job.get("components"):
        components(ctx, responses, job["people"][warm:warm + n])
    ctx.db.dispose()
    print("exit", flush=True)
    return 0


def components(ctx: Any, responses: list[Any], people: list[tuple[str, dt.date]]) -> None:
    """The parts of an activation measured alone, on the activations just made (their inputs
    rebuilt uncounted): signing, Merkle hashing, rules, protobuf conversion, the access log line."""
    from sqlalchemy import select

    from entitlement import activation, merkle, registry, rules, tokens
    from entitlement.activation import ActivationResult
    from entitlement.api import convert
    from entitlement.api.accesslog import AccessLogInterceptor
    from entitlement.logformat import LogEvent, time_us
    from entitlement.storage.models import Event

    n = len(responses)
    caller = advisor()
    claims = []
    for r in responses:
        body = r.activation_token.split(".")[1]
        c = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims.append(tokens.TokenClaims(issuer=c["iss"], platform_id=c["aud"], subject=c["sub"],
                                         program_id=c["program"], activation_id=c["entitlement"], jti=c["jti"],
                                         issued_at=c["iat"], not_before=c["nbf"], expires_at=c["exp"]))
    _part("sign", n, lambda: [tokens.sign(ctx.keys, c) for c in claims])
    private = ctx.keys.signer(ctx.clock.now()).private
    signing_inputs = [r.activation_token.rsplit(".", 1)[0].encode() for r in responses]
    _part("ed25519", n, lambda: [private.sign(m) for m in signing_inputs])  # the signature alone

    ids = [c.activation_id for c in claims]
    with ctx.db.read() as s:
        events = s.execute(select(Event).where(Event.subject.in_([f"activations/{i}" for i in ids]))).scalars().all()
        leaves = [LogEvent(e.seq, time_us(e.time), e.type, e.actor, e.subject, e.program_id or "", e.reason,
                           e.payload_json) for e in events]
        facts = [registry.lookup(s.connection(), ctx.pseudo.person_key(agency_id), birth)
                 for agency_id, birth in people]
    views = [activation.get(ctx, caller, i) for i in ids]
    program = ctx.catalog.get(views[0].program_id)
    sibling = b"\x00" * 32

    def hashing() -> None:
        for leaf in leaves:
            h = leaf.leaf_hash()
            for _ in range((~(leaf.seq - 1) & leaf.seq).bit_length() - 1):  # subtrees this leaf closes
                h = merkle.node_hash(sibling, h)
    _part("hash", n, hashing)

    today = ctx.clock.today()
    circumstances = [rules.Circumstances(registry_extracted_on=snap.extracted_on if snap else None, seats_used=0,
                                         cents_committed=0, mentor_id="", facts_source="snapshot")
                     for _f, snap in facts]
    _part("rules", n, lambda: [rules.evaluate(program, f, today, c) for (f, _s), c in zip(facts, circumstances)])
    results = [ActivationResult(v, r.activation_token) for v, r in zip(views, responses)]
    _part("proto", n, lambda: [convert.activation_response(x.activation, x.token) for x in results])

    class _Context:
        md = (("authorization", "Bearer " + "a" * 43),)

        def invocation_metadata(self) -> Any:
            return self.md

        def abort_with_status(self, status: Any) -> None:
            raise RuntimeError("unexpected abort")

    # Around nothing, as it wraps the unary ActivateEntitlement (`around_unary`).
    logged = AccessLogInterceptor().around_unary(lambda request, context: None,
                                                 "/entitlement.v1.ActivationService/ActivateEntitlement")
    context = _Context()

    def access_log() -> None:
        for _ in range(n):
            logged(None, context)
    _part("accesslog", n, access_log)


# ------------------------------------------------------------------------------- orchestration

def prepare_base(store: Store, common: Common, paths: dict[str, str], wanted: int) -> list[tuple[str, dt.date]]:
    """Migrate, import the synthetic registry (extracted yesterday, by the system clock the server
    uses), find `wanted` eligible people, and make two activations (the program's counter row
    exists from then on, as on any server that has served one). Returns the people after those two."""
    from entitlement import registry
    from entitlement.clock import SystemClock
    from entitlement.pseudonym import Pseudonymizer
    from entitlement.storage.db import Database
    from entitlement.storage.migrate import upgrade
    upgrade(store.url)
    clock = SystemClock(settings_for(store.url, paths).timezone)
    db = Database(store.url, pool_size=2)
    try:
        summary = registry.import_extract(db, Pseudonymizer.from_file(common.pseudonym_key_file), clock,
                                          common.extract, extracted_on=clock.today() - dt.timedelta(days=1))
    finally:
        db.dispose()
    if summary.rows_rejected:
        raise SystemExit(f"bench.activation_floor: {summary.rows_rejected} registry rows rejected")
    ctx = build_context(store.url, paths)
    try:
        people = eligible_people(ctx, common.people, wanted + 2)
        runner = InProcess(ctx)
        for req in requests_for(people[:2], prefix="base"):
            runner.call(req)
    finally:
        ctx.db.dispose()
    return people[2:]


def durability(store: Store, paths: dict[str, str]) -> str:
    """The settings the service's connections run with, read back from one of them."""
    url = store.clone()
    try:
        with raw_connection(url, paths) as conn:
            if store.backend == "sqlite":
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[conn.execute("PRAGMA synchronous").fetchone()[0]]
                fk = conn.execute("PRAGMA foreign_keys").fetchone()[0]
                return f"journal_mode={mode}, synchronous={sync}, foreign_keys={fk}, writes in BEGIN IMMEDIATE"
            cur = conn.cursor()
            values = []
            for name in ("synchronous_commit", "fsync", "wal_sync_method", "transaction_isolation"):
                cur.execute(f"SHOW {name}")
                values.append(f"{name}={cur.fetchone()[0]}")
            conn.rollback()
            return ", ".join(values)
    finally:
        store.drop(url)


@dataclass(frozen=True)
class Echo:
    """The echo floor as measured in this run."""

    windows: tuple[float, ...]  # req/s of each window
    server_cpu_us: float        # server process CPU per call (all windows)
    client_cpu_us: float        # load generator CPU per call
    instructions: int = 0       # per call, under valgrind (0: not counted)

    @property
    def rps(self) -> float:
        return statistics.mean(self.windows)


def measure_echo(cfg: FloorConfig, tmp: Path) -> Echo:
    """The sync echo server (bench/servers.py) under the bench's load generator, closed loop c=8
    over 16 channels, as bench.rpcs measures its floor: req/s, and CPU per call of both processes."""
    from bench.config import ECHO, SYNC_ECHO, LoadSpec, ServerSpec
    from bench.procs import Client, Server
    server = Server(ServerSpec(kind=SYNC_ECHO, workers=16, log_path=tmp / "logs" / "echo.log"))
    client = Client()
    try:
        windows, calls, srv, cli = [], 0, 0.0, 0.0
        for _ in range(2):
            m = client.ask("run", LoadSpec(port=server.port, server_pid=server.pid, method=ECHO,
                                           requests=(ECHO_PAYLOAD,), concurrency=8, warmup=0.5,
                                           seconds=cfg.echo_seconds, channels=16))
            if m["errors"]:
                raise SystemExit(f"bench.activation_floor: the echo server answered errors {m['errors']}")
            windows.append(m["calls"] / m["seconds"])
            calls, srv, cli = calls + m["calls"], srv + m["server_cpu_s"], cli + m["client_cpu_s"]
        return Echo(tuple(windows), srv / calls * 1e6, cli / calls * 1e6)
    finally:
        client.stop()
        server.stop()


def count_echo(tmp: Path, calls: int) -> int:
    """Instructions per echo call (bench.instructions' echo server and method)."""
    import grpc

    from bench.instructions import ECHO_METHOD, under_callgrind
    from bench.procs import free_port
    port = free_port()
    argv = [sys.executable, "-c", f"from bench.instructions import echo_server; echo_server({port})"]
    with under_callgrind(argv, dict(os.environ), port, tmp / "echo.cg") as count:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(ECHO_METHOD)
            md = (("authorization", "Bearer " + "a" * 43),)
            for _ in range(50):
                call(ECHO_PAYLOAD, metadata=md, timeout=120)
            total = count(lambda: [call(ECHO_PAYLOAD, metadata=md, timeout=120) for _ in range(calls)])
    return total // calls


def server_env(url: str, paths: dict[str, str], port: int, model: str) -> dict[str, str]:
    """server.py's environment for a run on `url`: one process on `port`, the access log on, the
    rate limiter off, in server model `model`."""
    return {**os.environ, "ENTITLEMENT_DATABASE_URL": url, "ENTITLEMENT_CALLERS_FILE": paths["callers_file"],
            "ENTITLEMENT_KEY_DIR": paths["key_dir"], "ENTITLEMENT_PSEUDONYM_KEY_FILE": paths["pseudonym_key_file"],
            "ENTITLEMENT_LOG_KEY_FILE": paths["log_key_file"], "ENTITLEMENT_CHECK_RATE_PER_MIN": "0",
            "ENTITLEMENT_PROCESSES": "1", "ENTITLEMENT_LOG_LEVEL": "info",
            "ENTITLEMENT_ISSUER": "urn:entitlement:bench", "ENTITLEMENT_LISTEN": f"127.0.0.1:{port}",
            "ENTITLEMENT_SERVER_MODEL": model}


def count_grpc(store: Store, common: Common, paths: dict[str, str], requests: list[bytes], warmup: int,
               n: int) -> int:
    """Instructions per ActivateEntitlement answered by the real server (server.py, as in
    production) on a clone, the same series (the first `warmup` unmeasured)."""
    import grpc

    from bench.instructions import under_callgrind
    from bench.procs import free_port
    from entitlement.config import ROOT
    url = store.clone()
    port = free_port()
    # The thread-pool model, whose floor is the echo this section divides by (bench.instructions'
    # echo_server default); SQLite's production default is the event loop, which runs an
    # activation's write on its loop when it need not wait (README "Server models"):
    # bench.instructions counts both models.
    env = server_env(url, paths, port, "threads")
    try:
        with under_callgrind([sys.executable, str(ROOT / "server.py")], env, port, store.tmp / "grpc.cg") as count:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary("/entitlement.v1.ActivationService/ActivateEntitlement")
                md = (("authorization", f"Bearer {common.tokens[ADVISOR]}"),)
                for req in requests[:warmup]:
                    call(req, metadata=md, timeout=300)
                total = count(lambda: [call(req, metadata=md, timeout=300) for req in requests[warmup:warmup + n]])
        return total // n
    finally:
        store.drop(url)


def count_children(store: Store, paths: dict[str, str], series: list[list[Op]], requests: list[bytes],
                   people: list[tuple[str, dt.date]], warmup: int, n: int, components: bool,
                   valgrind: bool = True) -> dict[str, float]:
    """Per item of each part run in a child process (replay, servicer call, components):
    instructions under valgrind, or (`valgrind=False`) CPU us natively."""
    out: dict[str, float] = {}
    jobs = [{"mode": "replay", "series": series[:warmup + n]},
            {"mode": "inprocess", "requests": requests[:warmup + n], "people": people[:warmup + n],
             "components": components}]
    for job in jobs:
        url = store.clone()
        job_file = store.tmp / f"job-{job['mode']}.pickle"
        job_file.write_bytes(pickle.dumps({**job, "url": url, "paths": paths, "warmup": warmup, "measured": n}))
        counted = Counted([sys.executable, "-m", "bench.activation_floor", "--child", str(job_file)],
                          store.tmp / f"{job['mode']}.cg", valgrind=valgrind)
        try:
            for name, items, total in counted.parts():
                if valgrind:
                    out[name] = total // items
                    say(f"  {store.backend}: {name}: {total // items:,} instructions per activation")
                else:
                    out[name] = total / items / 1000
                    say(f"  {store.backend}: {name}: {total / items / 1000:,.1f} us of CPU per activation (native)")
        finally:
            counted.close()
            store.drop(url)
    return out


def served_cpu(store: Store, common: Common, paths: dict[str, str], batches: list[list[bytes]],
               warmup: list[bytes]) -> list[dict[str, float]]:
    """ActivateEntitlement answered by the real server (server.py, the backend's production model,
    access log on) on a clone, `warmup` first (at the highest concurrency); then each batch with SERVED_CONCURRENCY's calls in
    flight (threads of a sync gRPC client in this process): the server process's CPU per
    activation (utime + stime, all its threads) and the wall time per activation."""
    import grpc

    from bench.procs import free_port
    from bench.rpcs import backend_model
    from entitlement.config import ROOT
    url = store.clone()
    port = free_port()
    env = server_env(url, paths, port, backend_model("auto", store.backend))
    log = open(store.tmp / "served.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        f = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            call = ch.unary_unary("/entitlement.v1.ActivationService/ActivateEntitlement")
            md = (("authorization", f"Bearer {common.tokens[ADVISOR]}"),)

            def send_all(batch: list[bytes], conc: int) -> None:
                it = iter(batch)
                lock = threading.Lock()
                failed: list[BaseException] = []

                def send() -> None:
                    while not failed:
                        with lock:
                            req = next(it, None)
                        if req is None:
                            return
                        try:
                            call(req, metadata=md, timeout=60)
                        except BaseException as exc:  # noqa: BLE001 - reported by send_all
                            failed.append(exc)
                threads = [threading.Thread(target=send) for _ in range(conc)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if failed:
                    raise RuntimeError(f"bench.activation_floor: a served activation failed: {failed[0]!r}")
            # At the highest concurrency: every pool thread and its database connection warmed (on
            # PostgreSQL, the write path prepares its statements on a connection at their first use).
            send_all(warmup, max(SERVED_CONCURRENCY))
            out = []
            for conc, batch in zip(SERVED_CONCURRENCY, batches):
                cpu, wall = cpu_s(), time.perf_counter()
                send_all(batch, conc)
                wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
                out.append({"concurrency": conc, "calls": len(batch), "cpu_us": cpu / len(batch) * 1e6,
                            "wall_us": wall / len(batch) * 1e6})
                say(f"  {store.backend}: served, {conc} in flight: {len(batch) / wall:,.0f} activations/s, "
                    f"server CPU {cpu / len(batch) * 1e6:,.0f} us per activation")
        return out
    finally:
        stop_process(proc)
        log.close()
        store.drop(url)


@dataclass
class BackendResult:
    backend: str
    durability: str
    ops: dict[str, Any]
    replay: list[dict[str, float]]
    inprocess: list[dict[str, float]]
    profile: dict[str, float]          # CPU seconds per bucket over the profiled activations
    profiled: int
    instructions: dict[str, int] = field(default_factory=dict)
    statements: list[str] = field(default_factory=list)
    grouped: list[dict[str, float]] = field(default_factory=list)  # SQLite: GROUP activations per commit
    served: list[dict[str, Any]] = field(default_factory=list)  # served_cpu's, per concurrency (medians of the rounds)
    timed: dict[str, float] = field(default_factory=dict)  # CPU us per item of each child part, natively


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure_backend(cfg: FloorConfig, backend: str, common: Common, paths: dict[str, str], tmp: Path) -> BackendResult:
    n_series = cfg.warmup + cfg.measured
    (tmp / backend).mkdir(exist_ok=True)
    with base_database(backend, tmp / backend, cfg.pg_admin_url) as store:
        say(f"{backend}: preparing (migrate, {len(common.people):,} registry rows, eligible people)")
        per_round = SERVED_WARMUP + len(SERVED_CONCURRENCY) * cfg.measured  # people each round's served run takes
        people = prepare_base(store, common, paths, n_series + cfg.rounds * per_round)
        served_requests = requests_for(people[n_series:], prefix="served")
        people = people[:n_series]
        requests = requests_for(people)
        say(f"{backend}: capturing the DBAPI calls of {n_series} activations")
        series, expected = capture(store, paths, requests)
        ops = summarize_ops(series[cfg.warmup:])
        statements = [" ".join(s.split())[:90] for k, s, _p in series[-1] if k in ("execute", "executemany")]
        say(f"{backend}: {ops['statements']:.1f} statements, {ops['commits']:.1f} commits per activation")
        settings = durability(store, paths)
        say(f"{backend}: {settings}")
        replays, inproc, groups, served_rounds = [], [], [], []
        for r in range(cfg.rounds):
            replays.append(run_replay(store, paths, series, cfg.warmup, expected).per())
            if backend == "sqlite":  # group commit is SQLite's (PostgreSQL writers run side by side)
                groups.append(run_replay(store, paths, grouped(series, GROUP), cfg.warmup, expected).per())
            inproc.append(run_inprocess(store, paths, requests, cfg.warmup, expected).per())
            say(f"{backend}: round {r + 1}: raw replay {replays[-1]['wall_us']:,.0f} us wall, "
                f"{replays[-1]['cpu_us']:,.0f} us CPU" + (
                    f" ({GROUP} per commit: {groups[-1]['wall_us']:,.0f} us wall, {groups[-1]['cpu_us']:,.0f} us CPU)"
                    if groups else "") + f"; in-process {inproc[-1]['wall_us']:,.0f} us wall, "
                f"{inproc[-1]['cpu_us']:,.0f} us CPU per activation")
            # The same work served by server.py, in the same round (fresh people: its own slice).
            mine = served_requests[r * per_round:(r + 1) * per_round]
            served_rounds.append(served_cpu(store, common, paths, [
                mine[SERVED_WARMUP + i * cfg.measured:SERVED_WARMUP + (i + 1) * cfg.measured]
                for i in range(len(SERVED_CONCURRENCY))], mine[:SERVED_WARMUP]))
        served = [{"concurrency": conc, "calls": cfg.measured,
                   "cpu_us": statistics.median(rnd[i]["cpu_us"] for rnd in served_rounds),
                   "wall_us": statistics.median(rnd[i]["wall_us"] for rnd in served_rounds),
                   "rounds_cpu_us": [rnd[i]["cpu_us"] for rnd in served_rounds]}
                  for i, conc in enumerate(SERVED_CONCURRENCY)]
        say(f"{backend}: the parts alone, natively (CPU time)")
        timed = count_children(store, paths, series, requests, people, cfg.warmup, cfg.measured,
                               components=True, valgrind=False)
        prof = cProfile.Profile(time.thread_time)
        run_inprocess(store, paths, requests, cfg.warmup, expected, prof)
        profile = buckets(pstats.Stats(prof))
        result = BackendResult(backend, settings, ops, replays, inproc, profile, cfg.measured, statements=statements,
                               grouped=groups, served=served, timed=timed)
        if cfg.vg_measured and have_valgrind():
            n = min(cfg.vg_measured, cfg.measured)
            say(f"{backend}: counting instructions under valgrind ({n} activations)")
            result.instructions = {k: int(v) for k, v in count_children(
                store, paths, series, requests, people, cfg.warmup, n, components=backend == "sqlite").items()}
            result.instructions["grpc"] = count_grpc(store, common, paths, requests, cfg.warmup, n)
            say(f"  {backend}: gRPC ActivateEntitlement: {result.instructions['grpc']:,} instructions per call")
        return result


def main() -> int:
    cfg = FloorConfig.from_env()
    started, load_before = time.time(), loadavg()
    backends, skipped, version = usable_backends(list(cfg.backends), cfg.pg_admin_url, "bench.activation_floor")
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as d:
        tmp = Path(d)
        common = prepare_common(tmp, max(1000, 4 * (cfg.warmup + cfg.measured + 2 + cfg.rounds * (
            SERVED_WARMUP + len(SERVED_CONCURRENCY) * cfg.measured))))
        paths = paths_of(common)
        say(f"echo: measuring req/s (c=8, {cfg.echo_seconds:g} s, twice)")
        echo = measure_echo(cfg, tmp)
        say("echo: " + ", ".join(f"{r:,.0f}" for r in echo.windows) + f" req/s; server {echo.server_cpu_us:.0f} us, "
            f"load generator {echo.client_cpu_us:.0f} us CPU per call")
        if cfg.vg_measured and have_valgrind():
            echo = replace(echo, instructions=count_echo(tmp, max(50, 3 * cfg.vg_measured)))
            say(f"echo: {echo.instructions:,} instructions per call")
        results = [measure_backend(cfg, b, common, paths, tmp) for b in backends]
        # The parts measured alone do not depend on the backend: counted once (SQLite run), shown for both.
        alone = next((r.instructions for r in results if "sign" in r.instructions), {})
        for r in results:
            if r.instructions and "sign" not in r.instructions:
                r.instructions.update({k: v for k, v in alone.items() if k not in ("replay", "activate", "grpc")})
    text = report(cfg, results, echo, time.time() - started, load_before, skipped, version)
    say(text)
    if os.environ.get("BENCH_JSON"):
        Path(os.environ["BENCH_JSON"]).write_text(json.dumps({
            "echo": {"rps": echo.rps, "windows": echo.windows, "server_cpu_us": echo.server_cpu_us,
                     "client_cpu_us": echo.client_cpu_us, "instructions": echo.instructions},
            "backends": [{"backend": r.backend, "ops": r.ops, "replay": r.replay, "inprocess": r.inprocess, "grouped": r.grouped,
                          "profile_us": {k: v / r.profiled * 1e6 for k, v in r.profile.items()},
                          "instructions": r.instructions, "durability": r.durability, "served": r.served,
                          "cpu_us": r.timed} for r in results]},
            indent=1))
    if cfg.output is not None:
        from bench.sections import replace_section
        replace_section(cfg.output, "activation-floor", text)
    return 0


# ---------------------------------------------------------------------------------------- report

def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def report(cfg: FloorConfig, results: list[BackendResult], echo: Echo, seconds: float, load_before: str,
           skipped: str, pg_ver: str) -> str:
    cpu, mem = machine()
    lines = [
        "## What an activation costs, part by part, against the budget (`python -m bench.activation_floor`)",
        "",
        f"- Run on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {commit()}, Python {platform.python_version()}, "
        f"`nproc` = {os.cpu_count()} ({cpu}), {mem:.0f} GiB, load average {load_before} at the start, {loadavg()} at the "
        f"end; {seconds:.0f} s in all." + (f" PostgreSQL {pg_ver}." if pg_ver else "") + (f" ({skipped})" if skipped else ""),
        f"- Series: {cfg.warmup} unmeasured then {cfg.measured} measured activations of distinct eligible people "
        "(premium-job-seekers: no cap; each with a request id), SystemClock, synthetic registry, every run on a fresh "
        f"clone of the same database state. Timed figures: medians of {cfg.rounds} alternated runs (this shared 2-core "
        "machine swings by a third); instruction counts (valgrind) are the stable ones.",
        "- **Raw replay (the floor)**: the exact statements and parameters one real ActivateEntitlement sends, captured "
        "with SQLAlchemy's `before_cursor_execute` / `commit` / pool `reset` events on the server's engines while the "
        "real servicer ran the series, replayed through the raw DBAPI connection (`sqlite3` / `psycopg`, opened by the "
        "service's own Database: same PRAGMAs, connect options, transaction boundaries, durability; one cursor per "
        "transaction, every result read; on PostgreSQL, from the statement where the service entered pipeline mode on, "
        "sent as the service sends them: on libpq itself, each statement PREPAREd once per connection then sent by "
        "name, writes queued until a read or the COMMIT): zero ORM, zero Python logic. CPU: this process (`process_time`) plus, on "
        "PostgreSQL, the backend serving the connection (`/proc/<pid>/stat`; WAL writer and checkpointer not counted).",
        f"- **Grouped replay** (SQLite): the same statements, {GROUP} activations per transaction, each one after the "
        "first in a savepoint of its own: what the service's group commit sends when that many writers queue behind "
        "one another (entitlement/storage/db.py `_Group`; the event-loop server writes on 4 threads). A lone "
        "writer commits alone, as in the raw replay.",
        "- **In-process**: `ActivationServicer.ActivateEntitlement` called directly (the advisor bound as the identity "
        "behaviour binds it): everything an activation does but gRPC, authentication and the access log.",
        f"- **Echo**, this run: {echo.rps:,.0f} req/s (sync echo server of bench/servers.py, bench.load closed loop c=8, "
        f"16 channels, windows of {cfg.echo_seconds:g} s: " + ", ".join(f"{r:,.0f}" for r in echo.windows)
        + f"), its server process {echo.server_cpu_us:.0f} us and the load generator {echo.client_cpu_us:.0f} us of CPU "
        "per call" + (f"; {echo.instructions:,} instructions per call under valgrind (bench.instructions' echo)."
                      if echo.instructions else "."),
        "- **Budget**: a throughput of target x echo leaves 1 / (target x echo req/s) of wall time per activation. "
        "The server is one process (one GIL: its CPU per activation must fit in that time, on one core); the PostgreSQL "
        "backend and the load generator share the machine's two cores with it (all CPU per activation must fit in "
        "twice that time). In instructions: echo's per call / target.",
        "",
        "### Budget per activation",
        "",
        "| backend | target | activations/s | B = wall us per activation (server process CPU budget) | "
        "machine CPU budget (2 x B) | instructions budget |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    budget_us: dict[str, float] = {}
    budget_instr: dict[str, float] = {}
    for r in results:
        t = TARGET[r.backend]
        budget_us[r.backend] = 1e6 / (t * echo.rps)
        budget_instr[r.backend] = echo.instructions / t
        lines.append(f"| {r.backend} | >= {t} x echo | {t * echo.rps:,.0f} | {budget_us[r.backend]:,.0f} | "
                     f"{2 * budget_us[r.backend]:,.0f} | " + (f"{budget_instr[r.backend]:,.0f} |" if echo.instructions
                                                             else "- |"))
    lines += ["", "### Measured per activation (medians of the runs)", "",
              "| backend | what | SQL statements | commits | wall us (mean) | wall us (p50) | this process CPU us | "
              "PG backend CPU us |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.grouped:
            lines.append(f"| {r.backend} | raw replay, {GROUP} per commit (group commit) | "
                         f"{r.ops['statements'] + (GROUP - 1) / GROUP:.1f} | {r.ops['commits'] / GROUP:.2f} | "
                         f"{median_of(r.grouped, 'wall_us'):,.0f} | {median_of(r.grouped, 'wall_p50_us'):,.0f} | "
                         f"{median_of(r.grouped, 'client_cpu_us'):,.0f} | - |")
        for label, runs in (("raw replay (floor)", r.replay), ("in-process servicer", r.inprocess)):
            lines.append(f"| {r.backend} | {label} | {r.ops['statements']:.1f} | {r.ops['commits']:.1f} | "
                         f"{median_of(runs, 'wall_us'):,.0f} | {median_of(runs, 'wall_p50_us'):,.0f} | "
                         f"{median_of(runs, 'client_cpu_us'):,.0f} | "
                         + (f"{median_of(runs, 'server_cpu_us'):,.0f} |" if r.backend == "postgres" else "- |"))
    lines += ["", "### The floor against the budget", "",
              "Server process floor = echo's server CPU per call (gRPC alone) + the raw statements' CPU in the "
              "server process; machine floor = that + the PostgreSQL backend + the load generator's CPU per call "
              "(echo's, a lower bound).", "",
              "| backend | server process floor us | of B | machine floor us | of 2 x B | in-process path + echo, us | of B |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    floors: dict[str, dict[str, float]] = {}
    for r in results:
        b = budget_us[r.backend]
        proc = echo.server_cpu_us + median_of(r.replay, "client_cpu_us")
        mach = proc + median_of(r.replay, "server_cpu_us") + echo.client_cpu_us
        full = echo.server_cpu_us + median_of(r.inprocess, "client_cpu_us")
        floors[r.backend] = {"proc": proc, "machine": mach, "full": full}
        lines.append(f"| {r.backend} | {proc:,.0f} | {_pct(proc, b)} | {mach:,.0f} | {_pct(mach, 2 * b)} | "
                     f"{full:,.0f} | {_pct(full, b)} |")
    lines += cpu_table(results, echo, budget_us)
    lines += ["", "Durability and session settings of the service's connections (read back from one):", ""]
    lines += [f"- {r.backend}: {r.durability}" for r in results]
    lines += ["", "### Where the in-process CPU goes (cProfile, CPU timer; each function's own time by module, "
              "builtins to their callers' bucket; the profiler inflates Python-heavy parts)", "",
              "| bucket | " + " | ".join(f"{r.backend} us | {r.backend} %" for r in results) + " |",
              "|---|" + "---:|---:|" * len(results)]
    for bk in BUCKETS:
        cells = []
        for r in results:
            total = sum(r.profile.values())
            cells.append(f"{r.profile[bk] / r.profiled * 1e6:,.0f} | {_pct(r.profile[bk], total)}")
        lines.append(f"| {bk} | " + " | ".join(cells) + " |")
    lines.append("| total under the profiler | " + " | ".join(
        f"{sum(r.profile.values()) / r.profiled * 1e6:,.0f} | 100%" for r in results) + " |")
    counted = [r for r in results if r.instructions]
    if counted and echo.instructions:
        lines += ["", "### Instructions per activation (valgrind callgrind: the stable figures)", "",
                  "| backend | part | instructions | share of the gRPC call | x budget |", "|---|---|---:|---:|---:|"]
        for r in counted:
            ins, full_call = r.instructions, r.instructions.get("grpc", 0)

            def row(label: str, value: float, _r: BackendResult = r, _full: int = full_call) -> str:
                return (f"| {_r.backend} | {label} | {value:,.0f} | {_pct(value, _full)} | "
                        f"{value / budget_instr[_r.backend]:.2f} |")
            lines.append(row("ActivateEntitlement through gRPC (server.py, access log on)", full_call))
            lines.append(row("in-process servicer call", ins["activate"]))
            lines.append(row("gRPC, authentication, access log, deadline (the difference)", full_call - ins["activate"]))
            lines.append(row("raw replay of its statements" + (" (PG: client side only)" if r.backend == "postgres"
                                                                else " (sqlite3 + the SQLite engine)"), ins["replay"]))
            parts = [("sign", "token signing (tokens.sign: the compact JWS + Ed25519)"), ("hash", "Merkle leaf + node hashing"),
                     ("rules", "rules.evaluate"), ("proto", "protobuf conversion (convert.activation_response)")]
            if all(k in ins for k, _ in parts):
                for k, label in parts:
                    lines.append(row(label, ins[k]))
                    if k == "sign" and "ed25519" in ins:
                        lines.append(row("of which the Ed25519 signature alone (cryptography / OpenSSL)", ins["ed25519"]))
                rest = ins["activate"] - ins["replay"] - sum(ins[k] for k, _ in parts)
                lines.append(row("rest of the in-process call: SQLAlchemy ORM/Core + our Python (difference)", rest))
            if "accesslog" in ins:
                lines.append(row("of the gRPC part: the access log line (measured alone)", ins["accesslog"]))
            lines.append(row("**floor**: echo call (gRPC alone) + raw replay", echo.instructions + ins["replay"]))
            if all(k in ins for k in MINIMUM):
                lines.append(row("**floor + the parts measured alone** (signing, hashing, rules, protobuf, access log)",
                                 minimum(echo, ins)))
    lines += ["", "### Conclusion", ""]
    lines += conclusions(results, echo, budget_us, budget_instr, floors)
    lines += ["", "Statements of one activation (the last of the series):", ""]
    for r in results:
        lines.append(f"- {r.backend}: " + "; ".join(f"`{st}`" for st in r.statements))
    return "\n".join(lines)


PARTS_TIMED = (("sign", "token signing (tokens.sign: the compact JWS + Ed25519)"),
               ("hash", "Merkle leaf + node hashing"), ("rules", "rules.evaluate"),
               ("proto", "protobuf conversion (convert.activation_response)"),
               ("accesslog", "the access log line (measured alone)"))


def cpu_parts(r: BackendResult, echo: Echo) -> dict[str, float] | None:
    """In CPU us per activation: the floor (echo + raw replay), the parts alone, their sum, the
    in-process call, the rest of it, and the served call (None without the native parts)."""
    t = r.timed
    if not all(k in t for k, _ in PARTS_TIMED):
        return None
    replay = median_of(r.replay, "client_cpu_us")
    inproc = median_of(r.inprocess, "client_cpu_us")
    parts = sum(t[k] for k, _ in PARTS_TIMED)
    in_call = parts - t["accesslog"]  # the access log runs outside the servicer call
    return {"replay": replay, "parts": parts, "minimum": echo.server_cpu_us + replay + parts, "inproc": inproc,
            "rest": inproc - replay - in_call}


def cpu_table(results: list[BackendResult], echo: Echo, budget_us: dict[str, float]) -> list[str]:
    """The floor, the parts every activation must do, and the whole, in CPU time against B."""
    rows = [(r, cpu_parts(r, echo)) for r in results]
    if not any(c for _r, c in rows):
        return []
    lines = ["", "### In CPU time: the floor, the parts every activation needs, the whole (native, no valgrind)", "",
             "Each part alone in a child process (the same code and inputs as the instruction counts below, "
             f"`time.process_time` over the {results[0].profiled} measured activations); the in-process call and the raw "
             "replay from the table above; served = the real server (server.py, the backend's production model, "
             "access log on) on a clone, its process's CPU (all threads) per activation, "
             + " then ".join(f"{c} in flight" for c in SERVED_CONCURRENCY) + " (a sync gRPC client's threads, after "
             f"{SERVED_WARMUP} unmeasured at {max(SERVED_CONCURRENCY)}), in every round after the in-process run, fresh "
             "people each time: the median of the rounds (their spread in brackets).", "",
             "| backend | part | CPU us per activation | of B |", "|---|---|---:|---:|"]
    for r, c in rows:
        if c is None:
            continue
        b = budget_us[r.backend]

        def row(label: str, us: float, _b: float = b, _r: BackendResult = r) -> str:
            return f"| {_r.backend} | {label} | {us:,.0f} | {_pct(us, _b)} |"
        lines.append(row("echo call: gRPC alone (server process, c=8)", echo.server_cpu_us))
        lines.append(row("raw replay of its statements (this process)", c["replay"]))
        for k, label in PARTS_TIMED:
            lines.append(row(label, r.timed[k]))
            if k == "sign" and "ed25519" in r.timed:
                lines.append(row("of which the Ed25519 signature alone", r.timed["ed25519"]))
        lines.append(row("**floor + the parts alone** (echo, raw statements, signing, hashing, rules, protobuf, access log)",
                         c["minimum"]))
        lines.append(row("in-process servicer call", c["inproc"]))
        lines.append(row("of which the rest: SQLAlchemy ORM/Core + our Python (in-process - raw replay - its parts)",
                         c["rest"]))
        for sv in r.served:
            spread: list[float] = sv.get("rounds_cpu_us") or [sv["cpu_us"]]
            lines.append(row(f"**served** by server.py, {sv['concurrency']:.0f} in flight "
                             f"({1e6 / sv['wall_us']:,.0f} activations/s; rounds {min(spread):,.0f}-{max(spread):,.0f} us)",
                             sv["cpu_us"]))
            lines.append(row(f"of which beyond the in-process call and echo ({sv['concurrency']:.0f} in flight: the edge, "
                             "authentication and access log, and the same code running slower in the server's threads)",
                             sv["cpu_us"] - c["inproc"] - echo.server_cpu_us))
    return lines


MINIMUM = ("replay", "sign", "hash", "rules", "proto", "accesslog")


def minimum(echo: Echo, ins: dict[str, int]) -> int:
    """What a server doing the same work with no ORM and no other code would cost at least: gRPC
    (echo), the raw statements, and the parts measured alone."""
    return echo.instructions + sum(ins[k] for k in MINIMUM)


def conclusions(results: list[BackendResult], echo: Echo, budget_us: dict[str, float],
                budget_instr: dict[str, float], floors: dict[str, dict[str, float]]) -> list[str]:
    out = []
    for r in results:
        b, f = budget_us[r.backend], floors[r.backend]
        raw = median_of(r.replay, "client_cpu_us")
        total = sum(r.profile.values())
        sa, dbapi = r.profile[SA] / total, r.profile[DBAPI] / total
        text = (f"- **{r.backend}** (>= {TARGET[r.backend]} x echo: B = {b:,.0f} us per activation): the raw "
                f"statements alone ({r.ops['statements']:.1f} statements, {r.ops['commits']:.0f} commit) take "
                f"{raw:,.0f} us of the server process's CPU = **{_pct(raw, b)} of B**")
        if r.backend == "postgres":
            text += (f", plus {median_of(r.replay, 'server_cpu_us'):,.0f} us in the PostgreSQL backend; with gRPC's own "
                     f"cost (echo) the server process floor is {f['proc']:,.0f} us = **{_pct(f['proc'], b)} of B**, "
                     f"the machine floor {f['machine']:,.0f} us = {_pct(f['machine'], 2 * b)} of 2 x B")
        else:
            wall = median_of(r.replay, "wall_us")
            text += (f"; with gRPC's own cost (echo) the server process floor is {f['proc']:,.0f} us = "
                     f"**{_pct(f['proc'], b)} of B**. SQLite has one writer: the write lock is held for the raw "
                     f"transaction's wall time, {wall:,.0f} us ({wall - raw:,.0f} us of it waiting, mostly the "
                     f"fsync of `synchronous=FULL`), which alone allows at most {1e6 / wall:,.0f} activations/s "
                     f"(target {TARGET[r.backend] * echo.rps:,.0f}/s)")
        text += (f". The whole in-process path plus echo is {f['full']:,.0f} us = {_pct(f['full'], b)} of B; "
                 f"under the profiler SQLAlchemy is {100 * sa:.0f}% of it and the DBAPI {100 * dbapi:.0f}%.")
        c = cpu_parts(r, echo)
        if c is not None:
            text += (f" In CPU time, natively: echo + the raw statements + the parts every activation needs "
                     f"(signing {r.timed['sign']:,.0f} us, hashing, rules, protobuf, access log) come to "
                     f"{c['minimum']:,.0f} us = **{_pct(c['minimum'], b)} of B**; the rest of the in-process call "
                     f"(SQLAlchemy and our Python around the statements) is {c['rest']:,.0f} us")
            busy = [sv for sv in r.served if sv["concurrency"] > 1] or r.served
            if busy:
                sv = busy[-1]
                text += (f", and served by server.py ({sv['concurrency']:.0f} in flight) an activation costs the server "
                         f"{sv['cpu_us']:,.0f} us = **{_pct(sv['cpu_us'], b)} of B** "
                         f"({sv['cpu_us'] - c['inproc'] - echo.server_cpu_us:,.0f} us of it beyond the in-process call "
                         f"and echo). So what keeps the target out of reach is what this code adds to the floor, "
                         f"not the floor: meeting it needs the served path about {sv['cpu_us'] / b:.1f} x leaner")
            text += "."
        ins = r.instructions
        if ins and echo.instructions and "grpc" in ins:
            bi = budget_instr[r.backend]
            text += (f" In instructions (server process): the gRPC call is {ins['grpc']:,} = {ins['grpc'] / bi:.1f} x "
                     f"the budget of {bi:,.0f}, the in-process call {ins['activate'] / bi:.1f} x, echo + raw replay "
                     f"**{(echo.instructions + ins['replay']) / bi:.2f} x**")
            if all(k in ins for k in MINIMUM):
                text += (f", and with the parts measured alone (signing, hashing, rules, protobuf, access log) "
                         f"**{minimum(echo, ins) / bi:.2f} x**")
            text += (f"; the ratio this code reaches, server-bound, is {echo.instructions / ins['grpc']:.3f} x echo "
                     f"(the floor alone would reach {echo.instructions / (echo.instructions + ins['replay']):.2f}).")
            if "ed25519" in ins and "ed25519" in r.timed:
                text += (f" Instructions weigh compute-bound parts far above gRPC's call, whose CPU is largely the "
                         f"kernel's (which valgrind does not count): the Ed25519 signature is {ins['ed25519']:,} "
                         f"instructions for {r.timed['ed25519']:,.0f} us of CPU, the echo call {echo.instructions:,} "
                         f"for {echo.server_cpu_us:,.0f} us; so the instruction budget compares Python paths with "
                         f"each other, and the CPU figures above say what fits in B.")
        out.append(text)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        raise SystemExit(child(sys.argv[2]))
    raise SystemExit(main())
