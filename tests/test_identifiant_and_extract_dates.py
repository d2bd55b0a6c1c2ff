"""The agency's identifiant is one id whatever its case, and a registry extract's date is checked.

- `1234567a` and `1234567A` are one person: in an import, a check, an activation, with a live
  status source or without (entitlement.pseudonym.normalize_agency_id, the one place).
- An extract dated before the snapshot in force is refused (FAILED_PRECONDITION over gRPC, exit 1
  in the CLI): a late, older file never replaces newer data. The same date is accepted (a
  corrected re-send of that day's file).
- An extract dated after today (the service's time zone) is refused (INVALID_ARGUMENT naming
  `header.extracted_on`); the same bytes under another date are not `unchanged`; the CLI needs
  `--extracted-on`; data dated after the day decided never passes the freshness rule.
- A date that is not YYYY-MM-DD (an ISO week date `2021-W01-1` is ten characters and Python
  3.11's date.fromisoformat takes it) rejects its row, not the whole import, on both backends.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, insert, select, update

from support import TODAY, Api, Harness, date_msg, expect_error, identity, make_registry_file, next_person
from test_live_status import agency_record, serving_with_live_source

from entitlement import activation, app, cli, eligibility, jobs, live_status, registry, rules
from entitlement.callers import Caller, write_callers
from entitlement.clock import FixedClock
from entitlement.config import ROOT, Settings
from entitlement.programs import ProgramCatalog
from entitlement.pseudonym import Pseudonymizer, normalize_agency_id
from entitlement.registry import REQUIRED_COLUMNS
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.storage.models import Activation, RegistryPerson, RegistrySnapshot
from entitlement.v1 import activation_pb2, eligibility_pb2, registry_pb2

NOW = dt.datetime.combine(TODAY, dt.time(9, 30), tzinfo=dt.timezone.utc)
PSEUDO = Pseudonymizer(bytes(range(32)))
COLUMNS = ["identifiant", "nom", *REQUIRED_COLUMNS[1:]]
ADVISOR = Caller(id="advisor-paris", role="advisor", advisor_id="A0001", agency_code="75011")
PLATFORM = Caller(id="platform-oc", role="platform", platform_id="openclassrooms")
PREMIUM = "premium-job-seekers"


def _person(ident: str, birth: str = "1990-05-17", **over: str) -> dict[str, str]:
    row = {"identifiant": ident, "nom": "Test", "dateNaissance": birth, "codePostal": "75011",
           "dateInscription": "2024-01-15", "dateCessationInscription": "", "codeCategorieInscription": "1"}
    row.update(over)
    return row


def _extract(path: Path, people: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(people)
    return path


def _import(db: Database, path: Path, extracted_on: dt.date, clock: FixedClock | None = None,
            **kw: object) -> registry.ImportSummary:
    return registry.import_extract(db, PSEUDO, clock or FixedClock(NOW), path, extracted_on=extracted_on,
                                   **kw)  # type: ignore[arg-type]


def _lookup(db: Database, ident: str, birth: str = "1990-05-17") -> tuple[object, registry.SnapshotRef | None]:
    with db.read() as s:
        return registry.lookup(s.connection(), PSEUDO.person_key(ident), dt.date.fromisoformat(birth))


def _current(db: Database) -> registry.SnapshotRef | None:
    with db.read() as s:
        return registry.current_snapshot(s)


def _snapshot_count(db: Database) -> int:
    with db.read() as s:
        return int(s.execute(select(func.count()).select_from(RegistrySnapshot)).scalar_one())


def _date_stamped_wrongly(db: Database, snapshot_id: int, day: dt.date) -> None:
    """What an import before the date checks could leave: a snapshot dated in the future."""
    with db.write() as s:
        s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id == snapshot_id).values(extracted_on=day))


# ------------------------------------------------------------------------------ the one normal form

@pytest.mark.parametrize("raw, canonical", [
    ("1234567a", "1234567A"), (" 1234567A\t", "1234567A"), ("p0000001", "P0000001"), ("ABC", "ABC"),
    # Non-ASCII is left as it is (validation refuses it): str.upper would make an ASCII 'I' of 'ı'.
    ("p00000ı", "p00000ı"), ("ſ1", "ſ1"), ("", "")])
def test_normalize_agency_id(raw: str, canonical: str) -> None:
    assert normalize_agency_id(raw) == canonical


def test_a_person_key_ignores_case_and_surrounding_spaces() -> None:
    assert PSEUDO.person_key("1234567a") == PSEUDO.person_key("1234567A") == PSEUDO.person_key(" 1234567A ")
    assert PSEUDO.person_key("1234567A") != PSEUDO.person_key("1234567B")


# --------------------------------------------------------------------------- imports, both backends

def test_an_identifiant_in_lower_case_is_found_in_any_case(db: Database, tmp_path: Path) -> None:
    summary = _import(db, _extract(tmp_path / "a.csv", [
        _person("1234567a"), _person("ABC0001"), _person("abc0001", "1980-01-01")]), TODAY - dt.timedelta(days=1),
        rejects_path=tmp_path / "a.rejects.csv")
    assert (summary.rows_imported, summary.rows_rejected) == (2, 1)  # `abc0001` is `ABC0001` again
    rejects = list(csv.reader((tmp_path / "a.rejects.csv").open(encoding="utf-8", newline="")))
    assert rejects[1][0] == "4" and "duplicate" in rejects[1][1]
    for ident in ("1234567A", "1234567a", " 1234567A "):
        assert _lookup(db, ident)[0] is not None, ident
    assert _lookup(db, "abc0001")[0] is not None


@pytest.mark.parametrize("bad", ["2021-W01-1", "2021-001", "20210101", "2021-01-1٧", "２０２１-01-01",
                                 "1990-05-17T00", "1990-5-17"])
def test_a_date_that_is_not_yyyy_mm_dd_rejects_its_row_only(db: Database, tmp_path: Path, bad: str) -> None:
    """Python 3.11's date.fromisoformat takes `2021-W01-1` (ten characters): PostgreSQL's COPY
    refused it and sank the whole import; SQLite kept it as text. The row is rejected instead."""
    people = [_person("GOOD001"), _person("WEEK001", bad), _person("WEEK002", dateInscription=bad),
              _person("WEEK003", dateCessationInscription=bad), _person("GOOD002")]
    rejects = tmp_path / "rejects.csv"
    summary = _import(db, _extract(tmp_path / "w.csv", people), TODAY - dt.timedelta(days=1), rejects_path=rejects)
    assert (summary.rows_read, summary.rows_imported, summary.rows_rejected) == (5, 2, 3)
    with rejects.open(encoding="utf-8", newline="") as fh:
        reasons = {int(line): reason for line, reason in list(csv.reader(fh))[1:]}
    assert sorted(reasons) == [3, 4, 5]
    assert reasons[3].startswith("dateNaissance: expected a date YYYY-MM-DD")
    assert reasons[4].startswith("dateInscription: expected a date YYYY-MM-DD")
    assert reasons[5].startswith("dateCessationInscription: expected a date YYYY-MM-DD")
    assert _lookup(db, "GOOD001")[0] is not None and _lookup(db, "GOOD002")[0] is not None
    with db.read() as s:  # every stored date is a date (SQLite would have kept the week date as text)
        births = s.execute(select(RegistryPerson.birth_date)).scalars().all()
    assert births == [dt.date(1990, 5, 17)] * 2


def test_a_postal_code_of_other_digits_than_ascii_rejects_its_row(db: Database, tmp_path: Path) -> None:
    """`\\d` matches any script's digits: `٧٥٠١١` passed for a postal code, and no department rule
    could ever place it. Only ASCII digits are a postal code."""
    people = [_person("GOOD003"), _person("POST001", codePostal="\u0667\u0665\u0660\u0661\u0661"),
              _person("POST002", codePostal="\uff17\uff15\uff10\uff11\uff11")]
    rejects = tmp_path / "rejects.csv"
    summary = _import(db, _extract(tmp_path / "p.csv", people), TODAY - dt.timedelta(days=1), rejects_path=rejects)
    assert (summary.rows_read, summary.rows_imported, summary.rows_rejected) == (3, 1, 2)
    with rejects.open(encoding="utf-8", newline="") as fh:
        assert [r[1] for r in list(csv.reader(fh))[1:]] == ["codePostal: expected 5 digits"] * 2


def test_an_older_extract_is_refused_and_the_newer_stays_in_force(db: Database, tmp_path: Path) -> None:
    march = _import(db, _extract(tmp_path / "march.csv", [
        _person("NEW0001"), _person("OLD0001", dateCessationInscription="2026-02-15")]), dt.date(2026, 3, 15))
    snapshots = _snapshot_count(db)
    february = _extract(tmp_path / "february.csv", [_person("OLD0001"), _person("OTHER01")])
    with pytest.raises(registry.ExtractOlderThanCurrent) as info:
        _import(db, february, dt.date(2026, 2, 10))
    message = str(info.value)
    assert "2026-02-10" in message and "2026-03-15" in message and f"registrySnapshots/{march.snapshot_id}" in message
    assert isinstance(info.value, registry.ExtractError)
    assert _current(db) == registry.SnapshotRef(march.snapshot_id, dt.date(2026, 3, 15))
    assert _lookup(db, "NEW0001")[0] is not None and _lookup(db, "OTHER01")[0] is None
    assert _snapshot_count(db) == snapshots  # refused before anything was written
    # The same file of the current snapshot, under an older date: refused too (never `unchanged`).
    with pytest.raises(registry.ExtractOlderThanCurrent):
        _import(db, tmp_path / "march.csv", dt.date(2026, 3, 14))
    # A corrected file of the same day is accepted, and so is a later one.
    corrected = _import(db, _extract(tmp_path / "march-fixed.csv", [_person("NEW0001"), _person("FIX0001")]),
                        dt.date(2026, 3, 15))
    assert not corrected.unchanged and _current(db) == registry.SnapshotRef(corrected.snapshot_id, dt.date(2026, 3, 15))
    assert _lookup(db, "FIX0001")[0] is not None


def test_the_date_is_checked_again_at_the_switch(db: Database, tmp_path: Path) -> None:
    """Another process switched to a newer extract while this one was importing: this one, older,
    is refused at its switch (its rows discarded), the newer one stays in force."""
    _import(db, _extract(tmp_path / "a.csv", [_person("A1")]), TODAY - dt.timedelta(days=3))
    newer: list[int] = []

    def another_process_switches(_progress: registry.Progress) -> None:
        if newer:
            return
        with db.write() as s:
            newer.append(s.execute(insert(RegistrySnapshot).values(
                source_name="other.csv", sha256="0" * 64, extracted_on=TODAY, status="complete", started_at=NOW,
                completed_at=NOW, rows_read=0, rows_imported=0, rows_rejected=0).returning(RegistrySnapshot.id)
            ).scalar_one())

    with pytest.raises(registry.ExtractOlderThanCurrent):
        _import(db, _extract(tmp_path / "b.csv", [_person("B1")]), TODAY - dt.timedelta(days=1),
                on_progress=another_process_switches)
    assert newer and _current(db) == registry.SnapshotRef(newer[0], TODAY)
    with db.read() as s:
        statuses = dict(s.execute(select(RegistrySnapshot.source_name, RegistrySnapshot.status)).all())
        left = s.execute(select(func.count()).select_from(RegistryPerson).where(
            RegistryPerson.snapshot_id.not_in(select(RegistrySnapshot.id).where(
                RegistrySnapshot.status == "complete")))).scalar_one()
    assert statuses["b.csv"] == "failed" and left == 0


def test_an_extract_dated_in_the_future_is_refused(db: Database, tmp_path: Path) -> None:
    first = _import(db, _extract(tmp_path / "a.csv", [_person("A1")]), TODAY - dt.timedelta(days=1))
    typo = _extract(tmp_path / "typo.csv", [_person("FUT0001")])
    for day in (TODAY + dt.timedelta(days=1), dt.date(2062, 3, 15)):
        with pytest.raises(registry.ExtractDatedInFuture) as info:
            _import(db, typo, day)
        assert day.isoformat() in str(info.value) and TODAY.isoformat() in str(info.value)
    assert _current(db) == registry.SnapshotRef(first.snapshot_id, TODAY - dt.timedelta(days=1))
    # Today in the service's time zone: at 23:30 UTC on the 16th it is already the 17th in Paris.
    late = FixedClock(dt.datetime.combine(TODAY, dt.time(23, 30), tzinfo=dt.timezone.utc))
    assert late.today() == TODAY + dt.timedelta(days=1)
    assert not _import(db, typo, TODAY + dt.timedelta(days=1), clock=late).unchanged


def test_unchanged_needs_the_same_bytes_and_the_same_date(db: Database, tmp_path: Path) -> None:
    path = _extract(tmp_path / "a.csv", [_person("A1")])
    first = _import(db, path, TODAY - dt.timedelta(days=1))
    same = _import(db, path, TODAY - dt.timedelta(days=1))
    assert same.unchanged and same.snapshot_id == first.snapshot_id
    # A snapshot dated in the future by an import before these checks: the same file under the
    # right date corrects it (it is not `unchanged`, and the wrong date does not hold it back).
    _date_stamped_wrongly(db, first.snapshot_id, dt.date(2062, 3, 15))
    fixed = _import(db, path, TODAY - dt.timedelta(days=1))
    assert not fixed.unchanged and _current(db) == registry.SnapshotRef(fixed.snapshot_id, TODAY - dt.timedelta(days=1))


# --------------------------------------------------------------- the rules and the jobs, on the dates

def _context(tmp_path: Path, url: str, now: dt.datetime = NOW) -> tuple[app.Context, FixedClock]:
    settings = Settings(listen="127.0.0.1:0", database_url=url, programs_dir=ROOT / "programs",
                        callers_file=tmp_path / "callers.json", key_dir=tmp_path / "keys",
                        pseudonym_key_file=tmp_path / "pseudonym.key", issuer="urn:entitlement:test",
                        token_ttl_days=30, max_workers=2, grace_seconds=1)
    upgrade(url)
    # (and a platform: activations are made for the platform of a platform caller)
    write_callers(settings.callers_file, [ADVISOR, PLATFORM])
    clock = FixedClock(now)
    return app.build(settings, clock=clock, create_secrets=True), clock


@pytest.fixture
def context(fresh_url: str, tmp_path: Path) -> Iterator[tuple[app.Context, FixedClock]]:
    ctx, clock = _context(tmp_path, fresh_url)
    try:
        yield ctx, clock
    finally:
        ctx.db.dispose()


def _check(ctx: app.Context, ident: str, birth: str = "1990-05-17", as_of: dt.date | None = None) -> rules.Decision:
    return eligibility.check(ctx, eligibility.JobSeeker(ident, dt.date.fromisoformat(birth)), PREMIUM, as_of).decisions[0]


def test_freshness_never_passes_data_dated_after_the_day_decided() -> None:
    premium = ProgramCatalog.load(ROOT / "programs").get(PREMIUM)
    assert premium is not None
    facts = rules.PersonFacts(dt.date(1990, 5, 17), "75011", dt.date(2024, 1, 15), None, 1)
    for extracted, passed in ((TODAY, True), (TODAY - dt.timedelta(days=1), True),
                              (TODAY + dt.timedelta(days=1), False), (dt.date(2062, 3, 15), False)):
        d = rules.evaluate(premium, facts, TODAY, rules.Circumstances(registry_extracted_on=extracted))
        fresh = next(c for c in d.criteria if c.criterion == "registry_data_fresh")
        assert (fresh.passed, d.eligible) == (passed, passed), extracted
        if not passed:
            assert fresh.reason_code == "REGISTRY_DATA_STALE" and extracted.isoformat() in fresh.detail


def test_checks_in_any_case_and_a_future_dated_snapshot(context: tuple[app.Context, FixedClock],
                                                        tmp_path: Path) -> None:
    ctx, clock = context
    path = _extract(tmp_path / "c.csv", [_person("1234567A")])
    first = registry.import_extract(ctx.db, ctx.pseudo, clock, path, extracted_on=TODAY - dt.timedelta(days=1))
    assert _check(ctx, "1234567A").eligible and _check(ctx, "1234567a").eligible
    # A past day (as_of), judged on data extracted since: fresh for that day.
    assert _check(ctx, "1234567a", as_of=dt.date(2025, 6, 1)).eligible
    # A snapshot dated in the future (left by an import before the date checks): never fresh.
    _date_stamped_wrongly(ctx.db, first.snapshot_id, dt.date(2062, 3, 15))
    d = _check(ctx, "1234567A")
    assert not d.eligible and d.failed_reasons == ["REGISTRY_DATA_STALE"]
    clock.advance(dt.timedelta(days=400))
    assert _check(ctx, "1234567A").failed_reasons == ["REGISTRY_DATA_STALE"]
    clock.advance(dt.timedelta(days=-400))
    # The same file under its right date corrects it.
    registry.import_extract(ctx.db, ctx.pseudo, clock, path, extracted_on=TODAY - dt.timedelta(days=1))
    assert _check(ctx, "1234567a").eligible


def test_revalidation_rechecks_an_activation_decided_on_data_dated_in_the_future(
        context: tuple[app.Context, FixedClock], tmp_path: Path) -> None:
    """An activation decided (before the date checks) on a snapshot dated in the future is not
    `up to date` against every later extract: a later one that ends the registration curtails it."""
    ctx, clock = context
    registry.import_extract(ctx.db, ctx.pseudo, clock, _extract(tmp_path / "a.csv", [_person("REV0001")]),
                            extracted_on=TODAY - dt.timedelta(days=1))
    made = activation.activate(ctx, ADVISOR, activation.ActivateCommand(
        eligibility.JobSeeker("rev0001", dt.date(1990, 5, 17)), PREMIUM, "openclassrooms", "r", "req-rev"))
    with ctx.db.write() as s:  # as an activation decided on a snapshot stamped 2062 would be
        stored = json.loads(s.execute(select(Activation.decision_json).where(
            Activation.id == made.activation.id)).scalar_one())
        stored["decision"]["circumstances"]["registry_extracted_on"] = "2062-03-15"
        s.execute(update(Activation).where(Activation.id == made.activation.id).values(
            decision_json=json.dumps(stored)))
    clock.advance(dt.timedelta(days=35))
    registry.import_extract(ctx.db, ctx.pseudo, clock, _extract(tmp_path / "b.csv", [
        _person("REV0001", dateCessationInscription="2026-03-31"), _person("OTHER01")]),
        extracted_on=TODAY + dt.timedelta(days=34))
    summary = jobs.run_revalidation(ctx)
    assert (summary.examined, summary.up_to_date, summary.curtailed) == (1, 0, 1)


# ------------------------------------------------------------------------------ over gRPC (harness)

def _push(api: Api, data: bytes, extracted_on: dt.date) -> registry_pb2.ImportExtractResponse:
    return api.as_("agency-feed").ImportExtract(iter([
        registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
            extracted_on=date_msg(extracted_on), source_name="push.csv")),
        registry_pb2.ImportExtractRequest(chunk=data)]))


def _snapshot_in_force(api: Api) -> str:
    [d] = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity("IDF0001", "2000-01-01"), program=f"programs/{PREMIUM}")).decisions
    return str(d.registry_snapshot)


def test_a_push_dated_in_the_future_is_invalid_argument(api: Api, tmp_path: Path) -> None:
    before = _snapshot_in_force(api)
    data = make_registry_file(tmp_path / "r.csv").read_bytes()
    tomorrow = api.h.clock.today() + dt.timedelta(days=1)
    f = expect_error(lambda r: _push(api, data, r), tomorrow, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(f.fields) == {"header.extracted_on"}
    assert tomorrow.isoformat() in f.fields["header.extracted_on"]
    assert "Europe/Paris" in f.fields["header.extracted_on"]
    assert _snapshot_in_force(api) == before


def test_a_push_older_than_the_snapshot_in_force_is_failed_precondition(api: Api, tmp_path: Path) -> None:
    before = _snapshot_in_force(api)
    with api.h.ctx.db.read() as s:
        current = registry.current_snapshot(s)
    assert current is not None and current.name == before
    data = make_registry_file(tmp_path / "r.csv").read_bytes()
    older = current.extracted_on - dt.timedelta(days=30)
    f = expect_error(lambda r: _push(api, data, r), older, grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "EXTRACT_OLDER_THAN_CURRENT"
    assert older.isoformat() in f.message and current.extracted_on.isoformat() in f.message
    assert {k: v for k, v in f.metadata.items() if k != "request_id"} == {
        "extracted_on": older.isoformat(), "current_snapshot": current.name,
        "current_extracted_on": current.extracted_on.isoformat()}
    assert _snapshot_in_force(api) == before


def test_a_lower_case_identifiant_is_checked_and_activated_as_one_person(api: Api) -> None:
    agency_id, birth = next_person()
    [d] = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id.lower(), birth), program=f"programs/{PREMIUM}")).decisions
    assert d.eligible
    first = api.activate(agency_id, birth).activation
    for variant in (agency_id.lower(), f" {agency_id.lower()} "):
        f = expect_error(lambda _r, v=variant: api.activate(v, birth), None, grpc.StatusCode.ALREADY_EXISTS)
        assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == first.name
    # Not letters and digits once trimmed: still refused at the edge.
    for bad in ("p00 01", "   ", "p00000ı"):
        f = expect_error(api.advisor.CheckEligibility, eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity(bad, birth), program=f"programs/{PREMIUM}"), grpc.StatusCode.INVALID_ARGUMENT)
        assert set(f.fields) == {"job_seeker.agency_id"}


def test_with_a_live_source_the_two_cases_are_one_activation(harness: Harness) -> None:
    with serving_with_live_source(harness) as live:
        agency_id, birth = next_person()
        live.agency.people[agency_id] = agency_record(agency_id, birth)  # the agency knows the canonical id only
        assert live.check(agency_id.lower(), birth).facts_source == "live"
        assert live.check(agency_id.lower(), birth).eligible
        assert {q["identifiant"] for _path, q, _auth in live.agency.seen} == {agency_id}  # asked canonically

        def activate(ident: str) -> activation_pb2.ActivateEntitlementResponse:
            return live.advisor().ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(ident, birth), program=f"programs/{PREMIUM}",
                platform="platforms/openclassrooms", reason="r"))
        first = activate(agency_id).activation
        f = expect_error(lambda _r: activate(agency_id.lower()), None, grpc.StatusCode.ALREADY_EXISTS)
        assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == first.name


def test_the_live_answer_must_name_the_canonical_identifiant() -> None:
    def answer(ident: str) -> bytes:
        return json.dumps(agency_record(ident, "1990-05-17")).encode()
    birth = dt.date(1990, 5, 17)
    assert live_status._parse(answer("1234567A"), "1234567a", birth) is not None
    assert live_status._parse(answer("1234567a"), "1234567A", birth) is not None
    for other, asked in (("1234567B", "1234567A"), ("1234567Aı", "1234567AI")):
        with pytest.raises(live_status.LiveStatusUnavailable) as info:  # no answer about the one asked
            live_status._parse(answer(other), asked, birth)
        assert info.value.reason == "mismatch"


# ------------------------------------------------------------------------------------------ the CLI

@pytest.fixture
def cli_env(fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    upgrade(fresh_url)
    key = tmp_path / "pseudonym.key"
    Pseudonymizer.from_file(key, create=True)
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", fresh_url)
    monkeypatch.setenv("ENTITLEMENT_PSEUDONYM_KEY_FILE", str(key))
    db = Database(fresh_url, pool_size=1)
    try:
        yield db
    finally:
        db.dispose()


def test_the_cli_needs_the_extraction_date_and_checks_it(cli_env: Database, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from entitlement.clock import SystemClock
    today = SystemClock().today()  # the CLI's clock: the real one, in Europe/Paris
    path = str(_extract(tmp_path / "a.csv", [_person("CLI0001")]))
    with pytest.raises(SystemExit) as exited:  # no default of today: a stale file would pass for fresh
        cli.main(["registry", "import", path, "--quiet"])
    assert exited.value.code == 2 and "--extracted-on" in capsys.readouterr().err
    for bad in ("2026-W11-1", "20260315", "yesterday"):
        assert cli.main(["registry", "import", path, "--quiet", "--extracted-on", bad]) == 1
        assert "--extracted-on: expected a date YYYY-MM-DD" in capsys.readouterr().err
    tomorrow = (today + dt.timedelta(days=1)).isoformat()
    assert cli.main(["registry", "import", path, "--quiet", "--extracted-on", tomorrow]) == 1
    err = capsys.readouterr().err
    assert tomorrow in err and "after today" in err and "Europe/Paris" in err
    assert _current(cli_env) is None

    # A file that is not there, or a directory: one line and exit 1, no traceback.
    for missing in (str(tmp_path / "nowhere.csv"), str(tmp_path)):
        assert cli.main(["registry", "import", missing, "--quiet", "--extracted-on", today.isoformat()]) == 1
        err = capsys.readouterr().err
        assert err.startswith("entitlement: import refused") and "Traceback" not in err and missing in err, err

    assert cli.main(["registry", "import", path, "--quiet", "--extracted-on", today.isoformat()]) == 0
    assert "snapshot" in capsys.readouterr().out
    older = (today - dt.timedelta(days=40)).isoformat()
    assert cli.main(["registry", "import", path, "--quiet", "--extracted-on", older]) == 1
    err = capsys.readouterr().err
    assert older in err and today.isoformat() in err and "previous snapshot still in force" in err
    current = _current(cli_env)
    assert current is not None and current.extracted_on == today
    assert cli.main(["registry", "import", path, "--quiet", "--extracted-on", today.isoformat()]) == 0
    assert "unchanged" in capsys.readouterr().out


def test_reviewers_case_snapshot_only(context: tuple[app.Context, FixedClock], tmp_path: Path) -> None:
    """Registry row `1234567A`; checking `1234567a` answered NOT_REGISTERED."""
    ctx, clock = context
    ctx = dataclasses.replace(ctx, live=None)
    registry.import_extract(ctx.db, ctx.pseudo, clock, _extract(tmp_path / "c.csv", [_person("1234567A")]),
                            extracted_on=TODAY - dt.timedelta(days=1))
    d = _check(ctx, "1234567a")
    assert d.eligible, d.failed_reasons
