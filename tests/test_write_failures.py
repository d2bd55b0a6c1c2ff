"""Writes that fail for the state of the database, not for a wait: a full disk (SQLite), a
connection the server ended (PostgreSQL). Such a failure is an outage: answered UNAVAILABLE
(reason DATABASE_UNAVAILABLE, retry with the same request_id), whatever the call's deadline, and
the retry, once the database is back, makes the activation once. Through the real server, on a real
full filesystem (a small tmpfs) and a real terminated PostgreSQL session.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import grpc
import psycopg
import pytest
from sqlalchemy import text

from own_server import next_ledger_person, own_server
from support import Api, Harness, failure, identity, tmpfs

from entitlement import logs
from entitlement.v1 import activation_pb2, eligibility_pb2

PROGRAM = "programs/premium-job-seekers"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of its own (a 32 MiB tmpfs), to fill."""
    with tmpfs(tmp_path / "disk", "32m") as where:
        yield where


def _activate(api: Api, person: tuple[str, Any], request_id: str, timeout: float = 30) -> Any:
    return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        request_id=request_id, job_seeker=identity(*person), program=PROGRAM,
        platform="platforms/openclassrooms", reason="write failure test"), timeout=timeout)


def _made(h: Harness, request_id: str) -> int:
    with h.ctx.db.read() as s:
        return int(s.execute(text("SELECT count(*) FROM idempotency_records WHERE request_id = :r"),
                             {"r": request_id}).scalar_one())


def _fill(disk: Path) -> Path:
    """Take every free byte of the filesystem (as another program would); the file to delete."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as fh:
        for size in (len(chunk), 4096, 512, 1):  # to the last byte
            try:
                while True:
                    fh.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _truncate_log(db_path: Path) -> None:
    """The operator's `PRAGMA wal_checkpoint(TRUNCATE)`: the write-ahead log copied back and cut to
    zero bytes, so that the next commit must grow it (frames written over an old log's would find
    room on a full disk)."""
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        for _ in range(200):
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                break
            time.sleep(0.01)  # a reader of the server's on the log, or its own checkpoint thread
        else:
            raise AssertionError("the log could not be truncated")
    finally:
        conn.close()
    assert db_path.with_name(db_path.name + "-wal").stat().st_size == 0


def _full_disk_activation(h: Harness, disk: Path, timeout: float) -> None:
    """An activation whose COMMIT meets a full disk: UNAVAILABLE, nothing made; once there is room
    again, its retry with the same request_id makes it once."""
    api = Api(h)
    _activate(api, next_ledger_person(), f"warm-{uuid.uuid4().hex[:8]}")  # the program's counter row made
    person, request_id = next_ledger_person(), f"full-{uuid.uuid4().hex[:8]}"
    _truncate_log(disk / "own" / "own.db")
    filler = _fill(disk)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            _activate(api, person, request_id, timeout)
    finally:
        filler.unlink()
    f = failure(refused.value)
    assert (f.code, f.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"), f
    assert _made(h, request_id) == 0
    done = _activate(api, person, request_id)
    assert done.activation.state == activation_pb2.ACTIVE
    assert _activate(api, person, request_id).activation.name == done.activation.name  # replayed
    assert _made(h, request_id) == 1


def test_a_write_that_meets_a_full_disk_is_an_outage(backend: tuple[str, str], small_disk: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """SQLite's "database or disk is full" (SQLITE_FULL, a COMMIT that cannot grow the log) was
    answered INTERNAL, logged as an unhandled exception, and the health monitor not told; in a group
    of writers the same COMMIT's failure was UNAVAILABLE (GroupAborted)."""
    if backend[0] != "sqlite":
        pytest.skip("PostgreSQL: its disk cannot be filled from a test; its disk full (SQLSTATE 53100) is "
                    "an OperationalError, which the access log takes for an outage already")
    with own_server("sqlite", small_disk / "own", request) as h:
        _full_disk_activation(h, small_disk, timeout=30)


def test_a_write_failing_for_no_wait_is_no_deadline_exceeded(backend: tuple[str, str], tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    """A call whose deadline is nearer than the database's own bound on lock waits (here 60 s against a
    deadline of 30 s) has its waits cut to the deadline, and a wait so cut is DEADLINE_EXCEEDED. Every
    other failure of its transaction was too ("the call's deadline passed before its work was
    committed; nothing was. Retry with a longer deadline"), its deadline far off: a full disk
    (SQLite), a connection the server ended, perhaps during the COMMIT (PostgreSQL). They are
    outages: UNAVAILABLE, as for a call with a longer deadline."""
    name = backend[0]
    if name == "sqlite":
        disk = request.getfixturevalue("small_disk")
        # (In the pool: a write on the event loop never waits, so its waits are never cut to the deadline.)
        with own_server("sqlite", disk / "own", request, db_lock_timeout_ms=60_000, loop_writes="off") as h:
            _full_disk_activation(h, disk, timeout=30)
        return
    with own_server("postgres", tmp_path / "own", request, db_lock_timeout_ms=60_000) as h:
        api = Api(h)
        _activate(api, next_ledger_person(), f"warm-{uuid.uuid4().hex[:8]}")
        person, request_id = next_ledger_person(), f"ended-{uuid.uuid4().hex[:8]}"
        outcome: list[BaseException | None] = []

        def activate() -> None:
            try:
                _activate(api, person, request_id, timeout=30)
                outcome.append(None)
            except grpc.RpcError as err:
                outcome.append(err)

        with psycopg.connect(h.url) as holder:
            # Another writer holds the event log's head: the activation's write waits for it.
            holder.execute("SELECT size FROM log_head WHERE id = 1 FOR UPDATE")
            caller = threading.Thread(target=activate)
            caller.start()
            try:
                waiting = None
                for _ in range(3000):
                    waiting = holder.execute(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pg_backend_pid() = ANY(pg_blocking_pids(pid))").fetchone()
                    if waiting is not None:
                        break
                    time.sleep(0.01)
                assert waiting is not None, "the activation never waited for the log head"
                # An administrator (or a fast shutdown) ends its session.
                holder.execute("SELECT pg_terminate_backend(%s)", (waiting[0],))
                caller.join(30)
                assert not caller.is_alive()
            finally:
                holder.rollback()
        caller.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError), outcome
        f = failure(outcome[0])
        assert (f.code, f.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"), f
        assert _made(h, request_id) == 0
        done = _activate(api, person, request_id)  # the retry a client makes
        assert done.activation.state == activation_pb2.ACTIVE
        assert _made(h, request_id) == 1


def test_a_log_that_refuses_lines_changes_no_answer(backend: tuple[str, str], tmp_path: Path, small_disk: Path,
                                                    request: pytest.FixtureRequest,
                                                    server_log: tuple[Path, TextIO]) -> None:
    """The server's log on a full disk (or its reader gone): the access log's line, written after the
    call's work, raised its OSError, and the call answered UNKNOWN ("Unexpected <class 'OSError'>:
    [Errno 28] No space left on device") with its activation committed; the client's retry with the
    same request_id replayed it and failed the same way, so the client never learnt it. A line
    the log refuses is dropped: the answers are the work's."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        _activate(api, next_ledger_person(), f"warm-{uuid.uuid4().hex[:8]}")
        person, request_id = next_ledger_person(), f"logfull-{uuid.uuid4().hex[:8]}"
        with (small_disk / "server.log").open("w") as stream:
            filler = _fill(small_disk)
            logs.configure("info", stream=stream)
            try:
                made = _activate(api, person, request_id)
                assert _activate(api, person, request_id).activation.name == made.activation.name  # replayed
                check = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                    job_seeker=identity(*next_ledger_person()), program=PROGRAM))
                assert check.decisions[0].eligible
            finally:
                logs.configure("info", stream=server_log[1])  # the session's log again
                filler.unlink()
        assert made.activation.state == activation_pb2.ACTIVE and _made(h, request_id) == 1
