"""Beside a serving process: `entitlement doctor` and `entitlement db rebuild-report` while writes
go on (found by reviews). On PostgreSQL, the doctor ran its checks at READ COMMITTED, each
statement its own snapshot, and reported gaps and mismatches that were not there; the rebuild
replaced the rollup without the log head's lock, and an activation committed between its
recomputation and its replacement was lost from the funding report."""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from own_server import next_ledger_person, on_day, own_server
from pg_context import pg_context
from support import CALLERS, Api, identity, pool_birth

from entitlement import activation, cli, doctor, jobs, rollup
from entitlement.eligibility import JobSeeker
from entitlement.storage.models import Activation
from entitlement.v1 import activation_pb2


def test_doctor_and_rebuild_beside_activations(backend: tuple[str, str], tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    if backend[0] == "sqlite":
        pytest.skip("SQLite: the doctor reads one WAL snapshot (the rebuild beside writers on SQLite: "
                    "test_rebuild_report_command_beside_a_serving_process)")
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


def test_rebuild_report_command_beside_a_serving_process(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`entitlement db rebuild-report` (the command: a Database of its own, as beside a server)
    while the server goes on: activations, suspensions, resumptions and revocations over its API,
    and the settlement job booking consumption, from threads that never wait for the rebuild. Its
    recomputation is held open here until 20 writes have landed after its snapshot, and writes go
    on while it catches up and swaps. On SQLite: the rebuild's snapshot and its write, two
    connections, beside the server's own (the rebuild once held the write lock throughout, and the
    test above is skipped there: no test ran writers beside it). Rebuilt alternately in Kiritimati,
    where 10:00 UTC is already the next day, and in Paris, so that revocations count on another
    civil day each time: after each rebuild, the doctor finds the rollup equal to the raw rows."""
    people = {f"R{i:07d}": ((dt.date(2002, 1, 1) + dt.timedelta(days=i)).isoformat(), "75011", "2024-01-15", "", "1")
              for i in range(1, 601)}
    with own_server(backend[0], tmp_path / "own", request, people=people) as h:
        api = Api(h)
        waiting = sorted(people, reverse=True)  # taken from the end
        names: list[str] = []
        failures: list[str] = []
        stop = threading.Event()
        lock = threading.Condition()
        written = [0]  # writes committed (each its own transaction and event)

        def wrote(name: str | None = None) -> None:
            with lock:
                written[0] += 1
                if name:
                    names.append(name)
                lock.notify_all()

        def activations() -> None:
            while not stop.is_set():
                with lock:
                    if not waiting:
                        return  # (everyone activated: the other writers go on)
                    agency_id = waiting.pop()
                birth = people[agency_id][0]
                try:
                    wrote(api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
                        platform="platforms/openclassrooms", reason="beside")).activation.name)
                except grpc.RpcError as exc:
                    failures.append(f"activate: {exc.code()} {exc.details()}")

        def moves() -> None:
            rng = random.Random(7)
            while not stop.is_set():
                with lock:
                    name = rng.choice(names) if names else None
                if name is None:
                    time.sleep(0.005)
                    continue
                move = rng.choice((api.advisor.RevokeActivation, api.advisor.SuspendActivation,
                                   api.advisor.ResumeActivation))
                try:
                    move(activation_pb2.TransitionActivationRequest(name=name, reason="beside"))
                    wrote()
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # (a move its state refuses)
                        failures.append(f"move: {exc.code()} {exc.details()}")

        def settlement() -> None:
            while not stop.is_set():
                try:
                    if jobs.run_settlement(h.ctx).months_consumed:
                        wrote()
                except Exception as exc:  # noqa: BLE001 - reported below
                    failures.append(f"settlement: {exc!r}")
                time.sleep(0.02)

        recompute = rollup.recompute_snapshot
        caught_up: list[int] = []

        def held_open(snapshot: Any, timezone: str) -> rollup.Recomputed:
            r = recompute(snapshot, timezone)
            with lock:  # the writers go on (20 more writes) before the catch-up and swap
                before = written[0]
                assert lock.wait_for(lambda: written[0] >= before + 20 or bool(failures), timeout=60)
            caught_up.append(written[0] - before)
            return r

        monkeypatch.setattr(rollup, "recompute_snapshot", held_open)
        unlocked = rollup.catch_up
        passes: list[int] = []

        def counted(newer: Any, snapshot: Any, r: rollup.Recomputed, size: int) -> rollup.Recomputed:
            passes.append(1)
            return unlocked(newer, snapshot, r, size)

        monkeypatch.setattr(rollup, "catch_up", counted)
        monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", h.url)
        threads = [threading.Thread(target=f) for f in (activations, activations, moves, settlement)]
        for t in threads:
            t.start()
        try:
            # Every other rebuild with a backlog small enough that its 20 writes or more are first
            # caught up with in newer snapshots, without the lock (rollup.catch_up).
            for round_, timezone in enumerate(("Pacific/Kiritimati", "Europe/Paris") * 2):
                monkeypatch.setattr(rollup, "UNLOCKED_BACKLOG", 10 if round_ % 2 else 10_000)
                monkeypatch.setenv("ENTITLEMENT_TIMEZONE", timezone)
                capsys.readouterr()
                assert cli.main(["db", "rebuild-report"]) == 0
                assert f"report rollup rebuilt in {timezone}:" in capsys.readouterr().out
                assert not failures, failures
                assert doctor.check(h.ctx.db, leaves=False) == []  # writers still going
                with h.ctx.db.read() as s:
                    assert rollup.stored_timezone(s) == timezone
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not failures, failures
        assert len(caught_up) == 4 and min(caught_up) >= 20
        assert len(passes) >= 2  # (one at least in each of the two rebuilds with the small backlog)
        with h.ctx.db.read() as s:  # revocations in the mix, on another civil day in Kiritimati
            assert s.execute(select(func.count()).select_from(Activation).where(
                Activation.state == "revoked")).scalar_one() > 0
        assert doctor.check(h.ctx.db) == []
