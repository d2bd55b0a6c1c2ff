"""A write transaction's statements, sent straight to its DBAPI connection.

Why: an activation sends about fourteen statements in one transaction. Through a SQLAlchemy
Connection each costs an execution context, a compiled-cache lookup, parameter processing and a
Result, several times what the DBAPI call itself costs (counted with valgrind: BENCHMARKS.md,
section "activation-floor"). Here each statement is compiled ONCE per dialect
(`entitlement.storage.hotread.Prepared`: SQL text, parameter order, the types' bind and result
processors) and run on the DBAPI connection of the session's own transaction: the same connection,
the same transaction (BEGIN IMMEDIATE on SQLite, the PostgreSQL transaction psycopg opened, the
deadline's bounds set at begin), the same commit or rollback by the session.

What stays the same as through SQLAlchemy:
- errors: a DBAPI exception goes through the Connection's own handling (wrapped as SQLAlchemy's
  IntegrityError / OperationalError / ..., parameters hidden, `handle_error` hooks, and on a
  disconnect the connection and the pool invalidated), so callers and the access log see exactly
  the exceptions they saw before;
- the engine's `before_cursor_execute` listeners see every statement with the parameters the DBAPI
  gets (tests count round trips with them; bench.activation_floor captures and replays them);
- values: bind and result processors are SQLAlchemy's, so dates, times and bytes are stored and
  read back exactly as through the ORM.

Use it for statements with fixed shapes, built once at import (the write path's); a statement built
per call would grow the cache. An INSERT of a bare table takes its per-call columns from the
parameters' keys (every row of an executemany has the same keys).

Pipeline (PostgreSQL): after `pipeline()`, the statements whose results nobody reads (`execute`,
`execute_many`) are queued in psycopg's pipeline mode instead of each waiting for its answer. They
go to the server with the next statement whose rows are read (`first`, `all`: psycopg flushes the
queue then) or with the COMMIT, in one round trip. Reads known in advance can be sent ahead
together (`prefetch`), and a row count can be read later (`changed_later`: it comes back with the
next read's answer). Entered before the transaction's first statement, the pipeline takes the
BEGIN too, sent without waiting for its answer (psycopg waits for it: a round trip for BEGIN
alone); after the COMMIT, whose Sync answered everything, it is left without another Sync (psycopg's
exit sends one: a round trip after every write transaction). An activation's 13 to 14 statements
then wait 3 or 4 times (BEGIN with its first four reads; its queued writes, the program counter's
UPDATE and the event log's head; a Merkle read for one event in two; the COMMIT): measured by
delaying every answer of the server by 20 ms (in process, sequential), 3.9 waits an activation
against 8.0 before these three changes (and 16.7 before the pipeline). The event log's head row,
locked by every writer from its sequence number to its commit, is held for one or two round trips;
the program counter's row, locked by every activation of the program, from just before that
(`counters.Reservation`), no longer through the activation's earlier round trips. A
redemption waits 3 or 4 times as well. The price: an error in a queued statement (a unique
violation) is raised by that later call, as the same SQLAlchemy exception; `changed` (a row count
now) waits for the queue. `Database.write` ends the pipeline with the transaction (`end`). On SQLite,
where nothing crosses a network, `pipeline()` does nothing.

In a pipeline a statement goes to libpq itself, not through a psycopg cursor (`_Wire`): PREPAREd once
per connection and parameter types (the PREPARE queued in the pipeline before the statement's first
use), then only its name and values travel (`PQsendQueryPrepared`), the values dumped and the rows
loaded by psycopg's own adapters (the connection's Transformer, with the formats a cursor picks), as
entitlement/storage/hotread.py runs the hot reads. Its answer is still matched and checked by
psycopg's pipeline (an `_Answer` in the pipeline's result queue where a cursor would be): the
BEGIN, the Syncs, the COMMIT, errors and aborted pipelines stay psycopg's. Why: a cursor spends
~40 us of the process's CPU on each statement beside the wire (query conversion, prepare
bookkeeping, a poll of the socket per queued command); 13 statements in one pipelined transaction,
BEGIN and COMMIT included, cost 650-970 us of client CPU through cursors against 350-420 us this
way (scratch measure); an activation 4.52 M -> 3.63 M instructions in process (README "Hot path").
psycopg's own preparation is off on these connections (entitlement/storage/db.py: its DEALLOCATE
ALL at a ROLLBACK would drop ours)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import structlog
from psycopg import Pipeline
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from psycopg.generators import send as _send_all
from sqlalchemy import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select
from sqlalchemy.sql.dml import Insert, UpdateBase

from entitlement.storage.hotread import Prepared, loaded

log = structlog.get_logger("entitlement.storage")
_INFO_KEY = "entitlement_direct"
WRITE_OPTION = "entitlement_write"  # the execution option Database.write sets on its connection
_CURSORS_KEY = "entitlement_cursors"  # a psycopg connection's reused cursor, in its info
_WIRE_KEY = "entitlement_wire"  # a psycopg connection's _Wire (its prepared statements), in its info
# What cursor listeners get as `context` for a statement `prefetch` sends ahead (bench.servers
# counts round trips with it); None for the others, as SQLAlchemy passes for a statement it did not
# run itself.
PREFETCHED = "entitlement.direct.prefetched"
COUNTED = "entitlement.direct.counted"  # a statement `changed` waits for (a round trip, pipeline or not)
_prepared: dict[tuple[str, str, Any, tuple[str, ...] | None], Prepared] = {}
_prepared_lock = threading.Lock()


def _prepare(dialect: Any, stmt: Select[Any] | UpdateBase, keys: tuple[str, ...] | None) -> Prepared:
    key = (dialect.name, dialect.driver, stmt, keys)
    p = _prepared.get(key)
    if p is None:
        with _prepared_lock:
            p = _prepared.get(key)
            if p is None:
                p = _prepared[key] = Prepared(stmt, dialect, keys)
    return p


class Statements:
    """One transaction's statements on its DBAPI connection (see the module docstring)."""

    __slots__ = ("_conn", "_dbapi", "_dialect", "_error", "_listened", "_pipeline", "_wire", "_cursors",
                 "_prefetched")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._dbapi: Any = conn.connection.driver_connection
        self._dialect = conn.dialect
        self._error: type[Exception] = conn.dialect.loaded_dbapi.Error
        # Whether any cursor listener is registered (tests, benchmarks), read once per transaction:
        # the joined dispatcher builds a new listener view at every attribute access.
        self._listened = bool(conn.dispatch.before_cursor_execute)
        self._pipeline: Any = None  # the psycopg Pipeline this transaction entered (_enter_pipeline)
        self._wire: _Wire | None = None  # in a pipeline: the connection's prepared statements and adapters
        # psycopg, out of a pipeline: a cursor made once per DBAPI connection and reused by its
        # transactions (making one costs about 18 us of CPU, more than sending most of these
        # statements), kept in the connection's info (SQLAlchemy clears it when the connection is
        # replaced). sqlite3: a new cursor each time, as cheap as reusing one, and no statement is
        # left open on the connection across the commit.
        self._cursors: dict[int, Any] | None = (
            conn.connection.info.setdefault(_CURSORS_KEY, {}) if self._dialect.name == "postgresql" else None)
        self._prefetched: dict[Any, tuple[Prepared, _Answer]] | None = None

    def pipeline(self) -> None:
        """From here to the end of the transaction, queue what `execute` and `execute_many` send
        (PostgreSQL; see the module docstring). Only these statements may follow on this
        transaction's connection: an ORM flush or a Core statement through the session would count
        rows of a pipeline it does not know about."""
        if self._pipeline is not None:
            return
        if not self._conn.get_execution_options().get(WRITE_OPTION, False):
            # Only Database.write leaves pipeline mode with its transaction (end): a read's or a
            # tool's connection would go back to the pool in it. (Refused on SQLite too, so that
            # such a call fails in every test run, not only on PostgreSQL.)
            raise RuntimeError("a pipeline belongs in a write transaction (Database.write)")
        if self._dialect.name != "postgresql":
            return
        info = self._conn.connection.info
        wire = info.get(_WIRE_KEY)
        if wire is None:
            wire = info[_WIRE_KEY] = _Wire(self._dbapi)
        try:
            self._pipeline = _enter_pipeline(self._dbapi)
        except self._error as exc:
            self._conn._handle_dbapi_exception(exc, "<pipeline>", None, None, None)
        wire.unsent = 0
        self._wire = wire

    @property
    def pipelined(self) -> bool:
        return self._pipeline is not None

    def end(self, failed: bool) -> None:
        """Leave pipeline mode (a no-op without one). `failed`: the transaction is being given up, so
        the errors of queued statements are dropped (the exception on its way out is the one that
        counts) and the rollback then runs out of pipeline mode. After the COMMIT, whose Sync
        answered everything, it leaves without another round trip (`_leave_pipeline`). A
        connection that cannot leave it cleanly is invalidated, never handed to the next
        transaction in pipeline mode."""
        pipe, self._pipeline = self._pipeline, None
        wire = self._wire
        if failed:
            self._prefetched = None
        if pipe is None:
            return
        try:
            if failed and (pipe.command_queue or pipe.result_queue):
                try:  # out of an aborted pipeline; what it raises is the same failure, reported already
                    pipe.sync()
                except self._error:
                    pass
            _leave_pipeline(self._dbapi, pipe)
        except self._error as exc:
            if not failed and self._conn.in_transaction() and not in_pipeline(self._dbapi):
                # A queued statement's error, met on the way out in the middle of the transaction
                # (which goes on through the ORM): raised as SQLAlchemy's, as the statement itself
                # would have raised it. (After the COMMIT nothing is raised: the work is done.)
                self._forget()
                self._conn._handle_dbapi_exception(exc, "<pipeline>", None, None, None)
            self._discard(exc)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the connection must not be reused
            self._discard(exc)
        finally:
            if wire is not None:
                wire.settle()

    def _discard(self, exc: Exception) -> None:
        # The exception's type only: a driver's message may quote a row's values.
        log.warning("leaving pipeline mode failed; connection discarded", error=type(exc).__name__)
        self._conn.invalidate()

    def prefetch(self, *reads: tuple[Select[Any] | UpdateBase, dict[str, Any]] | None) -> None:
        """In a pipeline (PostgreSQL): send these reads now, in one round trip with whatever is
        queued (BEGIN included, at a transaction's start), and keep each one's rows for the `first`
        or `all` that asks for the same statement with the same parameters later in this
        transaction (once: asking again reads again). None entries are skipped. Elsewhere: nothing,
        each read runs when asked. A read's error comes out as SQLAlchemy's exception, at the latest
        from the call that asks for its rows (psycopg may meet it while sending a later statement)."""
        if self._pipeline is None:
            return
        prefetched = self._prefetched if self._prefetched is not None else {}
        for read in reads:
            if read is None:
                continue
            stmt, params = read
            p, answer = self._run(stmt, params, context=PREFETCHED)
            prefetched[(stmt, frozenset(params.items()))] = (p, answer)
        self._prefetched = prefetched

    def _taken(self, stmt: Select[Any] | UpdateBase, params: dict[str, Any] | None) -> tuple[Prepared, Any] | None:
        if not self._prefetched:
            return None
        return self._prefetched.pop((stmt, frozenset((params or {}).items())), None)

    def _forget(self) -> None:
        """After an error: SQLAlchemy closes the cursor of a failed statement; new ones next time."""
        if self._cursors is not None:
            self._cursors.clear()
        self._prefetched = None

    def _cursor(self) -> Any:
        cursors = self._cursors
        if cursors is None:
            return self._dbapi.cursor()
        cursor = cursors.get(0)
        if cursor is None or cursor.closed:
            cursor = cursors[0] = self._dbapi.cursor()
        return cursor

    def _run(self, stmt: Select[Any] | UpdateBase, params: dict[str, Any] | None,
             many: Sequence[dict[str, Any]] | None = None, queued: bool = False,
             context: str | None = None) -> tuple[Prepared, Any]:
        """Send a statement: through the pipeline (an `_Answer` for its results, None when `queued`:
        nobody reads them), else on a cursor (which then holds its results)."""
        first = many[0] if many is not None else params or {}
        keys = tuple(first) if isinstance(stmt, Insert) else None
        p = _prepare(self._dialect, stmt, keys)
        conn = self._conn
        if many is not None:
            args: Any = [p.parameters(row) for row in many]
        else:
            args = p.parameters(first)
        if self._listened:
            conn.dispatch.before_cursor_execute(conn, None, p.sql, args, context, many is not None)
        if self._pipeline is not None:
            return p, self._send(p, args if many is not None else (args,), reading=not queued)
        cursor = None
        try:
            cursor = self._cursor()
            if many is not None:
                cursor.executemany(p.sql, args)
            else:
                cursor.execute(p.sql, args)
        except self._error as exc:
            self._forget()
            conn._handle_dbapi_exception(exc, p.sql, args, cursor, None)
        return p, cursor

    def _send(self, p: Prepared, rows: Sequence[dict[str, Any]], reading: bool) -> _Answer | None:
        """Queue a statement in the pipeline, once per row (libpq sends it without waiting); when
        `reading`, the answer that gets the last row's results."""
        dbapi, pipe, wire = self._dbapi, self._pipeline, self._wire
        assert wire is not None
        answer: _Answer | None = None
        try:
            with dbapi.lock:
                if pipe.command_queue:  # psycopg's own commands first, in their order
                    dbapi.wait(pipe._communicate_gen())
                pgconn = dbapi.pgconn
                size = 0
                for row in rows:
                    key, name, values, formats = wire.bind(p, row, pipe)
                    pgconn.send_query_prepared(name, values, param_formats=formats)
                    answer = _Answer(wire, key)
                    pipe.result_queue.append((answer, None))
                    size += _MESSAGE_BYTES + (sum(len(v) for v in values if v is not None) if values else 0)
                # Left in libpq's buffer (non-blocking mode: it sends by itself only past 8 KB): it
                # goes with the next read's flush or the COMMIT's Sync, in the same send. psycopg's
                # cursor sent each statement at once, so the server ran it while this thread went
                # on; one send and one wake-up of the backend per statement cost an activation
                # about 100 us of this process's system CPU and 100 us of the backend's (in process,
                # three alternated runs of 400: 1,004-1,113 against 1,137-1,340 us, the backend 750-875
                # against 800-975), for 60-350 us less wall time one call at a time.
                # But at most SEND_AT bytes wait so: psycopg's COMMIT (and the rollback's Sync)
                # flushes only a few times without waiting for the socket to take the rest, then waits
                # for an answer the server cannot give before it has all the statements: with more
                # than a socket's worth queued (tens of MB), the COMMIT would hang for good.
                wire.unsent += size
                if wire.unsent > SEND_AT:
                    dbapi.wait(_send_all(pgconn))  # psycopg's: every byte out, waiting for the socket
                    wire.unsent = 0
        except self._error as exc:
            self._forget()
            self._conn._handle_dbapi_exception(exc, p.sql, None, None, None)
        return answer if reading else None

    def _result(self, p: Prepared, answer: _Answer) -> Any:
        """A pipelined statement's result (a PGresult), waiting for it if it has not come yet: the
        queue is flushed and every answer up to it read (one round trip)."""
        if answer.result is None:
            pipe, dbapi = self._pipeline, self._dbapi
            if pipe is None:
                raise RuntimeError("the pipeline ended before this statement's answer was read")
            try:
                with dbapi.lock:
                    if pipe.command_queue:
                        dbapi.wait(pipe._communicate_gen())
                    dbapi.wait(pipe._fetch_gen(flush=True))  # (sends every byte queued first)
                    self._wire.unsent = 0  # type: ignore[union-attr]
            except self._error as exc:
                self._forget()
                self._conn._handle_dbapi_exception(exc, p.sql, None, None, None)
            if answer.result is None:
                raise RuntimeError("the pipeline gave no answer to a statement sent")
        return answer.result

    def _rows(self, p: Prepared, sent: Any, one: bool) -> list[Any]:
        if isinstance(sent, _Answer):
            assert self._wire is not None
            result = self._result(p, sent)
            try:
                raw = self._wire.rows(result, one)
            except self._error as exc:  # a value psycopg cannot load, raised as SQLAlchemy's
                self._conn._handle_dbapi_exception(exc, p.sql, None, None, None)
        else:
            try:
                if one:
                    row = sent.fetchone()
                    raw = [] if row is None else [row]
                else:
                    raw = sent.fetchall()
            except self._error as exc:
                self._forget()
                self._conn._handle_dbapi_exception(exc, p.sql, None, sent, None)
        return [p.convert(r) for r in raw]

    def first(self, stmt: Select[Any] | UpdateBase, params: dict[str, Any] | None = None) -> Any:
        """The first row (a named tuple, values converted as SQLAlchemy would), or None."""
        p, sent = self._taken(stmt, params) or self._run(stmt, params)
        rows = self._rows(p, sent, one=True)
        return rows[0] if rows else None

    def all(self, stmt: Select[Any] | UpdateBase, params: dict[str, Any] | None = None) -> list[Any]:
        p, sent = self._taken(stmt, params) or self._run(stmt, params)
        return self._rows(p, sent, one=False)

    def execute(self, stmt: UpdateBase, params: dict[str, Any] | None = None) -> None:
        """Run a statement without RETURNING whose row count nobody needs (queued in a pipeline)."""
        self._run(stmt, params, queued=True)

    def changed(self, stmt: UpdateBase, params: dict[str, Any] | None = None) -> int:
        """Run a statement without RETURNING; the rows it changed (in a pipeline: once its queue,
        this statement included, is answered)."""
        p, sent = self._run(stmt, params, context=COUNTED)
        return self._count(p, sent)

    def _count(self, p: Prepared, sent: Any) -> int:
        if isinstance(sent, _Answer):
            count = self._result(p, sent).command_tuples
            return -1 if count is None else int(count)
        return int(sent.rowcount)

    def changed_later(self, stmt: UpdateBase, params: dict[str, Any] | None = None) -> "Count":
        """`changed` whose answer is read later: in a pipeline the statement is queued and travels
        with the next statement whose rows are read; `Count.value` then reads its row count without
        another round trip (or waits for it, if nothing was read since). Elsewhere it runs at once,
        as `changed` does."""
        if self._pipeline is None:
            return Count(self, None, None, self.changed(stmt, params))
        p, answer = self._run(stmt, params)
        return Count(self, p, answer, None)

    def execute_many(self, stmt: UpdateBase, rows: Sequence[dict[str, Any]]) -> None:
        """Run a statement without RETURNING once per row (the DBAPI's executemany; queued in a
        pipeline)."""
        if rows:
            self._run(stmt, None, rows, queued=True)


class Count:
    """The row count of a statement sent by `Statements.changed_later`."""

    __slots__ = ("_st", "_p", "_answer", "_value")

    def __init__(self, st: Statements, p: Prepared | None, answer: _Answer | None, value: int | None) -> None:
        self._st, self._p, self._answer, self._value = st, p, answer, value

    def value(self) -> int:
        if self._value is None:
            assert self._p is not None and self._answer is not None
            self._value = self._st._count(self._p, self._answer)
        return self._value


SEND_AT = 64 * 1024  # bytes of queued statements past which they are sent at once (`Statements._send`)
_MESSAGE_BYTES = 32  # a Bind + Execute's own bytes beside the values and the name, about


class _Answer:
    """Where psycopg's pipeline leaves the results of one command `Statements._send` queued (a
    PREPARE, or a statement): it stands in the pipeline's result queue where a cursor would, and is
    checked as a cursor checks its results (psycopg 3.3's `BasePipeline._process_results`, which
    raises the first error of a batch after reading them all; tests/test_direct.py holds it to
    that). A PREPARE's answer tells the connection's `_Wire` that the name exists on the server; a
    statement that meets a prepared statement gone or stale tells it to prepare again."""

    __slots__ = ("result", "_wire", "_key", "_prepare")

    def __init__(self, wire: _Wire, key: tuple[Prepared, tuple[int, ...]], prepare: bool = False) -> None:
        self.result: Any = None
        self._wire, self._key, self._prepare = wire, key, prepare

    def _check_results(self, results: list[Any]) -> None:
        for r in results:
            status = r.status
            if status == pq.ExecStatus.FATAL_ERROR:
                error = pg_errors.error_from_result(r, encoding=self._wire.encoding)
                self._wire.stale(self._key, error.sqlstate)
                raise error
            if status == pq.ExecStatus.PIPELINE_ABORTED:
                raise pg_errors.PipelineAborted("pipeline aborted")
            if status != pq.ExecStatus.COMMAND_OK and status != pq.ExecStatus.TUPLES_OK:
                raise pg_errors.InternalError(f"unexpected result status from query: {pq.ExecStatus(status).name}")

    def _set_results(self, results: list[Any]) -> None:
        if self._prepare:
            self._wire.prepared(self._key)
        else:
            self.result = results[-1]


# A prepared statement the server no longer has (26000: DEALLOCATE ALL from elsewhere, a pooler that
# moved us to another session: every name is forgotten) or whose plan no longer fits (0A000 "cached
# plan must not change result type": a column's type changed under it; that name is forgotten). The
# transaction that met it fails, as it did through psycopg's cursors; the next one prepares again,
# under new names.
_GONE, _STALE_PLAN = "26000", "0A000"


class _Wire:
    """PostgreSQL, one DBAPI connection's: psycopg's Transformer (dumps the values and loads the
    rows as a cursor of this connection does) and the statements PREPAREd on it by this module, by
    statement and parameter types (`w_0`, `w_1`, ...: psycopg's own are `_pg3_N`, the hot reads'
    are on connections of their own). A PREPARE counts once its answer says it ran: one whose
    transaction ended before that (an error before it, in the same pipeline) is forgotten at the
    transaction's end and prepared again under a new name; one that ran is kept whatever became of
    the transaction (a prepared statement outlives a ROLLBACK)."""

    __slots__ = ("tx", "names", "made", "unconfirmed", "formats", "encoding", "unsent")

    def __init__(self, dbapi: Any) -> None:
        self.tx = Transformer(dbapi)
        self.names: dict[tuple[Prepared, tuple[int, ...]], bytes] = {}
        self.made = 0
        self.unconfirmed: set[tuple[Prepared, tuple[int, ...]]] = set()  # PREPAREs sent, not yet answered
        self.formats: dict[int, list[Any]] = {}  # a cursor's (PyFormat.AUTO) for n values, built once
        self.encoding: str = dbapi.info.encoding
        self.unsent = 0  # bytes (about) queued in libpq's buffer since everything was last sent

    def bind(self, p: Prepared, row: dict[str, Any], pipe: Any) -> tuple[tuple[Prepared, tuple[int, ...]], bytes, Any, Any]:
        """The statement's key and prepared name (its PREPARE queued in the pipeline first, if new
        on this connection), the values dumped, and their formats."""
        sql, order = p.numbered()
        if order:
            formats = self.formats.get(len(order))
            if formats is None:
                formats = self.formats[len(order)] = [PyFormat.AUTO] * len(order)
            tx = self.tx
            values: Any = tx.dump_sequence([row[n] for n in order], formats)
            key = (p, tuple(tx.types or ()))
            wire_formats: Any = tx.formats
        else:
            values = wire_formats = None
            key = (p, ())
        name = self.names.get(key)
        if name is None:
            name = f"w_{self.made}".encode()
            self.made += 1
            pipe.pgconn.send_prepare(name, sql, key[1] or None)
            pipe.result_queue.append((_Answer(self, key, prepare=True), None))
            self.names[key] = name
            self.unconfirmed.add(key)
        return key, name, values, wire_formats

    def rows(self, result: Any, one: bool) -> list[tuple[Any, ...]]:
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise pg_errors.ProgrammingError("the statement returned no rows")
        return loaded(self.tx, result, one)

    def prepared(self, key: tuple[Prepared, tuple[int, ...]]) -> None:
        self.unconfirmed.discard(key)

    def stale(self, key: tuple[Prepared, tuple[int, ...]], sqlstate: str | None) -> None:
        if sqlstate == _GONE:
            self.names.clear()
            self.unconfirmed.clear()
        elif sqlstate == _STALE_PLAN:
            self.names.pop(key, None)

    def settle(self) -> None:
        """The transaction's end: PREPAREs never answered are forgotten (they may not exist)."""
        for key in self.unconfirmed:
            self.names.pop(key, None)
        self.unconfirmed.clear()


def execute_text(conn: Connection, sql: str) -> None:
    """Run a fixed SQL string without parameters (BEGIN IMMEDIATE at every SQLite write) on the
    connection's DBAPI connection, as `Statements` runs its statements: cursor events fired,
    errors handled by the Connection."""
    listeners = conn.dispatch.before_cursor_execute
    if listeners:
        listeners(conn, None, sql, (), None, False)
    cursor = None
    try:
        cursor = conn.connection.driver_connection.cursor()
        cursor.execute(sql)
    except conn.dialect.loaded_dbapi.Error as exc:
        conn._handle_dbapi_exception(exc, sql, (), cursor, None)


def _enter_pipeline(dbapi: Any) -> Any:
    """psycopg's `Connection.pipeline()` entered by hand (no nesting: a connection already in
    pipeline mode is refused), so that `_leave_pipeline` may leave without the Sync psycopg's exit
    always sends, and so that the BEGIN can go without waiting (psycopg 3.3, pinned:
    tests/test_direct.py holds the internals used here to what they do)."""
    with dbapi.lock:
        dbapi._check_connection_ok()
        if dbapi._pipeline is not None:
            raise RuntimeError("the connection is in pipeline mode already")
        pipe = dbapi._pipeline = Pipeline(dbapi)
    try:
        pipe.__enter__()
    except BaseException:
        with dbapi.lock:  # never entered: nothing to leave
            dbapi._pipeline = None
        raise
    try:
        if dbapi.pgconn.transaction_status == pq.TransactionStatus.IDLE and not dbapi.autocommit:
            # The transaction's BEGIN and a Sync, as psycopg sends them, but not waited for: their
            # answers are read with the first read's (psycopg waits for them: a round trip for
            # BEGIN alone). Until then libpq reports the connection busy, and from the Sync's
            # answer on, in a transaction, so psycopg sends no BEGIN of its own.
            with dbapi.lock:
                dbapi.wait(dbapi._exec_command(dbapi._get_tx_start_command()))
                pipe._enqueue_sync()
                dbapi.wait(pipe._communicate_gen())
    except BaseException:
        _leave_pipeline(dbapi, pipe)
        raise
    return pipe


def _leave_pipeline(dbapi: Any, pipe: Any) -> None:
    """Leave pipeline mode. When nothing is queued nor awaited and no transaction is open (after
    the COMMIT, which psycopg sends with a Sync and whose answers it has read), libpq leaves it at
    once (`PQexitPipelineMode`); otherwise psycopg's exit sends a Sync and reads what is left: one
    more round trip, which every write transaction used to pay after its COMMIT."""
    try:
        if (not pipe.command_queue and not pipe.result_queue
                and dbapi.pgconn.transaction_status == pq.TransactionStatus.IDLE):
            with dbapi.lock:
                pipe._exit(None)
        else:
            pipe.__exit__(None, None, None)
    finally:
        if pipe.level == 0:
            with dbapi.lock:
                dbapi._pipeline = None


def in_pipeline(dbapi_connection: Any) -> bool:
    """Whether a DBAPI connection is in psycopg's pipeline mode, as libpq or psycopg sees it (never,
    for sqlite3)."""
    pgconn = getattr(dbapi_connection, "pgconn", None)
    return bool(pgconn is not None and (pgconn.pipeline_status
                                        or getattr(dbapi_connection, "_pipeline", None) is not None))


def end(session: Session, failed: bool) -> None:
    """Leave the pipeline mode the session's transaction may have entered (`Statements.end`)."""
    cached: tuple[Any, Statements] | None = session.info.get(_INFO_KEY)
    if cached is not None and cached[1].pipelined:
        cached[1].end(failed)


def of(session: Session) -> Statements:
    """The statements of the session's current transaction (begun here if it is not yet)."""
    cached: tuple[Any, Statements] | None = session.info.get(_INFO_KEY)
    if cached is not None and cached[0] is session.get_transaction():
        return cached[1]
    st = Statements(session.connection())
    session.info[_INFO_KEY] = (session.get_transaction(), st)
    return st
