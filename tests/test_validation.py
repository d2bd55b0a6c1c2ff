"""Bad input and wrong callers, over the real channel, on both backends: every implemented RPC
answers INVALID_ARGUMENT with a BadRequest naming the field; credentials and roles are checked
before anything else (the role table covers every RPC of the contract); and error messages leak
neither SQL nor the job seeker's identifier."""

from __future__ import annotations

import base64
import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory, timestamp_pb2
from google.protobuf.message import Message
from google.type import date_pb2

from support import TODAY, Api, Failure, expect_error, failure, identity, next_person

from entitlement.api.identity import ROLES
from entitlement.v1 import activation_pb2, audit_pb2, common_pb2, eligibility_pb2, registry_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PROGRAM = "programs/premium-job-seekers"
PLATFORM = "platforms/openclassrooms"
BIRTH = dt.date(1990, 5, 17)
# Identifiers that must never be echoed back: a well-formed one and a malformed one.
LEAKY_ID = "LEAKZQ7731"
LEAKY_BAD_ID = "LEAK-ZQ7731!"
SQL_WORDS = re.compile(r"\b(select|insert|update|delete)\b|sqlalchemy|psycopg|sqlite|traceback", re.IGNORECASE)
NAME = "activations/" + "ab" * 16
REPRESENTATIVE = {"advisor": "advisor-paris", "platform": "platform-oc", "funder": "funder-ministry",
                  "agency": "agency-feed", "admin": "admin"}


def date(y: int, m: int, d: int) -> date_pb2.Date:
    return date_pb2.Date(year=y, month=m, day=d)


def who(agency_id: str = LEAKY_ID, birth: date_pb2.Date | None = None) -> common_pb2.JobSeekerIdentity:
    return common_pb2.JobSeekerIdentity(agency_id=agency_id, birth_date=birth or date(1990, 5, 17))


def check(**kw: Any) -> eligibility_pb2.CheckEligibilityRequest:
    kw.setdefault("job_seeker", who())
    return eligibility_pb2.CheckEligibilityRequest(**kw)


def activate(**kw: Any) -> activation_pb2.ActivateEntitlementRequest:
    kw.setdefault("job_seeker", who())
    kw.setdefault("program", PROGRAM)
    kw.setdefault("platform", PLATFORM)
    return activation_pb2.ActivateEntitlementRequest(**kw)


def transition(**kw: Any) -> activation_pb2.TransitionActivationRequest:
    kw.setdefault("name", NAME)
    kw.setdefault("reason", "a reason")
    return activation_pb2.TransitionActivationRequest(**kw)


def ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


@dataclass(frozen=True)
class Case:
    id: str
    caller: str
    method: str
    request: Message
    field: str  # the field the BadRequest must name


def _cases() -> list[Case]:
    tomorrow = TODAY + dt.timedelta(days=1)
    cases: list[Case] = []

    def add(id: str, caller: str, method: str, request: Message, field: str) -> None:
        cases.append(Case(id, caller, method, request, field))

    # Identity of the job seeker, on both RPCs that take one.
    for method, make, caller in (("CheckEligibility", check, "advisor-paris"),
                                 ("ActivateEntitlement", activate, "advisor-paris")):
        add(f"{method}-missing-job_seeker", caller, method, make(job_seeker=None), "job_seeker")
        add(f"{method}-missing-agency_id", caller, method,
            make(job_seeker=common_pb2.JobSeekerIdentity(birth_date=date(1990, 5, 17))), "job_seeker.agency_id")
        add(f"{method}-missing-birth_date", caller, method,
            make(job_seeker=common_pb2.JobSeekerIdentity(agency_id=LEAKY_ID)), "job_seeker.birth_date")
        add(f"{method}-empty-birth_date", caller, method,
            make(job_seeker=common_pb2.JobSeekerIdentity(agency_id=LEAKY_ID, birth_date=date_pb2.Date())),
            "job_seeker.birth_date")
        add(f"{method}-malformed-agency_id", caller, method, make(job_seeker=who(LEAKY_BAD_ID)),
            "job_seeker.agency_id")
        add(f"{method}-too-long-agency_id", caller, method, make(job_seeker=who("A" * 33)), "job_seeker.agency_id")
        add(f"{method}-feb-30", caller, method, make(job_seeker=who(birth=date(1990, 2, 30))),
            "job_seeker.birth_date")
        add(f"{method}-partial-birth_date", caller, method, make(job_seeker=who(birth=date(1990, 0, 0))),
            "job_seeker.birth_date")
        for bad in ("premium-job-seekers", "programs/Premium", "programs/a", "programs/x/y", "programs/"):
            add(f"{method}-malformed-program-{bad}", caller, method, make(program=bad), "program")

    add("CheckEligibility-as_of-future", "advisor-paris", "CheckEligibility",
        check(as_of=date(tomorrow.year, tomorrow.month, tomorrow.day)), "as_of")
    add("CheckEligibility-as_of-invalid", "advisor-paris", "CheckEligibility", check(as_of=date(2025, 2, 30)), "as_of")

    add("ListPrograms-as_of-invalid", "advisor-paris", "ListPrograms",
        eligibility_pb2.ListProgramsRequest(as_of=date(2025, 13, 1)), "as_of")
    add("ListPrograms-negative-page_size", "advisor-paris", "ListPrograms",
        eligibility_pb2.ListProgramsRequest(page_size=-1), "page_size")
    add("ListPrograms-forged-page_token", "advisor-paris", "ListPrograms",
        eligibility_pb2.ListProgramsRequest(page_token="Zm9yZ2VkLXRva2VuLWZvcmdlZC10b2tlbg"), "page_token")

    add("ActivateEntitlement-missing-program", "advisor-paris", "ActivateEntitlement", activate(program=""), "program")
    add("ActivateEntitlement-missing-platform", "advisor-paris", "ActivateEntitlement", activate(platform=""),
        "platform")
    add("ActivateEntitlement-malformed-platform", "advisor-paris", "ActivateEntitlement",
        activate(platform="openclassrooms"), "platform")
    # The names' grammars of common.proto: a platform id begins with a letter or a digit, a program
    # id with a letter.
    add("ActivateEntitlement-platform-leading-dot", "advisor-paris", "ActivateEntitlement",
        activate(platform="platforms/.oc"), "platform")
    add("ActivateEntitlement-platform-too-long", "advisor-paris", "ActivateEntitlement",
        activate(platform="platforms/" + "p" * 64), "platform")
    add("ActivateEntitlement-program-leading-digit", "advisor-paris", "ActivateEntitlement",
        activate(program="programs/1premium"), "program")
    for bad in ("has space", "x" * 65, "semi;colon", "é"):
        add(f"ActivateEntitlement-bad-request_id-{bad[:8]}", "advisor-paris", "ActivateEntitlement",
            activate(request_id=bad), "request_id")
    add("ActivateEntitlement-long-reason", "advisor-paris", "ActivateEntitlement", activate(reason="r" * 501),
        "reason")
    add("ActivateEntitlement-control-char-reason", "advisor-paris", "ActivateEntitlement",
        activate(reason="line\nbreak"), "reason")
    # DEL and the C1 controls too: U+009B is a terminal's CSI, an escape sequence in the CLI's output
    # and in the permanent event log (a reason is kept for good).
    add("ActivateEntitlement-del-reason", "advisor-paris", "ActivateEntitlement", activate(reason="rub\x7fout"),
        "reason")
    add("ActivateEntitlement-c1-control-reason", "advisor-paris", "ActivateEntitlement",
        activate(reason="clear\x9b2J"), "reason")

    add("GetActivation-missing-name", "advisor-paris", "GetActivation", activation_pb2.GetActivationRequest(), "name")
    for bad in ("activations/xyz", "activations/" + "AB" * 16, "activation/" + "ab" * 16, "ab" * 16,
                "activations/" + "ab" * 17):
        add(f"GetActivation-malformed-name-{bad[:14]}", "advisor-paris", "GetActivation",
            activation_pb2.GetActivationRequest(name=bad), "name")
    # Exactly 32 hexadecimal digits, and nothing after them (a trailing newline is not the end of a
    # name: `$` would match before it).
    for label, bad in (("31-hex", "activations/" + "a" * 31), ("33-hex", "activations/" + "a" * 33),
                       ("trailing-newline", "activations/" + "ab" * 16 + "\n")):
        add(f"GetActivation-name-{label}", "advisor-paris", "GetActivation",
            activation_pb2.GetActivationRequest(name=bad), "name")
    add("ActivateEntitlement-program-trailing-newline", "advisor-paris", "ActivateEntitlement",
        activate(program="programs/premium-job-seekers\n"), "program")

    for method in ("SuspendActivation", "ResumeActivation", "RevokeActivation", "ReissueActivationToken"):
        add(f"{method}-missing-name", "advisor-paris", method, transition(name=""), "name")
        add(f"{method}-malformed-name", "advisor-paris", method, transition(name="activations/not-hex"), "name")
        add(f"{method}-empty-reason", "advisor-paris", method, transition(reason=""), "reason")
        add(f"{method}-long-reason", "advisor-paris", method, transition(reason="r" * 501), "reason")
        add(f"{method}-c1-control-reason", "advisor-paris", method, transition(reason="\x9b31mred"), "reason")
        add(f"{method}-bad-request_id", "advisor-paris", method, transition(request_id="no spaces please"),
            "request_id")

    redeem = activation_pb2.RedeemActivationTokenRequest
    add("RedeemActivationToken-missing-token", "platform-oc", "RedeemActivationToken", redeem(account_id="a1"),
        "token")
    add("RedeemActivationToken-long-token", "platform-oc", "RedeemActivationToken",
        redeem(token="x" * 4097, account_id="a1"), "token")
    add("RedeemActivationToken-missing-account_id", "platform-oc", "RedeemActivationToken", redeem(token="a.b.c"),
        "account_id")
    add("RedeemActivationToken-space-account_id", "platform-oc", "RedeemActivationToken",
        redeem(token="a.b.c", account_id="has space"), "account_id")
    add("RedeemActivationToken-long-account_id", "platform-oc", "RedeemActivationToken",
        redeem(token="a.b.c", account_id="a" * 129), "account_id")
    verify = activation_pb2.VerifyEntitlementRequest
    add("VerifyEntitlement-missing-account_id", "platform-oc", "VerifyEntitlement", verify(), "account_id")
    add("VerifyEntitlement-non-ascii-account_id", "platform-oc", "VerifyEntitlement", verify(account_id="élève"),
        "account_id")

    lst = audit_pb2.ListActivationsRequest
    add("ListActivations-negative-page_size", "admin", "ListActivations", lst(page_size=-5), "page_size")
    add("ListActivations-forged-page_token", "admin", "ListActivations",
        lst(page_token=base64.urlsafe_b64encode(b"\0" * 16 + b'{"k":"activations","f":"x","p":[]}').decode()),
        "page_token")
    add("ListActivations-garbage-page_token", "admin", "ListActivations", lst(page_token="!!!not base64!!!"),
        "page_token")
    add("ListActivations-malformed-program", "admin", "ListActivations", lst(program="premium"), "program")
    add("ListActivations-malformed-funder", "admin", "ListActivations", lst(funder="Region IDF"), "funder")
    add("ListActivations-malformed-agency_code", "admin", "ListActivations", lst(agency_code="75 011"),
        "agency_code")
    add("ListActivations-long-agency_code", "admin", "ListActivations", lst(agency_code="A" * 17), "agency_code")
    # The grammars the proto states: an agency code and a mentor id begin with a letter or a digit;
    # an account id is printable ASCII without the space, on every RPC that takes one.
    add("ListActivations-agency_code-leading-dash", "admin", "ListActivations", lst(agency_code="-75011"),
        "agency_code")
    add("CheckEligibility-mentor_id-leading-dot", "advisor-paris", "CheckEligibility", check(mentor_id=".tutor"),
        "mentor_id")
    add("ReportUsage-space-account_id", "platform-oc", "ReportUsage",
        activation_pb2.ReportUsageRequest(account_id="has space", month="2026-03", used=True), "account_id")
    add("VerifyEntitlement-space-account_id", "platform-oc", "VerifyEntitlement",
        activation_pb2.VerifyEntitlementRequest(account_id="has space"), "account_id")
    add("ListActivations-unknown-state", "admin", "ListActivations", lst(state=99), "state")  # type: ignore[arg-type]
    add("ListActivations-timestamp-before-year-1", "admin", "ListActivations",
        lst(create_time_from=ts(-99_999_999_999)), "create_time_from")
    add("ListActivations-timestamp-after-year-9999", "admin", "ListActivations",
        lst(create_time_to=ts(253_402_300_800)), "create_time_to")  # 10000-01-01T00:00:00Z
    add("ListActivations-timestamp-bad-nanos", "admin", "ListActivations",
        lst(create_time_to=ts(0, 2_000_000_000)), "create_time_to")
    add("ListActivations-create_time_to-before-create_time_from", "admin", "ListActivations",
        lst(create_time_from=ts(1_780_000_000), create_time_to=ts(1_770_000_000)), "create_time_to")

    report = audit_pb2.GetFundingReportRequest
    for bad in ("2026-13", "2026-3", "202603", "2026-00", "March", "0000-01", "1999-12", "2100-01",
                "\u0662\u0660\u0662\u0666-03"):
        add(f"GetFundingReport-bad-start_month-{bad}", "admin", "GetFundingReport", report(start_month=bad),
            "start_month")
    add("GetFundingReport-bad-end_month", "admin", "GetFundingReport", report(end_month="2026-1x"), "end_month")
    add("GetFundingReport-end-before-start", "admin", "GetFundingReport",
        report(start_month="2026-03", end_month="2026-02"), "end_month")
    add("GetFundingReport-malformed-program", "admin", "GetFundingReport", report(program="programs/"), "program")
    add("GetFundingReport-malformed-funder", "admin", "GetFundingReport", report(funder="-x"), "funder")

    usage = activation_pb2.ReportUsageRequest
    for bad in ("0000-01", "2026-13", "2026-00", "\u0662\u0660\u0662\u0666-03"):
        add(f"ReportUsage-bad-month-{bad}", "platform-oc", "ReportUsage",
            usage(account_id="acct-1", month=bad, used=True), "month")

    events = audit_pb2.ListEventsRequest
    add("ListEvents-negative-page_size", "admin", "ListEvents", events(page_size=-1), "page_size")
    add("ListEvents-negative-start_sequence", "admin", "ListEvents", events(start_sequence=-1), "start_sequence")
    add("ListEvents-forged-page_token", "admin", "ListEvents", events(page_token="AAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        "page_token")
    return cases


CASES = _cases()


def assert_no_leak(f: Failure, *sent: str) -> None:
    texts = [f.message, *f.metadata.values(), *f.fields.values(), *f.fields]
    for text in texts:
        assert not SQL_WORDS.search(text), f"SQL detail in error: {text!r}"
        for value in sent:
            assert value not in text, f"{value!r} echoed in error: {text!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_invalid_argument_naming_the_field(api: Api, case: Case) -> None:
    f = expect_error(getattr(api.as_(case.caller), case.method), case.request, INVALID)
    assert f.reason == "INVALID_ARGUMENT"
    assert case.field in f.fields, f"BadRequest names {sorted(f.fields)}, expected {case.field}"
    assert f.fields[case.field]  # with a description
    assert case.field in f.message
    assert case.field in f.metadata["fields"].split(", ")
    assert_no_leak(f, LEAKY_ID, LEAKY_BAD_ID)


def test_every_violation_is_reported_at_once(api: Api) -> None:
    f = expect_error(api.advisor.ActivateEntitlement, activate(
        request_id="bad id", job_seeker=who(LEAKY_BAD_ID, date(1990, 2, 30)), program="premium",
        platform="oc", reason="x" * 501), INVALID)
    assert set(f.fields) == {"request_id", "job_seeker.agency_id", "job_seeker.birth_date", "program", "platform",
                             "reason"}
    assert_no_leak(f, LEAKY_BAD_ID)
    f = expect_error(api.advisor.SuspendActivation, activation_pb2.TransitionActivationRequest(), INVALID)
    assert set(f.fields) == {"name", "reason"}


def test_unknown_program_is_not_found(api: Api) -> None:
    agency_id, birth = next_person()
    for method, request in (
            ("CheckEligibility", eligibility_pb2.CheckEligibilityRequest(
                job_seeker=identity(agency_id, birth), program="programs/no-such-program")),
            ("ActivateEntitlement", activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(agency_id, birth), program="programs/no-such-program", platform=PLATFORM))):
        f = expect_error(getattr(api.advisor, method), request, grpc.StatusCode.NOT_FOUND)
        assert f.reason == "PROGRAM_NOT_FOUND"
        assert f.metadata["program"] == "programs/no-such-program"
        assert_no_leak(f, agency_id)
    # And nothing was activated for that person by the refused call.
    assert api.activate(agency_id, birth).activation.state == activation_pb2.ACTIVE


def test_page_tokens_are_bound_to_their_request(api: Api) -> None:
    for _ in range(3):
        api.activate()
    page = api.admin.ListActivations(audit_pb2.ListActivationsRequest(page_size=1))
    token = page.next_page_token
    assert token
    # The genuine token works with the same filters...
    following = api.admin.ListActivations(audit_pb2.ListActivationsRequest(page_size=1, page_token=token))
    assert following.activations[0].name != page.activations[0].name
    # ...page_size may change between pages (AIP-158)...
    api.admin.ListActivations(audit_pb2.ListActivationsRequest(page_size=5, page_token=token))
    # ...but not the filters, nor the caller, nor the method; and it cannot be edited.
    for request in (audit_pb2.ListActivationsRequest(page_size=1, page_token=token, agency_code="75011"),
                    audit_pb2.ListActivationsRequest(page_size=1, page_token=token, program=PROGRAM),
                    audit_pb2.ListActivationsRequest(page_size=1, page_token=token, state=activation_pb2.ACTIVE)):
        f = expect_error(api.admin.ListActivations, request, INVALID)
        assert set(f.fields) == {"page_token"}
    f = expect_error(api.as_("funder-ministry").ListActivations,
                     audit_pb2.ListActivationsRequest(page_size=1, page_token=token), INVALID)
    assert set(f.fields) == {"page_token"}
    f = expect_error(api.admin.ListEvents, audit_pb2.ListEventsRequest(page_size=1, page_token=token), INVALID)
    assert set(f.fields) == {"page_token"}
    i = len(token) // 2
    edited = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
    f = expect_error(api.admin.ListActivations, audit_pb2.ListActivationsRequest(page_size=1, page_token=edited),
                     INVALID)
    assert set(f.fields) == {"page_token"}

    events_token = api.admin.ListEvents(audit_pb2.ListEventsRequest(page_size=1)).next_page_token
    assert events_token
    f = expect_error(api.admin.ListEvents, audit_pb2.ListEventsRequest(
        page_size=1, page_token=events_token, start_sequence=2), INVALID)
    assert set(f.fields) == {"page_token"}
    programs_token = api.admin.ListPrograms(eligibility_pb2.ListProgramsRequest(page_size=1)).next_page_token
    assert programs_token
    f = expect_error(api.admin.ListPrograms, eligibility_pb2.ListProgramsRequest(
        page_size=1, page_token=programs_token, as_of=date(2020, 1, 1)), INVALID)
    assert set(f.fields) == {"page_token"}


# ----------------------------------------------------------------------------------- credentials

def test_missing_credentials_are_unauthenticated(api: Api) -> None:
    f = expect_error(api.as_(None).CheckEligibility, eligibility_pb2.CheckEligibilityRequest(),
                     grpc.StatusCode.UNAUTHENTICATED)
    assert f.reason == "CREDENTIALS_MISSING"


@pytest.mark.parametrize("header", ["Bearer not-a-real-token", "Bearer ", "Basic dXNlcjpwYXNz", "not-a-scheme"])
def test_bad_credentials_are_unauthenticated(api: Api, header: str) -> None:
    f = expect_error(api.advisor.CheckEligibility, eligibility_pb2.CheckEligibilityRequest(),
                     grpc.StatusCode.UNAUTHENTICATED, metadata=(("authorization", header),))
    assert f.reason == "CREDENTIALS_INVALID"
    assert "not-a-real-token" not in f.message


def test_wrong_roles_are_permission_denied(api: Api) -> None:
    agency_id, birth = next_person()
    f = expect_error(api.platform.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=PROGRAM, platform=PLATFORM), grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "ROLE_NOT_ALLOWED" and f.metadata["role"] == "platform"
    assert_no_leak(f, agency_id)
    f = expect_error(api.as_("funder-ministry").CheckEligibility, eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth)), grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "ROLE_NOT_ALLOWED" and f.metadata["role"] == "funder"
    # The refused activation did not happen.
    assert api.activate(agency_id, birth).activation.state == activation_pb2.ACTIVE


# ------------------------------------------------------------------------------------ role table

SERVICES = [eligibility_pb2.DESCRIPTOR.services_by_name["EligibilityService"],
            activation_pb2.DESCRIPTOR.services_by_name["ActivationService"],
            audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
            registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]]
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}


def call_empty(api: Api, path: str, caller: str | None) -> Any:
    """Call one RPC by its full path with an empty request (draining a stream)."""
    m = METHODS[path]
    request_cls = message_factory.GetMessageClass(m.input_type)
    response_cls = message_factory.GetMessageClass(m.output_type)
    metadata = (("authorization", f"Bearer {api.h.tokens[caller]}"),) if caller else ()
    if m.client_streaming:
        push = api.h.channel.stream_unary(path, request_serializer=request_cls.SerializeToString,
                                          response_deserializer=response_cls.FromString)
        return push(iter([request_cls()]), metadata=metadata, timeout=15)
    if m.server_streaming:
        # Change streams run until cancelled: the first message (or the error) is the answer.
        stream = api.h.channel.unary_stream(path, request_serializer=request_cls.SerializeToString,
                                            response_deserializer=response_cls.FromString)
        call = stream(request_cls(), metadata=metadata, timeout=15)
        try:
            return next(iter(call))
        finally:
            call.cancel()
    unary = api.h.channel.unary_unary(path, request_serializer=request_cls.SerializeToString,
                                      response_deserializer=response_cls.FromString)
    return unary(request_cls(), metadata=metadata, timeout=15)


def test_role_table_covers_every_rpc_of_the_contract() -> None:
    assert len(METHODS) == 21
    assert set(ROLES) == set(METHODS), {"missing": set(METHODS) - set(ROLES), "extra": set(ROLES) - set(METHODS)}
    for path, roles in ROLES.items():
        assert roles and roles <= set(REPRESENTATIVE), path


REFUSALS = [(path, role) for path in sorted(METHODS) for role in sorted(REPRESENTATIVE)
            if role not in ROLES.get(path, frozenset())]
ALLOWED = [(path, role) for path in sorted(METHODS) for role in sorted(REPRESENTATIVE)
           if role in ROLES.get(path, frozenset())]


@pytest.mark.parametrize("path,role", REFUSALS, ids=[f"{p.rsplit('/', 1)[1]}-{r}" for p, r in REFUSALS])
def test_methods_refuse_roles_outside_their_set_before_validation(api: Api, path: str, role: str) -> None:
    f = expect_error(lambda _r: call_empty(api, path, REPRESENTATIVE[role]), None, grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "ROLE_NOT_ALLOWED" and f.metadata["role"] == role
    assert not f.fields


@pytest.mark.parametrize("path,role", ALLOWED, ids=[f"{p.rsplit('/', 1)[1]}-{r}" for p, r in ALLOWED])
def test_methods_let_roles_of_their_set_through(api: Api, path: str, role: str) -> None:
    """The table is what is enforced: an allowed role gets past the role check (the empty request
    may then succeed, be invalid or be unimplemented, but is never ROLE_NOT_ALLOWED)."""
    try:
        call_empty(api, path, REPRESENTATIVE[role])
    except grpc.RpcError as err:
        f = failure(err)
        assert f.code in (INVALID, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND), f
        assert f.reason != "ROLE_NOT_ALLOWED"


@pytest.mark.parametrize("path", sorted(METHODS), ids=[p.rsplit("/", 1)[1] for p in sorted(METHODS)])
def test_every_method_needs_credentials(api: Api, path: str) -> None:
    f = expect_error(lambda _r: call_empty(api, path, None), None, grpc.StatusCode.UNAUTHENTICATED)
    assert f.reason == "CREDENTIALS_MISSING"


# ---------------------------------------------------------------------------------------- leaks

def test_domain_errors_do_not_leak_identity_or_sql(api: Api) -> None:
    from support import SPECIAL
    failures: list[tuple[Failure, str]] = []
    # Not eligible (ineligible special person).
    birth = SPECIAL["CAT0006"][0]
    failures.append((expect_error(api.advisor.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity("CAT0006", birth), program=PROGRAM, platform=PLATFORM),
        grpc.StatusCode.FAILED_PRECONDITION), "CAT0006"))
    # Unknown person and wrong birth date: not eligible, and answered alike.
    agency_id, real_birth = next_person()
    unknown = expect_error(api.advisor.ActivateEntitlement, activate(job_seeker=who(LEAKY_ID)),
                           grpc.StatusCode.FAILED_PRECONDITION)
    wrong_birth = expect_error(api.advisor.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, real_birth - dt.timedelta(days=1)), program=PROGRAM, platform=PLATFORM),
        grpc.StatusCode.FAILED_PRECONDITION)
    assert unknown.reason == wrong_birth.reason == "NOT_ELIGIBLE"
    assert unknown.message == wrong_birth.message
    assert {k: v for k, v in unknown.metadata.items() if k != "request_id"} == \
        {k: v for k, v in wrong_birth.metadata.items() if k != "request_id"}
    failures += [(unknown, LEAKY_ID), (wrong_birth, agency_id)]
    # Already exists, and a reused request id.
    request_id = uuid.uuid4().hex
    api.activate(agency_id, real_birth, request_id=request_id)
    failures.append((expect_error(lambda _r: api.activate(agency_id, real_birth), None,
                                  grpc.StatusCode.ALREADY_EXISTS), agency_id))
    failures.append((expect_error(lambda _r: api.activate(agency_id, real_birth, request_id=request_id,
                                                          reason="other"), None,
                                  grpc.StatusCode.FAILED_PRECONDITION), agency_id))
    for f, sent in failures:
        assert_no_leak(f, sent, real_birth.isoformat(), birth)


def test_identifiers_are_never_logged(api: Api) -> None:
    trace = "leakcheck-" + uuid.uuid4().hex
    agency_id, birth = next_person()
    md = (("authorization", f"Bearer {api.h.tokens['advisor-paris']}"), ("x-request-id", trace))
    api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(job_seeker=identity(agency_id, birth)),
                                 metadata=md)
    api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=PROGRAM, platform=PLATFORM), metadata=md)
    for request in (activate(job_seeker=who(LEAKY_BAD_ID)), activate(job_seeker=who(LEAKY_ID))):
        try:
            api.advisor.ActivateEntitlement(request, metadata=md)
        except grpc.RpcError:
            pass
    log = api.h.log_path.read_text()
    assert log.count(trace) >= 4  # the calls above were logged, to this file
    for value in (agency_id, LEAKY_ID, LEAKY_BAD_ID, birth.isoformat()):
        assert value not in log


def test_a_refused_account_id_is_told_the_rule_that_refused_it(api: Api) -> None:
    """The space is printable ASCII: "1 to 128 printable ASCII characters" refused an id with one
    while describing it as accepted. The rule says the space is not (as the proto does)."""
    f = expect_error(api.platform.VerifyEntitlement, activation_pb2.VerifyEntitlementRequest(account_id="a b"), INVALID)
    assert f.fields["account_id"] == "1 to 128 printable ASCII characters, no space"
    api.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id="a~!b" + "x" * 124))


@pytest.mark.parametrize("written", ["{id} activé", "pour {id_lower}", "née le {dmy}", "DN {dmy_short}",
                                     "born {iso}", "{dmy_dots}", "ddn={compact}", "{iso_slashes}"])
def test_an_activation_reason_holding_the_job_seekers_id_or_birth_date_is_refused(api: Api, written: str) -> None:
    """The reason is kept for ever in the append-only event log, which funders read, and no purge
    erases it; the proto said "no personal data" and the server took whatever came (found by a
    review: "activé pour 1234567A né le 03/02/1985" went into the log as it was). The two personal
    data the request carries are refused in it, naming `reason`, and nothing is activated."""
    agency_id, birth = next_person()
    text = written.format(id=agency_id, id_lower=agency_id.lower(), iso=birth.isoformat(),
                          dmy=birth.strftime("%d/%m/%Y"), dmy_short=f"{birth.day}/{birth.month}/{birth.year}",
                          dmy_dots=birth.strftime("%d.%m.%Y"), compact=birth.strftime("%d%m%Y"),
                          iso_slashes=birth.strftime("%Y/%m/%d"))
    f = expect_error(api.advisor.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=PROGRAM, platform=PLATFORM, reason=text),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert set(f.fields) == {"reason"} and "identifier or birth date" in f.fields["reason"]
    assert agency_id not in f.message and birth.isoformat() not in f.message
    # Nothing was made: the same person activates with a reason free of them (other dates are fine).
    made = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=PROGRAM, platform=PLATFORM,
        reason=f"atelier numérique du {TODAY.strftime('%d/%m/%Y')}, dossier {agency_id}X"))
    assert made.activation.state == activation_pb2.ACTIVE


@pytest.mark.parametrize("method", ["SuspendActivation", "RevokeActivation", "ReissueActivationToken"])
def test_a_transition_reason_holding_the_job_seekers_id_is_refused(api: Api, method: str) -> None:
    """As an activation's: a suspension, revocation or reissue whose reason names the job seeker's
    identifiant ("suspendu, 1234567A a déménagé") wrote it into the event log for ever. The server
    keeps no identifiant, so each word is keyed as the activation's pseudonym is and compared;
    INVALID_ARGUMENT naming `reason`, and nothing changes. Another agency's advisor still gets
    OUT_OF_SCOPE first: nothing tells it whose activation it is."""
    agency_id, birth = next_person()
    name = api.activate(agency_id, birth).activation.name
    for text in (f"{agency_id.lower()} a déménagé", f"dossier: {agency_id}."):
        f = expect_error(getattr(api.advisor, method), activation_pb2.TransitionActivationRequest(
            name=name, reason=text), grpc.StatusCode.INVALID_ARGUMENT)
        assert set(f.fields) == {"reason"} and "identifier" in f.fields["reason"], f
    other = expect_error(getattr(api.as_("advisor-lyon"), method), activation_pb2.TransitionActivationRequest(
        name=name, reason=f"{agency_id} a déménagé"), grpc.StatusCode.PERMISSION_DENIED)
    assert other.reason == "OUT_OF_SCOPE"
    got = api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=name))
    assert got.state == activation_pb2.ACTIVE and got.state_reason == "test"  # nothing changed
    getattr(api.advisor, method)(activation_pb2.TransitionActivationRequest(name=name, reason="a déménagé"))
