"""Retention of personal data: `entitlement privacy purge` deletes what is older than
ENTITLEMENT_RETENTION_DAYS (default 1095, three years). Run it daily, like the jobs.

What is personal here, and what the purge does with it (cutoff = now - retention):
- registry rows (`registry_people`: keyed HMAC of the agency id, birth date, postal code,
  registration dates and category) of every snapshot older than the one in force whose extraction
  date is before the cutoff: deleted; the snapshot's record (checksum, date, counts) stays, since
  decisions cite it. The snapshot in force is never purged, however old, nor one an import
  switches to while the purge runs;
- activations that ended before the cutoff (expired with an end date before it, revoked before
  it): the platform account id they were bound to is cleared and the free-text details of their
  stored eligibility decision (department, dates) are blanked (criteria, reason codes, parameters
  and money stay: funders' reports still add up). Except those whose ledger still holds reserved
  money (`ledger.RESERVED_CENTS`): months of a `use` program whose usage report may still come
  (ReportUsage finds the activation by its account id; unbound, a month really used would never be
  billed). They are left as they are and counted (`activations_kept`) until the money is settled:
  the month reported used (consumed), or released by the settlement job once its report window
  closed (entitlement/jobs.py); a purge after that scrubs them. Only a short retention meets them:
  the default is years past any report window;
- idempotency records (stored responses of mutations, an activation token included) created
  before the cutoff: deleted (retries come within minutes, not years).

What stays: the event log and the ledger (append-only; they carry pseudonyms only: `job_seeker_ref`
and ids of staff, never an identifier, a birth date or a postal code), and the activations' keyed
pseudonym (`person_key`), which is what the event log's `job_seeker_ref` is made from: the audit
trail keeps its pseudonyms. A purge works in slices, bounded transactions (`purge`), and each
slice that deletes or scrubs something appends a `privacy.purged` event with the counts of what
it did (one event, when a purge fits in one slice, as a daily one does).

Purges take turns: the README has the purge run daily on every server machine, so several may
start at once on one PostgreSQL database. Each slice takes a transaction-scoped advisory lock first
(SQLite: BEGIN IMMEDIATE serializes writers already), and counts only what it deletes, after the
slices before it committed: a purge that comes after another finds nothing, and logs nothing; two
whose slices alternate each log what they did. (Without it, each counted the same rows before
the other deleted them, and each logged a `privacy.purged` event with the same counts.)
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Select, and_, delete, false, func, literal, or_, select, tuple_, update
from sqlalchemy.orm import Session

from entitlement import eventlog, ledger
from entitlement.storage.db import (DELETE_SNAPSHOT_ROWS_SLICE, SQLITE_TURN_PAUSE_S, Database, advisory_key,
                                    hold_until_commit)
from entitlement.storage.models import (Activation, IdempotencyRecord, LedgerEntry, RegistryPerson,
                                        RegistrySnapshot)

BATCH = 500
# A purge's slices (`purge`): at most so many of each per transaction, and on SQLite a pause between two.
ROWS_SLICE = 200_000
ACTIVATIONS_SLICE = 1_000
RECORDS_SLICE = 10_000
PURGE_PAUSE_S = SQLITE_TURN_PAUSE_S
# One purge at a time on a PostgreSQL database (module docstring).
_PURGE_LOCK_KEY = advisory_key("entitlement.privacy_purge")


@dataclass(frozen=True)
class PurgeSummary:
    cutoff: str
    registry_snapshots: int  # snapshots whose rows were deleted
    registry_rows: int
    activations_scrubbed: int
    idempotency_records: int
    activations_kept: int  # ended before the cutoff, left as they are: money still reserved (docstring)

    @property
    def anything(self) -> bool:
        return bool(self.registry_rows or self.activations_scrubbed or self.idempotency_records
                    or self.registry_snapshots)


def _scrub_decision(raw: str) -> str:
    stored = json.loads(raw)
    decision = stored.get("decision") or {}
    decision["criteria"] = [[c[0], c[1], c[2], ""] for c in decision.get("criteria", [])]
    stored["decision"] = decision
    stored["purged"] = True
    return json.dumps(stored, sort_keys=True)


def _old_snapshots(s: Session, cutoff_day: dt.date) -> Select[Any]:
    """The snapshots whose rows the purge deletes: extracted before the cutoff, superseded or failed,
    or complete and older than the one in force (read in this statement's transaction)."""
    current = s.execute(select(func.max(RegistrySnapshot.id)).where(RegistrySnapshot.status == "complete")
                        ).scalar_one_or_none()
    # Of the complete snapshots, only those older than the one in force (newest by id is newest
    # by extraction date, registry.py). Not "all but that one": on PostgreSQL (READ COMMITTED)
    # an import switching to a newer snapshot after the statement above commits before the next
    # one, which then saw the new snapshot, complete, as an old one, and deleted its rows.
    complete_before = (and_(RegistrySnapshot.status == "complete", RegistrySnapshot.id < current)
                       if current is not None else false())
    return select(RegistrySnapshot.id).where(RegistrySnapshot.extracted_on < cutoff_day, or_(
        RegistrySnapshot.status.in_(("superseded", "failed")), complete_before)).order_by(RegistrySnapshot.id)


def _ended(cutoff: dt.datetime) -> Any:
    """Activations ended before the cutoff and not yet scrubbed."""
    cutoff_day = cutoff.date()
    return and_(Activation.account_id.is_not(None) | Activation.decision_json.not_like('%"purged": true%'),
                or_(and_(Activation.state == "expired", Activation.end_date < cutoff_day),
                    and_(Activation.state == "revoked", Activation.updated_at < cutoff)))


# Per ended activation, in the query: does its ledger still hold reserved money? (A correlated sum
# over its few entries, found by the ledger's index on the activation.)
_HOLDS_MONEY = func.coalesce(select(ledger.RESERVED_CENTS).where(LedgerEntry.activation_id == Activation.id)
                             .scalar_subquery(), 0) > 0


def _count(db: Database, cutoff: dt.datetime) -> PurgeSummary:
    """What a purge would do now (a dry run), read in one read transaction."""
    with db.read() as s:
        old_ids = list(s.execute(_old_snapshots(s, cutoff.date())).scalars())
        counts = dict(s.execute(select(RegistryPerson.snapshot_id, func.count()).where(
            RegistryPerson.snapshot_id.in_(old_ids)).group_by(RegistryPerson.snapshot_id)).all()) if old_ids else {}
        held = dict(s.execute(select(_HOLDS_MONEY, func.count()).where(_ended(cutoff)).group_by(_HOLDS_MONEY)).all())
        idem = int(s.execute(select(func.count()).select_from(IdempotencyRecord)
                             .where(IdempotencyRecord.created_at < cutoff)).scalar_one())
    return PurgeSummary(cutoff.isoformat(), len(counts), int(sum(counts.values())), int(held.get(False, 0)),
                        idem, int(held.get(True, 0)))


@dataclass
class _Progress:
    """Where the purge's slices got to (keyset: each slice goes on after the last key the previous
    one found), and what they did."""

    activations_after: str = ""
    records_after: tuple[str, str] = ("", "")
    activations_done: bool = False
    records_done: bool = False
    snapshots: set[int] = field(default_factory=set)  # whose rows some slice deleted
    rows: int = 0
    scrubbed: int = 0
    records: int = 0
    kept: int = 0


_RECORD_KEY = tuple_(IdempotencyRecord.caller_id, IdempotencyRecord.request_id)


def _candidates(db: Database, progress: _Progress, cutoff: dt.datetime) -> tuple[list[str], list[tuple[str, str]]]:
    """The next slice's ended activations and old idempotency records, found in a read transaction
    (a search through every activation or record for a few: the write lock is not held for it)."""
    activations: list[str] = []
    records: list[tuple[str, str]] = []
    with db.read() as s:
        if not progress.activations_done:
            activations = list(s.execute(select(Activation.id).where(
                _ended(cutoff), Activation.id > progress.activations_after)
                .order_by(Activation.id).limit(ACTIVATIONS_SLICE)).scalars())
            progress.activations_done = len(activations) < ACTIVATIONS_SLICE
            if activations:
                progress.activations_after = activations[-1]
        if not progress.records_done:
            after = tuple_(literal(progress.records_after[0]), literal(progress.records_after[1]))
            records = [(c, r) for c, r in s.execute(
                select(IdempotencyRecord.caller_id, IdempotencyRecord.request_id).where(
                    IdempotencyRecord.created_at < cutoff, _RECORD_KEY > after)
                .order_by(IdempotencyRecord.caller_id, IdempotencyRecord.request_id).limit(RECORDS_SLICE))]
            progress.records_done = len(records) < RECORDS_SLICE
            if records:
                progress.records_after = records[-1]
    return activations, records


def _slice(s: Session, progress: _Progress, activations: list[str], records: list[tuple[str, str]],
           cutoff: dt.datetime, now: dt.datetime, retention_days: int, actor: str) -> bool:
    """One transaction's share of a purge (the `purge` docstring): one slice of an old snapshot's
    rows, and the candidates given, checked again here. Whether it deleted registry rows (there
    may be more)."""
    hold_until_commit(s, _PURGE_LOCK_KEY)  # before anything is read: the purge before this one has committed
    rows, emptied = 0, False
    old = _old_snapshots(s, cutoff.date()).where(
        select(RegistryPerson.snapshot_id).where(RegistryPerson.snapshot_id == RegistrySnapshot.id).exists())
    snapshot = s.execute(old.limit(1)).scalar_one_or_none()
    if snapshot is not None:
        rows = s.execute(DELETE_SNAPSHOT_ROWS_SLICE, {"sid": snapshot, "n": ROWS_SLICE}).rowcount  # type: ignore[attr-defined]
        emptied = not s.execute(select(RegistryPerson.snapshot_id).where(
            RegistryPerson.snapshot_id == snapshot).exists().select()).scalar_one()
        if emptied:
            # Its last rows: its record says it has none (a complete one older than the one in force).
            s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id == snapshot,
                                                     RegistrySnapshot.status == "complete").values(status="superseded"))
    scrub: list[str] = []
    kept = 0
    if activations:
        for activation_id, held in s.execute(select(Activation.id, _HOLDS_MONEY).where(
                Activation.id.in_(activations), _ended(cutoff))):
            if held:
                kept += 1
            else:
                scrub.append(activation_id)
        for i in range(0, len(scrub), BATCH):
            for a in s.execute(select(Activation).where(Activation.id.in_(scrub[i:i + BATCH]))).scalars():
                a.account_id = None
                a.decision_json = _scrub_decision(a.decision_json)
            s.flush()
    deleted = 0
    # By caller, an IN list of request ids: a search of the primary key each on both backends (a list
    # of (caller, request) pairs was, on PostgreSQL, one comparison per pair and row: 15 s a slice).
    requests: dict[str, list[str]] = {}
    for caller_id, request_id in records:
        requests.setdefault(caller_id, []).append(request_id)
    for caller_id, ids in sorted(requests.items()):
        for i in range(0, len(ids), BATCH):
            deleted += s.execute(delete(IdempotencyRecord).where(  # type: ignore[attr-defined]
                IdempotencyRecord.caller_id == caller_id, IdempotencyRecord.request_id.in_(ids[i:i + BATCH]),
                IdempotencyRecord.created_at < cutoff)).rowcount
    if snapshot is not None and emptied:
        progress.snapshots.add(snapshot)
    progress.rows += rows
    progress.scrubbed += len(scrub)
    progress.records += deleted
    progress.kept += kept
    # (A snapshot counts once, in the slice that deletes its last rows: the events' counts add up.)
    done = PurgeSummary(cutoff.isoformat(), 1 if emptied else 0, rows, len(scrub), deleted, kept)
    if done.anything:
        eventlog.append(s, time=now, type="privacy.purged", actor=actor, subject="privacy/retention",
                        payload={"retention_days": retention_days, **asdict(done)})
    return snapshot is not None


def purge(db: Database, *, now: dt.datetime, retention_days: int, actor: str, dry_run: bool = False) -> PurgeSummary:
    """Delete what is past the retention (the module docstring), in slices: each transaction
    deletes at most ROWS_SLICE registry rows (of one snapshot), scrubs at most ACTIVATIONS_SLICE
    ended activations and deletes at most RECORDS_SLICE idempotency records (found beforehand in
    a read transaction, checked again in it), and appends a `privacy.purged` event with the counts
    of what it did, if anything: every deletion is logged by the transaction that made it, a purge
    killed midway has logged all it did, and the next one goes on. On SQLite the slices are
    PURGE_PAUSE_S apart. One transaction did it all, and held the write lock throughout: measured
    on SQLite, 200,000 activations (bench.activations' fill): 2.9 s to scrub 10,929 ended
    activations and delete 184,710 idempotency records; 1.3 s for a snapshot of 1,000,000 rows;
    0.48 s with nothing to delete (it searched every activation and record in the write
    transaction). The server's writes waited as long, or failed UNAVAILABLE past their 5 s lock
    timeout. After: slices of at most 0.34 s (the same work in 19 transactions, 7.8 s in all with
    the pauses). On PostgreSQL the one transaction (4.0 s) held every activation it scrubbed locked
    until it ended: a writer of one waited 0.54 s (after: 93 ms). The summary adds up the slices;
    a dry run counts in a read transaction."""
    if retention_days < 1:
        raise ValueError("ENTITLEMENT_RETENTION_DAYS must be at least 1")
    cutoff = now - dt.timedelta(days=retention_days)
    if dry_run:
        return _count(db, cutoff)
    progress = _Progress()
    while True:
        activations, records = _candidates(db, progress, cutoff)
        with db.write() as s:
            more = _slice(s, progress, activations, records, cutoff, now, retention_days, actor)
        if not more and progress.activations_done and progress.records_done:
            break
        if db.is_sqlite:
            time.sleep(PURGE_PAUSE_S)
    return PurgeSummary(cutoff.isoformat(), len(progress.snapshots), progress.rows, progress.scrubbed,
                        progress.records, progress.kept)
