"""Privacy, on both backends.

1. A representative traffic mix (checks, activations, transitions, redeem, verify, usage reports, a
   registry push, the change stream, funding reports and event lists) through the real server
   process (server.py, logs at debug level on stderr as in production), then every log line and
   every answer sent to a funder is scanned for the synthetic people's identifiants, birth dates
   (in any usual spelling, and as google.type.Date values) and postal codes: zero hits.
2. Retention: `entitlement privacy purge` deletes the personal data older than the period (the rows
   of old registry snapshots, ended activations' account ids and decision details, old idempotency
   records) and the audit log keeps its pseudonyms; an ended activation whose money is still
   reserved for a usage report keeps its account until the report comes or its window closes.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from google.type import date_pb2
from sqlalchemy import event, func, select, text

from own_server import default_people, next_ledger_person, on_day, own_server
from support import TODAY, Api, As, date_msg, identity, sqlite_writer_sees
from test_server_ops import Server, prepare

from entitlement import cli, jobs, privacy, registry
from entitlement.changes import encode_cursor
from entitlement.clock import SystemClock
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.models import (Activation, Event, IdempotencyRecord, LedgerEntry, RegistryPerson,
                                        RegistrySnapshot)
from entitlement.synthetic import COLUMNS
from entitlement.v1 import (activation_pb2, audit_pb2, eligibility_pb2, registry_pb2, registry_pb2_grpc)

# identifiant -> (birth date, postal code, registered on, ended on, category): distinctive values
# that appear nowhere else (no agency code, date or amount of the service looks like them).
PEOPLE = {
    "PRIVA0001": ("1996-04-23", "92347", "2024-02-01", "", "1"),
    "PRIVA0002": ("1997-11-08", "94813", "2024-02-01", "", "2"),
    "PRIVA0003": ("1998-06-19", "77512", "2024-02-01", "", "1"),
    "PRIVA0004": ("1995-09-27", "91263", "2024-02-01", "", "1"),
    "PRIVA0005": ("1999-01-31", "78941", "2024-02-01", "", "1"),
    "PRIVA0006": ("2004-03-14", "93287", "2024-02-01", "", "1"),  # under 26, Île-de-France: opencfa too
    "PRIVA0007": ("1994-12-05", "95431", "2020-01-06", "2025-01-31", "1"),  # registration ended
    "PRIVA0008": ("1993-07-16", "13572", "2021-03-01", "", "6"),  # category not covered
    "PRIVA0009": ("1992-02-22", "69384", "2024-02-01", "", "1"),
}
NOT_REGISTERED = ("PRIVZ0404", "1991-10-10")  # asked about, not in the registry
BAD_ROW_ID = "PRIVX0001"  # a rejected row of a pushed extract


def spellings(iso: str) -> list[str]:
    d = dt.date.fromisoformat(iso)
    return [iso, d.strftime("%d/%m/%Y"), d.strftime("%Y%m%d"), d.strftime("%d-%m-%Y"), d.strftime("%d.%m.%Y")]


def needles() -> list[tuple[str, re.Pattern[str]]]:
    out: list[tuple[str, re.Pattern[str]]] = []
    people = {**{k: v[:2] for k, v in PEOPLE.items()}, NOT_REGISTERED[0]: (NOT_REGISTERED[1], "")}
    for ident, (birth, postal) in people.items():
        out.append((ident, re.compile(re.escape(ident), re.IGNORECASE)))
        for s in spellings(birth):
            out.append((f"{ident} birth {s}", re.compile(re.escape(s))))
        if postal:
            out.append((f"{ident} postal {postal}", re.compile(rf"(?<![0-9A-Za-z.]){postal}(?![0-9A-Za-z])")))
    out.append((BAD_ROW_ID, re.compile(BAD_ROW_ID, re.IGNORECASE)))
    return out


BIRTHS = {dt.date.fromisoformat(v[0]) for v in PEOPLE.values()} | {dt.date.fromisoformat(NOT_REGISTERED[1])}


def hits(text: str) -> list[str]:
    return [name for name, pattern in needles() if pattern.search(text)]


def dates_in(msg: Message) -> Iterator[dt.date]:
    """Every google.type.Date value inside a message."""
    if isinstance(msg, date_pb2.Date):
        if msg.year and msg.month and msg.day:
            yield dt.date(msg.year, msg.month, msg.day)
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.is_repeated:
            if fd.message_type.GetOptions().map_entry:
                continue
            for item in value:
                yield from dates_in(item)
        else:
            yield from dates_in(value)


def write_registry(path: Path, people: dict[str, tuple[str, str, str, str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for ident, (birth, postal, reg, end, cat) in people.items():
            w.writerow({"identifiant": ident, "nom": "Privé", "prenom": "Personne", "dateNaissance": birth,
                        "codePostal": postal, "dateInscription": reg, "dateCessationInscription": end,
                        "codeCategorieInscription": cat})
    return path


class Traffic:
    """Calls as the test callers; keeps every answer (or error) sent to a funder."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.funder_answers: list[str] = []
        self.funder_messages: list[Message] = []

    def as_(self, caller: str) -> As:
        return As(self.server.channel, self.server.dir.tokens[caller])

    def funder(self, caller: str, method: str, request: Message) -> Any:
        try:
            resp = getattr(self.as_(caller), method)(request)
        except grpc.RpcError as err:
            self.funder_answers.append(f"{err.code().name} {err.details()} {err.trailing_metadata()}")
            return None
        self.funder_messages.append(resp)
        self.funder_answers.append(text_format.MessageToString(resp, as_utf8=True))
        return resp

    def maybe(self, fn: Any, request: Message) -> Any:
        try:
            return fn(request)
        except grpc.RpcError as err:
            return err


def run_traffic(t: Traffic, registry_file: Path) -> None:
    adv, lyon, plat, other = (t.as_(c) for c in ("advisor-paris", "advisor-lyon", "platform-oc", "platform-other"))
    premium, cfa = "programs/premium-job-seekers", "programs/opencfa-apprentices"

    def who(ident: str) -> Any:
        return identity(ident, PEOPLE[ident][0])

    # Checks: eligible, not eligible for several reasons, unknown, wrong birth date, a past date.
    for ident in PEOPLE:
        adv.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(job_seeker=who(ident)))
    adv.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(*NOT_REGISTERED)))
    adv.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity("PRIVA0001", "1996-04-24"), program=premium))
    adv.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=who("PRIVA0006"), program=cfa, mentor_id="T-77"))
    t.maybe(adv.CheckEligibility, eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity("PRIVA0001!", "1996-04-23")))  # invalid: echoed nowhere
    # Activations, one refused, one retried with its request id.
    made = {}
    for ident, advisor, platform in (("PRIVA0001", adv, "openclassrooms"), ("PRIVA0002", adv, "openclassrooms"),
                                     ("PRIVA0003", lyon, "otherplatform"), ("PRIVA0004", adv, "openclassrooms"),
                                     ("PRIVA0005", lyon, "openclassrooms"), ("PRIVA0009", adv, "openclassrooms")):
        request = activation_pb2.ActivateEntitlementRequest(
            request_id=uuid.uuid4().hex, job_seeker=who(ident), program=premium, platform=f"platforms/{platform}",
            reason="traffic mix")
        made[ident] = advisor.ActivateEntitlement(request)
        advisor.ActivateEntitlement(request)  # replayed
    made["PRIVA0006"] = adv.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=who("PRIVA0006"), program=cfa, platform="platforms/openclassrooms", reason="apprentice",
        mentor_id="T-77"))
    for ident in ("PRIVA0007", "PRIVA0008"):
        t.maybe(adv.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
            job_seeker=who(ident), program=premium, platform="platforms/openclassrooms"))
    t.maybe(adv.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=who("PRIVA0001"), program=premium, platform="platforms/openclassrooms"))  # already exists
    # Redeem, verify, transitions, usage.
    for n, ident in enumerate(("PRIVA0001", "PRIVA0002", "PRIVA0004", "PRIVA0005", "PRIVA0006", "PRIVA0009")):
        plat.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=made[ident].activation_token, account_id=f"learner-{n}"))
    other.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=made["PRIVA0003"].activation_token, account_id="other-learner"))
    t.maybe(plat.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
        token=made["PRIVA0001"].activation_token, account_id="learner-0"))  # replay
    name = made["PRIVA0002"].activation.name
    adv.SuspendActivation(activation_pb2.TransitionActivationRequest(name=name, reason="paused"))
    adv.ResumeActivation(activation_pb2.TransitionActivationRequest(name=name, reason="back"))
    adv.RevokeActivation(activation_pb2.TransitionActivationRequest(
        name=made["PRIVA0004"].activation.name, reason="left the program"))
    t.maybe(lyon.GetActivation, activation_pb2.GetActivationRequest(name=name))  # out of scope
    adv.GetActivation(activation_pb2.GetActivationRequest(name=name))
    for n in range(6):
        plat.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=f"learner-{n}"))
    month = dt.date.today().strftime("%Y-%m")
    plat.ReportUsage(activation_pb2.ReportUsageRequest(account_id="learner-4", month=month, used=True))
    t.maybe(plat.ReportUsage, activation_pb2.ReportUsageRequest(account_id="other-learner", month=month, used=True))
    call = plat.WatchEntitlementChanges(activation_pb2.WatchEntitlementChangesRequest(cursor=encode_cursor(0)),
                                        timeout=1.0)
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass
    # The agency pushes the extract again (data confirmed a day later), with one bad row.
    bad = {"identifiant": BAD_ROW_ID, "nom": "Bad", "prenom": "Row", "dateNaissance": "1996-02-30",
           "codePostal": "92347", "dateInscription": "2024-02-01", "codeCategorieInscription": "1"}
    data = registry_file.read_bytes() + (",".join(bad.get(c, "") for c in COLUMNS) + "\n").encode()
    header = registry_pb2.ExtractHeader(extracted_on=date_msg(SystemClock().today()), source_name="push.csv",
                                        sha256=hashlib.sha256(data).hexdigest())
    registry_pb2_grpc.RegistryServiceStub(t.server.channel).ImportExtract(
        iter([registry_pb2.ImportExtractRequest(header=header), registry_pb2.ImportExtractRequest(chunk=data)]),
        metadata=(("authorization", f"Bearer {t.server.dir.tokens['agency-feed']}"),), timeout=30)
    adv.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(job_seeker=who("PRIVA0009")))
    # Funders: everything they can ask, in and out of their scope.
    for funder in ("funder-ministry", "funder-ft", "funder-idf"):
        t.funder(funder, "ListActivations", audit_pb2.ListActivationsRequest(page_size=500))
        t.funder(funder, "ListActivations", audit_pb2.ListActivationsRequest(program=cfa))
        t.funder(funder, "ListActivations", audit_pb2.ListActivationsRequest(agency_code="75011"))
        t.funder(funder, "GetFundingReport", audit_pb2.GetFundingReportRequest())
        t.funder(funder, "GetFundingReport", audit_pb2.GetFundingReportRequest(funder="region-idf"))
        t.funder(funder, "ListEvents", audit_pb2.ListEventsRequest(page_size=1000))
        t.funder(funder, "ListPrograms", eligibility_pb2.ListProgramsRequest())
        t.funder(funder, "GetSigningKeys", activation_pb2.GetSigningKeysRequest())
        t.funder(funder, "CheckEligibility", eligibility_pb2.CheckEligibilityRequest(job_seeker=who("PRIVA0001")))
    # The admin's view of the same, kept to the same standard.
    t.funder("admin", "ListActivations", audit_pb2.ListActivationsRequest(page_size=500))
    t.funder("admin", "ListEvents", audit_pb2.ListEventsRequest(page_size=1000))


@pytest.fixture(params=["sqlite", "postgres"])
def traffic_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    url, pg_name = None, None
    if request.param == "postgres":
        from conftest import create_pg_database
        pg_name, url = create_pg_database(request.getfixturevalue("pg_server"))
    d = prepare(tmp_path / "srv", url, with_registry=False)
    d.extra_env["ENTITLEMENT_LOG_LEVEL"] = "debug"
    extract = write_registry(tmp_path / "registry.csv", PEOPLE)
    db = Database(d.database_url, pool_size=1)
    try:
        registry.import_extract(db, Pseudonymizer.from_file(d.pseudonym_key_file), SystemClock(), extract,
                                extracted_on=SystemClock().today() - dt.timedelta(days=1))
    finally:
        db.dispose()
    server = Server(d)
    try:
        yield server, extract
    finally:
        server.close()
        if pg_name:
            from conftest import drop_pg_database
            drop_pg_database(request.getfixturevalue("pg_server"), pg_name)


def test_no_personal_data_in_logs_or_funder_answers(traffic_server: tuple[Server, Path]) -> None:
    server, extract = traffic_server
    t = Traffic(server)
    run_traffic(t, extract)
    log = server.stderr()
    lines = [line for line in log.splitlines() if line.strip()]
    rpc = [x for x in server.dir.log_lines() if x.get("event") == "rpc"]
    assert len(rpc) >= 80, "the traffic was logged"
    assert {x["code"] for x in rpc} >= {"OK", "FAILED_PRECONDITION", "ALREADY_EXISTS", "PERMISSION_DENIED",
                                       "NOT_FOUND", "INVALID_ARGUMENT"}
    found = {(name, line[:200]) for line in lines for name in hits(line)}
    assert not found, f"personal data in the logs: {sorted(found)[:10]}"
    assert len(t.funder_answers) >= 25 and any("activations/" in a for a in t.funder_answers)
    found = {(name, answer[:200]) for answer in t.funder_answers for name in hits(answer)}
    assert not found, f"personal data sent to funders: {sorted(found)[:10]}"
    dates = {d for m in t.funder_messages for d in dates_in(m)}
    assert dates and not dates & BIRTHS, "a birth date as a google.type.Date in a funder's answer"
    # The scan can fail: it finds each kind of value, whatever its spelling.
    assert hits("dateNaissance=23/04/1996 codePostal=92347 id=priva0001") == [
        "PRIVA0001", "PRIVA0001 birth 23/04/1996", "PRIVA0001 postal 92347"]


def test_a_database_error_no_handler_expected_logs_no_row_values(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        server_log: tuple[Path, Any]) -> None:
    """PostgreSQL's message for a constraint violation quotes the row ("DETAIL: Key (...)=(...)
    already exists."): the traceback of an error that escapes every handler (INTERNAL) is logged
    without it. A unique index the service does not have makes the second activation with the same
    reason fail past its retries."""
    secret = "reason-" + uuid.uuid4().hex
    with own_server(backend[0], tmp_path / "srv", request) as h:
        with h.ctx.db.engine.begin() as conn:
            conn.exec_driver_sql("CREATE UNIQUE INDEX test_one_per_reason ON activations (state_reason)")
        adv = As(h.channel, h.tokens["advisor-paris"])

        def activate(ident: str, birth: dt.date) -> Any:
            return adv.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(ident, birth), program="programs/premium-job-seekers",
                platform="platforms/openclassrooms", reason=secret))
        activate(*next_ledger_person())
        with pytest.raises(grpc.RpcError) as info:
            activate(*next_ledger_person())
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert secret not in (info.value.details() or "")
    path, stream = server_log
    stream.flush()
    lines = path.read_text().splitlines()
    # The index's name (PostgreSQL) or its column (SQLite, whose message quotes no value) names it.
    failure = [json.loads(x) for x in lines if "test_one_per_reason" in x or "activations.state_reason" in x]
    assert failure and {x["event"] for x in failure} == {"unhandled_exception"}, failure  # (one per backend run)
    assert not [x for x in lines if secret in x], "a row value reached the log"


# ------------------------------------------------------------------------------------ retention

def test_purge_deletes_personal_data_past_the_retention_period(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    people = {f"R{i:07d}": ((dt.date(1990, 1, 1) + dt.timedelta(days=i)).isoformat(), "75011", "2024-01-15", "", "1")
              for i in range(1, 21)}
    with own_server(backend[0], tmp_path / "srv", request, people=people) as h:
        adv = As(h.channel, h.tokens["advisor-paris"])
        plat = As(h.channel, h.tokens["platform-oc"])
        names = []
        for i in range(1, 5):
            ident, (birth, *_rest) = f"R{i:07d}", people[f"R{i:07d}"]
            made = adv.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                request_id=uuid.uuid4().hex, job_seeker=identity(ident, birth),
                program="programs/premium-job-seekers", platform="platforms/openclassrooms", reason="retention"))
            plat.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
                token=made.activation_token, account_id=f"ret-{i}"))
            names.append(made.activation.name)
        for name in names[:2]:  # two end now; two stay live
            adv.RevokeActivation(activation_pb2.TransitionActivationRequest(name=name, reason="ended"))
        # A newer extract: the first snapshot is no longer in force (its rows are kept, the previous one).
        with on_day(h, TODAY + dt.timedelta(days=30)):
            registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, tmp_path / "srv" / "registry.csv",
                                    extracted_on=TODAY + dt.timedelta(days=29))
        admin = As(h.channel, h.tokens["admin"])
        before = {a.name: a for a in admin.ListActivations(audit_pb2.ListActivationsRequest()).activations}
        events_before = list(admin.ListEvents(audit_pb2.ListEventsRequest(page_size=1000)).events)
        db = h.ctx.db

        def counts() -> dict[str, int]:
            with db.read() as s:
                return {
                    "rows": int(s.execute(select(func.count()).select_from(RegistryPerson)).scalar_one()),
                    "idem": int(s.execute(select(func.count()).select_from(IdempotencyRecord)).scalar_one()),
                    "accounts": int(s.execute(select(func.count()).select_from(Activation).where(
                        Activation.account_id.is_not(None))).scalar_one()),
                }
        assert counts() == {"rows": 40, "idem": 4, "accounts": 4}

        # Within the period nothing goes.
        summary = privacy.purge(db, now=h.clock.now() + dt.timedelta(days=100), retention_days=1095, actor="operator:t")
        assert not summary.anything and counts() == {"rows": 40, "idem": 4, "accounts": 4}
        # The command, counting only (its clock is the real one: a period of one day covers it all).
        monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", h.url)
        capsys.readouterr()
        assert cli.main(["privacy", "purge", "--dry-run", "--retention-days", "0"]) == 1  # named, before any work
        out = capsys.readouterr()
        assert out.err.startswith("entitlement: --retention-days must be at least 1") and not out.out, out
        assert cli.main(["privacy", "purge", "--dry-run", "--retention-days", "1"]) == 0
        out = capsys.readouterr().out
        assert "would delete the rows of 1 registry snapshot(s) (20 rows), 4 idempotency record(s)" in out
        assert "would scrub 2 ended activation(s)" in out
        assert "kept 0 ended activation(s) whose ledger still holds reserved money" in out
        assert counts() == {"rows": 40, "idem": 4, "accounts": 4}

        later = h.clock.now() + dt.timedelta(days=1095 + 31)
        summary = privacy.purge(db, now=later, retention_days=1095, actor="operator:dpo")
        assert (summary.registry_snapshots, summary.registry_rows, summary.activations_scrubbed,
                summary.idempotency_records) == (1, 20, 2, 4)
        assert counts() == {"rows": 20, "idem": 0, "accounts": 2}
        with db.read() as s:
            snaps = dict(s.execute(select(RegistrySnapshot.id, RegistrySnapshot.status)).all())
            scrubbed = s.execute(select(Activation).where(Activation.account_id.is_(None))).scalars().all()
        assert sorted(snaps.values()) == ["complete", "superseded"]  # the records stay
        assert {f"activations/{a.id}" for a in scrubbed} == set(names[:2])
        for a in scrubbed:
            stored = json.loads(a.decision_json)
            assert stored["purged"] and all(c[3] == "" for c in stored["decision"]["criteria"])
        # The snapshot in force still answers (on a day not before its extraction date: data dated
        # after the day decided is never fresh); the live activations are untouched.
        with on_day(h, TODAY + dt.timedelta(days=30)):
            assert As(h.channel, h.tokens["advisor-paris"]).CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                job_seeker=identity("R0000010", people["R0000010"][0]), program="programs/premium-job-seekers")
            ).decisions[0].eligible
        assert plat.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id="ret-3")).active
        assert not plat.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id="ret-1")).activation
        # The audit log keeps its pseudonyms: same events, same job_seeker_ref, plus the purge's own.
        after = {a.name: a for a in admin.ListActivations(audit_pb2.ListActivationsRequest()).activations}
        assert {n: a.job_seeker_ref for n, a in after.items()} == {n: a.job_seeker_ref for n, a in before.items()}
        events_after = list(admin.ListEvents(audit_pb2.ListEventsRequest(page_size=1000)).events)
        assert events_after[:len(events_before)] == events_before
        assert [e.type for e in events_after[len(events_before):]] == ["privacy.purged"]
        assert json.loads(events_after[-1].payload_json)["registry_rows"] == 20
        # Running it again finds nothing more, and says nothing more.
        assert not privacy.purge(db, now=later, retention_days=1095, actor="operator:dpo").anything
        with db.read() as s:
            assert s.execute(select(func.count()).select_from(Event).where(
                Event.type == "privacy.purged")).scalar_one() == 1


def test_purge_keeps_an_activation_whose_use_may_still_be_reported_bound_to_its_account(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """OpenCFA (`funders_owe: use`, reports until 31 days after a month ends). Two activations
    revoked today keep their first month (16 March - 15 April) reserved until the platform reports
    it, until 16 May. A purge with a short retention (any value >= 1 is accepted) two days later
    unbound them: the report of a month really used was then NOT_FOUND, and the funders were never
    billed for it (found by a review). Now they are kept; each is scrubbed by the first purge after
    its money is settled: by the report for one, by the settlement's release once the window
    closed for the other."""
    with own_server(backend[0], tmp_path / "srv", request) as h:
        adv = As(h.channel, h.tokens["advisor-paris"])
        plat = As(h.channel, h.tokens["platform-oc"])
        names = {}
        for account in ("cfa-reported", "cfa-silent"):
            ident, birth = next_ledger_person()
            made = adv.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(ident, birth), program="programs/opencfa-apprentices",
                platform="platforms/openclassrooms", reason="apprentice", mentor_id="T-1"))
            plat.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
                token=made.activation_token, account_id=account))
            adv.RevokeActivation(activation_pb2.TransitionActivationRequest(name=made.activation.name, reason="left"))
            names[account] = made.activation.name.split("/")[1]
        db = h.ctx.db

        def bound() -> set[str]:
            with db.read() as s:
                return set(s.execute(select(Activation.account_id).where(Activation.id.in_(list(names.values())),
                                                                         Activation.account_id.is_not(None))).scalars())

        def purge() -> privacy.PurgeSummary:
            return privacy.purge(db, now=h.clock.now(), retention_days=1, actor="operator:dpo")

        with on_day(h, TODAY + dt.timedelta(days=2)):
            summary = purge()
            try:
                plat.ReportUsage(activation_pb2.ReportUsageRequest(
                    account_id="cfa-reported", month=TODAY.strftime("%Y-%m"), used=True))
            except grpc.RpcError as err:
                pytest.fail(f"the use of {TODAY:%Y-%m}, within its report window, refused after the purge: "
                            f"{err.code().name} {err.details()}")
            assert bound() == {"cfa-reported", "cfa-silent"}
            assert (summary.activations_scrubbed, summary.activations_kept) == (0, 2), summary
            with db.read() as s:
                consumed = s.execute(select(func.count()).select_from(LedgerEntry).where(
                    LedgerEntry.activation_id == names["cfa-reported"], LedgerEntry.kind == "consume")).scalar_one()
            assert consumed > 0, "the month reported used was not consumed"
            # Its month consumed, nothing of it is reserved any more: the next purge scrubs it.
            summary = purge()
            assert (summary.activations_scrubbed, summary.activations_kept) == (1, 1), summary
            assert bound() == {"cfa-silent"}
        with on_day(h, TODAY + dt.timedelta(days=61)):  # 16 May: the last day its use may be reported
            assert (purge().activations_scrubbed, bound()) == (0, {"cfa-silent"})
        with on_day(h, TODAY + dt.timedelta(days=62)):  # the window closed, but nothing released yet
            assert purge().activations_kept == 1
            assert jobs.run_settlement(h.ctx).released_cents > 0
            summary = purge()
            assert (summary.activations_scrubbed, summary.activations_kept) == (1, 0), summary
            assert bound() == set()


def test_purge_takes_what_ended_or_was_extracted_before_the_cutoff_day_not_on_it(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The cutoff day is the first day kept: a superseded snapshot extracted on it keeps its rows,
    and an expired activation whose end date is that day (its last day of access) stays bound; the
    day after, both go."""
    with own_server(backend[0], tmp_path / "srv", request) as h:
        adv = As(h.channel, h.tokens["advisor-paris"])
        plat = As(h.channel, h.tokens["platform-oc"])
        ident, birth = next_ledger_person()
        made = adv.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(ident, birth), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="retention boundary"))
        plat.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=made.activation_token, account_id="ret-boundary"))
        end = dt.date(made.activation.end_date.year, made.activation.end_date.month, made.activation.end_date.day)
        first_extract = TODAY - dt.timedelta(days=1)  # the own server's first snapshot
        with on_day(h, TODAY + dt.timedelta(days=30)):  # a newer extract: the first one is superseded
            registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, tmp_path / "srv" / "registry.csv",
                                    extracted_on=TODAY + dt.timedelta(days=29))
        with on_day(h, end + dt.timedelta(days=1)):
            assert jobs.run_settlement(h.ctx).expired == 1
        db = h.ctx.db

        def purge(cutoff_day: dt.date) -> privacy.PurgeSummary:
            now = dt.datetime.combine(cutoff_day + dt.timedelta(days=1095), dt.time(10), tzinfo=dt.timezone.utc)
            summary = privacy.purge(db, now=now, retention_days=1095, actor="operator:dpo")
            assert dt.datetime.fromisoformat(summary.cutoff).date() == cutoff_day
            return summary

        def bound() -> bool:
            with db.read() as s:
                return s.execute(select(Activation.account_id).where(
                    Activation.id == made.activation.name.split("/")[1])).scalar_one() == "ret-boundary"

        assert purge(first_extract).registry_rows == 0
        assert purge(first_extract + dt.timedelta(days=1)).registry_rows > 0
        summary = purge(end)
        assert summary.activations_scrubbed == 0 and bound(), summary
        summary = purge(end + dt.timedelta(days=1))
        assert summary.activations_scrubbed == 1 and not bound(), summary


def test_a_slice_that_deletes_only_some_of_a_snapshots_rows_is_logged(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every deletion is logged by the transaction that made it: with nothing else to purge, each
    slice of an old snapshot's rows appends its `privacy.purged` event, those before the last
    (which empties the snapshot) included; the events' counts add up to the rows there were."""
    monkeypatch.setattr(privacy, "ROWS_SLICE", 10)
    monkeypatch.setattr(privacy, "PURGE_PAUSE_S", 0.01)
    people = {f"S{i:07d}": ((dt.date(1990, 1, 1) + dt.timedelta(days=i)).isoformat(), "75011", "2024-01-15", "", "1")
              for i in range(1, 26)}
    with own_server(backend[0], tmp_path / "srv", request, people=people) as h:
        with on_day(h, TODAY + dt.timedelta(days=30)):  # a newer extract: the first one is superseded
            registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, tmp_path / "srv" / "registry.csv",
                                    extracted_on=TODAY + dt.timedelta(days=29))
        summary = privacy.purge(h.ctx.db, now=h.clock.now() + dt.timedelta(days=1095 + 31), retention_days=1095,
                                actor="operator:dpo")
        assert (summary.registry_snapshots, summary.registry_rows, summary.activations_scrubbed,
                summary.idempotency_records) == (1, 25, 0, 0), summary
        with h.ctx.db.read() as s:
            payloads = [json.loads(p) for p in s.execute(select(Event.payload_json).where(
                Event.type == "privacy.purged").order_by(Event.seq)).scalars()]
        assert [(p["registry_rows"], p["registry_snapshots"]) for p in payloads] == [(10, 0), (10, 0), (5, 1)]


def test_a_funder_never_sees_the_learners_platform_account(api: Api) -> None:
    """The platform account a token was redeemed for is the learner's id on the platform: personal
    data the funders' audit has no use for. A funder's ListActivations shows that and when it was
    redeemed, not for whom; an admin sees the account."""
    r = api.activate(reason="account privacy")
    account = f"learner-{uuid.uuid4().hex[:12]}"
    api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=r.activation_token, account_id=account))

    def listed(caller: str) -> activation_pb2.Activation:
        token = ""
        while True:
            page = api.as_(caller).ListActivations(audit_pb2.ListActivationsRequest(page_size=500, page_token=token))
            for a in page.activations:
                if a.name == r.activation.name:
                    return a
            token = page.next_page_token
            assert token, f"{r.activation.name} not listed to {caller}"

    for funder in ("funder-ministry", "funder-ft"):
        a = listed(funder)
        assert a.account_id == "" and a.HasField("redeem_time"), funder
        assert account.encode() not in api.as_(funder).ListActivations(
            audit_pb2.ListActivationsRequest(page_size=500)).SerializeToString()
    assert listed("admin").account_id == account


def _purge_fixture(h: Any) -> tuple[list[str], dt.datetime]:
    """Two activations redeemed and revoked (with their idempotency records), and the instant a
    purge with a retention of one day finds them all past it."""
    adv = As(h.channel, h.tokens["advisor-paris"])
    plat = As(h.channel, h.tokens["platform-oc"])
    names = []
    for n in range(2):
        ident, birth = next_ledger_person()
        made = adv.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            request_id=uuid.uuid4().hex, job_seeker=identity(ident, birth), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="purged twice"))
        plat.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=made.activation_token, account_id=f"twice-{uuid.uuid4().hex[:8]}"))
        adv.RevokeActivation(activation_pb2.TransitionActivationRequest(name=made.activation.name, reason="ended"))
        names.append(made.activation.name.split("/")[1])
    jobs.run_settlement(h.ctx)  # (premium owes months of access: nothing stays reserved)
    return names, h.clock.now() + dt.timedelta(days=3)


def test_purges_run_at_once_on_two_machines_log_one_purge(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """README: run the purge daily on every server machine. Two machines' cron jobs sharing one
    PostgreSQL database started together: each counted the rows before the other deleted them,
    and each appended a `privacy.purged` event with the same counts (the audit log said twice what
    was deleted, and both commands printed it). Now purges take turns: the second finds nothing
    left and logs nothing. The two are made to overlap: a third session holds a row both must
    change (PostgreSQL) or the write lock (SQLite) until both have started."""
    with own_server(backend[0], tmp_path / "srv", request) as h:
        names, later = _purge_fixture(h)
        results: list[privacy.PurgeSummary] = []
        errors: list[BaseException] = []

        def machine() -> None:
            db = Database(h.url, pool_size=2)
            try:
                results.append(privacy.purge(db, now=later, retention_days=1, actor="operator:cron"))
            except BaseException as exc:  # (reported below)
                errors.append(exc)
            finally:
                db.dispose()

        threads = [threading.Thread(target=machine) for _ in range(2)]
        if backend[0] == "postgres":
            blocker = psycopg.connect(h.url.replace("postgresql+psycopg://", "postgresql://"))
            blocker.execute("SELECT 1 FROM activations WHERE id = %s FOR UPDATE", (names[0],))
            for t in threads:
                t.start()
            with psycopg.connect(h.url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as watch:
                for _ in range(200):
                    waiting = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                            "AND wait_event_type = 'Lock'").fetchone()
                    if waiting and waiting[0] >= 2:
                        break
                    time.sleep(0.05)
                else:
                    pytest.fail("the two purges never both waited")
            blocker.rollback()
            blocker.close()
        else:
            blocker_sqlite = sqlite3.connect(h.url.removeprefix("sqlite:///"), isolation_level=None)
            blocker_sqlite.execute("BEGIN IMMEDIATE")
            for t in threads:
                t.start()
            time.sleep(0.5)
            blocker_sqlite.execute("ROLLBACK")
            blocker_sqlite.close()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(r.activations_scrubbed for r in results) == [0, 2], results
        assert sorted(r.idempotency_records for r in results)[0] == 0, results
        with h.ctx.db.read() as s:
            logged = s.execute(select(Event.payload_json).where(Event.type == "privacy.purged")).scalars().all()
            bound = s.execute(select(func.count()).select_from(Activation).where(
                Activation.id.in_(names), Activation.account_id.is_not(None))).scalar_one()
        assert len(logged) == 1, f"{len(logged)} privacy.purged events for one purge: {logged}"
        assert bound == 0


def test_a_purge_runs_in_slices_each_logged_and_resumes_where_one_stopped(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The purge was one transaction: on SQLite it held the write lock while it searched every
    activation and idempotency record and deleted all it found (measured at 200,000 activations:
    2.9 s to scrub 10,929 activations and delete 184,710 records, 1.3 s for a snapshot of a million
    rows, 0.48 s finding nothing), and the server's writes waited as long. It goes in slices now,
    each a transaction with its own `privacy.purged` event: a writer polling the file meanwhile
    sees the work part-done (before: all, then nothing). A purge stopped midway (here: failing after
    its second slice) has logged what it did; the next one does the rest. On both backends: every
    row gone, the events' counts add up to what there was (nothing counted twice), the doctor clean."""
    from entitlement import doctor
    monkeypatch.setattr(privacy, "ROWS_SLICE", 300)
    monkeypatch.setattr(privacy, "ACTIVATIONS_SLICE", 2)
    monkeypatch.setattr(privacy, "RECORDS_SLICE", 3)
    monkeypatch.setattr(privacy, "PURGE_PAUSE_S", 0.05)
    with own_server(backend[0], tmp_path / "srv", request) as h:
        adv = As(h.channel, h.tokens["advisor-paris"])
        plat = As(h.channel, h.tokens["platform-oc"])
        for n in range(6):
            ident, birth = next_ledger_person()
            made = adv.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                request_id=uuid.uuid4().hex, job_seeker=identity(ident, birth), program="programs/premium-job-seekers",
                platform="platforms/openclassrooms", reason="purged in slices"))
            plat.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
                token=made.activation_token, account_id=f"slices-{n}"))
            adv.RevokeActivation(activation_pb2.TransitionActivationRequest(
                name=made.activation.name, reason="ended", request_id=uuid.uuid4().hex))
        jobs.run_settlement(h.ctx)  # (premium owes months of access: nothing stays reserved)
        with h.ctx.db.read() as s:
            old = registry.current_snapshot(s)
        assert old is not None
        with on_day(h, TODAY + dt.timedelta(days=1)):  # a newer extract: the first one's rows are old
            registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, write_registry(tmp_path / "newer.csv", default_people()),
                                    extracted_on=TODAY + dt.timedelta(days=1))
        db = h.ctx.db
        state = (f"SELECT (SELECT count(*) FROM registry_people WHERE snapshot_id = {old.id}) || '/' || "
                 "(SELECT count(*) FROM activations WHERE account_id IS NOT NULL) || '/' || "
                 "(SELECT count(*) FROM idempotency_records)")

        def now_state() -> tuple[int, ...]:
            with db.read() as s:
                return tuple(int(n) for n in s.execute(text(state)).scalar_one().split("/"))
        before = now_state()
        assert before == (1000, 6, 12)
        later = h.clock.now() + dt.timedelta(days=3)
        real_slice, slices = privacy._slice, []

        def stops_after_two(*args: Any) -> bool:
            if len(slices) == 2:
                raise RuntimeError("killed")
            slices.append(1)
            return real_slice(*args)
        monkeypatch.setattr(privacy, "_slice", stops_after_two)
        with pytest.raises(RuntimeError):
            privacy.purge(db, now=later, retention_days=1, actor="operator:dpo")
        stopped = now_state()
        assert stopped != before and stopped != (0, 0, 0), stopped
        monkeypatch.setattr(privacy, "_slice", real_slice)
        with sqlite_writer_sees(h.url, state) as seen:
            summary = privacy.purge(db, now=later, retention_days=1, actor="operator:dpo")
        assert now_state() == (0, 0, 0)
        assert (summary.registry_rows, summary.activations_scrubbed, summary.idempotency_records) == stopped
        with db.read() as s:
            logged = [json.loads(p) for p in s.execute(select(Event.payload_json).where(
                Event.type == "privacy.purged").order_by(Event.seq)).scalars()]
            status = s.execute(select(RegistrySnapshot.status).where(RegistrySnapshot.id == old.id)).scalar_one()
        assert len(logged) > 3 and status == "superseded"
        assert all(e["registry_rows"] <= 300 and e["activations_scrubbed"] <= 2 and e["idempotency_records"] <= 3
                   for e in logged), logged
        assert [sum(e[k] for e in logged) for k in ("registry_snapshots", "registry_rows", "activations_scrubbed",
                                                     "idempotency_records")] == [1, *before]
        assert not privacy.purge(db, now=later, retention_days=1, actor="operator:dpo").anything
        assert doctor.check(db) == []
        if h.backend == "sqlite":
            part_done = {v for v in seen if v not in ("/".join(map(str, stopped)), "0/0/0")}
            assert part_done, f"the purge was one transaction (states seen: {sorted(set(seen))})"


def test_a_purge_leaves_the_snapshot_an_import_switched_to_while_it_ran(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The purge read the snapshot in force, then, in another statement, the snapshots to purge:
    every one extracted before the cutoff but that one. On PostgreSQL (READ COMMITTED) an import
    whose switch committed between the two statements had its new snapshot counted as an old one:
    its rows were deleted and it was marked superseded, and the registry went back to the snapshot
    before it (an extract older than the retention: a short one, any value >= 1 being accepted).
    Now only snapshots older than the one in force are purged. The import is run from the purge's
    first statement, on another connection (SQLite: it waits for the purge's write lock)."""
    with own_server(backend[0], tmp_path / "srv", request) as h:
        with h.ctx.db.read() as s:
            first = registry.current_snapshot(s)
        assert first is not None
        newer = write_registry(tmp_path / "newer.csv", default_people())
        imported: list[registry.ImportSummary] = []
        purge_db = Database(h.url, pool_size=2)
        import_db = Database(h.url, pool_size=2)

        def run_import() -> None:
            imported.append(registry.import_extract(import_db, h.ctx.pseudo, h.clock, newer,
                                                    extracted_on=h.clock.today()))

        worker = threading.Thread(target=run_import)

        def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "max(registry_snapshots.id)" in statement and not worker.is_alive() and not imported:
                worker.start()
                if backend[0] == "postgres":
                    worker.join(60)  # switched and committed before the purge's next statement
        event.listen(purge_db.engine, "after_cursor_execute", after)
        try:
            summary = privacy.purge(purge_db, now=h.clock.now() + dt.timedelta(days=10), retention_days=1,
                                    actor="operator:dpo")
            worker.join(60)
        finally:
            purge_db.dispose()
            import_db.dispose()
        assert imported and not imported[0].unchanged
        new_id = imported[0].snapshot_id
        with h.ctx.db.read() as s:
            current = registry.current_snapshot(s)
            status = s.execute(select(RegistrySnapshot.status).where(RegistrySnapshot.id == new_id)).scalar_one()
            rows = s.execute(select(func.count()).select_from(RegistryPerson).where(
                RegistryPerson.snapshot_id == new_id)).scalar_one()
        assert (current.id if current else None, status, rows) == (new_id, "complete", 1000), summary
        # The snapshot before it is purged, by this purge or the next one.
        privacy.purge(h.ctx.db, now=h.clock.now() + dt.timedelta(days=10), retention_days=1, actor="operator:dpo")
        with h.ctx.db.read() as s:
            assert s.execute(select(func.count()).select_from(RegistryPerson).where(
                RegistryPerson.snapshot_id == first.id)).scalar_one() == 0
