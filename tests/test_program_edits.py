"""Program files edited over the years, under existing activations (programs/README.md).

The server loads the programs folder at start only: an operator's edit takes effect when the server
starts again on the same database. These tests start a second server on the database of a first one
(`restarted`), with an edited copy of programs/, and check that every activation made before keeps
the terms it was granted, and that nothing of it breaks when its program's file is gone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from own_server import default_people, next_ledger_person, on_day, own_server, write_registry
from support import Api, Harness, identity

from entitlement import app, doctor, jobs, registry
from entitlement.config import ROOT
from entitlement.server_main import start
from entitlement.storage.models import LedgerEntry
from entitlement.v1 import activation_pb2, audit_pb2

PREMIUM, OPENCFA = "premium-job-seekers", "opencfa-apprentices"
D = dt.date


def programs_copy(root: Path) -> Path:
    progs = root / "programs-edited"
    shutil.copytree(ROOT / "programs", progs)
    return progs


@contextmanager
def restarted(h: Harness, programs_dir: Path) -> Iterator[Harness]:
    """The server started again on `h`'s database, keys and callers, with `programs_dir` (what an
    operator's edit of the program files does at the next start), on `h`'s clock."""
    settings = dataclasses.replace(h.ctx.settings, programs_dir=programs_dir)
    ctx = app.build(settings, clock=h.clock)
    running = start(ctx, settings.listen)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Harness(backend=h.backend, url=h.url, ctx=ctx, running=running, channel=channel, tokens=h.tokens,
                      clock=h.clock, log_path=h.log_path)
    finally:
        channel.close()
        running.stop(0)
        ctx.db.dispose()


def activate(api: Api, program: str,
             who: tuple[str, dt.date] | None = None) -> activation_pb2.ActivateEntitlementResponse:
    agency_id, birth = who or next_ledger_person()
    resp: activation_pb2.ActivateEntitlementResponse = api.advisor.ActivateEntitlement(
        activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{program}",
            platform="platforms/openclassrooms", reason="program edits",
            mentor_id="M-0042" if program == OPENCFA else ""))
    return resp



def edit(progs: Path, program: str, old: str, new: str) -> None:
    path = progs / f"{program}.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), encoding="utf-8")


def end_date(a: activation_pb2.Activation) -> dt.date:
    return D(a.end_date.year, a.end_date.month, a.end_date.day)


def curtailments(h: Harness, name: str) -> list[str]:
    return [e.reason for e in Api(h).admin.ListEvents(audit_pb2.ListEventsRequest(page_size=1000)).events
            if e.subject == name and e.type == "activation.curtailed"]


def test_revalidation_holds_a_holder_to_the_criteria_granted_not_to_one_added_to_the_file_since(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Premium has no age limit. A 40-year-old is activated on 16 March; the operator then adds
    `age_below` (max_age 26) to premium's file, its value dated from the program's start as the
    loader requires, and restarts. The next extract (same facts) must not curtail that holder:
    revalidation judged by the file's current list of criteria, with the new parameter reaching
    back to 2015, and cut them 'no longer eligible (AGE_LIMIT_EXCEEDED)' to the day before the
    extract. New decisions follow the file. And a program whose file is gone is still revalidated
    by the terms its activations were granted (it was skipped, counted as up to date): a holder
    who moved out of the region is curtailed as before."""
    people = default_people()
    older, newcomer, opencfa_holder = "OLDER0001", "OLDER0002", "CFAENDS01"
    for ident in (older, newcomer):
        people[ident] = ("1985-06-15", "75011", "2024-01-15", "", "1")
    people[opencfa_holder] = ("2003-02-01", "75011", "2024-01-15", "", "1")
    with own_server(backend[0], tmp_path / "own", request, people=people) as h:
        api = Api(h)
        kept = activate(api, PREMIUM, (older, D(1985, 6, 15))).activation
        cfa = activate(api, OPENCFA, (opencfa_holder, D(2003, 2, 1))).activation
        progs = programs_copy(tmp_path)
        edit(progs, PREMIUM, "  - registry_data_fresh\n", "  - registry_data_fresh\n  - age_below\n")
        edit(progs, PREMIUM, "parameters:\n", "parameters:\n  max_age:\n    values:\n      2015-09-01:\n"
             "        value: 26\n        reference: \"test: an age limit added years later\"\n")
        (progs / f"{OPENCFA}.yaml").unlink()
        later = dict(people)
        later[opencfa_holder] = ("2003-02-01", "69003", "2024-01-15", "", "1")  # moved to Lyon
        with restarted(h, progs) as h2, on_day(h, D(2026, 5, 10)):
            api2 = Api(h2)
            registry.import_extract(h2.ctx.db, h2.ctx.pseudo, h2.clock, write_registry(tmp_path / "may.csv", later),
                                    extracted_on=D(2026, 5, 5))
            r = jobs.run_revalidation(h2.ctx, activation_ids=[kept.name.split("/")[1], cfa.name.split("/")[1]])
            assert (r.examined, r.up_to_date, r.still_eligible, r.curtailed, r.expired) == (2, 0, 1, 0, 1), r
            got = api2.advisor.GetActivation(activation_pb2.GetActivationRequest(name=kept.name))
            assert (got.state, end_date(got)) == (activation_pb2.ACTIVE, D(2027, 3, 15))
            assert curtailments(h2, kept.name) == []
            gone = api2.advisor.GetActivation(activation_pb2.GetActivationRequest(name=cfa.name))
            assert (gone.state, end_date(gone)) == (activation_pb2.EXPIRED, D(2026, 5, 4))  # the day before the extract
            assert len(curtailments(h2, cfa.name)) == 1 and "OUTSIDE_REGION" in curtailments(h2, cfa.name)[0]
            with pytest.raises(grpc.RpcError) as err:
                activate(api2, PREMIUM, (newcomer, D(1985, 6, 15)))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "AGE_LIMIT_EXCEEDED" in (err.value.details() or "")


def audit_view(api: Api, caller: str, program: str = "") -> tuple[
        list[str], list[str], list[tuple[Any, ...]], list[tuple[int, str, str]], list[int]]:
    """What `caller` sees by the audit RPCs: its activations (all, and with the program filter),
    its funding report, the events it may read (listed and streamed in full)."""
    a = api.as_(caller)
    listed = [x.name for x in a.ListActivations(audit_pb2.ListActivationsRequest(page_size=500)).activations]
    by_program = [x.name for x in a.ListActivations(audit_pb2.ListActivationsRequest(
        page_size=500, program=f"programs/{program}")).activations] if program else []
    report = [(r.funder, r.program, r.month, r.committed_cents, r.consumed_cents, r.released_cents,
               r.activations_started, r.activations_live) for r in a.GetFundingReport(
        audit_pb2.GetFundingReportRequest()).rows]
    events = [(e.sequence, e.type, e.subject) for e in a.ListEvents(audit_pb2.ListEventsRequest(page_size=1000)).events]
    streamed = [e.sequence for e in a.StreamEvents(audit_pb2.StreamEventsRequest()) if e.HasField("event")]
    return listed, by_program, report, events, streamed


def test_a_program_whose_file_is_removed_keeps_its_activations_working_and_auditable(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """OpenCFA (`use`, region + OPCO) has a redeemed activation; its file is removed and the server
    restarted. Everything about that activation keeps working: GetActivation, VerifyEntitlement,
    ReportUsage, settlement, revocation, the doctor; and its funder (the region, which funds other
    programs still in the files) audits it as before: by the program files alone, the region's
    ListActivations lost it, with the program filter PERMISSION_DENIED 'not funded by region-idf',
    and its funding report and event log were empty."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        resp = activate(api, OPENCFA)
        name = resp.activation.name
        account = "learner-" + uuid.uuid4().hex[:12]
        api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=resp.activation_token, account_id=account))
        before = audit_view(api, "funder-idf", OPENCFA)
        assert before[0] == before[1] == [name] and before[2] and before[3] and before[4]
        progs = programs_copy(tmp_path)
        (progs / f"{OPENCFA}.yaml").unlink()
        with restarted(h, progs) as h2:
            api2 = Api(h2)
            assert audit_view(api2, "funder-idf", OPENCFA) == before
            assert [x.name for x in api2.admin.ListActivations(audit_pb2.ListActivationsRequest(
                program=f"programs/{OPENCFA}")).activations] == [name]
            got = api2.advisor.GetActivation(activation_pb2.GetActivationRequest(name=name))
            assert got.state == activation_pb2.ACTIVE and got.funding.total_cents == 12 * 2000
            status = api2.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=account))
            assert status.active and status.activation == name
            with on_day(h, D(2026, 5, 10)):
                api2.platform.ReportUsage(activation_pb2.ReportUsageRequest(account_id=account, month="2026-03",
                                                                            used=True))
                jobs.run_settlement(h2.ctx, activation_ids=[name.split("/")[1]])
                revoked = api2.advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(
                    name=name, reason="program closed"))
                assert revoked.state == activation_pb2.REVOKED
                jobs.run_settlement(h2.ctx, activation_ids=[name.split("/")[1]])
            assert doctor.check(h2.ctx.db) == []
            after = audit_view(api2, "funder-idf", OPENCFA)
            assert after[0] == after[1] == [name]
            # The region's half: 20 EUR committed a month for 12 months, March consumed (used), the
            # April month (reportable until 15 June at the revocation on 10 May) still reserved.
            mine = [r for r in after[2] if r[1] == f"programs/{OPENCFA}"]
            assert sum(r[3] for r in mine) == 12 * 1000 and sum(r[4] for r in mine) == 1000
            assert sum(r[5] for r in mine) == 10 * 1000


def redeem(api: Api, token: str) -> tuple[str, activation_pb2.EntitlementStatus]:
    account = "learner-" + uuid.uuid4().hex[:12]
    return account, api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=token, account_id=account))


def bookmark(api: Api) -> str:
    """A cursor of the platform's change stream: now."""
    call = api.platform.WatchEntitlementChanges(activation_pb2.WatchEntitlementChangesRequest(), timeout=10)
    mark = next(iter(call))
    call.cancel()
    assert not mark.HasField("status") and mark.cursor
    return str(mark.cursor)


def tiers_watched(api: Api, cursor: str) -> dict[str, set[str]]:
    """Activation -> the tiers its changes after `cursor` carry on the platform's change stream."""
    got: dict[str, set[str]] = {}
    with pytest.raises(grpc.RpcError) as info:
        for change in api.platform.WatchEntitlementChanges(
                activation_pb2.WatchEntitlementChangesRequest(cursor=cursor), timeout=3):
            if change.HasField("status"):
                got.setdefault(change.status.activation, set()).add(change.status.tier)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return got


def test_an_activation_keeps_the_tier_it_was_granted_when_its_program_file_changes_or_goes(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The tier came from the program file loaded now: removed, its holders' VerifyEntitlement,
    redemption and change stream answered `active` with an empty tier (the platform could not tell
    which benefit to give); changed (OpenCFA's `premium-mentored` to `premium-plus`), every holder's
    tier changed with it. An activation keeps the tier it was granted; new ones get the file's."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        first = activate(api, OPENCFA)
        cursor = bookmark(api)
        account, _ = redeem(api, first.activation_token)
        second = activate(api, OPENCFA)  # redeemed after the edit
        granted = "premium-mentored"
        removed = programs_copy(tmp_path)
        (removed / f"{OPENCFA}.yaml").unlink()
        with restarted(h, removed) as h2:
            api2 = Api(h2)
            status = api2.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=account))
            assert (status.active, status.tier) == (True, granted)
            other, answer = redeem(api2, second.activation_token)
            assert (answer.active, answer.tier) == (True, granted)
            assert tiers_watched(api2, cursor) == {first.activation.name: {granted}, second.activation.name: {granted}}
        changed = tmp_path / "changed"
        shutil.copytree(ROOT / "programs", changed)
        edit(changed, OPENCFA, "tier: premium-mentored\n", "tier: premium-plus\n")
        with restarted(h, changed) as h3:
            api3 = Api(h3)
            for acc in (account, other):
                assert api3.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=acc)).tier \
                    == granted
            third = activate(api3, OPENCFA)
            new_account, answer = redeem(api3, third.activation_token)
            assert answer.tier == "premium-plus"
            assert api3.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(
                account_id=new_account)).tier == "premium-plus"


PRICE_2015 = ('      2015-09-01:\n        value: 2000\n'
              '        reference: "Platform list price of Premium, 20 EUR/month (press release, April 2015)"\n')


def test_the_doctor_names_a_past_value_rewritten_in_a_program_file(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A program's version is its file's hash: any edit is a new version, and the server starts on
    it without comparing it with what activations were decided with. Editing premium's 2015 price in
    place (20 to 25 EUR) rewrites the terms the file says activations made since 2015 got (they keep
    theirs, recorded): nothing noticed it. The doctor, given the program files (the command loads
    the server's), names it, PROGRAM_VALUE_REWRITTEN; a dated value added from a later date, and a
    criterion added, or a list of categories given in another order, are sound edits and pass."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        api = Api(h)
        made = activate(api, PREMIUM).activation
        sound = programs_copy(tmp_path)
        edit(sound, PREMIUM, PRICE_2015,
             PRICE_2015 + '      2026-04-01:\n        value: 2500\n        reference: "t"\n')
        edit(sound, PREMIUM, "  - registry_data_fresh\n", "  - registry_data_fresh\n  - age_below\n")
        edit(sound, PREMIUM, "parameters:\n", "parameters:\n  max_age:\n    values:\n      2015-09-01:\n"
             "        value: 99\n        reference: \"t\"\n")
        edit(sound, PREMIUM, "value: [1, 2, 3, 4, 5]\n", "value: [5, 4, 3, 2, 1]\n")  # the same set
        rewritten = tmp_path / "rewritten"
        shutil.copytree(ROOT / "programs", rewritten)
        edit(rewritten, PREMIUM, PRICE_2015, PRICE_2015.replace("2000", "2500"))
        with restarted(h, sound) as h2:
            assert doctor.check(h2.ctx.db, catalog=h2.ctx.catalog) == []
        with restarted(h, rewritten) as h3:  # the server starts on it, and keeps the terms granted
            got = Api(h3).advisor.GetActivation(activation_pb2.GetActivationRequest(name=made.name))
            assert got.decision.funding_plan.price_per_month_cents == 2000
            problems = doctor.check(h3.ctx.db, catalog=h3.ctx.catalog)
            assert [p.code for p in problems] == ["PROGRAM_VALUE_REWRITTEN"]
            assert "price_per_month_cents = 2500 on 2026-03-16" in problems[0].detail
            assert "used 2000" in problems[0].detail
            assert doctor.check(h3.ctx.db) == []  # without the files: the database alone is sound
        from entitlement import cli
        monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", h.url)
        monkeypatch.setenv("ENTITLEMENT_PROGRAMS_DIR", str(rewritten))
        capsys.readouterr()
        assert cli.main(["doctor", "--quick"]) == 1
        assert "PROGRAM_VALUE_REWRITTEN: programs/premium-job-seekers" in capsys.readouterr().out
        monkeypatch.setenv("ENTITLEMENT_PROGRAMS_DIR", str(sound))
        assert cli.main(["doctor", "--quick"]) == 0


def ledger_of(h: Harness, name: str) -> list[tuple[str, str, str, int]]:
    with h.ctx.db.read() as s:
        return [(r.kind, r.funder_id, r.month, r.amount_cents) for r in s.execute(select(LedgerEntry).where(
            LedgerEntry.activation_id == name.split("/")[1]).order_by(LedgerEntry.id)).scalars()]


def test_dated_values_added_later_change_new_activations_only(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Premium from 1 April 2026, added to the file after an activation of 16 March: 25 EUR a
    month, 6 months, the ministry 70% and the region 30% (France Travail leaves), funders owing the
    months used. The March activation keeps 20 EUR x 12, ministry / France Travail 50/50, `access`:
    its months consumed and released at that price and split, never the region's; the April one
    gets the new terms, and its unreported month is released after its report window. The doctor,
    given the files, finds the edit sound; each funder audits only what it committed to. (A guard:
    this held before this review's fixes.)"""
    with own_server(backend[0], tmp_path / "own", request) as h:
        old = activate(Api(h), PREMIUM).activation
        progs = programs_copy(tmp_path)
        for param, value in (("price_per_month_cents", "2500"), ("activation_months", "6"),
                             ("funders", "{ministry-of-labour: 7000, region-idf: 3000}"), ("funders_owe", "use")):
            edit(progs, PREMIUM, f"  {param}:\n    values:\n",
                 f"  {param}:\n    values:\n      2026-04-01:\n        value: {value}\n        reference: \"t\"\n")
        with restarted(h, progs) as h2:
            api2 = Api(h2)
            with on_day(h, D(2026, 4, 10)):
                registry.import_extract(h2.ctx.db, h2.ctx.pseudo, h2.clock,
                                        write_registry(tmp_path / "april.csv", default_people()),
                                        extracted_on=D(2026, 4, 9))
                new = activate(api2, PREMIUM).activation
            assert (new.funding.price_per_month_cents, new.funding.months) == (2500, 6)
            for day in (D(2026, 5, 20), D(2026, 6, 20)):
                with on_day(h, day):
                    jobs.run_settlement(h2.ctx)
            with on_day(h, D(2026, 6, 21)):
                for name in (old.name, new.name):
                    api2.advisor.RevokeActivation(activation_pb2.TransitionActivationRequest(name=name, reason="t"))
            halves = [("consume", f, m, 1000) for m in ("2026-03", "2026-04", "2026-05", "2026-06")
                      for f in ("france-travail", "ministry-of-labour")]
            assert ledger_of(h2, old.name) == [
                ("commit", "france-travail", "2026-03", 12000), ("commit", "ministry-of-labour", "2026-03", 12000),
                *halves,
                ("release", "france-travail", "2026-06", 8000), ("release", "ministry-of-labour", "2026-06", 8000)]
            # Nothing reported used: April's month (to 9 May) released once its window closed (9 June),
            # three months at the revocation; May's and June's stay reserved for their reports.
            assert ledger_of(h2, new.name) == [
                ("commit", "ministry-of-labour", "2026-04", 10500), ("commit", "region-idf", "2026-04", 4500),
                ("release", "ministry-of-labour", "2026-06", 1750), ("release", "region-idf", "2026-06", 750),
                ("release", "ministry-of-labour", "2026-06", 5250), ("release", "region-idf", "2026-06", 2250)]
            assert doctor.check(h2.ctx.db, catalog=h2.ctx.catalog) == []
            for caller, names in (("funder-ft", [old.name]), ("funder-idf", [new.name]),
                                  ("funder-ministry", [new.name, old.name])):
                assert [a.name for a in api2.as_(caller).ListActivations(
                    audit_pb2.ListActivationsRequest()).activations] == names
