"""The Database: one engine, sessions for reads and for writes, right for each backend.

SQLite: WAL journal, foreign keys on, and writes in `BEGIN IMMEDIATE` transactions. pysqlite's
own transaction handling is switched off (it defers BEGIN until the first DML statement, which
turns a read-then-write into a lock upgrade that fails with "database is locked" instead of
waiting); we emit BEGIN ourselves, as SQLAlchemy's SQLite dialect documentation recommends
("Serializable isolation / Savepoints / Transactional DDL").
PostgreSQL (psycopg 3): READ COMMITTED; invariants are enforced by constraints, conditional updates
and row locks rather than by the isolation level.
Within a gRPC call, transactions keep to the call's deadline (entitlement/deadline.py): lock waits
end with it, a write is not started too close to it, nor committed for a caller that gave up.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from entitlement import deadline

_WRITE = "entitlement_write"
BUSY_TIMEOUT_MS = 30_000  # SQLite: how long a write waits for the file's write lock (without a deadline)


def utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default driver would be psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Database:
    def __init__(self, url: str, *, pool_size: int = 16, echo: bool = False) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            kwargs["pool_size"] = pool_size
        elif self.dialect == "postgresql":
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        else:
            raise SystemExit(f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql://")
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        else:
            _configure_postgresql(self.engine)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A read-write transaction, committed on success, rolled back on any exception (and, in a
        gRPC call, when the caller gave up: see entitlement/deadline.py)."""
        deadline.check_start()
        with _deadline_errors(), self.engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with Session(bind=conn, expire_on_commit=False, autoflush=False) as session:
                with session.begin():
                    yield session
                    deadline.check_caller()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (a consistent snapshot on SQLite's WAL)."""
        with _deadline_errors(), self.engine.connect() as conn:
            with Session(bind=conn, expire_on_commit=False, autoflush=False) as session:
                with session.begin():
                    yield session

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def _deadline_errors() -> Iterator[None]:
    """A lock wait or statement cut short by the call's deadline is DEADLINE_EXCEEDED, not an outage."""
    try:
        yield
    except OperationalError as exc:
        if deadline.expired():
            raise deadline.exceeded() from exc
        raise


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        left = deadline.remaining()
        if left is not None:  # for this transaction only (is_local): no wait outlives the call
            ms = max(1, int(left * 1000))
            conn.exec_driver_sql(f"SELECT set_config('lock_timeout', '{ms}', true), "
                                 f"set_config('statement_timeout', '{ms}', true)")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        if write:  # wait for the write lock no longer than the call's deadline (WAL readers never wait)
            left = deadline.remaining()
            busy = BUSY_TIMEOUT_MS if left is None else max(1, min(BUSY_TIMEOUT_MS, int(left * 1000)))
            if conn.info.get("busy_timeout_ms", BUSY_TIMEOUT_MS) != busy:  # kept per pooled connection
                conn.exec_driver_sql(f"PRAGMA busy_timeout={busy}")
                conn.info["busy_timeout_ms"] = busy
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
