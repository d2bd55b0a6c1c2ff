"""The main program's path, over a real channel, on both backends:
check -> activate -> redeem -> verify -> the funders list it and see the money."""

from __future__ import annotations

import json

import grpc
import jwt
import pytest

from support import TODAY, Api, expect_error, identity, next_person

from entitlement.v1 import activation_pb2, audit_pb2, eligibility_pb2


def test_check_activate_redeem_verify_audit(api: Api) -> None:
    agency_id, birth = next_person()

    check = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers"))
    [decision] = check.decisions
    assert decision.eligible
    assert [c.criterion for c in decision.criteria] == ["program_open", "registered", "category_covered",
                                                       "registration_active", "registry_data_fresh"]
    assert decision.funding_plan.total_cents == 2000 * 12
    assert decision.registry_snapshot.startswith("registrySnapshots/")

    resp = api.activate(agency_id, birth, request_id="e2e-activate-" + agency_id)
    act = resp.activation
    assert act.state == activation_pb2.ACTIVE
    assert act.advisor_id == "A0001" and act.agency_code == "75011"
    assert (act.start_date.year, act.start_date.month, act.start_date.day) == (TODAY.year, TODAY.month, TODAY.day)
    assert act.funding.total_cents == 24000
    assert sum(s.amount_cents for s in act.funding.shares) == 24000
    assert agency_id not in act.job_seeker_ref and len(act.job_seeker_ref) == 32
    # The decision the activation was made on is stored and shown again exactly as it was.
    assert act.decision == decision
    assert api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=act.name)).decision == decision

    # The token verifies offline with a standard library against the published JWKS.
    jwks = json.loads(api.platform.GetSigningKeys(activation_pb2.GetSigningKeysRequest()).jwks_json)
    header = jwt.get_unverified_header(resp.activation_token)
    assert header["alg"] == "EdDSA" and header["typ"] == "entitlement-activation+jwt"
    key = jwt.PyJWK.from_dict(next(k for k in jwks["keys"] if k["kid"] == header["kid"]))
    claims = jwt.decode(resp.activation_token, key.key, algorithms=["EdDSA"], audience="openclassrooms",
                        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    assert claims["entitlement"] == act.name.split("/")[1]
    assert claims["program"] == "premium-job-seekers"
    assert agency_id not in json.dumps(claims) and birth.isoformat() not in json.dumps(claims)

    account = "learner-" + agency_id
    redeemed = api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=resp.activation_token, account_id=account))
    assert redeemed.active and redeemed.activation == act.name and redeemed.tier == "premium"

    verified = api.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=account))
    assert verified.active
    assert verified.program == "programs/premium-job-seekers"
    assert (verified.end_date.year, verified.end_date.month, verified.end_date.day) == (2027, 3, 15)

    # Both funders of the program see it; the region (which does not fund it) does not.
    for funder in ("funder-ministry", "funder-ft"):
        names = _all_activation_names(api, funder)
        assert act.name in names
    assert act.name not in _all_activation_names(api, "funder-idf")

    report = api.as_("funder-ministry").GetFundingReport(audit_pb2.GetFundingReportRequest(
        start_month=TODAY.strftime("%Y-%m"), end_month=TODAY.strftime("%Y-%m")))
    rows = {(r.funder, r.program): r for r in report.rows}
    assert set(f for f, _ in rows) == {"ministry-of-labour"}
    assert rows[("ministry-of-labour", "programs/premium-job-seekers")].committed_cents >= 12000


def _all_activation_names(api: Api, caller: str) -> set[str]:
    names: set[str] = set()
    token = ""
    while True:
        page = api.as_(caller).ListActivations(audit_pb2.ListActivationsRequest(page_size=500, page_token=token))
        names.update(a.name for a in page.activations)
        token = page.next_page_token
        if not token:
            return names


def test_the_platform_rpcs_of_step_4_are_implemented(api: Api) -> None:
    """ReportUsage and WatchEntitlementChanges answered UNIMPLEMENTED until step 4 (their own
    tests: test_ledger.py, test_watch.py)."""
    f = expect_error(api.platform.ReportUsage, activation_pb2.ReportUsageRequest(
        account_id="nobody-" + TODAY.isoformat(), month="2026-03", used=True), grpc.StatusCode.NOT_FOUND)
    assert f.reason == "ACCOUNT_NOT_FOUND"
    stream = api.platform.WatchEntitlementChanges(activation_pb2.WatchEntitlementChangesRequest())
    first = next(iter(stream))  # from now: a bookmark first
    stream.cancel()
    assert first.cursor and not first.HasField("status")
    assert first.type == activation_pb2.EntitlementChange.CHANGE_TYPE_UNSPECIFIED


@pytest.mark.parametrize("agency_id,reason", [("ENDED01", "REGISTRATION_ENDED"), ("CAT0006", "CATEGORY_NOT_COVERED"),
                                               ("FUTURE1", "REGISTRATION_NOT_STARTED"), ("ENDTODAY", "REGISTRATION_ENDED")])
def test_ineligible_people_are_explained_and_refused(api: Api, agency_id: str, reason: str) -> None:
    from support import SPECIAL
    birth = SPECIAL[agency_id][0]
    check = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers"))
    [decision] = check.decisions
    assert not decision.eligible
    assert reason in [c.reason_code for c in decision.criteria if not c.passed]
    assert not decision.HasField("funding_plan")
    f = expect_error(api.advisor.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms"), grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "NOT_ELIGIBLE" and reason in f.metadata["failed_criteria"]
