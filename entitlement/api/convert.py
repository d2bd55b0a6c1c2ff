"""Domain values -> proto messages. No decisions here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from google.protobuf import timestamp_pb2
from google.type import date_pb2

from entitlement import rules
from entitlement.memo import ByIdentity
from entitlement.activation import ActivationView, EntitlementStatus
from entitlement.counters import CAP_CRITERIA
from entitlement.audit import EventView, ListedActivation, ReportRow
from entitlement.changes import Change
from entitlement.programs import Program
from entitlement.registry import SnapshotRef
from entitlement.v1 import activation_pb2, audit_pb2, common_pb2, eligibility_pb2

STATE_TO_PROTO = {"active": activation_pb2.ACTIVE, "suspended": activation_pb2.SUSPENDED,
                  "revoked": activation_pb2.REVOKED, "expired": activation_pb2.EXPIRED}
PROTO_TO_STATE = {v: k for k, v in STATE_TO_PROTO.items()}


def date(d: dt.date | None) -> date_pb2.Date | None:
    return None if d is None else date_pb2.Date(year=d.year, month=d.month, day=d.day)


def timestamp(t: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if t is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def funding_plan(plan: rules.FundingPlan | None) -> common_pb2.FundingPlan | None:
    return None if plan is None else common_pb2.FundingPlan(**_plan_fields(plan))


def program(p: Program, day: dt.date) -> eligibility_pb2.Program:
    return eligibility_pb2.Program(
        name=p.name, title=p.title, description=p.description, version=p.version,
        start_date=date(p.start), end_date=date(p.end), tier=p.tier,
        parameters=parameters(rules.parameters_used(p, day)),
        monthly_funding=funding_plan(rules.funding_plan(p, day, months=1)), open=p.is_open(day))


# Decisions and activations: the hot paths' answers. A message passed to a constructor is copied (a
# decision into its response: every criterion and parameter again), so they are built in place:
# scalar and small message fields as constructor arguments (dicts for messages), criteria added to
# the repeated field, the parameters (the same for every decision of a program and day) parsed from
# bytes serialized once; what is the same for everybody in the same situation (rules.evaluate hands
# out one decision object for it) is serialized once. tests/test_convert.py and
# tests/test_list_activations_output.py hold the answers to the plain builders' bytes.

def parameters(params: tuple[rules.ParameterUsed, ...]) -> list[common_pb2.ParameterValue]:
    """The messages of `params`, built once per parameters tuple (rules.parameters_used hands out
    one per program and day)."""
    return _PARAMETERS.get(params) or _PARAMETERS.put(params, [common_pb2.ParameterValue(
        name=p.name, value_json=p.value_json, effective_from=date(p.effective_from), reference=p.reference)
        for p in params])


def _parameters_bytes(params: tuple[rules.ParameterUsed, ...]) -> bytes:
    """The `parameters` field of a decision, serialized once per parameters tuple."""
    raw: bytes | None = _PARAMETER_BYTES.get(params)
    return raw if raw is not None else _PARAMETER_BYTES.put(
        params, common_pb2.EligibilityDecision(parameters=parameters(params)).SerializeToString())


_PARAMETERS, _PARAMETER_BYTES = ByIdentity(4096), ByIdentity(4096)


def _date_fields(d: dt.date | None) -> dict[str, int] | None:
    return None if d is None else {"year": d.year, "month": d.month, "day": d.day}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_EPOCH_NAIVE = dt.datetime(1970, 1, 1)


def _timestamp_fields(t: dt.datetime | None) -> dict[str, int] | None:
    """Timestamp.FromDatetime's fields: whole seconds since the epoch (rounded down), and the
    microseconds as nanos; a naive datetime is UTC (as FromDatetime takes it)."""
    if t is None:
        return None
    since = t - (_EPOCH_NAIVE if t.tzinfo is None else _EPOCH)
    return {"seconds": since.days * 86400 + since.seconds, "nanos": t.microsecond * 1000}


def _plan_fields(plan: rules.FundingPlan | None, funder: str = "") -> dict[str, Any] | None:
    """A plan's fields; with `funder` (a funder caller's audit answer), its own share alone."""
    if plan is None:
        return None
    return {"price_per_month_cents": plan.price_per_month_cents, "months": plan.months,
            "total_cents": plan.total_cents,
            "shares": [{"funder": f, "share_basis_points": bp, "amount_cents": c} for f, bp, c in plan.shares
                       if not funder or f == funder]}


def _decision_kwargs(d: rules.Decision, snapshot: SnapshotRef | None, funder: str = "",
                     facts_on: dt.date | None = None) -> dict[str, Any]:
    """A decision's fields but its criteria and parameters (see _fill_decision); with `funder`, its
    funding plan shows that funder's share alone. `facts_on`: the date of facts not read from a
    snapshot (a live answer), when it is not the one the decision's circumstances hold."""
    return {"program": "programs/" + d.program_id, "eligible": d.eligible, "as_of": _date_fields(d.as_of),
            "program_version": d.program_version, "funding_plan": _plan_fields(d.funding_plan, funder),
            "registry_snapshot": snapshot.name if snapshot else "",
            "registry_extracted_on": _date_fields(
                snapshot.extracted_on if snapshot else facts_on or d.circumstances.registry_extracted_on),
            "access_end_date": _date_fields(d.access_end), "facts_source": d.circumstances.facts_source}


def _fill_decision(m: common_pb2.EligibilityDecision, d: rules.Decision) -> None:
    add = m.criteria.add
    for c in d.criteria:
        add(criterion=c.criterion, passed=c.passed, reason_code=c.reason_code, detail=c.detail)
    m.MergeFromString(_parameters_bytes(d.parameters))


def check_answer(decisions: Sequence[rules.Decision], snapshot: SnapshotRef | None,
                 facts_on: dt.date | None = None) -> bytes:
    """The CheckEligibilityResponse of `decisions`, serialized: the concatenation of each decision's
    entry in the response's repeated field (that is the message's encoding), each serialized once
    per decision object and snapshot. CheckEligibility answers with these bytes as they are
    (entitlement.api.wrapping.passthrough)."""
    if len(decisions) == 1:
        return _answer_entry(decisions[0], snapshot, facts_on)
    return b"".join([_answer_entry(d, snapshot, facts_on) for d in decisions])


def _answer_entry(d: rules.Decision, snapshot: SnapshotRef | None, facts_on: dt.date | None = None) -> bytes:
    key = (snapshot.id, snapshot.extracted_on) if snapshot is not None else (None, facts_on)
    raw: bytes | None = _ANSWER_ENTRIES.get(d, *key)
    if raw is None:
        out = eligibility_pb2.CheckEligibilityResponse()
        _fill_decision(out.decisions.add(**_decision_kwargs(d, snapshot, facts_on=facts_on)), d)
        raw = _ANSWER_ENTRIES.put(d, out.SerializeToString(), *key)
    return raw


def _activation_kwargs(aid: str, program_id: str, state: str, person_ref: str, advisor_id: str, agency_code: str,
                       start_date: dt.date, end_date: dt.date, created_at: dt.datetime, updated_at: dt.datetime,
                       platform_id: str, account_id: str | None, redeemed_at: dt.datetime | None,
                       state_reason: str) -> dict[str, Any]:
    """An Activation's fields but its decision and funding."""
    return {"name": "activations/" + aid, "program": "programs/" + program_id, "state": STATE_TO_PROTO[state],
            "job_seeker_ref": person_ref, "advisor_id": advisor_id, "agency_code": agency_code,
            "start_date": _date_fields(start_date), "end_date": _date_fields(end_date),
            "create_time": _timestamp_fields(created_at), "update_time": _timestamp_fields(updated_at),
            "platform": "platforms/" + platform_id, "account_id": account_id or "",
            "redeem_time": _timestamp_fields(redeemed_at), "state_reason": state_reason}


def _view_kwargs(a: ActivationView) -> dict[str, Any]:
    return _activation_kwargs(a.id, a.program_id, a.state, a.person_ref, a.advisor_id, a.agency_code, a.start_date,
                              a.end_date, a.created_at, a.updated_at, a.platform_id, a.account_id, a.redeemed_at,
                              a.state_reason)


def activation(a: ActivationView) -> activation_pb2.Activation:
    out = activation_pb2.Activation(**_view_kwargs(a), decision=_decision_kwargs(a.decision, a.snapshot),
                                    funding=_plan_fields(a.decision.funding_plan))
    _fill_decision(out.decision, a.decision)
    return out


def activation_response(a: ActivationView, token: str) -> activation_pb2.ActivateEntitlementResponse:
    """ActivateEntitlementResponse(activation=activation(a), activation_token=token), in place. Its
    decision and funding are parsed from their bytes, serialized once per shared decision (people in
    the same situation share one: rules._decision), as a page of ListActivations does; except the
    decision of a capped program, which is this activation's own (its cap's criteria, made afresh,
    carry the counts of the moment): built here, not kept."""
    d = a.decision
    if any(c.criterion in CAP_CRITERIA for c in d.criteria):
        out = activation_pb2.ActivateEntitlementResponse(
            activation={**_view_kwargs(a), "decision": _decision_kwargs(d, a.snapshot),
                        "funding": _plan_fields(d.funding_plan)}, activation_token=token)
        _fill_decision(out.activation.decision, d)
        return out
    out = activation_pb2.ActivateEntitlementResponse(activation=_view_kwargs(a),  # type: ignore[arg-type]
                                                     activation_token=token)
    out.activation.MergeFromString(_decision_fields(d, a.snapshot))
    return out


def listed_activations(items: Sequence[ListedActivation], next_page_token: str,
                       funder: str = "") -> audit_pb2.ListActivationsResponse:
    """A page of ListActivations: for each item, the message activation() builds, in the response,
    its decision and funding serialized once per shared decision (audit.ListedActivation) and
    funder, and parsed into each. `funder`: a funder caller's id, whose answer shows its own share
    of the money alone (in `funding` and the decision's `funding_plan`) and no platform account id;
    "" for an admin (all)."""
    out = audit_pb2.ListActivationsResponse(next_page_token=next_page_token)
    add = out.activations.add
    for (*fields, d, snapshot, state_reason) in items:
        kwargs = _activation_kwargs(*fields, state_reason)
        if funder:  # (the learner's id on the platform: personal data a funder has no use for)
            kwargs["account_id"] = ""
        add(**kwargs).MergeFromString(_decision_fields(d, snapshot, funder))
    return out


def _decision_fields(d: rules.Decision, snapshot: SnapshotRef | None, funder: str = "") -> bytes:
    """An Activation's `decision` and `funding` fields, serialized; once per decision object,
    snapshot and funder (`funder`: that funder's share alone; "": every share)."""
    raw: bytes | None = _DECISION_FIELDS.get(d, snapshot, funder)
    if raw is None:
        m = activation_pb2.Activation(decision=_decision_kwargs(d, snapshot, funder),
                                      funding=_plan_fields(d.funding_plan, funder))
        _fill_decision(m.decision, d)
        raw = _DECISION_FIELDS.put(d, m.SerializeToString(), snapshot, funder)
    return raw


_ANSWER_ENTRIES, _DECISION_FIELDS = ByIdentity(4096), ByIdentity(1024)


def status(s: EntitlementStatus) -> activation_pb2.EntitlementStatus:
    m = activation_pb2.EntitlementStatus(
        account_id=s.account_id, active=s.active,
        activation=f"activations/{s.activation_id}" if s.activation_id else "",
        program=f"programs/{s.program_id}" if s.program_id else "",
        state=STATE_TO_PROTO.get(s.state, activation_pb2.ACTIVATION_STATE_UNSPECIFIED), tier=s.tier)
    d = s.end_date
    if d is not None:  # set in place: a Date made apart would be copied in (a verification's answer)
        end = m.end_date
        end.year, end.month, end.day = d.year, d.month, d.day
    return m


def report_row(r: ReportRow) -> audit_pb2.FundingReportRow:
    return audit_pb2.FundingReportRow(
        funder=r.funder, program=f"programs/{r.program_id}", month=r.month,
        activations_started=r.activations_started, committed_cents=r.committed_cents,
        consumed_cents=r.consumed_cents, released_cents=r.released_cents,
        activations_live=r.activations_live, activations_ended=r.activations_ended,
        person_months_consumed=r.person_months_consumed)


def event(e: EventView) -> audit_pb2.Event:
    return audit_pb2.Event(sequence=e.seq, time=timestamp(e.time), type=e.type, actor=e.actor,
                           subject=e.subject, reason=e.reason, payload_json=e.payload_json,
                           program=f"programs/{e.program_id}" if e.program_id else "", leaf_hash=e.leaf_hash)


def change(c: Change) -> activation_pb2.EntitlementChange:
    kind = activation_pb2.EntitlementChange.ChangeType.Value(c.type) if c.type else \
        activation_pb2.EntitlementChange.CHANGE_TYPE_UNSPECIFIED
    return activation_pb2.EntitlementChange(cursor=c.cursor, type=kind,
                                            status=status(c.status) if c.status else None,
                                            change_time=timestamp(c.time))
