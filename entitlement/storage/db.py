"""The Database: one engine, sessions for reads and for writes, right for each backend.

SQLite: WAL journal, foreign keys on, and writes in `BEGIN IMMEDIATE` transactions. pysqlite's
own transaction handling is switched off (it defers BEGIN until the first DML statement, which
turns a read-then-write into a lock upgrade that fails with "database is locked" instead of
waiting); we emit BEGIN ourselves, as SQLAlchemy's SQLite dialect documentation recommends
("Serializable isolation / Savepoints / Transactional DDL").
PostgreSQL (psycopg 3): READ COMMITTED; invariants are enforced by constraints, conditional updates
and row locks rather than by the isolation level.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from entitlement import rollup

_WRITE = "entitlement_write"


class _Session(Session):
    """The Database's sessions: every flush also brings the funding report's rollup up to date
    (entitlement/rollup.py), in the same transaction."""


event.listen(_Session, "before_flush", rollup.before_flush)


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

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A read-write transaction, committed on success, rolled back on any exception."""
        with self.engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with _Session(bind=conn, expire_on_commit=False, autoflush=False) as session:
                with session.begin():
                    yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (a consistent snapshot on SQLite's WAL)."""
        with self.engine.connect() as conn:
            with _Session(bind=conn, expire_on_commit=False, autoflush=False) as session:
                with session.begin():
                    yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
