"""A funder's scope follows the money of each activation, not the program's funders on any date.

Program parameters are dated, `funders` among them: here premium-job-seekers is paid by the
ministry and France Travail until 2026-05-31, by the ministry and the Île-de-France region from
2026-06-01. A funder sees an activation if and only if it has a share of that activation's funding
(its `commit` ledger entries, booked with the plan decided at activation), and the events about
it; every other event reaches it in StreamEvents as its sequence number and leaf hash alone. On
SQLite and PostgreSQL, through the real server.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from own_server import default_people, next_ledger_person, on_day, own_server, write_registry
from support import Api, expect_error, identity
from test_audit_log import export, verify

from entitlement import audit, registry
from entitlement.config import ROOT
from entitlement.storage.db import Database
from entitlement.v1 import activation_pb2, audit_pb2

PREMIUM = "programs/premium-job-seekers"
MINISTRY, FT, IDF = "funder-ministry", "funder-ft", "funder-idf"
BEFORE, AFTER = dt.date(2026, 3, 16), dt.date(2026, 6, 16)  # either side of the change of funders


def programs_with_dated_funders(root: Path) -> Path:
    """The repository's programs, premium's funders changed from 2026-06-01: France Travail leaves,
    the region joins."""
    progs = root / "programs"
    shutil.copytree(ROOT / "programs", progs)
    path = progs / "premium-job-seekers.yaml"
    text = path.read_text(encoding="utf-8")
    old = ('        value: {ministry-of-labour: 5000, france-travail: 5000}\n'
           '        reference: "Ministry / agency split negotiated in the partnership; 50/50 is our default (configuration)"\n')
    assert text.endswith(old)
    path.write_text(text + ('      2026-06-01:\n'
                            '        value: {ministry-of-labour: 8000, region-idf: 2000}\n'
                            '        reference: "test: the region joins and France Travail leaves from June 2026"\n'),
                    encoding="utf-8")
    return progs


def activate(api: Api) -> activation_pb2.Activation:
    agency_id, birth = next_ledger_person()
    return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=PREMIUM, platform="platforms/openclassrooms",
        reason="funder scope")).activation


def listed(api: Api, caller: str, **filters: str) -> list[str]:
    names, token = [], ""
    while True:  # one per page: the scope holds across page tokens
        page = api.as_(caller).ListActivations(audit_pb2.ListActivationsRequest(page_size=1, page_token=token,
                                                                                **filters))
        names += [a.name for a in page.activations]
        token = page.next_page_token
        if not token:
            return names


def events(api: Api, caller: str) -> list[audit_pb2.Event]:
    out, token = [], ""
    while True:
        page = api.as_(caller).ListEvents(audit_pb2.ListEventsRequest(page_size=2, page_token=token))
        out += page.events
        token = page.next_page_token
        if not token:
            return out


def stream(api: Api, caller: str) -> list[audit_pb2.LogEntry]:
    return list(api.as_(caller).StreamEvents(audit_pb2.StreamEventsRequest()))


def committed(api: Api, caller: str) -> dict[str, int]:
    rows = api.as_(caller).GetFundingReport(audit_pb2.GetFundingReportRequest()).rows
    out: dict[str, int] = {}
    for r in rows:
        assert r.program == PREMIUM
        out[r.month] = out.get(r.month, 0) + r.committed_cents
    return {m: c for m, c in out.items() if c}


def test_a_funder_sees_the_activations_it_pays_for_and_their_events_only(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> None:
    with own_server(backend[0], tmp_path / "srv", request,
                    programs_dir=programs_with_dated_funders(tmp_path)) as h:
        api = Api(h)
        assert h.clock.today() == BEFORE
        early = activate(api)  # the ministry and France Travail pay for it
        assert {s.funder: s.amount_cents for s in early.funding.shares} == {
            "ministry-of-labour": 12000, "france-travail": 12000}
        # Before the region joins: nothing of it, although it funds (other) programs.
        assert listed(api, IDF) == [] and events(api, IDF) == []
        with on_day(h, AFTER):
            extract = write_registry(tmp_path / "june.csv", default_people())  # fresh registry data
            registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, extract, extracted_on=AFTER)
            late = activate(api)  # the ministry and the region pay for it
            assert {s.funder: s.amount_cents for s in late.funding.shares} == {
                "ministry-of-labour": 19200, "region-idf": 4800}
            # An event about the early activation while the region funds the program: still not its.
            api.advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(name=early.name,
                                                                                     reason="scope"))
            every = {e.sequence: e for e in events(api, "admin")}
            about = {name: {q for q, e in every.items() if e.subject == name} for name in (early.name, late.name)}
            assert len(about[early.name]) == 2 and len(about[late.name]) == 1

            # ListActivations: each funder the activations it has a share of, with or without the
            # program filter; an admin asking for a funder gets the same.
            assert listed(api, IDF) == listed(api, IDF, program=PREMIUM) == [late.name]
            assert listed(api, "admin", funder="region-idf") == [late.name]
            assert listed(api, FT) == listed(api, FT, program=PREMIUM) == [early.name]  # it left: the older one
            assert listed(api, MINISTRY) == listed(api, MINISTRY, program=PREMIUM) == [late.name, early.name]

            # ListEvents: the events about those activations, the later ones included.
            assert {e.sequence for e in events(api, IDF)} == about[late.name]
            assert {e.sequence for e in events(api, FT)} == about[early.name]
            assert {e.sequence for e in events(api, MINISTRY)} == about[early.name] | about[late.name]
            for e in events(api, FT):
                assert e == every[e.sequence]

            # StreamEvents: every leaf, in full only for what the funder may read.
            full = stream(api, "admin")
            assert [e.sequence for e in full] == list(range(1, len(full) + 1))
            for caller, readable in ((IDF, about[late.name]), (FT, about[early.name]),
                                     (MINISTRY, about[early.name] | about[late.name])):
                mine = stream(api, caller)
                assert [(e.sequence, e.leaf_hash) for e in mine] == [(e.sequence, e.leaf_hash) for e in full]
                assert {e.sequence for e in mine if e.HasField("event")} == readable, caller
                for e, f in zip(mine, full):
                    if e.HasField("event"):
                        assert e.event == f.event
                    else:
                        assert [d.name for d, _ in e.ListFields()] == ["sequence", "leaf_hash"]

            # The money: each funder its own commitments, in the month they were booked.
            assert committed(api, IDF) == {"2026-06": 4800}
            assert committed(api, FT) == {"2026-03": 12000}
            assert committed(api, MINISTRY) == {"2026-03": 12000, "2026-06": 19200}

            # The region's export verifies offline: the leaves it cannot read still make the roots.
            bundle = export(capsys, h, IDF, tmp_path / "idf")
            lines = [json.loads(line) for line in (bundle / "events.jsonl").read_text().splitlines()]
            assert {d["seq"] for d in lines if set(d) != {"seq", "leaf_hash"}} == about[late.name]
            code, output = verify(capsys, bundle, (bundle / "verifier-key.txt").read_text().strip())
            assert code == 0, output


def test_a_funders_page_probes_the_ledger_index_alone_per_row(db: Database) -> None:
    """ListActivations for a funder stays one statement read in index order (a (created_at, id)
    index, from the page's position, no sort), each row checked by one probe of the ledger
    (on SQLite: ix_ledger_activation (activation_id, funder_id, kind), reading no ledger row)."""
    q = audit._listed_query((True, True, False, "", False, False, True))
    params = {"programs": ["premium-job-seekers"], "funder": "region-idf", "limit": 101,
              "after_time": dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc), "after_id": "f" * 32}
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with db.read() as s:
            assert s.execute(q, params).all() == []
            statement, args = seen[-1]
            cursor = s.connection().connection.driver_connection.cursor()
            if db.is_sqlite:
                cursor.execute(f"EXPLAIN QUERY PLAN {statement}", args)
                plan = [r[-1] for r in cursor.fetchall()]
                assert plan[0].startswith("SEARCH activations USING INDEX ix_activations_"), plan
                assert ("SEARCH ledger_entries USING COVERING INDEX ix_ledger_activation "
                        "(activation_id=? AND funder_id=? AND kind=?)") in plan, plan
                assert not any("TEMP B-TREE" in step for step in plan), plan  # no sort
            else:
                cursor.execute("SET LOCAL enable_seqscan = off")  # as on a large table: these are empty
                cursor.execute(f"EXPLAIN {statement}", args)
                plan = "\n".join(r[0] for r in cursor.fetchall())
                # Which ledger index the probe uses depends on statistics these empty tables lack
                # (ix_ledger_activation, index only, at 50,000 activations); the shape does not.
                assert "Nested Loop Semi Join" in plan and "Index Scan Backward using ix_activations_" in plan, plan
                assert "Sort" not in plan and "Hash" not in plan, plan
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)


def test_an_admin_filtering_on_a_funder_and_a_program_it_does_not_fund_gets_nothing_not_a_refusal(
        api: Api) -> None:
    """An admin may read everything: `funder` and `program` are two filters. The region funds no
    premium activation of the shared server, so together they match nothing: an empty list and an
    empty report (the admin was PERMISSION_DENIED OUT_OF_SCOPE, as if it were a funder). A funder
    naming a program it has no share of is still refused."""
    api.activate()
    assert api.admin.ListActivations(audit_pb2.ListActivationsRequest(program=PREMIUM)).activations
    assert api.admin.GetFundingReport(audit_pb2.GetFundingReportRequest(program=PREMIUM)).rows
    listed = api.admin.ListActivations(audit_pb2.ListActivationsRequest(funder="region-idf", program=PREMIUM))
    assert list(listed.activations) == [] and listed.next_page_token == ""
    report = api.admin.GetFundingReport(audit_pb2.GetFundingReportRequest(funder="region-idf", program=PREMIUM))
    assert list(report.rows) == []
    f = expect_error(api.as_(IDF).ListActivations, audit_pb2.ListActivationsRequest(program=PREMIUM),
                     grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "OUT_OF_SCOPE"
    f = expect_error(api.as_(IDF).GetFundingReport, audit_pb2.GetFundingReportRequest(program=PREMIUM),
                     grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "OUT_OF_SCOPE"
