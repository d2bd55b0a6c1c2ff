"""Writers of one server process queue on the Database's own lock before BEGIN IMMEDIATE on SQLite
(entitlement/storage/db.py): a waiter gets the lock the moment it is released instead of polling the
file with SQLite's busy sleeps, and its wait keeps the busy timeout's bounds (the setting, the
call's deadline) and failure ("database is locked": UNAVAILABLE, or DEADLINE_EXCEEDED). PostgreSQL
writers do not queue in the process: row locks order them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import OperationalError

from entitlement import deadline
from entitlement.errors import DeadlineExceeded
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.storage.models import LogHead


@pytest.fixture
def bounded_db(fresh_url: str) -> Iterator[Database]:
    """A migrated database whose write waits are bounded at 300 ms (as the server's setting)."""
    upgrade(fresh_url)
    database = Database(fresh_url, pool_size=4, lock_timeout_ms=300)
    try:
        yield database
    finally:
        database.dispose()


def _bump(db: Database) -> None:
    with db.write() as s:
        s.execute(update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1))


def _size(db: Database) -> int:
    with db.read() as s:
        return int(s.execute(select(LogHead.size)).scalar_one())


class Holder:
    """A write transaction held open in another thread until released."""

    def __init__(self, db: Database) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(db,), daemon=True)
        self.thread.start()
        assert self.inside.wait(30)

    def _run(self, db: Database) -> None:
        try:
            with db.write() as s:
                s.execute(update(LogHead).where(LogHead.id == 1).values(size=LogHead.size + 1))
                self.inside.set()
                self.release.wait(30)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.inside.set()

    def done(self) -> None:
        self.release.set()
        self.thread.join(30)
        assert self.error is None, self.error


def test_a_writer_waiting_past_the_bound_fails_as_a_locked_file_and_writes_nothing(
        bounded_db: Database, backend: tuple[str, str]) -> None:
    if backend[0] != "sqlite":
        pytest.skip("PostgreSQL writers do not queue in the process (see the PostgreSQL test below)")
    holder = Holder(bounded_db)
    try:
        with pytest.raises(OperationalError, match="database is locked") as info:
            _bump(bounded_db)
        assert not isinstance(info.value, DeadlineExceeded)
    finally:
        holder.done()
    assert _size(bounded_db) == 1  # the holder's write only


def test_a_writer_waiting_past_its_calls_deadline_is_deadline_exceeded(
        bounded_db: Database, backend: tuple[str, str]) -> None:
    if backend[0] != "sqlite":
        pytest.skip("PostgreSQL writers do not queue in the process (see the PostgreSQL test below)")
    holder = Holder(bounded_db)
    try:
        with deadline.bound(0.25), pytest.raises(DeadlineExceeded):
            _bump(bounded_db)  # 0.15 s of wait allowed (the margin kept), less than the 300 ms setting
    finally:
        holder.done()
    assert _size(bounded_db) == 1


def test_waiting_writers_go_in_once_released_and_all_land(bounded_db: Database, backend: tuple[str, str]) -> None:
    """Eight writers queue behind an open transaction released within the bound: every one lands
    (SQLite: on the process's lock; PostgreSQL: on the row lock)."""
    holder = Holder(bounded_db)
    errors: list[BaseException] = []
    begun_while_held: list[str] = []  # SQLite: a waiter's BEGIN IMMEDIATE sent before the release

    def on_execute(_conn: object, _cursor: object, statement: str, *_a: object) -> None:
        if statement.startswith("BEGIN") and not holder.release.is_set():
            begun_while_held.append(threading.current_thread().name)
    event.listen(bounded_db.engine, "before_cursor_execute", on_execute)

    def write() -> None:
        try:
            _bump(bounded_db)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    threads = [threading.Thread(target=write, name=f"waiter-{i}") for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.1)  # the waiters are waiting (not a timing assertion: any wait shows the same)
        holder.done()
        for t in threads:
            t.join(30)
    finally:
        event.remove(bounded_db.engine, "before_cursor_execute", on_execute)
    assert errors == []
    assert _size(bounded_db) == 9
    if backend[0] == "sqlite":  # they waited on the process's lock, not in SQLite's busy handler
        assert begun_while_held == []


def test_postgresql_writers_are_not_queued_in_the_process(bounded_db: Database, backend: tuple[str, str]) -> None:
    """Two write transactions are open at once on PostgreSQL (each blocks only on the rows it
    locks); on SQLite the second waits for the first."""
    if backend[0] != "postgresql" and backend[0] != "postgres":
        pytest.skip("SQLite writers queue: see the tests above")
    holder = Holder(bounded_db)
    try:
        with bounded_db.write() as s:  # takes no lock the holder has: no wait
            s.execute(select(LogHead.size)).scalar_one()
    finally:
        holder.done()
