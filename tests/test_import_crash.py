"""kill -9 during `entitlement registry import`: the previous snapshot stays in force, and the
import can simply be run again."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select


from entitlement import registry, synthetic
from entitlement.clock import SystemClock
from entitlement.config import ROOT
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.storage.models import RegistryPerson, RegistrySnapshot

ROWS = 150_000
CLI = [sys.executable, "-m", "entitlement.cli"]


@pytest.fixture(scope="module")
def big_extract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crash") / "big.csv"
    synthetic.write(path, ROWS, seed=7)
    return path


def _loaded(db: Database) -> tuple[int, int]:
    """(id of the snapshot being imported or 0, rows it has stored so far)."""
    with db.read() as s:
        importing = s.execute(select(RegistrySnapshot.id).where(RegistrySnapshot.status == "importing")).scalar()
        if not importing:
            return 0, 0
        return importing, s.execute(select(func.count()).select_from(RegistryPerson)
                                    .where(RegistryPerson.snapshot_id == importing)).scalar_one()


@pytest.mark.parametrize("kill_after_rows", [1, 60_000])
def test_kill_9_during_import_leaves_the_previous_snapshot(fresh_url: str, tmp_path: Path, big_extract: Path,
                                                           kill_after_rows: int) -> None:
    target = fresh_url
    upgrade(target)
    key_file = tmp_path / "pseudonym.key"
    pseudo = Pseudonymizer.from_file(key_file, create=True)
    db = Database(target, pool_size=2)
    small = tmp_path / "small.csv"
    synthetic.write(small, 10)
    today = SystemClock().today()
    first = registry.import_extract(db, pseudo, SystemClock(), small, extracted_on=today)
    known = synthetic.KNOWN[0]
    env = {**os.environ, "ENTITLEMENT_DATABASE_URL": target, "ENTITLEMENT_PSEUDONYM_KEY_FILE": str(key_file)}
    cmd = [*CLI, "registry", "import", str(big_extract), "--extracted-on", today.isoformat(), "--quiet",
           "--rejects", str(tmp_path / "r.csv")]

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _loaded(db)[1] >= kill_after_rows:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the import finished before it could be killed: make the file bigger"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()  # type: ignore[union-attr]

    with db.read() as s:  # the killed import never switched: lookups still see the first snapshot
        assert registry.current_snapshot(s).id == first.snapshot_id  # type: ignore[union-attr]
        facts, snap = registry.lookup(s.connection(), pseudo.person_key(known[0]), dt.date.fromisoformat(known[1]))
    assert facts is not None and snap is not None and snap.id == first.snapshot_id

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with db.read() as s:
        current = registry.current_snapshot(s)
        assert current is not None and current.id > first.snapshot_id
        statuses = dict(s.execute(select(RegistrySnapshot.id, RegistrySnapshot.status)).all())
        stored = s.execute(select(RegistryPerson.snapshot_id, func.count()).group_by(RegistryPerson.snapshot_id)).all()
    assert "failed" in statuses.values()  # the killed one is recorded as failed...
    assert {sid for sid, _ in stored} == {first.snapshot_id, current.id}  # ...and its rows are gone
    assert dict(stored)[current.id] + _rejected(tmp_path / "r.csv") == ROWS
    db.dispose()


def _rejected(path: Path) -> int:
    return max(0, len(path.read_text(encoding="utf-8").splitlines()) - 1)
