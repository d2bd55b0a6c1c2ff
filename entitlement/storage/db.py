"""The Database: one engine, sessions for reads and for writes, right for each backend.

SQLite: WAL journal, foreign keys on, and writes in `BEGIN IMMEDIATE` transactions. pysqlite's
own transaction handling is switched off (it defers BEGIN until the first DML statement, which
turns a read-then-write into a lock upgrade that fails with "database is locked" instead of
waiting); we emit BEGIN ourselves, as SQLAlchemy's SQLite dialect documentation recommends
("Serializable isolation / Savepoints / Transactional DDL").
PostgreSQL (psycopg 3): READ COMMITTED; invariants are enforced by constraints, conditional updates
and row locks rather than by the isolation level.

Bounded waits (the server's Database, built from Settings by entitlement/app.py; README "Database
outage"): SQLite waits for the write lock at most `lock_timeout_ms`, and never past the calling
RPC's deadline (entitlement/deadline.py, see "Deadlines" below), so a locked file answers
UNAVAILABLE while the caller still listens. PostgreSQL gets connect_timeout, lock_timeout,
statement_timeout and TCP keepalive / user timeout as connection parameters: session defaults,
no extra round trip per call. There is no pool pre-ping (a round trip per checkout): a disconnect
error invalidates the whole pool (SQLAlchemy's default), so every connection opened before an
outage is replaced on its next checkout, and the health monitor's ping (entitlement/dbhealth.py)
notices an outage even when no call does.

Fail fast: while the health monitor finds the database down, transactions it marks (all of them;
on SQLite, whose reads go on under another's write lock, the writes only) raise DatabaseDown at
once instead of waiting for a lock or a connection: worker threads are not held by a dead database,
and a recovering PostgreSQL gets one ping per interval instead of a reconnection storm.

SQLite writers of one process queue on a lock of this Database before BEGIN IMMEDIATE (a server
process is the only one serving its SQLite file; command-line tools still meet it at SQLite's own
lock). SQLite's busy handler polls a locked file with sleeps of up to 100 ms, so under concurrent
writes the lock sat free while waiters slept (p99 of an activation at 8 in flight: 0.6 s,
BENCHMARKS.md); a waiter on this lock takes it the moment it is released. The wait is bounded as
the busy timeout is (the setting, never past the call's deadline), and a wait that runs out raises
the same error as a busy file ("database is locked"): UNAVAILABLE, or DEADLINE_EXCEEDED when the
deadline ended it.

Group commit (SQLite): a call's writer that finishes its block while two or more others are queued
on that lock does not commit; it hands the open transaction to the next one and waits, and the
writer that finds fewer queued behind it commits for all (`_Group`; work outside a call never
joins a group, nor does long work within a call: `long_work`). Each later member's block runs in a
savepoint of its own, so a block that fails (an error, a refused request, a caller gone) rolls back
its own work only, and `write()` still returns only once the block's changes are durable.
A COMMIT costs the fsync of `synchronous=FULL` and the WAL frames of every page the transaction
changed, and consecutive activations change many of the same pages; a lone writer commits at once,
as before. What it trades: an early member of a group waits for the later members' blocks too.

Writes on the event loop (SQLite, the event-loop server; entitlement/aio_server.py `_loop_write`):
an activation or a redemption handed from the loop to a pool thread and back paid about 30 thread
switches a call (the interpreter lock passed between the loop and the pool at every sqlite3 call
that lets it go) against about 10 when it ran on the loop itself. So the loop runs those writes
itself, inside `loop_write()`, as long as nothing would make it wait: this process's writers' lock
is taken without waiting (`try_take`), BEGIN IMMEDIATE is sent with a busy timeout of 0 (another
process holding SQLite's lock, a command-line import, is an answer, not a wait), and the block
never hands its group on (the loop would then wait for the group's COMMIT): it commits the open
group itself. When the lock is taken or SQLite's lock is held, the write raises LoopWriteDeferred
before anything was written, and the call is run again, from its start, in the pool, as any other
(only the first write of a call may be deferred, a write that only makes what is missing,
`write(idempotent=True)`, not counting: a later one, after a write began, waits on the loop). The
COMMIT's fsync is made on the loop: `loop_writes_ok` sends the writes to the pool while the recent
COMMITs that wrote rows (an average; rollbacks and empty COMMITs are not samples of the disk) take
over LOOP_COMMIT_BOUND_S, on a disk slower than a local SSD.

WAL checkpoints (SQLite, the server's Database): SQLite copies its write-ahead log back into the
database file (a checkpoint: reads of the log, writes and fsyncs of the file) in the commit that
finds the log past `wal_autocheckpoint` pages, 1,000 by default: about one activation in a hundred
paid 5 to 8 ms more for it (p99 of sequential activations 8.6 ms; without checkpoints 3.4 ms). The
server's Database does them in a thread of its own instead (`checkpoint_every_s`), a passive
checkpoint every quarter of a second on a connection of its own, which waits for no reader or
writer; its commits checkpoint only if the log reaches 10,000 pages (the safety net).
The checkpoint keeps the durability of the commits' connections (synchronous=FULL).
A checkpoint copies the log but does not shorten it: the log starts over from its beginning only
when a writer begins while all of it is copied and no reader is still on it, and under steady
writes a commit landed during nearly every checkpoint, so it never did. The log then grew to the
safety net, whose threshold counts every page in the log, copied or not: from there every commit
checkpointed (activations at 260-267 a second, SQLite, `python -m bench.rpcs`: a commit held 8-16
ms about every 250 activations, the slowest 1 % of the calls). So a passive checkpoint that copied
the whole log is followed by a RESTART one, which checks that no reader is still on the log (then
the next writer starts it over) and holds SQLite's writer lock meanwhile. Sent at any moment (a
first version, not kept), it copied under that lock whatever had been committed since: a few
commits' pages and their fsyncs, 2-9 ms, a stall for every writer each quarter of a second. It is
sent only when it has nothing to copy: this process's writers' lock free, no group open, and no
group ended since the passive checkpoint began (`_WriterQueue.commits`; another process's commit,
a command-line tool's, may still land in between, and is then copied under the lock); otherwise
another passive checkpoint copies what came, outside any lock, and the thread tries again, a few
times per run. It takes that lock without queueing (`try_take`: never counted as a queued writer,
never a wait), and its connection's busy timeout is 0: a reader still on the log or another
process's writer is an answer (busy), never a wait with the writer lock held.

Deadlines: within a gRPC call, transactions keep to the call's deadline (entitlement/deadline.py,
bound for every call by entitlement/api/wrapping.py): a write is not started too close to it, nor
committed for a caller that gave up; a lock wait never outlives it (SQLite: the busy timeout of the
write; PostgreSQL: `SET LOCAL lock_timeout / statement_timeout`, a round trip paid only when the
deadline is nearer than the session's own bound). A wait ended by the deadline is DEADLINE_EXCEEDED;
a wait ended by the configured bound is an outage (UNAVAILABLE), as is any other failure (a lost
connection, a full disk), whatever the deadline (`_deadline_errors`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import BigInteger, Connection, Engine, create_engine, event, func, literal, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from entitlement import deadline, rollup
from entitlement.storage import direct
from entitlement.storage.hotread import HotReads
from entitlement.storage.periodic import PeriodicTask
from entitlement.storage.pgstats import StatisticsKeeper

_log = structlog.get_logger("entitlement.storage")

_WRITE = direct.WRITE_OPTION
_BUSY_MS = "entitlement_busy_ms"  # the busy timeout last set on a SQLite connection (its record's info)

# Time kept, before the caller's deadline, to roll back and answer while it still listens.
DEADLINE_MARGIN_S = 0.1
# Whether the current transaction's lock waits were cut to the call's deadline (rather than to the
# configured bound): a wait that then fails is DEADLINE_EXCEEDED, not an outage.
_capped_by_deadline: ContextVar[bool] = ContextVar("entitlement_wait_capped_by_deadline", default=False)
# Above this average COMMIT time (fsync included), SQLite writes leave the event loop for the pool.
LOOP_COMMIT_BOUND_S = 0.002


class LoopWriteDeferred(BaseException):
    """A write on the event loop (`loop_write`) that would have to wait (this process's writers'
    lock taken, SQLite's held by another process): raised before anything was written, so that the
    call runs again in the pool. A BaseException: no `except Exception` of a handler takes it for
    an error of its own; the access log and the rate limit let it through without a line or a
    token (entitlement/api/accesslog.py, entitlement/api/ratelimit.py)."""


class _LoopCall:
    __slots__ = ("began",)

    def __init__(self) -> None:
        self.began = False  # a write block of this call began (its later writes may no longer be deferred)


_loop_call: ContextVar[_LoopCall | None] = ContextVar("entitlement_loop_write", default=None)


@contextmanager
def loop_write() -> Iterator[None]:
    """The event loop's scope for a call whose writes it runs itself (see the module docstring)."""
    token = _loop_call.set(_LoopCall())
    try:
        yield
    finally:
        _loop_call.reset(token)


# Set by `long_work`: this context's writes never join a group of calls' writes.
_long_work: ContextVar[bool] = ContextVar("entitlement_long_work", default=False)


@contextmanager
def long_work() -> Iterator[None]:
    """The writes of a long piece of work done within a call (a registry import pushed over gRPC:
    its batches of 20,000 rows, the prune of old snapshots' rows), as those of work outside a call:
    on SQLite they never join a group (`_Group`), whose members, their blocks done, would wait for
    them before their COMMIT and their answers; each commits the open group for its members first
    and writes in a transaction of its own."""
    token = _long_work.set(True)
    try:
        yield
    finally:
        _long_work.reset(token)


def _deferrable() -> _LoopCall | None:
    """The event loop's call whose next write may still be deferred (none of its writes began), or None."""
    call = _loop_call.get()
    return call if call is not None and not call.began else None


def _locked(exc: OperationalError) -> bool:
    return isinstance(exc.orig, sqlite3.OperationalError) and "locked" in str(exc.orig).lower()


# PostgreSQL's errors for a wait its bounds ended: lock_timeout (lock_not_available), statement_timeout
# (query_canceled).
_PG_WAIT_ENDED = frozenset({"55P03", "57014"})


def _wait_ended(exc: OperationalError) -> bool:
    """Whether `exc` ended a wait that the call's deadline may have bounded: SQLite's busy file or
    this process's writers' lock ("database is locked"), PostgreSQL's lock or statement timeout.
    Not a lost connection, a full disk, an I/O error: those are outages whatever the deadline."""
    return _locked(exc) or getattr(exc.orig, "sqlstate", None) in _PG_WAIT_ENDED


def bind_deadline(seconds_left: float | None) -> None:
    """Bound this thread's next database waits by a deadline `seconds_left` from now (None: none).
    For threads that own their context (the health monitor's ping); calls get theirs at the gRPC
    edge (entitlement/api/wrapping.py)."""
    deadline.bind(seconds_left)


def wait_bound_ms(limit_ms: int) -> int:
    """The longest lock wait allowed now: `limit_ms` (0 = unbounded), capped by the call's deadline
    (less DEADLINE_MARGIN_S); records whether the deadline was the tighter bound."""
    left_s = deadline.remaining()
    if left_s is None:
        _capped_by_deadline.set(False)
        return limit_ms
    left = max(0, int((left_s - DEADLINE_MARGIN_S) * 1000))
    capped = limit_ms <= 0 or left < limit_ms
    _capped_by_deadline.set(capped)
    return left if capped else limit_ms


@contextmanager
def _deadline_errors() -> Iterator[None]:
    """A lock wait or statement cut short by the call's deadline is DEADLINE_EXCEEDED, not an
    outage (it is still a sign of a busy database: the error says so, for the health monitor).
    Only a wait's error: a transaction whose waits were cut to the deadline may still fail for
    something else (a connection the server ended, perhaps during the COMMIT; a full disk), which
    is the outage it is, not "the deadline passed ... nothing was committed"."""
    _capped_by_deadline.set(False)
    try:
        yield
    except OperationalError as exc:
        if isinstance(exc, (DatabaseDown, GroupAborted)) or not _wait_ended(exc):
            raise
        if deadline.expired() or _capped_by_deadline.get():
            err = deadline.exceeded()
            err.database_wait = True
            raise err from exc
        raise


class _Session(Session):
    """The Database's sessions: every flush also brings the funding report's rollup up to date
    (entitlement/rollup.py), in the same transaction."""


event.listen(_Session, "before_flush", rollup.before_flush)


def utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def advisory_key(*parts: str) -> int:
    """A signed 64-bit PostgreSQL advisory lock key: the first 8 bytes of the SHA-256 of `parts`
    joined by NUL. The first part names the use (`entitlement.request`, `entitlement.caller`,
    `entitlement.registry_switch`, ...), so keys of different uses do not collide (but by a 2^-64
    chance)."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "big", signed=True)


def hold_until_commit(s: Session, key: int) -> None:
    """PostgreSQL: wait for, then hold until the transaction ends, the advisory lock `key`
    (`advisory_key`): writers of one kind across server processes and commands take turns. SQLite:
    nothing (BEGIN IMMEDIATE serializes every writer already)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(func.pg_advisory_xact_lock(literal(key, BigInteger))))


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default driver would be psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class DatabaseDown(OperationalError):
    """Raised without touching the database while the health monitor finds it down (an outage:
    the access log answers UNAVAILABLE)."""

    def __init__(self) -> None:
        super().__init__(None, None, ConnectionError("the health monitor finds the database down"))


_PING = {True: text("SELECT count(*) FROM sqlite_master"), False: text("SELECT 1")}


class Database:
    def __init__(self, url: str, *, pool_size: int = 16, echo: bool = False, lock_timeout_ms: int | None = None,
                 statement_timeout_ms: int = 0, connect_timeout_s: int = 0, checkpoint_every_s: float = 0,
                 analyze_every_s: float = 0) -> None:
        """`lock_timeout_ms`: SQLite busy timeout / PostgreSQL lock_timeout (0: unbounded; None: the
        command-line tools' bounds, 30 s on SQLite and none on PostgreSQL);
        `statement_timeout_ms`, `connect_timeout_s`: PostgreSQL only (0: none);
        `checkpoint_every_s`: SQLite file only, WAL checkpoints in a thread of this Database at this
        interval instead of in commits (0: SQLite's own, in commits); `analyze_every_s`: PostgreSQL
        only, the planner's statistics kept current by a thread of this Database at this interval
        (entitlement/storage/pgstats.py; 0: none). The server passes its settings (entitlement/app.py)."""
        if min(lock_timeout_ms or 0, statement_timeout_ms, connect_timeout_s) < 0:
            raise SystemExit("ENTITLEMENT_DB_*_TIMEOUT_*: a timeout cannot be negative")
        pg_lock_timeout_ms = lock_timeout_ms
        if lock_timeout_ms is None:
            lock_timeout_ms = CLI_SQLITE_LOCK_TIMEOUT_MS
        # SQLite: the busy timeout of this Database's writes (for a connection it does not configure
        # itself in a transaction's begin, the registry import's staging one); 0: unbounded.
        self.sqlite_busy_ms = lock_timeout_ms or SQLITE_FOREVER_MS
        self.url = normalize_url(url)
        try:
            parsed = make_url(self.url)
        except (ArgumentError, ValueError):  # (the URL is not repeated: it may hold a password)
            raise SystemExit("the database URL cannot be parsed: use sqlite:///PATH or "
                             "postgresql://user@host:port/db") from None
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
        # Waiting for a pooled connection is bounded too (the pool holds more than the workers).
        pool_timeout = lock_timeout_ms / 1000 if lock_timeout_ms else 30
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": (lock_timeout_ms or SQLITE_FOREVER_MS) / 1000,
                                      "check_same_thread": False}
            # LIFO: a write takes the connection the last write gave back. Each SQLite connection
            # keeps its own page cache, and drops all of it when it finds that another connection
            # wrote since its last transaction: handed out in turn (the pool's default, FIFO), every
            # write started cold and read its pages again from the file. Measured (20th session,
            # server.py, SQLite activations, strace): 40-43 pread calls an activation against 9-10;
            # at 8 in flight, 3 alternated pairs: 1.04-1.17 x the activations a second, but within
            # bench.rpcs' noise in ratios to echo (docs/PERFORMANCE-LOG.md, twentieth session).
            kwargs.update(pool_size=pool_size, pool_timeout=pool_timeout, pool_use_lifo=True)
        elif self.dialect == "postgresql":
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_timeout=pool_timeout,
                          connect_args=_pg_connect_args(pg_lock_timeout_ms, statement_timeout_ms, connect_timeout_s))
        else:
            raise SystemExit(f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql://")
        writer_kwargs = kwargs
        if self.dialect == "postgresql":
            # psycopg's own prepared statements (a statement run 5 times is PREPAREd) are off on
            # this engine: whenever it has any, psycopg ends every ROLLBACK (and every statement
            # whose status is ROLLBACK, DROP or ALTER) with a DEALLOCATE ALL, which would drop the
            # statements the write path prepares itself (entitlement/storage/direct.py, `_Wire`),
            # and the next write on that connection would fail. The hot writes and reads prepare
            # their own; the rest of this engine's statements are planned at each run, as psycopg
            # did until their fifth.
            writer_kwargs = {**kwargs, "connect_args": {**kwargs["connect_args"], "prepare_threshold": None}}
        self.engine: Engine = create_engine(self.url, **writer_kwargs)
        # Hot-path reads of one or two independent statements (checks, token verification) need
        # no transaction of their own: in autocommit each statement reads one consistent snapshot,
        # and a read costs one round trip instead of BEGIN + SELECT + COMMIT. This engine makes
        # their connections (same bounds, autocommit, so that no connection ever switches between
        # the two modes); `self.hot` keeps one per thread (entitlement/storage/hotread.py).
        reader_kwargs = {**kwargs, "isolation_level": "AUTOCOMMIT"}
        self.reader: Engine = create_engine(self.url, **reader_kwargs)
        self.checkpointer: Checkpointer | None = None
        self.statistics: StatisticsKeeper | None = None
        # SQLite: this process's writers queue here before BEGIN IMMEDIATE (module docstring).
        self._writers = _WriterQueue(lock_timeout_ms) if self.dialect == "sqlite" else None
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if checkpoint_every_s > 0 and database and database != ":memory:":
                assert self._writers is not None
                self.checkpointer = Checkpointer(database, checkpoint_every_s, self._writers)
                # A Database dropped without dispose() stops its thread too.
                weakref.finalize(self, self.checkpointer.stop)
            autocheckpoint = Checkpointer.SAFETY_NET_PAGES if self.checkpointer else None
            _configure_sqlite(self.engine, lock_timeout_ms, autocheckpoint=autocheckpoint)
            _configure_sqlite(self.reader, lock_timeout_ms, emit_begin=False, autocheckpoint=autocheckpoint)
        else:
            _configure_postgresql(self.engine, pg_lock_timeout_ms or 0, statement_timeout_ms)
            _discard_pipelined(self.engine)
            for engine in (self.engine, self.reader):
                _ended_by_the_server_is_a_disconnect(engine)
            if analyze_every_s > 0:
                # (its lock waits bounded: a table another ANALYZE or a VACUUM holds is the next run's)
                self.statistics = StatisticsKeeper(
                    self.url, _pg_connect_args(STATISTICS_LOCK_TIMEOUT_MS, 0, connect_timeout_s), analyze_every_s,
                    advisory_key("entitlement.analyze"))
                weakref.finalize(self, self.statistics.stop)
        self._refuse_writes = False  # set by the health monitor (fail_fast); reads: self.hot.refusing
        # When (time.monotonic()) the database last answered a write's COMMIT, and the latest
        # start of a read (transaction or snapshot statement) that ended without error: the health
        # monitor's evidence that the database answers after its ping was sent (`answered_since`).
        self.wrote_at = self.read_at = 0.0
        # The hot reads (checks, token verification): one statement on a thread's own autocommit
        # DBAPI connection, made by the reader engine (entitlement/storage/hotread.py).
        self.hot = HotReads(self.reader, DatabaseDown)
        if self.dialect == "postgresql":
            _one_disconnect_for_all(self)
        # Writes run on the event loop (`loop_write`), and those deferred to the pool (the tests read them).
        self.loop_writes = self.loop_deferrals = 0

    def loop_writes_ok(self) -> bool:
        """Whether a write may be tried on the event loop now (SQLite: this process's writers' lock
        free, nobody queued for it, the recent COMMITs fast; module docstring)."""
        q = self._writers
        return q is not None and not q.busy() and q.commit_s < LOOP_COMMIT_BOUND_S

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def answered_since(self, since: float, *, writes: bool = False) -> bool:
        """Whether the database answered this process at or after `since` (time.monotonic()): a
        write's COMMIT, or, unless `writes`, a hot read's statement, answered then (work sent
        before `since` counts: its answer came after), or a read transaction or snapshot statement
        begun then ended without error (a block may end well after its last answer: its start
        counts). The health monitor's evidence when its ping fails or goes unanswered
        (entitlement/dbhealth.py). `writes`: only a commit counts (SQLite's write probe: under WAL,
        reads go on while the write lock is held elsewhere)."""
        if self.wrote_at >= since:
            return True
        return not writes and max(self.read_at, self.hot.answered_at) >= since

    def fail_fast(self, *, writes: bool, reads: bool) -> None:
        """From now on, refuse (DatabaseDown) new write / read transactions without trying them."""
        self._refuse_writes = writes
        self.hot.refusing = reads  # (the hot reads, transactions and snapshots alike)

    def ping(self, *, write: bool = False) -> None:
        """One round trip per pool, even while failing fast (the health monitor's probe). `write` (SQLite):
        take the write lock and let it go, waiting for it no longer than the bound deadline. A
        connection found dead is replaced and tried once more: after a database restart that no call
        noticed, the pool's old connections are dead but the database is up."""
        sql = "SELECT count(*) FROM sqlite_master" if self.is_sqlite else "SELECT 1"
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    if write:
                        conn.execution_options(**{_WRITE: True})
                    conn.exec_driver_sql(sql).scalar_one()
                break
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        # The hot reads' connections: a dead one found here makes every thread reconnect.
        for attempt in (1, 2):
            try:
                self.hot.ping(_PING[self.is_sqlite])
                break
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise

    def write(self, idempotent: bool = False) -> AbstractContextManager[Session]:
        """A read-write transaction, committed on success, rolled back on any exception (and, in a
        gRPC call, when the caller gave up: see entitlement/deadline.py). On SQLite, writers that
        queue meanwhile share its commit (group commit: `_Group`); either way the block's changes
        are durable, or none of them, once it returns. `idempotent`: the block only makes what is
        missing, so that a re-run of the call repeats it harmlessly (on the event loop, a later
        write of the call may still be deferred: module docstring)."""
        return self._write_grouped(idempotent) if self._writers is not None else self._write_alone()

    @contextmanager
    def _write_alone(self) -> Iterator[Session]:
        """PostgreSQL: a transaction per block (its writers run side by side, ordered by row locks)."""
        if self._refuse_writes:
            raise DatabaseDown()
        deadline.check_start()
        with _deadline_errors(), self.engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with _Session(bind=conn, expire_on_commit=False, autoflush=False) as session:
                failed = True
                try:
                    with session.begin():
                        try:
                            yield session
                            # Nothing is committed for a caller that gave up. (Writes queued in a
                            # PostgreSQL pipeline run with the COMMIT, after this check: an
                            # activation's last ones, ordered behind the log_head row it holds.)
                            deadline.check_caller()
                        except BaseException:
                            # Out of pipeline mode (direct.py) before the rollback, so that the
                            # queue's own errors cannot mask this exception.
                            direct.end(session, failed=True)
                            raise
                    failed = False  # committed (a PostgreSQL pipeline's queue went with the COMMIT)
                    self.wrote_at = max(self.wrote_at, time.monotonic())  # the COMMIT's answer
                finally:
                    # After the COMMIT; or, when the COMMIT itself failed, after SQLAlchemy's
                    # rollback (psycopg syncs the pipeline before its ROLLBACK).
                    try:
                        direct.end(session, failed)
                    finally:
                        _forget(session)

    @contextmanager
    def _write_grouped(self, idempotent: bool = False) -> Iterator[Session]:
        """SQLite: the block runs in the transaction of this process's current group of writers
        (`_Group`): the first member opens it (BEGIN IMMEDIATE), the others each run in a
        savepoint of it, and the one that finds fewer than `_WriterQueue.QUEUED` writers queued
        behind it commits it for all.
        A member that fails rolls back its own work only (the opener: the whole transaction, which
        then holds nothing else); one that succeeds returns once the group's COMMIT is durable, or
        raises if it failed."""
        if self._refuse_writes:
            raise DatabaseDown()
        deadline.check_start()
        queue = self._writers
        assert queue is not None
        loop_call = _loop_call.get()
        may_defer = _deferrable() is not None
        with _deadline_errors():
            if not may_defer:
                queue.acquire()
            elif not queue.try_take():
                self.loop_deferrals += 1
                raise LoopWriteDeferred()
            try:
                group = queue.group
                if group is not None and (_long_work.get() or not deadline.in_call()):
                    # Work outside a call (an import's batch, a job, a command) may be long, as may
                    # work within one marked so (`long_work`: a pushed import): it ends the open
                    # group for its members (commits it) and writes on its own, so that no call's
                    # answer waits for it.
                    queue.end_open(group)
                    group = None
                opener = group is None
                if group is None:
                    try:
                        group = queue.group = _Group(self.engine)  # BEGIN IMMEDIATE (busy timeout 0 if may_defer)
                    except OperationalError as exc:
                        if may_defer and _locked(exc):  # another process holds SQLite's lock
                            self.loop_deferrals += 1
                            raise LoopWriteDeferred() from None
                        raise
            except BaseException:
                queue.release()
                raise
            if loop_call is not None:
                # A block that only makes what is missing (`idempotent`: a re-run of the call repeats
                # it harmlessly) leaves a later write of the call free to be deferred.
                loop_call.began = loop_call.began or not idempotent
                self.loop_writes += 1
            try:
                # The opener's session uses the group's transaction without committing it (its
                # rollback is the transaction's: nothing else is in it yet); a later member's
                # session runs in a savepoint of its own.
                session = _Session(bind=group.conn, expire_on_commit=False, autoflush=False,
                                   join_transaction_mode="rollback_only" if opener else "create_savepoint")
                try:
                    with session.begin():
                        yield session
                        deadline.check_caller()  # nothing is committed for a caller that gave up
                finally:
                    group.blocks += 1
                    session.close()
                    _forget(session)
                group.members += 1
            except BaseException:
                # This block's work is out of the transaction; the others' stays.
                queue.settle(group, hand_over=loop_call is None)
                raise
            handed_over = queue.settle(group, hand_over=loop_call is None)  # the loop never waits for a COMMIT
            if handed_over:
                queue.await_commit(group)
            if group.error is not None:
                group.raise_error()
            self.wrote_at = max(self.wrote_at, time.monotonic())  # the group's COMMIT is durable: its answer

    @contextmanager
    def read(self, *, consistent: bool = False) -> Iterator[Session]:
        """A read-only transaction (a consistent snapshot on SQLite's WAL). On PostgreSQL (READ
        COMMITTED) each statement sees the database as of its own start, unless `consistent`: then
        REPEATABLE READ, READ ONLY, every statement the same snapshot (no lock taken), for reads
        whose statements must agree with each other (a funding report's money and activity)."""
        if self.hot.refusing:
            raise DatabaseDown()
        started = time.monotonic()
        with _deadline_errors(), self.engine.connect() as conn:
            if consistent and not self.is_sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with _Session(bind=conn, expire_on_commit=False, autoflush=False) as session:
                try:
                    with session.begin():
                        yield session
                    self.read_at = max(self.read_at, started)
                finally:
                    _forget(session)

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A SQLAlchemy connection of the autocommit pool, for a read of ONE statement whose rows
        need SQLAlchemy (a funder's page of activations: its statement varies with the filters);
        every statement sees the database as of its own start, no BEGIN / COMMIT. The hot reads of
        single rows use `self.hot` instead."""
        if self.hot.refusing:
            raise DatabaseDown()
        started = time.monotonic()
        with _deadline_errors(), self.reader.connect() as conn:
            yield conn
        self.read_at = max(self.read_at, started)

    def dispose(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.statistics is not None:
            self.statistics.stop()
        self.hot.invalidate()
        self.engine.dispose()
        self.reader.dispose()


def _forget(session: Session) -> None:
    """Drop what the transaction kept in `session.info` (direct.py's statements, the event log's
    head): each entry holds the transaction, which holds the session: a reference cycle per
    transaction, left for the cyclic collector, whose young-generation runs then stopped every
    thread for 2-4 ms, every 0.3 s under activations at 220 a second (docs/PERFORMANCE-LOG.md, ninth session)."""
    session.info.clear()


class _WriterQueue:
    """The lock this process's SQLite writers take before writing, and the group of writers whose
    transaction is open (see the module docstring)."""

    __slots__ = ("_lock", "_limit_ms", "_count", "waiting", "group", "commits", "commit_s")

    MAX_GROUP = 64  # blocks run in one group at most (bounds how long the SQLite lock is held at once)
    # A writer hands the group on only when at least this many are queued: two writers meeting by
    # chance at a moderate rate commit one by one (the first would wait for the whole of the
    # second's block to save one COMMIT), a queue that has formed (a burst) shares its commits.
    QUEUED = 2
    POLL_S = 0.005  # a member waiting for its group's commit checks that someone will make it

    def __init__(self, lock_timeout_ms: int | None) -> None:
        self._lock = threading.Lock()
        self._limit_ms = lock_timeout_ms or 0  # 0: unbounded
        self._count = threading.Lock()  # guards `waiting`
        self.waiting = 0  # writers blocked in acquire()
        self.group: _Group | None = None  # the open group (read and changed with `_lock` held)
        self.commits = 0  # groups ended (their COMMITs, or rollbacks), for the checkpoint thread
        self.commit_s = 0.0  # recent COMMITs that wrote (fsync included), seconds: a moving average

    def busy(self) -> bool:
        """Whether a writer holds the lock or waits for it (a racy glance: for `loop_writes_ok`)."""
        return self._lock.locked() or self.waiting > 0

    def acquire(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        with self._count:
            self.waiting += 1
        try:
            if not self._limit_ms and deadline.remaining() is None:
                self._lock.acquire()  # unbounded, as the busy timeout is then
                return
            wait_ms = wait_bound_ms(self._limit_ms)  # records whether the call's deadline bounds it
            if not self._lock.acquire(timeout=wait_ms / 1000):
                raise OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked"))
        finally:
            with self._count:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def try_take(self) -> bool:
        """The lock if it is free now, for someone who is not a writer (the checkpoint thread):
        never counted as queued, so no writer hands a group on for it (a writer that arrives in
        the moment it is held waits, counted, as behind any holder)."""
        return self._lock.acquire(blocking=False)

    def settle(self, group: _Group, hand_over: bool = True) -> bool:
        """With the lock held, after a member's block: hand the open group to the writers queued
        behind (True: the caller then waits for the commit; never when not `hand_over`), or end it
        (commit it if it holds anyone's work, else roll it back) and let the lock go (False)."""
        try:
            if (hand_over and group.members and self.waiting >= self.QUEUED and group.blocks < self.MAX_GROUP
                    and group.intact()):
                return True
            self.end_open(group)
            return False
        finally:
            self._lock.release()

    def end_open(self, group: _Group) -> None:
        """With the lock held: end the open group (commit it if it holds anyone's work)."""
        self.group = None
        started = time.perf_counter()
        try:
            group.end()
        finally:
            if group.wrote:  # a COMMIT that wrote (rollbacks and empty COMMITs, a few us, would hide a slow fsync)
                self.commit_s += (time.perf_counter() - started - self.commit_s) / 8
            # Counted once the COMMIT's pages are in the log, the lock still held: a checkpoint
            # thread that read the count before has seen a change by the time it can take the lock.
            self.commits += 1

    def await_commit(self, group: _Group) -> None:
        """Wait for the group's commit. A writer the group was handed to may give up before taking
        the lock (its wait ran out): whoever then finds the lock free and the group still open
        ends it."""
        while not group.done.wait(self.POLL_S):
            if self._lock.acquire(blocking=False):
                if self.group is group:
                    self.settle(group)
                else:
                    self._lock.release()


class _Group:
    """Writers of one SQLite transaction (group commit): each commit costs an fsync and the WAL
    frames of every page it changed, and consecutive activations change many of the same pages
    (the log head, the counters, the rollup rows, the right-hand leaves of the append-only tables).
    An activation's captured statements replayed on the raw connection, one commit each against one
    per 4 (savepoints included; `python -m bench.activation_floor`, three rounds): 312-370 against
    234-286 us of CPU, 475-540 against 311-359 us of wall time (the write lock's) per activation.

    A call's writer that takes the lock while a group is open joins it (it was queued, or came just
    as the group was handed on); the writer that finds two or more queued behind it hands the group
    on, the one that finds fewer commits it (or, if the writers it was handed to gave up their wait,
    one of the members waiting for the commit does). A lone writer, or one of two that met by
    chance, commits at once, as before. Work outside a call (an import's batch, a job, a command)
    never joins, nor does long work within one (`long_work`: an import pushed over gRPC): it
    commits the open group for its members first. The group is bounded by
    MAX_GROUP blocks and, in practice, by the threads that write (4 offloaded calls at once in the
    event-loop server)."""

    __slots__ = ("conn", "members", "blocks", "done", "error", "changes", "wrote")

    def __init__(self, engine: Engine) -> None:
        conn = engine.connect()
        try:
            conn.execution_options(**{_WRITE: True})
            conn.begin()  # BEGIN IMMEDIATE (the engine's begin listener)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        dbapi = conn.connection.driver_connection
        self.changes = dbapi.total_changes if dbapi is not None else 0  # rows this connection changed so far
        self.wrote = False  # set by end(): its COMMIT wrote rows (a sample of the COMMITs' time)
        self.members = 0  # blocks whose work is in the transaction
        self.blocks = 0  # blocks run in it, failed ones included
        self.done = threading.Event()
        self.error: BaseException | None = None

    def intact(self) -> bool:
        """Whether the transaction still holds its members' work: SQLite rolls a whole transaction
        back on some errors (a full disk, an I/O error), and an invalidated connection has none."""
        conn = self.conn
        if conn.invalidated or conn.closed or not conn.in_transaction():
            return False
        dbapi = conn.connection.driver_connection
        return dbapi is not None and bool(dbapi.in_transaction)

    def end(self) -> None:
        """Commit the transaction if it holds anyone's work and is intact; fail its members if it
        holds work SQLite lost; close it; wake the members waiting."""
        try:
            if self.members and not self.intact():
                self.error = GroupAborted()
            elif self.members:
                dbapi = self.conn.connection.driver_connection
                self.wrote = dbapi is not None and dbapi.total_changes != self.changes
                try:
                    self.conn.commit()
                except BaseException as exc:
                    self.error = exc
                    if self.members > 1:  # its members each raise GroupAborted: the cause, once
                        _log.warning("group commit failed", error=type(exc).__name__, members=self.members)
                    # SQLite may keep the transaction open after a failed COMMIT, and SQLAlchemy's
                    # pool would then hand the connection out inside it: closed instead (SQLite
                    # rolls back what a closed connection left).
                    self.conn.invalidate()
            try:
                self.conn.close()  # a rollback if not committed
            except Exception as exc:  # noqa: BLE001 - the commit's outcome stands; the pool replaces it
                _log.warning("closing a write connection failed", error=type(exc).__name__)
        finally:
            self.done.set()

    def raise_error(self) -> None:
        """The group's failure, as this member's: a member alone in its group gets the COMMIT's own
        exception, as without group commit; the members of a larger group each a GroupAborted (an
        outage: UNAVAILABLE) caused by it, whoever happened to send the COMMIT."""
        err = self.error
        assert err is not None
        if self.members == 1 and not isinstance(err, GroupAborted):
            raise err
        raise GroupAborted() from err


class GroupAborted(OperationalError):
    """A write whose work was in a group's transaction that another member's failure rolled back,
    or whose commit failed (an outage: UNAVAILABLE; nothing of the group was committed)."""

    def __init__(self) -> None:
        super().__init__(None, None, ConnectionError("the write transaction shared with other writers failed"))


class Checkpointer(PeriodicTask):
    """SQLite: WAL checkpoints in a thread of their own: passive ones, and a RESTART one when a
    passive one copied the whole log and a moment comes when it has nothing to copy, so that the
    next writer starts the log over (see the module docstring). A failed run (the file gone, a disk
    error): the commits' safety net stays."""

    FAILED_EVENT = "sqlite WAL checkpoint failed"

    SAFETY_NET_PAGES = 10_000  # the commits' wal_autocheckpoint while this thread does the work
    RESTART_TRIES = 4  # moments looked for, per run, to start the log over (then the next run's turn)
    RESTART_RETRY_S = 0.001

    def __init__(self, path: str, every_s: float, writers: _WriterQueue) -> None:
        super().__init__(every_s, "sqlite-checkpoint")
        self._path, self._writers = path, writers
        self._conn: sqlite3.Connection | None = None
        self.restarts = 0
        self._start()

    def run_once(self) -> tuple[int, int, int]:
        """One passive checkpoint, then, if it copied the whole log, a RESTART one at a moment when
        that is cheap (module docstring): (busy, frames in the log, frames checkpointed), SQLite's
        answer to the last of them; busy is also 1 when the log was copied but no such moment came."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the checkpoint thread was stopped")
            if self._conn is None:
                # Autocommit; the commits' durability; a busy checkpoint lock (another checkpoint
                # running) is an answer (busy = 1), not a wait. mode=rw: a file deleted behind the
                # server is an error here, never a new empty database.
                # timeout=0: the restart never waits on SQLite's busy handler, since it would wait
                # for readers holding the writer lock (busy is an answer; the next run tries again).
                self._conn = sqlite3.connect(f"{Path(self._path).resolve().as_uri()}?mode=rw", uri=True,
                                             isolation_level=None, check_same_thread=False, timeout=0)
                self._conn.execute("PRAGMA synchronous=FULL")
            queue = self._writers
            seen = queue.commits
            busy, log_frames, done = self._passive()
            self.runs += 1
            for _ in range(self.RESTART_TRIES):
                if busy or not log_frames or done != log_frames:
                    break  # a checkpoint lock taken by another, or frames left to copy: next run
                if queue.commits == seen and queue.try_take():
                    try:
                        if queue.group is None and queue.commits == seen:
                            busy, log_frames, done = self._checkpoint("RESTART")
                            self.restarts += not busy
                            return busy, log_frames, done
                    finally:
                        queue.release()
                # A writer committed since, or is at it: copy that too, outside the lock, and retry.
                time.sleep(self.RESTART_RETRY_S)
                seen = queue.commits
                busy, log_frames, done = self._passive()
            else:
                if log_frames and done == log_frames:
                    busy = 1  # copied, not started over (as SQLite answers a RESTART it could not finish)
            return busy, log_frames, done

    def _passive(self) -> tuple[int, int, int]:
        return self._checkpoint("PASSIVE")

    def _checkpoint(self, mode: str) -> tuple[int, int, int]:
        assert self._conn is not None
        busy, log_frames, done = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(busy), int(log_frames), int(done)

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None


def _discard_pipelined(engine: Engine) -> None:
    """The safety nets of direct.py's pipeline. A statement through SQLAlchemy (the ORM, Core on
    the session) on a connection in pipeline mode is refused: psycopg gives it no rows and no row
    count until a later sync, which SQLAlchemy cannot know of (an ORM read would fail, an UPDATE
    would count -1). And a connection checked in still in pipeline mode (a transaction that left it
    without Database.write's `end`) is discarded, never handed out again."""

    @event.listens_for(engine, "before_execute")
    def _on_execute(conn: Any, *_args: Any) -> None:
        if direct.in_pipeline(conn.connection.driver_connection):
            raise RuntimeError("in pipeline mode, only direct.Statements may run statements "
                               "(entitlement/storage/direct.py)")

    @event.listens_for(engine.pool, "checkin")
    def _on_checkin(dbapi_conn: Any, record: Any) -> None:
        if direct.in_pipeline(dbapi_conn):
            _log.warning("connection checked in in pipeline mode; discarded")
            record.invalidate()


def _pg_connect_args(lock_timeout_ms: int | None, statement_timeout_ms: int, connect_timeout_s: int) -> dict[str, Any]:
    """libpq parameters: session defaults sent once at connect (no round trip per transaction)."""
    args: dict[str, Any] = {}
    options = []
    if lock_timeout_ms is not None:
        options.append(f"-c lock_timeout={lock_timeout_ms}")
    if statement_timeout_ms:
        options.append(f"-c statement_timeout={statement_timeout_ms}")
    if options:
        args["options"] = " ".join(options)
    if connect_timeout_s:
        # A peer that stops answering (host down, network cut) fails the connection after about this
        # long instead of leaving a call waiting for TCP's own timeouts (minutes to hours).
        args.update(connect_timeout=max(2, connect_timeout_s), tcp_user_timeout=connect_timeout_s * 1000,
                    keepalives=1, keepalives_idle=connect_timeout_s, keepalives_interval=1, keepalives_count=2)
    return args


def _configure_postgresql(engine: Engine, lock_timeout_ms: int, statement_timeout_ms: int) -> None:
    """Within a call whose deadline is nearer than the session's bounds, this transaction's lock
    waits and statements end with the deadline (SET LOCAL: gone with the transaction). One round
    trip, paid only then: the session defaults (connect parameters) bound the other calls."""
    session_bound = min((ms for ms in (lock_timeout_ms, statement_timeout_ms) if ms > 0), default=0)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        left = deadline.remaining()
        if left is None:
            return
        ms = max(1, int((left - DEADLINE_MARGIN_S) * 1000))
        if session_bound and ms >= session_bound:
            return
        _capped_by_deadline.set(True)
        conn.exec_driver_sql(f"SELECT set_config('lock_timeout', '{ms}', true), "
                             f"set_config('statement_timeout', '{ms}', true)")


def _ended_by_the_server_is_a_disconnect(engine: Engine) -> None:
    """An error of SQLSTATE class 57P (the server ended the session: an administrator's or a fast
    shutdown, a crash, pg_terminate_backend) is a lost connection, as the socket's end would be:
    SQLAlchemy then invalidates it, and the pool's older connections, instead of handing them out
    to fail one by one. psycopg reports the connection closed only once libpq has met the end of
    the socket; a write that sent its statements in one go after the server ended the session reads
    the server's last message (57P01, "terminating connection due to administrator command") first."""

    @event.listens_for(engine, "handle_error")
    def _on_error(ctx: Any) -> None:
        sqlstate = getattr(ctx.original_exception, "sqlstate", None)
        if sqlstate and sqlstate.startswith("57P") and not ctx.is_disconnect:
            ctx.is_disconnect = True


def _one_disconnect_for_all(db: "Database") -> None:
    """A lost connection seen by one of the process's three sets of connections (the writer
    engine's pool, the reader engine's, the hot reads' per-thread ones) is taken as the loss of all:
    the server restarted, or an administrator ended every session. The pools' idle connections are
    closed and the hot reads' replaced before their next use, so a restart costs the callers one
    UNAVAILABLE, not one per set each met in turn (tests/test_hotread.py saw two now and then: a
    check met the hot read's dead connection, the next one a pool's)."""
    def drop_pools() -> None:
        for engine in (db.engine, db.reader):
            try:
                engine.pool.dispose()  # idle connections closed; checked-out ones fail and are replaced
            except Exception:  # noqa: BLE001 - closing dead connections may fail: they are gone anyway
                pass

    for engine in (db.engine, db.reader):
        @event.listens_for(engine, "handle_error")
        def _on_error(ctx: Any) -> None:  # after _ended_by_the_server_is_a_disconnect's (registered first)
            if ctx.is_disconnect:
                db.hot.invalidate()
    db.hot.on_disconnect = drop_pools


def _savepoint_statement(sql: str) -> Any:
    def send(conn: Connection, name: str) -> None:
        direct.execute_text(conn, f'{sql} "{name}"')  # the name: SQLAlchemy's own (sa_savepoint_N)
    return send


# SQLite: the pause between two of a long piece of work's bounded transactions (an import's merge and
# deletes, the jobs, the purge): more than SQLite's busy handler's longest sleep (100 ms), so every
# writer of another process waiting for the file tries during it, and this process's queued writers
# follow at once.
SQLITE_TURN_PAUSE_S = 0.15
# One slice of a registry snapshot's rows (the primary key's order: a range of the index), for work
# that deletes a snapshot's rows a bounded number at a time (entitlement/registry.py, privacy.py).
DELETE_SNAPSHOT_ROWS_SLICE = text(
    "DELETE FROM registry_people WHERE snapshot_id = :sid AND person_key IN "
    "(SELECT person_key FROM registry_people WHERE snapshot_id = :sid ORDER BY person_key LIMIT :n)")
CLI_SQLITE_LOCK_TIMEOUT_MS = 30000  # the command-line tools may wait for a busy server this long
STATISTICS_LOCK_TIMEOUT_MS = 1000  # pgstats: a table locked by another ANALYZE or a VACUUM is the next run's
SQLITE_FOREVER_MS = 2**31 - 1  # SQLite's busy timeout is an int; 0 would mean "fail at once"


def _configure_sqlite(engine: Engine, lock_timeout_ms: int, *, emit_begin: bool = True,
                      autocheckpoint: int | None = None) -> None:
    lock_timeout_ms = lock_timeout_ms or SQLITE_FOREVER_MS

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        if autocheckpoint is not None:  # a Checkpointer does the work (module docstring)
            cur.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={lock_timeout_ms}")
        cur.close()
        record.info[_BUSY_MS] = lock_timeout_ms

    if not emit_begin:
        return

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        if write:
            # A write waits for the lock at most the setting, and never past the call's deadline (in
            # 50 ms steps, so that calls with similar deadlines share the value). Setting it costs a
            # PRAGMA (~30 us, no I/O), paid only when it changes: by a call whose deadline is nearer
            # than the setting. Reads under WAL do not wait for writers: they keep the last value.
            if _deferrable() is not None:
                busy_ms = 0  # on the event loop: SQLite's lock held elsewhere is an answer (LoopWriteDeferred)
            else:
                busy_ms = wait_bound_ms(lock_timeout_ms)
                if busy_ms < lock_timeout_ms:
                    busy_ms -= busy_ms % 50
            info = conn.connection.info
            if info.get(_BUSY_MS) != busy_ms:
                conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={busy_ms}")
                info[_BUSY_MS] = busy_ms
        elif conn.connection.info.get(_BUSY_MS) == 0:  # left by a write on the event loop: reads wait as before
            conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={lock_timeout_ms}")
            conn.connection.info[_BUSY_MS] = lock_timeout_ms
        # Straight on the DBAPI connection (entitlement/storage/direct.py): an execution context for
        # a constant statement cost more than the statement, at every transaction.
        direct.execute_text(conn, "BEGIN IMMEDIATE" if write else "BEGIN")

    # A group's later members each run in a savepoint (Database._write_grouped), sent the same way:
    # SQLAlchemy's dialect sends each through a statement's execution (its compiled clause, an
    # execution context, a result: about 45 us apiece, more than the savepoint itself).
    # (This engine's dialect object only: the reader's and other engines' keep SQLAlchemy's.)
    for method, sql in (("do_savepoint", "SAVEPOINT"), ("do_release_savepoint", "RELEASE SAVEPOINT"),
                        ("do_rollback_to_savepoint", "ROLLBACK TO SAVEPOINT")):
        setattr(engine.dialect, method, _savepoint_statement(sql))


def describe_failure(exc: BaseException, url: str) -> str | None:
    """One line for an error the database raised (None for any other exception): unreachable,
    a wrong URL, a login refused, a file that is not a database... Only the first line of the
    driver's message (never the statement or its parameters: PostgreSQL's DETAIL quotes row
    values), and `url` without its password. The command-line tools and server.py's start say it
    alike."""
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig  # the driver's exception (str(exc) would add the statement)
    lines = str(orig).strip().splitlines() if orig is not None else []
    reason = lines[0].strip() if lines else type(orig or exc).__name__
    try:
        parsed = make_url(url)
        shown, password = parsed.render_as_string(hide_password=True), parsed.password
    except (ArgumentError, ValueError):
        shown, password = "", None
    if password:
        reason = reason.replace(str(password), "***")
    # A SQLite file that is not a database (SQLITE_NOTADB) cannot be opened, as a wrong path.
    not_a_database = getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB
    if isinstance(exc, (OperationalError, InterfaceError)) or not_a_database:
        return f"database unavailable ({reason}); check ENTITLEMENT_DATABASE_URL" + (f" ({shown})" if shown else "")
    return f"database error ({type(orig or exc).__name__}: {reason})"
