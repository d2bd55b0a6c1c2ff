"""Domain values -> proto messages. No decisions here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from google.protobuf import timestamp_pb2
from google.type import date_pb2

from entitlement import rules
from entitlement.activation import ActivationView, EntitlementStatus
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
    if plan is None:
        return None
    return common_pb2.FundingPlan(
        price_per_month_cents=plan.price_per_month_cents, months=plan.months, total_cents=plan.total_cents,
        shares=[common_pb2.FundingShare(funder=f, share_basis_points=bp, amount_cents=c) for f, bp, c in plan.shares])


def parameters(params: tuple[rules.ParameterUsed, ...]) -> list[common_pb2.ParameterValue]:
    """The messages of `params`. rules.parameters_used hands out one tuple per program and day, so
    the messages are built once for it and reused (a message passed to a constructor is copied)."""
    hit = _PARAMETERS.get(id(params))
    if hit is not None and hit[0] is params:
        return hit[1]
    out = [common_pb2.ParameterValue(name=p.name, value_json=p.value_json, effective_from=date(p.effective_from),
                                     reference=p.reference) for p in params]
    if len(_PARAMETERS) >= 4096:
        _PARAMETERS.clear()
    _PARAMETERS[id(params)] = (params, out)
    return out


_PARAMETERS: dict[int, tuple[tuple[rules.ParameterUsed, ...], list[common_pb2.ParameterValue]]] = {}


def decision(d: rules.Decision, snapshot: SnapshotRef | None) -> common_pb2.EligibilityDecision:
    return common_pb2.EligibilityDecision(
        program=f"programs/{d.program_id}", eligible=d.eligible,
        criteria=[common_pb2.Criterion(criterion=c.criterion, passed=c.passed, reason_code=c.reason_code,
                                       detail=c.detail) for c in d.criteria],
        as_of=date(d.as_of), program_version=d.program_version, parameters=parameters(d.parameters),
        funding_plan=funding_plan(d.funding_plan),
        registry_snapshot=snapshot.name if snapshot else "",
        registry_extracted_on=date(snapshot.extracted_on if snapshot else d.circumstances.registry_extracted_on),
        access_end_date=date(d.access_end), facts_source=d.circumstances.facts_source)


# ------------------------------------------------------------------ hot paths: built in place
# A message passed to a constructor is copied (a decision into its response: every criterion and
# parameter again), so the answers of CheckEligibility and ActivateEntitlement are built in place:
# scalar and small message fields as constructor arguments (dicts for messages), criteria added to
# the repeated field, the parameters (the same for every decision of a program and day) parsed from
# bytes serialized once. The same messages as decision() / activation() build, byte for byte
# (tests/test_convert.py).

def _optional_date_fields(d: dt.date | None) -> dict[str, int] | None:
    return None if d is None else {"year": d.year, "month": d.month, "day": d.day}


def _plan_fields(plan: rules.FundingPlan | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {"price_per_month_cents": plan.price_per_month_cents, "months": plan.months,
            "total_cents": plan.total_cents,
            "shares": [{"funder": f, "share_basis_points": bp, "amount_cents": c} for f, bp, c in plan.shares]}


def _decision_kwargs(d: rules.Decision, snapshot: SnapshotRef | None) -> dict[str, Any]:
    """A decision's fields but its criteria and parameters (see _fill_decision)."""
    return {"program": "programs/" + d.program_id, "eligible": d.eligible, "as_of": _date_fields(d.as_of),
            "program_version": d.program_version, "funding_plan": _plan_fields(d.funding_plan),
            "registry_snapshot": snapshot.name if snapshot else "",
            "registry_extracted_on": _optional_date_fields(
                snapshot.extracted_on if snapshot else d.circumstances.registry_extracted_on),
            "access_end_date": _optional_date_fields(d.access_end), "facts_source": d.circumstances.facts_source}


def _parameters_bytes(params: tuple[rules.ParameterUsed, ...]) -> bytes:
    """The `parameters` field of a decision, serialized once per parameters tuple (one per program
    and day: rules.parameters_used)."""
    hit = _PARAMETER_BYTES.get(id(params))
    if hit is not None and hit[0] is params:
        return hit[1]
    raw = common_pb2.EligibilityDecision(parameters=parameters(params)).SerializeToString()
    if len(_PARAMETER_BYTES) >= 4096:
        _PARAMETER_BYTES.clear()
    _PARAMETER_BYTES[id(params)] = (params, raw)
    return raw


_PARAMETER_BYTES: dict[int, tuple[tuple[rules.ParameterUsed, ...], bytes]] = {}


def _fill_decision(m: common_pb2.EligibilityDecision, d: rules.Decision) -> None:
    add = m.criteria.add
    for c in d.criteria:
        add(criterion=c.criterion, passed=c.passed, reason_code=c.reason_code, detail=c.detail)
    m.MergeFromString(_parameters_bytes(d.parameters))


def check_response(decisions: Sequence[rules.Decision],
                   snapshot: SnapshotRef | None) -> eligibility_pb2.CheckEligibilityResponse:
    """CheckEligibilityResponse(decisions=[decision(d, snapshot) for d in decisions])."""
    return eligibility_pb2.CheckEligibilityResponse.FromString(check_answer(decisions, snapshot))


def check_answer(decisions: Sequence[rules.Decision], snapshot: SnapshotRef | None) -> bytes:
    """check_response(decisions, snapshot), serialized: the concatenation of each decision's entry
    in the response's repeated field (that is the message's encoding), each entry serialized once
    per decision object and snapshot (rules.evaluate hands out one decision object to everybody in
    the same situation on a day). CheckEligibility answers with these bytes as they are
    (entitlement.api.wrapping.passthrough)."""
    if len(decisions) == 1:
        return _answer_entry(decisions[0], snapshot)
    return b"".join([_answer_entry(d, snapshot) for d in decisions])


def _answer_entry(d: rules.Decision, snapshot: SnapshotRef | None) -> bytes:
    key = (id(d), snapshot.id, snapshot.extracted_on) if snapshot is not None else (id(d), None, None)
    hit = _DECISION_BYTES.get(key)
    if hit is not None and hit[0] is d:
        return hit[1]
    out = eligibility_pb2.CheckEligibilityResponse()
    _fill_decision(out.decisions.add(**_decision_kwargs(d, snapshot)), d)
    raw = out.SerializeToString()
    if len(_DECISION_BYTES) >= 4096:
        _DECISION_BYTES.clear()
    _DECISION_BYTES[key] = (d, raw)
    return raw


_DECISION_BYTES: dict[tuple[Any, ...], tuple[rules.Decision, bytes]] = {}


def activation_response(a: ActivationView, token: str) -> activation_pb2.ActivateEntitlementResponse:
    """ActivateEntitlementResponse(activation=activation(a), activation_token=token), in place."""
    out = activation_pb2.ActivateEntitlementResponse(activation=_activation_kwargs(a), activation_token=token)
    _fill_decision(out.activation.decision, a.decision)
    return out


def activation_message(a: ActivationView) -> activation_pb2.Activation:
    """activation(a), built in place."""
    out = activation_pb2.Activation(**_activation_kwargs(a))
    _fill_decision(out.decision, a.decision)
    return out


def _activation_kwargs(a: ActivationView) -> dict[str, Any]:
    return {"name": "activations/" + a.id, "program": "programs/" + a.program_id, "state": STATE_TO_PROTO[a.state],
            "job_seeker_ref": a.person_ref, "advisor_id": a.advisor_id, "agency_code": a.agency_code,
            "start_date": _date_fields(a.start_date), "end_date": _date_fields(a.end_date),
            "create_time": _timestamp_fields(a.created_at), "update_time": _timestamp_fields(a.updated_at),
            "platform": "platforms/" + a.platform_id, "account_id": a.account_id or "",
            "redeem_time": None if a.redeemed_at is None else _timestamp_fields(a.redeemed_at),
            "decision": _decision_kwargs(a.decision, a.snapshot), "funding": _plan_fields(a.decision.funding_plan),
            "state_reason": a.state_reason}


def program(p: Program, day: dt.date) -> eligibility_pb2.Program:
    return eligibility_pb2.Program(
        name=p.name, title=p.title, description=p.description, version=p.version,
        start_date=date(p.start), end_date=date(p.end), tier=p.tier,
        parameters=parameters(rules.parameters_used(p, day)),
        monthly_funding=funding_plan(rules.funding_plan(p, day, months=1)), open=p.is_open(day))


def activation(a: ActivationView) -> activation_pb2.Activation:
    return activation_pb2.Activation(
        name=f"activations/{a.id}", program=f"programs/{a.program_id}", state=STATE_TO_PROTO[a.state],
        job_seeker_ref=a.person_ref, advisor_id=a.advisor_id, agency_code=a.agency_code,
        start_date=date(a.start_date), end_date=date(a.end_date), create_time=timestamp(a.created_at),
        update_time=timestamp(a.updated_at), platform=f"platforms/{a.platform_id}",
        account_id=a.account_id or "", redeem_time=timestamp(a.redeemed_at),
        decision=decision(a.decision, a.snapshot), funding=funding_plan(a.decision.funding_plan),
        state_reason=a.state_reason)


def listed_activations(items: Sequence[ListedActivation], next_page_token: str) -> audit_pb2.ListActivationsResponse:
    """A page of ListActivations: for each item, the message activation() builds, byte for byte
    (tests/test_list_activations_output.py), built in place in the response (a message passed to a
    constructor is copied, twice for an Activation in a list) from plain values, the decision and
    funding serialized once per shared decision (audit.ListedActivation) and parsed into each."""
    out = audit_pb2.ListActivationsResponse(next_page_token=next_page_token)
    add = out.activations.add
    for (aid, program_id, state, person_ref, advisor_id, agency_code, start_date, end_date, created_at, updated_at,
         platform_id, account_id, redeemed_at, d, snapshot, state_reason) in items:
        m = add(name="activations/" + aid, program="programs/" + program_id, state=STATE_TO_PROTO[state],
                job_seeker_ref=person_ref, advisor_id=advisor_id, agency_code=agency_code,
                start_date=_date_fields(start_date), end_date=_date_fields(end_date),
                create_time=_timestamp_fields(created_at), update_time=_timestamp_fields(updated_at),
                platform="platforms/" + platform_id, account_id=account_id or "",
                redeem_time=None if redeemed_at is None else _timestamp_fields(redeemed_at), state_reason=state_reason)
        m.MergeFromString(_decision_fields(d, snapshot))
    return out


def _date_fields(d: dt.date) -> dict[str, int]:
    return {"year": d.year, "month": d.month, "day": d.day}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_EPOCH_NAIVE = dt.datetime(1970, 1, 1)


def _timestamp_fields(t: dt.datetime) -> dict[str, int]:
    """Timestamp.FromDatetime's fields: whole seconds since the epoch (rounded down), and the
    microseconds as nanos; a naive datetime is UTC (as FromDatetime takes it)."""
    since = t - (_EPOCH_NAIVE if t.tzinfo is None else _EPOCH)
    return {"seconds": since.days * 86400 + since.seconds, "nanos": t.microsecond * 1000}


def _decision_fields(d: rules.Decision, snapshot: SnapshotRef | None) -> bytes:
    """An Activation's `decision` and `funding` fields, serialized; once per decision object."""
    hit = _DECISION_FIELDS.get(id(d))
    if hit is not None and hit[0] is d and hit[1] is snapshot:
        return hit[2]
    raw = activation_pb2.Activation(decision=decision(d, snapshot), funding=funding_plan(d.funding_plan)
                                    ).SerializeToString()
    if len(_DECISION_FIELDS) >= 1024:
        _DECISION_FIELDS.clear()
    _DECISION_FIELDS[id(d)] = (d, snapshot, raw)
    return raw


_DECISION_FIELDS: dict[int, tuple[rules.Decision, SnapshotRef | None, bytes]] = {}


def status(s: EntitlementStatus) -> activation_pb2.EntitlementStatus:
    return activation_pb2.EntitlementStatus(
        account_id=s.account_id, active=s.active,
        activation=f"activations/{s.activation_id}" if s.activation_id else "",
        program=f"programs/{s.program_id}" if s.program_id else "",
        state=STATE_TO_PROTO.get(s.state, activation_pb2.ACTIVATION_STATE_UNSPECIFIED),
        end_date=date(s.end_date), tier=s.tier)


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
