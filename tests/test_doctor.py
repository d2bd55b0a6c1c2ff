"""The invariant checker (`entitlement doctor`): sound after real traffic, and it notices damage."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, text

from own_server import next_ledger_person, own_server
from support import Api, As, Harness, identity, make_registry_file

from entitlement import cli, doctor, eventlog, note, registry, rollup
from entitlement.clock import FixedClock
from entitlement.config import ROOT
from entitlement.doctor import Acknowledged
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.storage.models import LedgerEntry, RegistrySnapshot
from entitlement.v1 import activation_pb2, audit_pb2


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
        assert {"ACTIVATION_WITHOUT_EVENT", "ACTIVATION_WITHOUT_LEDGER", "COUNTER_MISMATCH"} <= codes
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


def _codes(db: Database, **kw: object) -> set[str]:
    return {p.code for p in doctor.check(db, **kw)}  # type: ignore[arg-type]


def test_doctor_checks_acknowledged_requests_trusted_checkpoints_and_logged_states(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """On a server of its own (the damage stays there): what clients were told is checked against
    the database, a checkpoint fetched earlier against the log, states and bindings against events."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        advisor, platform = As(h.channel, h.tokens["advisor-paris"]), As(h.channel, h.tokens["platform-oc"])
        funder = As(h.channel, h.tokens["funder-ft"])
        made = []
        for _ in range(3):
            agency_id, birth = next_ledger_person()
            rid = uuid.uuid4().hex
            made.append((rid, advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                request_id=rid, job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
                platform="platforms/openclassrooms", reason="doctor"))))
        (rid_a, a), (rid_b, b), (_, c) = made
        aid_a, aid_b, aid_c = (x.activation.name.split("/")[1] for x in (a, b, c))
        suspend_rid = uuid.uuid4().hex
        advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(
            name=a.activation.name, reason="pause", request_id=suspend_rid))
        advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(name=b.activation.name, reason="end"))
        platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=c.activation_token, account_id="learner-doctor"))
        with h.ctx.db.read() as s:
            snapshot_id = s.execute(select(RegistrySnapshot.id).where(RegistrySnapshot.status == "complete")).scalar_one()
        checkpoint = funder.GetCheckpoint(audit_pb2.GetCheckpointRequest())
        trusted = note.open_checkpoint(checkpoint.checkpoint, note.Verifier.parse(checkpoint.verifier_key))
        told = [Acknowledged("activate", aid_a, "advisor-paris", rid_a),
                Acknowledged("activate", aid_b, "advisor-paris", rid_b),
                Acknowledged("suspend", aid_a, "advisor-paris", suspend_rid),
                Acknowledged("revoke", aid_b, "advisor-paris"),
                Acknowledged("redeem", aid_c, account_id="learner-doctor"),
                Acknowledged("import", snapshot_id=snapshot_id)]
        assert doctor.check(h.ctx.db, trusted=trusted, acknowledged=told) == []
        advisor.ResumeActivation(activation_pb2.TransitionActivationRequest(name=a.activation.name, reason="back"))
        assert doctor.check(h.ctx.db, trusted=trusted, acknowledged=told) == []  # the log grew: still extends it

        # What was never acknowledged, or acknowledged but is not there.
        lost = [Acknowledged("activate", uuid.uuid4().hex, "advisor-paris", rid_a),  # answer names another row
                Acknowledged("activate", aid_a, "advisor-paris", uuid.uuid4().hex),  # no stored answer
                Acknowledged("resume", aid_b, "advisor-paris"),  # never logged
                Acknowledged("redeem", aid_a, account_id="learner-doctor"),
                Acknowledged("import", snapshot_id=snapshot_id + 100)]
        problems = doctor.check(h.ctx.db, acknowledged=lost)
        assert [p.code for p in problems] == ["ACKNOWLEDGED_BUT_MISSING"] * len(lost), problems

        # Checkpoints the log does not extend: a longer log, another root at the same size.
        longer = note.Checkpoint(trusted.origin, trusted.size + 10, trusted.root_hash)
        assert _codes(h.ctx.db, trusted=longer) == {"LOG_TRUNCATED"}
        forged = note.Checkpoint(trusted.origin, trusted.size, hashlib.sha256(b"another history").digest())
        assert _codes(h.ctx.db, trusted=forged) == {"LOG_FORKED"}
        assert _codes(h.ctx.db, trusted=forged, leaves=False) == {"LOG_FORKED"}

        # A state or a binding changed behind the log's back.
        with h.ctx.db.write() as s:
            s.execute(text("UPDATE activations SET state = 'active' WHERE id = :id"), {"id": aid_b})
            s.execute(text("UPDATE activations SET account_id = 'learner-x' WHERE id = :id"), {"id": aid_a})
        assert {"STATE_NOT_LOGGED", "REDEMPTION_NOT_LOGGED"} <= _codes(h.ctx.db)

        # A stored tree node that is not the hash of its leaves (behind the triggers' back).
        with h.ctx.db.write() as s:
            if h.ctx.db.is_sqlite:
                s.execute(text("DROP TRIGGER log_nodes_no_update"))
            else:
                s.execute(text("ALTER TABLE log_nodes DISABLE TRIGGER log_nodes_append_only"))
            s.execute(text("UPDATE log_nodes SET hash = :h WHERE level = 1 AND idx = 0"),
                      {"h": hashlib.sha256(b"x").digest()})
        codes = _codes(h.ctx.db, trusted=trusted)
        assert "LOG_TREE_MISMATCH" in codes  # proofs made of that node would not verify
        assert "EVENT_ALTERED" not in codes and "LOG_FORKED" not in codes  # the leaves still give the trusted root


def _activate(h: Harness) -> str:
    agency_id, birth = next_ledger_person()
    act = Api(h).advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="doctor"))
    return act.activation.name.split("/")[1]


def test_doctor_checks_every_funder_of_an_activation_and_every_ledger_entry(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Money consumed or released for a funder that committed nothing to the activation is spent
    beyond its commitment (the funding report shows that funder owing it); an entry of an unknown
    kind, or of no positive amount, is named."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        aid = _activate(h)
        assert doctor.check(h.ctx.db) == []
        with h.ctx.db.write() as s:  # through the ORM: the report's rollup follows, as for any booking
            assert "region-idf" not in {e.funder_id for e in s.query(LedgerEntry).filter_by(activation_id=aid)}
            s.add(LedgerEntry(activation_id=aid, program_id="premium-job-seekers", funder_id="region-idf",
                              kind="consume", month="2026-03", amount_cents=2000, created_at=h.clock.now()))
        assert [(p.code, p.detail) for p in doctor.check(h.ctx.db)] == [
            ("LEDGER_OVERSPENT", f"activations/{aid}, region-idf: consumed + released 2000 > committed 0")]

        other = _activate(h)
        with h.ctx.db.write() as s:  # written around the service: a kind it never books, a release of nothing
            for kind, cents in (("refund", 500), ("release", 0)):
                s.execute(text(
                    "INSERT INTO ledger_entries (activation_id, program_id, funder_id, kind, month, amount_cents, "
                    "created_at) VALUES (:id, 'premium-job-seekers', 'france-travail', :kind, '2026-03', :cents, "
                    ":now)"), {"id": other, "kind": kind, "cents": cents, "now": h.clock.now()})
        invalid = sorted(p.detail for p in doctor.check(h.ctx.db) if p.code == "LEDGER_ENTRY_INVALID")
        assert invalid == [f"activations/{other}, france-travail: a release entry of 0 cents",
                           f"activations/{other}, france-travail: entries of unknown kind 'refund'"]


def test_the_zero_commits_of_a_free_program_are_sound(backend: tuple[str, str], tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """An activation commits one entry per funder of its plan, 0 cents at a price of 0 (the entry
    gives the funder the activation, README "Money and jobs"): not a commitment the plan lacks."""
    programs = shutil.copytree(ROOT / "programs", tmp_path / "programs")
    premium = programs / "premium-job-seekers.yaml"
    assert premium.read_text().count("value: 2000\n") == 1
    premium.write_text(premium.read_text().replace("value: 2000\n", "value: 0\n"))
    with own_server(backend[0], tmp_path / "own", request, programs_dir=programs) as h:
        aid = _activate(h)
        with h.ctx.db.read() as s:
            assert {(e.kind, e.amount_cents) for e in s.query(LedgerEntry).filter_by(activation_id=aid)} == {
                ("commit", 0)}
        assert doctor.check(h.ctx.db) == []


def test_doctor_command_checks_a_trusted_checkpoint(fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from entitlement import logtree, merkle
    upgrade(fresh_url)
    key, other = tmp_path / "log.key", tmp_path / "other.key"
    logtree.create_key_file(key)
    logtree.create_key_file(other)
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", fresh_url)
    monkeypatch.setenv("ENTITLEMENT_LOG_KEY_FILE", str(key))
    origin = "entitlement.local/audit-log"

    def checkpoint(size: int, signed_with: Path = key) -> str:
        path = tmp_path / f"checkpoint-{size}-{signed_with.stem}.txt"
        signer = logtree.read_signer(signed_with, origin)
        path.write_text(note.sign_checkpoint(note.Checkpoint(origin, size, merkle.EMPTY_ROOT), signer))
        return str(path)

    assert cli.main(["doctor", "--trusted", checkpoint(0)]) == 0  # the empty log extends the empty tree
    assert "every invariant holds" in capsys.readouterr().out
    assert cli.main(["doctor", "--trusted", checkpoint(5)]) == 1
    assert "LOG_TRUNCATED" in capsys.readouterr().out
    assert cli.main(["doctor", "--trusted", checkpoint(0, other)]) == 1  # not signed by this log's key
    assert "--trusted" in capsys.readouterr().err


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
