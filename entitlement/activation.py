"""Use cases of an activation's life: activate (advisor), suspend / resume / revoke, redeem and
verify (platform). Every mutation is one write transaction holding the change, its ledger
entries, its event and its idempotency record, so a crash leaves all or nothing."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import uuid
import weakref
from dataclasses import dataclass, replace
from types import SimpleNamespace
from collections.abc import Callable
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from entitlement import counters, eventlog, facts as person_facts, inflight, ledger, registry, rollup, rules, tokens
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.eligibility import JobSeeker, resolve_program
from entitlement.memo import ByIdentity
from entitlement.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                                ResourceExhausted)
from entitlement.storage import direct
from entitlement.storage.db import utc
from entitlement.storage.models import Activation, IdempotencyRecord, LedgerEntry, ProgramCounter

LIVE = ("active", "suspended")
STATES = ("active", "suspended", "revoked", "expired")


@dataclass(frozen=True)
class ActivateCommand:
    job_seeker: JobSeeker
    program_id: str
    platform_id: str
    reason: str
    request_id: str = ""
    mentor_id: str = ""


@dataclass(frozen=True)
class TransitionCommand:
    activation_id: str
    action: str  # suspend | resume | revoke
    reason: str
    request_id: str = ""


@dataclass(frozen=True)
class ActivationView:
    id: str
    program_id: str
    state: str
    person_ref: str
    advisor_id: str
    agency_code: str
    start_date: dt.date
    end_date: dt.date
    created_at: dt.datetime
    updated_at: dt.datetime
    platform_id: str
    account_id: str | None
    redeemed_at: dt.datetime | None
    decision: rules.Decision
    snapshot: registry.SnapshotRef | None
    state_reason: str


@dataclass(frozen=True)
class ActivationResult:
    activation: ActivationView
    token: str


class EntitlementStatus(NamedTuple):
    """An account's entitlement (VerifyEntitlement, a redemption's answer, the change stream): a
    named tuple, as one is made per verification and a frozen dataclass costs twice as much."""

    account_id: str
    active: bool
    activation_id: str = ""
    program_id: str = ""
    state: str = ""
    end_date: dt.date | None = None
    tier: str = ""


# action -> (states it applies to, new state, event type)
TRANSITIONS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "suspend": (("active",), "suspended", "activation.suspended"),
    "resume": (("suspended",), "active", "activation.resumed"),
    "revoke": (("active", "suspended"), "revoked", "activation.revoked"),
}


def effective_state(a: Any, today: dt.date) -> str:
    """A live activation past its end date is expired even before the expiry job records it."""
    return "expired" if a.state in LIVE and a.end_date < today else a.state


def effective_reason(state: str, end_date: dt.date, state_reason: str, today: dt.date) -> str:
    """The reason of the last state change (activation.proto `state_reason`): of a live activation
    past its end date, its expiry's, as the expiry job records it (ledger.expire), not the reason
    of the suspension or the activation before it."""
    return ledger.EXPIRY_REASON if state in LIVE and end_date < today else state_reason


def view(ctx: Context, a: Any, stored: dict[str, Any] | None = None,
         decision: rules.Decision | None = None) -> ActivationView:
    """`a`: an Activation, or the column values of one as a namespace (a new activation, whose
    stored decision `stored` is passed as built rather than parsed back from its JSON, and its
    `decision` as evaluated: what `decision_from_dict` would give back, tests/test_rules.py)."""
    if stored is None:
        stored = json.loads(a.decision_json)
    snap = stored.get("registry_snapshot")
    today = ctx.clock.today()
    return ActivationView(
        id=a.id, program_id=a.program_id, state=effective_state(a, today),
        person_ref=ctx.pseudo.person_ref(a.person_key), advisor_id=a.advisor_id, agency_code=a.agency_code,
        start_date=a.start_date, end_date=a.end_date, created_at=utc(a.created_at),
        updated_at=utc(a.updated_at), platform_id=a.platform_id, account_id=a.account_id,
        redeemed_at=utc(a.redeemed_at) if a.redeemed_at else None,
        decision=decision if decision is not None else rules.decision_from_dict(stored["decision"]),
        snapshot=registry.SnapshotRef(snap["id"], dt.date.fromisoformat(snap["extracted_on"])) if snap else None,
        state_reason=effective_reason(a.state, a.end_date, a.state_reason, today))


def _request_hash(method: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([method, body], sort_keys=True, default=str).encode()).hexdigest()


# Built once: every write with a request id looks its record up (on Core: the ORM's get costs more
# than the statement, and nothing reads the record back through the session).
_RECORD = select(IdempotencyRecord.method, IdempotencyRecord.request_sha256, IdempotencyRecord.response).where(
    IdempotencyRecord.caller_id == bindparam("caller"), IdempotencyRecord.request_id == bindparam("request"))


_INSERT_RECORD = insert(IdempotencyRecord)
_INSERT_ACTIVATION = insert(Activation)
_INSERT_LEDGER = insert(LedgerEntry)


def _replay_read(caller: Caller, request_id: str) -> tuple[Any, dict[str, Any]] | None:
    """The statement `_replay` runs (for direct.Statements.prefetch), or None."""
    return (_RECORD, {"caller": caller.id, "request": request_id}) if request_id else None


def _replay(s: Session, caller: Caller, request_id: str, method: str, digest: str) -> dict[str, Any] | None:
    read = _replay_read(caller, request_id)
    if read is None:
        return None
    rec = direct.of(s).first(*read)
    if rec is None:
        return None
    if rec.method != method or rec.request_sha256 != digest:
        raise FailedPrecondition(
            "request_id was already used for a different request; use a new request_id",
            reason="REQUEST_ID_REUSED", metadata={"reused_request_id": request_id})
    result: dict[str, Any] = json.loads(rec.response)
    return result


def _remember(s: Session, ctx: Context, caller: Caller, request_id: str, method: str, digest: str,
              result: dict[str, Any]) -> None:
    if request_id:  # at once, on the transaction's DBAPI connection (entitlement/storage/direct.py)
        direct.of(s).execute(_INSERT_RECORD, {
            "caller_id": caller.id, "request_id": request_id, "method": method, "request_sha256": digest,
            "response": json.dumps(result).encode(), "created_at": ctx.clock.now()})


def _as_answered(v: ActivationView) -> dict[str, Any]:
    """What of an activation may change after a call answered it: kept with the call's idempotency
    record, so that a replay answers what the call answered (AIP-155), not the row as it is now."""
    return {"state": v.state, "state_reason": v.state_reason, "updated_at": v.updated_at.isoformat(),
            "end_date": v.end_date.isoformat(), "account_id": v.account_id,
            "redeemed_at": v.redeemed_at.isoformat() if v.redeemed_at else None}


def _replayed(ctx: Context, a: Activation, replay: dict[str, Any]) -> ActivationView:
    """The activation as the first call answered it (records made before these fields were kept:
    as it is now)."""
    current = view(ctx, a)
    was = replay.get("answered")
    if not was:
        return current
    return replace(current, state=was["state"], state_reason=was["state_reason"],
                   updated_at=dt.datetime.fromisoformat(was["updated_at"]),
                   end_date=dt.date.fromisoformat(was["end_date"]), account_id=was["account_id"],
                   redeemed_at=dt.datetime.fromisoformat(was["redeemed_at"]) if was["redeemed_at"] else None)


def _replayed_token(ctx: Context, a: Activation, token: str) -> str:
    """The token an activation's replay answers: the one first answered, unless a reissue replaced
    it since (its `jti` no longer the activation's): then one for the current `jti`, signed now, as
    the stored one would redeem nothing."""
    if tokens.decode_unverified(token).get("jti") == a.token_jti:
        return token
    return _token(ctx, a.platform_id, a.person_key, a.program_id, a.id, a.token_jti, ctx.clock.now(), a.end_date)


def _with_retry(fn: Any, *args: Any) -> Any:
    """Re-run a write once after a unique-constraint race: the re-run sees the winner's committed
    row and answers ALREADY_EXISTS or replays the stored response."""
    for attempt in range(3):
        try:
            return fn(*args)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_FOR_UPDATE = select(Activation).where(Activation.id == bindparam("id")).with_for_update()


def _load_for_update(s: Session, activation_id: str) -> Activation | None:
    return s.execute(_FOR_UPDATE, {"id": activation_id}).scalar_one_or_none()


def _check_scope(caller: Caller, a: Activation | None, activation_id: str) -> Activation:
    """Advisors act for their own agency only. Out of scope and missing look the same (AIP-211)."""
    if caller.role == "advisor" and (a is None or a.agency_code != caller.agency_code):
        raise PermissionDenied(f"activations/{activation_id} is not accessible to agency {caller.agency_code}",
                               reason="OUT_OF_SCOPE")
    if a is None:
        raise NotFound(f"activations/{activation_id} not found", reason="ACTIVATION_NOT_FOUND",
                       metadata={"activation": f"activations/{activation_id}"})
    return a


# ---------------------------------------------------------------------------------------- activate

def activate(ctx: Context, caller: Caller, cmd: ActivateCommand) -> ActivationResult:
    person_key = ctx.pseudo.person_key(cmd.job_seeker.agency_id)
    digest = _request_hash("activate", {"p": person_key.hex(), "b": cmd.job_seeker.birth_date,
                                        "g": cmd.program_id, "f": cmd.platform_id, "r": cmd.reason,
                                        "m": cmd.mentor_id})
    try:
        program = resolve_program(ctx, cmd.program_id)
        if not ctx.callers.platform_known(cmd.platform_id):
            # A token for a platform nobody can redeem it on, and its money committed: a typo's cost.
            raise NotFound(f"platform platforms/{cmd.platform_id} not found: no platform caller with a usable "
                           "credential has this platform id", reason="PLATFORM_NOT_FOUND",
                           metadata={"platform": f"platforms/{cmd.platform_id}"})
    except NotFound:
        # A retry of an activation made before its platform (or program) went answers that
        # activation (AIP-155), not NOT_FOUND as if nothing had been made (found by a review).
        stored = _stored_activation(ctx, caller, cmd.request_id, digest)
        if stored is not None:
            return stored
        raise
    # The live source is asked before the write transaction, never inside it.
    live = person_facts.ask_live(ctx, cmd.job_seeker.agency_id, cmd.job_seeker.birth_date)
    counters.ensure_row(ctx.db, program.id)  # once per program and Database (counters.Reservation)
    with inflight.claim(ctx.db, caller.id, cmd.request_id):
        try:
            result: ActivationResult = _with_retry(_activate_once, ctx, caller, cmd, program, person_key, digest,
                                                   live)
        except counters.CounterRowMissing:  # deleted outside the service since: made again, once (gone
            # again at once, someone is deleting it as it is made: that second one is INTERNAL)
            counters.ensure_row(ctx.db, program.id, missing=True)
            result = _with_retry(_activate_once, ctx, caller, cmd, program, person_key, digest, live)
    return result


def _why_not(decision: rules.Decision) -> str:
    """The failed criteria as CheckEligibility explains them, each reason once with the detail of its
    first criterion: `REGISTRATION_ENDED (Registration ended on ...)`. The codes alone told the
    advisor at the desk neither the date nor what to do (found by a review). The details carry no
    personal data beyond the registry facts a check by the same identifiant and birth date shows
    (a mismatch is NOT_REGISTERED, as in a check)."""
    parts: dict[str, str] = {}
    for c in decision.criteria:
        if not c.passed:
            parts.setdefault(c.reason_code, c.detail)
    return "; ".join(f"{code} ({detail})" for code, detail in parts.items())


def _stored_activation(ctx: Context, caller: Caller, request_id: str, digest: str) -> ActivationResult | None:
    """The answer stored for this caller's `request_id`, when an activation was made under it (as
    `_activate_once` replays it); REQUEST_ID_REUSED when it was made for another request."""
    if not request_id:
        return None
    with ctx.db.read() as s:
        replay = _replay(s, caller, request_id, "activate", digest)
        return None if replay is None else _replayed_activation(ctx, s, replay)


def _replayed_activation(ctx: Context, s: Session, replay: dict[str, Any]) -> ActivationResult:
    """An activation's stored answer (AIP-155): the activation as first answered, and its token."""
    a = s.get(Activation, replay["activation_id"])
    assert a is not None
    return ActivationResult(_replayed(ctx, a, replay), _replayed_token(ctx, a, replay["token"]))


def _activate_once(ctx: Context, caller: Caller, cmd: ActivateCommand, program: Any, person_key: bytes,
                   digest: str, live: person_facts.LiveAnswer) -> ActivationResult:
    with ctx.db.write() as s:
        st = direct.of(s)
        # PostgreSQL: the first reads (the request's lock, its stored response, the person's facts,
        # their live activations in the program, locked) leave together with BEGIN, in one round
        # trip; each is read below where it was (direct.py).
        st.pipeline()
        live_read = (_LIVE_ROWS, {"program": program.id, "person": person_key})
        st.prefetch(inflight.lock_read(s, caller.id, cmd.request_id), _replay_read(caller, cmd.request_id),
                    None if live.facts is not None else registry.lookup_read(person_key), live_read)
        inflight.lock(s, caller.id, cmd.request_id)
        replay = _replay(s, caller, cmd.request_id, "activate", digest)
        if replay is not None:
            st.end(failed=False)  # the ORM reads below: out of pipeline mode
            return _replayed_activation(ctx, s, replay)
        # The person's live rows in this program, locked (one statement for both checks below), then
        # the moment, once they are held: a renewal that waited for the previous activation's row
        # while the settlement job, past midnight, expired it, started on that activation's last day
        # (both activations then owed a month of access for that day: tests/test_ledger.py).
        live_rows = st.all(*live_read)
        now, today = ctx.clock.moment()
        facts, snapshot, source = person_facts.lookup(st, person_key, cmd.job_seeker.birth_date, live)
        seats_used, cents_committed = counters.usage(st, [program])[program.id]
        decision = rules.evaluate(program, facts, today, rules.Circumstances(
            registry_extracted_on=person_facts.data_date(snapshot, source, today), seats_used=seats_used,
            cents_committed=cents_committed, mentor_id=cmd.mentor_id, facts_source=source))
        if decision.failed_reasons == ["CAP_REACHED"]:
            raise _cap_reached(program.name)
        if not decision.eligible:
            raise FailedPrecondition(
                f"not eligible to {program.name}: {_why_not(decision)}",
                reason="NOT_ELIGIBLE", metadata={"program": program.name,
                                                 "failed_criteria": ",".join(decision.failed_reasons)})
        existing = next((r for r in live_rows if r.end_date >= today), None)
        if existing:
            # READ COMMITTED: a concurrent retry of this very request may have committed between the
            # replay check above and this query; its idempotency record is visible now (AIP-155).
            replay = _replay(s, caller, cmd.request_id, "activate", digest)
            if replay is not None:
                st.end(failed=False)  # the ORM read below: out of pipeline mode
                return _replayed_activation(ctx, s, replay)
            # Its state and last day: what the advisor does next (an eligible check, then this refusal,
            # said neither: a suspended activation is resumed, a lost token reissued, by its agency).
            instead = ("resume it" if existing.state == "suspended"
                       else "if its token was lost, reissue the token")
            raise AlreadyExists(
                f"this job seeker already has a live activation in {program.name}: activations/{existing.id} "
                f"({existing.state}, access until {existing.end_date.isoformat()}): {instead} rather than "
                "activate again (the advisors of the agency that made it may)", reason="ACTIVATION_EXISTS",
                metadata={"activation": f"activations/{existing.id}", "current_state": existing.state.upper(),
                          "end_date": existing.end_date.isoformat()})
        # A live row past its end date is expired: record it so the unique index frees the slot.
        stale = [r.id for r in live_rows if r.end_date < today]
        if stale:
            st.end(failed=False)  # the ORM's unit of work: out of pipeline mode (entered again below)
            _expire_stale(s, ctx, stale, today, program.id)
        plan, end = decision.funding_plan, decision.access_end
        assert plan is not None and end is not None
        # Nothing below reads a row count or goes through the ORM until the event's sequence
        # number: on PostgreSQL the writes are queued and travel with the log_head UPDATE (the
        # program counter's conditional UPDATE among them), the Merkle read and the COMMIT
        # (direct.py). (Back in pipeline mode if a rare path above left it; a no-op otherwise.)
        st.pipeline()
        activation_id = uuid.uuid4().hex
        jti = uuid.uuid4().hex
        stored, stored_json = _stored(decision, snapshot, program.tier)
        # The row, its ledger entries and the funding report's rollup, written on the transaction's
        # DBAPI connection (entitlement/storage/direct.py): no ORM unit of work per activation.
        row = {"id": activation_id, "program_id": program.id, "program_version": program.version,
               "person_key": person_key, "state": "active", "start_date": today, "end_date": end,
               "advisor_id": caller.advisor_id or caller.id, "agency_code": caller.agency_code or "-",
               "platform_id": cmd.platform_id, "state_reason": cmd.reason,
               "decision_json": stored_json,
               "snapshot_id": snapshot.id if snapshot else None, "token_jti": jti, "account_id": None,
               "redeemed_at": None, "created_at": now, "updated_at": now}
        st.execute(_INSERT_ACTIVATION, row)
        month = today.strftime("%Y-%m")
        entries = [{"activation_id": activation_id, "program_id": program.id, "funder_id": funder,
                    "kind": "commit", "month": month, "amount_cents": cents, "created_at": now}
                   for funder, _bp, cents in plan.shares]
        st.execute_many(_INSERT_LEDGER, entries)
        token = _token(ctx, cmd.platform_id, person_key, program.id, activation_id, jti, now, end)
        # Before the event: on PostgreSQL, the event's UPDATE of log_head holds that row (every
        # writer's) until the commit, so what can be written before it is.
        # (What the answer says of what may change later: as made now, `_as_answered`'s fields.)
        _remember(s, ctx, caller, cmd.request_id, "activate", digest,
                  {"activation_id": activation_id, "token": token, "answered": {
                      "state": "active", "state_reason": cmd.reason, "updated_at": now.isoformat(),
                      "end_date": end.isoformat(), "account_id": None, "redeemed_at": None}})
        # The seat and the cents, taken just before the event (its answer read with the sequence
        # number's): the counter row is locked from this UPDATE to the commit, that is while this
        # writer waits for the log head and holds it, no more (counters.Reservation).
        reservation = counters.reservation(s, program, plan.total_cents, today)
        eventlog.append(s, time=now, type="activation.created", actor=caller.actor,
                        subject=f"activations/{activation_id}", program_id=program.id, reason=cmd.reason,
                        platform_id=cmd.platform_id, read_rollup_timezone=True,
                        payload={"job_seeker_ref": ctx.pseudo.person_ref(person_key),
                                 "program_version": program.version, "platform": cmd.platform_id,
                                 "start_date": today.isoformat(), "end_date": end.isoformat(),
                                 "registry_snapshot": snapshot.id if snapshot else None,
                                 "facts_source": source, "committed_cents": plan.total_cents,
                                 "shares": {f: c for f, _bp, c in plan.shares}})
        if not reservation.taken():
            raise _cap_reached(program.name)  # another activation took the last room meanwhile
        # After the event: on PostgreSQL its log_head row lock orders every writer's rollup rows.
        rollup.commitments(s, activation_id, rollup.Span(today, end, "active", now),
                           [(e["funder_id"], e["program_id"], e["month"], e["amount_cents"]) for e in entries])
        return ActivationResult(view(ctx, SimpleNamespace(**row), stored, decision), token)


def _token(ctx: Context, platform_id: str, person_key: bytes, program_id: str, activation_id: str, jti: str,
           now: dt.datetime, end: dt.date) -> str:
    """The activation token: valid from now for the token lifetime, never past the end of access."""
    exp = min(now + dt.timedelta(days=ctx.settings.token_ttl_days), access_ends(end, ctx.settings.timezone))
    return tokens.sign(ctx.keys, tokens.TokenClaims(
        issuer=ctx.settings.issuer, platform_id=platform_id,
        subject=ctx.pseudo.platform_subject(platform_id, person_key), program_id=program_id,
        activation_id=activation_id, jti=jti, issued_at=int(now.timestamp()),
        not_before=int(now.timestamp()), expires_at=int(exp.timestamp())))


def access_ends(end: dt.date, timezone: str) -> dt.datetime:
    """The instant access ends: midnight after the end date in the service's time zone (Europe/Paris:
    23:00 or 22:00 UTC), which no token outlives."""
    return dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), tzinfo=ZoneInfo(timezone))


# What an activation stores of its decision, made once per decision object and snapshot: people in
# the same situation share one decision (rules.evaluate), and its JSON is the same for all of them.
_STORED = ByIdentity(1024)


def _stored(decision: rules.Decision, snapshot: registry.SnapshotRef | None,
            tier: str) -> tuple[dict[str, Any], str]:
    """`tier`: the program's (one per program object, as the decision is: granted_tier reads it)."""
    snap = None if snapshot is None else (snapshot.id, snapshot.extracted_on)
    hit: tuple[dict[str, Any], str] | None = _STORED.get(decision, snap)
    if hit is None:
        stored = {"decision": rules.decision_to_dict(decision), "registry_snapshot": None if snapshot is None
                  else {"id": snapshot.id, "extracted_on": snapshot.extracted_on.isoformat()}, "tier": tier}
        hit = _STORED.put(decision, (stored, json.dumps(stored, sort_keys=True)), snap)
    return hit


def _cap_reached(program_name: str) -> ResourceExhausted:
    return ResourceExhausted(f"{program_name} has no seat or budget left", reason="CAP_REACHED",
                             metadata={"program": program_name})


# Built once (the write path runs it at every activation): the person's live activations in the
# program, locked. A live one not past its end date refuses the activation (the unique index allows
# one live row); one past its end date is expired first. On Core: one row at most, usually none.
_LIVE_ROWS = select(Activation.id, Activation.end_date, Activation.state).where(
    Activation.program_id == bindparam("program"), Activation.person_key == bindparam("person"),
    Activation.state.in_(LIVE)).with_for_update()


def _expire_stale(s: Session, ctx: Context, stale_ids: list[str], today: dt.date, program_id: str) -> None:
    # The program's counter row first: expiring writes an event (the log head's row) and may release
    # cents (the counter's), and every activation takes the counter before the log head; taken in
    # the other order here, a renewal and the program's other activations deadlocked.
    s.execute(select(ProgramCounter.program_id).where(ProgramCounter.program_id == program_id).with_for_update())
    for activation_id in stale_ids:  # locked by _LIVE_ROWS already
        a = s.get(Activation, activation_id)
        assert a is not None
        ledger.expire(s, ctx, a, today)  # as the settlement job would: consume, release, one event
    if stale_ids:
        # Written now: the new row is inserted on the DBAPI connection (not by this session's
        # flush), and the partial unique index admits it only once the old row is no longer live.
        s.flush()


# ------------------------------------------------------------------------------------- read, move

def get(ctx: Context, caller: Caller, activation_id: str) -> ActivationView:
    with ctx.db.read() as s:
        a = _check_scope(caller, s.get(Activation, activation_id), activation_id)
        return view(ctx, a)


_WORDS = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{4,32}(?![A-Za-z0-9])")


def _refuse_identity_in_reason(ctx: Context, reason: str, person_key: bytes) -> None:
    """A transition's reason goes for ever into the event log funders read, as an activation's does
    (entitlement.api.validation.free_of_identity); the activation keeps no identifiant, only its
    keyed pseudonym: each word of the reason that could be one is keyed alike and compared (the
    advisor of the agency that made the activation, the only caller who gets this far, had it)."""
    for word in _WORDS.findall(reason):
        if hmac.compare_digest(ctx.pseudo.person_key(word), person_key):
            raise InvalidArgument.single("reason", "must not contain the job seeker's identifier: it is kept for "
                                                   "ever in the event log, which funders read")


def transition(ctx: Context, caller: Caller, cmd: TransitionCommand) -> ActivationView:
    digest = _request_hash(cmd.action, {"a": cmd.activation_id, "r": cmd.reason})
    with inflight.claim(ctx.db, caller.id, cmd.request_id):
        result: ActivationView = _with_retry(_transition_once, ctx, caller, cmd, digest)
    return result


def _transition_once(ctx: Context, caller: Caller, cmd: TransitionCommand, digest: str) -> ActivationView:
    allowed_from, new_state, event_type = TRANSITIONS[cmd.action]
    with ctx.db.write() as s:
        inflight.lock(s, caller.id, cmd.request_id)
        replay = _replay(s, caller, cmd.request_id, cmd.action, digest)
        if replay is not None:
            a = s.get(Activation, replay["activation_id"])
            assert a is not None
            return _replayed(ctx, a, replay)
        a = _check_scope(caller, _load_for_update(s, cmd.activation_id), cmd.activation_id)
        _refuse_identity_in_reason(ctx, cmd.reason, a.person_key)
        # The moment, once the row is held: a change that waited for it while the settlement job,
        # past midnight, consumed the month of access beginning that day is made (and logged) on
        # that day, not on the day before, when by the log that month would have had no access.
        now, today = ctx.clock.moment()
        current = effective_state(a, today)
        if current not in allowed_from:
            # The row lock may have waited for a concurrent retry of this very request: replay it.
            replay = _replay(s, caller, cmd.request_id, cmd.action, digest)
            if replay is not None:
                return _replayed(ctx, a, replay)
            raise FailedPrecondition(
                f"cannot {cmd.action} activations/{a.id}: it is {current}",
                reason="INVALID_STATE", metadata={"current_state": current.upper(), "action": cmd.action})
        a.state, a.state_reason, a.updated_at = new_state, cmd.reason, now
        payload: dict[str, Any] = {"from": current, "to": new_state}
        if cmd.action == "revoke":
            booking = _settle_at_revocation(s, ctx, a, today)
            # What the revocation booked, per funder: the report moves by it, and so the log says it.
            payload.update(released_cents=booking.released, consumed_cents=booking.consumed,
                           consumed_months=booking.months_consumed)
        eventlog.append(s, time=now, type=event_type, actor=caller.actor, subject=f"activations/{a.id}",
                        program_id=a.program_id, reason=cmd.reason, payload=payload)
        answer = view(ctx, a)
        _remember(s, ctx, caller, cmd.request_id, cmd.action, digest,
                  {"activation_id": a.id, "answered": _as_answered(answer)})
        return answer


def reissue_token(ctx: Context, caller: Caller, cmd: TransitionCommand) -> ActivationResult:
    """A new token for a live activation never redeemed (cmd.action is "reissue"): a new `jti`, so the
    old token no longer matches; the ledger is untouched; one `activation.token_reissued` event."""
    digest = _request_hash("reissue", {"a": cmd.activation_id, "r": cmd.reason})
    with inflight.claim(ctx.db, caller.id, cmd.request_id):
        result: ActivationResult = _with_retry(_reissue_once, ctx, caller, cmd, digest)
    return result


def _reissue_once(ctx: Context, caller: Caller, cmd: TransitionCommand, digest: str) -> ActivationResult:
    with ctx.db.write() as s:
        inflight.lock(s, caller.id, cmd.request_id)
        replay = _replay(s, caller, cmd.request_id, "reissue", digest)
        if replay is not None:
            a = s.get(Activation, replay["activation_id"])
            assert a is not None
            return ActivationResult(_replayed(ctx, a, replay), replay["token"])
        a = _check_scope(caller, _load_for_update(s, cmd.activation_id), cmd.activation_id)
        _refuse_identity_in_reason(ctx, cmd.reason, a.person_key)
        # The moment, once the row is held (as a transition's): a reissue that waited for it past
        # midnight of the end date judged the activation by the day before and signed a token for
        # an activation whose access had ended (tests/test_reissue.py).
        now, today = ctx.clock.moment()
        current = effective_state(a, today)
        if current not in LIVE:
            raise FailedPrecondition(
                f"cannot reissue the token of activations/{a.id}: it is {current}", reason="INVALID_STATE",
                metadata={"current_state": current.upper(), "action": "reissue_token"})
        if a.account_id is not None:
            # (The platform's account id stays out of the answer: the advisor has no use for it.)
            raise FailedPrecondition(f"the token of activations/{a.id} was already redeemed",
                                     reason="TOKEN_ALREADY_REDEEMED", metadata={"activation": f"activations/{a.id}"})
        jti = uuid.uuid4().hex
        token = _token(ctx, a.platform_id, a.person_key, a.program_id, a.id, jti, now, a.end_date)
        a.token_jti, a.updated_at = jti, now
        eventlog.append(s, time=now, type="activation.token_reissued", actor=caller.actor,
                        subject=f"activations/{a.id}", program_id=a.program_id, reason=cmd.reason,
                        platform_id=a.platform_id, payload={"platform": a.platform_id, "jti": jti})
        answer = view(ctx, a)
        _remember(s, ctx, caller, cmd.request_id, "reissue", digest,
                  {"activation_id": a.id, "token": token, "answered": _as_answered(answer)})
        return ActivationResult(answer, token)


def _settle_at_revocation(s: Session, ctx: Context, a: Activation, today: dt.date) -> ledger.Booking:
    """Revocation settles the activation (entitlement.consumption): the months owed up to today are
    consumed, and everything committed that can no longer be owed is released (for `use`
    programs, months whose use may still be reported stay reserved until their report window
    closes). Returns what it booked now, per funder."""
    return ledger.settle(s, ctx, a, today, ended_on=today)


# ---------------------------------------------------------------------------------------- platform

def _status(ctx: Context, a: Any, account_id: str) -> EntitlementStatus:
    """`a`: an Activation, a Row with its id, program_id, program_version, state and end_date, or
    None."""
    if a is None:
        return EntitlementStatus(account_id=account_id, active=False)
    state = effective_state(a, ctx.clock.today())
    return EntitlementStatus(account_id=account_id, active=state == "active", activation_id=a.id,
                             program_id=a.program_id, state=state, end_date=a.end_date,
                             tier=granted_tier(ctx, a.program_id, a.program_version, a.id))


_DECISION_OF = select(Activation.decision_json).where(Activation.id == bindparam("id"))
# Per catalog (a server process loads one): (program id, version) -> the tier granted under it.
_TIERS: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], str]] = weakref.WeakKeyDictionary()


def granted_tier(ctx: Context, program_id: str, version: str, activation_id: str) -> str:
    """The benefit tier an activation was granted: its program file's, as of the version it was
    decided under (the version is the file's hash, so one tier per version). The file loaded now
    answers when it is that version; otherwise (the file edited since, or removed) the tier
    recorded with the activation's decision, read once per version; activations decided before
    the tier was recorded get the file's current tier, or "" when the file is gone. (By the file
    alone, a program whose file was removed answered its holders' VerifyEntitlement `active`
    with no tier, and a tier changed in the file changed it for every holder.)"""
    program = ctx.catalog.get(program_id)
    if program is not None and program.version == version:
        return program.tier
    known = _TIERS.get(ctx.catalog)
    if known is None:
        known = _TIERS.setdefault(ctx.catalog, {})
    hit = known.get((program_id, version))
    if hit is None:
        row = ctx.db.hot.first(_DECISION_OF, {"id": activation_id})
        recorded = json.loads(row[0]).get("tier") if row is not None else None
        hit = recorded if isinstance(recorded, str) else (program.tier if program is not None else "")
        if row is not None:
            known[(program_id, version)] = hit
    return hit


def redeem(ctx: Context, caller: Caller, token: str, account_id: str) -> EntitlementStatus:
    try:
        claims = tokens.verify(ctx.keys, token, issuer=ctx.settings.issuer, audience=caller.platform_id,
                               now=ctx.clock.now())
    except tokens.TokenError as exc:
        if exc.reason == "TOKEN_WRONG_AUDIENCE":
            raise PermissionDenied(exc.message, reason=exc.reason) from None
        if exc.claims is not None:  # expired, but redeemed while it was valid: a replay (proto)
            _replayed_redemption(ctx, exc.claims)
        raise FailedPrecondition(exc.message, reason=exc.reason) from None
    try:
        result: EntitlementStatus = _with_retry(_redeem_once, ctx, caller, claims, account_id)
    except IntegrityError:
        raise AlreadyExists("this account already holds a live entitlement to this program",
                            reason="ACCOUNT_ALREADY_BOUND", metadata={"account_id": account_id}) from None
    return result


# Built once (a platform redeems each token once): the activation's columns a redemption reads,
# locked, and its binding; run on the transaction's DBAPI connection (entitlement/storage/direct.py).
# The binding moves no funding-report count (rollup.py: state and dates unchanged), so no ORM
# object is needed.
_REDEEM_ROW = select(Activation.id, Activation.program_id, Activation.program_version, Activation.state,
                     Activation.end_date, Activation.token_jti, Activation.platform_id, Activation.account_id).where(
    Activation.id == bindparam("id")).with_for_update()
_BIND_ACCOUNT = update(Activation).where(Activation.id == bindparam("id")).values(
    account_id=bindparam("account"), redeemed_at=bindparam("now"), updated_at=bindparam("now"))


def _of_token(a: Any, claims: tokens.TokenClaims) -> bool:
    """The activation row `a` is the one this token was signed for, as it stands now."""
    return bool(a.token_jti == claims.jti and a.platform_id == claims.platform_id)


def _already_redeemed(a: Any) -> AlreadyExists:
    return AlreadyExists(f"token was already redeemed for account {a.account_id}", reason="TOKEN_ALREADY_REDEEMED",
                         metadata={"account_id": a.account_id, "activation": f"activations/{a.id}"})


def _replayed_redemption(ctx: Context, claims: tokens.TokenClaims) -> None:
    """An expired token (its signature, issuer and audience verified) that was redeemed while valid:
    raises the replay's ALREADY_EXISTS with the binding, as before the expiry (a platform retrying
    after a lost answer, late). Returns when it was never redeemed: then it is just expired."""
    with ctx.db.read() as s:
        a = s.execute(_REDEEMED_ROW, {"id": claims.activation_id}).first()
    if a is not None and _of_token(a, claims) and a.account_id is not None:
        raise _already_redeemed(a)


_REDEEMED_ROW = select(Activation.id, Activation.token_jti, Activation.platform_id, Activation.account_id).where(
    Activation.id == bindparam("id"))


def _redeem_once(ctx: Context, caller: Caller, claims: tokens.TokenClaims, account_id: str) -> EntitlementStatus:
    with ctx.db.write() as s:
        st = direct.of(s)
        # PostgreSQL: in pipeline mode from the start, so that the BEGIN travels with the read of the
        # row (direct.py) and the binding with the log_head UPDATE; nothing here goes through the ORM.
        st.pipeline()
        a = st.first(_REDEEM_ROW, {"id": claims.activation_id})
        # The moment, once the row is held (as a transition's): a redemption that waited for it past
        # midnight of the end date bound an activation whose access had ended (tests/test_activation.py).
        now, today = ctx.clock.moment()
        if a is None or not _of_token(a, claims):
            raise FailedPrecondition("token does not match any activation", reason="TOKEN_INVALID")
        if a.account_id is not None:  # bound once: any replay, same account or not, names the binding
            raise _already_redeemed(a)
        state = effective_state(a, today)
        if state not in LIVE:
            raise FailedPrecondition(f"the entitlement is {state}", reason="ENTITLEMENT_NOT_ACTIVE",
                                     metadata={"current_state": state.upper()})
        st.execute(_BIND_ACCOUNT, {"id": a.id, "account": account_id, "now": now})
        eventlog.append(s, time=now, type="activation.redeemed", actor=caller.actor,
                        subject=f"activations/{a.id}", program_id=a.program_id, platform_id=a.platform_id,
                        payload={"platform": caller.platform_id, "jti": claims.jti})
        return _status(ctx, a, account_id)


# Built once (the platform calls it at every login): the account's activations on this platform,
# only the columns the answer needs (an account has one, or a few over the years: choosing in Python
# spares SQLite a sorter, a third of the statement's cost).
_VERIFY = (
    select(Activation.id, Activation.program_id, Activation.program_version, Activation.state, Activation.end_date)
    .where(Activation.platform_id == bindparam("platform"), Activation.account_id == bindparam("account"))
)


def _verify_order(today: dt.date) -> Callable[[Any], tuple[int, bool, int]]:
    """The account's live activation first (live state, not past its end), then an active one,
    then the latest end."""
    return lambda r: (0 if r.state in LIVE and r.end_date >= today else 1, r.state != "active",
                      -r.end_date.toordinal())


def verify(ctx: Context, caller: Caller, account_id: str) -> EntitlementStatus:
    # One statement, no transaction, straight on the DBAPI (entitlement/storage/hotread.py).
    rows = ctx.db.hot.all(_VERIFY, {"platform": caller.platform_id, "account": account_id})
    row = (rows[0] if len(rows) == 1 else min(rows, key=_verify_order(ctx.clock.today()))) if rows else None
    return _status(ctx, row, account_id)  # a Row has the attributes _status reads

