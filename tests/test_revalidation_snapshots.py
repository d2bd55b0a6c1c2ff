"""Revalidation and the snapshots it judges by (found by reviews).

- A corrected extract of the same day (accepted: "a corrected re-send of that day's file") is
  another snapshot: the activations decided on the first one are re-checked against it (they were
  counted "up to date", the dates being equal, so a registration ended in the correction never
  ended the access).
- PostgreSQL: imports during a long revalidation run switch snapshots and prune the rows of the
  old ones; a run that kept the snapshot of its start read those rows as gone and curtailed people
  as NOT_REGISTERED. Each activation is now judged by the snapshot in force in its own
  transaction, and one whose snapshot lost its rows meanwhile is left for the next run.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from own_server import default_people, next_ledger_person, own_server, write_registry
from support import TODAY, Api, identity, sqlite_writer_sees

from entitlement import jobs, registry
from entitlement.storage.models import Activation, Event
from entitlement.v1 import activation_pb2


def activate(api: Api, agency_id: str, birth: dt.date) -> str:
    made = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="revalidation snapshots"))
    return str(made.activation.name.split("/")[1])


def test_a_corrected_extract_of_the_same_day_is_revalidated(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    people = default_people()
    with own_server(backend[0], tmp_path / "srv", request, people=people) as h:
        agency_id, birth = next_ledger_person()
        activation_id = activate(Api(h), agency_id, birth)
        day = TODAY - dt.timedelta(days=1)  # the extract in force is dated yesterday
        corrected = dict(people)
        b, postal, reg, _end, cat = corrected[agency_id]
        corrected[agency_id] = (b, postal, reg, "2026-03-01", cat)  # the correction: ended on 1 March
        summary = registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock,
                                          write_registry(tmp_path / "corrected.csv", corrected), extracted_on=day)
        assert not summary.unchanged
        r = jobs.run_revalidation(h.ctx, activation_ids=[activation_id])
        assert (r.examined, r.up_to_date, r.curtailed) == (1, 0, 1)
        with h.ctx.db.read() as s:
            end = s.execute(select(Activation.end_date).where(Activation.id == activation_id)).scalar_one()
        assert end == dt.date(2026, 4, 30)  # the end of the month after the registration's end
        # The registry's date about the person is not logged: the append-only log, which funders
        # read, would keep it past any purge (found by a review).
        with h.ctx.db.read() as s:
            logged = s.execute(select(Event.payload_json, Event.reason).where(
                Event.type == "activation.curtailed", Event.subject == f"activations/{activation_id}")).one()
        assert "2026-03-01" not in logged.payload_json + logged.reason, logged
        assert '"failed_criteria":["REGISTRATION_ENDED"]' in logged.payload_json.replace(" ", "")


def test_a_snapshot_pruned_during_the_run_curtails_nobody(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if backend[0] == "sqlite":
        pytest.skip("SQLite has one writer: no import can switch or prune while a revalidation "
                    "transaction is open, so this interleaving cannot happen there")
    people = default_people()
    with own_server(backend[0], tmp_path / "srv", request, people=people) as h:
        ids = [activate(Api(h), *next_ledger_person()) for _ in range(3)]
        same = write_registry(tmp_path / "same.csv", people)  # nobody's registration changes
        h.clock.advance(dt.timedelta(days=10))
        registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, same, extracted_on=h.clock.today())
        real_facts = jobs._facts
        imported: list[int] = []

        def facts_after_two_imports(*args: object) -> object:
            # The agency's next two extracts land while the job reads its first person: the snapshot
            # it began with is pruned (keep_snapshots=2) before that person's row is read.
            if not imported:
                for k in (1, 2):
                    h.clock.advance(dt.timedelta(days=1))
                    imported.append(registry.import_extract(
                        h.ctx.db, h.ctx.pseudo, h.clock, write_registry(tmp_path / f"same{k}.csv", people),
                        extracted_on=h.clock.today()).snapshot_id)
            return real_facts(*args)  # type: ignore[arg-type]
        monkeypatch.setattr(jobs, "_facts", facts_after_two_imports)
        r = jobs.run_revalidation(h.ctx, activation_ids=ids)
        assert (r.curtailed, r.expired) == (0, 0), r
        assert r.skipped == 1 and r.still_eligible == 2, r
        with h.ctx.db.read() as s:
            assert not s.execute(select(Event).where(Event.type == "activation.curtailed")).scalars().all()
        monkeypatch.setattr(jobs, "_facts", real_facts)
        again = jobs.run_revalidation(h.ctx, activation_ids=ids)
        assert (again.curtailed, again.skipped, again.still_eligible) == (0, 0, 3), again


def test_a_revalidation_lets_other_writers_of_sqlite_in_between_its_transactions(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As the settlement (tests/test_ledger.py): each activation is revalidated in its own short
    transaction, but on SQLite they followed one another so closely that a writer of another
    process never got the lock in between; the job pauses after holding it HOLD_S (jobs._Turns).
    A writer polling the file sees the curtailments part-done. On both backends: each curtailed
    once, the doctor clean."""
    from entitlement import doctor
    monkeypatch.setattr(jobs, "HOLD_S", 0.0)
    monkeypatch.setattr(jobs, "PAUSE_S", 0.02)
    people = default_people()
    with own_server(backend[0], tmp_path / "srv", request, people=people) as h:
        corrected = dict(people)
        ids = []
        for _ in range(20):
            agency_id, birth = next_ledger_person()
            ids.append(activate(Api(h), agency_id, birth))
            b, postal, reg, _end, cat = corrected[agency_id]
            corrected[agency_id] = (b, postal, reg, "2026-03-01", cat)  # ended on 1 March
        registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, write_registry(tmp_path / "ended.csv", corrected),
                                extracted_on=TODAY)
        curtailed = "SELECT count(*) FROM events WHERE type = 'activation.curtailed'"
        with sqlite_writer_sees(h.url, curtailed) as seen:
            r = jobs.run_revalidation(h.ctx, activation_ids=ids)
        assert (r.examined, r.curtailed) == (20, 20)
        again = jobs.run_revalidation(h.ctx, activation_ids=ids)
        assert (again.curtailed, again.expired) == (0, 0)
        with h.ctx.db.read() as s:
            assert set(s.execute(select(Activation.end_date).where(Activation.id.in_(ids))).scalars()) == \
                {dt.date(2026, 4, 30)}
        assert doctor.check(h.ctx.db) == []
        if h.backend == "sqlite":
            part_done = {n for n in seen if 0 < n < 20}
            assert len(part_done) >= 7, f"the revalidation left no room between its transactions (counts seen: {sorted(set(seen))})"
