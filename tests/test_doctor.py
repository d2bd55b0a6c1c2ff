"""The invariant checker (`entitlement doctor`): sound after real traffic, and it notices damage."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

from sqlalchemy import text

from support import Api, Harness, make_registry_file

from entitlement import cli, doctor, eventlog, registry
from entitlement.clock import FixedClock
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.v1 import activation_pb2


def test_the_shared_database_is_sound_after_traffic(api: Api, harness: Harness) -> None:
    act = api.activate().activation
    api.advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(name=act.name, reason="pause"))
    api.advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(name=act.name, reason="end"))
    assert doctor.check(harness.ctx.db) == []


def test_doctor_names_each_kind_of_damage(fresh_url: str) -> None:
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=2)
    now = dt.datetime(2026, 3, 16, 10, tzinfo=dt.timezone.utc)
    try:
        assert doctor.check(db) == []
        with db.write() as s:  # an activation row with no event, no ledger, no counter
            s.execute(text(
                "INSERT INTO activations (id, program_id, program_version, person_key, state, start_date, end_date, "
                "advisor_id, agency_code, platform_id, state_reason, decision_json, token_jti, created_at, updated_at) "
                "VALUES (:id, 'premium-job-seekers', 'v', :key, 'active', '2026-03-16', '2027-03-15', 'A1', '75011', "
                "'openclassrooms', '', :decision, 'j', :now, :now)"),
                {"id": uuid.uuid4().hex, "key": b"k" * 32, "now": now, "decision": '{"decision": {"funding_plan": '
                 '{"price_per_month_cents": 2000, "months": 12, "total_cents": 24000, '
                 '"shares": [["france-travail", 5000, 12000], ["ministry-of-labour", 5000, 12000]]}}}'})
            eventlog.append(s, time=now, type="test.event", actor="system", subject="x/1")
        codes = {p.code for p in doctor.check(db)}
        assert {"ACTIVATION_WITHOUT_EVENT", "COMMIT_MISMATCH", "COUNTER_MISMATCH"} <= codes
        assert "EVENT_SEQUENCE_GAP" not in codes and "EVENT_ALTERED" not in codes
        with db.write() as s:  # rewrite history behind the triggers' back
            if db.is_sqlite:
                s.execute(text("DROP TRIGGER events_no_update"))
            else:
                s.execute(text("ALTER TABLE events DISABLE TRIGGER events_append_only"))
            s.execute(text("UPDATE events SET reason = 'rewritten' WHERE seq = 1"))
        assert "EVENT_ALTERED" in {p.code for p in doctor.check(db)}
        assert "EVENT_ALTERED" not in {p.code for p in doctor.check(db, leaves=False)}
    finally:
        db.dispose()


def test_doctor_command_exit_codes(fresh_url: str, monkeypatch: object, capsys: object) -> None:
    upgrade(fresh_url)
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", fresh_url)  # type: ignore[attr-defined]
    assert cli.main(["doctor"]) == 0
    assert "every invariant holds" in capsys.readouterr().out  # type: ignore[attr-defined]


def test_doctor_names_registry_rows_without_a_live_snapshot(fresh_url: str, tmp_path: Path) -> None:
    """No foreign key ties registry_people to its snapshot (migration 0009): the doctor does."""
    upgrade(fresh_url)
    db = Database(fresh_url, pool_size=2)
    clock = FixedClock(dt.datetime(2026, 3, 16, 10, tzinfo=dt.timezone.utc))
    try:
        extract = make_registry_file(tmp_path / "registry.csv")
        summary = registry.import_extract(db, Pseudonymizer(bytes(32)), clock, extract,
                                          extracted_on=dt.date(2026, 3, 15))
        assert doctor.check(db) == []
        row = ("INSERT INTO registry_people (snapshot_id, person_key, birth_date, postal_code, registered_on, "
               "category) VALUES (:sid, :key, '1990-05-17', '75011', '2024-01-15', 1)")
        with db.write() as s:  # a row of a snapshot that does not exist
            s.execute(text(row), {"sid": summary.snapshot_id + 1000, "key": b"o" * 32})
        assert [(p.code, p.detail) for p in doctor.check(db)] == [
            ("REGISTRY_ROW_ORPHANED",
             f"registry_people rows name registrySnapshots/{summary.snapshot_id + 1000}, which does not exist")]
        with db.write() as s:  # the snapshot in force marked superseded without losing its rows
            s.execute(text("DELETE FROM registry_people WHERE snapshot_id = :sid"),
                      {"sid": summary.snapshot_id + 1000})
            s.execute(text("UPDATE registry_snapshots SET status = 'superseded' WHERE id = :sid"),
                      {"sid": summary.snapshot_id})
        assert [p.code for p in doctor.check(db)] == ["REGISTRY_ROWS_OF_DEAD_SNAPSHOT"]
    finally:
        db.dispose()
