"""Who may call what, over the real channel, on both backends: every RPC of the role table x every
role x a resource in the caller's scope and one outside it.

The matrix is generated from ROLES (entitlement/api/identity.py), the one map RPC -> roles, so a new
RPC is in it at once: until it gets a case of its own in SCOPES, a generic one calls it with an
empty request and checks the role dimension (refused roles get ROLE_NOT_ALLOWED, allowed roles get
anything else). A case of its own adds the scope dimension. Scopes, with the representative
callers of each role:
- advisor (advisor-paris, agency 75011): activations of its agency, not those of 69003 (advisor-lyon);
- platform (platform-oc, openclassrooms): its own accounts and tokens, not otherplatform's;
- funder (funder-ministry, ministry-of-labour): programs it funds (premium-job-seekers), not
  opencfa-apprentices (region-idf's);
- agency, admin: no resource scope (an admin sees and does everything an advisor or funder may).
A role outside an RPC's set is PERMISSION_DENIED `ROLE_NOT_ALLOWED` whatever the resource; a known
caller outside its scope is PERMISSION_DENIED `OUT_OF_SCOPE` (or sees nothing: lists and streams are
filtered in the query), and the answer is the same whether the resource exists or not.

Runs on a server of its own (tests/own_server.py), with people of its own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from own_server import Person, own_server
from support import TODAY, As, Failure, Harness, date_msg, failure, identity

from entitlement.api.identity import ROLES
from entitlement.changes import encode_cursor
from entitlement.v1 import activation_pb2, audit_pb2, eligibility_pb2, registry_pb2, registry_pb2_grpc

SERVICES = [eligibility_pb2.DESCRIPTOR.services_by_name["EligibilityService"],
            activation_pb2.DESCRIPTOR.services_by_name["ActivationService"],
            audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
            registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]]
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}

DENIED = grpc.StatusCode.PERMISSION_DENIED
REPRESENTATIVE = {"advisor": "advisor-paris", "platform": "platform-oc", "funder": "funder-ministry",
                  "agency": "agency-feed", "admin": "admin"}
ALL_ROLES = sorted(REPRESENTATIVE)
PREMIUM, CFA = "premium-job-seekers", "opencfa-apprentices"
PEOPLE = 300


def people() -> dict[str, Person]:
    """Born in 2002 (under 26), Paris, registered since 2024, category 1: eligible to premium and,
    with a mentor, to opencfa."""
    return {f"M{i:07d}": ((dt.date(2002, 1, 1) + dt.timedelta(days=i)).isoformat(), "75011", "2024-01-15", "", "1")
            for i in range(1, PEOPLE + 1)}


@dataclass
class World:
    h: Harness
    registry_file: Path
    paris: str = ""   # premium, agency 75011, openclassrooms, redeemed as acc-oc
    lyon: str = ""    # premium, agency 69003, otherplatform, redeemed as acc-other
    cfa: str = ""     # opencfa (region-idf), agency 75011, openclassrooms, not redeemed
    _next: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _stubs: dict[str, As] = field(default_factory=dict)

    def as_(self, caller: str) -> As:
        if caller not in self._stubs:
            self._stubs[caller] = As(self.h.channel, self.h.tokens[caller])
        return self._stubs[caller]

    def person(self) -> tuple[str, dt.date]:
        i = next(self._next)
        assert i <= PEOPLE, "raise PEOPLE"
        return f"M{i:07d}", dt.date(2002, 1, 1) + dt.timedelta(days=i)

    def activate(self, advisor: str = "advisor-paris", program: str = PREMIUM,
                 platform: str = "openclassrooms") -> tuple[str, str]:
        agency_id, birth = self.person()
        resp = self.as_(advisor).ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=f"programs/{program}", platform=f"platforms/{platform}",
            reason="matrix", mentor_id="T-1" if program == CFA else ""))
        return resp.activation.name.split("/", 1)[1], resp.activation_token


@pytest.fixture(scope="module")
def world(backend: tuple[str, str], tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[World]:
    root = tmp_path_factory.mktemp(f"authz-{backend[0]}")
    with own_server(backend[0], root, request, people=people()) as h:
        w = World(h, root / "registry.csv")
        w.paris, token = w.activate("advisor-paris")
        w.as_("platform-oc").RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=token, account_id="acc-oc"))
        w.lyon, token = w.activate("advisor-lyon", platform="otherplatform")
        w.as_("platform-other").RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=token, account_id="acc-other"))
        w.cfa, _ = w.activate("advisor-paris", program=CFA)
        yield w


# ----------------------------------------------------------------------------------- the cases

Invoke = Callable[[World, str, str], Any]  # (world, caller id, side) -> response (raises RpcError)
Check = Callable[[World, str, str, Any], None]  # (world, role, side, response)


@dataclass(frozen=True)
class Scope:
    """How to call one RPC on a resource in (side "in") or out of ("out") the representative
    caller's scope; what a scoped role gets out of scope (an error, or None: an answer that
    `check` inspects); `scoped`: the roles that have a scope on this RPC's resources."""

    invoke: Invoke
    check: Check = lambda w, role, side, resp: None
    out_error: tuple[grpc.StatusCode, str] | None = None
    scoped: frozenset[str] = frozenset()
    generic: bool = False  # an allowed role may get any answer but ROLE_NOT_ALLOWED


def generic(path: str) -> Scope:
    """The case of an RPC without one of its own: an empty request (a stream read for a moment)."""
    m = METHODS[path]
    request_cls = message_factory.GetMessageClass(m.input_type)
    response_cls = message_factory.GetMessageClass(m.output_type)
    kw = {"request_serializer": request_cls.SerializeToString, "response_deserializer": response_cls.FromString}

    def invoke(w: World, caller: str, side: str) -> Any:
        md = (("authorization", f"Bearer {w.h.tokens[caller]}"),)
        ch = w.h.channel
        if m.client_streaming and m.server_streaming:
            return list(ch.stream_stream(path, **kw)(iter([request_cls()]), metadata=md, timeout=15))
        if m.client_streaming:
            return ch.stream_unary(path, **kw)(iter([request_cls()]), metadata=md, timeout=15)
        if m.server_streaming:
            got = []
            try:
                for item in ch.unary_stream(path, **kw)(request_cls(), metadata=md, timeout=1.5):
                    got.append(item)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            return got
        return ch.unary_unary(path, **kw)(request_cls(), metadata=md, timeout=15)
    return Scope(invoke, generic=True)


def _agency_activation(w: World, side: str, program: str = PREMIUM) -> tuple[str, str]:
    """A fresh activation of advisor-paris's agency (in) or of advisor-lyon's (out)."""
    return w.activate("advisor-paris" if side == "in" else "advisor-lyon", program)


def _transition(method: str, prepare: Callable[[World, str, str], None] | None = None) -> Invoke:
    def invoke(w: World, caller: str, side: str) -> Any:
        activation_id, _ = _agency_activation(w, side)
        owner = "advisor-paris" if side == "in" else "advisor-lyon"
        if prepare:
            prepare(w, owner, activation_id)
        return getattr(w.as_(caller), method)(activation_pb2.TransitionActivationRequest(
            name=f"activations/{activation_id}", reason="matrix"))
    return invoke


def _suspend_first(w: World, owner: str, activation_id: str) -> None:
    w.as_(owner).SuspendActivation(activation_pb2.TransitionActivationRequest(
        name=f"activations/{activation_id}", reason="matrix"))


def _state(expected: int) -> Check:
    def check(w: World, role: str, side: str, resp: Any) -> None:
        assert resp.state == expected
    return check


def _check_eligibility(w: World, caller: str, side: str) -> Any:
    agency_id, birth = w.person()
    return w.as_(caller).CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}"))


def _activate(w: World, caller: str, side: str) -> Any:
    agency_id, birth = w.person()
    platform = "openclassrooms" if side == "in" else "otherplatform"
    return w.as_(caller).ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=f"programs/{PREMIUM}", platform=f"platforms/{platform}",
        reason="matrix"))


def _activated_for_own_agency(w: World, role: str, side: str, resp: Any) -> None:
    # Advisors act for their agency, whatever the platform: the activation records it.
    assert resp.activation.agency_code == ("75011" if role == "advisor" else "-")


def _get(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).GetActivation(activation_pb2.GetActivationRequest(
        name=f"activations/{w.paris if side == 'in' else w.lyon}"))


def _redeem(w: World, caller: str, side: str) -> Any:
    _, token = w.activate("advisor-paris", platform="openclassrooms" if side == "in" else "otherplatform")
    return w.as_(caller).RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=token, account_id=f"acc-{uuid.uuid4().hex[:8]}"))


def _verify(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(
        account_id="acc-oc" if side == "in" else "acc-other"))


def _verified(w: World, role: str, side: str, resp: Any) -> None:
    if side == "in":
        assert resp.active and resp.activation == f"activations/{w.paris}"
    else:  # another platform's account answers exactly like an account nobody has
        unknown = w.as_("platform-oc").VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(
            account_id="acc-nobody"))
        assert not resp.active and not resp.activation
        unknown.account_id = "acc-other"
        assert resp == unknown


def _report_usage(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).ReportUsage(activation_pb2.ReportUsageRequest(
        account_id="acc-oc" if side == "in" else "acc-other", month=TODAY.strftime("%Y-%m"), used=True))


def _watch(w: World, caller: str, side: str) -> Any:
    """The changes the caller's stream sends from the start of the log within a second."""
    call = w.as_(caller).WatchEntitlementChanges(activation_pb2.WatchEntitlementChangesRequest(
        cursor=encode_cursor(0)), timeout=1.5)
    seen = []
    try:
        for change in call:
            seen.append(change.status.activation)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return seen


def _watched(w: World, role: str, side: str, seen: Any) -> None:
    if side == "in":
        assert f"activations/{w.paris}" in seen
    else:
        assert f"activations/{w.lyon}" not in seen and seen  # its own changes came, not the other's


def _list_activations(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).ListActivations(audit_pb2.ListActivationsRequest(
        program=f"programs/{PREMIUM if side == 'in' else CFA}", page_size=500))


def _listed(w: World, role: str, side: str, resp: Any) -> None:
    names = {a.name for a in resp.activations}
    assert (f"activations/{w.paris}" if side == "in" else f"activations/{w.cfa}") in names
    if role == "funder":  # and, unfiltered, nothing of a program it does not fund
        everything = w.as_("funder-ministry").ListActivations(audit_pb2.ListActivationsRequest(page_size=500))
        assert {a.program for a in everything.activations} == {f"programs/{PREMIUM}"}


def _report(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).GetFundingReport(audit_pb2.GetFundingReportRequest(
        funder="ministry-of-labour" if side == "in" else "region-idf"))


def _reported(w: World, role: str, side: str, resp: Any) -> None:
    funders = {r.funder for r in resp.rows}
    assert funders == {"ministry-of-labour" if side == "in" else "region-idf"}
    if role == "funder":
        everything = w.as_("funder-ministry").GetFundingReport(audit_pb2.GetFundingReportRequest())
        assert {r.funder for r in everything.rows} == {"ministry-of-labour"}


def _events(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).ListEvents(audit_pb2.ListEventsRequest(page_size=1000))


def _evented(w: World, role: str, side: str, resp: Any) -> None:
    subjects = {e.subject for e in resp.events}
    if side == "in":
        assert f"activations/{w.paris}" in subjects
    elif role == "funder":  # another funder's program, registry and caller events: not its business
        assert f"activations/{w.cfa}" not in subjects
        assert {e.type.split(".")[0] for e in resp.events} == {"activation"}
    else:
        assert f"activations/{w.cfa}" in subjects


def _keys(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).GetSigningKeys(activation_pb2.GetSigningKeysRequest())


def _programs(w: World, caller: str, side: str) -> Any:
    return w.as_(caller).ListPrograms(eligibility_pb2.ListProgramsRequest())


def _import(w: World, caller: str, side: str) -> Any:
    """The registry extract already in force, pushed again: answered `unchanged`."""
    data = w.registry_file.read_bytes()
    header = registry_pb2.ExtractHeader(extracted_on=date_msg(TODAY - dt.timedelta(days=1)),
                                        source_name="registry.csv", sha256=hashlib.sha256(data).hexdigest())
    stub = registry_pb2_grpc.RegistryServiceStub(w.h.channel)
    return stub.ImportExtract(iter([registry_pb2.ImportExtractRequest(header=header),
                                    registry_pb2.ImportExtractRequest(chunk=data)]),
                              metadata=(("authorization", f"Bearer {w.h.tokens[caller]}"),), timeout=30)


OUT_OF_SCOPE = (DENIED, "OUT_OF_SCOPE")
SCOPES: dict[str, Scope] = {
    "/entitlement.v1.EligibilityService/CheckEligibility": Scope(
        _check_eligibility, lambda w, role, side, resp: None if resp.decisions[0].eligible else pytest.fail("eligible")),
    "/entitlement.v1.EligibilityService/ListPrograms": Scope(_programs),
    "/entitlement.v1.ActivationService/ActivateEntitlement": Scope(_activate, _activated_for_own_agency),
    "/entitlement.v1.ActivationService/GetActivation": Scope(
        _get, lambda w, role, side, resp: None, OUT_OF_SCOPE, frozenset({"advisor"})),
    "/entitlement.v1.ActivationService/SuspendActivation": Scope(
        _transition("SuspendActivation"), _state(activation_pb2.SUSPENDED), OUT_OF_SCOPE, frozenset({"advisor"})),
    "/entitlement.v1.ActivationService/ResumeActivation": Scope(
        _transition("ResumeActivation", _suspend_first), _state(activation_pb2.ACTIVE), OUT_OF_SCOPE,
        frozenset({"advisor"})),
    "/entitlement.v1.ActivationService/RevokeActivation": Scope(
        _transition("RevokeActivation"), _state(activation_pb2.REVOKED), OUT_OF_SCOPE, frozenset({"advisor"})),
    "/entitlement.v1.ActivationService/RedeemActivationToken": Scope(
        _redeem, lambda w, role, side, resp: None if resp.active else pytest.fail("not active"),
        (DENIED, "TOKEN_WRONG_AUDIENCE"), frozenset({"platform"})),
    "/entitlement.v1.ActivationService/VerifyEntitlement": Scope(_verify, _verified, None, frozenset({"platform"})),
    "/entitlement.v1.ActivationService/GetSigningKeys": Scope(_keys),
    "/entitlement.v1.ActivationService/ReportUsage": Scope(
        _report_usage, out_error=(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"), scoped=frozenset({"platform"})),
    "/entitlement.v1.ActivationService/WatchEntitlementChanges": Scope(
        _watch, _watched, None, frozenset({"platform"})),
    "/entitlement.v1.AuditService/ListActivations": Scope(
        _list_activations, _listed, OUT_OF_SCOPE, frozenset({"funder"})),
    "/entitlement.v1.AuditService/GetFundingReport": Scope(_report, _reported, OUT_OF_SCOPE, frozenset({"funder"})),
    "/entitlement.v1.AuditService/ListEvents": Scope(_events, _evented, None, frozenset({"funder"})),
    "/entitlement.v1.RegistryService/ImportExtract": Scope(
        _import, lambda w, role, side, resp: None if resp.unchanged else pytest.fail("changed")),
}


def test_scope_cases_name_rpcs_of_the_role_table() -> None:
    assert set(SCOPES) <= set(ROLES), set(SCOPES) - set(ROLES)
    assert set(ROLES) == set(METHODS), "the role table covers the contract (test_validation.py says more)"
    for path, scope in SCOPES.items():
        assert scope.scoped <= ROLES[path], path


def scope_of(path: str) -> Scope:
    return SCOPES.get(path) or generic(path)


MATRIX = [(path, role, side) for path in sorted(ROLES) for role in ALL_ROLES for side in ("in", "out")]


def _id(path: str, role: str, side: str) -> str:
    return f"{path.rsplit('/', 1)[1]}-{role}-{side}"


@pytest.mark.parametrize("path,role,side", MATRIX, ids=[_id(*m) for m in MATRIX])
def test_rpc_x_role_x_scope(world: World, path: str, role: str, side: str) -> None:
    scope = scope_of(path)
    caller = REPRESENTATIVE[role]
    try:
        resp = scope.invoke(world, caller, side)
    except grpc.RpcError as err:
        f = failure(err)
        if role not in ROLES[path]:
            assert (f.code, f.reason) == (DENIED, "ROLE_NOT_ALLOWED"), f
            assert f.metadata["role"] == role
            return
        assert f.reason != "ROLE_NOT_ALLOWED", f
        if scope.generic:
            return
        assert side == "out" and role in scope.scoped and scope.out_error, f"{role} refused in scope: {f}"
        assert (f.code, f.reason) == scope.out_error, f
        return
    assert role in ROLES[path], f"{role} may not call {path}, yet it was answered"
    assert not (side == "out" and role in scope.scoped and scope.out_error), \
        f"{role} was answered out of its scope"
    scope.check(world, role, side, resp)


# ------------------------------------------------------------- out of scope looks like missing

def _without(f: Failure, *values: str) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    message = f.message
    for v in values:
        message = message.replace(v, "X")
    metadata = {k: v for k, v in f.metadata.items() if k != "request_id"}
    for k, v in metadata.items():
        for value in values:
            metadata[k] = metadata[k].replace(value, "X")
    return f.code, f.reason, message, metadata


def _fail(fn: Callable[[Any], Any], request: Any) -> Failure:
    try:
        fn(request)
    except grpc.RpcError as err:
        return failure(err)
    raise AssertionError("the call succeeded")


def test_out_of_scope_and_missing_resources_answer_alike(world: World) -> None:
    missing = uuid.uuid4().hex
    advisor = world.as_("advisor-paris")
    for method, request in (
            ("GetActivation", lambda a: activation_pb2.GetActivationRequest(name=f"activations/{a}")),
            ("SuspendActivation", lambda a: activation_pb2.TransitionActivationRequest(
                name=f"activations/{a}", reason="x")),
            ("RevokeActivation", lambda a: activation_pb2.TransitionActivationRequest(
                name=f"activations/{a}", reason="x"))):
        other = _fail(getattr(advisor, method), request(world.lyon))
        absent = _fail(getattr(advisor, method), request(missing))
        assert _without(other, world.lyon) == _without(absent, missing)
        assert other.code == DENIED
    platform = world.as_("platform-oc")
    other = _fail(platform.ReportUsage, activation_pb2.ReportUsageRequest(account_id="acc-other", month="2026-03",
                                                                         used=True))
    absent = _fail(platform.ReportUsage, activation_pb2.ReportUsageRequest(account_id="acc-nobody", month="2026-03",
                                                                          used=True))
    assert _without(other, "acc-other") == _without(absent, "acc-nobody")
    funder = world.as_("funder-ministry")
    other = _fail(funder.ListActivations, audit_pb2.ListActivationsRequest(program=f"programs/{CFA}"))
    absent = _fail(funder.ListActivations, audit_pb2.ListActivationsRequest(program="programs/no-such-program"))
    assert _without(other, CFA) == _without(absent, "no-such-program")
    other = _fail(funder.GetFundingReport, audit_pb2.GetFundingReportRequest(funder="region-idf"))
    absent = _fail(funder.GetFundingReport, audit_pb2.GetFundingReportRequest(funder="no-such-funder"))
    assert _without(other, "region-idf") == _without(absent, "no-such-funder")


def test_errors_name_no_other_agency_activation_detail(world: World) -> None:
    f = _fail(world.as_("advisor-paris").GetActivation, activation_pb2.GetActivationRequest(
        name=f"activations/{world.lyon}"))
    assert "69003" not in f.message and not re.search(r"lyon|A0002", f.message)
