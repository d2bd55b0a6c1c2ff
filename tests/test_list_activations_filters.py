"""ListActivations' filters at their boundaries, as the proto states them, through the real server
on SQLite and PostgreSQL: an activation is live (ACTIVE, SUSPENDED) up to and including its end
date and EXPIRED from the day after, whichever state filter asks; `create_time_from` includes the
activations created at that instant, `create_time_to` excludes them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from own_server import next_ledger_person, on_day, own_server
from support import Api, identity

from entitlement.v1 import activation_pb2, audit_pb2

PREMIUM = "programs/premium-job-seekers"


def _activate(api: Api) -> activation_pb2.Activation:
    agency_id, birth = next_ledger_person()
    return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=PREMIUM, platform="platforms/openclassrooms",
        reason="filters")).activation


def _listed(api: Api, **filters: Any) -> dict[str, int]:
    """name -> the state the listing shows."""
    page = api.admin.ListActivations(audit_pb2.ListActivationsRequest(page_size=500, **filters))
    assert page.next_page_token == ""
    return {a.name: a.state for a in page.activations}


def _names(api: Api, **filters: Any) -> set[str]:
    return set(_listed(api, **filters))


def test_a_live_activation_is_listed_as_live_on_its_end_date_and_expired_the_day_after(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with own_server(backend[0], tmp_path / "srv", request) as h:
        api = Api(h)
        active = _activate(api)
        suspended = _activate(api)
        api.advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(name=suspended.name,
                                                                                 reason="boundary"))
        end = dt.date(active.end_date.year, active.end_date.month, active.end_date.day)
        assert (suspended.end_date.year, suspended.end_date.month, suspended.end_date.day) == (
            end.year, end.month, end.day)
        with on_day(h, end):
            assert _listed(api) == {active.name: activation_pb2.ACTIVE, suspended.name: activation_pb2.SUSPENDED}
            assert _names(api, state=activation_pb2.ACTIVE) == {active.name}
            assert _names(api, state=activation_pb2.SUSPENDED) == {suspended.name}
            assert _names(api, state=activation_pb2.EXPIRED) == set()
        with on_day(h, end + dt.timedelta(days=1)):
            assert _listed(api) == {active.name: activation_pb2.EXPIRED, suspended.name: activation_pb2.EXPIRED}
            assert _names(api, state=activation_pb2.ACTIVE) == set()
            assert _names(api, state=activation_pb2.SUSPENDED) == set()
            assert _names(api, state=activation_pb2.EXPIRED) == {active.name, suspended.name}


def test_create_time_from_includes_its_instant_and_create_time_to_excludes_it(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with own_server(backend[0], tmp_path / "srv", request) as h:
        api = Api(h)
        a = _activate(api)
        at = a.create_time
        later = timestamp_pb2.Timestamp(seconds=at.seconds, nanos=at.nanos + 1000)  # one microsecond on
        assert at.nanos + 1000 < 10**9
        assert _names(api, create_time_from=at) == {a.name}
        assert _names(api, create_time_from=later) == set()
        assert _names(api, create_time_to=at) == set()
        assert _names(api, create_time_to=later) == {a.name}
        assert _names(api, create_time_from=at, create_time_to=later) == {a.name}
