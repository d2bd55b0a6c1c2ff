"""Client commands of the `entitlement` CLI: one gRPC call each, over a real channel.

Plaintext by default (the local demo on 127.0.0.1). TLS with --ca (ENTITLEMENT_CA_FILE: the CA that
signed the server's certificate); mutual TLS adds --cert and --key (ENTITLEMENT_CLIENT_CERT_FILE,
ENTITLEMENT_CLIENT_KEY_FILE), with which a platform needs no --token."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

from entitlement.money import format_eur
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, common_pb2,
                            eligibility_pb2, eligibility_pb2_grpc)

DEFAULT_ADDRESS = "127.0.0.1:50051"
PAGE_SIZE_CAP = 1000  # servers coerce larger page sizes down to their own maximum (AIP-158)
MONTH_RE = re.compile(r"20[0-9]{2}-(0[1-9]|1[0-2])")  # as the server's
STATES = ("active", "suspended", "revoked", "expired")
MONEY = ("committed_cents", "consumed_cents", "released_cents")
COUNTS = ("activations_live", "activations_ended", "person_months_consumed")
REPORT_COLUMNS = ("funder", "program", "month", "activations_started", *MONEY, *COUNTS)


def seconds(text: str) -> float:
    """argparse type of a call's deadline: a number of seconds, above 0 and at most a day (nan, inf
    or a negative one made every call DEADLINE_EXCEEDED at once, which read as the server's fault)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 86_400:  # (False for nan)
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0 and at most 86400, got {text!r}")
    return value


class ClientError(Exception):
    pass


# YYYY-MM-DD in ASCII digits, nothing else: date.fromisoformat (Python 3.11+) also takes an ISO week
# date (1990-W20-4) and the basic format (19900517), which the messages say are not dates here.
DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def strict_date(text: str) -> dt.date:
    """A command-line date: YYYY-MM-DD and a real calendar date, else ValueError."""
    if not DATE_RE.fullmatch(text):
        raise ValueError(f"not YYYY-MM-DD: {text!r}")
    return dt.date.fromisoformat(text)


def _date(text: str, what: str) -> date_pb2.Date:
    try:
        d = strict_date(text)
    except ValueError:
        raise ClientError(f"{what}: expected a date YYYY-MM-DD, got {text!r}") from None
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


# After these, the change asked for may have been made (a deadline, a lost connection) or may be
# made by trying again later: what to retry with is worth saying.
_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                          grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
                          grpc.StatusCode.RESOURCE_EXHAUSTED})


def _call(args: argparse.Namespace, stub_cls: Any, method: str, request: Message, retry_key: str = "") -> Any:
    """The answer of `method`; a ClientError describing the failure otherwise. With `retry_key`
    (the request's idempotency key), a failure that a retry may mend says how to retry safely: the
    same key gives the stored answer of a change already made instead of making a second one."""
    token = args.token or os.environ.get("ENTITLEMENT_TOKEN", "")
    address = args.address or os.environ.get("ENTITLEMENT_ADDRESS", DEFAULT_ADDRESS)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with _channel(args, address) as channel:
        stub = stub_cls(channel)
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as err:
            text = _describe(err)
            if retry_key and hasattr(err, "code") and err.code() in _RETRY_CODES:
                text += f"; to retry safely, run the same command with --request-id {retry_key}"
            raise ClientError(text) from None


def _option(args: argparse.Namespace, name: str, env: str) -> str:
    return str(getattr(args, name, None) or os.environ.get(env, ""))


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ClientError(f"{what} {path}: cannot read ({exc.strerror})") from None


def _channel(args: argparse.Namespace, address: str) -> grpc.Channel:
    """A TLS channel when a CA is given (mutual TLS with a client certificate), else plaintext."""
    ca = _option(args, "ca", "ENTITLEMENT_CA_FILE")
    cert = _option(args, "cert", "ENTITLEMENT_CLIENT_CERT_FILE")
    key = _option(args, "key", "ENTITLEMENT_CLIENT_KEY_FILE")
    if not ca:
        if cert or key:
            raise ClientError("--cert/--key need --ca (ENTITLEMENT_CA_FILE): the CA of the server's certificate")
        return grpc.insecure_channel(address)
    if bool(cert) != bool(key):
        raise ClientError("give both --cert and --key (or neither)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--ca"), private_key=_read(key, "--key") if key else None,
        certificate_chain=_read(cert, "--cert") if cert else None)
    return grpc.secure_channel(address, credentials)


def _describe(err: grpc.RpcError) -> str:
    code = err.code().name if hasattr(err, "code") else "UNKNOWN"
    message = err.details() if hasattr(err, "details") else str(err)
    parts = [f"{code}: {message}"]
    request_id = ""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:  # a status whose details do not match its code or message: none shown
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                parts.append(f"[{info.reason}]")
                request_id = request_id or info.metadata.get("request_id", "")
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                parts.extend(f"{v.field}: {v.description};" for v in bad.field_violations)
    if not request_id and hasattr(err, "trailing_metadata"):
        request_id = next((str(v) for k, v in (err.trailing_metadata() or ()) if k == "x-request-id"), "")
    # What to quote to the operators (README: AIP-193 errors): the id their logs file the call under.
    # None when the call never reached a handler (no server, gRPC's own limits).
    if request_id:
        parts.append(f"(request id {' '.join(request_id.split())[:64]})")
    return " ".join(parts)


def _print_json(msg: Message) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _fmt_date(d: date_pb2.Date) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}" if d.year else "-"


def _fmt_time(ts: timestamp_pb2.Timestamp) -> str:
    if not (ts.seconds or ts.nanos):
        return "-"
    return ts.ToDatetime(tzinfo=dt.timezone.utc).isoformat(timespec="seconds")


def _month(text: str | None, what: str) -> str:
    if text and not MONTH_RE.fullmatch(text):
        raise ClientError(f"{what}: expected a month YYYY-MM, got {text!r}")
    return text or ""


def _count(text: str) -> int:
    """argparse type of --limit: a positive number of rows."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)


def _identity(args: argparse.Namespace) -> common_pb2.JobSeekerIdentity:
    return common_pb2.JobSeekerIdentity(agency_id=args.agency_id, birth_date=_date(args.birth_date, "birth date"))


def _name(collection: str, value: str | None) -> str:
    """The resource name for a bare id or a full name: `x` and `programs/x` both give `programs/x`."""
    if not value:
        return ""
    return value if value.startswith(f"{collection}/") else f"{collection}/{value}"


def _bare(name: str) -> str:
    return name.split("/", 1)[-1]


def _state(state: activation_pb2.ActivationState.ValueType) -> str:
    return activation_pb2.ActivationState.Name(state).lower() if state else "-"


def _share(basis_points: int) -> str:
    whole, rest = divmod(basis_points, 100)
    return f"{whole}.{rest:02d}%" if rest else f"{whole}%"


def _funders(plan: common_pb2.FundingPlan, *, amounts: bool = False) -> str:
    return ", ".join(f"{s.funder} {_share(s.share_basis_points)}" + (f" {format_eur(s.amount_cents)}" if amounts else "")
                     for s in plan.shares) or "-"


def _fields(pairs: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in pairs) + 1
    for label, value in pairs:
        print(f"{label + ':':<{width}} {value}")


def _show(args: argparse.Namespace, msg: Message, render: Callable[[Any], None]) -> int:
    if args.json:
        _print_json(msg)
    else:
        render(msg)
    return 0


def _list_all(args: argparse.Namespace, stub_cls: Any, method: str, request: Any, field: str, limit: int = 0) -> Any:
    """Call a List method page after page (AIP-158) until the last page or `limit` items. Returns one
    response holding every item, and the next page token where it stopped (empty at the end)."""
    response: Any = None
    while True:
        if limit:
            got = len(getattr(response, field)) if response is not None else 0
            request.page_size = min(limit - got, PAGE_SIZE_CAP)
        page = _call(args, stub_cls, method, request)
        if response is None:
            response = page
        else:
            getattr(response, field).extend(getattr(page, field))
            response.next_page_token = page.next_page_token
        request.page_token = page.next_page_token
        if not page.next_page_token or (limit and len(getattr(response, field)) >= limit):
            return response


# ---------------------------------------------------------------------------------------- renderers

def _print_activation(a: activation_pb2.Activation) -> None:
    plan = a.funding
    _fields([
        ("activation", a.name),
        ("program", a.program),
        ("state", _state(a.state) + (f" ({a.state_reason})" if a.state_reason else "")),
        ("access", f"{_fmt_date(a.start_date)} .. {_fmt_date(a.end_date)}"),
        ("platform", a.platform),
        ("account", f"{a.account_id} (redeemed {_fmt_time(a.redeem_time)})" if a.account_id else "not redeemed yet"),
        ("advisor", f"{a.advisor_id} (agency {a.agency_code})"),
        ("funding", f"{format_eur(plan.total_cents)} = {plan.months} months x {format_eur(plan.price_per_month_cents)}"),
        ("funders", _funders(plan, amounts=True)),
        ("job seeker ref", a.job_seeker_ref),
        ("created", _fmt_time(a.create_time)),
        ("updated", _fmt_time(a.update_time)),
    ])


def _print_status(s: activation_pb2.EntitlementStatus) -> None:
    _fields([("account", s.account_id), ("active", "yes" if s.active else "no"), ("activation", s.activation or "-"),
             ("program", s.program or "-"), ("state", _state(s.state)), ("until", _fmt_date(s.end_date)),
             ("tier", s.tier or "-")])


def _print_jwks(resp: activation_pb2.GetSigningKeysResponse) -> None:
    print(json.dumps(json.loads(resp.jwks_json), indent=2))


def _print_programs(resp: eligibility_pb2.ListProgramsResponse) -> None:
    _table(["id", "title", "open", "start", "end", "price/month", "funders"],
           [(_bare(p.name), p.title, "yes" if p.open else "no", _fmt_date(p.start_date), _fmt_date(p.end_date),
             format_eur(p.monthly_funding.price_per_month_cents) if p.HasField("monthly_funding") else "-",
             _funders(p.monthly_funding)) for p in resp.programs])


def _print_activations(resp: audit_pb2.ListActivationsResponse) -> None:
    _table(["name", "program", "state", "agency", "start", "end", "account"],
           [(a.name, _bare(a.program), _state(a.state), a.agency_code, _fmt_date(a.start_date), _fmt_date(a.end_date),
             a.account_id or "-") for a in resp.activations])


def _print_report(resp: audit_pb2.GetFundingReportResponse) -> None:
    rows: list[tuple[Any, ...]] = [
        (r.funder, _bare(r.program), r.month, r.activations_started, *(format_eur(getattr(r, m)) for m in MONEY),
         *(getattr(r, c) for c in COUNTS))
        for r in resp.rows]
    # Live activations are a stock, not a flow: they have no total over months.
    rows.append(("total", "", "", sum(r.activations_started for r in resp.rows),
                 *(format_eur(sum(getattr(r, m) for r in resp.rows)) for m in MONEY), "-",
                 sum(r.activations_ended for r in resp.rows), sum(r.person_months_consumed for r in resp.rows)))
    _table(["funder", "program", "month", "activations", "committed", "consumed", "released", "live", "ended",
            "months consumed"], rows)


def _print_report_csv(resp: audit_pb2.GetFundingReportResponse) -> None:
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(REPORT_COLUMNS)
    out.writerows([getattr(r, c) for c in REPORT_COLUMNS] for r in resp.rows)


def _print_events(resp: audit_pb2.ListEventsResponse) -> None:
    _table(["seq", "time", "type", "actor", "subject", "reason", "payload"],
           [(e.sequence, _fmt_time(e.time), e.type, e.actor, e.subject, e.reason or "-", e.payload_json)
            for e in resp.events])


# --------------------------------------------------------------------------------------- commands

def cmd_check(args: argparse.Namespace) -> int:
    req = eligibility_pb2.CheckEligibilityRequest(job_seeker=_identity(args), program=_name("programs", args.program),
                                                  mentor_id=args.mentor or "")
    if args.as_of:
        req.as_of.CopyFrom(_date(args.as_of, "--as-of"))
    resp = _call(args, eligibility_pb2_grpc.EligibilityServiceStub, "CheckEligibility", req)
    if args.json:
        _print_json(resp)
        return 0
    for d in resp.decisions:
        verdict = "ELIGIBLE" if d.eligible else "NOT ELIGIBLE"
        print(f"{d.program}: {verdict} on {_fmt_date(d.as_of)} (program version {d.program_version})")
        print(f"facts: {_facts_source(d)}")
        if d.eligible:  # until when, and at whose cost: what the job seeker at the desk asks next
            plan = d.funding_plan
            print(f"an activation on {_fmt_date(d.as_of)} gives access until {_fmt_date(d.access_end_date)}: "
                  f"{plan.months} months x {format_eur(plan.price_per_month_cents)} = "
                  f"{format_eur(plan.total_cents)} ({_funders(plan, amounts=True)})")
        _print_criteria(d)
        print()
    return 0


def _facts_source(d: common_pb2.EligibilityDecision) -> str:
    """Where a decision's facts came from, and as of when (`facts_source`). The header said `registry
    none` for a live answer, as if no registry data existed, and nothing when the live source had
    failed and an extract, perhaps weeks old, decided instead."""
    extract = f"registry extract {d.registry_snapshot} of {_fmt_date(d.registry_extracted_on)}"
    if d.facts_source == "live":
        return f"the agency's live status source, answered on {_fmt_date(d.registry_extracted_on)}"
    if not d.registry_snapshot:
        return ("no registry data imported (an operator must import the agency's extract)"
                + ("; the live status source gave no usable answer" if d.facts_source == "snapshot_fallback" else ""))
    if d.facts_source == "snapshot_fallback":
        return (f"{extract}: the live status source gave no usable answer (down, or it does not know "
                "this person), so this extract decided; it may be out of date")
    return extract


def cmd_activate(args: argparse.Namespace) -> int:
    request_id = args.request_id or uuid.uuid4().hex
    req = activation_pb2.ActivateEntitlementRequest(
        request_id=request_id, job_seeker=_identity(args), program=_name("programs", args.program),
        platform=_name("platforms", args.platform), reason=args.reason or "", mentor_id=args.mentor or "")
    return _print_issued(args, _call(args, activation_pb2_grpc.ActivationServiceStub, "ActivateEntitlement", req,
                                     retry_key=request_id), request_id)


def _print_issued(args: argparse.Namespace, resp: Any, request_id: str) -> int:
    """An answer carrying an activation and its token (ActivateEntitlement, ReissueActivationToken)."""
    if args.json:
        _print_json(resp)
        return 0
    _print_activation(resp.activation)
    # (Not "request id": a server's error quotes its own log id under that name.)
    print(f"idempotency key: {request_id} (repeat it with --request-id to retry safely)")
    print(f"token: {resp.activation_token}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    req = activation_pb2.GetActivationRequest(name=_name("activations", args.activation))
    return _show(args, _call(args, activation_pb2_grpc.ActivationServiceStub, "GetActivation", req),
                 _print_activation_and_decision)


def _print_activation_and_decision(a: activation_pb2.Activation) -> None:
    """An activation and the decision stored with it: why it was granted, on which facts (the table
    showed the activation alone: the decision was in --json only)."""
    _print_activation(a)
    d = a.decision
    print()
    print(f"decision: {'ELIGIBLE' if d.eligible else 'NOT ELIGIBLE'} on {_fmt_date(d.as_of)} "
          f"(program version {d.program_version})")
    print(f"facts: {_facts_source(d)}")
    _print_criteria(d)


def _print_criteria(d: common_pb2.EligibilityDecision) -> None:
    _table(["criterion", "ok", "reason", "detail"],
           [(c.criterion, "yes" if c.passed else "NO", c.reason_code or "-", c.detail) for c in d.criteria])


def _transition(method: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # An idempotency key drawn when none is given, and named by a failure a retry may mend: a
        # suspension made before its answer was lost, retried with it, answers what it did; retried
        # without, INVALID_STATE (it is suspended), or, after a resumption by someone else meanwhile,
        # a second suspension.
        request_id = args.request_id or uuid.uuid4().hex
        req = activation_pb2.TransitionActivationRequest(
            name=_name("activations", args.activation), reason=args.reason, request_id=request_id)
        return _show(args, _call(args, activation_pb2_grpc.ActivationServiceStub, method, req,
                                 retry_key=request_id), _print_activation)
    return run


def cmd_reissue_token(args: argparse.Namespace) -> int:
    request_id = args.request_id or uuid.uuid4().hex
    req = activation_pb2.TransitionActivationRequest(
        name=_name("activations", args.activation), reason=args.reason, request_id=request_id)
    return _print_issued(args, _call(args, activation_pb2_grpc.ActivationServiceStub, "ReissueActivationToken", req,
                                     retry_key=request_id), request_id)


def cmd_redeem(args: argparse.Namespace) -> int:
    req = activation_pb2.RedeemActivationTokenRequest(token=args.token_value, account_id=args.account_id)
    return _show(args, _call(args, activation_pb2_grpc.ActivationServiceStub, "RedeemActivationToken", req),
                 _print_status)


def cmd_verify(args: argparse.Namespace) -> int:
    req = activation_pb2.VerifyEntitlementRequest(account_id=args.account_id)
    return _show(args, _call(args, activation_pb2_grpc.ActivationServiceStub, "VerifyEntitlement", req), _print_status)


def cmd_jwks(args: argparse.Namespace) -> int:
    req = activation_pb2.GetSigningKeysRequest()
    return _show(args, _call(args, activation_pb2_grpc.ActivationServiceStub, "GetSigningKeys", req), _print_jwks)


def cmd_programs(args: argparse.Namespace) -> int:
    req = eligibility_pb2.ListProgramsRequest()
    if args.as_of:
        req.as_of.CopyFrom(_date(args.as_of, "--as-of"))
    resp = _list_all(args, eligibility_pb2_grpc.EligibilityServiceStub, "ListPrograms", req, "programs")
    return _show(args, resp, _print_programs)


def cmd_activations(args: argparse.Namespace) -> int:
    req = audit_pb2.ListActivationsRequest(
        program=_name("programs", args.program), funder=args.funder or "", agency_code=args.agency or "")
    if args.state:
        req.state = activation_pb2.ActivationState.Value(args.state.upper())
    resp = _list_all(args, audit_pb2_grpc.AuditServiceStub, "ListActivations", req, "activations", args.limit)
    return _show(args, resp, _print_activations)


def cmd_report(args: argparse.Namespace) -> int:
    if args.csv and args.json:
        raise ClientError("--csv and --json cannot be used together")
    req = audit_pb2.GetFundingReportRequest(
        funder=args.funder or "", program=_name("programs", args.program),
        start_month=_month(args.start_month, "--from"), end_month=_month(args.end_month, "--to"))
    resp = _call(args, audit_pb2_grpc.AuditServiceStub, "GetFundingReport", req)
    return _show(args, resp, _print_report_csv if args.csv else _print_report)


def cmd_events(args: argparse.Namespace) -> int:
    req = audit_pb2.ListEventsRequest(start_sequence=args.from_seq)
    resp = _list_all(args, audit_pb2_grpc.AuditServiceStub, "ListEvents", req, "events", args.limit)
    return _show(args, resp, _print_events)


# ------------------------------------------------------------------------------------------ parser

def add_commands(sub: Any, programs: Any) -> None:
    """Register the client commands on `sub`; `programs list` goes under the operator `programs` group."""
    def client(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            try:
                return func(args)
            except ClientError as exc:
                print("entitlement: " + " ".join(str(exc).splitlines()), file=sys.stderr)
                return 1
        return run

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.add_argument("--address", help=f"server address (ENTITLEMENT_ADDRESS, default {DEFAULT_ADDRESS})")
        p.add_argument("--token", help="bearer token (ENTITLEMENT_TOKEN); one beginning with '-' (given out "
                       "before 2026-12-07) as --token=TOKEN")
        p.add_argument("--ca", help="TLS: CA certificate of the server (ENTITLEMENT_CA_FILE); plaintext without")
        p.add_argument("--cert", help="mutual TLS: client certificate (ENTITLEMENT_CLIENT_CERT_FILE)")
        p.add_argument("--key", help="mutual TLS: client key (ENTITLEMENT_CLIENT_KEY_FILE)")
        p.add_argument("--json", action="store_true", help="print the response as JSON")
        p.add_argument("--timeout", type=seconds, default=10.0, help="deadline in seconds (default 10)")
        p.set_defaults(func=client(func))
        return p

    def mentor(p: argparse.ArgumentParser) -> None:
        # Without it, a program with the `mentor_assigned` criterion (OpenCFA) was MENTOR_NOT_ASSIGNED
        # from the command line whatever the advisor had arranged: its detail says to give the id.
        p.add_argument("--mentor", metavar="MENTOR_ID", help="the mentor (tuteur) arranged, for programs that "
                       "require one (OpenCFA): 1-64 letters, digits, '.', '_' or '-'")

    def request_id(p: argparse.ArgumentParser) -> None:
        p.add_argument("--request-id", help="idempotency key: repeat it to retry safely")

    p = command("check", cmd_check, "advisor: check a job seeker's eligibility, with the reasons")
    p.add_argument("agency_id")
    p.add_argument("birth_date", help="YYYY-MM-DD")
    p.add_argument("--program", help="program id (default: all programs)")
    p.add_argument("--as-of", help="evaluate as of this past date YYYY-MM-DD")
    mentor(p)

    p = command("activate", cmd_activate, "advisor: activate a program for a job seeker; prints the token")
    p.add_argument("agency_id")
    p.add_argument("birth_date", help="YYYY-MM-DD")
    p.add_argument("--program", required=True, help="program id")
    p.add_argument("--platform", required=True, help="course platform id, e.g. openclassrooms")
    p.add_argument("--reason", help="why (free text, no personal data)")
    mentor(p)
    request_id(p)

    p = command("get", cmd_get, "advisor: show one activation")
    p.add_argument("activation", help="activations/ID or ID")

    for name, method in (("suspend", "SuspendActivation"), ("resume", "ResumeActivation"),
                         ("revoke", "RevokeActivation")):
        p = command(name, _transition(method), f"advisor: {name} an activation")
        p.add_argument("activation", help="activations/ID or ID")
        p.add_argument("--reason", required=True, help="why (recorded in the event log)")
        request_id(p)

    p = command("reissue-token", cmd_reissue_token,
                "advisor: a new token for an activation never redeemed (the old one stops working)")
    p.add_argument("activation", help="activations/ID or ID")
    p.add_argument("--reason", required=True, help="why (recorded in the event log)")
    request_id(p)

    p = command("redeem", cmd_redeem, "platform: bind an activation token to one of your accounts")
    p.add_argument("token_value", metavar="TOKEN", help="the activation token")
    p.add_argument("account_id")

    p = command("verify", cmd_verify, "platform: is Premium active for one of your accounts?")
    p.add_argument("account_id")

    command("jwks", cmd_jwks, "platform: the public keys that sign activation tokens (JWKS)")

    p = command("list", cmd_programs, "the funded programs and who pays for them (from the server)",
                parent=programs)
    p.add_argument("--as-of", help="parameters in force on this date YYYY-MM-DD (default today)")

    p = command("activations", cmd_activations, "funder: list activations, newest first")
    p.add_argument("--program", help="program id")
    p.add_argument("--funder", help="funder id (a funder sees only its own)")
    p.add_argument("--agency", help="agency code")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--limit", type=_count, default=0, help="at most this many rows (default: all)")

    p = command("report", cmd_report, "funder: money per funder, program and month")
    p.add_argument("--funder", help="funder id (a funder sees only its own)")
    p.add_argument("--program", help="program id")
    p.add_argument("--from", dest="start_month", metavar="YYYY-MM", help="first month included")
    p.add_argument("--to", dest="end_month", metavar="YYYY-MM", help="last month included")
    p.add_argument("--csv", action="store_true", help="CSV with integer cents, for spreadsheets")

    p = command("events", cmd_events, "funder: the event log, oldest first")
    p.add_argument("--from-seq", type=int, default=0, metavar="N", help="start at this sequence number")
    p.add_argument("--limit", type=_count, default=0, help="at most this many events (default: all)")
