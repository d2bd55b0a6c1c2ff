"""A co-funder sees only its own share of an activation's money in ListActivations (audit.proto's
promise): the `funding` and the decision's `funding_plan` list its share alone, while an admin sees
every funder's. Both funders of a program share one decision object, whose serialized fields are
cached (convert._decision_fields): asked one after the other, each still gets only its own. On both
backends, through the real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from own_server import next_ledger_person, own_server
from support import Api, Harness, identity

from entitlement.v1 import activation_pb2, audit_pb2, common_pb2

PREMIUM, OPENCFA = "premium-job-seekers", "opencfa-apprentices"


@pytest.fixture(scope="module")
def h(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
      request: pytest.FixtureRequest) -> Iterator[Harness]:
    with own_server(backend[0], tmp_path_factory.mktemp(f"share-{backend[0]}"), request) as server:
        yield server


def _activate(api: Api, program: str) -> str:
    agency_id, birth = next_ledger_person()
    return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{program}", platform="platforms/openclassrooms",
        reason="share test", mentor_id="M-0042" if program == OPENCFA else "")).activation.name


def _shares(plan: common_pb2.FundingPlan) -> list[tuple[str, int, int]]:
    return [(s.funder, s.share_basis_points, s.amount_cents) for s in plan.shares]


def _listed(api: Api, caller: str, name: str) -> activation_pb2.Activation:
    [a] = [a for a in api.as_(caller).ListActivations(audit_pb2.ListActivationsRequest(page_size=500)).activations
           if a.name == name]
    return a


def test_a_cofunder_sees_only_its_own_share(h: Harness) -> None:
    api = Api(h)
    cfa, premium = _activate(api, OPENCFA), _activate(api, PREMIUM)
    full_cfa = _listed(api, "admin", cfa)
    assert _shares(full_cfa.funding) == [("opco-opcalia", 5000, 12000), ("region-idf", 5000, 12000)]
    assert _shares(full_cfa.decision.funding_plan) == _shares(full_cfa.funding)

    for _ in range(2):  # again: the cache of serialized decisions mixes no caller's answer into another's
        idf = _listed(api, "funder-idf", cfa)
        assert _shares(idf.funding) == [("region-idf", 5000, 12000)]
        assert _shares(idf.decision.funding_plan) == [("region-idf", 5000, 12000)]
        # The rest of the plan is the activation's (and public: ListPrograms shows the split).
        assert (idf.funding.price_per_month_cents, idf.funding.months, idf.funding.total_cents) == (2000, 12, 24000)
        for caller, funder in (("funder-ministry", "ministry-of-labour"), ("funder-ft", "france-travail")):
            a = _listed(api, caller, premium)
            assert [f for f, _, _ in _shares(a.funding)] == [funder]
            assert [f for f, _, _ in _shares(a.decision.funding_plan)] == [funder]
        full = _listed(api, "admin", premium)
        assert [f for f, _, _ in _shares(full.funding)] == ["france-travail", "ministry-of-labour"]
        assert _listed(api, "admin", cfa) == full_cfa
    # An admin asking for one funder's activations still sees the whole plan.
    [a] = [a for a in api.admin.ListActivations(audit_pb2.ListActivationsRequest(
        funder="region-idf", page_size=500)).activations if a.name == cfa]
    assert len(a.funding.shares) == 2
