"""Where a person's facts come from, for eligibility checks and activations alike.

With a live status source configured, its answer is used (source "live"); when it fails, its
circuit breaker is open, or it does not know a person the snapshot knows (`lookup`), the latest
registry snapshot is used instead and the decision says so (source "snapshot_fallback": the data
may be stale). Without one, the snapshot (source "snapshot").
The live source gets a share of the call's time left (its gRPC deadline, entitlement/deadline.py),
so that a fallback still comes before the caller gives up.

Two steps, so that the network call is never made inside a database transaction (a write
transaction on SQLite holds the database's write lock): `ask_live` before the transaction,
`lookup` inside it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import structlog
from sqlalchemy import Connection

from entitlement import deadline, registry
from entitlement.app import Context
from entitlement.live_status import LiveStatusUnavailable
from entitlement.registry import SnapshotRef
from entitlement.storage import direct
from entitlement.storage.hotread import HotReads
from entitlement.rules import PersonFacts

LIVE, SNAPSHOT, SNAPSHOT_FALLBACK = "live", "snapshot", "snapshot_fallback"

log = structlog.get_logger("entitlement.facts")


@dataclass(frozen=True)
class LiveAnswer:
    """The live source's answer (source "live"), or why there is none."""

    source: str
    facts: PersonFacts | None = None


_NO_LIVE_SOURCE = LiveAnswer(SNAPSHOT)  # (immutable: one for every check of a server without a live source)

# Of the call's time left, the live source gets LIVE_SHARE less AFTER_LIVE_S: the rest is for what
# follows (the snapshot read, an activation's write, which is not started with less than
# deadline.FLOOR_S left, the answer's way back). Below MIN_LIVE_S it is not asked at all.
LIVE_SHARE = 0.8
AFTER_LIVE_S = deadline.FLOOR_S + 0.05
MIN_LIVE_S = 0.05


def live_budget(left: float | None) -> float | None:
    """The time the live source may take in a call with `left` seconds left (None: no deadline,
    the source's own bounds only); 0 when too little is left to ask it."""
    if left is None:
        return None
    budget = left * LIVE_SHARE - AFTER_LIVE_S
    return budget if budget >= MIN_LIVE_S else 0.0


def ask_live(ctx: Context, agency_id: str, birth_date: dt.date) -> LiveAnswer:
    """Ask the live source, if any, within the call's deadline (`live_budget`). Call it outside any
    database transaction."""
    if ctx.live is None:
        return _NO_LIVE_SOURCE
    try:
        return LiveAnswer(LIVE, ctx.live.fetch(agency_id, birth_date, budget_s=live_budget(deadline.remaining())))
    except LiveStatusUnavailable as exc:
        # No person data here: the reason code and HTTP status only.
        log.warning("live_status_unavailable", reason=exc.reason, status=exc.status,
                    fallback="registry snapshot")
        return LiveAnswer(SNAPSHOT_FALLBACK)


def lookup(conn: Connection | HotReads | direct.Statements, person_key: bytes, birth_date: dt.date,
           live: LiveAnswer) -> tuple[PersonFacts | None, SnapshotRef | None, str]:
    """(facts, snapshot, source): the live answer when there is one (no snapshot then: the facts
    were not read from one), else the current snapshot's.

    A live "not found" (404) about a person the snapshot knows on that birth date is not taken as
    "not registered": the agency's two sources then disagree on whether the person exists at all,
    which its API does not do for a real registration (it answers with the end date), and a wrong
    base path or a gateway answering 404 for everything would refuse every registered person. The
    snapshot decides (source `snapshot_fallback`), and the log says so (reason `not_found`)."""
    if live.source == LIVE:
        if live.facts is not None:
            return live.facts, None, LIVE
        facts, snapshot = registry.lookup(conn, person_key, birth_date)
        if facts is None:
            return None, None, LIVE
        log.warning("live_status_unavailable", reason="not_found", status=404, fallback="registry snapshot")
        return facts, snapshot, SNAPSHOT_FALLBACK
    facts, snapshot = registry.lookup(conn, person_key, birth_date)
    return facts, snapshot, live.source


def data_date(snapshot: SnapshotRef | None, source: str, today: dt.date) -> dt.date | None:
    """The date the facts are as of, for the `registry_data_fresh` criterion: today for a live
    answer, else the snapshot's extraction date (None when nothing was ever imported)."""
    if source == LIVE:
        return today
    return snapshot.extracted_on if snapshot else None
