"""Every scenario file case, on the pure rules and (where it depends only on registry facts)
through the real server on both backends."""

from __future__ import annotations

import datetime as dt

import pytest

from scenario_data import Scenario, load
from support import TODAY, Api, date_msg, identity

from entitlement import rules
from entitlement.config import ROOT
from entitlement.programs import ProgramCatalog
from entitlement.v1 import eligibility_pb2

SCENARIOS = load()
CATALOG = ProgramCatalog.load(ROOT / "programs")
REASONS = {"NOT_REGISTERED", "REGISTRATION_ENDED", "REGISTRATION_NOT_STARTED", "CATEGORY_NOT_COVERED",
           "OUTSIDE_REGION", "AGE_LIMIT_EXCEEDED", "MENTOR_NOT_ASSIGNED", "CAP_REACHED",
           "REGISTRY_DATA_STALE", "PROGRAM_NOT_STARTED", "PROGRAM_ENDED"}


def test_every_reason_code_and_every_program_has_a_scenario() -> None:
    assert {r for s in SCENARIOS for r in s.reasons} == REASONS
    assert {s.program_id for s in SCENARIOS} == {p.id for p in CATALOG.all()}
    for program in CATALOG.all():
        assert any(s.eligible for s in SCENARIOS if s.program_id == program.id), program.id


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario_on_the_rules(s: Scenario) -> None:
    program = CATALOG.get(s.program_id)
    assert program is not None
    seats, cents = s.usage or (0, 0)
    d = rules.evaluate(program, s.facts, s.day, rules.Circumstances(
        registry_extracted_on=s.registry_extracted_on or s.day, seats_used=seats, cents_committed=cents,
        mentor_id=s.mentor))
    assert d.eligible == s.eligible
    assert set(d.failed_reasons) == s.reasons
    if s.access_end:
        assert d.access_end == s.access_end
    if s.total_cents is not None:
        assert d.funding_plan is not None and d.funding_plan.total_cents == s.total_cents
    if d.funding_plan:
        assert sum(c for _, _, c in d.funding_plan.shares) == d.funding_plan.total_cents


SERVER = [s for s in SCENARIOS if s.server_checkable and s.day <= TODAY]


@pytest.mark.parametrize("s", SERVER, ids=[s.id for s in SERVER])
def test_scenario_through_the_server(api: Api, s: Scenario) -> None:
    birth = s.facts.birth_date if s.facts else dt.date(1990, 1, 1)
    agency_id = s.agency_id or "UNKNOWN0SCENARIO"
    resp = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{s.program_id}", as_of=date_msg(s.day),
        mentor_id=s.mentor))
    [d] = resp.decisions
    assert d.eligible == s.eligible
    assert {c.reason_code for c in d.criteria if not c.passed} == s.reasons
    if s.access_end:
        assert (d.access_end_date.year, d.access_end_date.month, d.access_end_date.day) == \
            (s.access_end.year, s.access_end.month, s.access_end.day)
    if s.total_cents is not None:
        assert d.funding_plan.total_cents == s.total_cents
