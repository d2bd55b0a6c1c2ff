"""SQLite WAL checkpoints in the server's Database run in a thread of their own, not in the commit
that crosses SQLite's auto-checkpoint threshold (entitlement/storage/db.py, "WAL checkpoints"):
that commit used to pay the copy of the log into the database file and its fsyncs (p99 of
sequential activations 8.6 -> 4.1-4.4 ms, BENCHMARKS.md). PostgreSQL checkpoints in its own
processes: the server's Database there has no such thread."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text
from test_writer_queue import Holder as WriteHolder

from entitlement import app
from entitlement.storage.db import Checkpointer, Database
from entitlement.storage.migrate import SchemaNotCurrent, upgrade
from entitlement.storage.models import LogHead, LogNode

PAGE = 4096
BLOB = 3 * PAGE  # each row of the writes below fills about three pages of the log


def _sqlite_only(url: str) -> Path:
    if not url.startswith("sqlite"):
        pytest.skip("PostgreSQL checkpoints in its own processes (its server Database has no thread: see test_the_servers_database_checkpoints_in_a_thread_on_sqlite_only)")
    return Path(url.removeprefix("sqlite:///"))


@pytest.fixture
def migrated(fresh_url: str) -> str:
    upgrade(fresh_url)
    return fresh_url


def _write(db: Database, start: int, rows: int) -> None:
    """`rows` write transactions of one large row each (about three log pages per commit)."""
    for i in range(start, start + rows):
        with db.write() as s:
            s.execute(insert(LogNode).values(level=60, idx=i, hash=os.urandom(BLOB)))


def _wal_pages(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size // PAGE if wal.exists() else 0


def _server_db(url: str, every_s: float) -> Database:
    return Database(url, pool_size=4, lock_timeout_ms=5000, checkpoint_every_s=every_s)


def test_commits_leave_checkpoints_to_the_thread(migrated: str) -> None:
    """With the thread idle (a long interval), commits let the log grow past SQLite's threshold of
    1,000 pages without checkpointing it; one run of the thread's checkpoint copies all of it, and
    the log then restarts from its beginning instead of growing."""
    path = _sqlite_only(migrated)
    db = _server_db(migrated, every_s=3600)
    try:
        with db.write() as s:
            assert s.execute(text("PRAGMA wal_autocheckpoint")).scalar_one() == Checkpointer.SAFETY_NET_PAGES
        _write(db, 0, 500)  # about 1,500 pages
        grown = _wal_pages(path)
        assert grown > 1200, grown  # SQLite's own threshold (1,000) would have checkpointed and restarted
        assert db.checkpointer is not None
        busy, log_frames, done = db.checkpointer.run_once()
        assert busy == 0 and log_frames >= 1200 and done == log_frames
        _write(db, 500, 300)  # the log restarts: the file does not grow
        assert _wal_pages(path) <= grown + 2
        with db.read() as s:
            assert s.execute(select(LogNode.idx).where(LogNode.level == 60)).scalars().all() == list(range(800))
    finally:
        db.dispose()


def test_the_thread_keeps_the_log_small_under_steady_writes(migrated: str) -> None:
    path = _sqlite_only(migrated)
    db = _server_db(migrated, every_s=0.05)
    try:
        for burst in range(8):  # about 2,400 pages in all, with pauses the thread can use
            _write(db, burst * 100, 100)
            time.sleep(0.15)
        assert db.checkpointer is not None and db.checkpointer.runs > 0
        assert _wal_pages(path) < 1000, _wal_pages(path)
    finally:
        db.dispose()


def test_the_log_starts_over_under_steady_writes(migrated: str) -> None:
    """SQLite starts the log over only when a writer begins while all of it is copied. Under steady
    writes a commit lands during nearly every checkpoint, so none ever did: the log grew to the
    safety net, whose threshold counts every page in it, copied or not, and from there every commit
    checkpointed. The thread starts the log over itself (a RESTART checkpoint once nothing is left
    to copy and no writer is at it), so the log stays a fraction of what was written. The writes: a
    thread's, about twenty pages a commit every few milliseconds (as activations at 260 a second),
    the thread's interval the server's."""
    path = _sqlite_only(migrated)
    db = _server_db(migrated, every_s=app.SQLITE_CHECKPOINT_EVERY_S)
    try:
        assert db.checkpointer is not None
        commits, pages = 600, 20
        for i in range(commits):
            with db.write() as s:
                s.execute(insert(LogNode), [{"level": 60, "idx": i * 8 + j, "hash": os.urandom(pages * PAGE // 8)}
                                            for j in range(8)])
            time.sleep(0.003)
        written = commits * pages
        # (the log's file keeps its largest size; without the restarts it reaches the safety net)
        assert _wal_pages(path) < written * 2 // 3, (_wal_pages(path), written, db.checkpointer.runs)
        assert db.checkpointer.restarts > 0
        with db.read() as s:
            assert s.execute(select(func.count()).select_from(LogNode).where(LogNode.level == 60)).scalar_one() == commits * 8
    finally:
        db.dispose()


def test_the_restart_never_waits_for_a_writer(migrated: str) -> None:
    """A RESTART checkpoint waits for the writer lock, and then for readers while holding it, as
    long as its connection's busy timeout: the thread's is 0, so a held lock is an answer (busy),
    and the writer holding it goes on untouched."""
    path = _sqlite_only(migrated)
    db = _server_db(migrated, every_s=3600)
    try:
        assert db.checkpointer is not None
        _write(db, 0, 20)
        db.checkpointer.run_once()  # the log copied and started over
        _write(db, 20, 20)
        import sqlite3
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another connection holds the writer lock
            other.execute("INSERT INTO log_nodes (level, idx, hash) VALUES (60, 40, x'00')")
            busy, log_frames, done = db.checkpointer.run_once()
            assert busy == 1 and done == log_frames > 0  # copied, but not started over
            assert db.checkpointer.restarts == 1
            assert db.checkpointer._conn is not None
            assert db.checkpointer._conn.execute("PRAGMA busy_timeout").fetchone() == (0,)
            other.execute("COMMIT")
        finally:
            other.close()
        with db.read() as s:
            assert s.execute(select(LogNode.idx).where(LogNode.level == 60)).scalars().all() == list(range(41))
    finally:
        db.dispose()


def test_a_reader_on_the_log_is_an_answer_not_a_wait(migrated: str) -> None:
    """A reader whose snapshot is in the log (a transaction of another connection) keeps the log
    from starting over: the RESTART checkpoint answers busy at once (busy timeout 0) instead of
    waiting for it with SQLite's writer lock held, and the next run, once the reader is done, gets
    it done. Writers meanwhile go on."""
    path = _sqlite_only(migrated)
    db = _server_db(migrated, every_s=3600)
    try:
        assert db.checkpointer is not None
        _write(db, 0, 10)
        import sqlite3
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM log_nodes WHERE level = 60").fetchone() == (10,)
            busy, _log, _done = db.checkpointer.run_once()
            assert busy == 1 and db.checkpointer.restarts == 0
            _write(db, 10, 5)  # writers are not held up
            reader.execute("COMMIT")
        finally:
            reader.close()
        busy, _log, _done = db.checkpointer.run_once()
        assert busy == 0 and db.checkpointer.restarts == 1
    finally:
        db.dispose()


def test_a_commit_during_the_passive_checkpoint_puts_the_restart_off(migrated: str) -> None:
    """A group that commits while the passive checkpoint copies the log adds pages that checkpoint
    did not copy; a RESTART sent then would copy them holding SQLite's writer lock. The thread sees
    the commit (`_WriterQueue.commits`), copies it in another passive checkpoint outside any lock,
    and only then sends the RESTART. (The commit is made to land in that window by wrapping the
    thread's passive checkpoint: SQLite offers no hook inside one.)"""
    _sqlite_only(migrated)
    db = _server_db(migrated, every_s=3600)
    try:
        checkpointer = db.checkpointer
        assert checkpointer is not None
        _write(db, 0, 10)
        checkpointer.run_once()  # its connection made; the log copied
        assert checkpointer._conn is not None
        sent: list[str] = []
        checkpointer._conn.set_trace_callback(sent.append)
        passive = checkpointer._passive
        injected: list[int] = []

        def passive_then_a_commit() -> tuple[int, int, int]:
            answer = passive()
            if not injected:
                injected.append(1)
                writer = threading.Thread(target=_write, args=(db, 10, 1))  # another thread's write
                writer.start()
                writer.join(30)
            return answer
        checkpointer._passive = passive_then_a_commit  # type: ignore[method-assign]
        _write(db, 11, 5)  # a log to copy
        restarts = checkpointer.restarts
        busy, log_frames, done = checkpointer.run_once()
        modes = [q.split("(")[1].rstrip(")") for q in sent if "wal_checkpoint" in q]
        assert modes == ["PASSIVE", "PASSIVE", "RESTART"], modes
        assert busy == 0 and done == log_frames and checkpointer.restarts == restarts + 1
        with db.read() as s:
            assert s.execute(select(LogNode.idx).where(LogNode.level == 60)).scalars().all() == list(range(16))
    finally:
        db.dispose()


def test_the_restart_leaves_the_writers_and_their_groups_alone(migrated: str) -> None:
    """While a writer holds this process's writers' lock (its group's transaction open), the
    restart is not sent (it would hold SQLite's writer lock while copying what that writer commits):
    the thread answers busy after a few tries, never ends the group nor counts as a queued writer,
    and the writer commits as it would have. Once the lock is free, it runs."""
    _sqlite_only(migrated)
    db = _server_db(migrated, every_s=3600)
    try:
        assert db.checkpointer is not None
        db.checkpointer.run_once()  # its connection made
        assert db.checkpointer._conn is not None
        sent: list[str] = []
        db.checkpointer._conn.set_trace_callback(sent.append)
        restarts = db.checkpointer.restarts
        _write(db, 0, 10)
        holder = WriteHolder(db)  # bumps the log head's size in a transaction held open
        try:
            queue = db._writers
            assert queue is not None and queue.group is not None
            group = queue.group
            busy, log_frames, done = db.checkpointer.run_once()
            assert busy == 1 and done == log_frames > 0 and db.checkpointer.restarts == restarts
            assert not [q for q in sent if "RESTART" in q], sent  # not even tried (passive ones only)
            assert queue.group is group and not group.done.is_set() and queue.waiting == 0
        finally:
            holder.done()
        assert group.done.is_set() and group.error is None and group.members == 1
        busy, _log, _done = db.checkpointer.run_once()
        assert busy == 0 and db.checkpointer.restarts == restarts + 1
        assert [q for q in sent if "RESTART" in q]
        with db.read() as s:
            assert s.execute(select(LogHead.size)).scalar_one() == 1  # the holder's write
    finally:
        db.dispose()


def test_dispose_stops_the_thread(migrated: str) -> None:
    _sqlite_only(migrated)
    db = _server_db(migrated, every_s=0.01)
    assert db.checkpointer is not None and db.checkpointer.alive
    db.dispose()
    assert not db.checkpointer.alive
    assert not [t for t in threading.enumerate() if t.name == "sqlite-checkpoint" and t.is_alive()
                and t is db.checkpointer._thread]


def test_without_the_setting_commits_checkpoint_as_sqlite_does(migrated: str) -> None:
    """The command-line tools' Database (no thread): SQLite's own threshold, so the log stays
    bounded for them too."""
    path = _sqlite_only(migrated)
    db = Database(migrated, pool_size=2)
    try:
        assert db.checkpointer is None
        _write(db, 0, 500)
        assert _wal_pages(path) < 1200
    finally:
        db.dispose()


def test_the_servers_database_checkpoints_in_a_thread_on_sqlite_only(backend: tuple[str, str],
                                                                       migrated: str) -> None:
    db = _server_db(migrated, every_s=app.SQLITE_CHECKPOINT_EVERY_S)
    try:
        assert (db.checkpointer is not None) is (backend[0] == "sqlite")
        _write(db, 0, 3)  # and writes work on both backends
    finally:
        db.dispose()


def _checkpoint_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "sqlite-checkpoint" and t.is_alive()}


def test_a_database_dropped_without_dispose_stops_its_thread(migrated: str) -> None:
    _sqlite_only(migrated)
    before = _checkpoint_threads()
    db = _server_db(migrated, every_s=0.01)
    assert db.checkpointer is not None
    checkpointer = db.checkpointer
    del db
    gc.collect()
    assert not checkpointer.alive
    assert _checkpoint_threads() <= before
    with pytest.raises(RuntimeError, match="stopped"):
        checkpointer.run_once()  # and nothing reopens a connection for it


def test_a_deleted_database_file_is_not_recreated_by_the_thread(migrated: str) -> None:
    path = _sqlite_only(migrated)
    db = _server_db(migrated, every_s=0.01)
    try:
        _write(db, 0, 2)
        db.dispose()  # the pools' connections closed; the thread stopped
        db = _server_db(migrated, every_s=0.01)
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
        time.sleep(0.2)  # about twenty runs of the thread
        assert not path.exists()
        assert db.checkpointer is not None and db.checkpointer.alive and db.checkpointer.failures > 0
    finally:
        db.dispose()


def test_a_server_that_fails_to_start_leaves_no_thread(fresh_url: str, tmp_path: Path) -> None:
    """app.build on a database that was never migrated refuses to start (SchemaNotCurrent): the
    Database it opened is disposed, its checkpoint thread with it."""
    from entitlement.config import ROOT, Settings
    before = _checkpoint_threads()
    settings = Settings(listen="127.0.0.1:0", database_url=fresh_url, programs_dir=ROOT / "programs",
                        key_dir=tmp_path / "keys", pseudonym_key_file=tmp_path / "pseudonym.key",
                        callers_file=tmp_path / "callers.yaml")
    with pytest.raises(SchemaNotCurrent):
        app.build(settings, create_secrets=True)
    assert _checkpoint_threads() <= before
