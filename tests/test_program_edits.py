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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from own_server import default_people, next_ledger_person, on_day, own_server, write_registry
from support import Api, Harness, identity

from entitlement import app, jobs, registry
from entitlement.config import ROOT
from entitlement.server_main import start
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


def activate(api: Api, program: str, who: tuple[str, dt.date] | None = None) -> activation_pb2.ActivateEntitlementResponse:
    agency_id, birth = who or next_ledger_person()
    return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{program}", platform="platforms/openclassrooms",
        reason="program edits", mentor_id="M-0042" if program == OPENCFA else ""))



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
