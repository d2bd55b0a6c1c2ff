"""Writes on the event loop (entitlement/storage/db.py "Writes on the event loop",
entitlement/aio_server.py `_loop_write`): on SQLite the event-loop server runs an activation's and a
redemption's write on its loop when nothing makes it wait, and in its pool otherwise: when this
process's writers' lock is taken, or another connection holds SQLite's write lock. A deferred call
runs again from its start in the pool: nothing written twice, one access-log line, one rate-limit
token. PostgreSQL (the thread-pool model) never writes on a loop."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import grpc
import pytest

from own_server import next_ledger_person, own_server
from support import Api, Harness, identity, log_records, next_person

from entitlement import aio_server
from entitlement.storage import db as storage_db
from entitlement.storage.db import Database, LoopWriteDeferred, loop_write
from entitlement.storage.migrate import upgrade
from entitlement.v1 import activation_pb2, eligibility_pb2

PROGRAM = "programs/premium-job-seekers"


@pytest.fixture(autouse=True)
def disk_fast_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop takes SQLite's writes while the recent COMMITs average under LOOP_COMMIT_BOUND_S
    (2 ms): under make test the other worker loads the same disk, a few slow fsyncs lift the
    average, and a test of WHERE the writes run failed for the disk's sake (seen by a review
    running tests beside others). Raised to 1 s here; the test of the bound itself sets the averages
    it needs, as multiples of it."""
    monkeypatch.setattr(storage_db, "LOOP_COMMIT_BOUND_S", 1.0)


def _activate(api: Api, agency_id: str, birth: Any, request_id: str = "", rid: str = "") -> Any:
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api.h.tokens['advisor-paris']}"),)
    if rid:
        metadata += (("x-request-id", rid),)
    stub = api.as_("advisor-paris")
    return stub.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        request_id=request_id, job_seeker=identity(agency_id, birth), program=PROGRAM,
        platform="platforms/openclassrooms", reason="test"), metadata=metadata, timeout=30)


def _redeem(api: Api, token: str) -> Any:
    return api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=token, account_id=f"acct-{uuid.uuid4().hex[:12]}"))


def _rpc_lines(log_path: Path, rid: str) -> list[dict[str, Any]]:
    return [r for r in log_records(log_path) if r.get("request_id") == rid and r.get("event") == "rpc"]


def test_signup_writes_run_on_the_loop_on_sqlite_only(harness: Harness) -> None:
    """The suite's servers (auto model): on SQLite an activation and a redemption each write on the
    loop, none deferred on an idle server; on PostgreSQL (the thread pool) nothing runs on a loop."""
    api, db = Api(harness), harness.ctx.db
    api.activate(*next_person())  # the program's counter row made, if this is the first activation here
    written, deferred = db.loop_writes, db.loop_deferrals
    activated = api.activate(*next_person())
    after_activation = db.loop_writes
    redeemed = _redeem(api, activated.activation_token)
    assert redeemed.active
    if harness.backend == "sqlite":
        assert aio_server.loop_write_methods(harness.ctx) == aio_server.LOOP_WRITES
        assert (after_activation, db.loop_writes) == (written + 1, written + 2)  # one write each, on the loop
        assert db.loop_deferrals == deferred
    else:
        assert aio_server.loop_write_methods(harness.ctx) == frozenset()
        assert not db.loop_writes_ok()
        assert (after_activation, db.loop_writes, db.loop_deferrals) == (written, written, deferred) == (0, 0, 0)


def test_off_keeps_every_write_in_the_pool(harness: Harness) -> None:
    """ENTITLEMENT_LOOP_WRITES=off: no method is served by `_loop_write` (either backend)."""
    ctx = dataclasses.replace(harness.ctx, settings=dataclasses.replace(harness.ctx.settings, loop_writes="off"))
    assert aio_server.loop_write_methods(ctx) == frozenset()


def test_a_write_sqlite_cannot_begin_at_once_runs_in_the_pool_and_the_loop_keeps_answering(
        tmp_path: Path, request: pytest.FixtureRequest, server_log: tuple[Path, TextIO]) -> None:
    """Another connection holds SQLite's write lock: the activation tried on the loop is deferred
    (BEGIN IMMEDIATE with a busy timeout of 0, before anything was written) and runs in the pool,
    where it waits for the lock as any write does; checks are answered on the loop meanwhile; once
    the lock is free the activation is made once, logged once, and took one rate-limit token."""
    with own_server("sqlite", tmp_path / "own", request, check_rate_per_min=1, check_burst=3,
                    db_lock_timeout_ms=30_000) as server:
        api, db = Api(server), server.ctx.db
        agency_id, birth = next_ledger_person()
        check_id, check_birth = next_ledger_person()
        rid = f"loop-{uuid.uuid4().hex[:8]}"
        holder = sqlite3.connect(server.url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        activated: list[Any] = []
        activating = threading.Thread(target=lambda: activated.append(
            _activate(api, agency_id, birth, request_id="loop-deferred-1", rid=rid)))
        try:
            activating.start()
            deadline = time.monotonic() + 10
            while db.loop_deferrals == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert db.loop_deferrals == 1  # tried on the loop, deferred
            time.sleep(0.3)  # the activation now waits for the lock in the pool
            answer = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                job_seeker=identity(check_id, check_birth), program=PROGRAM), timeout=3)
            assert answer.decisions[0].eligible  # the loop is not held by the waiting write
            assert activating.is_alive() and not activated
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            activating.join(timeout=30)
        assert len(activated) == 1 and activated[0].activation.state == activation_pb2.ACTIVE
        with db.read() as s:
            made = s.execute(db_text("SELECT count(*) FROM activations")).scalar_one()
            records = s.execute(db_text("SELECT count(*) FROM idempotency_records WHERE request_id = :r"),
                                {"r": "loop-deferred-1"}).scalar_one()
        assert (made, records) == (1, 1)
        lines = _rpc_lines(server_log[0], rid)
        assert [line["code"] for line in lines] == ["OK"], lines  # one line: the pool's run
        # SQLite's lock free again: the next activation writes on the loop.
        before = db.loop_writes
        _activate(api, *next_ledger_person())
        assert db.loop_writes > before and db.loop_deferrals == 1
        # Burst 3, one token a minute: each activation took one (the deferred try gave its back),
        # the check one; the next call is refused.
        with pytest.raises(grpc.RpcError) as refused:
            api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                job_seeker=identity(check_id, check_birth), program=PROGRAM), timeout=3)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def db_text(sql: str) -> Any:
    from sqlalchemy import text
    return text(sql)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    upgrade(url)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:  # a table of this test's own
        conn.execute("CREATE TABLE loop_test (id INTEGER PRIMARY KEY)")
    database = Database(url, pool_size=4, lock_timeout_ms=30_000)
    try:
        yield database
    finally:
        database.dispose()


def _write_row(db: Database, key: int) -> None:
    with db.write() as s:
        s.execute(db_text("INSERT INTO loop_test (id) VALUES (:k)"), {"k": key})


def _rows(db: Database) -> set[int]:
    with db.read() as s:
        return {r[0] for r in s.execute(db_text("SELECT id FROM loop_test"))}


def test_on_the_loop_a_taken_writers_lock_defers_the_first_write_and_waits_for_a_later_one(sqlite_db: Database) -> None:
    """Storage level: within `loop_write()`, a write finding this process's writers' lock taken
    raises LoopWriteDeferred at once, having written nothing and leaving the holder's lock alone;
    once a write of the scope began, a later one waits for the lock instead."""
    db = sqlite_db
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.write() as s:  # outside a call: writes alone, holding the writers' lock
            s.execute(db_text("INSERT INTO loop_test (id) VALUES (100)"))
            held.set()
            release.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        assert not db.loop_writes_ok()  # the glance the server takes before trying the loop
        started = time.monotonic()
        with loop_write(), pytest.raises(LoopWriteDeferred):
            _write_row(db, 101)
        # At once, not after the holder's 10 s or the 30 s busy timeout (5 s: room for a loaded machine).
        assert time.monotonic() - started < 5 and db.loop_deferrals == 1 and db.loop_writes == 0
    finally:
        release.set()
        holder.join(10)
    assert _rows(db) == {100}  # the holder committed; the deferred write wrote nothing
    assert db.loop_writes_ok()

    with loop_write():
        _write_row(db, 102)  # free: written on "the loop"
        held.clear()
        release.clear()
        holder = threading.Thread(target=hold_other(db, held, release, 104))
        holder.start()
        assert held.wait(10)
        threading.Timer(0.3, release.set).start()
        started = time.monotonic()
        _write_row(db, 103)  # a later write of the same call: waits for the holder, no deferral
        waited = time.monotonic() - started
        holder.join(10)
    assert waited >= 0.25 and db.loop_deferrals == 1 and db.loop_writes == 2
    assert _rows(db) == {100, 102, 103, 104}

    # A first write that only makes what is missing (counters.ensure_row's) leaves the call's next
    # write free to be deferred: the call is then run again, and the re-run repeats it harmlessly.
    with loop_write():
        with db.write(idempotent=True) as s:
            s.execute(db_text("INSERT OR IGNORE INTO loop_test (id) VALUES (105)"))
        held.clear()
        release.clear()
        holder = threading.Thread(target=hold_other(db, held, release, 106))
        holder.start()
        assert held.wait(10)
        try:
            with pytest.raises(LoopWriteDeferred):
                _write_row(db, 107)
        finally:
            release.set()
            holder.join(10)
    assert db.loop_deferrals == 2 and _rows(db) == {100, 102, 103, 104, 105, 106}


def hold_other(db: Database, held: threading.Event, release: threading.Event, key: int) -> Any:
    def hold() -> None:
        with db.write() as s:
            s.execute(db_text("INSERT INTO loop_test (id) VALUES (:k)"), {"k": key})
            held.set()
            release.wait(10)
    return hold


def test_on_the_loop_sqlite_held_elsewhere_defers_at_once_and_the_pool_still_waits(sqlite_db: Database) -> None:
    """Another connection holds SQLite's write lock: a write within `loop_write()` is deferred at
    once (busy timeout 0, this process's writers' lock given back), and a write outside it, on the
    same pool of connections, still waits for the lock (its busy timeout set back)."""
    db = sqlite_db
    _write_row(db, 100)  # a pooled connection with the configured busy timeout
    holder = sqlite3.connect(db.url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with loop_write(), pytest.raises(LoopWriteDeferred):
            _write_row(db, 101)
        assert time.monotonic() - started < 5 and db.loop_deferrals == 1  # not the 30 s busy timeout
        assert db.loop_writes_ok()  # the writers' lock was given back
        threading.Timer(0.3, lambda: holder.execute("ROLLBACK")).start()
        started = time.monotonic()
        _write_row(db, 102)  # outside the loop's scope: waits for SQLite's lock, then writes
        assert time.monotonic() - started >= 0.25
    finally:
        holder.close()
    assert _rows(db) == {100, 102}


def test_slow_commits_send_the_writes_to_the_pool_and_only_commits_that_wrote_are_timed(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The fsync of a loop write's COMMIT holds the loop: while the recent COMMITs that wrote
    average more than LOOP_COMMIT_BOUND_S (a slow disk; set here as the writers' queue keeps it),
    the signup's writes run in the pool, without a try on the loop; a refused activation (its
    transaction rolled back) leaves the average alone, a made one moves it; under the bound, the
    writes are back on the loop."""
    from entitlement.storage.db import LOOP_COMMIT_BOUND_S
    with own_server("sqlite", tmp_path / "own", request) as server:
        api, db = Api(server), server.ctx.db
        queue = db._writers
        assert queue is not None
        _activate(api, *next_ledger_person())  # the program's counter row made
        slow = 3 * LOOP_COMMIT_BOUND_S  # as after a few slow COMMITs (the bound is 1 s here: disk_fast_enough)
        queue.commit_s = slow
        assert not db.loop_writes_ok()
        before = (db.loop_writes, db.loop_deferrals)
        with pytest.raises(grpc.RpcError) as refused:  # not in the registry: refused in the write block
            _activate(api, "99999999999", dt.date(1990, 1, 1))
        assert refused.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
        assert queue.commit_s == slow  # a rollback is no sample of the disk
        made = _activate(api, *next_ledger_person())
        assert made.activation.state == activation_pb2.ACTIVE
        assert (db.loop_writes, db.loop_deferrals) == before  # in the pool, never tried on the loop
        assert 0 < queue.commit_s < slow  # its COMMIT (this disk's) was averaged in
        queue.commit_s = LOOP_COMMIT_BOUND_S / 2
        assert db.loop_writes_ok()
        _activate(api, *next_ledger_person())
        assert db.loop_writes == before[0] + 1


def test_a_read_after_a_loop_write_waits_as_before(sqlite_db: Database) -> None:
    """The busy timeout of 0 a loop write sets on its pooled connection is not kept by a read that
    gets that connection next (a WAL read may meet a lock in a recovery: it waits the setting)."""
    db = sqlite_db
    with loop_write():
        _write_row(db, 100)
    with db.read() as s:  # the pool is LIFO: the loop write's connection
        assert s.execute(db_text("PRAGMA busy_timeout")).scalar_one() == 30_000
    with loop_write():
        _write_row(db, 101)
    with db.write() as s:  # and a pool write waits the setting too
        assert s.execute(db_text("PRAGMA busy_timeout")).scalar_one() == 30_000
