"""A write transaction's statements on its DBAPI connection (entitlement/storage/direct.py): what
they write and read back must be exactly what SQLAlchemy writes and reads, in the session's own
transaction, with SQLAlchemy's errors (parameters hidden) and its cursor events. (`db`: the
conftest's migrated database of its own, on SQLite and on PostgreSQL.)"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import bindparam, event, func, insert, literal_column, select, update
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
            assert st.changed(_INSERT, r) == 1
    with db.read() as s:
        st = direct.of(s)
        for r in rows:
            a = s.execute(_BY_ID, {"id": r["id"]}).scalar_one()
            for key, value in r.items():
                got = getattr(a, key)
                if isinstance(value, dt.datetime):
                    got = got if got.tzinfo else got.replace(tzinfo=dt.timezone.utc)  # SQLite: naive UTC
                assert got == value, key
            # Found by its key through the ORM: stored as the BLOB SQLAlchemy writes (on SQLite the
            # direct path binds a bytearray, hotread._sqlite_blob; a TEXT would not compare equal).
            assert s.execute(select(Activation.id).where(Activation.person_key == r["person_key"])).scalar_one() == r["id"]
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


# ----------------------------------------------------------------------------- pipeline (PostgreSQL)

def _person(**over: Any) -> dict[str, Any]:
    """An activation row of a person of its own (one live activation per person and program)."""
    return _row(person_key=uuid.uuid4().bytes * 2, **over)


def _pipelined(s: Any) -> tuple[direct.Statements, Any]:
    """The write transaction's statements, in pipeline mode from here on, and its DBAPI connection
    (to look at after the transaction)."""
    st = direct.of(s)
    st.pipeline()
    return st, s.connection().connection.driver_connection


def _pipeline_on(dbapi: Any) -> bool:
    return bool(getattr(dbapi, "pgconn", None) is not None and dbapi.pgconn.pipeline_status)


def _clean(db: Database, dbapi: Any) -> None:
    """The connection a pipelined transaction used is back in the pool out of pipeline mode and
    outside any transaction (or was discarded), and the next transactions work."""
    if not db.is_sqlite and not dbapi.closed:
        assert not _pipeline_on(dbapi)
        assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    for _ in range(3):  # whichever pooled connection comes next
        with db.write() as s:
            st = direct.of(s)
            assert not _pipeline_on(s.connection().connection.driver_connection)
            st.first(_BUMP)


def test_a_pipeline_queues_writes_until_a_read_or_the_commit(db: Database) -> None:
    """After pipeline(), writes whose answer nobody reads are queued on PostgreSQL: the connection is
    in pipeline mode and the queued INSERTs go with the next read (which sees them) and the COMMIT.
    Nothing changes on SQLite. Row counts stay exact (`changed` waits for the queue)."""
    rows = [_person(), _person()]
    with db.write() as s:
        st = direct.of(s)
        before = st.first(_BUMP).size
        st, dbapi = _pipelined(s)
        assert _pipeline_on(dbapi) is (not db.is_sqlite)
        st.execute(_INSERT, rows[0])
        st.execute_many(insert(LedgerEntry), [
            {"activation_id": rows[0]["id"], "program_id": "p", "funder_id": f, "kind": "commit",
             "month": "2026-03", "amount_cents": 100, "created_at": NOW} for f in ("a", "b")])
        assert st.first(_BUMP).size == before + 1  # a read: the queue is flushed, its answer waited for
        assert st.first(select(func.count()).select_from(LedgerEntry))[0] == 2
        st.execute(_INSERT, rows[1])
        assert st.changed(update(Activation).where(Activation.id.in_([r["id"] for r in rows]))
                          .values(state="suspended")) == 2
        st.execute(_INSERT, _person(id=uuid.uuid4().hex))
    _clean(db, dbapi)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 3
        assert s.execute(select(LogHead.size)).scalar_one() == before + 1 + 3  # _clean's bumps too
        states = s.execute(select(Activation.state).where(Activation.id.in_([r["id"] for r in rows]))).scalars()
        assert sorted(states) == ["suspended", "suspended"]


def test_a_queued_statement_that_fails_fails_the_transaction_with_sqlalchemys_error(db: Database) -> None:
    """A duplicate key in a queued INSERT is raised at the COMMIT on PostgreSQL (at once on SQLite) as
    SQLAlchemy's IntegrityError, parameters hidden: the write path's retry sees what it saw
    without the pipeline. Everything the transaction sent is rolled back, and the connection is
    not left in pipeline mode."""
    first = _person()
    with db.write() as s:
        direct.of(s).execute(_INSERT, first)
    later = _person()
    queued = False
    with pytest.raises(IntegrityError) as info:
        with db.write() as s:
            st = direct.of(s)
            st.first(_BUMP)
            st, dbapi = _pipelined(s)
            st.execute(_INSERT, _person(id=first["id"], state_reason="secret-reason-5678"))
            queued = True  # PostgreSQL: not raised yet, the INSERT waits in the queue
            st.execute(_INSERT, later)
    assert queued is (not db.is_sqlite)
    assert "secret-reason" not in str(info.value)
    assert isinstance(info.value.orig, db.engine.dialect.loaded_dbapi.Error)
    _clean(db, dbapi)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 1
        assert s.get(Activation, later["id"]) is None


def test_a_queued_failure_surfaces_at_the_next_read(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite runs every statement at once: nothing is queued")
    first = _person()
    with db.write() as s:
        direct.of(s).execute(_INSERT, first)
    read_passed = False
    with pytest.raises(IntegrityError):
        with db.write() as s:
            st, dbapi = _pipelined(s)
            st.execute(_INSERT, _person(id=first["id"]))  # queued: no error yet
            queued = True
            st.first(_BUMP)
            read_passed = True  # never reached: the read raised the queued INSERT's error
    assert queued and not read_passed
    _clean(db, dbapi)
    with db.read() as s:
        assert s.execute(select(LogHead.size)).scalar_one() == 3  # _clean's three bumps only


def test_an_exception_while_writes_are_queued_rolls_them_back_and_is_the_one_raised(db: Database) -> None:
    """Code failing after it queued writes (a bug, a caller that gave up): its exception comes out,
    not one from the queue (here a duplicate key queued before it), and nothing is written."""
    first = _person()
    with db.write() as s:
        direct.of(s).execute(_INSERT, first)
    with pytest.raises(LookupError, match="the code's own failure"):
        with db.write() as s:
            st, dbapi = _pipelined(s)
            st.execute(_INSERT, _person())
            if not db.is_sqlite:
                st.execute(_INSERT, _person(id=first["id"]))  # would fail, queued
            raise LookupError("the code's own failure")
    _clean(db, dbapi)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 1


def test_a_connection_lost_while_writes_are_queued_is_discarded(
        db: Database, backend: tuple[str, str], request: pytest.FixtureRequest) -> None:
    """The server ends the connection while writes wait in the pipeline: the COMMIT fails as a lost
    connection (SQLAlchemy's DBAPIError, connection invalidated), nothing is written, and the next
    transaction gets a new connection, out of pipeline mode."""
    if backend[0] == "sqlite":
        pytest.skip("SQLite has no server that could end the connection")
    admin = request.getfixturevalue("pg_server")
    row = _person()
    with pytest.raises(DBAPIError) as info:
        with db.write() as s:
            st = direct.of(s)
            pid = st.first(select(func.pg_backend_pid()))[0]
            st, dbapi = _pipelined(s)
            st.execute(_INSERT, row)
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert info.value.connection_invalidated, info.value
    assert dbapi.closed
    _clean(db, dbapi)
    with db.read() as s:
        assert s.get(Activation, row["id"]) is None


def test_a_pipeline_outside_a_write_transaction_is_refused(db: Database) -> None:
    """Only Database.write takes its connection out of pipeline mode when it ends: a read (or a
    tool's own session) asking for one is a programming error, on both backends."""
    with db.read() as s:
        with pytest.raises(RuntimeError, match="write transaction"):
            direct.of(s).pipeline()
        dbapi = s.connection().connection.driver_connection
        assert not _pipeline_on(dbapi)
    _clean(db, dbapi)


def test_a_connection_left_in_pipeline_mode_is_not_handed_out_again(db: Database, backend: tuple[str, str]) -> None:
    """The pool's safety net: a transaction that entered pipeline mode behind direct.py's back (no
    `end`) returns a connection the pool discards; the next transaction gets a fresh one."""
    if backend[0] == "sqlite":
        pytest.skip("SQLite has no pipeline mode")
    with db.write() as s:
        dbapi = s.connection().connection.driver_connection
        leaked = dbapi.pipeline()
        leaked.__enter__()
        assert _pipeline_on(dbapi)
    assert dbapi.closed
    _clean(db, dbapi)


def test_sqlalchemy_statements_are_refused_in_pipeline_mode(db: Database, backend: tuple[str, str]) -> None:
    """Once an activation's writes are queued, a statement through the ORM or Core on the session
    would get no rows or a row count of -1 from psycopg: it is refused with a clear error, the
    transaction rolls back, and the connection comes back out of pipeline mode."""
    if backend[0] == "sqlite":
        pytest.skip("SQLite has no pipeline mode")
    row = _person()
    for statement in (select(LogHead.size), update(LogHead).values(size=LogHead.size + 1)):
        with pytest.raises(RuntimeError, match="only direct.Statements"):
            with db.write() as s:
                st, dbapi = _pipelined(s)
                st.execute(_INSERT, row)
                s.execute(statement)
        _clean(db, dbapi)
    with db.read() as s:
        assert s.get(Activation, row["id"]) is None


def test_prefetched_reads_are_read_once_where_they_are_asked_for(db: Database) -> None:
    """`prefetch` sends reads ahead (PostgreSQL, in a pipeline: together, with BEGIN); the `first` or
    `all` asking for the same statement and parameters gets that read's rows, once: asking again
    reads again, and sees what the transaction wrote in between. On SQLite nothing is sent ahead."""
    count = select(func.count()).select_from(Activation).where(Activation.state == bindparam("state"))
    with db.write() as s:
        st = direct.of(s)
        st.pipeline()
        st.prefetch((count, {"state": "active"}), None, (_BUMP, {}))
        st.execute(_INSERT, _person())  # queued after the prefetched reads: they do not see it
        assert st.first(count, {"state": "active"})[0] == (0 if not db.is_sqlite else 1)
        assert st.first(count, {"state": "active"})[0] == 1  # read again
        assert st.first(count, {"state": "suspended"})[0] == 0  # other parameters: its own read
        assert st.first(_BUMP).size == 1  # the prefetched UPDATE ... RETURNING
        assert st.first(_BUMP).size == 2
    with db.read() as s:
        assert s.execute(select(LogHead.size)).scalar_one() == 2


def test_a_prefetched_read_that_fails_fails_the_transaction(db: Database) -> None:
    """A prefetched read's error (a column that does not exist) comes out as SQLAlchemy's error, at
    the latest from the call that asks for its rows, and the transaction rolls back."""
    failing = select(literal_column("no_such_column")).select_from(Activation.__table__)
    read_passed = False
    with pytest.raises(DBAPIError):
        with db.write() as s:
            st, dbapi = _pipelined(s)
            st.prefetch((failing, {}))
            st.execute(_INSERT, _person())
            st.first(failing, {})
            read_passed = True
    assert not read_passed
    _clean(db, dbapi)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 0


def _counting_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many Syncs psycopg queues from here on (a spy: the real method still runs)."""
    syncs = [0]
    real = psycopg.Pipeline._enqueue_sync

    def counted(self: Any) -> None:
        syncs[0] += 1
        real(self)
    monkeypatch.setattr(psycopg.Pipeline, "_enqueue_sync", counted)
    return syncs


def test_a_pipelined_transaction_waits_for_no_begin_and_leaves_without_a_sync(
        db: Database, backend: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: a transaction that enters pipeline mode before its first statement sends its
    BEGIN (and a Sync) without waiting for the answer, which comes back with the first read's; the
    COMMIT's Sync answers everything, so leaving pipeline mode sends no other Sync (psycopg's own
    exit sends one: a round trip after every write transaction). One BEGIN only: the server
    reports no "transaction in progress" warning, and the writes are committed."""
    if backend[0] == "sqlite":
        pytest.skip("SQLite has no pipeline mode")
    from psycopg._pipeline_base import BasePipeline
    syncs = _counting_syncs(monkeypatch)
    fetches = [0]  # psycopg's blocking read of a pipeline's answers
    real_fetch = BasePipeline._fetch_gen

    def fetch(self: Any, *, flush: bool) -> Any:
        fetches[0] += 1
        return real_fetch(self, flush=flush)
    monkeypatch.setattr(BasePipeline, "_fetch_gen", fetch)
    notices: list[str] = []
    row = _person()
    with db.write() as s:
        st, dbapi = _pipelined(s)
        assert fetches[0] == 0, "BEGIN's answer was waited for"
        dbapi.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        assert syncs[0] == 1  # BEGIN's, queued
        before = st.first(_BUMP).size  # BEGIN's answer and its Sync's come with this one
        assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        st.execute(_INSERT, row)
        assert st.first(_BUMP).size == before + 1
    assert syncs[0] == 2, syncs  # BEGIN's and the COMMIT's: none to leave pipeline mode
    assert notices == []
    _clean(db, dbapi)
    with db.read() as s:
        assert s.get(Activation, row["id"]) is not None
        assert s.execute(select(LogHead.size)).scalar_one() == before + 1 + 3  # _clean's bumps too


def test_a_pipeline_left_before_the_commit_still_syncs_what_is_queued(db: Database, backend: tuple[str, str]) -> None:
    """Leaving pipeline mode in the middle of a transaction (before an ORM statement) sends its Sync
    and reads every queued answer: the quick exit is only for after the COMMIT."""
    if backend[0] == "sqlite":
        pytest.skip("SQLite has no pipeline mode")
    row = _person()
    with db.write() as s:
        st, dbapi = _pipelined(s)
        st.execute(_INSERT, row)
        st.end(failed=False)
        assert not _pipeline_on(dbapi)
        assert s.get(Activation, row["id"]) is not None  # the ORM sees the queued INSERT
    _clean(db, dbapi)
    with db.read() as s:
        assert s.get(Activation, row["id"]) is not None


def test_a_count_read_later_travels_with_the_next_read(db: Database, backend: tuple[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`changed_later`: in a pipeline the UPDATE is queued and its row count read after the next read
    that waits (no Sync of its own); with nothing read since, `value` waits for it; elsewhere (SQLite)
    it is counted at once. Counts are exact either way (2 rows, then none)."""
    a, b = _person(), _person()
    suspend = update(Activation).where(Activation.id.in_([a["id"], b["id"]]), Activation.state == "active").values(
        state="suspended")
    syncs = _counting_syncs(monkeypatch) if backend[0] != "sqlite" else [0]
    with db.write() as s:
        st, dbapi = _pipelined(s)
        st.execute_many(_INSERT, [a, b])
        taken = syncs[0]
        count = st.changed_later(suspend)
        head = st.first(_BUMP).size  # the read that brings the count's answer along
        assert count.value() == 2
        assert syncs[0] == taken  # no Sync (no round trip) for the count
        again = st.changed_later(suspend)  # nothing read since: value() waits for it
        assert again.value() == 0
        assert head >= 1
    _clean(db, dbapi)
    with db.read() as s:
        states = s.execute(select(Activation.state).where(Activation.id.in_([a["id"], b["id"]]))).scalars()
        assert sorted(states) == ["suspended", "suspended"]


def test_a_queued_failure_met_when_leaving_the_pipeline_is_raised_there(db: Database) -> None:
    """Leaving pipeline mode in the middle of a transaction (before an ORM statement) reads every
    queued answer: a queued INSERT that failed (a duplicate key) is raised right there as
    SQLAlchemy's IntegrityError, not swallowed into a broken connection and a confusing error at
    the next statement; the transaction rolls back and the connection stays usable."""
    row = _person()
    with db.write() as s:
        direct.of(s).execute(_INSERT, row)
    with pytest.raises(IntegrityError):
        with db.write() as s:
            st, dbapi = _pipelined(s)
            st.execute(_INSERT, row)  # the same id: refused (at once on SQLite)
            st.end(failed=False)
    _clean(db, dbapi)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 1


def test_a_second_count_read_later_reads_the_first_one_first(db: Database) -> None:
    """Two `changed_later` in one transaction share a cursor: the second reads the first's answer
    before it is sent, so each count stays its own."""
    a, b = _person(), _person()
    with db.write() as s:
        st, dbapi = _pipelined(s)
        st.execute_many(_INSERT, [a, b])
        first = st.changed_later(update(Activation).where(Activation.id.in_([a["id"], b["id"]])).values(
            state="suspended"))
        second = st.changed_later(update(Activation).where(Activation.id == a["id"]).values(state="revoked"))
        st.first(_BUMP)
        assert (first.value(), second.value()) == (2, 1)
    _clean(db, dbapi)


@pytest.fixture
def solo(db: Database) -> Iterator[Database]:
    """PostgreSQL: a Database on `db`'s database whose transactions, run one after another, all use
    the same connection (the write path's prepared statements are per connection)."""
    if db.is_sqlite:
        pytest.skip("SQLite has no pipeline mode")
    one = Database(db.url, pool_size=1)
    try:
        yield one
    finally:
        one.dispose()


def _prepared_here(dbapi: Any) -> set[str]:
    """The prepared statements of this connection's server session whose names the write path
    gives (`w_N`)."""
    with dbapi.cursor() as cur:
        cur.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'w\\_%'")
        return {r[0] for r in cur.fetchall()}


def test_pipelined_statements_are_prepared_once_per_connection_and_rows_match_a_cursors(
        solo: Database) -> None:
    """PostgreSQL: in a pipeline each statement is PREPAREd on its first use on a connection and
    then only executed by name (libpq); its values and rows are what a psycopg cursor sends and
    reads: the same row read back through the ORM, bytes, dates and times included."""
    rows = [_person(), _person()]
    with solo.write() as s:
        st, dbapi = _pipelined(s)
        st.execute(_INSERT, rows[0])
        got = st.first(_COLUMNS, {"id": rows[0]["id"]})
        names = _prepared_here(dbapi)
    assert len(names) == 2, names  # the INSERT and the SELECT
    with solo.write() as s:
        st, same = _pipelined(s)
        st.execute(_INSERT, rows[1])
        again = st.first(_COLUMNS, {"id": rows[1]["id"]})
        assert same is dbapi and _prepared_here(dbapi) == names  # nothing prepared again
    with solo.read() as s:
        for row, read in ((rows[0], got), (rows[1], again)):
            orm = s.get(Activation, row["id"])
            assert orm is not None
            assert (read.id, read.person_key, read.start_date, read.end_date, read.account_id, read.created_at) == (
                orm.id, orm.person_key, orm.start_date, orm.end_date, orm.account_id, orm.created_at)
            assert read.person_key == row["person_key"] and read.created_at == NOW


def test_a_rollback_on_the_connection_leaves_the_pipelines_statements_working(
        solo: Database) -> None:
    """PostgreSQL: psycopg ends a ROLLBACK with DEALLOCATE ALL whenever it has prepared statements
    of its own (a statement run 5 times through its cursors), which would drop the write path's
    too: it has none on the writer engine, so after ORM statements run many times and a rollback
    on the same connection, the next pipelined write still runs and commits."""
    with solo.write() as s:
        st, dbapi = _pipelined(s)
        st.first(_BUMP)
    prepared = _prepared_here(dbapi)
    assert prepared
    with pytest.raises(ZeroDivisionError):
        with solo.write() as s:
            for _ in range(8):  # through psycopg's cursor, as the ORM runs them
                s.execute(select(func.count()).select_from(Activation)).scalar_one()
            1 / 0  # noqa: B018 - the transaction rolls back
    assert _prepared_here(dbapi) == prepared
    row = _person()
    with solo.write() as s:
        st, same = _pipelined(s)
        assert same is dbapi
        st.execute(_INSERT, row)
        st.first(_BUMP)
    with solo.read() as s:
        assert s.get(Activation, row["id"]) is not None


def test_statements_dropped_under_the_connection_fail_one_write_then_are_prepared_again(
        solo: Database) -> None:
    """PostgreSQL: if the server no longer has the write path's prepared statements (a DEALLOCATE
    ALL from elsewhere, a pooler moving the session), the write that meets it fails as SQLAlchemy's
    error and writes nothing; the connection stays usable and the next write prepares them again."""
    with solo.write() as s:
        st, dbapi = _pipelined(s)
        st.first(_BUMP)
    with dbapi.cursor() as cur:
        cur.execute("DEALLOCATE ALL")
    dbapi.commit()
    lost = _person()
    with pytest.raises(DBAPIError) as caught:
        with solo.write() as s:
            st, _ = _pipelined(s)
            st.execute(_INSERT, lost)
            st.first(_BUMP)
    assert isinstance(caught.value.orig, psycopg.errors.InvalidSqlStatementName)
    row = _person()
    with solo.write() as s:
        st, same = _pipelined(s)
        assert same is dbapi
        st.execute(_INSERT, row)
        st.first(_BUMP)
    with solo.read() as s:
        assert s.get(Activation, row["id"]) is not None
        assert s.get(Activation, lost["id"]) is None


def test_failed_transactions_leave_no_prepared_statements_behind(solo: Database) -> None:
    """PostgreSQL: a PREPARE that ran stays on the server whatever becomes of its transaction, so a
    connection whose writes keep failing (refusals, replays) prepares each statement once, not once
    per failure."""
    counts = []
    for _ in range(6):
        with pytest.raises(ZeroDivisionError):
            with solo.write() as s:
                st, dbapi = _pipelined(s)
                st.execute(_INSERT, _person())
                st.first(_BUMP)
                1 / 0  # noqa: B018 - a refusal after the reads: the transaction rolls back
        counts.append(len(_prepared_here(dbapi)))
    assert counts == [2] * 6, counts
    with solo.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 0


def test_statements_dropped_under_the_connection_are_prepared_again_after_a_commit_that_met_it(
        solo: Database) -> None:
    """PostgreSQL: a transaction of queued writes only meets a prepared statement gone at its COMMIT
    (psycopg reads the answers there): that write fails, and the next one prepares again."""
    with solo.write() as s:
        st, dbapi = _pipelined(s)
        st.execute(_INSERT, _person())
    with dbapi.cursor() as cur:
        cur.execute("DEALLOCATE ALL")
    dbapi.commit()
    with pytest.raises(DBAPIError):
        with solo.write() as s:
            _pipelined(s)[0].execute(_INSERT, _person())
    row = _person()
    with solo.write() as s:
        _pipelined(s)[0].execute(_INSERT, row)
    with solo.read() as s:
        assert s.get(Activation, row["id"]) is not None
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == 2


def test_a_transaction_queuing_more_than_a_socket_holds_still_commits(db: Database, backend: tuple[str, str]) -> None:
    """PostgreSQL: writes queued in a pipeline wait in libpq's buffer for the next read or the COMMIT,
    but never more than `direct.SEND_AT` bytes of them: psycopg's COMMIT flushes only a few times
    before it waits for the server's answer, which the server cannot give before it has every
    statement (15 MB queued then hung the COMMIT for good). On SQLite every statement runs at once."""
    rows = [_person(decision_json="x" * 50_000) for _ in range(300)]
    done: list[BaseException | None] = []

    def write() -> None:
        try:
            with db.write() as s:
                st, _ = _pipelined(s)
                st.execute_many(_INSERT, rows)
            done.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            done.append(exc)
    import threading
    worker = threading.Thread(target=write, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the COMMIT hangs"
    assert done == [None], done
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation)).scalar_one() == len(rows)
