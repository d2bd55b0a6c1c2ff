"""Database health: a background thread that pings the database and keeps the server's gRPC health
status (grpc.health.v1: every service and the overall "") in step with it (README "Database outage").

- Every `interval` it pings the database with a `timeout`: a failed or unanswered ping sets
  NOT_SERVING, the next good one SERVING again. A failed or unanswered ping is no outage when
  the database answered this process's calls after the ping was sent (Database.answered_since: a
  hot read's statement or a write's COMMIT answered then, even if sent before; a read transaction
  begun then ended; for SQLite's write probe, a COMMIT only): one stalled round trip under load no
  longer fails every call for a ping interval (README "Database outage": with two server
  processes pinned to a CPU each, a ping waited over 2 s while the calls around it answered; in CI,
  a call and the ping stalled together). A silent or dead database answers no call. A ping this
  thread finds unanswered at its timeout after oversleeping (the whole process stood still, or
  this thread alone got no CPU) gets as long again as it overslept, at most a timeout: its answer
  may be in hand, or come as soon as its thread runs.
- A call that meets an outage (the access-log interceptor calls `outage_seen`) wakes it at once: it
  pings right away instead of at the next tick. One broken connection (a database restart seen by
  a single call) is therefore not reported as an outage if the ping that follows succeeds.
- PostgreSQL: SELECT 1 through the server's own pool. A dead connection found by the ping
  invalidates the pool, so every connection opened before the outage is replaced on its next
  checkout, even when no call noticed the outage (the pool does no pre-ping of its own).
- SQLite: a read of the schema while all is well. With WAL, reads go on while another connection
  holds the write lock; so after a call met the database locked, the ping is a write probe
  (BEGIN IMMEDIATE, then an empty COMMIT) until one succeeds: health says NOT_SERVING for as long
  as writes cannot go on.
- While the database is down, the Database fails fast (entitlement/storage/db.py): transactions
  raise DatabaseDown (UNAVAILABLE) at once instead of waiting for a lock or a connection, so worker
  threads stay free; on SQLite after a failed write probe, only the writes.
- `stop()` returns after the monitor's last status change: graceful shutdown then sets
  NOT_SERVING for good, and a late ping cannot set it back to SERVING.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import structlog

from entitlement.storage.db import Database, bind_deadline

log = structlog.get_logger("entitlement.dbhealth")

MAX_HANGING = 3  # pings allowed to hang at once; beyond, a ping is not tried (the calls decide: ping())
MIN_GAP_S = 0.05  # calls meeting an outage wake the monitor at most this often


class DatabaseMonitor:
    def __init__(self, db: Database, *, interval_s: float, timeout_s: float) -> None:
        self._db = db
        self._interval = interval_s
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._on_change: Callable[[bool], None] = lambda _serving: None
        self._healthy = True  # the server starts SERVING: app.build has just read the database
        self._stopping = False
        self._hanging = 0
        self._pinger: _Pinger | None = None  # the thread the next ping runs in
        self._probe_writes = False  # SQLite: a call met the database locked; probe with a write
        self._down_since = 0.0
        self._last_error: dict[str, object] = {}  # the last failed ping's log fields
        self._thread = threading.Thread(target=self._run, name="db-health", daemon=True)

    @property
    def healthy(self) -> bool:
        return self._healthy

    def start(self, on_change: Callable[[bool], None]) -> None:
        """Ping in the background; `on_change(serving)` is called on each change of health."""
        self._on_change = on_change
        self._thread.start()

    def stop(self) -> None:
        """No status change after this returns (a ping still running is abandoned)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout + 1)
        with self._lock:
            pinger, self._pinger = self._pinger, None
        if pinger is not None:
            pinger.retire()

    def outage_seen(self) -> None:
        """A call met a database outage: check now (cheap; called from RPC threads)."""
        if self._db.is_sqlite:
            self._probe_writes = True
        if self._healthy:
            self._wake.set()

    def ping(self, writes: bool = False) -> bool:
        """One ping (SQLite: a write probe with `writes`): True when the database answered it in
        time, or when, although it failed or went unanswered, the database answered this process's
        calls after it was sent (`_answered`: logged, not reported as an outage)."""
        sent = time.monotonic()
        with self._lock:
            tried = self._hanging < MAX_HANGING
            if tried:
                self._hanging += 1
                if self._pinger is None:
                    self._pinger = _Pinger(self)
                pinger = self._pinger
        if not tried:
            # Too many pings hang already: this one is not tried, and the calls decide once its
            # time is up (stop() waits for this thread up to timeout + 1 s).
            time.sleep(self._timeout)
            return self._answered(sent, writes, "PingsHanging", "")
        job = _Ping(writes)
        pinger.jobs.put(job)
        answered = job.done.wait(self._timeout)
        if not answered:
            # This thread may have woken late: when the whole process stood still (a call holding
            # the interpreter lock, a machine starved of CPU), the ping's own thread, runnable too,
            # may hold its answer already. It gets as long again as this thread overslept (at most
            # a timeout): a stall of the process is not the database's.
            late = time.monotonic() - sent - self._timeout
            answered = late > 0 and job.done.wait(min(late, self._timeout))
            if answered and not job.error:
                log.warning("database_ping_late", waited_ms=round((time.monotonic() - sent) * 1000),
                            late_ms=round(late * 1000), timeout_ms=round(self._timeout * 1000),
                            note="this process stood still meanwhile: not an outage")
        if not answered:
            with self._lock:
                if self._pinger is pinger:
                    self._pinger = None  # hanging: left to end with its ping; the next gets a new one
            pinger.retire()
            return self._answered(sent, writes, "PingTimeout", "")
        if job.error:
            return self._answered(sent, writes, job.error, job.detail)
        if writes:
            self._probe_writes = False
        return True

    def _answered(self, since: float, writes: bool, error: str, detail: str) -> bool:
        """A ping that failed (`error`) or got no answer in time: no outage if the database
        answered this process's calls after `since` (Database.answered_since; a COMMIT, for SQLite's
        write probe), as under a load that stalls one round trip (the ping's thread or its
        connection's backend starved of CPU for a while: seen in `python -m bench.rpcs` with two
        server processes pinned to a CPU each), or with the write
        pool exhausted while the reads' pool answers, or when a write probe loses the SQLite lock to
        this process's own committing writers. Otherwise a failed ping. Logged with the error's
        type, the driver's message for it (`detail`: a ping sends no call's data; a connection
        error may name the database's host, port, user and database, never a password) and how
        long the ping had been waiting."""
        fields: dict[str, object] = {"error": error, "waited_ms": round((time.monotonic() - since) * 1000),
                                     "timeout_ms": round(self._timeout * 1000)}
        if detail:
            fields["detail"] = detail
        if self._db.answered_since(since, writes=writes):
            log.warning("database_ping_missed", **fields,
                        note="the database answered calls after the ping was sent: not an outage")
            return True
        self._last_error = fields
        return False

    def _ping_done(self) -> None:
        with self._lock:
            self._hanging -= 1

    def _run(self) -> None:
        last = 0.0
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopping:
                return
            gap = MIN_GAP_S - (time.monotonic() - last)
            if gap > 0:
                time.sleep(gap)
            last = time.monotonic()
            writes = self._probe_writes
            self._record(self.ping(writes), writes)

    def _record(self, ok: bool, writes: bool) -> None:
        with self._lock:
            if self._stopping or ok == self._healthy:
                return
            self._healthy = ok
            # Fail fast while down: every transaction, or on SQLite after a failed write probe the
            # writes only (reads under WAL go on).
            self._db.fail_fast(writes=not ok, reads=not ok and not (self._db.is_sqlite and writes))
            self._on_change(ok)  # under the lock: stop() waits for it
        if ok:
            log.info("database_reachable", down_ms=round((time.monotonic() - self._down_since) * 1000))
        else:
            self._down_since = time.monotonic()
            log.warning("database_unreachable", **self._last_error)


class _Ping:
    __slots__ = ("writes", "done", "error", "detail")

    def __init__(self, writes: bool) -> None:
        self.writes = writes
        self.done = threading.Event()
        self.error = ""  # the failure's type name ("" once done: answered)
        self.detail = ""  # the driver's message for it (_detail)


class _Pinger:
    """A thread that runs a monitor's pings one after another, so that the connections a ping uses
    (the hot reads keep one per thread) last from one ping to the next. Retired when a ping hangs
    in it (it ends once that ping returns) or the monitor stops."""

    def __init__(self, monitor: DatabaseMonitor) -> None:
        self._monitor = monitor
        self.jobs: queue.SimpleQueue[_Ping | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="db-ping", daemon=True).start()

    def retire(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        monitor = self._monitor
        while (job := self.jobs.get()) is not None:
            try:
                bind_deadline(monitor._timeout)  # SQLite: the write probe waits for the lock this long at most
                monitor._db.ping(write=job.writes and monitor._db.is_sqlite)
            except Exception as exc:  # any failure is a failed ping
                job.error, job.detail = type(exc).__name__, _detail(exc)
            finally:
                monitor._ping_done()
                job.done.set()


def _detail(exc: BaseException) -> str:
    """The first line of the driver's own message for a ping's failure (SQLAlchemy's text around it
    adds the statement and a link), at most 200 characters: what an operator needs to tell a
    refused connection from a dead one or a full pool. A ping's statement carries no parameter, so
    no call's data can be in it (a connection error may name the database's host, port, user and
    database: infrastructure, never a password)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0][:200] if text else ""


def monitor_for(db: Database, ping_ms: int, ping_timeout_ms: int) -> DatabaseMonitor | None:
    """The monitor of the settings, or None when `ping_ms` is 0 (health then stays SERVING)."""
    if ping_ms <= 0:
        return None
    if ping_timeout_ms <= 0:
        raise SystemExit("ENTITLEMENT_DB_PING_TIMEOUT_MS must be positive")
    return DatabaseMonitor(db, interval_s=ping_ms / 1000, timeout_s=ping_timeout_ms / 1000)
