"""Group commit (SQLite, entitlement/storage/db.py `_Group`): writers of one server process that
queue while another writes share its transaction, each block in a savepoint of its own, and the last
one commits it for all. What must hold, on a real database with real threads:

- every block that returned is committed, and durable when it returns; a block that raised left
  nothing, and took nothing of the others with it;
- a commit that fails fails every member of the group, and commits none of them;
- a transaction that an error rolled back whole fails every member whose work was in it;
- a lone writer commits at once, and so does a writer with only one queued behind it (two that
  met by chance); a group handed to writers that then gave up is still committed.

On PostgreSQL writers are not grouped (each its own transaction, run side by side): the same
scenarios run there and show one commit per write.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from own_server import default_people, own_server, write_registry
from support import TODAY, Api, Harness, date_msg, next_person
from test_writer_queue import Holder as WriteHolder

from entitlement import deadline
from entitlement.errors import Cancelled, DeadlineExceeded
from entitlement.storage.db import Database, GroupAborted
from entitlement.storage.migrate import upgrade
from entitlement.storage.models import Activation, Event, LedgerEntry, LogHead, RegistrySnapshot
from entitlement.v1 import registry_pb2


@pytest.fixture
def gdb(fresh_url: str) -> Iterator[Database]:
    upgrade(fresh_url)
    database = Database(fresh_url, pool_size=12, lock_timeout_ms=10_000)
    try:
        yield database
    finally:
        database.dispose()


def _is_sqlite(db: Database) -> bool:
    return db.dialect == "sqlite"


@contextmanager
def counted(db: Database) -> Iterator[dict[str, int]]:
    """COMMITs and savepoints the write engine sends while the block runs."""
    counts = {"commit": 0, "savepoint": 0, "rollback_savepoint": 0}

    def on_commit(_conn: Any) -> None:
        counts["commit"] += 1

    def on_savepoint(_conn: Any, _name: str) -> None:
        counts["savepoint"] += 1

    def on_rollback_savepoint(_conn: Any, _name: str, _ctx: Any) -> None:
        counts["rollback_savepoint"] += 1
    hooks: list[tuple[str, Callable[..., None]]] = [
        ("commit", on_commit), ("savepoint", on_savepoint), ("rollback_savepoint", on_rollback_savepoint)]
    for name, fn in hooks:
        event.listen(db.engine, name, fn)
    try:
        yield counts
    finally:
        for name, fn in hooks:
            event.remove(db.engine, name, fn)


def _size(db: Database) -> int:
    with db.read() as s:
        return int(s.execute(select(LogHead.size)).scalar_one())


def _bump(s: Any, by: int = 1) -> None:
    s.execute(update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + by))


class Holder(WriteHolder):
    """A write that does its `work` (bumps the log head), then holds its block open until released
    (its outcome is the test's to read: `error`)."""

    def work(self, s: Any) -> None:
        _bump(s)

    def _run(self, db: Database) -> None:
        try:
            with db.write() as s:
                self.work(s)
                self.inside.set()
                self.release.wait(30)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.inside.set()

    def finish(self) -> None:
        self.release.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _queued(db: Database, n: int) -> None:
    """Wait until n writers are blocked on the SQLite writers' lock (on PostgreSQL: a short wait)."""
    if not _is_sqlite(db):
        time.sleep(0.2)
        return
    queue = db._writers
    assert queue is not None
    for _ in range(3000):
        if queue.waiting >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"only {queue.waiting} writers queued, {n} expected")


@contextmanager
def _one_group(db: Database) -> Iterator[None]:
    """SQLite: while the block runs, every writer hands the group on (two phantom writers counted as
    queued); once every real writer has run its block (none queued but the phantoms, the lock
    free), the phantoms leave and a member waiting for the commit makes it: one group whatever the
    order in which the writers took the lock."""
    queue = db._writers
    assert queue is not None
    with queue._count:
        queue.waiting += 2
    try:
        yield
        for _ in range(3000):
            if queue.waiting == 2 and not queue._lock.locked():
                break
            time.sleep(0.001)
        else:
            raise AssertionError("the queued writers never all ran their blocks")
    finally:
        with queue._count:
            queue.waiting -= 2


def _run_queued(db: Database, holder: Holder, blocks: list[Any], one_group: bool = False) -> list[BaseException | None]:
    """Start one writer per block behind `holder`, release it, and return each writer's outcome.
    `one_group` (SQLite): all of them in the holder's group (see `_one_group`)."""
    outcomes: list[BaseException | None] = [None] * len(blocks)

    def writer(i: int) -> None:
        try:
            # As a call's write (work outside one never joins), with a deadline tighter than the
            # lock's bound, so that its wait counts as cut to the deadline: a failure must still
            # come out as the failure it is (GroupAborted), not as DEADLINE_EXCEEDED.
            with deadline.bound(8), db.write() as s:
                blocks[i](s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcomes[i] = exc
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(len(blocks))]
    for t in threads:
        t.start()
    _queued(db, len(blocks))
    if one_group and _is_sqlite(db):
        with _one_group(db):
            holder.release.set()
    holder.finish()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    return outcomes


def test_writers_queued_behind_a_write_share_one_commit(gdb: Database) -> None:
    with counted(gdb) as counts:
        holder = Holder(gdb)
        outcomes = _run_queued(gdb, holder, [_bump] * 8)
    assert holder.error is None and outcomes == [None] * 8
    assert _size(gdb) == 9
    if _is_sqlite(gdb):
        # The holder handed its open transaction to the queue: one COMMIT for the nine writes (a
        # writer that reached the lock after the group ended would open a second one).
        assert 1 <= counts["commit"] < 9
        assert counts["savepoint"] == 9 - counts["commit"]
    else:
        assert counts["commit"] == 9 and counts["savepoint"] == 0


def test_a_lone_writer_commits_at_once(gdb: Database) -> None:
    with counted(gdb) as counts:
        with gdb.write() as s:
            _bump(s)
        assert counts["commit"] == 1  # committed before the block's `with` returned
        assert counts["savepoint"] == 0
    # Durable for another connection (an independent reader) as soon as it returned.
    assert _size(gdb) == 1


def test_a_failing_member_leaves_nothing_and_takes_nothing_of_the_others(gdb: Database) -> None:
    class Refused(Exception):
        pass

    def fails(s: Any) -> None:
        _bump(s, 1000)
        raise Refused()

    def breaks_a_constraint(s: Any) -> None:
        _bump(s, 1000)
        s.execute(text("INSERT INTO log_head (id, size) VALUES (1, 0)"))  # the same primary key

    with counted(gdb) as counts:
        holder = Holder(gdb)
        outcomes = _run_queued(gdb, holder, [_bump, fails, _bump, breaks_a_constraint, _bump])
    assert holder.error is None
    assert outcomes[0] is None and outcomes[2] is None and outcomes[4] is None
    assert isinstance(outcomes[1], Refused)
    assert isinstance(outcomes[3], IntegrityError)
    assert _size(gdb) == 4  # the holder's and the three others' bumps; none of the 1000s
    if _is_sqlite(gdb):  # in savepoints, unless the failing block was the last, which went alone
        assert counts["rollback_savepoint"] >= 1


def test_a_member_whose_caller_gave_up_is_not_committed_with_the_group(gdb: Database) -> None:
    def gives_up(s: Any) -> None:
        _bump(s, 1000)
        # The client cancels the call before the block ends (as gRPC's context would report it);
        # the bound stays on this writer's thread, which ends with the block.
        deadline.bound(30, active=lambda: False).__enter__()

    holder = Holder(gdb)
    outcomes = _run_queued(gdb, holder, [_bump, gives_up, _bump])
    assert holder.error is None
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Cancelled)
    assert _size(gdb) == 3


def test_a_failed_commit_fails_every_member_and_commits_none(gdb: Database) -> None:
    """A foreign key checked at COMMIT (SQLite's defer_foreign_keys; PostgreSQL: a constraint set
    DEFERRED) that the group's opener leaves broken makes the group's COMMIT fail: on SQLite every
    member of that group fails with it and nothing of it is committed; on PostgreSQL only the
    opener's own write fails. (A writer alone in its group gets the COMMIT's own error, as before:
    tests/test_writer_queue.py and the rest of the suite.)"""
    if not _is_sqlite(gdb):
        with gdb.engine.connect() as conn:
            fk = conn.execute(text(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'ledger_entries'::regclass AND contype = 'f' "
                "AND condeferrable")).first()
        if fk is None:
            pytest.skip("PostgreSQL: no deferrable foreign key on ledger_entries to defer; writers there "
                        "commit one by one anyway (test_writers_queued_behind_a_write_share_one_commit)")
    holder = _DanglingHolder(gdb)
    outcomes = _run_queued(gdb, holder, [_bump] * 4, one_group=True)
    if not _is_sqlite(gdb):
        assert isinstance(holder.error, IntegrityError) and outcomes == [None] * 4
        assert _size(gdb) == 4
        return
    # One group of five: each member fails with GroupAborted (UNAVAILABLE), caused by the COMMIT's
    # own error (the foreign key), whoever sent it; nothing committed.
    errors = [holder.error, *outcomes]
    assert all(isinstance(e, GroupAborted) and isinstance(e.__cause__, IntegrityError) for e in errors), errors
    assert _size(gdb) == 0
    # The writers' lock and the database are usable at once.
    with gdb.write() as s:
        _bump(s)
    assert _size(gdb) == 1


class _DanglingHolder(Holder):
    """A write that leaves a foreign key broken, checked only at COMMIT, and holds its block open."""

    def work(self, s: Any) -> None:
        _bump(s, 1000)
        if s.get_bind().dialect.name == "sqlite":
            s.execute(text("PRAGMA defer_foreign_keys = ON"))
        else:
            s.execute(text("SET CONSTRAINTS ALL DEFERRED"))
        # A ledger entry of an activation that does not exist.
        s.execute(text("INSERT INTO ledger_entries (activation_id, program_id, funder_id, kind, month, "
                       "amount_cents, created_at) VALUES ('missing', 'p', 'f', 'commit', '2026-03', 1, "
                       "'2026-03-16 10:00:00')"))


def test_a_transaction_rolled_back_whole_fails_every_member_in_it(gdb: Database) -> None:
    """SQLite rolls a whole transaction back on some errors (a full disk, an I/O error): the members
    whose work was in it must not be told it was committed. Here a member ends the transaction
    itself, as SQLite would, then fails."""
    if not _is_sqlite(gdb):
        pytest.skip("PostgreSQL: each write is its own transaction (no group to lose)")

    class DiskFull(Exception):
        pass

    def rolls_back_all(s: Any) -> None:
        s.connection().connection.driver_connection.execute("ROLLBACK")
        raise DiskFull()

    holder = Holder(gdb)
    outcomes = _run_queued(gdb, holder, [_bump, rolls_back_all, _bump], one_group=True)
    # (Its own error, or the failed ROLLBACK TO of its savepoint that it causes: an OperationalError,
    # read as the deadline's when the call's deadline bounded its wait, as any such error is.)
    assert isinstance(outcomes[1], (DiskFull, OperationalError, DeadlineExceeded)), outcomes[1]
    # The holder opened the group: its work was in the lost transaction. The queued bumps that took
    # the lock before the failing member were too; those after it began a new group and landed.
    # (With the holder's group handed on whatever the queue, the failing member is in it.)
    assert isinstance(holder.error, GroupAborted), holder.error
    others = [outcomes[0], outcomes[2]]
    assert all(o is None or isinstance(o, GroupAborted) for o in others), others
    landed = sum(o is None for o in others)
    assert _size(gdb) == landed  # exactly the writes told they were committed
    with gdb.write() as s:
        _bump(s)
    assert _size(gdb) == landed + 1


def test_a_group_handed_to_a_writer_that_gave_up_is_still_committed(gdb: Database) -> None:
    """The writer a group is handed to may give up its wait just as the lock is released (its own
    bound ran out): the members waiting for the commit then make it themselves."""
    if not _is_sqlite(gdb):
        pytest.skip("PostgreSQL: writers are not grouped")
    queue = gdb._writers
    assert queue is not None
    holder = Holder(gdb)
    with queue._count:
        queue.waiting += 2  # writers counted as queued, that will never take the lock
    counted_out = False
    try:
        holder.release.set()
        # The holder hands the open group over (the lock free, the group still open) ...
        for _ in range(3000):
            if queue.group is not None and not queue._lock.locked():
                break
            time.sleep(0.001)
        else:
            raise AssertionError("the holder never handed its group over")
        # ... and the writers give up without ever taking the lock.
        with queue._count:
            queue.waiting -= 2
        counted_out = True
        holder.finish()
    finally:
        if not counted_out:
            with queue._count:
                queue.waiting -= 2
    assert holder.error is None
    assert queue.group is None
    assert _size(gdb) == 1


def test_a_writer_queued_past_its_bound_fails_without_touching_the_group(fresh_url: str) -> None:
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=4, lock_timeout_ms=200)
    try:
        holder = Holder(db)
        try:
            if _is_sqlite(db):
                with pytest.raises(OperationalError, match="database is locked"):
                    with db.write() as s:
                        _bump(s, 1000)
            else:  # the row lock's wait: lock_timeout
                with pytest.raises(OperationalError):
                    with db.write() as s:
                        _bump(s, 1000)
        finally:
            holder.finish()
        assert holder.error is None
        assert _size(db) == 1
    finally:
        db.dispose()


def test_activations_queued_behind_a_write_share_its_commit_over_the_channel(api: Api, harness: Harness) -> None:
    """Through the real server: advisors' activations that arrive while a write holds the SQLite
    lock all join that write's group; every one is answered with its token and lands whole (its
    row, its ledger entries, its event), and the group ends in one COMMIT. On PostgreSQL each is
    its own transaction."""
    db = harness.ctx.db
    sqlite = _is_sqlite(db)
    # A first activation of the program first, uncounted: the first one of a Database makes
    # first-time writes of its own (the program's counter row: counters.ensure_row), which this
    # test, run alone or first in its file, counted (4 COMMITs instead of 2; the whole suite had
    # warmed the shared server before it).
    api.activate()
    people = [next_person() for _ in range(6)]
    with counted(db) as counts:
        holder = _EmptyHolder(db)  # holds the writers' lock (SQLite) and writes nothing
        with ThreadPoolExecutor(len(people)) as pool:
            futures = [pool.submit(api.activate, agency_id, birth) for agency_id, birth in people]
            _queued(db, len(people))
            holder.finish()
            responses = [f.result(timeout=30) for f in futures]
    assert holder.error is None
    ids = [r.activation.name.removeprefix("activations/") for r in responses]
    assert len(set(ids)) == len(people) and all(r.activation_token for r in responses)
    with db.read() as s:
        assert s.execute(select(func.count()).select_from(Activation).where(Activation.id.in_(ids))).scalar_one() \
            == len(people)
        assert s.execute(select(func.count(func.distinct(LedgerEntry.activation_id)))
                         .where(LedgerEntry.activation_id.in_(ids))).scalar_one() == len(people)
        assert s.execute(select(func.count()).select_from(Event).where(
            Event.subject.in_([f"activations/{i}" for i in ids]))).scalar_one() == len(people)
    if sqlite:
        # The holder's group took the activations that found two or more queued behind them and
        # the one after them; the last, queued alone, committed its own: two COMMITs, five savepoints.
        assert counts["commit"] == 2 and counts["savepoint"] == len(people) - 1
    else:
        assert counts["commit"] >= len(people) and counts["savepoint"] == 0


class _EmptyHolder(Holder):
    """A write transaction that writes nothing, held open until released (on SQLite it holds the
    writers' lock and the file's write lock; on PostgreSQL it blocks no one)."""

    def work(self, s: Any) -> None:
        pass


def test_work_outside_a_call_never_joins_a_group(gdb: Database) -> None:
    """An import's batch, a job or a command may be long: taking the lock with a group open, it
    commits the group for its members first and writes in a transaction of its own, so that no
    call's answer waits for it."""
    if not _is_sqlite(gdb):
        pytest.skip("PostgreSQL: writers are not grouped")
    outside: list[BaseException | None] = []

    def background() -> None:  # a thread of its own: no call's budget bound
        try:
            with gdb.write() as s:
                _bump(s, 10)
            outside.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outside.append(exc)

    with counted(gdb) as counts:
        holder = Holder(gdb)
        thread = threading.Thread(target=background, daemon=True)
        thread.start()
        _queued(gdb, 1)
        with _one_group(gdb):  # the holder hands its group on: the background writer takes it
            holder.release.set()
        holder.finish()
        thread.join(30)
    assert holder.error is None and outside == [None]
    assert _size(gdb) == 11
    assert counts["commit"] == 2 and counts["savepoint"] == 0  # the holder's group, then its own


def test_a_group_runs_at_most_max_group_blocks_failed_ones_included(
        gdb: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _is_sqlite(gdb):
        pytest.skip("PostgreSQL: writers are not grouped")
    from entitlement.storage.db import _WriterQueue
    monkeypatch.setattr(_WriterQueue, "MAX_GROUP", 3)

    def fails(s: Any) -> None:
        _bump(s, 1000)
        raise LookupError("refused")

    with counted(gdb) as counts:
        holder = Holder(gdb)
        outcomes = _run_queued(gdb, holder, [fails] * 6)
    assert holder.error is None and all(isinstance(o, LookupError) for o in outcomes)
    assert _size(gdb) == 1
    # The holder's group ran three blocks (its own and two failing ones, in savepoints) and was
    # committed; the four other writers each began a transaction of their own and rolled it back.
    assert counts["commit"] == 1 and counts["rollback_savepoint"] == 2


def test_a_writer_that_cannot_begin_releases_the_lock(fresh_url: str, tmp_path: Any) -> None:
    """BEGIN IMMEDIATE refused (another process holds the file's write lock past the bound): the
    writer fails as a locked file, and the next writer of this process is not stuck behind it."""
    if not fresh_url.startswith("sqlite"):
        pytest.skip("PostgreSQL: writers are not grouped")
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=4, lock_timeout_ms=100)
    other = sqlite3.connect(fresh_url.removeprefix("sqlite:///"), isolation_level=None, timeout=5)
    try:
        other.execute("BEGIN IMMEDIATE")  # a command-line tool's write, in another connection
        with pytest.raises(OperationalError, match="database is locked"):
            with db.write() as s:
                _bump(s)
        other.execute("ROLLBACK")
        assert db._writers is not None and db._writers.group is None
        with db.write() as s:
            _bump(s)
        assert _size(db) == 1
    finally:
        other.close()
        db.dispose()


def test_a_registry_import_pushed_by_a_call_never_joins_a_group(backend: tuple[str, str], tmp_path: Any,
                                                                request: pytest.FixtureRequest) -> None:
    """An import pushed over gRPC (ImportExtract) writes within a call, but its writes are long
    (batches of 20,000 rows, the prune of old snapshots' rows): as work outside a call, they commit
    the open group for its members first and write in transactions of their own. (They joined it:
    the members whose blocks were done waited for an import's batch, or its prune, before their
    COMMIT and their answers.)"""
    if backend[0] != "sqlite":
        pytest.skip("PostgreSQL: writers are not grouped")
    with own_server("sqlite", tmp_path / "own", request) as h:
        db = h.ctx.db
        data = write_registry(tmp_path / "push.csv", default_people()).read_bytes()

        def messages() -> Iterator[registry_pb2.ImportExtractRequest]:
            yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
                extracted_on=date_msg(TODAY), source_name="pushed.csv"))
            yield registry_pb2.ImportExtractRequest(chunk=data)

        pushed: list[Any] = []

        def push() -> None:
            try:
                pushed.append(Api(h).as_("agency-feed").ImportExtract(messages(), timeout=60))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                pushed.append(exc)

        with counted(db) as counts:
            holder = _EmptyHolder(db)  # a group open, its member done (it is handed on when released)
            thread = threading.Thread(target=push, daemon=True)
            thread.start()
            _queued(db, 1)  # the import's first write waits for the lock
            with _one_group(db):
                holder.release.set()
            holder.finish()
            thread.join(60)
        assert holder.error is None
        assert len(pushed) == 1 and isinstance(pushed[0], registry_pb2.ImportExtractResponse), pushed
        assert pushed[0].rows_imported == len(default_people())
        with db.read() as s:
            assert s.execute(select(RegistrySnapshot.status).where(
                RegistrySnapshot.id == int(pushed[0].snapshot.removeprefix("registrySnapshots/")))).scalar_one() \
                == "complete"
        assert counts["savepoint"] == 0, counts  # no write of the import ran in a group's savepoint
