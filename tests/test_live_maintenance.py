"""PostgreSQL, beside a serving process: `entitlement doctor` and `entitlement db rebuild-report`
while activations go on (found by a review). The doctor ran its checks at READ COMMITTED, each
statement its own snapshot, and reported gaps and mismatches that were not there; the rebuild
replaced the rollup without the log head's lock, and an activation committed between its
recomputation and its replacement was lost from the funding report."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from own_server import next_ledger_person, on_day, own_server
from pg_context import pg_context
from support import CALLERS, Api, identity, pool_birth

from entitlement import activation, doctor, jobs, rollup
from entitlement.eligibility import JobSeeker
from entitlement.v1 import activation_pb2


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
                    rollup.rebuild(ctx.db, ctx.settings.timezone)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures
        assert not seen, seen  # nothing reported while the activations went on
        assert not doctor.check(ctx.db)  # and the rollup matches the raw rows afterwards


def test_rebuild_catches_up_with_what_was_written_during_its_recomputation(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`rollup.rebuild` recomputes in a read snapshot, writers going on (they waited for the whole
    recomputation before: 3.9 s at 200,000 activations), then catches up in a short write
    transaction with what the events after its snapshot name. Here, between the two, over the
    server's API: activations, suspensions, a revocation whose civil day differs between the
    service's time zone and the rebuild's (10:00 UTC is already tomorrow in Kiritimati), and a
    settlement that consumes months. The rollup swapped in is its recomputation of the rows as they
    are after it all, not as they were at the snapshot."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        ids = [next_ledger_person() for _ in range(8)]

        def activate(i: int) -> str:
            agency_id, birth = ids[i]
            return str(api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
                platform="platforms/openclassrooms", reason="rebuild")).activation.name)

        before = [activate(i) for i in range(4)]
        api.advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(name=before[0], reason="before"))
        with h.ctx.db.read(consistent=True) as snapshot:
            r = rollup.recompute_snapshot(snapshot, "Pacific/Kiritimati")
            # Written meanwhile (each its own transaction, none waiting for the rebuild).
            after = [activate(i) for i in range(4, 8)]
            api.advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(name=before[1], reason="during"))
            api.advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(name=after[0], reason="during"))
            with on_day(h, h.clock.today() + dt.timedelta(days=70)):  # months of access begun: consumed
                assert jobs.run_settlement(h.ctx).months_consumed > 0
            with h.ctx.db.write() as s:
                months, days = rollup.replace(s, snapshot, r)
        with h.ctx.db.read() as s:
            stored = rollup.stored(s)
            assert stored == rollup.recompute(s, "Pacific/Kiritimati")
            assert rollup.stored_timezone(s) == "Pacific/Kiritimati"
        assert (months, days) == (len(stored[0]), len(stored[1]))
        assert stored != (r.months, r.days)  # what was written meanwhile moved the rollup
        # Rebuilt in the service's time zone (the whole function, both of its transactions): the
        # doctor finds the rollup equal to the raw rows.
        rollup.rebuild(h.ctx.db, h.ctx.settings.timezone)
        assert doctor.check(h.ctx.db) == []
