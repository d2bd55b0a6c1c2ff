"""What an advisor at the desk reads in a decision: for every way to fail, a detail that says what
is wrong and what can be done, never more about a person than the identifiant and birth date given
entitle the advisor to; through the real server, on both backends."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest

from own_server import default_people, next_ledger_person, on_day, own_server, write_registry
from support import SPECIAL, TODAY, Api, As, expect_error, identity, next_person

from entitlement import registry
from entitlement.v1 import activation_pb2, audit_pb2, common_pb2, eligibility_pb2

PREMIUM = "programs/premium-job-seekers"


def check(advisor: As, agency_id: str, birth: dt.date | str, program: str = PREMIUM) -> common_pb2.EligibilityDecision:
    d: common_pb2.EligibilityDecision
    [d] = advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program=program)).decisions
    return d


def failed(d: common_pb2.EligibilityDecision) -> dict[str, str]:
    """reason code -> the detail of the first criterion failing with it."""
    out: dict[str, str] = {}
    for c in d.criteria:
        if not c.passed:
            out.setdefault(c.reason_code, c.detail)
    return out


def test_each_refusal_says_what_the_advisor_can_do(api: Api) -> None:
    """The details said what failed and stopped there ("No registration found for this identifier
    and birth date.", "Registration ended on 2026-01-31 (cessation d'inscription)."): nothing on
    what to check with the job seeker, or what would make the person eligible (found by a review)."""
    agency_id, birth = next_person()
    wrong = failed(check(api.advisor, agency_id, birth + dt.timedelta(days=1)))
    unknown = failed(check(api.advisor, "NOBODY0042", birth))
    assert wrong == unknown  # a wrong birth date tells nothing an unknown identifier does not
    assert "check the identifier and the birth date with the job seeker" in wrong["NOT_REGISTERED"]
    assert "next extract" in wrong["NOT_REGISTERED"]

    ended = failed(check(api.advisor, "ENDED01", SPECIAL["ENDED01"][0]))
    assert set(ended) == {"REGISTRATION_ENDED"}
    assert "2026-01-31" in ended["REGISTRATION_ENDED"] and "registered again" in ended["REGISTRATION_ENDED"]

    category = failed(check(api.advisor, "CAT0006", SPECIAL["CAT0006"][0]))["CATEGORY_NOT_COVERED"]
    assert "category 6" in category and "covered category" in category

    future = failed(check(api.advisor, "FUTURE1", SPECIAL["FUTURE1"][0]))["REGISTRATION_NOT_STARTED"]
    assert "met from 2026-04-01" in future


def test_stale_registry_data_says_an_import_is_needed(backend: tuple[str, str], tmp_path: Path,
                                                      request: pytest.FixtureRequest, server_log: object) -> None:
    """Data older than the program accepts: the detail gives the extract's date and that a newer
    one must be imported (the advisor can do nothing else; the job seeker is not at fault)."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        advisor = As(h.channel, h.tokens["advisor-paris"])
        agency_id, birth = next_ledger_person()
        with on_day(h, TODAY + dt.timedelta(days=60)):
            stale = failed(check(advisor, agency_id, birth))["REGISTRY_DATA_STALE"]
        extracted = (TODAY - dt.timedelta(days=1)).isoformat()
        assert "61 days old" in stale and extracted in stale and "newer agency extract is imported" in stale


def test_a_past_day_is_judged_on_the_facts_known_now_the_activation_keeps_its_own(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, server_log: object) -> None:
    """`as_of` applies the rules of that day to the facts known now, not to the data a decision of
    that day used (the proto said "to recompute a past decision"): after a newer extract shows the
    registration ended, a check of the activation's day refuses, and GetActivation still shows the
    decision as it was made, on its snapshot."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        advisor = As(h.channel, h.tokens["advisor-paris"])
        agency_id, birth = next_ledger_person()
        made = advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=PREMIUM, platform="platforms/openclassrooms")).activation
        people = default_people()
        people[agency_id] = (birth.isoformat(), "75011", "2024-01-15", (TODAY - dt.timedelta(days=5)).isoformat(), "1")
        registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, write_registry(tmp_path / "newer.csv", people),
                                extracted_on=TODAY)
        [d] = advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity(agency_id, birth), program=PREMIUM, as_of=made.decision.as_of)).decisions
        assert not d.eligible and set(failed(d)) == {"REGISTRATION_ENDED"}
        assert d.registry_snapshot != made.decision.registry_snapshot
        stored = advisor.GetActivation(activation_pb2.GetActivationRequest(name=made.name)).decision
        assert stored.eligible and stored.registry_snapshot == made.decision.registry_snapshot


def test_the_mentor_attested_is_in_the_decision_the_funders_audit(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, server_log: object) -> None:
    """OpenCFA's funders pay for mentored training: the decision stored with an activation said "A
    mentor is assigned." and the mentor's id, recorded in its circumstances, was in no answer (found
    by a review): neither the advisor (GetActivation) nor the funders (ListActivations) could tell
    which mentor was attested. The criterion's detail names it."""
    with own_server(backend[0], tmp_path / "own", request) as h:
        advisor = As(h.channel, h.tokens["advisor-paris"])
        agency_id, birth = next_ledger_person()  # under 26, in Paris
        made = advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program="programs/opencfa-apprentices",
            platform="platforms/openclassrooms", mentor_id="M-0042")).activation

        def mentor_detail(d: common_pb2.EligibilityDecision) -> str:
            [c] = [c for c in d.criteria if c.criterion == "mentor_assigned"]
            assert c.passed
            return str(c.detail)

        assert "M-0042" in mentor_detail(made.decision)
        got = advisor.GetActivation(activation_pb2.GetActivationRequest(name=made.name))
        assert "M-0042" in mentor_detail(got.decision)
        listed = As(h.channel, h.tokens["funder-idf"]).ListActivations(audit_pb2.ListActivationsRequest(
            program="programs/opencfa-apprentices")).activations
        [row] = [a for a in listed if a.name == made.name]
        assert "M-0042" in mentor_detail(row.decision)


def test_an_activation_refused_as_existing_says_until_when_and_what_to_do_instead(api: Api) -> None:
    """The check says eligible (the rules hold), and the activation is refused ACTIVATION_EXISTS:
    that refusal named the live activation and nothing else (found by a review). An advisor of
    another agency, who cannot read it, could not tell the job seeker until when they have access,
    nor that a suspended one is to be resumed and a lost token reissued, not activated again."""
    agency_id, birth = next_person()
    made = api.activate(agency_id, birth).activation
    end = f"{made.end_date.year:04d}-{made.end_date.month:02d}-{made.end_date.day:02d}"
    assert check(api.as_("advisor-lyon"), agency_id, birth).eligible

    def refused() -> tuple[str, dict[str, str]]:
        f = expect_error(api.as_("advisor-lyon").ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=PREMIUM, platform="platforms/openclassrooms"),
            grpc.StatusCode.ALREADY_EXISTS)
        assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == made.name
        return f.message, f.metadata

    message, metadata = refused()
    assert (metadata["current_state"], metadata["end_date"]) == ("ACTIVE", end)
    assert f"(active, access until {end})" in message and "reissue the token" in message
    assert "75011" not in message and "A0001" not in message  # not who made it

    api.advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(name=made.name, reason="absent"))
    message, metadata = refused()
    assert metadata["current_state"] == "SUSPENDED" and "resume it" in message
