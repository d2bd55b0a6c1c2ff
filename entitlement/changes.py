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

A cursor also carries the first 8 bytes of the leaf hash of the event at its position (the Merkle
log's, entitlement/logtree.py: over the event's time, type, subject, payload...), checked when it
comes back. A sequence number alone was taken from any log long enough (found by a review): a
platform's cursor given to another deployment, or to this service after its database was restored
from a backup and logged other events at those numbers, was accepted and streamed from, the changes
between the two histories' positions never sent (a revocation among them: Premium kept). Now such
a cursor is INVALID_ARGUMENT and the platform resynchronises (VerifyEntitlement, then "from now").
Cursors of the log's start (position 0) have no event to carry, and those issued before the hash
was added (a bare number) are still taken as they are.

Each change carries the entitlement status as that change left it: the state after it (for
`curtailed`, `active`, `suspended` or `expired`), the end date, the program and tier. The end date
is the one in force after the change (a later curtailment's `previous_end_date`), so a change read
again from an older cursor says what it said when first streamed; but `active` is judged on the
day it is read (false once that end date has passed, whatever the state): a platform catching up
never switches access on after its end.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from entitlement import logtree
from entitlement.activation import EntitlementStatus, granted_tier
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
_BOUND_BYTES = 8  # of the leaf hash a cursor carries
BATCH = 200


@dataclass(frozen=True)
class Change:
    seq: int
    cursor: str
    type: str  # a CHANGE_TYPES value; "" for a bookmark
    time: dt.datetime | None
    status: EntitlementStatus | None  # None for a bookmark


def encode_cursor(seq: int, leaf_hash: bytes = b"") -> str:
    """The cursor of position `seq`, with the leaf hash of event `seq` (none for position 0)."""
    text = f"{_CURSOR_TAG}{seq}" + (f".{leaf_hash[:_BOUND_BYTES].hex()}" if leaf_hash else "")
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(sequence number, the hex of its event's leaf hash carried, "" when none)."""
    bad = InvalidArgument.single("cursor", "is not a cursor returned by WatchEntitlementChanges")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    digits, dot, bound = text[len(_CURSOR_TAG):].partition(".")
    # 1 to 19 ASCII digits (a sequence number): str.isdigit() takes '²', which int() then refuses,
    # and int() refuses more than 4,300 digits. Then, if any, the hash's 16 lowercase hex digits.
    if not text.startswith(_CURSOR_TAG) or not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
        raise bad
    if dot and (len(bound) != 2 * _BOUND_BYTES or bound.strip("0123456789abcdef")):
        raise bad
    return int(digits), bound


def _leaves(s: Session, seqs: Iterable[int]) -> dict[int, bytes]:
    """seq -> leaf hash of that event (positions past 0)."""
    wanted = [seq for seq in seqs if seq > 0]
    if not wanted:
        return {}
    found = logtree.fetch(s, [(0, seq - 1) for seq in wanted])
    return {seq: found[(0, seq - 1)] for seq in wanted}


def start_position(ctx: Context, cursor: str) -> tuple[int, Change | None]:
    """The sequence number to stream after (the cursor's, or the log's head for "from now"), and
    for "from now" the bookmark to open with."""
    seq, bound = decode_cursor(cursor) if cursor else (None, "")
    with ctx.db.read() as s:
        head = int(s.execute(select(LogHead.size).where(LogHead.id == 1)).scalar_one())
        if seq is None:
            return head, Change(head, encode_cursor(head, _leaves(s, [head]).get(head, b"")), "", None, None)
        if seq > head:
            raise _foreign("is ahead of the event log")
        if bound and (seq == 0 or _leaves(s, [seq])[seq][:_BOUND_BYTES].hex() != bound):
            raise _foreign("is not a position of this service's event log")
    return seq, None


def _foreign(what: str) -> InvalidArgument:
    return InvalidArgument.single("cursor", f"{what} (another deployment's cursor, or one from before a restore "
                                            "of its database): check the accounts with VerifyEntitlement, then "
                                            "watch from now (empty cursor)")


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
        found: list[tuple[Event, EntitlementStatus]] = []
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
            status = EntitlementStatus(account_id=a.account_id, active=state == "active" and end >= today,
                                       activation_id=a.id, program_id=a.program_id, state=state, end_date=end,
                                       tier=granted_tier(ctx, a.program_id, a.program_version, a.id))
            found.append((e, status))
        leaves = _leaves(s, [e.seq for e, _ in found])
        out = [Change(e.seq, encode_cursor(e.seq, leaves[e.seq]), CHANGE_TYPES[e.type], utc(e.time), status)
               for e, status in found]
        return out, events[-1].seq, len(events) == limit
