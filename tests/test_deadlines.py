"""Deadlines and cancellation, over the real channel, on both backends.

A call whose deadline passes while the server waits for the database (another connection holds
SQLite's write lock, or PostgreSQL's event-log head row) ends with DEADLINE_EXCEEDED at the client,
and the server stops waiting by itself at that deadline, committing nothing; a client that cancels
mid-call gets nothing half done either; in both cases a retry with the same request_id is answered
exactly once, and every invariant holds (entitlement.doctor). A client stream given up midway is
logged CANCELLED or DEADLINE_EXCEEDED, never as an unexpected error. Inside a call, database waits
are bounded by its deadline (lock_timeout and statement_timeout, busy_timeout), a write is not
started with less than deadline.FLOOR_S left, and not committed for a caller that is gone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy import func, select, text

from support import (TODAY, Api, Harness, date_msg, expect_error, identity, log_records, make_registry_file,
                     next_person, wait_until)

from entitlement import counters, deadline, doctor, inflight
from entitlement.errors import Cancelled, DeadlineExceeded
from entitlement.storage.models import Activation, Event, IdempotencyRecord, LedgerEntry
from entitlement.v1 import activation_pb2, registry_pb2

ADVISOR = "advisor-paris"
WAIT_LIMIT_S = 20.0  # how long a test waits for the server to end a call (lock waits used to be 30 s)


# ------------------------------------------------------------------------------------ helpers

class Blocker:
    """Another database connection holding what every activation must write: SQLite's write lock,
    or PostgreSQL's row of the event log head (each event increments it)."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self._release: Callable[[], None] | None = None

    def __enter__(self) -> "Blocker":
        # The program's counter row is made by the first activation a Database serves, in a write
        # of its own before the call's claim (counters.ensure_row): made now, so that a test run
        # alone sees its call claimed, then waiting for this lock, as after any earlier activation.
        counters.ensure_row(self.h.ctx.db, "premium-job-seekers")
        if self.h.backend == "sqlite":
            conn = sqlite3.connect(self.h.url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
            conn.execute("BEGIN IMMEDIATE")

            def release_sqlite() -> None:
                conn.rollback()
                conn.close()
            self._release = release_sqlite
        else:
            pg = psycopg.connect(self.h.url)
            pg.execute("SELECT size FROM log_head WHERE id = 1 FOR UPDATE")

            def release_pg() -> None:
                pg.rollback()
                pg.close()
            self._release = release_pg
        return self

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()

    def server_waits(self) -> bool:
        """PostgreSQL: a server session waits for our lock. (SQLite shows no waiters: True.)"""
        if self.h.backend == "sqlite":
            return True
        with psycopg.connect(self.h.url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock'").fetchone()
        return bool(row and row[0])


def log_lines(h: Harness, request_id: str) -> list[dict[str, Any]]:
    return [r for r in log_records(h.log_path) if r.get("request_id") == request_id]


def logged_code(h: Harness, request_id: str) -> str | None:
    """The status the server logged for the call with this x-request-id, once it ended."""
    codes = [r["code"] for r in log_lines(h, request_id) if r.get("event") == "rpc"]
    return codes[-1] if codes else None


def metadata(h: Harness, caller: str, trace: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {h.tokens[caller]}"), ("x-request-id", trace))


@dataclass(frozen=True)
class Records:
    activations: int
    ledger_entries: int
    created_events: int
    acknowledged: bool  # an idempotency record of the request exists


def records(h: Harness, agency_id: str, request_id: str) -> Records:
    """What the database holds for this person and request (read beside any lock: reads never wait)."""
    key = h.ctx.pseudo.person_key(agency_id)
    with h.ctx.db.read() as s:
        ids = s.execute(select(Activation.id).where(Activation.person_key == key)).scalars().all()
        names = [f"activations/{i}" for i in ids]
        ledger = s.execute(select(func.count()).select_from(LedgerEntry)
                           .where(LedgerEntry.activation_id.in_(ids))).scalar_one() if ids else 0
        events = s.execute(select(func.count()).select_from(Event).where(
            Event.subject.in_(names), Event.type == "activation.created")).scalar_one() if ids else 0
        acknowledged = s.get(IdempotencyRecord, (ADVISOR, request_id)) is not None
    return Records(len(ids), ledger, events, acknowledged)


NOTHING = Records(0, 0, 0, False)


def assert_all_or_nothing(h: Harness, agency_id: str, request_id: str) -> Records:
    r = records(h, agency_id, request_id)
    assert r == NOTHING or (r.activations == 1 and r.ledger_entries >= 1 and r.created_events == 1
                            and r.acknowledged), r
    problems = doctor.check(h.ctx.db, leaves=False)
    assert not problems, problems[:5]
    return r


def assert_exactly_once(api: Api, request: activation_pb2.ActivateEntitlementRequest, agency_id: str) -> None:
    """Retries with the same request_id get one answer; the database holds one complete activation."""
    first = api.as_(ADVISOR).ActivateEntitlement(request)
    again = api.as_(ADVISOR).ActivateEntitlement(request)
    assert again.activation.name == first.activation.name
    assert again.activation_token == first.activation_token
    r = records(api.h, agency_id, request.request_id)
    assert r.activations == 1 and r.ledger_entries >= 1 and r.created_events == 1 and r.acknowledged, r
    assert not doctor.check(api.h.ctx.db, leaves=False)


def activation_request(agency_id: str, birth: dt.date, reason: str) -> activation_pb2.ActivateEntitlementRequest:
    return activation_pb2.ActivateEntitlementRequest(
        request_id=uuid.uuid4().hex, job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason=reason)


# ------------------------------------------------------------------------------- unary calls

def test_a_deadline_passing_while_the_database_is_locked(harness: Harness) -> None:
    h, api = harness, Api(harness)
    agency_id, birth = next_person()
    request = activation_request(agency_id, birth, "deadline test")
    trace = f"deadline-{uuid.uuid4().hex[:12]}"
    with Blocker(h) as lock:
        expect_error(api.as_(ADVISOR).ActivateEntitlement, request, grpc.StatusCode.DEADLINE_EXCEEDED,
                     metadata=metadata(h, ADVISOR, trace), timeout=1.5)
        # The server stops waiting at the deadline by itself: the lock is still held.
        wait_until(lambda: logged_code(h, trace) is not None, "the server ended the call")
        assert logged_code(h, trace) == "DEADLINE_EXCEEDED"
        assert not inflight.is_processing(h.ctx.db, ADVISOR, request.request_id)
        assert records(h, agency_id, request.request_id) == NOTHING
        lock.release()
    assert assert_all_or_nothing(h, agency_id, request.request_id) == NOTHING
    assert_exactly_once(api, request, agency_id)


def test_a_client_cancelling_mid_call_leaves_nothing_half_done(harness: Harness) -> None:
    h, api = harness, Api(harness)
    agency_id, birth = next_person()
    request = activation_request(agency_id, birth, "cancel test")
    trace = f"cancel-{uuid.uuid4().hex[:12]}"
    with Blocker(h) as lock:
        stub = h.channel.unary_unary("/entitlement.v1.ActivationService/ActivateEntitlement",
                                     request_serializer=activation_pb2.ActivateEntitlementRequest.SerializeToString,
                                     response_deserializer=activation_pb2.ActivateEntitlementResponse.FromString)
        call = stub.future(request, metadata=metadata(h, ADVISOR, trace), timeout=60)
        wait_until(lambda: inflight.is_processing(h.ctx.db, ADVISOR, request.request_id), "the server took the call")
        wait_until(lock.server_waits, "the server waits for the lock")
        assert call.cancel()
        time.sleep(1.0)  # the cancellation travels to the server while it still waits
        lock.release()
        wait_until(lambda: logged_code(h, trace) is not None, "the server ended the call")
    code = logged_code(h, trace)
    r = assert_all_or_nothing(h, agency_id, request.request_id)
    assert code == "CANCELLED", f"the server finished the cancelled call with {code}"
    assert r == NOTHING  # it noticed before committing: rolled back
    assert_exactly_once(api, request, agency_id)


def test_a_retry_while_the_first_attempt_waits_is_refused_then_answered_once(harness: Harness) -> None:
    """The first attempt is stuck behind the lock past its deadline; a retry meanwhile is ABORTED
    (REQUEST_IN_FLIGHT); once the first gave up, retries create the activation exactly once."""
    h, api = harness, Api(harness)
    agency_id, birth = next_person()
    request = activation_request(agency_id, birth, "retry test")
    stub = h.channel.unary_unary("/entitlement.v1.ActivationService/ActivateEntitlement",
                                 request_serializer=activation_pb2.ActivateEntitlementRequest.SerializeToString,
                                 response_deserializer=activation_pb2.ActivateEntitlementResponse.FromString)
    trace = f"retry-{uuid.uuid4().hex[:12]}"
    with Blocker(h):
        first = stub.future(request, metadata=metadata(h, ADVISOR, trace), timeout=2)
        wait_until(lambda: inflight.is_processing(h.ctx.db, ADVISOR, request.request_id), "the server took the call")
        f = expect_error(api.as_(ADVISOR).ActivateEntitlement, request, grpc.StatusCode.ABORTED, timeout=5)
        assert f.reason == "REQUEST_IN_FLIGHT"
        with pytest.raises(grpc.RpcError) as err:
            first.result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: logged_code(h, trace) is not None, "the server ended the first attempt")
    assert assert_all_or_nothing(h, agency_id, request.request_id) == NOTHING
    assert_exactly_once(api, request, agency_id)


# ---------------------------------------------------------------------------- a client stream

@pytest.mark.parametrize("checksum", [False, True], ids=["no-sha256", "sha256"])
@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_client_stream_given_up_midway(harness: Harness, tmp_path: Path, how: str, checksum: bool) -> None:
    """The agency's feed stalls mid-extract and gives up: the import ends CANCELLED or
    DEADLINE_EXCEEDED (not an unexpected error), the server stays well. (The extract is the test
    registry itself, so that even a completed import would change nothing.) With the file's
    SHA-256 in the header, a server that took the cut-off stream for a whole one would answer
    INVALID_ARGUMENT (the bytes differ) instead: it must not."""
    h = harness
    extract = make_registry_file(tmp_path / "registry.csv").read_bytes()
    gate = threading.Event()
    sent = threading.Event()

    def messages() -> Iterator[registry_pb2.ImportExtractRequest]:
        yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
            extracted_on=date_msg(TODAY - dt.timedelta(days=1)), source_name="stalled.csv",
            sha256=hashlib.sha256(extract).hexdigest() if checksum else ""))
        yield registry_pb2.ImportExtractRequest(chunk=extract[:4096])
        sent.set()
        gate.wait(WAIT_LIMIT_S)  # the feed stalls

    push = h.channel.stream_unary("/entitlement.v1.RegistryService/ImportExtract",
                                  request_serializer=registry_pb2.ImportExtractRequest.SerializeToString,
                                  response_deserializer=registry_pb2.ImportExtractResponse.FromString)
    trace = f"stall-{how}-{uuid.uuid4().hex[:8]}"
    md = metadata(h, "agency-feed", trace)
    try:
        if how == "deadline":
            with pytest.raises(grpc.RpcError) as err:
                push(messages(), metadata=md, timeout=1.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            call = push.future(messages(), metadata=md, timeout=60)
            wait_until(sent.is_set, "the client sent its first chunk")
            assert call.cancel()
        wait_until(lambda: logged_code(h, trace) is not None, "the server ended the import")
    finally:
        gate.set()
    assert logged_code(h, trace) == ("DEADLINE_EXCEEDED" if how == "deadline" else "CANCELLED")
    assert not [r for r in log_lines(h, trace) if r.get("level") == "error"], log_lines(h, trace)
    assert not doctor.check(h.ctx.db, leaves=False)
    # The server's one import slot was given back: the next push is not refused IMPORT_IN_PROGRESS
    # (this one is no registry extract: refused, the snapshot in force stays).
    f = expect_error(lambda r: push(iter(r), metadata=metadata(h, "agency-feed", f"next-{uuid.uuid4().hex[:8]}"),
                                    timeout=30),
                     [registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
                         extracted_on=date_msg(TODAY), source_name="next.csv")),
                      registry_pb2.ImportExtractRequest(chunk=b"not,a,registry\n1,2,3\n")],
                     grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "EXTRACT_REFUSED"


# ------------------------------------------------------------------- the database and deadlines

def _timeouts(h: Harness) -> dict[str, int]:
    """The lock waits of a write transaction (nothing is written)."""
    with h.ctx.db.write() as s:
        if h.backend == "sqlite":
            return {"busy_timeout": int(s.execute(text("PRAGMA busy_timeout")).scalar_one())}
        rows = s.execute(text("SELECT name, setting FROM pg_settings "
                              "WHERE name IN ('lock_timeout', 'statement_timeout')")).all()
        return {name: int(value) for name, value in rows}


def test_database_waits_are_bounded_by_the_call_deadline(harness: Harness) -> None:
    with deadline.bound(5.0):
        inside = _timeouts(harness)
    outside = _timeouts(harness)
    assert inside and all(0 < ms <= 5000 for ms in inside.values()), inside
    settings = harness.ctx.settings
    if harness.backend == "sqlite":  # the server's own bound for a write's lock wait
        assert outside == {"busy_timeout": settings.db_lock_timeout_ms}
    else:  # SET LOCAL: gone with the transaction; the session keeps the settings' bounds
        assert outside == {"lock_timeout": settings.db_lock_timeout_ms,
                           "statement_timeout": settings.db_statement_timeout_ms}
    with deadline.bound(None):  # a call without a deadline waits as long as before
        assert _timeouts(harness) == outside


def test_a_write_is_not_started_with_too_little_time_left(harness: Harness) -> None:
    started = []
    for remaining in (deadline.FLOOR_S / 2, 0.0, -1.0):
        with deadline.bound(remaining), pytest.raises(DeadlineExceeded):
            with harness.ctx.db.write():
                started.append(remaining)
    with deadline.bound(10.0, active=lambda: False), pytest.raises(Cancelled):
        with harness.ctx.db.write():
            started.append("cancelled")
    assert not started
    with deadline.bound(10.0), harness.ctx.db.write() as s:
        assert s.execute(text("SELECT 1")).scalar_one() == 1


@pytest.mark.parametrize("gone", ["cancelled", "deadline"])
def test_a_write_is_rolled_back_when_the_caller_is_gone_before_the_commit(harness: Harness, gone: str) -> None:
    request_id = uuid.uuid4().hex
    active = [True]
    expected = Cancelled if gone == "cancelled" else DeadlineExceeded
    with deadline.bound(0.5 if gone == "deadline" else 10.0, active=lambda: active[0]), pytest.raises(expected):
        with harness.ctx.db.write() as s:
            s.add(IdempotencyRecord(caller_id="deadline-test", request_id=request_id, method="none",
                                    request_sha256="0" * 64, response=b"{}", created_at=harness.clock.now()))
            s.flush()
            active[0] = False  # the client goes away...
            if gone == "deadline":
                wait_until(deadline.expired, "the deadline passed")
    with harness.ctx.db.read() as s:  # ...and what the transaction wrote is not there
        assert s.get(IdempotencyRecord, ("deadline-test", request_id)) is None
