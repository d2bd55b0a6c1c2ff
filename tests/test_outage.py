"""Database outage under load (issue 9, item 2), on both backends.

PostgreSQL: the server reaches its database through a TCP proxy (tests/tcp_proxy.py), so the
machine's PostgreSQL keeps running (other tests use it). Two outages: refused (the proxy closes
every connection and refuses new ones: the host is down) and silent (it closes them, then accepts
new ones and never answers: the host stopped answering). SQLite: another connection holds the
write lock (`BEGIN EXCLUSIVE`); under WAL, reads go on, so eligibility checks keep answering OK
while activations cannot be written.

Every call answers before its deadline, with OK or UNAVAILABLE (reason DATABASE_UNAVAILABLE, with
a RetryInfo): never INTERNAL, never DEADLINE_EXCEEDED. The load's deadline (5 s) is above every
bound of these servers (lock wait 1.5 s, connect timeout 2 s, statement timeout 2.5 s). A deadline
shorter than the SQLite lock wait still gets UNAVAILABLE, because the server stops waiting for the
lock just before the call's deadline (the shutdown test's first call). On PostgreSQL the bounds are
session settings, not the call's deadline (that would cost a round trip per transaction): during a
silent outage, before health flips, a call whose deadline is shorter than the connect timeout ends
DEADLINE_EXCEEDED; once health is NOT_SERVING every call fails fast. Health (every service and "")
goes NOT_SERVING; after the outage, service and health come back by themselves: the test polls,
with the issue's 5 s as its limit, and prints how long it took. Then nothing acknowledged is lost,
an activation answered UNAVAILABLE exists completely or not at all, a retry with its request_id
converges, and the invariant checker finds nothing. ENTITLEMENT_STRESS=1: more cycles, more load.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
import structlog.testing
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from own_server import Person, own_server
from support import As, Harness, failure, identity, wait_until
from tcp_proxy import TcpProxy

from entitlement import credentials, doctor
from entitlement.dbhealth import MAX_HANGING, DatabaseMonitor
from entitlement.callers import Caller
from entitlement.server_main import SERVICE_NAMES
from entitlement.storage.db import Database, bind_deadline
from entitlement.storage.migrate import upgrade
from entitlement.v1 import activation_pb2, eligibility_pb2

STRESS = os.environ.get("ENTITLEMENT_STRESS") == "1"
CYCLES = 5 if STRESS else 1  # outage / recovery cycles per backend
WORKERS = 12 if STRESS else 4  # client threads calling in a loop
OUTAGE_LOAD_S = 3.0 if STRESS else 1.5  # how long the load runs against the dead database (not asserted)
WARM_S = 1.0 if STRESS else 0.5  # how long it runs on a working database before each outage
PEOPLE = 12000 if STRESS else 2500
RESUME_LIMIT_S = 5.0  # the bound, used as a polling limit only
# The load's deadline: longer than every bound of these servers (lock wait, connect timeout,
# statement timeout), with room for a machine busy enough to make a normal activation take seconds.
CALL_DEADLINE_S = 5.0
LOCK_WAIT_MS = 1500  # ENTITLEMENT_DB_LOCK_TIMEOUT_MS of these servers
STATEMENT_TIMEOUT_MS = 2500  # ENTITLEMENT_DB_STATEMENT_TIMEOUT_MS (PostgreSQL)
SHORT_DEADLINE_S = 0.6  # shorter than the lock wait: the server still answers UNAVAILABLE in time
PROGRAM = "programs/premium-job-seekers"
ADVISOR = "advisor-paris"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def outage_people() -> dict[str, Person]:
    """Eligible people of these servers' registry (under 26, Paris, category 1)."""
    return {f"O{i:07d}": ((dt.date(2002, 1, 1) + dt.timedelta(days=i % 3000)).isoformat(), "75011",
                          "2024-01-15", "", "1") for i in range(1, PEOPLE + 1)}


# ------------------------------------------------------------------------------------------- outages

class Outage:
    backend = ""

    def begin(self) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class ProxyCut(Outage):
    backend = "postgres"

    def __init__(self, proxy: TcpProxy, silent: bool) -> None:
        self.proxy = proxy
        self.silent = silent  # new connections hang (time out) instead of being refused

    def begin(self) -> None:
        if self.silent:
            self.proxy.silence()
        else:
            self.proxy.cut()

    def end(self) -> None:
        self.proxy.restore()


class SqliteLock(Outage):
    backend = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def begin(self) -> None:
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")  # WAL: the write lock; readers go on

    def end(self) -> None:
        assert self.conn is not None
        self.conn.execute("ROLLBACK")
        self.conn.close()
        self.conn = None


@contextmanager
def outage_server(backend: str, tmp_path: Path, request: pytest.FixtureRequest, *, silent: bool = False,
                  **overrides: object) -> Iterator[tuple[Harness, Outage]]:
    """A server of its own, with the outage of its backend ready to begin."""
    # More workers than client threads: a call queued behind busy workers waits in gRPC's queue,
    # where no bound of ours applies (README "Database outage").
    # Callers' tokens are looked up in the database on every call (no cache).
    settings = dict(db_lock_timeout_ms=LOCK_WAIT_MS, db_statement_timeout_ms=STATEMENT_TIMEOUT_MS,
                    db_ping_ms=200, db_ping_timeout_ms=1000, db_connect_timeout_s=2, max_workers=WORKERS + 4,
                    caller_cache_seconds=0)
    settings.update(overrides)
    if backend == "sqlite":
        with own_server(backend, tmp_path, request, people=outage_people(), **settings) as h:
            yield h, SqliteLock(str(make_url(h.url).database))
        return
    admin = make_url(request.getfixturevalue("pg_server"))
    proxy = TcpProxy(admin.host or "127.0.0.1", admin.port or 5432)
    try:
        with own_server(backend, tmp_path, request, people=outage_people(), server_url=proxy.url_for,
                        **settings) as h:
            yield h, ProxyCut(proxy, silent)
    finally:
        proxy.close()


# ---------------------------------------------------------------------------------------------- load

@dataclass
class Call:
    kind: str  # activate | check
    phase: str  # the test's phase when the call started: before | outage | recovery
    started: float
    ended: float
    deadline_s: float
    code: grpc.StatusCode
    reason: str = ""
    retry_info: bool = False
    request_id: str = ""
    person: str = ""
    activation: str = ""  # activations/ID when OK


def _retry_info(err: grpc.RpcError) -> bool:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    return status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


class Load:
    """WORKERS threads alternating activations (each of a new person, with a request_id) and checks."""

    def __init__(self, h: Harness, people: list[tuple[str, str]]) -> None:
        self.advisor = As(h.channel, h.tokens[ADVISOR])
        self.people = people
        self.db_caller: As | None = None
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.phase = "before"
        self.windows: list[tuple[float, float]] = []  # (health seen NOT_SERVING, outage ended) per cycle
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(WORKERS)]

    def next_person(self) -> tuple[str, str] | None:
        with self.lock:
            return self.people.pop() if self.people else None

    def activate(self, person: tuple[str, str], request_id: str, deadline_s: float = CALL_DEADLINE_S) -> Call:
        return self._call("activate", deadline_s, lambda: self.advisor.ActivateEntitlement(
            activation_pb2.ActivateEntitlementRequest(
                request_id=request_id, job_seeker=identity(*person), program=PROGRAM,
                platform="platforms/openclassrooms", reason="outage test"), timeout=deadline_s),
            request_id=request_id, person=person[0])

    def check(self, person: tuple[str, str], deadline_s: float = CALL_DEADLINE_S) -> Call:
        return self._call("check", deadline_s, lambda: self.advisor.CheckEligibility(
            eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(*person), program=PROGRAM),
            timeout=deadline_s), person=person[0])

    def _call(self, kind: str, deadline_s: float, fn: Callable[[], object], **kw: str) -> Call:
        phase, started = self.phase, time.monotonic()
        try:
            resp = fn()
        except grpc.RpcError as err:
            f = failure(err)
            call = Call(kind, phase, started, time.monotonic(), deadline_s, f.code, f.reason, _retry_info(err), **kw)
        else:
            name = resp.activation.name if kind == "activate" else ""  # type: ignore[attr-defined]
            call = Call(kind, phase, started, time.monotonic(), deadline_s, grpc.StatusCode.OK, activation=name,
                        **kw)
        with self.lock:
            self.calls.append(call)
        return call

    def _work(self, i: int) -> None:
        checked = ("O0000001", "2002-01-02")
        n = 0
        while not self.stopping.is_set():
            n += 1
            person = self.next_person() if n % 2 else None
            call = self.activate(person, f"outage-{uuid.uuid4().hex}") if person else self.check(checked)
            if call.code == grpc.StatusCode.OK and call.kind == "activate":
                checked = (call.person, self._birth(call.person))
            if call.code != grpc.StatusCode.OK:
                time.sleep(0.05)  # a client backs off (RetryInfo says 1 s; the test wants calls)

    @staticmethod
    def _birth(ident: str) -> str:
        return (dt.date(2002, 1, 1) + dt.timedelta(days=int(ident[1:]) % 3000)).isoformat()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=CALL_DEADLINE_S + 5)
            assert not t.is_alive(), "a client thread is stuck past its deadline"


# -------------------------------------------------------------------------------------------- health

def health_of(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def wait_health(channel: grpc.Channel, want: int, limit_s: float) -> float | None:
    """Seconds until the overall health is `want` (polled), or None past the limit."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if health_of(channel) == want:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


# --------------------------------------------------------------------------------------------- tests

def test_database_outage_under_load(backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL refuses connections (host down) / SQLite is locked by another connection."""
    _outage_under_load(backend[0], tmp_path, request, capsys, silent=False)


def test_silent_postgresql_under_load(pg_server: str, tmp_path: Path, request: pytest.FixtureRequest,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL's host stops answering: connections are accepted and never answered, so each
    connection attempt waits for ENTITLEMENT_DB_CONNECT_TIMEOUT_S (2 s here, under the calls' 5 s
    deadline), and the monitor's ping for its own timeout, before health goes NOT_SERVING."""
    _outage_under_load("postgres", tmp_path, request, capsys, silent=True)


def _outage_under_load(name: str, tmp_path: Path, request: pytest.FixtureRequest,
                       capsys: pytest.CaptureFixture[str], *, silent: bool) -> None:
    with outage_server(name, tmp_path, request, silent=silent) as (h, outage):
        people = [(p, birth) for p, (birth, *_rest) in outage_people().items()]
        load = Load(h, people)
        # A caller managed in the database (not the credentials file): its token is looked up there.
        issued = credentials.create(h.ctx.db, Caller(id="advisor-db", role="advisor", advisor_id="A0009",
                                                     agency_code="75011"), now=h.clock.now(), actor="test")
        load.db_caller = As(h.channel, issued.token)
        assert health_of(h.channel) == SERVING
        load.start()
        figures = []
        try:
            for cycle in range(CYCLES):
                figures.append(_one_cycle(h, outage, load, cycle))
        finally:
            load.stop()
        _check_calls(name, load)
        _check_activations(h, load)
    with capsys.disabled():
        for f in figures:
            print(f"\n[outage {name}{' silent' if silent else ''}] {f}")


def _one_cycle(h: Harness, outage: Outage, load: Load, cycle: int) -> str:
    # Some traffic on a working database first.
    assert _first_ok_activation(load, RESUME_LIMIT_S) is not None, "no activation succeeds before the outage"
    time.sleep(WARM_S)  # calls in flight when the database goes away
    load.phase = "outage"
    outage.begin()
    t_down = time.monotonic()
    try:
        # PostgreSQL: the monitor's next ping (or a call's failure) flips health. SQLite: a write has
        # to wait out the lock bound first, then the monitor's write probe confirms.
        down_after = wait_health(h.channel, NOT_SERVING, RESUME_LIMIT_S + LOCK_WAIT_MS / 1000)
        assert down_after is not None, "health still SERVING during the outage"
        t_seen = time.monotonic()
        for service in ("", *SERVICE_NAMES):
            assert health_of(h.channel, service) == NOT_SERVING, service
        # Health NOT_SERVING: the server fails fast, whatever the deadline.
        person = load.next_person()
        assert person is not None
        short = load.activate(person, f"outage-short-{uuid.uuid4().hex}", deadline_s=SHORT_DEADLINE_S)
        assert short.code == grpc.StatusCode.UNAVAILABLE, short
        # A token that cannot be looked up is an outage, not bad credentials (SQLite: the lookup
        # is a read, which goes on).
        expected = grpc.StatusCode.OK if h.backend == "sqlite" else grpc.StatusCode.UNAVAILABLE
        assert load.db_caller is not None
        try:
            load.db_caller.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                job_seeker=identity(*person), program=PROGRAM), timeout=CALL_DEADLINE_S)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code, reason = err.code(), failure(err).reason
            assert reason == "DATABASE_UNAVAILABLE", (code, reason)
        assert code == expected
        time.sleep(OUTAGE_LOAD_S)  # the load keeps calling against the dead database
        assert health_of(h.channel) == NOT_SERVING
    finally:
        load.phase = "recovery"
        t_up = time.monotonic()
        outage.end()
    load.windows.append((t_seen, t_up))
    first_ok = _first_ok_activation(load, RESUME_LIMIT_S)
    serving = wait_health(h.channel, SERVING, RESUME_LIMIT_S - (time.monotonic() - t_up))
    assert first_ok is not None, f"no activation succeeded within {RESUME_LIMIT_S} s of the database's return"
    assert serving is not None, f"health not SERVING within {RESUME_LIMIT_S} s of the database's return"
    serving_after = time.monotonic() - t_up
    load.phase = "before"  # of the next cycle
    return (f"cycle {cycle + 1}: NOT_SERVING {down_after:.2f} s after the outage began; outage held "
            f"{t_up - t_down:.2f} s; after the database's return: first OK activation {first_ok:.2f} s, "
            f"SERVING {serving_after:.2f} s")


def _first_ok_activation(load: Load, limit_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        person = load.next_person()
        assert person is not None, "people exhausted: raise PEOPLE"
        if load.activate(person, f"outage-probe-{uuid.uuid4().hex}").code == grpc.StatusCode.OK:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _check_calls(backend: str, load: Load) -> None:
    counts = collections.Counter((c.phase, c.kind, c.code.name) for c in load.calls)
    print(f"[outage {backend}] calls by phase, kind and status: {dict(sorted(counts.items()))}")
    wrong = [c for c in load.calls if c.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)]
    # Never INTERNAL, never past the deadline (DEADLINE_EXCEEDED), nothing else either.
    assert not wrong, wrong[:5]
    for c in load.calls:
        if c.code == grpc.StatusCode.UNAVAILABLE:
            assert c.reason == "DATABASE_UNAVAILABLE" and c.retry_info, c
    # The calls made wholly within the outage (after health said NOT_SERVING, before the database
    # came back): activations all UNAVAILABLE; checks too on PostgreSQL.
    during = [c for c in load.calls if any(t0 <= c.started and c.ended <= t1 for t0, t1 in load.windows)]
    writes = [c for c in during if c.kind == "activate"]
    assert writes, "no activation was tried during the outage"
    assert all(c.code == grpc.StatusCode.UNAVAILABLE for c in writes), collections.Counter(c.code.name for c in writes)
    if backend == "postgres":
        assert all(c.code == grpc.StatusCode.UNAVAILABLE for c in during)
    else:
        # WAL: reads do not wait for the write lock; checks keep answering during the outage.
        checks = [c for c in during if c.kind == "check"]
        assert checks and all(c.code == grpc.StatusCode.OK for c in checks), collections.Counter(
            c.code.name for c in checks)


def _check_activations(h: Harness, load: Load) -> None:
    """Acknowledged activations exist; one answered UNAVAILABLE is all there or not at all, and a
    retry with its request_id converges; the invariant checker finds nothing."""
    db = Database(h.url, pool_size=2)
    try:
        acknowledged = [c for c in load.calls if c.kind == "activate" and c.code == grpc.StatusCode.OK]
        assert acknowledged
        with db.read() as s:
            stored = {r[0] for r in s.execute(text("SELECT id FROM activations"))}
        missing = [c.activation for c in acknowledged if c.activation.split("/")[1] not in stored]
        assert not missing, f"acknowledged activations lost: {missing[:5]}"

        in_doubt = [c for c in load.calls if c.kind == "activate" and c.code == grpc.StatusCode.UNAVAILABLE]
        committed = 0
        for c in in_doubt:
            with db.read() as s:
                row = s.execute(text("SELECT response FROM idempotency_records WHERE caller_id = :c AND "
                                     "request_id = :r"), {"c": ADVISOR, "r": c.request_id}).first()
            retry = _retry(load, c)
            assert retry.code == grpc.StatusCode.OK, retry
            if row is not None:  # committed although the caller heard UNAVAILABLE: the retry replays it
                committed += 1
                assert retry.activation.split("/")[1] in bytes(row[0]).decode()
        print(f"[outage {h.backend}] {len(acknowledged)} activations acknowledged, {len(in_doubt)} answered "
              f"UNAVAILABLE ({committed} of them had committed), all converged on retry")
        problems = doctor.check(db)
        assert not problems, problems[:10]
        with db.read() as s:
            live = s.execute(text("SELECT count(*) FROM activations")).scalar_one()
        assert live == len({c.person for c in acknowledged} | {c.person for c in in_doubt})
    finally:
        db.dispose()


def _retry(load: Load, c: Call) -> Call:
    """Retry an activation with its request_id as a client would: again after UNAVAILABLE (the
    machine may be busy enough for a health ping to time out), for RESUME_LIMIT_S at most."""
    t0 = time.monotonic()
    while True:
        retry = load.activate((c.person, load._birth(c.person)), c.request_id)
        if retry.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() - t0 > RESUME_LIMIT_S:
            return retry
        time.sleep(0.1)


def test_shutdown_during_an_outage_stays_not_serving(backend: tuple[str, str], tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    """A graceful stop that begins during an outage: the database coming back during the grace period
    must not set health back to SERVING (load balancers are draining this server)."""
    name, _ = backend
    with outage_server(name, tmp_path, request, db_ping_ms=50) as (h, outage):
        load = Load(h, [(p, b) for p, (b, *_r) in outage_people().items()])
        outage.begin()
        try:
            person = load.next_person()
            assert person is not None
            # SQLite: a write meets the lock (and tells the monitor); PostgreSQL: the next ping fails.
            # Its deadline is shorter than the lock wait: on SQLite the server stops waiting for the
            # lock before the deadline and answers DEADLINE_EXCEEDED while the caller still listens
            # (the deadline, not the configured bound, ended the wait), telling the monitor, whose
            # write probe then finds the lock; PostgreSQL: UNAVAILABLE (a broken connection).
            first = load.activate(person, f"outage-{uuid.uuid4().hex}", deadline_s=SHORT_DEADLINE_S)
            assert first.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), first
            assert first.reason in ("DATABASE_UNAVAILABLE", "DEADLINE_EXCEEDED"), first  # the server's answer
            assert wait_health(h.channel, NOT_SERVING, RESUME_LIMIT_S) is not None
            statuses: list[int] = []
            watch = health_pb2_grpc.HealthStub(h.channel).Watch(health_pb2.HealthCheckRequest(service=""))

            def follow() -> None:
                try:
                    for resp in watch:
                        statuses.append(resp.status)
                except grpc.RpcError:
                    pass  # cancelled when the server's grace period ends

            follower = threading.Thread(target=follow)
            follower.start()
            for _ in range(500):
                if statuses:
                    break
                time.sleep(0.01)
            assert statuses == [NOT_SERVING]
            stopper = threading.Thread(target=h.running.stop, args=(1.5,))
            stopper.start()
        finally:
            outage.end()  # the database is back while the server drains
        stopper.join(timeout=10)
        watch.cancel()
        follower.join(timeout=10)
        assert statuses and all(s == NOT_SERVING for s in statuses), statuses
        assert h.running.monitor is not None and not h.running.monitor.healthy


def test_settings_bound_every_database_wait(fresh_url: str) -> None:
    """The server's Database takes its bounds from the settings (a write's lock wait also from the
    call's deadline); the command-line tools keep their own, longer ones."""
    db = Database(fresh_url, pool_size=1, lock_timeout_ms=1234, statement_timeout_ms=4321, connect_timeout_s=2)
    cli_db = Database(fresh_url, pool_size=1)
    try:
        if db.is_sqlite:
            def busy(d: Database) -> int:
                with d.write() as s:
                    return int(s.execute(text("PRAGMA busy_timeout")).scalar_one())
            assert busy(db) == 1234 and busy(cli_db) == 30000
            bind_deadline(0.5)  # a call with 0.5 s left: the lock wait ends before its deadline
            try:
                assert 0 < busy(db) <= 400
            finally:
                bind_deadline(None)
            assert busy(db) == 1234
        else:
            with db.read() as s:
                assert s.execute(text("SHOW lock_timeout")).scalar_one() == "1234ms"
                assert s.execute(text("SHOW statement_timeout")).scalar_one() == "4321ms"
            with cli_db.read() as s:
                assert s.execute(text("SHOW lock_timeout")).scalar_one() == "0"  # PostgreSQL's default: none
    finally:
        db.dispose()
        cli_db.dispose()


def test_the_monitors_pings_keep_their_connections(fresh_url: str) -> None:
    """The monitor's pings run one after another in one thread, whose connections last from one
    ping to the next: twenty pings open one connection of each engine at most. (A thread per ping
    opened one for the hot reads' probe at every ping, since they keep one per thread: on
    PostgreSQL a new backend every second, per server process.)"""
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=4, lock_timeout_ms=5000)
    made: list[str] = []
    event.listen(db.reader, "connect", lambda *_a: made.append("reader"))
    event.listen(db.engine, "connect", lambda *_a: made.append("engine"))
    monitor = DatabaseMonitor(db, interval_s=3600, timeout_s=10)
    try:
        for _ in range(20):
            assert monitor.ping()
        assert made.count("reader") == 1 and made.count("engine") <= 1, made
        if db.is_sqlite:
            assert monitor.ping(writes=True)  # the write probe too
            assert made.count("reader") == 1 and made.count("engine") <= 1, made
    finally:
        monitor.stop()
        db.dispose()


def test_a_restart_nobody_noticed_costs_no_call(pg_server: str) -> None:
    """PostgreSQL restarted between two calls (every pooled connection dead, the database up): the
    monitor's ping replaces the dead connection and invalidates the pool (no pre-ping per checkout),
    so the calls after it get new connections and succeed."""
    proxy = TcpProxy(make_url(pg_server).host or "127.0.0.1", make_url(pg_server).port or 5432)
    db = Database(proxy.url_for(pg_server), pool_size=4, lock_timeout_ms=1000, connect_timeout_s=2)
    try:
        holders = [db.engine.connect() for _ in range(3)]  # three pooled connections
        for conn in holders:
            conn.exec_driver_sql("SELECT 1")
            conn.close()
        proxy.cut()
        proxy.restore()
        db.ping()
        for _ in range(4):
            with db.read() as s:
                assert s.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        db.dispose()
        proxy.close()


def _hold_the_pool(db: Database) -> list[Any]:
    """Every connection the write pool may hand out, checked out and held: a checkout after this
    waits (the pool's timeout, here the lock wait), as under a load that keeps every connection busy."""
    pool = db.engine.pool
    return [db.engine.connect() for _ in range(pool.size() + max(pool._max_overflow, 0))]  # type: ignore[attr-defined]


@pytest.mark.parametrize("ping", ["unanswered", "failed"])
def test_a_missed_ping_is_no_outage_while_the_database_answers_calls(fresh_url: str, ping: str) -> None:
    """A ping that fails or gets no answer in time is an outage when nothing else got an answer
    either (a silent database), and not while calls sent after it get their answers (seen in
    `bench.rpcs`: with two server processes pinned to a CPU each, a ping waited over 2 s while
    checks answered, and the server refused every call for a second). Here the ping waits for a
    pooled connection (all held) while hot reads answer: past the ping's timeout ("unanswered"), or
    until the pool gives up ("failed", its wait shorter than the ping's timeout). A SQLite write
    probe counts commits only: under WAL, reads answer while another connection holds the write
    lock. Beyond MAX_HANGING pings hanging, a ping is not tried, and the calls decide."""
    upgrade(fresh_url)
    unanswered = ping == "unanswered"
    db = Database(fresh_url, pool_size=1, lock_timeout_ms=5000 if unanswered else 200, connect_timeout_s=2)
    # Timeouts no other monitor of this process has (the shared test servers' log to the same
    # place): their events are told apart by it.
    timeout_s = 0.3 if unanswered else 1.9
    monitor = DatabaseMonitor(db, interval_s=3600, timeout_s=timeout_s)
    held = _hold_the_pool(db)
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []

    def read_in_a_loop() -> None:
        try:
            while not stop.is_set():
                reads.append(db.hot.first(text("SELECT 1"))[0])
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            errors.append(exc)

    reader = threading.Thread(target=read_in_a_loop, daemon=True)
    try:
        assert not monitor.ping(), f"nothing answered: a ping {ping} is a failed one"
        reader.start()
        wait_until(lambda: bool(reads or errors), "a first hot read")
        assert reads and not errors, errors
        with structlog.testing.capture_logs() as logged:
            assert monitor.ping(), f"hot reads answered meanwhile: a ping {ping} is no outage"
        missed = [e for e in logged if e["event"] == "database_ping_missed"
                  and e["timeout_ms"] == round(timeout_s * 1000)]
        assert len(missed) == 1, logged
        assert missed[0]["error"] == ("PingTimeout" if unanswered else "TimeoutError"), missed
        assert missed[0]["waited_ms"] >= (300 if unanswered else 0), missed
        # a failed ping says why, in the driver's words (here the pool's: every connection held)
        assert unanswered or "QueuePool limit" in missed[0]["detail"], missed
        if db.is_sqlite:
            assert not monitor.ping(writes=True), "reads are no evidence for the write probe"
        if unanswered:  # pings hang (each until the pool gives up, 5 s): fill up to MAX_HANGING
            while monitor._hanging < MAX_HANGING:
                assert monitor.ping()
            assert monitor.ping(), "not tried (too many hanging): the answered reads decide"
            stop.set()
            reader.join(5)
            assert not monitor.ping(), "not tried, and nothing answered: a failed ping"
        assert not errors, errors
    finally:
        stop.set()
        for conn in held:
            conn.close()
        if reader.is_alive():
            reader.join(5)
        limit = time.monotonic() + 10  # the hanging pings end once the pool has connections again
        while monitor._hanging and time.monotonic() < limit:
            time.sleep(0.01)
        monitor.stop()
        db.dispose()


def _stand_still(at_least_s: float) -> Callable[[], float]:
    """A stall of the whole process of `at_least_s` or more, to call later (measured now, in short
    steps): a regular expression that backtracks exponentially holds the interpreter lock
    throughout (the re module never lets it go), so no other thread of this process runs
    meanwhile, as in a long call holding the lock, a stop-the-world pause or a machine that does
    not schedule the process. The call returns how long it stood still."""
    pattern, n = re.compile(r"(a+)+$"), 12
    while True:  # each "a" more doubles the time: measured on a short run, then extrapolated
        took = 1e9
        for _ in range(3):  # the least of three: a busy machine only makes a run slower
            started = time.monotonic()
            pattern.match("a" * n + "b")
            took = min(took, time.monotonic() - started)
        if took >= at_least_s / 32:
            break
        n += 1
    subject = "a" * (n + max(0, math.ceil(math.log2(at_least_s / took)))) + "b"

    def stall() -> float:
        started = time.monotonic()
        pattern.match(subject)
        return time.monotonic() - started
    return stall


def test_a_stall_of_the_whole_process_is_no_outage(fresh_url: str) -> None:
    """The process stands still (every thread) while a ping waits: when it runs again, the
    monitor's thread, late past the ping's timeout, waits as long again (at most a timeout) for the
    ping's own thread, which then gets its answer (before 2026-12-06 the monitor judged at once: an
    outage in about half of such stalls, in a measurement; in CI a shared test server reported
    one, 17 tests refused). A ping whose answer comes after its timeout while the process runs is
    still unanswered. Here the ping waits for a pooled connection (all held); one is given back
    just before the stall."""
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=1, lock_timeout_ms=10000, connect_timeout_s=2)
    timeout_s = 0.4  # no other monitor of this process has it: their events are told apart by it
    monitor = DatabaseMonitor(db, interval_s=3600, timeout_s=timeout_s)
    outcome: list[bool] = []
    stand_still = _stand_still(3 * timeout_s)
    try:
        assert monitor.ping()
        for stall in (True, False):
            held = _hold_the_pool(db)  # the ping waits for a connection, the interpreter lock free
            outcome.clear()
            pinging = threading.Thread(target=lambda: outcome.append(monitor.ping()), daemon=True)
            with structlog.testing.capture_logs() as logged:
                pinging.start()
                wait_until(lambda: monitor._hanging == 1, "the ping sent")  # it waits for a connection
                time.sleep(0.02)
                if stall:
                    held.pop().close()  # the ping may go on...
                    stood = stand_still()  # ...but nothing in this process runs
                    for conn in held:
                        conn.close()
                else:
                    time.sleep(2 * timeout_s)  # the answer comes after the timeout, the process running
                    for conn in held:
                        conn.close()
                pinging.join(10)
            assert not pinging.is_alive()
            late = [e for e in logged if e["event"] == "database_ping_late"
                    and e["timeout_ms"] == round(timeout_s * 1000)]
            if stall:
                assert outcome == [True], f"the process stood still {stood:.2f} s: no outage ({logged})"
                assert len(late) == 1 and late[0]["late_ms"] > 0, (logged, outcome)
            else:
                assert outcome == [False], "an answer after the timeout, the process running: unanswered"
                assert not late, logged
            wait_until(lambda: not monitor._hanging, "the hanging ping ended (the pool has its connections)")
    finally:
        monitor.stop()
        db.dispose()


def test_what_counts_as_the_database_answering(fresh_url: str) -> None:
    """Database.answered_since: a committed write counts for everything; a read (transaction,
    snapshot statement or hot read) for everything but SQLite's write probe; a write rolled back not
    at all. A COMMIT or a hot read's statement counts from when its answer came (sent before `since`
    and answered after it: the database answered after `since`; in CI a call and the ping once
    stalled together, and the call sent before the ping vouched for nothing); a read transaction
    or snapshot statement from when it began (a block may end long after its last answer)."""
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=2, lock_timeout_ms=5000)
    try:
        t0 = time.monotonic()
        assert not db.answered_since(t0)
        with db.read() as s:
            s.execute(text("SELECT 1"))
        assert db.answered_since(t0) and not db.answered_since(t0, writes=True)
        t1 = time.monotonic()
        with db.snapshot() as conn:
            conn.execute(text("SELECT 1"))
        assert db.answered_since(t1) and not db.answered_since(t1, writes=True)
        t2 = time.monotonic()
        db.hot.first(text("SELECT 1"))
        assert db.answered_since(t2) and not db.answered_since(t2, writes=True)
        t3 = time.monotonic()
        with pytest.raises(RuntimeError):
            with db.write() as s:
                s.execute(text("UPDATE log_head SET size = size"))
                raise RuntimeError("rolled back")
        assert not db.answered_since(t3, writes=True)
        with db.write() as s:
            s.execute(text("UPDATE log_head SET size = size"))
        assert db.answered_since(t3, writes=True) and db.answered_since(t3)
        # A read transaction begun before `since` vouches for nothing after it...
        with db.read() as s:
            t4 = time.monotonic()
            s.execute(text("SELECT 1"))
        assert not db.answered_since(t4)
        # ... a COMMIT answered after it does,
        with db.write() as s:
            s.execute(text("UPDATE log_head SET size = size"))
            t5 = time.monotonic()
        assert db.answered_since(t5, writes=True) and db.answered_since(t5)
        # ... and so does a hot read sent before it and answered after it.
        slow = text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) "
                    "SELECT count(*) FROM c" if db.is_sqlite else "SELECT pg_sleep(0.5)")
        sent = threading.Event()
        db.hot.listeners.append(lambda _sql: sent.set())  # called just before the statement goes
        reader = threading.Thread(target=db.hot.first, args=(slow,), daemon=True)
        reader.start()
        assert sent.wait(10)
        time.sleep(0.02)
        t6 = time.monotonic()
        assert reader.is_alive(), "the slow read answered before `since`: the case is not tested"
        assert not db.answered_since(t6)
        reader.join(30)
        assert db.answered_since(t6) and not db.answered_since(t6, writes=True)
    finally:
        db.dispose()
