"""PostgreSQL, beside a serving process: `entitlement doctor` and `entitlement db rebuild-report`
while activations go on (found by a review). The doctor ran its checks at READ COMMITTED, each
statement its own snapshot, and reported gaps and mismatches that were not there; the rebuild
replaced the rollup without the log head's lock, and an activation committed between its
recomputation and its replacement was lost from the funding report."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pg_context import pg_context
from support import CALLERS, pool_birth

from entitlement import activation, doctor, rollup
from entitlement.eligibility import JobSeeker


def test_doctor_and_rebuild_beside_activations(backend: tuple[str, str], tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    if backend[0] == "sqlite":
        pytest.skip("SQLite: the doctor reads one WAL snapshot and the rebuild holds the one write lock")
    with pg_context(request.getfixturevalue("pg_server"), tmp_path) as (ctx, _clock):
        adv = next(c for c in CALLERS if c.id == "advisor-paris")
        people = iter(range(1, 2000))
        lock = threading.Lock()
        stop = threading.Event()
        failures: list[str] = []

        def activations() -> None:
            while not stop.is_set():
                with lock:
                    i = next(people)
                try:
                    activation.activate(ctx, adv, activation.ActivateCommand(
                        JobSeeker(f"P{i:07d}", pool_birth(i)), "premium-job-seekers", "openclassrooms", "t"))
                except Exception as exc:  # noqa: BLE001 - counted
                    failures.append(type(exc).__name__)
        threads = [threading.Thread(target=activations) for _ in range(4)]
        for t in threads:
            t.start()
        seen: list[str] = []
        try:
            for round_ in range(8):
                seen += [p.code for p in doctor.check(ctx.db, leaves=False)]
                if round_ % 2:
                    with ctx.db.write() as s:
                        rollup.rebuild(s, ctx.settings.timezone)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures
        assert not seen, seen  # nothing reported while the activations went on
        assert not doctor.check(ctx.db)  # and the rollup matches the raw rows afterwards
