"""Database round trips per RPC (issue "Step 7": one per read RPC is the goal).

The statements each call sends are counted on the real server's own Database (the transactional
engine through SQLAlchemy's cursor events, the hot reads' DBAPI connections through their
listeners), from the server's RPC worker threads only: a check of a
program without caps and a token verification each cost exactly one statement and no transaction
(no BEGIN / COMMIT round trips), on both backends. The write path's count is printed, not
asserted, for BENCHMARKS.md's reading; what was taken out of it stays out (one look at the person's
activations, the report's time zone read with the event's sequence number, no second lock of the
log head on PostgreSQL).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event
from support import Api, identity, next_person

from entitlement.v1 import activation_pb2, eligibility_pb2


@dataclass
class Trips:
    statements: dict[str, list[str]] = field(default_factory=lambda: {"transactional": [], "autocommit": []})
    transactions: int = 0


def _serving_a_call() -> bool:
    """Only what the server's RPC workers send counts (not the health monitor's pings)."""
    return threading.current_thread().name.startswith("rpc")


@contextmanager
def counting(api: Api) -> Iterator[Trips]:
    db = api.h.ctx.db
    trips = Trips()
    lock = threading.Lock()
    listeners = []
    def on_execute(_conn: object, _cursor: object, statement: str, *_a: object) -> None:
        if _serving_a_call():
            with lock:
                trips.statements["transactional"].append(" ".join(statement.split()))
    event.listen(db.engine, "before_cursor_execute", on_execute)
    listeners.append((db.engine, "before_cursor_execute", on_execute))

    def on_snapshot(_conn: object, _cursor: object, statement: str, *_a: object) -> None:
        if _serving_a_call():  # reads on the autocommit pool (Database.snapshot)
            with lock:
                trips.statements["autocommit"].append(" ".join(statement.split()))
    event.listen(db.reader, "before_cursor_execute", on_snapshot)
    listeners.append((db.reader, "before_cursor_execute", on_snapshot))

    def on_hot_read(statement: str) -> None:  # the hot reads go straight to the DBAPI
        if _serving_a_call():
            with lock:
                trips.statements["autocommit"].append(" ".join(statement.split()))
    db.hot.listeners.append(on_hot_read)

    def on_begin(_conn: object) -> None:
        if not _serving_a_call():
            return
        with lock:
            trips.transactions += 1
    event.listen(db.engine, "begin", on_begin)
    listeners.append((db.engine, "begin", on_begin))
    try:
        yield trips
    finally:
        db.hot.listeners.remove(on_hot_read)
        for engine, name, fn in listeners:
            event.remove(engine, name, fn)



def test_a_check_is_one_statement_and_no_transaction(api: Api) -> None:
    agency_id, birth = next_person()
    request = eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(agency_id, birth),
                                                      program="programs/premium-job-seekers")
    api.advisor.CheckEligibility(request)  # warm: the caller's token lookup is cached after this
    with counting(api) as trips:
        answer = api.advisor.CheckEligibility(request)
    assert answer.decisions[0].eligible
    assert trips.statements["autocommit"] and len(trips.statements["autocommit"]) == 1, trips
    assert trips.statements["transactional"] == [] and trips.transactions == 0, trips


def test_a_verification_is_one_statement_and_no_transaction(api: Api) -> None:
    made = api.activate()
    account = f"acct-{uuid.uuid4().hex[:12]}"
    api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=made.activation_token, account_id=account))
    request = activation_pb2.VerifyEntitlementRequest(account_id=account)
    api.platform.VerifyEntitlement(request)
    with counting(api) as trips:
        status = api.platform.VerifyEntitlement(request)
    assert status.active
    assert len(trips.statements["autocommit"]) == 1, trips
    assert trips.statements["transactional"] == [] and trips.transactions == 0, trips


def test_the_write_path_statement_count_is_reported(api: Api) -> None:
    api.activate()  # warm
    with counting(api) as trips:
        made = api.activate(request_id=f"rt-{uuid.uuid4().hex[:12]}")
    assert made.activation.name.startswith("activations/")
    # One transaction; what it sends is printed for the performance notes (no bound asserted:
    # the count changes with features, the one-transaction shape must not).
    assert trips.transactions == 1, trips
    assert trips.statements["transactional"], trips
    print(f"\n[{api.h.backend}] ActivateEntitlement: {len(trips.statements['transactional'])} statements "
          f"in 1 transaction, {len(trips.statements['autocommit'])} outside:")
    for s in trips.statements["transactional"]:
        print("   ", s[:60])


def test_the_write_path_sends_no_statement_it_can_do_without(api: Api) -> None:
    api.activate()  # warm
    with counting(api) as trips:
        api.activate(request_id=f"rt-{uuid.uuid4().hex[:12]}")
    sent = trips.statements["transactional"]
    assert trips.transactions == 1, trips
    # The live-activation check and the stale-row expiry share one (locking) SELECT.
    assert sum(1 for s in sent if s.startswith("SELECT") and " FROM activations " in f"{s} ") <= 1, sent
    # The report's time zone comes with the sequence number (UPDATE log_head ... RETURNING).
    assert not any(s.startswith("SELECT report_rollup.timezone") for s in sent), sent
    # The event's UPDATE of log_head holds its row: the rollup does not lock it again.
    assert not any(s.startswith("SELECT log_head.id") for s in sent), sent
    # The idempotency record and the log's left halves: one statement each.
    assert sum(1 for s in sent if s.startswith("SELECT idempotency_records")) == 1, sent
    assert sum(1 for s in sent if s.startswith("SELECT log_nodes")) <= 1, sent


def test_an_activation_on_postgresql_syncs_its_pipeline_once_after_its_begin(api: Api, monkeypatch: Any) -> None:
    """PostgreSQL: an activation's transaction runs in pipeline mode from its BEGIN, whose Sync is
    sent but not waited for (direct.py); the program counter's UPDATE waits for no Sync of its own
    (its row count comes back with the event's sequence number: counters.Reservation); the COMMIT's
    Sync is the last one (leaving pipeline mode after it sends none). Two Syncs in all; counted on
    psycopg's own method (a spy: it still runs)."""
    if api.h.backend == "sqlite":
        pytest.skip("SQLite has no pipeline mode")
    import psycopg
    api.activate()  # warm: the program's counter row is known, the caller cached
    syncs: list[str] = []
    real = psycopg.Pipeline._enqueue_sync

    def counted(self: Any) -> None:
        if _serving_a_call():
            syncs.append(threading.current_thread().name)
        real(self)
    monkeypatch.setattr(psycopg.Pipeline, "_enqueue_sync", counted)
    with counting(api) as trips:
        made = api.activate(request_id=f"rt-{uuid.uuid4().hex[:12]}")
    assert made.activation.name.startswith("activations/")
    assert trips.transactions == 1, trips
    assert len(syncs) == 2, syncs
