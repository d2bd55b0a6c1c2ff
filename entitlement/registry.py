"""The job-seeker registry: the agency's periodic extracts, imported as snapshots, and the lookup
the rules use.

Extract format (CSV, UTF-8, comma-separated, header row; documented in README "Registry extracts"):
  identifiant, dateNaissance, codePostal, dateInscription, dateCessationInscription,
  codeCategorieInscription
named after the agency's status API. Other columns (nom, prenom, civilite, ...) are allowed and
ignored: they are never read into memory beyond the csv module's row, never stored.

Each import is a snapshot (id, checksum, extraction date, counts). Rows are loaded under the new
snapshot id while lookups keep using the previous one; the switch is the single UPDATE that marks
the new snapshot complete. A failed or interrupted import leaves the previous snapshot in force.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.orm import Session

from entitlement import eventlog
from entitlement.clock import Clock
from entitlement.pseudonym import Pseudonymizer
from entitlement.rules import PersonFacts
from entitlement.storage.db import Database
from entitlement.storage.models import RegistryPerson, RegistrySnapshot

REQUIRED_COLUMNS = ("identifiant", "dateNaissance", "codePostal", "dateInscription",
                    "dateCessationInscription", "codeCategorieInscription")
AGENCY_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
POSTAL_RE = re.compile(r"^\d{5}$")
BATCH = 5000


class ExtractError(ValueError):
    """The file as a whole cannot be imported (no header, wrong columns, not UTF-8, empty)."""


@dataclass(frozen=True)
class SnapshotRef:
    id: int
    extracted_on: dt.date

    @property
    def name(self) -> str:
        return f"registrySnapshots/{self.id}"


@dataclass(frozen=True)
class ImportSummary:
    snapshot_id: int
    sha256: str
    rows_read: int
    rows_imported: int
    rows_rejected: int
    unchanged: bool  # the same file was already the current snapshot: nothing was changed


def _parse_row(row: dict[str, str]) -> tuple[str, dt.date, str, dt.date, dt.date | None, int]:
    agency_id = (row.get("identifiant") or "").strip()
    if not AGENCY_ID_RE.fullmatch(agency_id):
        raise ValueError("identifiant: 1 to 32 letters or digits")

    def date_field(name: str, optional: bool = False) -> dt.date | None:
        raw = (row.get(name) or "").strip()
        if not raw and optional:
            return None
        try:
            return dt.date.fromisoformat(raw)
        except ValueError:
            raise ValueError(f"{name}: expected a date YYYY-MM-DD, got {raw[:20]!r}") from None

    birth = date_field("dateNaissance")
    postal = (row.get("codePostal") or "").strip()
    if not POSTAL_RE.fullmatch(postal):
        raise ValueError("codePostal: expected 5 digits")
    registered = date_field("dateInscription")
    ended = date_field("dateCessationInscription", optional=True)
    raw_cat = (row.get("codeCategorieInscription") or "").strip()
    if raw_cat not in {"1", "2", "3", "4", "5", "6", "7", "8"}:
        raise ValueError("codeCategorieInscription: expected 1 to 8")
    assert birth is not None and registered is not None
    if ended is not None and ended < registered:
        raise ValueError("dateCessationInscription: before dateInscription")
    return agency_id, birth, postal, registered, ended, int(raw_cat)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def current_snapshot(session: Session) -> SnapshotRef | None:
    row = session.execute(
        select(RegistrySnapshot.id, RegistrySnapshot.extracted_on)
        .where(RegistrySnapshot.status == "complete").order_by(RegistrySnapshot.id.desc()).limit(1)
    ).first()
    return SnapshotRef(row.id, row.extracted_on) if row else None


def import_extract(db: Database, pseudo: Pseudonymizer, clock: Clock, path: Path, *,
                   extracted_on: dt.date, actor: str = "system", rejects_path: Path | None = None,
                   progress: Callable[[int], None] | None = None) -> ImportSummary:
    """Import one full extract as a new snapshot and switch to it atomically."""
    digest = _sha256(path)
    with db.read() as s:
        current = s.execute(
            select(RegistrySnapshot).where(RegistrySnapshot.status == "complete")
            .order_by(RegistrySnapshot.id.desc()).limit(1)).scalar_one_or_none()
    if current is not None and current.sha256 == digest:
        return ImportSummary(current.id, digest, current.rows_read, current.rows_imported,
                             current.rows_rejected, unchanged=True)
    with db.write() as s:
        snap = RegistrySnapshot(source_name=path.name[:255], sha256=digest, extracted_on=extracted_on,
                                status="importing", started_at=clock.now(), rows_read=0,
                                rows_imported=0, rows_rejected=0)
        s.add(snap)
        s.flush()
        snapshot_id = snap.id
    read = imported = rejected = 0
    seen: set[bytes] = set()
    rejects: IO[str] | None = None
    try:
        rejects = rejects_path.open("w", encoding="utf-8", newline="") if rejects_path else None
        rej_writer = csv.writer(rejects) if rejects else None
        if rej_writer:
            rej_writer.writerow(["line", "reason"])
        batch: list[dict[str, object]] = []
        for line_no, row in _rows(path):
            read += 1
            try:
                agency_id, birth, postal, registered, ended, category = _parse_row(row)
                key = pseudo.person_key(agency_id)
                if key in seen:
                    raise ValueError("identifiant: duplicate of an earlier row")
                seen.add(key)
            except ValueError as exc:
                rejected += 1
                if rej_writer:
                    rej_writer.writerow([line_no, str(exc)])
                continue
            batch.append({"snapshot_id": snapshot_id, "person_key": key, "birth_date": birth,
                          "postal_code": postal, "registered_on": registered,
                          "registration_ended_on": ended, "category": category})
            if len(batch) >= BATCH:
                imported += _flush(db, batch)
                if progress:
                    progress(read)
        imported += _flush(db, batch)
        with db.write() as s:
            s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id == snapshot_id).values(
                status="complete", completed_at=clock.now(), rows_read=read, rows_imported=imported,
                rows_rejected=rejected))
            eventlog.append(s, time=clock.now(), type="registry.snapshot_switched", actor=actor,
                            subject=f"registrySnapshots/{snapshot_id}", payload={
                                "sha256": digest, "extracted_on": extracted_on.isoformat(),
                                "rows_read": read, "rows_imported": imported, "rows_rejected": rejected})
    except BaseException:
        with db.write() as s:
            s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id == snapshot_id)
                      .values(status="failed", rows_read=read))
        raise
    finally:
        if rejects:
            rejects.close()
    return ImportSummary(snapshot_id, digest, read, imported, rejected, unchanged=False)


def _flush(db: Database, batch: list[dict[str, object]]) -> int:
    if not batch:
        return 0
    n = len(batch)
    with db.write() as s:
        s.execute(insert(RegistryPerson), batch)
    batch.clear()
    return n


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; raises ExtractError for problems of the whole file."""
    try:
        fh = path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise ExtractError(f"{path}: cannot open ({exc.strerror})") from None
    with fh:
        try:
            reader = csv.DictReader(fh)
            header = reader.fieldnames
        except UnicodeDecodeError:
            raise ExtractError(f"{path}: not UTF-8 text") from None
        if not header:
            raise ExtractError(f"{path}: empty file (no header row)")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ExtractError(f"{path}: header lacks column(s) {', '.join(missing)}")
        try:
            for row in reader:
                yield reader.line_num, row
        except UnicodeDecodeError:
            raise ExtractError(f"{path}: not UTF-8 text (after line {reader.line_num})") from None


def lookup(session: Session, person_key: bytes, birth_date: dt.date) -> tuple[PersonFacts | None, SnapshotRef | None]:
    """The person's facts in the current snapshot, in one round trip. A wrong birth date answers
    exactly like an unknown identifier."""
    latest = (select(func.max(RegistrySnapshot.id)).where(RegistrySnapshot.status == "complete")
              .scalar_subquery())
    row = session.execute(
        select(RegistrySnapshot.id, RegistrySnapshot.extracted_on, RegistryPerson.birth_date,
               RegistryPerson.postal_code, RegistryPerson.registered_on,
               RegistryPerson.registration_ended_on, RegistryPerson.category)
        .select_from(RegistrySnapshot)
        .outerjoin(RegistryPerson, and_(RegistryPerson.snapshot_id == RegistrySnapshot.id,
                                        RegistryPerson.person_key == person_key))
        .where(RegistrySnapshot.id == latest)
    ).first()
    if row is None:
        return None, None
    snap = SnapshotRef(row.id, row.extracted_on)
    if row.birth_date is None or row.birth_date != birth_date:
        return None, snap
    return PersonFacts(row.birth_date, row.postal_code, row.registered_on, row.registration_ended_on,
                       row.category), snap

