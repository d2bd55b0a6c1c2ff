"""The job-seeker registry: the agency's periodic extracts, imported as snapshots, and the lookup
the rules use.

Extract format (CSV, UTF-8, comma-separated, header row; documented in README "Registry extracts"):
  identifiant, dateNaissance, codePostal, dateInscription, dateCessationInscription,
  codeCategorieInscription
named after the agency's status API. Other columns (nom, prenom, civilite, ...) are allowed and
ignored: they are never kept beyond the csv module's row, never stored.

Each import is a snapshot (id, checksum, extraction date, counts). Rows are loaded under the new
snapshot id while lookups keep using the previous one; the switch is the single UPDATE that marks
the new snapshot complete. A failed or interrupted import (kill -9 included) leaves the previous
snapshot in force; its rows are discarded by the next import. An extract dated after today or
before the snapshot in force is refused (`check_extraction_date`), so the newest snapshot by id is
also the newest by extraction date.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import io
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple, IO, Any

import psycopg
import structlog
from psycopg.errors import UniqueViolation
from sqlalchemy import Connection, Select, and_, bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from entitlement import deadline, eventlog
from entitlement.clock import Clock
from entitlement.pseudonym import Pseudonymizer
from entitlement.rules import PersonFacts
from entitlement.storage.db import (DELETE_SNAPSHOT_ROWS_SLICE, SQLITE_TURN_PAUSE_S, Database, advisory_key,
                                    hold_until_commit, long_work)
from entitlement.storage import direct
from entitlement.storage.hotread import HotReads
from entitlement.storage.models import Activation, RegistryPerson, RegistrySnapshot

_log = structlog.get_logger("entitlement.registry")

REQUIRED_COLUMNS = ("identifiant", "dateNaissance", "codePostal", "dateInscription",
                    "dateCessationInscription", "codeCategorieInscription")
AGENCY_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
POSTAL_RE = re.compile(r"^[0-9]{5}$")  # ASCII digits: \d takes any script's
CATEGORIES = {str(i): i for i in range(1, 9)}
BATCH = 20_000
COPY_NULL = "\\N"

# A validated row: (person_key, birth, postal code, registered, ended or None, category); dates as ISO text.
Row = tuple[bytes, str, str, str, "str | None", int]


class ExtractError(ValueError):
    """The file as a whole cannot be imported (no header, wrong columns, not UTF-8, empty, cut off)."""


class ExtractDatedInFuture(ExtractError):
    """The extraction date is after today (in the service's time zone): a typo, never data. Taken,
    it would count as fresh data for ever, and every later extract would look older than it."""

    def __init__(self, extracted_on: dt.date, today: dt.date) -> None:
        super().__init__(f"extracted_on {extracted_on.isoformat()} is after today ({today.isoformat()}): "
                         "an extract cannot be dated in the future")
        self.extracted_on, self.today = extracted_on, today


class ExtractOlderThanCurrent(ExtractError):
    """The extraction date is before the current snapshot's: a late or re-sent older file, which
    would replace newer data. (The same date is accepted: a corrected re-send of that day's file.)"""

    def __init__(self, extracted_on: dt.date, current: "SnapshotRef") -> None:
        super().__init__(f"extracted_on {extracted_on.isoformat()} is before the current snapshot's "
                         f"({current.name}, extracted on {current.extracted_on.isoformat()}): an older "
                         "extract would replace newer data")
        self.extracted_on, self.current = extracted_on, current


class ExtractCutOff(ExtractError):
    """Far fewer valid rows than the snapshot in force (under `min_ratio` of its rows): a cut-off
    file would de-register the people it lacks. The message says how to accept it anyway in the
    caller's own terms (`accept_with`: a flag of the command line, a field of the request)."""

    def __init__(self, path: Path, imported: int, min_ratio: float, current_rows: int) -> None:
        super().__init__(f"{path}: {imported} valid rows, fewer than {min_ratio:.0%} of the current "
                         f"snapshot's {current_rows}: is the extract cut off?")

    def accept_with(self, how: str) -> str:
        return f"{self} ({how} accepts it)"


class ImportInProgress(ExtractError):
    """Another import of the registry is running, in this process or another (a server process, the
    command line): one at a time, since an import starts by discarding what earlier imports left."""

    def __init__(self) -> None:
        super().__init__("another registry import is running (in this or another process); retry later")


class SnapshotRef(NamedTuple):  # immutable; a named tuple: one per check
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
    unchanged: bool  # the same file, with the same extraction date, was already the current snapshot: nothing was changed


@dataclass(frozen=True)
class Progress:
    """What an import reports after each batch is stored."""

    rows_read: int
    rows_imported: int
    rows_rejected: int
    bytes_read: int
    bytes_total: int


class _Reject(ValueError):
    pass


# YYYY-MM-DD in ASCII digits, nothing else: Python 3.11's date.fromisoformat also takes an ISO week
# date (`2021-W01-1`, ten characters too), which PostgreSQL's COPY refuses (the whole import then
# fails) and SQLite would keep as text.
ISO_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _iso(raw: str, name: str) -> str:
    """The date as ISO text, after checking it is YYYY-MM-DD and a real calendar date. The reason
    of a rejected one never quotes it: a birth date written another way is still a birth date
    (the reasons go back to the agency in ImportExtract's answer and into the rejects file)."""
    text = raw.strip()
    if not ISO_DATE_RE.fullmatch(text):
        raise _Reject(f"{name}: expected a date YYYY-MM-DD")
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise _Reject(f"{name}: expected a date YYYY-MM-DD, not a day of the calendar") from None
    return text


class _Parser:
    """Validates one CSV row (a list, by header position) into a Row, with C-implemented calls
    only (regex, date.fromisoformat, one-shot HMAC): this is the import's hot loop."""

    def __init__(self, header: list[str], pseudo: Pseudonymizer) -> None:
        self.idx = [header.index(c) for c in REQUIRED_COLUMNS]
        self.width = len(header)
        self.key = pseudo.person_key
        self.legacy = pseudo.legacy_person_key
        # (key as an earlier version made it, key now) of each identifiant written with lower-case
        # letters (rare: the agency writes them upper-case): their activations are re-keyed at the switch.
        # Kept only while they have activations (the import filters them after each batch: _with_activations).
        self.rekey: list[tuple[bytes, bytes]] = []

    def __call__(self, row: list[str]) -> Row:
        if len(row) != self.width:
            raise _Reject(f"expected {self.width} fields, got {len(row)} (truncated or malformed row)")
        i_id, i_birth, i_postal, i_reg, i_end, i_cat = self.idx
        agency_id = row[i_id].strip()
        if not AGENCY_ID_RE.fullmatch(agency_id):
            raise _Reject("identifiant: 1 to 32 letters or digits")
        # (ASCII, as the pattern holds: person_key upper-cases it, so `1234567a` and `1234567A` are one
        # person here as in every check and activation, and a second row of either is a duplicate.)
        birth = _iso(row[i_birth], "dateNaissance")
        postal = row[i_postal].strip()
        if not POSTAL_RE.fullmatch(postal):
            raise _Reject("codePostal: expected 5 digits")
        registered = _iso(row[i_reg], "dateInscription")
        raw_end = row[i_end].strip()
        ended = _iso(raw_end, "dateCessationInscription") if raw_end else None
        if ended is not None and ended < registered:
            raise _Reject("dateCessationInscription: before dateInscription")
        category = CATEGORIES.get(row[i_cat].strip())
        if category is None:
            raise _Reject("codeCategorieInscription: expected 1 to 8")
        key = self.key(agency_id)
        if not agency_id.isupper() and not agency_id.isdigit():  # lower-case letters in it
            self.rekey.append((self.legacy(agency_id), key))
        return key, birth, postal, registered, ended, category


# The longest line an extract may have. A row is a few hundred bytes; the csv module reads a whole
# line, and makes a string of every field it holds, before a row can be judged: a file that is not
# one row per line (a JSON dump, line ends lost) would be held whole, with a list of its fields.
MAX_LINE_BYTES = 1 << 20


class _LineTooLong(Exception):
    """Raised through the text and csv layers by _CountingReader; the import names the line."""


class _CountingReader(io.RawIOBase):
    """Counts the bytes read, for the progress bar's percentage and ETA, and refuses a line longer
    than MAX_LINE_BYTES as soon as its bytes arrive (_LineTooLong), before any layer above holds it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.count = raw, 0
        self.line = 0  # bytes since the last line end (\n or \r)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = int(self.raw.readinto(buffer) or 0)  # type: ignore[attr-defined]
        self.count += n
        if n:
            data = bytes(memoryview(buffer)[:n])  # (a copy of one read, 1 MiB at most: cheap beside its parsing)
            end = max(data.rfind(b"\n"), data.rfind(b"\r"))
            self.line = self.line + n if end < 0 else n - 1 - end
            if self.line > MAX_LINE_BYTES:
                raise _LineTooLong()
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def current_snapshot(session: Session) -> SnapshotRef | None:
    """The snapshot in force: the newest complete one. (Newest by id is newest by extraction date:
    `import_extract` never switches to an extract dated before the current one.)"""
    row = session.execute(
        select(RegistrySnapshot.id, RegistrySnapshot.extracted_on)
        .where(RegistrySnapshot.status == "complete").order_by(RegistrySnapshot.id.desc()).limit(1)
    ).first()
    return SnapshotRef(row.id, row.extracted_on) if row else None


def check_extraction_date(extracted_on: dt.date, today: dt.date, current: SnapshotRef | None) -> None:
    """Raise ExtractDatedInFuture or ExtractOlderThanCurrent when an extract of `extracted_on` must
    not become the data in force, on `today` (the service's civil date), `current` being in force.
    A current snapshot itself dated after today (stamped so before this check existed) does not
    hold back an older extract: that is how its wrong date gets corrected."""
    if extracted_on > today:
        raise ExtractDatedInFuture(extracted_on, today)
    if current is not None and extracted_on < current.extracted_on <= today:
        raise ExtractOlderThanCurrent(extracted_on, current)


def check_new_extract(db: Database, clock: Clock, extracted_on: dt.date) -> None:
    """`check_extraction_date` against the snapshot in force now: lets a caller refuse an extract
    before receiving it (RegistryService.ImportExtract). `import_extract` checks again."""
    with db.read() as s:
        current = current_snapshot(s)
    check_extraction_date(extracted_on, clock.today(), current)


# The switch to a new snapshot, on PostgreSQL: serialized across processes by this transaction-scoped
# advisory lock, so that the date check and the switch see every earlier switch (SQLite: BEGIN
# IMMEDIATE serializes writers already). The key: the first 8 bytes of SHA-256("entitlement.registry_switch").
_SWITCH_LOCK_KEY = advisory_key("entitlement.registry_switch")


# One import at a time across every process on the database: an import starts by discarding the
# rows of imports left unfinished (`_discard_unfinished`), which, with another import still loading,
# deleted that one's rows, and it then switched to its snapshot with the gaps (people wrongly
# NOT_REGISTERED, live activations curtailed by the next revalidation). PostgreSQL: a session-level
# advisory lock on a connection of its own, for the whole import; SQLite: an exclusive flock on a
# file beside the database. Both end with the process that holds them, so an import killed
# mid-way leaves an `importing` snapshot the next one discards, as before.
_IMPORT_LOCK_KEY = advisory_key("entitlement.registry_import")


@contextmanager
def _import_lock(db: Database) -> Iterator[None]:
    if db.is_sqlite:
        database = db.engine.url.database
        if not database or database == ":memory:":
            yield  # one process, one connection: nothing else can import
            return
        with open(f"{database}.import-lock", "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ImportInProgress() from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    # A connection of its own, not one of the pool's (an import may take minutes).
    url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_IMPORT_LOCK_KEY,)).fetchone()
        if not row or not row[0]:
            raise ImportInProgress()
        try:
            yield
        finally:
            # Let go before the connection closes: the session's end lets it go too, but only once
            # its backend has exited, after the close has returned; an import right after (the
            # RPC's check_no_import_running then import_extract, or the next import of a script)
            # found it still held on a busy machine: ImportInProgress with no import running (a
            # CI run). (A broken connection's backend lets it go as it ends.)
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (_IMPORT_LOCK_KEY,))


def check_no_import_running(db: Database) -> None:
    """ImportInProgress when an import holds the lock now (another server process, the command
    line): lets a caller refuse an extract before receiving it (RegistryService.ImportExtract, whose
    file may weigh gigabytes). The lock is let go at once: `import_extract` takes it itself."""
    with _import_lock(db):
        pass


def import_extract(db: Database, pseudo: Pseudonymizer, clock: Clock, path: Path, *,
                   extracted_on: dt.date, actor: str = "system", rejects_path: Path | None = None,
                   progress: Callable[[int], None] | None = None,
                   on_progress: Callable[[Progress], None] | None = None,
                   min_ratio: float = 0.0, keep_snapshots: int = 2, source_name: str = "") -> ImportSummary:
    """Import one full extract as a new snapshot and switch to it atomically.

    Streams the file (constant memory), validates every row and writes each rejected one to
    `rejects_path` with its line number and reason: rows read = imported + rejected. Refuses to
    switch when nothing valid was read, or fewer rows than `min_ratio` x the current snapshot's
    (a cut-off extract must not de-register people). Refuses an extract dated after today (the
    clock's civil date, in the service's time zone) or before the current snapshot
    (`check_extraction_date`: ExtractDatedInFuture, ExtractOlderThanCurrent); the same bytes with
    the same date answer `unchanged`. Afterwards, complete snapshots beyond the
    newest `keep_snapshots` lose their rows (their metadata stays: decisions refer to it).
    `progress(rows_read)` and `on_progress(Progress)` are called after each stored batch.
    """
    today = clock.today()
    if extracted_on > today:  # before reading a byte
        raise ExtractDatedInFuture(extracted_on, today)
    digest = _sha256(path)
    with db.read() as s:
        current = s.execute(
            select(RegistrySnapshot).where(RegistrySnapshot.status == "complete")
            .order_by(RegistrySnapshot.id.desc()).limit(1)).scalar_one_or_none()
    check_extraction_date(extracted_on, today, SnapshotRef(current.id, current.extracted_on) if current else None)
    # Unchanged only when both the bytes and the date are the current snapshot's. The same bytes
    # extracted again on a later date are news: the data is confirmed as of that date (and with
    # another date at all, the date on record is corrected).
    if current is not None and current.sha256 == digest and extracted_on == current.extracted_on:
        return ImportSummary(current.id, digest, current.rows_read, current.rows_imported,
                             current.rows_rejected, unchanged=True)
    # Long writes (batches of BATCH rows, the prune): within a call (a pushed import) as well, they
    # never join a group of the calls' short writes (storage.db.long_work).
    with _import_lock(db), long_work():
        return _import_locked(db, pseudo, clock, path, extracted_on=extracted_on, actor=actor,
                              rejects_path=rejects_path, progress=progress, on_progress=on_progress,
                              min_ratio=min_ratio, keep_snapshots=keep_snapshots, source_name=source_name,
                              digest=digest, current=current, today=today)


def _import_locked(db: Database, pseudo: Pseudonymizer, clock: Clock, path: Path, *, extracted_on: dt.date,
                   actor: str, rejects_path: Path | None, progress: Callable[[int], None] | None,
                   on_progress: Callable[[Progress], None] | None, min_ratio: float, keep_snapshots: int,
                   source_name: str, digest: str, current: Any, today: dt.date) -> ImportSummary:
    """import_extract's work, with the import lock held (no other import runs anywhere)."""
    _discard_unfinished(db)
    with db.write() as s:
        snap = RegistrySnapshot(source_name=(source_name or path.name)[:255], sha256=digest, extracted_on=extracted_on,
                                status="importing", started_at=clock.now(), rows_read=0,
                                rows_imported=0, rows_rejected=0)
        s.add(snap)
        s.flush()
        snapshot_id = snap.id
    read = rejected = 0
    total = path.stat().st_size
    rejects: IO[str] | None = None
    lock = threading.Lock()
    try:
        rejects = rejects_path.open("w", encoding="utf-8", newline="") if rejects_path else None
        rej_writer = csv.writer(rejects) if rejects else None
        if rej_writer:
            rej_writer.writerow(["line", "reason"])

        def reject(line_no: int, reason: str) -> None:
            nonlocal rejected
            with lock:  # the parser (main thread) and the writer thread both reject
                rejected += 1
                if rej_writer:
                    rej_writer.writerow([line_no, reason])

        counter, reader, header = _open(path)
        with counter, _BulkWriter(db, snapshot_id, reject) as writer:
            def report(stored: int) -> None:
                if progress:
                    progress(read)
                if on_progress:
                    on_progress(Progress(read, stored, rejected, counter.count, total))
            writer.on_stored = report
            parse = _Parser(header, pseudo)
            batch: list[tuple[int, Row]] = []
            line_no = 1
            try:
                for row in reader:
                    line_no = reader.line_num
                    if not row:  # an empty line (an export's trailing one): no row, not a reject
                        continue
                    read += 1
                    try:
                        batch.append((line_no, parse(row)))
                    except _Reject as exc:
                        reject(line_no, str(exc))
                        continue
                    if len(batch) >= BATCH:
                        deadline.check_start()  # a caller that gave up (gRPC): stop, not load the rest for nobody
                        writer.put(batch)
                        batch = []
                        if parse.rekey:
                            parse.rekey = _with_activations(db, parse.rekey)
            except UnicodeDecodeError:
                raise ExtractError(f"{path}: not UTF-8 text (after line {line_no})") from None
            except _LineTooLong:
                raise _line_too_long(path, line_no + 1) from None
            except csv.Error as exc:
                raise ExtractError(f"{path}: malformed CSV after line {line_no}: {exc}") from None
            writer.put(batch)
            imported = writer.finish()
        if imported == 0:
            raise ExtractError(f"{path}: no valid row; an empty extract would de-register everyone")
        if current is not None and imported < min_ratio * current.rows_imported:
            raise ExtractCutOff(path, imported, min_ratio, current.rows_imported)
        with db.write() as s:
            # Again at the switch, in its transaction: another process may have switched meanwhile.
            hold_until_commit(s, _SWITCH_LOCK_KEY)
            check_extraction_date(extracted_on, today, current_snapshot(s))
            switched = s.execute(update(RegistrySnapshot).where(  # type: ignore[attr-defined]
                RegistrySnapshot.id == snapshot_id, RegistrySnapshot.status == "importing").values(
                status="complete", completed_at=clock.now(), rows_read=read, rows_imported=imported,
                rows_rejected=rejected)).rowcount
            if switched != 1:  # discarded meanwhile (by a process without the import lock): never live
                raise ExtractError(f"{path}: the import was discarded before it could switch; import it again")
            rekeyed = _rekey(s, clock, actor, parse.rekey, pseudo.person_ref)
            eventlog.append(s, time=clock.now(), type="registry.snapshot_switched", actor=actor,
                            subject=f"registrySnapshots/{snapshot_id}", payload={
                                "sha256": digest, "extracted_on": extracted_on.isoformat(),
                                "rows_read": read, "rows_imported": imported, "rows_rejected": rejected,
                                **({"activations_rekeyed": rekeyed} if rekeyed else {})})
    except BaseException:
        # Whatever the call's deadline (past, when it ended the import) or its caller (gone): else the
        # discard failed in turn and left the snapshot `importing`, its rows kept until the next import.
        with deadline.bound(None):
            _discard_unfinished(db, counts=(snapshot_id, read, rejected))
        raise
    finally:
        if rejects:
            rejects.close()
    _prune(db, keep_snapshots)
    return ImportSummary(snapshot_id, digest, read, imported, rejected, unchanged=False)


def _open(path: Path) -> tuple[_CountingReader, Any, list[str]]:
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ExtractError(f"{path}: cannot open ({exc.strerror})") from None
    counter = _CountingReader(raw)
    text = io.TextIOWrapper(io.BufferedReader(counter, 1 << 20), encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
    except UnicodeDecodeError:
        counter.close()
        raise ExtractError(f"{path}: not UTF-8 text") from None
    except _LineTooLong:
        counter.close()
        raise _line_too_long(path, 1) from None
    if not header:
        counter.close()
        raise ExtractError(f"{path}: empty file (no header row)")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    # A column the rules read, named twice, is ambiguous; others are ignored, repeated or not (two
    # unnamed columns at the end of a spreadsheet's export).
    repeated = [c for c in REQUIRED_COLUMNS if header.count(c) > 1]
    if missing or repeated:
        counter.close()
        problem = f"lacks column(s) {', '.join(missing)}" if missing else f"repeats column(s) {', '.join(repeated)}"
        raise ExtractError(f"{path}: header {problem}")
    return counter, reader, header


def _line_too_long(path: Path, line_no: int) -> ExtractError:
    return ExtractError(f"{path}: line {line_no} is longer than {MAX_LINE_BYTES >> 20} MiB: not a registry extract "
                        "(a CSV file, one row per line)")


class _BulkWriter:
    """Stores validated rows of one snapshot from a thread of its own, so that parsing (Python, GIL)
    and writing (the driver, GIL released) overlap; a bounded queue keeps memory constant.

    The first DIRECT_ROWS rows go straight into registry_people, one transaction per batch (COPY on
    PostgreSQL, one executemany on SQLite): while the snapshot is small, its random 32-byte keys
    scatter over a B-tree that still fits in the cache. A batch holding a duplicate identifiant (the
    primary key refuses it) is replayed row by row so that only the duplicates are rejected, each
    with its line number.

    Past that, random-key inserts thrash once the index outgrows the cache, so the rest of the file
    is appended in file order to a TEMP staging table (no index but its line number) on a connection
    held for the import, and `finish` fills registry_people with one INSERT ... SELECT ... ORDER BY
    person_key: sorted input walks the B-tree once instead of scattering. Every row, the direct ones
    included, is staged so that duplicates (every occurrence after the first, by line) are found in
    SQL. A TEMP table dies with its connection: a killed import leaves only its registry_people rows
    (of a snapshot still `importing`), which `_discard_unfinished` removes."""

    COLUMNS = "snapshot_id, person_key, birth_date, postal_code, registered_on, registration_ended_on, category"
    STAGE_COLUMNS = "line_no, person_key, birth_date, postal_code, registered_on, registration_ended_on, category"
    DIRECT_ROWS = 100_000

    def __init__(self, db: Database, snapshot_id: int, reject: Callable[[int, str], None]) -> None:
        self.db, self.snapshot_id, self.reject = db, snapshot_id, reject
        self.on_stored: Callable[[int], None] | None = None
        self.stored = 0  # rows in registry_people, plus staged rows past the direct ones (reported as progress)
        self.direct = 0  # rows stored straight into registry_people
        self.staged = 0  # rows staged past the direct ones
        self.last_direct_line = 0
        self._stage: Any = None  # the pooled DBAPI connection holding the TEMP staging table
        self._queue: queue.Queue[list[tuple[int, Row]] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="registry-writer", daemon=True)

    def __enter__(self) -> "_BulkWriter":
        if not self.db.is_sqlite:  # pysqlite takes the GIL back for every row: a thread only adds contention
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._close_stage()

    def put(self, batch: list[tuple[int, Row]]) -> None:
        if self._error is not None:
            raise self._error
        if not batch:
            return
        if self._thread.is_alive():
            self._queue.put(batch)
        else:
            self._store(batch)

    def finish(self) -> int:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self.staged:
            self.stored = self.direct + self._merge()
            if self.on_stored:
                self.on_stored(self.stored)
        return self.stored

    def _store(self, batch: list[tuple[int, Row]]) -> None:
        if self.staged == 0 and self.direct < self.DIRECT_ROWS:
            n = self.write(batch)
            self._stage_rows(batch)  # for finding later duplicates of these rows in SQL
            self.direct += n
            self.last_direct_line = batch[-1][0]
            self.stored += n
        else:
            self._stage_rows(batch)
            self.staged += len(batch)
            self.stored += len(batch)
        if self.on_stored:
            self.on_stored(self.stored)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the main thread will raise
            try:
                self._store(batch)
            except BaseException as exc:  # handed to the main thread
                self._error = exc

    def write(self, batch: list[tuple[int, Row]]) -> int:
        try:
            with self.db.write() as s:
                conn = s.connection()
                if self.db.is_sqlite:
                    conn.exec_driver_sql(
                        f"INSERT INTO registry_people ({self.COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        # Key order (B-tree locality), by the key alone: two rows of one identifiant
                        # may differ first by a date given in one and empty (None) in the other, which
                        # a whole-row sort cannot compare. (Stable: a duplicate stays after its first.)
                        sorted(((self.snapshot_id, *row) for _, row in batch), key=itemgetter(1)))
                else:
                    self._copy(conn.connection.driver_connection, "registry_people", self.COLUMNS,
                               self.snapshot_id, batch)
            return len(batch)
        except (IntegrityError, UniqueViolation):  # COPY runs on the driver's cursor: psycopg's own error
            return self._one_by_one(batch)

    @staticmethod
    def _copy(driver_conn: Any, table: str, columns: str, sid: int | None, batch: list[tuple[int, Row]]) -> None:
        # COPY text format: bytea as \x<hex> with its backslash doubled, NULL as \N. First column:
        # the snapshot id, or (staging) the line number.
        text = "".join(f"{line_no if sid is None else sid}\t\\\\x{key.hex()}\t{birth}\t{postal}\t{reg}\t"
                       f"{end or COPY_NULL}\t{cat}\n"
                       for line_no, (key, birth, postal, reg, end, cat) in batch)
        with driver_conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            copy.write(text)

    def _open_stage(self) -> Any:
        raw = self.db.engine.raw_connection()
        try:
            conn = raw.driver_connection
            if self.db.is_sqlite:  # autocommit (see db.py): transactions are explicit
                conn.execute("PRAGMA temp.cache_size=-8192")  # appends only
                conn.execute("DROP TABLE IF EXISTS temp.registry_stage")
                conn.execute("CREATE TEMP TABLE registry_stage (line_no INTEGER PRIMARY KEY, "
                             "person_key BLOB NOT NULL, birth_date TEXT, postal_code TEXT, registered_on TEXT, "
                             "registration_ended_on TEXT, category INTEGER)")
            else:
                with conn.cursor() as cur:
                    cur.execute("SET temp_buffers = '64MB'")  # before the session's first temp table
                    cur.execute("DROP TABLE IF EXISTS pg_temp.registry_stage")
                    cur.execute("CREATE TEMP TABLE registry_stage (line_no integer, person_key bytea, "
                                "birth_date date, postal_code varchar(5), registered_on date, "
                                "registration_ended_on date, category smallint)")
                conn.commit()
        except BaseException:
            raw.invalidate()
            raise
        return raw

    def _close_stage(self) -> None:
        raw, self._stage = self._stage, None
        if raw is None:
            return
        try:
            conn = raw.driver_connection
            if self.db.is_sqlite:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.execute("DROP TABLE IF EXISTS temp.registry_stage")
            else:
                conn.rollback()
                with conn.cursor() as cur:
                    cur.execute("DROP TABLE IF EXISTS pg_temp.registry_stage")
                conn.commit()
            raw.close()
        except BaseException:
            raw.invalidate()  # never hand a connection with a staging table back to the pool

    def _stage_rows(self, batch: list[tuple[int, Row]]) -> None:
        if self._stage is None:
            self._stage = self._open_stage()
        conn = self._stage.driver_connection
        if self.db.is_sqlite:
            conn.execute("BEGIN")  # the TEMP database only: no lock on the main one
            conn.executemany(f"INSERT INTO temp.registry_stage ({self.STAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(line_no, *row) for line_no, row in batch])
            conn.execute("COMMIT")
        else:
            self._copy(conn, "registry_stage", self.STAGE_COLUMNS, None, batch)
            conn.commit()

    def _merge(self) -> int:
        """Fills registry_people with the staged rows past the direct ones, in key order, skipping
        and rejecting every occurrence of a key after its first; returns the rows inserted."""
        conn = self._stage.driver_connection
        cols = self.COLUMNS.removeprefix("snapshot_id, ")
        if self.db.is_sqlite:
            return self._merge_sqlite(conn, cols)
        with conn.cursor() as cur:
            cur.execute("SET LOCAL work_mem = '256MB'")  # the server's sort, not this process's memory
            # DISTINCT ON keeps each key's first line; past the direct ones, none is stored yet: a plain
            # INSERT (ON CONFLICT's speculative insertion costs three times as much).
            cur.execute(f"INSERT INTO registry_people ({self.COLUMNS}) SELECT %s, {cols} FROM "
                        "(SELECT DISTINCT ON (person_key) * FROM registry_stage ORDER BY person_key, line_no) AS first "
                        "WHERE line_no > %s ORDER BY person_key",
                        (self.snapshot_id, self.last_direct_line))
            inserted = cur.rowcount
            if inserted < self.staged:
                cur.execute(self._DUPLICATES, (self.last_direct_line,))
                self._reject_duplicates(cur)
        conn.commit()
        return inserted

    # SQLite's merge: rows per transaction, and the pause between two (module constants below).
    MERGE_ROWS = 200_000
    MERGE_PAUSE_S = SQLITE_TURN_PAUSE_S

    def _merge_sqlite(self, conn: Any, cols: str) -> int:
        """SQLite: the staged rows sorted once into a TEMP table (the TEMP database only: no lock on
        the main one), then inserted in key order MERGE_ROWS at a time, each slice in a transaction
        of its own, MERGE_PAUSE_S apart. One INSERT ... SELECT held SQLite's write lock for the whole
        merge (measured: about 4 s for a million-row extract on the AMD machine, and in proportion
        beyond), and every write of the server, its activations and redemptions, waited that long or
        failed UNAVAILABLE past its lock timeout (5 s by default). A slice holds
        it about a second; the pause lets the writers in: another process's wait on a busy file polls
        at least every 100 ms (SQLite's busy handler), the server's own queue waits on it. The rows
        are those of a snapshot still `importing`, which nothing reads: a merge that fails or is
        killed half-way leaves rows that the next import discards (`_discard_unfinished`), as before.
        The busy timeout is the Database's, set here (a pooled connection keeps what its last user,
        a write bounded by a call's deadline or the event loop's 0, left)."""
        before = conn.execute("PRAGMA main.cache_size").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout={int(self.db.sqlite_busy_ms)}")
        try:
            # The sorter's memory is sized from the cache (bounded RSS); one helper thread sorts.
            conn.execute("PRAGMA main.cache_size=-32768")
            conn.execute("PRAGMA threads=1")
            conn.execute("DROP TABLE IF EXISTS temp.registry_sorted")
            conn.execute("CREATE TABLE temp.registry_sorted (n INTEGER PRIMARY KEY, person_key BLOB NOT NULL, "
                         "birth_date TEXT, postal_code TEXT, registered_on TEXT, registration_ended_on TEXT, "
                         "category INTEGER)")
            conn.execute("BEGIN")  # the TEMP database only
            try:
                # n follows the SELECT's order (each row's rowid is the largest so far + 1).
                conn.execute(f"INSERT INTO temp.registry_sorted ({cols}) SELECT {cols} FROM temp.registry_stage "
                             "WHERE line_no > ? ORDER BY person_key, line_no", (self.last_direct_line,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("PRAGMA threads=0")
            last = conn.execute("SELECT max(n) FROM temp.registry_sorted").fetchone()[0] or 0
            inserted = 0
            for first in range(1, last + 1, self.MERGE_ROWS):
                if first > 1:
                    time.sleep(self.MERGE_PAUSE_S)
                    deadline.check_start()  # a caller that gave up (gRPC): stop, as between batches
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # OR IGNORE: a key's first line comes first (key, line order), its later lines
                    # and those of a key stored directly are skipped, then rejected below.
                    inserted += conn.execute(
                        f"INSERT OR IGNORE INTO registry_people ({self.COLUMNS}) SELECT ?, {cols} "
                        "FROM temp.registry_sorted WHERE n BETWEEN ? AND ? ORDER BY n",
                        (self.snapshot_id, first, first + self.MERGE_ROWS - 1)).rowcount
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            if inserted < self.staged:  # (the TEMP database only)
                self._reject_duplicates(conn.execute(self._DUPLICATES.replace("%s", "?"), (self.last_direct_line,)))
            return inserted
        finally:
            if not conn.in_transaction:  # (else the stage's close rolls back, then invalidates)
                conn.execute("DROP TABLE IF EXISTS temp.registry_sorted")
                conn.execute(f"PRAGMA main.cache_size={int(before)}")
                conn.execute("PRAGMA threads=0")

    # Staged rows (past the direct ones) whose key an earlier line already has: every row of the file
    # is staged, so the previous row in (key, line) order tells.
    _DUPLICATES = ("SELECT line_no FROM (SELECT line_no, person_key, "
                   "lag(person_key) OVER (ORDER BY person_key, line_no) AS previous FROM registry_stage) AS s "
                   "WHERE person_key = previous AND line_no > %s ORDER BY line_no")

    def _reject_duplicates(self, cursor: Any) -> None:
        while rows := cursor.fetchmany(1000):
            for (line_no,) in rows:
                self.reject(line_no, "identifiant: duplicate of an earlier row")

    def _one_by_one(self, batch: list[tuple[int, Row]]) -> int:
        stored = 0
        dialect_insert = sqlite_insert if self.db.is_sqlite else pg_insert
        with self.db.write() as s:
            for line_no, (key, birth, postal, reg, end, cat) in batch:
                result = s.execute(dialect_insert(RegistryPerson).values(
                    snapshot_id=self.snapshot_id, person_key=key, birth_date=dt.date.fromisoformat(birth),
                    postal_code=postal, registered_on=dt.date.fromisoformat(reg),
                    registration_ended_on=dt.date.fromisoformat(end) if end else None, category=cat,
                ).on_conflict_do_nothing(index_elements=["snapshot_id", "person_key"])
                    .returning(RegistryPerson.person_key))
                if result.first() is not None:
                    stored += 1
                else:
                    self.reject(line_no, "identifiant: duplicate of an earlier row")
        return stored


def _with_activations(db: Database, pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The (key as an earlier version made it, key now) pairs whose old key has activations: the
    only ones `_rekey` acts on, and rare. Filtered after each batch, so that an import keeps these
    instead of a pair for every row written with lower-case letters (some 200 bytes a row: 1.2 GB
    for a 6 M-row extract in lower case, all looked up again in the switch's transaction). (No
    activation gets an old key meanwhile: every path keys the canonical form.)"""
    new_of = dict(pairs)
    olds = list(new_of)
    found: set[bytes] = set()
    with db.read() as s:
        for i in range(0, len(olds), 500):
            found.update(bytes(k) for k in s.execute(select(Activation.person_key).where(
                Activation.person_key.in_(olds[i:i + 500]))).scalars())
    return [(old, new_of[old]) for old in olds if old in found]


def _rekey(s: Session, clock: Clock, actor: str, pairs: list[tuple[bytes, bytes]],
           ref: Callable[[bytes], str]) -> int:
    """In the switch's transaction: the activations an earlier version keyed by an identifiant as
    written with lower-case letters get the key of its canonical form (pseudonym.normalize_agency_id),
    so that the person is one person again (one live activation per program, revalidation against
    this snapshot, its pseudonyms). One `activation.person_rekeyed` event each (the pseudonyms before
    and after, for the funders' records). An activation whose new key would make a second live one
    in its program (the person was activated again under the new key) keeps its old key, logged:
    `entitlement doctor` cannot tell them apart, an operator must settle it. Returns how many."""
    if not pairs:
        return 0
    new_of = dict(pairs)
    olds = list(new_of)
    rekeyed = []
    # Every row first, then the events: an event takes the log head, and a revocation holds its
    # activation's row while it waits for the log head; holding the head while waiting for a row
    # would deadlock with it.
    for i in range(0, len(olds), 500):
        rows = s.execute(select(Activation.id, Activation.person_key, Activation.program_id,
                                Activation.platform_id).where(Activation.person_key.in_(olds[i:i + 500]))).all()
        for activation_id, old_key, program_id, platform_id in rows:
            new_key = new_of[bytes(old_key)]
            try:
                with s.begin_nested():
                    s.execute(update(Activation).where(Activation.id == activation_id).values(person_key=new_key))
            except IntegrityError:
                _log.warning("activation_not_rekeyed", activation=activation_id,
                             reason="a live activation of the program holds the new key")
                continue
            rekeyed.append((activation_id, bytes(old_key), new_key, program_id, platform_id))
    for activation_id, old_key, new_key, program_id, platform_id in rekeyed:
        eventlog.append(s, time=clock.now(), type="activation.person_rekeyed", actor=actor,
                        subject=f"activations/{activation_id}", program_id=program_id, platform_id=platform_id,
                        reason="identifiant written with lower-case letters by an earlier version: "
                               "keyed by its upper-case form, as every identifiant now",
                        payload={"previous_job_seeker_ref": ref(old_key), "job_seeker_ref": ref(new_key)})
    return len(rekeyed)


def _discard_unfinished(db: Database, counts: tuple[int, int, int] | None = None) -> None:
    """Rows of imports that failed or were killed (left `importing`) are garbage: delete them, in
    the transaction that marks their snapshots failed (no foreign key ties the rows to their
    snapshot: a snapshot that is not `importing` or `complete` has no rows, see doctor.py).
    `counts`: (snapshot id, rows read, rows rejected) of the import failing now, recorded too.
    On SQLite their rows go first in slices (`_delete_in_slices`), the snapshots still `importing`."""
    if db.is_sqlite:
        with db.read() as s:
            dead = s.execute(select(RegistrySnapshot.id).where(
                RegistrySnapshot.status.in_(("importing", "failed")))).scalars().all()
        _delete_in_slices(db, dead)
    with db.write() as s:
        if counts is not None:
            snapshot_id, read, rejected = counts
            s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id == snapshot_id)
                      .values(rows_read=read, rows_rejected=rejected))
        ids = s.execute(select(RegistrySnapshot.id).where(
            RegistrySnapshot.status.in_(("importing", "failed")))).scalars().all()
        if ids:
            s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id.in_(ids)).values(status="failed"))
            s.execute(delete(RegistryPerson).where(RegistryPerson.snapshot_id.in_(ids)))


def _prune(db: Database, keep: int) -> None:
    """Drop the rows of complete snapshots older than the newest `keep` (their metadata stays). On
    SQLite the rows go first in slices (`_delete_in_slices`), the snapshots still `complete` (none
    of them is in force: a newer one is, and only newer ones are added)."""
    older = (select(RegistrySnapshot.id).where(RegistrySnapshot.status == "complete")
             .order_by(RegistrySnapshot.id.desc()).offset(max(keep, 1)))
    if db.is_sqlite:
        with db.read() as s:
            old = s.execute(older).scalars().all()
        _delete_in_slices(db, old)
    with db.write() as s:
        ids = s.execute(older).scalars().all()
        if ids:
            s.execute(update(RegistrySnapshot).where(RegistrySnapshot.id.in_(ids)).values(status="superseded"))
            s.execute(delete(RegistryPerson).where(RegistryPerson.snapshot_id.in_(ids)))


def _delete_in_slices(db: Database, snapshot_ids: Sequence[int]) -> None:
    """SQLite: the rows of these snapshots deleted _BulkWriter.MERGE_ROWS at a time, each slice a
    transaction of its own, MERGE_PAUSE_S apart, for the reason the merge is sliced: one DELETE of a
    whole snapshot held the write lock as long (measured: 1.4 s for 500,000 rows on the AMD
    machine; a 6-million-row snapshot, some 17 s), and the server's writes waited or failed
    UNAVAILABLE meanwhile. The caller's transaction then changes the snapshots' status and deletes
    what is left (nothing, unless a row came meanwhile): a slice is deleted for good, a snapshot
    half-emptied by a crash is emptied by the next import, as its status says. PostgreSQL: nothing
    here (its DELETE locks only the rows it deletes, which no one else writes)."""
    if not db.is_sqlite:
        return
    for sid in snapshot_ids:
        while True:
            with db.write() as s:
                deleted = s.execute(  # type: ignore[attr-defined]
                    DELETE_SNAPSHOT_ROWS_SLICE, {"sid": sid, "n": _BulkWriter.MERGE_ROWS}).rowcount
            if deleted < _BulkWriter.MERGE_ROWS:
                break
            time.sleep(_BulkWriter.MERGE_PAUSE_S)


_LATEST = (select(func.max(RegistrySnapshot.id)).where(RegistrySnapshot.status == "complete")
           .scalar_subquery())
# Built once: lookups are the hot path of every check and activation (statement compiled and
# cached by SQLAlchemy; run on the session's connection, skipping the ORM).
_LOOKUP = (
    select(RegistrySnapshot.id, RegistrySnapshot.extracted_on, RegistryPerson.birth_date,
           RegistryPerson.postal_code, RegistryPerson.registered_on,
           RegistryPerson.registration_ended_on, RegistryPerson.category)
    .select_from(RegistrySnapshot)
    .outerjoin(RegistryPerson, and_(RegistryPerson.snapshot_id == RegistrySnapshot.id,
                                    RegistryPerson.person_key == bindparam("person_key")))
    .where(RegistrySnapshot.id == _LATEST)
)


def lookup_read(person_key: bytes) -> tuple[Select[Any], dict[str, Any]]:
    """The statement `lookup` runs (for direct.Statements.prefetch)."""
    return _LOOKUP, {"person_key": person_key}


def lookup(conn: Connection | HotReads | direct.Statements, person_key: bytes, birth_date: dt.date) -> tuple[PersonFacts | None, SnapshotRef | None]:
    """The person's facts in the current snapshot, in one round trip (one statement: it reads the
    current snapshot's id and the person's row together). A wrong birth date answers exactly like
    an unknown identifier."""
    _stmt, params = lookup_read(person_key)
    # HotReads, or a write transaction's direct.Statements: the same first(); else a Connection.
    row = conn.execute(_LOOKUP, params).first() if isinstance(conn, Connection) else conn.first(_LOOKUP, params)
    if row is None:
        return None, None
    snap = SnapshotRef(row.id, row.extracted_on)
    if row.birth_date is None or row.birth_date != birth_date:
        return None, snap
    return PersonFacts(row.birth_date, row.postal_code, row.registered_on, row.registration_ended_on,
                       row.category), snap
