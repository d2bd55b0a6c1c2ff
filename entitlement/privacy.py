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
trail keeps its pseudonyms. Each purge that deletes something appends a `privacy.purged` event
with the counts.

Purges take turns: the README has the purge run daily on every server machine, so several may
start at once on one PostgreSQL database. Each takes a transaction-scoped advisory lock first
(SQLite: BEGIN IMMEDIATE serializes writers already), so the next one counts only what the one
before left: it finds nothing, and logs nothing. (Without it, each counted the same rows before
the other deleted them, and each logged a `privacy.purged` event with the same counts.)
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass

from sqlalchemy import and_, delete, false, func, or_, select, update

from entitlement import eventlog, ledger
from entitlement.storage.db import Database, advisory_key, hold_until_commit
from entitlement.storage.models import (Activation, IdempotencyRecord, LedgerEntry, RegistryPerson,
                                        RegistrySnapshot)

BATCH = 500
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


def purge(db: Database, *, now: dt.datetime, retention_days: int, actor: str, dry_run: bool = False) -> PurgeSummary:
    if retention_days < 1:
        raise ValueError("ENTITLEMENT_RETENTION_DAYS must be at least 1")
    cutoff = now - dt.timedelta(days=retention_days)
    cutoff_day = cutoff.date()
    with db.write() as s:
        hold_until_commit(s, _PURGE_LOCK_KEY)  # before anything is counted: the purge before this one has committed
        current = s.execute(select(func.max(RegistrySnapshot.id)).where(RegistrySnapshot.status == "complete")
                            ).scalar_one_or_none()
        # Of the complete snapshots, only those older than the one in force (newest by id is newest
        # by extraction date, registry.py). Not "all but that one": on PostgreSQL (READ COMMITTED)
        # an import switching to a newer snapshot after the statement above commits before the next
        # one, which then saw the new snapshot, complete, as an old one, and deleted its rows.
        complete_before = (and_(RegistrySnapshot.status == "complete", RegistrySnapshot.id < current)
                           if current is not None else false())
        old = select(RegistrySnapshot.id).where(RegistrySnapshot.extracted_on < cutoff_day, or_(
            RegistrySnapshot.status.in_(("superseded", "failed")), complete_before))
        old_ids = list(s.execute(old).scalars())
        counts = dict(s.execute(select(RegistryPerson.snapshot_id, func.count()).where(
            RegistryPerson.snapshot_id.in_(old_ids)).group_by(RegistryPerson.snapshot_id)).all()) if old_ids else {}
        snapshots, rows = len(counts), int(sum(counts.values()))

        ended = and_(Activation.account_id.is_not(None) | Activation.decision_json.not_like('%"purged": true%'),
                     or_(and_(Activation.state == "expired", Activation.end_date < cutoff_day),
                         and_(Activation.state == "revoked", Activation.updated_at < cutoff)))
        # Per ended activation, in the query: does its ledger still hold reserved money? (A
        # correlated sum over its few entries, found by the ledger's index on the activation.)
        reserved = select(ledger.RESERVED_CENTS).where(LedgerEntry.activation_id == Activation.id).scalar_subquery()
        holds_money = func.coalesce(reserved, 0) > 0
        activation_ids: list[str] = []
        kept = 0
        for activation_id, held in s.execute(select(Activation.id, holds_money).where(ended)):
            if held:
                kept += 1
            else:
                activation_ids.append(activation_id)
        idem = int(s.execute(select(func.count()).select_from(IdempotencyRecord)
                             .where(IdempotencyRecord.created_at < cutoff)).scalar_one())
        summary = PurgeSummary(cutoff.isoformat(), snapshots, rows, len(activation_ids), idem, kept)
        if dry_run or not summary.anything:
            return summary
        if counts:
            ids = list(counts)
            s.execute(delete(RegistryPerson).where(RegistryPerson.snapshot_id.in_(ids)))
            s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id.in_(ids),
                                                     RegistrySnapshot.status == "complete").values(status="superseded"))
        for i in range(0, len(activation_ids), BATCH):
            for a in s.execute(select(Activation).where(Activation.id.in_(activation_ids[i:i + BATCH]))).scalars():
                a.account_id = None
                a.decision_json = _scrub_decision(a.decision_json)
            s.flush()
        if idem:
            s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < cutoff))
        eventlog.append(s, time=now, type="privacy.purged", actor=actor, subject="privacy/retention",
                        payload={"retention_days": retention_days, **asdict(summary)})
    return summary
