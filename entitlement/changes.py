"""WatchEntitlementChanges: the changes of a platform's activations, read from the event log.

A change is an event of one of the CHANGE_TYPES about an activation of the calling platform, once
that activation is bound to one of its accounts (events before the redemption are not sent: the
platform had no account to apply them to; the `redeemed` change carries the state at that time).
The events are filtered by platform in the query (`events.platform_id`, indexed), so a platform
never reads another's.

Positions. A cursor is an opaque text encoding a sequence number of the event log: the position
just after the change it comes with. Resuming from it sends exactly the changes after that one,
none lost, none repeated: the log is gapless and its numbers are committed in order (the counter
row is locked until each writer commits). An empty cursor means "from now"; the stream then opens
with a bookmark (a change without status) carrying the cursor of that position, so a client can
resume even if nothing happened before it disconnected.

Each change carries the entitlement status as that change left it: the state after it (for
`curtailed`, `active`, `suspended` or `expired`), the end date, the program and tier. The end date
is the one in force after the change (a later curtailment's `previous_end_date`), so a change read
again from an older cursor says what it said when first streamed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from entitlement.activation import EntitlementStatus
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.errors import InvalidArgument
from entitlement.eventlog import ACTIVATION_PREFIX
from entitlement.storage.db import utc
from entitlement.storage.models import Activation, Event, LogHead

# event type -> change type name (the proto's EntitlementChange.ChangeType)
CHANGE_TYPES = {
    "activation.redeemed": "REDEEMED",
    "activation.suspended": "SUSPENDED",
    "activation.resumed": "RESUMED",
    "activation.revoked": "REVOKED",
    "activation.expired": "EXPIRED",
    "activation.curtailed": "CURTAILED",
}
STATE_AFTER = {"activation.suspended": "suspended", "activation.resumed": "active",
               "activation.revoked": "revoked", "activation.expired": "expired"}
_CURSOR_TAG = "entitlement.v1.changes:"
BATCH = 200


@dataclass(frozen=True)
class Change:
    seq: int
    cursor: str
    type: str  # a CHANGE_TYPES value; "" for a bookmark
    time: dt.datetime | None
    status: EntitlementStatus | None  # None for a bookmark


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_TAG}{seq}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    bad = InvalidArgument.single("cursor", "is not a cursor returned by WatchEntitlementChanges")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    digits = text[len(_CURSOR_TAG):]
    # 1 to 19 ASCII digits (a sequence number): str.isdigit() takes '²', which int() then refuses,
    # and int() refuses more than 4,300 digits.
    if not text.startswith(_CURSOR_TAG) or not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
        raise bad
    return int(digits)


def bookmark(seq: int) -> Change:
    return Change(seq, encode_cursor(seq), "", None, None)


def start_position(ctx: Context, cursor: str) -> int:
    """The sequence number to stream after: the cursor's, or the log's head for "from now"."""
    seq = decode_cursor(cursor) if cursor else None
    with ctx.db.read() as s:
        head = int(s.execute(select(LogHead.size).where(LogHead.id == 1)).scalar_one())
    if seq is None:
        return head
    if seq > head:
        raise InvalidArgument.single("cursor", "is ahead of the event log: it comes from another service")
    return seq


def _state_at_redeem(s: Session, subject: str, seq: int) -> str:
    last = s.execute(select(Event.type).where(
        Event.subject == subject, Event.seq < seq,
        Event.type.in_(("activation.suspended", "activation.resumed"))).order_by(Event.seq.desc()).limit(1)
    ).scalar_one_or_none()
    return "suspended" if last == "activation.suspended" else "active"


def poll(ctx: Context, caller: Caller, after: int, limit: int = BATCH) -> tuple[list[Change], int, bool]:
    """The caller's changes after sequence number `after`: (changes, the last sequence number
    read, whether the batch was full and more may follow at once)."""
    today = ctx.clock.today()
    with ctx.db.read() as s:
        events = list(s.execute(select(Event).where(
            Event.platform_id == caller.platform_id, Event.seq > after, Event.type.in_(list(CHANGE_TYPES)))
            .order_by(Event.seq).limit(limit)).scalars())
        if not events:
            return [], after, False
        subjects = sorted({e.subject for e in events})
        ids = [subj[len(ACTIVATION_PREFIX):] for subj in subjects]
        activations = {a.id: a for a in s.execute(select(Activation).where(Activation.id.in_(ids))).scalars()}
        redeemed = {subject: seq for subject, seq in s.execute(select(Event.subject, Event.seq).where(
            Event.subject.in_(subjects), Event.type == "activation.redeemed"))}
        # The curtailments after the batch's first event, in order: a change without an end date of
        # its own left the one the first curtailment after it found (`previous_end_date`), not the
        # row's as it is now (rare: usually none).
        curtailments: dict[str, list[tuple[int, dt.date]]] = {}
        for subject, seq, payload_json in s.execute(select(Event.subject, Event.seq, Event.payload_json).where(
                Event.subject.in_(subjects), Event.type == "activation.curtailed", Event.seq > events[0].seq)
                .order_by(Event.seq)):
            previous = json.loads(payload_json).get("previous_end_date")
            if previous:
                curtailments.setdefault(subject, []).append((seq, dt.date.fromisoformat(previous)))
        out = []
        for e in events:
            a = activations.get(e.subject[len(ACTIVATION_PREFIX):])
            redeemed_at = redeemed.get(e.subject)
            if a is None or a.account_id is None or redeemed_at is None or e.seq < redeemed_at:
                continue  # not bound to an account of the platform yet
            payload = json.loads(e.payload_json)
            if e.type == "activation.redeemed":
                state = _state_at_redeem(s, e.subject, e.seq)
            elif e.type == "activation.curtailed":
                state = str(payload.get("to", a.state))
            else:
                state = STATE_AFTER[e.type]
            if "end_date" in payload:
                end = dt.date.fromisoformat(payload["end_date"])
            else:
                end = next((was for seq, was in curtailments.get(e.subject, ()) if seq > e.seq), a.end_date)
            program = ctx.catalog.get(a.program_id)
            status = EntitlementStatus(account_id=a.account_id, active=state == "active" and end >= today,
                                       activation_id=a.id, program_id=a.program_id, state=state, end_date=end,
                                       tier=program.tier if program else "")
            out.append(Change(e.seq, encode_cursor(e.seq), CHANGE_TYPES[e.type], utc(e.time), status))
        return out, events[-1].seq, len(events) == limit
