"""The invariant checker (`entitlement doctor`): sound after real traffic, and it notices damage."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import text

from support import Api, Harness

from entitlement import cli, doctor, eventlog, rollup
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
        assert "REPORT_ROLLUP_MISMATCH" not in codes  # no ledger entry: the rollup has nothing to count
        with db.write() as s:  # a ledger entry written around the ORM: the report's rollup missed it
            s.execute(text(
                "INSERT INTO ledger_entries (activation_id, program_id, funder_id, kind, month, amount_cents, "
                "created_at) SELECT id, program_id, 'france-travail', 'commit', '2026-03', 12000, :now "
                "FROM activations"), {"now": now})
        [mismatch] = [p for p in doctor.check(db) if p.code == "REPORT_ROLLUP_MISMATCH"][:1]
        assert "report_months france-travail/premium-job-seekers/2026-03" in mismatch.detail
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


def test_rebuild_report_command_mends_a_rollup_missed_by_rows_written_around_the_service(
        fresh_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    upgrade(fresh_url)
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", fresh_url)
    db = Database(fresh_url, pool_size=2)
    now = dt.datetime(2026, 3, 16, 10, tzinfo=dt.timezone.utc)
    try:
        with db.write() as s:  # an activation revoked at 23:30 UTC on 31 March, and its commitment, in raw SQL
            aid = uuid.uuid4().hex
            s.execute(text(
                "INSERT INTO activations (id, program_id, program_version, person_key, state, start_date, end_date, "
                "advisor_id, agency_code, platform_id, state_reason, decision_json, token_jti, created_at, updated_at) "
                "VALUES (:id, 'premium-job-seekers', 'v', :key, 'revoked', '2026-03-16', '2027-03-15', 'A1', '75011', "
                "'openclassrooms', '', '{\"decision\": {\"funding_plan\": null}}', 'j', :now, :revoked)"),
                {"id": aid, "key": b"k" * 32, "now": now, "revoked": dt.datetime(2026, 3, 31, 23, 30)})
            s.execute(text(
                "INSERT INTO ledger_entries (activation_id, program_id, funder_id, kind, month, amount_cents, "
                "created_at) VALUES (:id, 'premium-job-seekers', 'france-travail', 'commit', '2026-03', 12000, :now)"),
                {"id": aid, "now": now})
        assert "REPORT_ROLLUP_MISMATCH" in {p.code for p in doctor.check(db)}
        for timezone, ended_on in (("Europe/Paris", dt.date(2026, 4, 1)), ("UTC", dt.date(2026, 3, 16))):
            monkeypatch.setenv("ENTITLEMENT_TIMEZONE", timezone)
            capsys.readouterr()
            assert cli.main(["db", "rebuild-report"]) == 0
            assert f"rebuilt in {timezone}: 1 month rows" in capsys.readouterr().out
            assert "REPORT_ROLLUP_MISMATCH" not in {p.code for p in doctor.check(db)}
            with db.read() as s:  # revoked on 1 April in Paris (01:30): ended in April; on 31 March in UTC: ended in March, counted from its start
                assert rollup.stored_timezone(s) == timezone
                days = rollup.stored(s)[1]
            assert [day for (_f, _p, day), c in days.items() if c["ended_through"]] == [ended_on]
    finally:
        db.dispose()
