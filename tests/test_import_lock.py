"""One registry import at a time across processes, on both backends. An import starts by discarding
what unfinished imports left; a second import started while another was loading (another server
process, the command line) deleted the first one's rows so far, and the first then switched to a
snapshot with gaps: people wrongly NOT_REGISTERED, live activations curtailed by the next
revalidation. Now the second is refused (ImportInProgress; ABORTED `IMPORT_IN_PROGRESS` over gRPC)
and the first goes live whole."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from support import TODAY, Api, date_msg, expect_error, make_registry_file

from entitlement import registry, synthetic
from entitlement.clock import SystemClock
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.models import RegistryPerson, RegistrySnapshot
from entitlement.v1 import registry_pb2


def stored_rows(db: Database, snapshot_id: int) -> int:
    with db.read() as s:
        return int(s.execute(select(func.count()).select_from(RegistryPerson)
                             .where(RegistryPerson.snapshot_id == snapshot_id)).scalar_one())


def test_an_import_started_during_another_is_refused_and_the_first_goes_live_whole(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pseudo = Pseudonymizer.from_file(tmp_path / "p.key", create=True)
    clock = SystemClock()
    today = clock.today()
    first = tmp_path / "first.csv"
    synthetic.write(first, 50)
    registry.import_extract(db, pseudo, clock, first, extracted_on=today - dt.timedelta(days=1))
    second, other = tmp_path / "second.csv", tmp_path / "other.csv"
    synthetic.write(second, 60)
    synthetic.write(other, 40)
    monkeypatch.setattr(registry, "BATCH", 7)  # progress reported part-way through the file
    refused: list[str] = []

    def another_import_starts(_p: registry.Progress) -> None:
        if not refused:
            try:  # as another process would: its own lock attempt, its own connection or file handle
                registry.import_extract(db, pseudo, clock, other, extracted_on=today)
                refused.append("imported")
            except registry.ImportInProgress as exc:
                refused.append(str(exc))

    summary = registry.import_extract(db, pseudo, clock, second, extracted_on=today,
                                      on_progress=another_import_starts)
    assert refused and "another registry import is running" in refused[0], refused
    assert summary.rows_imported == 60 and stored_rows(db, summary.snapshot_id) == 60
    with db.read() as s:
        current = registry.current_snapshot(s)
        statuses = dict(s.execute(select(RegistrySnapshot.id, RegistrySnapshot.status)).all())
    assert current is not None and current.id == summary.snapshot_id
    assert list(statuses.values()).count("importing") == 0
    # The lock is let go: the next import runs.
    monkeypatch.setattr(registry, "BATCH", 10_000)
    assert not registry.import_extract(db, pseudo, clock, other, extracted_on=today, min_ratio=0).unchanged


def test_a_push_while_another_process_imports_is_aborted(api: Api, tmp_path: Path) -> None:
    # (A row of its own: never the bytes of a snapshot in force, which would answer `unchanged` at once.)
    data = make_registry_file(tmp_path / "push.csv").read_bytes() + b"LOCKTEST,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n"
    feed = api.as_("agency-feed").ImportExtract

    def stream() -> object:
        yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
            extracted_on=date_msg(TODAY.isoformat()), source_name="push.csv"))
        yield registry_pb2.ImportExtractRequest(chunk=data)

    with registry._import_lock(api.h.ctx.db):  # another process's import, holding the lock
        f = expect_error(feed, stream(), grpc.StatusCode.ABORTED)
    assert f.reason == "IMPORT_IN_PROGRESS" and "another registry import" in f.message


def test_a_push_while_another_process_imports_is_aborted_before_its_file_is_received(api: Api, tmp_path: Path) -> None:
    """The push was told only once its whole file was received and spooled (up to 4 GiB, sent and
    written to disk for nothing): the lock was first tried by the import itself. It is tried as
    soon as the header is in, before a byte of the file: here the rest of the file never comes."""
    data = make_registry_file(tmp_path / "push.csv").read_bytes() + b"LOCKTST2,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n"
    feed = api.as_("agency-feed").ImportExtract
    rest = threading.Event()

    def stream() -> object:
        yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
            extracted_on=date_msg(TODAY.isoformat()), source_name="push.csv"))
        yield registry_pb2.ImportExtractRequest(chunk=data[:4096])
        rest.wait(15)  # the rest of a large file, still to come
        yield registry_pb2.ImportExtractRequest(chunk=data[4096:])

    started = time.monotonic()
    try:
        with registry._import_lock(api.h.ctx.db):  # another process's import, holding the lock
            f = expect_error(feed, stream(), grpc.StatusCode.ABORTED, timeout=60)
    finally:
        rest.set()
    assert f.reason == "IMPORT_IN_PROGRESS"
    assert time.monotonic() - started < 10, "the server waited for the whole file before refusing it"
