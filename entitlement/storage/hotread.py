"""Hot reads: single SELECT statements run straight on the DBAPI, for the two reads platforms and
advisors make at every signup and login (CheckEligibility's registry lookup, VerifyEntitlement).

Why not a SQLAlchemy Connection: for a one-row read, checking a connection out of the pool,
building the Connection, the execution context and the Result, and checking it back in cost about
four times what the DBAPI call itself does (profiled: 63 us against 15 us per lookup on SQLite,
README "Hot path"). Here each statement is compiled ONCE per dialect by SQLAlchemy (the SQL text,
the order of its parameters, the types' bind and result processors), and each worker thread keeps
its own autocommit DBAPI connection, made by the reader engine (so with its connect parameters and
PRAGMAs), then detached from its pool. Every statement reads one consistent snapshot, as on the
autocommit pool it replaces; nothing here may write. On PostgreSQL a statement goes through
libpq itself (psycopg.pq), PREPAREd once per connection, its values and rows converted by
psycopg's own adapters (`_execute_prepared`): about 7 % less of the server's CPU per check or
verification than through a psycopg cursor (README "Hot path").

What stays the same as through SQLAlchemy:
- errors: a DBAPI exception is re-raised as SQLAlchemy's own wrapper (`DBAPIError.instance`:
  OperationalError, IntegrityError, ...; parameters hidden), so the access log maps outages to
  UNAVAILABLE exactly as before, and a wait ended by the call's deadline is DEADLINE_EXCEEDED;
- dead connections: a disconnect error drops the connection, and bumps a generation number that
  makes every thread reconnect before its next read, as SQLAlchemy invalidates a whole pool on a
  disconnect (the health monitor's ping reads through here too, so an outage nobody called through
  is noticed);
- fail fast: while the health monitor finds the database down, reads are refused without trying.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections import namedtuple
from collections.abc import Callable
from typing import Any

from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from sqlalchemy import Engine, LargeBinary
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql import Select, TextClause
from sqlalchemy.sql.dml import Insert, UpdateBase

from entitlement import deadline


class Prepared:
    """A statement compiled once for one dialect: SQL text, parameter order, type processors.
    A SELECT, or (entitlement/storage/direct.py) an INSERT / UPDATE / DELETE, with or without
    RETURNING; an INSERT of a bare table names its per-call columns in `keys`."""

    __slots__ = ("sql", "positional", "_template", "_per_call", "_results", "_convert_at", "row", "_numbered")

    def __init__(self, stmt: Select[Any] | TextClause | UpdateBase, engine: Engine | Dialect,
                 keys: tuple[str, ...] | None = None) -> None:
        dialect = engine.dialect if isinstance(engine, Engine) else engine
        # Expanding parameters (IN lists of constants) are rendered into the text now, with the
        # per-call parameters left as placeholders: an IN over per-call values cannot be prepared
        # once (refused here, when the statement is first prepared).
        # An INSERT is compiled as for an executemany: without the RETURNING of a generated primary
        # key that SQLAlchemy adds for a single row (nothing here reads it back); an explicit
        # RETURNING stays.
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None,
                                for_executemany=isinstance(stmt, Insert) and not stmt.exported_columns)
        per_call = {n: None for n, b in compiled.binds.items() if b.required}
        expanding = sorted(n for n, b in compiled.binds.items() if b.required and b.expanding)
        if expanding:
            raise ValueError(f"a hot read cannot take an IN list of per-call values ({', '.join(expanding)})")
        state = compiled.construct_expanded_state(per_call)
        self.sql: str = state.statement
        self.positional: bool = bool(compiled.positional)
        names = list(state.positiontup or ()) if self.positional else list(state.parameters)
        processors = {n: _sqlite_blob if dialect.name == "sqlite" and isinstance(b.type, LargeBinary)
                      else b.type.dialect_impl(dialect).bind_processor(dialect) for n, b in compiled.binds.items()}
        processors.update(state.processors)  # the expanded names (state_1_1, ...)
        # The parameters as sent: the constants' values processed once, here; each per-call value is
        # processed into its slot (a position, or a name) at every call.
        def processed(name: str, value: Any) -> Any:
            proc = processors.get(name)
            return proc(value) if proc is not None else value
        slots = list(range(len(names))) if self.positional else names
        self._template: list[Any] | dict[str, Any] = (
            [None] * len(names) if self.positional else dict.fromkeys(names))
        per_call_slots = []
        for slot, name in zip(slots, names):
            if name in per_call:
                per_call_slots.append((slot, name, processors.get(name)))
            else:
                self._template[slot] = processed(name, state.parameters[name])  # type: ignore[index]
        self._per_call: tuple[tuple[Any, str, Callable[[Any], Any] | None], ...] = tuple(per_call_slots)
        columns: list[Any] = (list(stmt.selected_columns) if isinstance(stmt, Select) else
                              list(stmt.exported_columns) if isinstance(stmt, UpdateBase) else [])
        self._results = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
        self._convert_at = tuple(i for i, proc in enumerate(self._results) if proc is not None)
        names = [getattr(c, "key", None) or f"_{i}" for i, c in enumerate(columns)]
        self.row = namedtuple("Row", names, rename=True) if columns else None  # type: ignore[misc]
        self._numbered: tuple[bytes, tuple[str, ...]] | None = None

    def numbered(self) -> tuple[bytes, tuple[str, ...]]:
        """PostgreSQL: the text with libpq's placeholders ($1, $2, ...: one per distinct name, in
        order of first use) and the names in that order (psycopg's pyformat converted once, as
        psycopg converts it at every execute)."""
        if self._numbered is None:
            self._numbered = numbered(self.sql)
        return self._numbered

    def parameters(self, params: dict[str, Any]) -> list[Any] | dict[str, Any]:
        """What the DBAPI gets for these per-call values (a KeyError names one not given)."""
        args = self._template.copy()
        for slot, name, proc in self._per_call:
            value = params[name]
            args[slot] = proc(value) if proc is not None else value  # type: ignore[index]
        return args

    def convert(self, raw: tuple[Any, ...]) -> Any:
        if self.row is None:
            return raw
        if not self._convert_at:
            return self.row._make(raw)
        values = list(raw)
        results = self._results
        for i in self._convert_at:
            if values[i] is not None:  # (SQLAlchemy's processors pass None through)
                values[i] = results[i](values[i])  # type: ignore[misc]
        return self.row._make(values)


def _sqlite_blob(value: Any) -> Any:
    """sqlite3 binds a bytearray as it is; SQLAlchemy's LargeBinary processor gives it a memoryview,
    which it first offers to its adapters (a failed lookup of `__adapt__` / `__conform__` at every
    value: ~300 ns, a twentieth of a registry lookup). The same BLOB is stored and compared. Bytes
    only: anything else goes as SQLAlchemy's processor sends it (a memoryview; TypeError for what
    has no buffer, where bytearray would make an int that many zero bytes)."""
    if type(value) is bytes:
        return bytearray(value)
    return None if value is None else memoryview(value)


_PYFORMAT = re.compile(r"%\(([^)]+)\)s|%%")  # as psycopg reads them (a bind name may hold a "-")


def numbered(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """A pyformat statement (`%(name)s`) with libpq's placeholders instead ($1, $2, ...: one per
    distinct name, in order of first use), and the names in that order."""
    order: dict[str, int] = {}

    def number(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return "%"
        return f"${order.setdefault(m.group(1), len(order) + 1)}"
    return _PYFORMAT.sub(number, sql).encode(), tuple(order)


class _Session:
    """PostgreSQL: what one thread's connection keeps besides itself: psycopg's Transformer (its
    adapters: dumps the parameters and loads the rows exactly as a cursor does) and the statements
    prepared on it (by name)."""

    __slots__ = ("tx", "names", "made")

    def __init__(self, conn: Any) -> None:
        self.tx = Transformer(conn)
        self.names: dict[tuple[Prepared, tuple[int, ...]], bytes] = {}  # by statement and parameter types
        self.made = 0  # statements prepared on this connection (their names: hot_0, hot_1, ...)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - a dead connection may fail to close
        pass


class HotReads:
    """Single statements on each thread's own autocommit DBAPI connection (see the module docstring)."""

    def __init__(self, reader: Engine, down: Callable[[], BaseException]) -> None:
        self._reader = reader
        self._dialect = reader.dialect
        self._libpq = reader.dialect.name == "postgresql"
        self._dbapi_error: type[Exception] = reader.dialect.loaded_dbapi.Error
        self._down = down
        # Set by the Database (its health monitor's fail_fast): reads are refused without trying.
        # (An attribute, not a callable: every read looks at it.)
        self.refusing = False
        self._prepared: dict[object, Prepared] = {}
        self._local = threading.local()
        self._generation = 0
        self.on_disconnect: Callable[[], None] | None = None  # called after a disconnect (set by Database)
        self._lock = threading.Lock()
        # The connections made here (their pool fairies), for dispose(); weak: a thread that ends
        # drops its thread-local fairy, and its connection closes with it.
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        # Called with the SQL of every statement sent (tests and benchmarks count round trips; the
        # engine's cursor events do not see these statements).
        self.listeners: list[Callable[[str], None]] = []
        # When (time.monotonic()) a read here last got its answer: the health monitor's evidence
        # that the database answers after its ping was sent (Database.answered_since).
        self.answered_at = 0.0

    def prepare(self, stmt: Select[Any] | TextClause) -> Prepared:
        p = self._prepared.get(stmt)
        if p is None:
            p = self._prepared[stmt] = Prepared(stmt, self._reader)
        return p

    def first(self, stmt: Select[Any] | TextClause, params: dict[str, Any] | None = None) -> Any:
        """The first row (a named tuple, types converted as SQLAlchemy would), or None."""
        rows = self._run(self.prepare(stmt), params or {}, one=True)
        return rows[0] if rows else None

    def all(self, stmt: Select[Any] | TextClause, params: dict[str, Any] | None = None) -> list[Any]:
        return self._run(self.prepare(stmt), params or {}, one=False)

    def ping(self, stmt: TextClause) -> None:
        """One round trip on this thread's connection, even while reads are refused (the health
        monitor's probe)."""
        self._run(self.prepare(stmt), {}, one=True, probe=True)

    def invalidate(self) -> None:
        """Every thread reconnects before its next read (after a disconnect, or a dispose)."""
        with self._lock:
            self._generation += 1
            fairies, self._open = list(self._open), weakref.WeakSet()
        for fairy in fairies:
            try:
                fairy.close()  # detached: really closes it (another thread may still hold it: harmless)
            except Exception:  # noqa: BLE001 - a dead connection may fail to close
                pass

    def _connect(self) -> Any:
        """A new connection for this thread (_run uses the thread's own while its generation holds)."""
        local = self._local
        generation = self._generation
        fairy = self._reader.raw_connection()  # the reader engine's connect parameters and events
        conn = fairy.dbapi_connection
        fairy.detach()
        weakref.finalize(fairy, _close_quietly, conn)  # when its thread ends (or dispose() drops it)
        with self._lock:
            self._open.add(fairy)
        local.conn, local.fairy, local.generation = conn, fairy, generation
        local.session = _Session(conn) if self._libpq else None
        return local.conn

    def _run(self, p: Prepared, params: dict[str, Any], one: bool, probe: bool = False) -> list[Any]:
        if self.refusing and not probe:
            raise self._down()
        args = p.parameters(params)
        if self.listeners:
            for listener in self.listeners:
                listener(p.sql)
        local = self._local
        conn = getattr(local, "conn", None)
        try:
            if conn is None or local.generation != self._generation:
                conn = None
                conn = self._connect()
            if self._libpq:
                raw = _execute_prepared(conn, self._local.session, p, args, one)
            else:
                # sqlite3: a new cursor (cheap), so that no statement stays open on the connection
                # between calls, pinning a WAL snapshot.
                cursor = conn.execute(p.sql, args)
                if one:
                    row = cursor.fetchone()
                    raw = [] if row is None else [row]
                else:
                    raw = cursor.fetchall()
        except self._dbapi_error as exc:
            raise self._translate(exc, p, conn) from exc
        answered = _monotonic()
        if answered > self.answered_at:  # threads race here: the latest answer wins
            self.answered_at = answered
        return [p.convert(r) for r in raw]

    def _translate(self, exc: Exception, p: Prepared, conn: Any) -> BaseException:
        disconnect = False
        try:
            disconnect = bool(self._dialect.is_disconnect(exc, conn, None))
        except Exception:  # noqa: BLE001 - deciding must not hide the original error
            pass
        if disconnect:
            self._local.conn = self._local.fairy = self._local.session = None
            self.invalidate()
            if self.on_disconnect is not None:
                self.on_disconnect()  # the engines' pools too (storage.db._one_disconnect_for_all)
        err = DBAPIError.instance(p.sql, None, exc, self._dbapi_error, hide_parameters=True,
                                  connection_invalidated=disconnect, dialect=self._dialect)
        if isinstance(err, OperationalError) and deadline.expired():
            timeout = deadline.exceeded()
            timeout.database_wait = True  # type: ignore[attr-defined]
            return timeout
        return err


_monotonic = time.monotonic


# A prepared statement the server no longer has (26000: a pooler that moved us to another session)
# or whose plan no longer fits (0A000 "cached plan must not change result type": a column's type
# changed under it): prepared again, once, instead of failing until the connection is replaced.
_PREPARE_AGAIN = frozenset({b"26000", b"0A000"})


def _execute_prepared(conn: Any, session: _Session, p: Prepared, args: Any, one: bool) -> list[tuple[Any, ...]]:
    """PostgreSQL: one statement through libpq itself (psycopg.pq), prepared on this connection the
    first time (PREPARE once, then only its name and the values travel): psycopg's cursor spends
    more of the process's CPU on an execute than the read itself (measured: README "Hot path"), and
    the server skips parsing and planning. The values are dumped and the rows loaded by psycopg's
    own adapters (the connection's Transformer), and the statement is prepared with the types those
    adapters give the values (one prepared statement per statement and types, as psycopg keys its
    own), so the rows are what a cursor returns. libpq waits for the answer without the interpreter
    lock, as psycopg's cursor does. Errors are psycopg's own (the server's SQLSTATE, or a connection
    lost)."""
    pgconn = conn.pgconn
    sql, order = p.numbered()
    tx = session.tx
    values = tx.dump_sequence([args[n] for n in order], [PyFormat.TEXT] * len(order)) if order else None
    key: tuple[Prepared, tuple[int, ...]] = (p, tuple(tx.types or ()) if order else ())
    for attempt in (1, 2):
        name = session.names.get(key)
        if name is None:
            name = f"hot_{session.made}".encode()
            result = pgconn.prepare(name, sql, key[1] or None)
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise pg_errors.error_from_result(result, encoding=conn.info.encoding)
            session.made += 1
            session.names[key] = name
        result = pgconn.exec_prepared(name, values)
        if result.status == pq.ExecStatus.TUPLES_OK:
            break
        if attempt == 1 and result.error_field(pq.DiagnosticField.SQLSTATE) in _PREPARE_AGAIN:
            del session.names[key]
            pgconn.exec_(b"DEALLOCATE " + name)  # (already gone after a 26000: its error is ignored)
            continue
        raise pg_errors.error_from_result(result, encoding=conn.info.encoding)
    return loaded(tx, result, one)


def loaded(tx: Any, result: Any, one: bool) -> list[tuple[Any, ...]]:
    """The rows of a PGresult (the first only, if `one`), loaded by psycopg's adapters as a cursor
    loads them."""
    n = min(result.ntuples, 1) if one else result.ntuples
    if not n:
        return []
    tx.set_pgresult(result)
    try:
        rows: list[tuple[Any, ...]] = tx.load_rows(0, n, tuple)
    finally:
        tx.set_pgresult(None)  # the result's memory goes now, not with the connection's next read
    return rows
