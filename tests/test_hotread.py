"""The hot reads (entitlement/storage/hotread.py): single statements straight on the DBAPI, on each
thread's own autocommit connection. They must answer exactly what SQLAlchemy's execution of the
same statement answers, and keep its failure behaviour: errors wrapped as SQLAlchemy's, dead
connections replaced (in every thread), reads refused while the health monitor finds the
database down. (`db`: the conftest's migrated database of its own.)"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy import bindparam, case, select, text
from sqlalchemy.exc import DBAPIError
from support import Api, identity, next_person

from entitlement.activation import _VERIFY, LIVE
from entitlement.counters import _ALL_USAGE
from entitlement.registry import _LOOKUP
from entitlement.storage.db import Database, DatabaseDown
from entitlement.storage.models import Activation
from entitlement.v1 import activation_pb2, eligibility_pb2


def in_thread(fn: Callable[[], Any]) -> Any:
    """fn's result (or exception) in a new thread: a thread of its own, so a connection of its own."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]


# The statement VerifyEntitlement ran before it chose in Python: an IN list of constants (rendered
# once, when prepared), a CASE, per-call dates.
_LIVE_FIRST = (
    select(Activation.id, Activation.program_id, Activation.state, Activation.end_date)
    .where(Activation.platform_id == bindparam("platform"), Activation.account_id == bindparam("account"))
    .order_by(case((Activation.state.in_(LIVE) & (Activation.end_date >= bindparam("today")), 0), else_=1),
              Activation.state != "active", Activation.end_date.desc())
    .limit(1)
)


def test_rows_are_the_ones_sqlalchemy_reads(api: Api) -> None:
    """Registry lookups (dates: strings in SQLite, converted), verifications (an IN list of
    constants rendered once) and counters, hot and through SQLAlchemy, on the server's database."""
    db = api.h.ctx.db
    made = api.activate()
    account = f"acct-{uuid.uuid4().hex[:12]}"
    api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=made.activation_token, account_id=account))
    keys = [api.h.ctx.pseudo.person_key(next_person()[0]) for _ in range(5)] + [b"\x00" * 32]
    today = api.h.ctx.clock.today()
    cases = [(_LOOKUP, {"person_key": k}) for k in keys]
    cases += [(_VERIFY, {"platform": "openclassrooms", "account": a}) for a in (account, "acct-nobody")]
    cases += [(_LIVE_FIRST, {"platform": "openclassrooms", "account": a, "today": d})  # IN of constants
              for a in (account, "acct-nobody") for d in (today, today + dt.timedelta(days=4000))]
    cases.append((_ALL_USAGE, {}))
    found_dates = 0
    with db.engine.connect() as conn:
        for stmt, params in cases:
            expected = conn.execute(stmt, params).all()
            hot = db.hot.all(stmt, params)
            assert [tuple(r) for r in hot] == [tuple(r) for r in expected], stmt
            assert all(r._fields == tuple(expected[0]._fields) for r in hot) if expected else hot == []
            first = db.hot.first(stmt, params)
            assert (first is None) if not expected else tuple(first) == tuple(expected[0])
            found_dates += sum(isinstance(v, dt.date) for r in hot for v in r)
    assert found_dates > 0  # the conversions were exercised, not only strings and ints


def test_the_statement_text_is_sent_once_per_read(api: Api) -> None:
    db = api.h.ctx.db
    seen: list[str] = []
    db.hot.listeners.append(seen.append)
    try:
        db.hot.first(_LOOKUP, {"person_key": b"\x01" * 32})
    finally:
        db.hot.listeners.remove(seen.append)
    assert len(seen) == 1 and "registry_people" in seen[0]


def test_an_in_list_of_per_call_values_is_refused_when_prepared(db: Database) -> None:
    stmt = select(Activation.id).where(Activation.state.in_(bindparam("states", expanding=True)))
    with pytest.raises(ValueError, match="states"):
        db.hot.prepare(stmt)


def test_database_errors_are_sqlalchemys_and_hide_parameters(db: Database) -> None:
    secret = "1234567A-secret"
    with pytest.raises(DBAPIError) as info:
        db.hot.first(text("SELECT no_such_column FROM activations WHERE platform_id = :p"), {"p": secret})
    assert secret not in str(info.value)
    assert not info.value.connection_invalidated
    assert db.hot.first(text("SELECT 1")) is not None  # the connection is still good


def test_reads_are_refused_while_the_database_is_found_down(db: Database) -> None:
    db.fail_fast(writes=True, reads=True)
    with pytest.raises(DatabaseDown):
        db.hot.first(text("SELECT 1"))
    db.ping()  # the health monitor's probe still goes through
    db.fail_fast(writes=False, reads=False)
    assert tuple(db.hot.first(text("SELECT 1"))) == (1,)


def _kill(db: Database, conn: Any, admin_url: str | None) -> None:
    """End `conn` from outside, as a database restart or a network cut would."""
    if db.is_sqlite:
        conn.close()
        return
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))


def test_a_dead_connection_is_replaced_in_every_thread(db: Database, backend: tuple[str, str],
                                                       request: pytest.FixtureRequest) -> None:
    admin = None if db.is_sqlite else request.getfixturevalue("pg_server")
    one = text("SELECT 1")
    gate, done = threading.Event(), threading.Event()
    other: dict[str, Any] = {}

    def other_thread() -> None:  # holds its own connection, reads again after the disconnect
        db.hot.first(one)
        other["before"] = db.hot._local.conn
        gate.set()
        done.wait(60)
        db.hot.first(one)
        other["after"] = db.hot._local.conn
    t = threading.Thread(target=other_thread)
    t.start()
    assert gate.wait(60)

    db.hot.first(one)
    mine = db.hot._local.conn
    _kill(db, mine, admin)
    with pytest.raises(DBAPIError) as info:
        db.hot.first(one)
    assert info.value.connection_invalidated, info.value
    assert tuple(db.hot.first(one)) == (1,)  # reconnected
    assert db.hot._local.conn is not mine
    done.set()
    t.join(60)
    assert other["after"] is not other["before"]  # the other thread reconnected before reading


def test_checks_survive_the_loss_of_every_connection(api: Api, backend: tuple[str, str],
                                                     request: pytest.FixtureRequest) -> None:
    """PostgreSQL: every server connection to the database is terminated (a restart, for the
    server). Checks answer again at once: at most one UNAVAILABLE (never INTERNAL) before the hot
    reads' connections are replaced in every worker thread."""
    if backend[0] == "sqlite":
        pytest.skip("SQLite has no server whose connections could be terminated (the thread-level "
                    "test above closes a SQLite connection instead)")
    admin = request.getfixturevalue("pg_server")
    agency_id, birth = next_person()
    req = eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(agency_id, birth),
                                                  program="programs/premium-job-seekers")
    for _ in range(40):  # spread over the worker threads: each has its own connection
        api.advisor.CheckEligibility(req)
    name = api.h.ctx.db.engine.url.database
    with psycopg.connect(admin, autocommit=True) as conn:
        ended = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
    assert ended >= 2
    codes = []
    for _ in range(40):
        try:
            api.advisor.CheckEligibility(req)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    failures = [c for c in codes if c != grpc.StatusCode.OK]
    assert all(c == grpc.StatusCode.UNAVAILABLE for c in failures), codes
    assert len(failures) <= 1, codes
    assert codes[-10:] == [grpc.StatusCode.OK] * 10


def test_a_finished_threads_connection_is_closed(db: Database) -> None:
    import gc
    kept = in_thread(lambda: (db.hot.first(text("SELECT 1")), db.hot._local.conn)[1])
    gc.collect()
    assert len(db.hot._open) == 0  # nothing keeps the ended thread's connection for dispose()
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.ProgrammingError / psycopg.OperationalError
        kept.execute("SELECT 1")


def test_verify_chooses_as_the_ordered_statement_did(db: Database) -> None:
    """VerifyEntitlement reads all of an account's activations and chooses in Python: the same
    choice as the ORDER BY it replaced, over random histories (ties compared by their sort key)."""
    import random

    from entitlement.activation import _verify_order
    rng = random.Random(8)
    base = dt.date(2026, 3, 16)
    now = dt.datetime(2026, 3, 16, tzinfo=dt.timezone.utc)
    with db.engine.begin() as conn:
        for n in range(80):
            for i in range(rng.randint(1, 5)):
                conn.execute(Activation.__table__.insert().values(
                    id=uuid.uuid4().hex, program_id=f"p{i}", program_version="1", person_key=uuid.uuid4().bytes * 2,
                    state=rng.choice(["active", "suspended", "revoked", "expired"]), start_date=base,
                    end_date=base + dt.timedelta(days=rng.randint(-400, 400)), advisor_id="a", agency_code="1",
                    platform_id="pf", state_reason="", decision_json="{}", snapshot_id=None, token_jti="j",
                    account_id=f"acct-{n}", redeemed_at=now, created_at=now, updated_at=now))
    for n in range(80):
        rows = db.hot.all(_VERIFY, {"platform": "pf", "account": f"acct-{n}"})
        for today in (base - dt.timedelta(days=500), base, base + dt.timedelta(days=200)):
            key = _verify_order(today)
            expected = db.hot.first(_LIVE_FIRST, {"platform": "pf", "account": f"acct-{n}", "today": today})
            assert key(min(rows, key=key)) == key(expected), (n, today, rows)


def test_awkward_values_read_back_as_sqlalchemy_reads_them(db: Database) -> None:
    """Parameters that need quoting or escaping on the way (quotes, backslashes, percent signs,
    `$1`, non-ASCII; bytes with NUL and backslash bytes; NULL) find the same rows hot as through
    SQLAlchemy (on PostgreSQL the hot path dumps them itself, as text, for a prepared statement)."""
    now = dt.datetime(2026, 3, 16, tzinfo=dt.timezone.utc)
    accounts = ["acct-o'brien", 'acct-"q"', "acct-back\\slash", "acct-100%", "acct-%s-%(x)s-$1", "acct-élève-日本"]
    keys = [b"\x00\\'\x01" * 8, bytes(range(32))]
    with db.engine.begin() as conn:
        for n, account in enumerate(accounts):
            conn.execute(Activation.__table__.insert().values(
                id=f"odd-{n}", program_id=f"p{n}", program_version="1", person_key=keys[n % 2],
                state="active", start_date=now.date(), end_date=now.date() + dt.timedelta(days=n),
                advisor_id="a", agency_code="1", platform_id="pf'%", state_reason="", decision_json="{}",
                snapshot_id=None, token_jti="j", account_id=account, redeemed_at=now, created_at=now,
                updated_at=now))
    by_key = select(Activation.id, Activation.account_id).where(Activation.person_key == bindparam("key"))
    cases: list[tuple[Any, dict[str, Any]]] = [(_VERIFY, {"platform": "pf'%", "account": a}) for a in accounts]
    cases += [(by_key, {"key": k}) for k in keys]
    cases += [(text("SELECT CAST(:v AS TEXT) IS NULL AS null_in, CAST(:w AS TEXT) AS w"), {"v": None, "w": "x'%"})]
    found = 0
    with db.engine.connect() as conn:
        for stmt, params in cases:
            expected = [tuple(r) for r in conn.execute(stmt, params).all()]
            assert [tuple(r) for r in db.hot.all(stmt, params)] == expected, (stmt, params)
            found += len(expected)
    assert found == len(accounts) * 2 + 1  # every account by its own id, then by its key, and the NULL probe


def test_postgresql_prepares_each_statement_once_per_connection(db: Database) -> None:
    """PostgreSQL: a hot read's statement is PREPAREd on the thread's connection the first time,
    then only executed (its name and values travel, the server parses and plans it once); a new
    connection (after a disconnect) prepares it again."""
    if db.is_sqlite:
        pytest.skip("SQLite has no server-side prepared statements (sqlite3 caches its own)")
    listing = text("SELECT statement FROM pg_prepared_statements WHERE name LIKE 'hot%' ORDER BY name")
    for n in range(5):
        db.hot.all(_VERIFY, {"platform": "pf", "account": f"acct-{n}"})
    statements = [r[0] for r in db.hot.all(listing)]
    assert len(statements) == 2, statements  # _VERIFY, once; the listing itself
    assert sum("FROM activations" in s for s in statements) == 1, statements
    with psycopg.connect(db.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (db.hot._local.conn.info.backend_pid,))
    with pytest.raises(DBAPIError) as info:
        db.hot.all(_VERIFY, {"platform": "pf", "account": "acct-0"})
    assert info.value.connection_invalidated
    assert db.hot.all(_VERIFY, {"platform": "pf", "account": "acct-0"}) == []
    assert len(db.hot.all(listing)) == 2  # the new connection prepared both again


def test_untyped_and_oddly_named_parameters_read_as_sqlalchemy_reads_them(db: Database) -> None:
    """A text() parameter without a type (the value's own type goes to the server, as a cursor
    sends it), a bind name SQLAlchemy leaves with a hyphen, a literal percent sign in the SQL."""
    from sqlalchemy import String
    cases: list[tuple[Any, dict[str, Any]]] = [
        (text("SELECT :x AS v"), {"x": 5}),
        (text("SELECT :x AS v"), {"x": "five"}),  # the same statement, another type
        (text("SELECT 1 AS one FROM activations WHERE state = 'x' AND 2 = :x"), {"x": 2**40}),
        (select(bindparam("my-key", type_=String).label("v")), {"my-key": "a-b"}),
        (text("SELECT 'a%' AS pct, 'b%%' AS two, CAST(:x AS TEXT) AS x"), {"x": "%s %(y)s $1"}),
    ]
    with db.engine.connect() as conn:
        for stmt, params in cases:
            expected = [tuple(r) for r in conn.execute(stmt, params).all()]
            assert [tuple(r) for r in db.hot.all(stmt, params)] == expected, (stmt, params)
            assert [type(v) for r in db.hot.all(stmt, params) for v in r] == [type(v) for r in expected for v in r]


def test_postgresql_prepares_again_a_statement_whose_plan_no_longer_fits(db: Database) -> None:
    """PostgreSQL: a column's type changed under a prepared statement (a migration): the server
    refuses its old plan (0A000, "cached plan must not change result type"); the read prepares it
    again and answers, instead of failing on every thread until their connections are replaced. A
    statement the server no longer has (26000: DEALLOCATEd, or a pooler that moved the connection)
    is prepared again too."""
    if db.is_sqlite:
        pytest.skip("SQLite has no server-side prepared statements (sqlite3 caches its own)")
    from sqlalchemy import Integer
    read = text("SELECT label FROM hot_plan WHERE id = :id").bindparams(bindparam("id", type_=Integer))
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE hot_plan (id INTEGER PRIMARY KEY, label VARCHAR(10))"))
        conn.execute(text("INSERT INTO hot_plan VALUES (1, 'one')"))
    assert [tuple(r) for r in db.hot.all(read, {"id": 1})] == [("one",)]
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE hot_plan ALTER COLUMN label TYPE TEXT"))
    assert [tuple(r) for r in db.hot.all(read, {"id": 1})] == [("one",)]
    db.hot._local.conn.pgconn.exec_(b"DEALLOCATE ALL")
    assert [tuple(r) for r in db.hot.all(read, {"id": 1})] == [("one",)]


@pytest.mark.parametrize("first", ["pool", "hot"])
def test_a_lost_connection_seen_by_one_set_of_connections_replaces_the_others(
        db: Database, request: pytest.FixtureRequest, first: str) -> None:
    """PostgreSQL: every session of the database ended (a restart, for the server). The first read
    to meet it fails, through the engines' pools or through the hot reads' per-thread connection;
    the next read through the other set does not: one disconnect replaces all (each set used to
    find its own dead connections, so a check could meet two failures in a row: the flake of
    test_checks_survive_the_loss_of_every_connection)."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite has no server whose sessions could be ended")
    admin = request.getfixturevalue("pg_server")

    def pool_read() -> None:
        with db.read() as s:
            s.execute(text("SELECT 1")).scalar_one()

    def hot_read() -> None:
        db.hot.first(text("SELECT 1"))
    reads = {"pool": pool_read, "hot": hot_read}
    for read in reads.values():  # each set holds a live connection, idle now
        read()
    with psycopg.connect(admin, autocommit=True) as conn:
        ended = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (db.engine.url.database,)).fetchone()[0]
    assert ended >= 2
    with pytest.raises(DBAPIError) as info:
        reads[first]()
    assert info.value.connection_invalidated, info.value
    other = "hot" if first == "pool" else "pool"
    reads[other]()  # replaced before use: no second failure
    reads[first]()
