"""A registry extract pushed over gRPC is spooled in clear (names, birth dates, identifiers) while
it is imported. kill -9 during the import leaves the spool behind; the next server to start on the
machine removes it, and leaves alone the spool of an import another live server process is
running (several processes on one machine share the temporary directory), a spool too young to
be locked yet, and a spool without a lock file (a version before the locks, during a rolling
upgrade) that changed within the hour. The daily `entitlement privacy purge` sweeps the same way on
the machine it runs on (a killed server may not start there again soon). Real `server.py`
processes, a real import stream, a real kill, the real command."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from load_clients import AGENCY, registry_extract
from support import date_msg
from test_server_ops import PYTHON, ROOT, Server, prepare

from entitlement import cli
from entitlement.clock import SystemClock
from entitlement.registry_feed import _SPOOL_LOCK, SPOOL_GRACE_S, SPOOL_PREFIX, UNLOCKED_SPOOL_GRACE_S
from entitlement.storage.db import Database
from entitlement.v1 import registry_pb2, registry_pb2_grpc

WAIT_S = 60.0


def _wait(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited {WAIT_S}s for {what}"
        time.sleep(0.02)


def _spools(spool_dir: Path) -> list[Path]:
    return sorted(p for p in spool_dir.iterdir() if p.name.startswith(SPOOL_PREFIX))


def _age(path: Path, seconds: float) -> None:
    """As if nothing in the spool had changed for `seconds` (what the sweep judges it by)."""
    then = time.time() - seconds
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        os.utime(p, (then, then))


class HeldImport:
    """An ImportExtract whose stream stays open after its first chunk until `finish()`."""

    def __init__(self, server: Server) -> None:
        self.body = registry_extract(1, 3000)
        self.release = threading.Event()
        self.answer: dict[str, object] = {}
        self.thread = threading.Thread(target=self._push, args=(server,))
        self.thread.start()

    def _parts(self) -> Iterator[registry_pb2.ImportExtractRequest]:
        yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
            extracted_on=date_msg(SystemClock().today()), source_name="held.csv",
            sha256=hashlib.sha256(self.body).hexdigest()))
        yield registry_pb2.ImportExtractRequest(chunk=self.body[:32 * 1024])
        self.release.wait(WAIT_S)
        yield registry_pb2.ImportExtractRequest(chunk=self.body[32 * 1024:])

    def _push(self, server: Server) -> None:
        channel = grpc.insecure_channel(server.dir.address)
        try:
            self.answer["ok"] = registry_pb2_grpc.RegistryServiceStub(channel).ImportExtract(
                self._parts(), metadata=server.metadata(AGENCY, "held-" + uuid.uuid4().hex), timeout=WAIT_S)
        except grpc.RpcError as err:
            self.answer["error"] = err.code()
        finally:
            channel.close()

    def finish(self) -> dict[str, object]:
        self.release.set()
        self.thread.join(WAIT_S)
        return self.answer


def test_a_spool_left_by_kill_9_is_removed_at_the_next_start_and_a_live_one_is_not(
        fresh_url: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "tmp"  # the servers' TMPDIR
    spool_dir.mkdir()
    a = prepare(tmp_path / "a", fresh_url)
    a.extra_env["TMPDIR"] = str(spool_dir)
    server = Server(a)
    held = None
    try:
        held = HeldImport(server)
        _wait(lambda: any((p / "extract.csv").exists() and (p / "extract.csv").stat().st_size > 0
                          for p in _spools(spool_dir)), "the server to spool the first bytes")
        [live] = _spools(spool_dir)
        _age(live, 10 * SPOOL_GRACE_S)

        # Another server process starting on the same machine sweeps: the live import's spool stays.
        b = prepare(tmp_path / "b", fresh_url, migrate=False)
        b.extra_env["TMPDIR"] = str(spool_dir)
        other = Server(b)
        try:
            assert _spools(spool_dir) == [live]
            assert not [x for x in b.log_lines() if x.get("event") == "stale_extract_spools_removed"]
        finally:
            other.close()

        # kill -9 in the middle of the import: the spool, personal data in clear, stays behind.
        server.proc.kill()
        server.proc.wait(timeout=WAIT_S)
        assert held.finish().get("error") is not None
        assert _spools(spool_dir) == [live] and (live / "extract.csv").stat().st_size > 0
    finally:
        if held is not None:
            held.release.set()
        server.close()

    young = spool_dir / (SPOOL_PREFIX + "1-young")  # just made by a process that has not locked it yet
    young.mkdir()
    legacy_recent, legacy_old = spool_dir / (SPOOL_PREFIX + "2-legacy"), spool_dir / (SPOOL_PREFIX + "3-legacy")
    for legacy, age in ((legacy_recent, 10 * SPOOL_GRACE_S), (legacy_old, 2 * UNLOCKED_SPOOL_GRACE_S)):
        legacy.mkdir()
        (legacy / "extract.csv").write_bytes(b"identifiant,dateNaissance\n")
        _age(legacy, age)
    unrelated = spool_dir / "someone-else"
    unrelated.mkdir()
    _age(unrelated, 10 * SPOOL_GRACE_S)
    _age(live, 10 * SPOOL_GRACE_S)  # the killed import's, as if the restart came ten minutes later
    server = Server(a)  # the restart
    try:
        assert _spools(spool_dir) == [young, legacy_recent]
        assert unrelated.exists()
        [line] = [x for x in a.log_lines() if x.get("event") == "stale_extract_spools_removed"]
        assert line["count"] == 2 and line["level"] == "warning"
        # And the service imports as before (its own spool gone once the import ends).
        again = HeldImport(server)
        answer = again.finish()
        assert "ok" in answer, answer
        assert _spools(spool_dir) == [young, legacy_recent]
    finally:
        server.close()


def _purge(env: dict[str, str], *flags: str) -> str:
    done = subprocess.run([PYTHON, "-m", "entitlement.cli", "privacy", "purge", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_daily_purge_removes_dead_spools_on_its_machine_and_leaves_a_live_import_alone(
        fresh_url: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "tmp"
    spool_dir.mkdir()
    a = prepare(tmp_path / "a", fresh_url)
    a.extra_env["TMPDIR"] = str(spool_dir)
    dead = spool_dir / (SPOOL_PREFIX + "1-dead")  # locked by an importer that was killed: nobody holds it
    dead.mkdir()
    (dead / _SPOOL_LOCK).touch()
    (dead / "extract.csv").write_bytes(b"identifiant,dateNaissance\n")
    server = Server(a)  # its start sweeps nothing of this yet: the dead one is not old enough
    held = None
    try:
        assert _spools(spool_dir) == [dead]
        # Left, as far as this server knows, after it started.
        legacy_old, legacy_recent = spool_dir / (SPOOL_PREFIX + "2-legacy"), spool_dir / (SPOOL_PREFIX + "3-legacy")
        for legacy, age in ((legacy_old, 2 * UNLOCKED_SPOOL_GRACE_S), (legacy_recent, 10 * SPOOL_GRACE_S)):
            legacy.mkdir()
            (legacy / "extract.csv").write_bytes(b"identifiant,dateNaissance\n")
            _age(legacy, age)
        young = spool_dir / (SPOOL_PREFIX + "4-young")  # a dead importer's too, but changed within the minute
        young.mkdir()
        (young / _SPOOL_LOCK).touch()
        held = HeldImport(server)
        _wait(lambda: len(_spools(spool_dir)) == 5, "the server to make its spool")
        [live] = [p for p in _spools(spool_dir) if p not in (dead, legacy_old, legacy_recent, young)]
        # Locked, and its first bytes in: left alone below for its lock, not for being young.
        _wait(lambda: (live / "extract.csv").exists() and (live / "extract.csv").stat().st_size > 0,
              "the server to spool the first bytes")
        for spool in (live, dead):
            _age(spool, 10 * SPOOL_GRACE_S)

        # Counting only: nothing goes.
        out = _purge(a.env(), "--dry-run")
        assert f"would remove 2 registry extract spool(s) a killed import left in {spool_dir}" in out, out
        assert len(_spools(spool_dir)) == 5

        out = _purge(a.env())
        assert f"removed 2 registry extract spool(s) a killed import left in {spool_dir}" in out, out
        assert _spools(spool_dir) == sorted([legacy_recent, young, live])
        assert (live / "extract.csv").stat().st_size > 0  # the live import's, untouched

        answer = held.finish()
        assert "ok" in answer, answer  # the import went through beside the purge
        assert _spools(spool_dir) == [legacy_recent, young]
    finally:
        if held is not None:
            held.release.set()
        server.close()


def test_the_purge_says_so_and_fails_when_it_cannot_look_for_spools(
        db: Database, fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Spools it could not look for may hold personal data: the command's exit status says so (a
    daily job's failure is seen), and the database's part of the purge is done all the same."""
    missing = tmp_path / "no-such-dir"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))  # what gettempdir() then answers
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", fresh_url)
    assert cli.main(["privacy", "purge", "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert f"cannot list {missing} for registry extract spools (FileNotFoundError); any left there stay" in err
    assert "would delete the rows of 0 registry snapshot(s)" in out, (out, err)  # the database's part ran

    missing.mkdir()
    assert cli.main(["privacy", "purge", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"would remove 0 registry extract spool(s) a killed import left in {missing}" in out and not err


def test_a_lock_file_that_is_a_symlink_is_never_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool's `.lock` planted as a symlink: the sweep neither opens nor makes what it points to,
    and leaves that spool (logged) while it sweeps a dead one beside it."""
    from entitlement.registry_feed import sweep_stale_spools
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = tmp_path / (SPOOL_PREFIX + "planted")
    planted.mkdir()
    (planted / _SPOOL_LOCK).symlink_to(elsewhere / "made-through-the-link")
    dead = tmp_path / (SPOOL_PREFIX + "dead")
    dead.mkdir()
    (dead / _SPOOL_LOCK).touch()
    then = time.time() - 2 * UNLOCKED_SPOOL_GRACE_S
    for spool in (planted, dead):  # both unchanged for two hours (the link itself, not followed)
        os.utime(spool / _SPOOL_LOCK, (then, then), follow_symlinks=False)
        os.utime(spool, (then, then))
    assert sweep_stale_spools(dry_run=True) == 1  # the dead one; the planted one has a "lock file" it cannot open
    assert sweep_stale_spools() == 1
    assert _spools(tmp_path) == [planted] and not dead.exists()
    assert list(elsewhere.iterdir()) == []  # nothing made through the link


def test_an_empty_spool_without_lock_goes_after_the_short_grace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import killed between making its spool and its lock file, or while removing it (`.lock`
    gone, the directory not yet), leaves an empty directory: swept once unchanged for SPOOL_GRACE_S,
    not the hour an unlocked spool holding an extract gets (an older version's import may read it)."""
    from entitlement.registry_feed import sweep_stale_spools
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    empty_old, empty_new, legacy = (tmp_path / (SPOOL_PREFIX + n) for n in ("empty-old", "empty-new", "legacy"))
    for spool in (empty_old, empty_new, legacy):
        spool.mkdir()
    (legacy / "extract.csv").write_bytes(b"identifiant;dateNaissance\n")
    _age(empty_old, 2 * SPOOL_GRACE_S)
    _age(legacy, 2 * SPOOL_GRACE_S)
    assert sweep_stale_spools(dry_run=True) == 1 and empty_old.exists()
    assert sweep_stale_spools() == 1
    assert _spools(tmp_path) == sorted([legacy, empty_new])
    assert not empty_old.exists() and list(legacy.iterdir()) == [legacy / "extract.csv"]


def test_a_spool_whose_lock_cannot_be_taken_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock failing (ENOLCK: a filesystem without locks) left the spool's directory and its lock
    file behind, until a sweep: the push's error and nothing else."""
    import errno
    import fcntl

    from entitlement import registry_feed

    def no_locks(*_a: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OSError) as failed:
        with registry_feed._spool():
            raise AssertionError("the spool was given without its lock")
    assert failed.value.errno == errno.ENOLCK
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(SPOOL_PREFIX)]
