"""A write transaction's statements on its DBAPI connection (entitlement/storage/direct.py): what
they write and read back must be exactly what SQLAlchemy writes and reads, in the session's own
transaction, with SQLAlchemy's errors (parameters hidden) and its cursor events. (`db`: the
conftest's migrated database of its own, on SQLite and on PostgreSQL.)"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import bindparam, event, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from entitlement.storage import direct
from entitlement.storage.db import Database
from entitlement.storage.models import Activation, LedgerEntry, LogHead, LogNode

NOW = dt.datetime(2026, 3, 16, 9, 30, 15, 123456, tzinfo=dt.timezone.utc)
_INSERT = insert(Activation)
_BY_ID = select(Activation).where(Activation.id == bindparam("id"))
_COLUMNS = select(Activation.id, Activation.person_key, Activation.start_date, Activation.end_date,
                  Activation.account_id, Activation.redeemed_at, Activation.created_at).where(
    Activation.id == bindparam("id"))
_BUMP = update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1).returning(LogHead.size)


def _row(**over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uuid.uuid4().hex, "program_id": "premium-job-seekers", "program_version": "v1",
        "person_key": bytes(range(32)), "state": "active", "start_date": dt.date(2026, 3, 16),
        "end_date": dt.date(2026, 9, 15), "advisor_id": "A0001", "agency_code": "75011",
        "platform_id": "openclassrooms", "state_reason": "motif: reprise d'études \u2014 café",
        "decision_json": "{}", "snapshot_id": None, "token_jti": uuid.uuid4().hex, "account_id": None,
        "redeemed_at": None, "created_at": NOW, "updated_at": NOW}
    row.update(over)
    return row


def test_rows_written_directly_read_back_as_through_the_orm(db: Database) -> None:
    """Dates, aware datetimes (microseconds kept), bytes, NULLs and non-ASCII text, written on the
    DBAPI connection, are what the ORM reads; and read directly, what SQLAlchemy reads."""
    rows = [_row(), _row(account_id="acct-1", redeemed_at=NOW + dt.timedelta(days=1, microseconds=7),
                         person_key=b"\x00\xff" * 16)]
    with db.write() as s:
        st = direct.of(s)
        for r in rows:
            assert st.execute(_INSERT, r) == 1
    with db.read() as s:
        st = direct.of(s)
        for r in rows:
            a = s.execute(_BY_ID, {"id": r["id"]}).scalar_one()
            for key, value in r.items():
                got = getattr(a, key)
                if isinstance(value, dt.datetime):
                    got = got if got.tzinfo else got.replace(tzinfo=dt.timezone.utc)  # SQLite: naive UTC
                assert got == value, key
            mine = st.first(_COLUMNS, {"id": r["id"]})
            theirs = s.connection().execute(_COLUMNS, {"id": r["id"]}).one()
            assert tuple(mine) == tuple(theirs)
            assert mine._fields == tuple(theirs._fields)
        assert st.first(_COLUMNS, {"id": "0" * 32}) is None
        assert st.all(_COLUMNS, {"id": "0" * 32}) == []


def test_update_returning_and_executemany(db: Database) -> None:
    with db.write() as s:
        before = s.execute(select(LogHead.size)).scalar_one()
        st = direct.of(s)
        assert st.first(_BUMP).size == before + 1
        assert [tuple(r) for r in st.all(_BUMP)] == [(before + 2,)]
        st.execute_many(insert(LogNode), [{"level": 0, "idx": i, "hash": bytes([i]) * 32} for i in range(5)])
        st.execute_many(insert(LogNode), [])  # nothing to do
    with db.read() as s:
        assert s.execute(select(LogHead.size)).scalar_one() == before + 2
        stored = s.execute(select(LogNode.idx, LogNode.hash).order_by(LogNode.idx)).all()
        assert [(int(i), bytes(h)) for i, h in stored] == [(i, bytes([i]) * 32) for i in range(5)]


def test_a_failed_statement_raises_sqlalchemys_error_and_rolls_back_the_transaction(db: Database) -> None:
    """A duplicate key is SQLAlchemy's IntegrityError (what the write path's retry catches), with
    the parameters hidden; the transaction's earlier statements are rolled back with it."""
    first = _row(state_reason="secret-reason-1234")
    with db.write() as s:
        direct.of(s).execute(_INSERT, first)
    second = _row(id=first["id"], state_reason="secret-reason-5678")
    with pytest.raises(IntegrityError) as info:
        with db.write() as s:
            st = direct.of(s)
            st.first(_BUMP)
            st.execute(_INSERT, second)
    assert "secret-reason" not in str(info.value)
    assert isinstance(info.value.orig, db.engine.dialect.loaded_dbapi.Error)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 1
        assert s.execute(select(LogHead.size)).scalar_one() == 0  # the bump went with the rollback
    with db.write() as s:  # the pool's connection is usable again
        assert direct.of(s).first(_BUMP).size == 1


def test_cursor_events_see_every_direct_statement(db: Database) -> None:
    seen: list[tuple[str, Any, bool]] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        seen.append((statement, parameters, many))
    event.listen(db.engine, "before_cursor_execute", on_execute)
    try:
        with db.write() as s:
            st = direct.of(s)
            r = _row()
            st.execute(_INSERT, r)
            st.execute_many(insert(LedgerEntry), [
                {"activation_id": r["id"], "program_id": "p", "funder_id": f, "kind": "commit", "month": "2026-03",
                 "amount_cents": 100, "created_at": NOW} for f in ("a", "b")])
    finally:
        event.remove(db.engine, "before_cursor_execute", on_execute)
    dml = [(sql.split()[0:3], many) for sql, _p, many in seen if not sql.startswith("BEGIN")]
    assert dml == [(["INSERT", "INTO", "activations"], False), (["INSERT", "INTO", "ledger_entries"], True)]
    params = [p for sql, p, _m in seen if "ledger_entries" in sql][0]
    assert len(params) == 2


def test_the_session_transaction_is_the_one_used(db: Database) -> None:
    """Statements sent directly and through the session see each other before the commit."""
    with db.write() as s:
        r = _row()
        direct.of(s).execute(_INSERT, r)
        assert s.get(Activation, r["id"]) is not None  # the ORM reads the direct write
        s.add(LedgerEntry(activation_id=r["id"], program_id="p", funder_id="f", kind="commit", month="2026-03",
                          amount_cents=1, created_at=NOW))
        s.flush()
        assert direct.of(s).first(select(func.count()).select_from(LedgerEntry))[0] == 1


def test_a_lost_connection_is_an_invalidated_error_and_the_next_transaction_reconnects(
        db: Database, backend: tuple[str, str], request: pytest.FixtureRequest) -> None:
    if backend[0] == "sqlite":
        pytest.skip("SQLite has no server that could end the connection")
    admin = request.getfixturevalue("pg_server")
    with pytest.raises(DBAPIError) as info:
        with db.write() as s:
            st = direct.of(s)
            pid = st.first(select(func.pg_backend_pid()))[0]
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            st.first(_BUMP)
    assert info.value.connection_invalidated, info.value
    with db.write() as s:
        assert direct.of(s).first(_BUMP).size == 1
