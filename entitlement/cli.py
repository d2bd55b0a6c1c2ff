"""The `entitlement` command: operator commands (db, demo, registry, programs, keys, secrets) and a client
for the people who use the service by hand (advisors, platform support staff, funders).

Client commands read ENTITLEMENT_ADDRESS (default 127.0.0.1:50051) and ENTITLEMENT_TOKEN (the
caller's bearer token), or --address / --token. Output is a readable table by default, JSON with
--json. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entitlement.config import MAX_DAYS, MAX_HOURS, MAX_MINUTES, ROOT, Settings

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for a writer its reader left


def _fail(message: str, code: int = 1) -> int:
    print(f"entitlement: {message}", file=sys.stderr)
    return code


def _number(noun: str, maximum: float | None = None, *, integer: bool = False) -> Callable[[str], float]:
    """argparse type of a number argument (`noun`: "number of days"): finite, and at most `maximum`
    (beyond, a date computed from it would leave the calendar: OverflowError). argparse's error
    names the flag."""
    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if integer else ''}{noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite {noun}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected a {noun} up to {maximum:g}, got {text!r}")
        return value
    return parse


def _upgrade(url: str) -> str | None:
    """Migrate the database to the head revision; what went wrong, in one line, or None."""
    from alembic.util import CommandError

    from entitlement.storage.migrate import SchemaNotCurrent, raised_by_migration, upgrade
    try:
        upgrade(url)
    except SchemaNotCurrent as exc:  # at a revision of a newer version
        return str(exc)
    except CommandError as exc:
        return f"database not migrated: {exc}"
    except RuntimeError as exc:
        if not raised_by_migration(exc):
            raise
        return f"database not migrated: {exc}"
    return None


# ---------------------------------------------------------------------------------------- operators

def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from entitlement.storage.migrate import head_revision
    settings = Settings.from_env()
    problem = _upgrade(settings.database_url)
    if problem:
        return _fail(problem)
    print(f"database at revision {head_revision()}")
    return 0


def cmd_db_rebuild_report(args: argparse.Namespace) -> int:
    """Recompute the funding report's rollup from the ledger and the activations, in the service's
    time zone (after changing ENTITLEMENT_TIMEZONE, or rows loaded around the service), beside
    serving processes: writers wait only for the short catch-up and swap (rollup.rebuild)."""
    from entitlement import rollup
    settings = Settings.from_env()
    db = _migrated_db(settings)
    try:
        months, days = rollup.rebuild(db, settings.timezone)
    finally:
        db.dispose()
    print(f"report rollup rebuilt in {settings.timezone}: {months} month rows, {days} day rows")
    return 0


def cmd_programs_check(args: argparse.Namespace) -> int:
    from entitlement.programs import ProgramCatalog, ProgramFileError
    try:
        catalog = ProgramCatalog.load(Path(args.dir))
    except ProgramFileError as exc:
        return _fail(str(exc))
    for p in catalog.all():
        end = p.end.isoformat() if p.end else "open-ended"
        print(f"ok  {p.id:<28} {p.start.isoformat()} .. {end:<10}  version {p.version}  ({p.source.name})")
    return 0


def _key_event_db(settings: Settings) -> Any:
    """The database to log key events in, when one is configured (ENTITLEMENT_DATABASE_URL set, or
    the default SQLite file present); None otherwise. Checked before the key is made, so a
    database that is not ready fails the command before anything changes."""
    import os
    configured = bool(os.environ.get("ENTITLEMENT_DATABASE_URL"))
    prefix = "sqlite:///"
    if not configured and settings.database_url.startswith(prefix):
        configured = Path(settings.database_url[len(prefix):]).exists()
    return _migrated_db(settings) if configured else None


def _log_key_event(db: Any, type: str, kid: str, actor: str, payload: dict[str, Any]) -> None:
    """`keys.created` / `keys.rotated`: the kid and the times, never key material."""
    from entitlement import eventlog
    if db is None:
        return
    try:
        with db.write() as s:
            eventlog.append(s, time=dt.datetime.now(dt.timezone.utc), type=type, actor=actor, subject=f"keys/{kid}",
                            payload={"kid": kid, **payload})
    finally:
        db.dispose()


def cmd_keys_create(args: argparse.Namespace) -> int:
    from entitlement.tokens import KeyStoreError, create_first_key, format_time
    settings = Settings.from_env()
    db = _key_event_db(settings)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    try:
        kid = create_first_key(settings.key_dir, now)
    except KeyStoreError as exc:
        if db is not None:
            db.dispose()
        return _fail(str(exc))
    _log_key_event(db, "keys.created", kid, _operator(args), {"created": format_time(now), "sign_from": format_time(now)})
    print(f"created signing key {kid} in {settings.key_dir}; it signs from now")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from entitlement.tokens import KeyStoreError, format_time, rotate
    settings = Settings.from_env()
    if args.publish_hours < 0:
        return _fail("--publish-hours cannot be negative")
    db = _key_event_db(settings)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    try:
        r = rotate(settings.key_dir, now,
                   publish_for=dt.timedelta(hours=args.publish_hours),
                   token_ttl=dt.timedelta(days=settings.token_ttl_days))
    except KeyStoreError as exc:
        if db is not None:
            db.dispose()
        return _fail(str(exc))
    _log_key_event(db, "keys.rotated", r.new_kid, _operator(args), {
        "created": format_time(now), "sign_from": format_time(r.sign_from), "previous_kid": r.previous_kid,
        "previous_retire_after": format_time(r.sign_from) if r.previous_kid else None,
        "previous_published_until": format_time(r.previous_dropped_after) if r.previous_dropped_after else None})
    print(f"created signing key {r.new_kid} in {settings.key_dir}: published now, signs from {format_time(r.sign_from)}")
    if r.previous_kid:
        print(f"key {r.previous_kid} signs until then, and stays published until {format_time(r.previous_dropped_after)} "
              f"(+ ENTITLEMENT_TOKEN_TTL_DAYS = {settings.token_ttl_days})")
    print("running servers pick the change up on their own (the key folder is re-read when it changes)")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from entitlement.client_cli import _table
    from entitlement.tokens import KeyStore, KeyStoreError, read_folder
    settings = Settings.from_env()
    try:
        store = KeyStore(read_folder(settings.key_dir), token_ttl=dt.timedelta(days=settings.token_ttl_days))
    except KeyStoreError as exc:
        return _fail(str(exc))
    keys = [k.to_dict() for k in store.describe(dt.datetime.now(dt.timezone.utc))]
    if args.json:
        print(json.dumps({"keys": keys}, indent=2))
        return 0
    _table(["KID", "CREATED", "SIGN FROM", "RETIRE AFTER", "PUBLISHED UNTIL", "STATE"],
           [[k["kid"], k["created"], k["sign_from"], k["retire_after"] or "-", k["published_until"] or "-",
             k["state"]] for k in keys])
    return 0


def cmd_secrets_init(args: argparse.Namespace) -> int:
    """Create the pseudonym key (ENTITLEMENT_PSEUDONYM_KEY_FILE): 0600, its folder 0700 when
    missing; an existing key is never replaced (every pseudonym stored was made with it)."""
    from entitlement.pseudonym import Pseudonymizer, create_key_file
    settings = Settings.from_env()
    path = settings.pseudonym_key_file
    try:
        create_key_file(path)
    except FileExistsError:
        try:
            Pseudonymizer.from_file(path)
        except (OSError, ValueError) as exc:
            return _fail(f"pseudonym key file {path} exists but is unusable ({exc}); it is not replaced")
        print(f"pseudonym key {path} already exists (it is never replaced: every pseudonym stored was made with it)")
        return 0
    except OSError as exc:
        return _fail(f"cannot create the pseudonym key {path}: {exc.strerror or exc}")
    print(f"created pseudonym key {path} (mode 0600); keep it apart from the database, and back it up: "
          "without it no stored pseudonym can be matched again")
    return 0


def cmd_registry_import(args: argparse.Namespace) -> int:
    from entitlement import registry
    from entitlement.clock import SystemClock
    from entitlement.pseudonym import Pseudonymizer
    from entitlement.storage.db import Database
    from entitlement.storage.migrate import SchemaNotCurrent, ensure_current
    settings = Settings.from_env()
    db = Database(settings.database_url)
    try:
        ensure_current(db)
    except SchemaNotCurrent as exc:
        return _fail(str(exc))
    pseudo = Pseudonymizer.from_file(settings.pseudonym_key_file)
    # The date the agency extracted the file, as it says: never guessed (a default of today would
    # make a two-month-old file pass for fresh data).
    try:
        if not registry.ISO_DATE_RE.fullmatch(args.extracted_on):
            raise ValueError
        extracted = dt.date.fromisoformat(args.extracted_on)
    except ValueError:
        return _fail(f"--extracted-on: expected a date YYYY-MM-DD, got {args.extracted_on!r}")
    clock = SystemClock(settings.timezone)
    rejects = Path(args.rejects) if args.rejects else Path(str(args.file) + ".rejects.csv")
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.quiet else None
    try:
        summary = registry.import_extract(db, pseudo, clock, Path(args.file),
                                          extracted_on=extracted, actor="operator:cli", rejects_path=rejects,
                                          on_progress=bar, min_ratio=args.min_ratio,
                                          keep_snapshots=args.keep_snapshots)
    except registry.ExtractDatedInFuture as exc:
        return _fail(f"--extracted-on: {exc} (in {settings.timezone}); import refused, previous snapshot still in force")
    except registry.ExtractOlderThanCurrent as exc:
        return _fail(f"--extracted-on: {exc}; import refused, previous snapshot still in force "
                     "(an extract of the same day or later is accepted)")
    except registry.ExtractCutOff as exc:
        return _fail(f"import refused, previous snapshot still in force: {exc.accept_with('--min-ratio 0')}")
    except registry.ExtractError as exc:
        return _fail(f"import refused, previous snapshot still in force: {exc}")
    except OSError as exc:  # the file missing, a directory, unreadable; or the rejects file unwritable
        return _fail(f"import refused, previous snapshot still in force: {exc.filename or args.file}: "
                     f"{exc.strerror or exc}")
    finally:
        if bar:
            bar.done()
    if summary.unchanged:
        print(f"unchanged: this file (sha256 {summary.sha256[:12]}) is already snapshot {summary.snapshot_id}")
    else:
        print(f"snapshot {summary.snapshot_id}: read {summary.rows_read}, imported {summary.rows_imported}, "
              f"rejected {summary.rows_rejected} (see {rejects})")
    return 0


@dataclass(frozen=True)
class _JobDeps:
    """What the jobs need (entitlement.ledger.Deps): no keys, callers or pseudonym secret."""

    settings: Settings
    db: Any
    catalog: Any
    clock: Any


def _job_deps() -> _JobDeps | str:
    from entitlement.clock import SystemClock
    from entitlement.programs import ProgramCatalog, ProgramFileError
    from entitlement.storage.db import Database
    from entitlement.storage.migrate import SchemaNotCurrent, ensure_current
    settings = Settings.from_env()
    try:
        catalog = ProgramCatalog.load(settings.programs_dir)
    except ProgramFileError as exc:
        return str(exc)
    db = Database(settings.database_url, pool_size=2)
    try:
        ensure_current(db)
    except SchemaNotCurrent as exc:
        db.dispose()
        return str(exc)
    return _JobDeps(settings, db, catalog, SystemClock(settings.timezone))


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check every invariant of the database (ENTITLEMENT_DATABASE_URL); exit 1 on any problem."""
    from entitlement import doctor
    from entitlement.programs import ProgramCatalog, ProgramFileError
    from entitlement.storage.db import Database
    from entitlement.storage.migrate import SchemaNotCurrent, ensure_current
    settings = Settings.from_env()
    trusted = None
    if args.trusted:  # a checkpoint kept from earlier, checked with this service's log key
        from entitlement import logtree, note
        if not settings.log_key_path.exists():
            return _fail(f"--trusted: no log key at {settings.log_key_path} to check the checkpoint's signature "
                         f"(ENTITLEMENT_LOG_KEY_FILE)")
        try:
            verifier = logtree.read_signer(settings.log_key_path, settings.log_origin).verifier
            trusted = note.open_checkpoint(Path(args.trusted).read_text(encoding="utf-8"), verifier)
        except (OSError, UnicodeDecodeError, note.NoteError) as exc:
            return _fail(f"--trusted {args.trusted}: {exc}")
    # The program files the server would load: checked against the values activations were decided
    # with (a bad folder is the server's refusal to start, `entitlement programs check`, not ours).
    try:
        catalog: ProgramCatalog | None = ProgramCatalog.load(settings.programs_dir)
    except ProgramFileError as exc:
        print(f"warning: program files not checked against the activations: {exc}", file=sys.stderr)
        catalog = None
    db = Database(settings.database_url, pool_size=1)
    try:
        ensure_current(db)
        problems = doctor.check(db, leaves=not args.quick, trusted=trusted, catalog=catalog)
    except SchemaNotCurrent as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    if args.json:
        print(json.dumps([{"code": p.code, "detail": p.detail} for p in problems], indent=2))
    else:
        for p in problems:
            print(f"{p.code}: {p.detail}")
        print("ok: every invariant holds" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_jobs_run(args: argparse.Namespace) -> int:
    from entitlement import client_cli, jobs
    try:
        # An empty one (`--until "$DAY"`, the variable unset) is malformed, not "today".
        until = client_cli.strict_date(args.until) if args.until is not None else None
    except ValueError:
        return _fail(f"--until: expected a date YYYY-MM-DD, got {args.until!r}")
    deps = _job_deps()
    if isinstance(deps, str):
        return _fail(deps)
    try:
        r = jobs.run_settlement(deps, until)
    except ValueError as exc:  # a date in the future
        return _fail(f"--until: {exc}")
    finally:
        deps.db.dispose()
    print(f"settled up to {r.as_of.isoformat()}: {r.examined} activations examined, {r.expired} expired, "
          f"{r.months_consumed} months consumed ({r.consumed_cents} cents), {r.released_cents} cents released")
    return 0


def _print_revalidation(r: Any) -> None:
    if r.snapshot_id is None:
        print("no registry snapshot imported: nothing to revalidate against")
        return
    print(f"revalidated against registry snapshot {r.snapshot_id}: {r.examined} live activations examined, "
          f"{r.up_to_date} decided on data as recent, {r.still_eligible} still eligible, "
          f"{r.already_ending} no longer eligible but ending by then already, {r.curtailed} curtailed, "
          f"{r.expired} expired at once, {r.released_cents} cents released"
          + (f", {r.skipped} left for the next run (their snapshot's rows went meanwhile)" if r.skipped else ""))


def cmd_jobs_revalidate(args: argparse.Namespace) -> int:
    from entitlement import jobs
    deps = _job_deps()
    if isinstance(deps, str):
        return _fail(deps)
    try:
        r = jobs.run_revalidation(deps)
    finally:
        deps.db.dispose()
    _print_revalidation(r)
    return 0


def cmd_jobs_daily(args: argparse.Namespace) -> int:
    """Revalidation, then settlement up to today: in that order, an activation the new extract ends
    before today has its months settled by its new end date (settled first, a month begun today
    would be booked as consumed, then stay so)."""
    from entitlement import jobs
    deps = _job_deps()
    if isinstance(deps, str):
        return _fail(deps)
    try:
        _print_revalidation(jobs.run_revalidation(deps))
        r = jobs.run_settlement(deps)
    finally:
        deps.db.dispose()
    print(f"settled up to {r.as_of.isoformat()}: {r.examined} activations examined, {r.expired} expired, "
          f"{r.months_consumed} months consumed ({r.consumed_cents} cents), {r.released_cents} cents released")
    return 0


# ------------------------------------------------------------------------------ callers, tls, privacy

def _operator(args: argparse.Namespace) -> str:
    import getpass
    name = args.operator or getpass.getuser() or "unknown"
    return name if name.startswith("operator:") else f"operator:{name}"


def _migrated_db(settings: Settings) -> Any:
    from entitlement.storage.db import Database
    from entitlement.storage.migrate import SchemaNotCurrent, ensure_current
    db = Database(settings.database_url, pool_size=2)
    try:
        ensure_current(db)
    except SchemaNotCurrent as exc:
        db.dispose()
        raise SystemExit(str(exc)) from None
    return db


def _when(t: dt.datetime | None) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="seconds") if t else "-"


def _expires(days: float | None) -> dt.timedelta | None:
    if days is None:
        return None
    if days <= 0:
        raise SystemExit("--expires-days must be positive")
    return dt.timedelta(days=days)


def cmd_callers_create(args: argparse.Namespace) -> int:
    from entitlement import credentials
    from entitlement.callers import CallerDirectory
    settings = Settings.from_env()
    try:
        caller = credentials.make_caller(args.id, args.role, platform_id=args.platform or "",
                                         advisor_id=args.advisor or "", agency_code=args.agency or "",
                                         funder_id=args.funder or "")
    except ValueError as exc:
        return _fail(f"callers create: {exc}")
    file = CallerDirectory.load(settings.callers_file) if settings.callers_file.exists() else None
    db = _migrated_db(settings)
    try:
        issued = credentials.create(db, caller, now=dt.datetime.now(dt.timezone.utc), actor=_operator(args),
                                    expires_in=_expires(args.expires_days), file=file)
    except credentials.CallerError as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    print(f"created caller {caller.id} ({caller.actor}), expires {_when(issued.expires_at)}", file=sys.stderr)
    print("its bearer token, shown this once (only its SHA-256 is stored):", file=sys.stderr)
    print(issued.token)
    return 0


def cmd_callers_rotate(args: argparse.Namespace) -> int:
    from entitlement import credentials
    settings = Settings.from_env()
    minutes = args.overlap_minutes if args.overlap_minutes is not None else settings.caller_rotation_overlap_minutes
    db = _migrated_db(settings)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        issued = credentials.rotate(db, args.id, now=now, actor=_operator(args),
                                    overlap=dt.timedelta(minutes=minutes), expires_in=_expires(args.expires_days))
    except credentials.CallerError as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    print(f"new token for {args.id}, expires {_when(issued.expires_at)}; the previous one works until "
          f"{_when(now + dt.timedelta(minutes=minutes))}", file=sys.stderr)
    print("the new bearer token, shown this once:", file=sys.stderr)
    print(issued.token)
    return 0


def cmd_callers_revoke(args: argparse.Namespace) -> int:
    from entitlement import credentials
    settings = Settings.from_env()
    db = _migrated_db(settings)
    try:
        n = credentials.revoke(db, args.id, now=dt.datetime.now(dt.timezone.utc), actor=_operator(args),
                               reason=args.reason or "")
    except credentials.CallerError as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    print(f"revoked {args.id} ({n} usable token(s)); running servers refuse it within "
          f"ENTITLEMENT_CALLER_CACHE_SECONDS = {settings.caller_cache_seconds} s")
    return 0


def cmd_callers_list(args: argparse.Namespace) -> int:
    from entitlement import credentials
    from entitlement.callers import CallerDirectory
    from entitlement.client_cli import _table
    settings = Settings.from_env()
    db = _migrated_db(settings)
    try:
        rows = credentials.list_callers(db, dt.datetime.now(dt.timezone.utc))
    finally:
        db.dispose()
    file = CallerDirectory.load(settings.callers_file) if settings.callers_file.exists() else None
    out = [{"id": r.caller.id, "role": r.caller.role, "scope": r.caller.actor, "source": "database",
            "state": r.state, "created": _when(r.created_at), "expires": _when(r.expires_at),
            "revoked": _when(r.revoked_at), "usable_tokens": r.usable_tokens} for r in rows]
    if file is not None:
        out += [{"id": c.id, "role": c.role, "scope": c.actor, "source": "file", "state": "active", "created": "-",
                 "expires": "-", "revoked": "-", "usable_tokens": 1}
                for c in sorted(file._by_id.values(), key=lambda c: c.id)]
    if args.json:
        print(json.dumps({"callers": out}, indent=2))
        return 0
    _table(["ID", "ROLE", "SCOPE", "SOURCE", "STATE", "CREATED", "EXPIRES", "REVOKED", "TOKENS"],
           [[c["id"], c["role"], c["scope"], c["source"], c["state"], c["created"], c["expires"], c["revoked"],
             c["usable_tokens"]] for c in out])
    return 0


def cmd_tls_make_ca(args: argparse.Namespace) -> int:
    from entitlement.callers import ID_RE
    from entitlement.tls import make_ca
    clients = args.client or ["platform-openclassrooms"]
    for c in clients:
        if not ID_RE.fullmatch(c):
            return _fail(f"--client {c!r}: a caller id (letters, digits, '.', '_' or '-')")
    try:
        made = make_ca(Path(args.dir), clients, force=args.force)
    except FileExistsError as exc:
        return _fail(str(exc))
    print(f"test CA:            {made.ca_cert} (key ca.key: keep it private)")
    print(f"server certificate: {made.server_cert} + {made.server_key} (localhost, 127.0.0.1, ::1)")
    for caller_id, (cert, key) in made.clients.items():
        print(f"client {caller_id}: {cert} + {key} (CN and URI SAN urn:entitlement:caller:{caller_id})")
    d = made.dir
    print(f"""
Server:  ENTITLEMENT_TLS_CERT_FILE={d}/server.crt ENTITLEMENT_TLS_KEY_FILE={d}/server.key \
         ENTITLEMENT_TLS_CLIENT_CA_FILE={d}/ca.crt   # (the last one for mutual TLS)
Client:  entitlement verify learner-42 --address localhost:50051 --ca {d}/ca.crt \
         --cert {d}/{clients[0]}.crt --key {d}/{clients[0]}.key""")
    return 0


def cmd_privacy_purge(args: argparse.Namespace) -> int:
    import tempfile

    from entitlement import privacy, registry_feed
    settings = Settings.from_env()
    days = args.retention_days if args.retention_days is not None else settings.retention_days
    if args.retention_days is not None and args.retention_days < 1:  # before anything is done
        return _fail(f"--retention-days must be at least 1, got {args.retention_days}")
    # First, whatever becomes of the database's part: registry extracts a server killed during an
    # import left spooled on this machine (personal data in clear); the purge runs daily, a server
    # may not start here again soon. Only the spools of this user in this TMPDIR: run the purge as
    # the servers' user, with their TMPDIR.
    where = tempfile.gettempdir()
    try:
        spools = registry_feed.sweep_stale_spools(dry_run=args.dry_run)
        swept = True
        print(f"{'would remove' if args.dry_run else 'removed'} {spools} registry extract spool(s) a killed "
              f"import left in {where}")
    except OSError as exc:
        swept = False
        print(f"entitlement: cannot list {where} for registry extract spools ({type(exc).__name__}); "
              "any left there stay", file=sys.stderr)
    db = _migrated_db(settings)
    try:
        summary = privacy.purge(db, now=dt.datetime.now(dt.timezone.utc), retention_days=days,
                                actor=_operator(args), dry_run=args.dry_run)
    except ValueError as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    verb = "would delete" if args.dry_run else "deleted"
    print(f"retention {days} days (before {summary.cutoff}): {verb} the rows of {summary.registry_snapshots} "
          f"registry snapshot(s) ({summary.registry_rows} rows), {summary.idempotency_records} idempotency "
          f"record(s); {'would scrub' if args.dry_run else 'scrubbed'} {summary.activations_scrubbed} ended "
          f"activation(s) (account id, decision details); kept {summary.activations_kept} ended activation(s) "
          "whose ledger still holds reserved money (a usage report may still come; a later purge scrubs them "
          "once the settlement has released it)")
    return 0 if swept else 1


class ProgressBar:
    """One self-rewriting line on a terminal: rows, rows/s, percent of the file, ETA."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.started, self.shown = stream, time.monotonic(), False

    def __call__(self, p: Any) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = p.rows_read / elapsed
        fraction = p.bytes_read / p.bytes_total if p.bytes_total else 1.0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        width = 30
        filled = int(width * fraction)
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%}  {p.rows_read:>12,} rows  "
                          f"{rate:>9,.0f} rows/s  rejected {p.rows_rejected:,}  ETA {int(eta) // 60}:{int(eta) % 60:02d} ")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def cmd_registry_generate(args: argparse.Namespace) -> int:
    from entitlement import synthetic
    synthetic.write(Path(args.file), args.rows, args.seed)
    print(f"wrote {args.rows} synthetic rows to {args.file}")
    return 0


DEMO_CALLERS = [
    ("advisor-paris", "advisor", {"advisor_id": "A0001", "agency_code": "75011"}),
    ("advisor-lyon", "advisor", {"advisor_id": "A0002", "agency_code": "69003"}),
    ("platform-openclassrooms", "platform", {"platform_id": "openclassrooms"}),
    ("funder-ministry", "funder", {"funder_id": "ministry-of-labour"}),
    ("funder-france-travail", "funder", {"funder_id": "france-travail"}),
    ("funder-region-idf", "funder", {"funder_id": "region-idf"}),
    ("agency-feed", "agency", {}),
    ("admin", "admin", {}),
]


def cmd_demo_init(args: argparse.Namespace) -> int:
    """Prepare the local demo: migrate, create secrets, callers, import the demo registry."""
    from entitlement import registry
    from entitlement.callers import Caller, write_callers
    from entitlement.clock import SystemClock
    from entitlement.pseudonym import Pseudonymizer
    from entitlement.storage.db import Database
    from entitlement.tokens import KeyStore
    settings = Settings.from_env()
    problem = _upgrade(settings.database_url)
    if problem:
        return _fail(problem)
    pseudo = Pseudonymizer.from_file(settings.pseudonym_key_file, create=True)
    KeyStore.load(settings.key_dir, create=True, token_ttl=dt.timedelta(days=settings.token_ttl_days))
    from entitlement.logtree import load_signer
    log_signer = load_signer(settings.log_key_path, settings.log_origin, create=True)
    creds_path = settings.callers_file.parent / "demo-credentials.json"  # (var/, by default)
    if not settings.callers_file.exists() or not creds_path.exists():
        tokens = write_callers(settings.callers_file, [Caller(id=i, role=r, **scope) for i, r, scope in DEMO_CALLERS])
        creds_path.write_text(json.dumps(tokens, indent=2) + "\n")
        creds_path.chmod(0o600)
    tokens = json.loads(creds_path.read_text())
    db = Database(settings.database_url)
    clock = SystemClock(settings.timezone)
    try:
        # The demo file is synthetic: taken as extracted today (the service's day, not the host's).
        summary = registry.import_extract(db, pseudo, clock, ROOT / "demo" / "registry.csv",
                                          extracted_on=clock.today(), actor="operator:demo")
    except registry.ExtractError as exc:
        return _fail(f"demo registry not imported: {exc}")
    finally:
        db.dispose()
    print(f"demo registry: snapshot {summary.snapshot_id}, {summary.rows_imported} people"
          + (" (unchanged)" if summary.unchanged else ""))
    if log_signer is not None:
        print(f"event log checkpoints signed by {settings.log_key_path}; verifier key {log_signer.verifier.encode()}")
    print(f"\nDemo credentials (local demo only; stored in {creds_path}):")
    for caller_id, token in tokens.items():
        print(f"  {caller_id:<26} {token}")
    adv, plat, fund = tokens["advisor-paris"], tokens["platform-openclassrooms"], tokens["funder-ministry"]
    # The server's address when it is not the client's default (ENTITLEMENT_LISTEN set for the demo).
    from entitlement.client_cli import DEFAULT_ADDRESS
    at = "" if settings.listen == DEFAULT_ADDRESS else f"ENTITLEMENT_ADDRESS={settings.listen} "
    print(f"""
Try, in another terminal (.venv/bin/entitlement, or `source .venv/bin/activate`):
  {at}ENTITLEMENT_TOKEN={adv} entitlement check DEMO0001 1990-05-17
  {at}ENTITLEMENT_TOKEN={adv} entitlement activate DEMO0001 1990-05-17 --program premium-job-seekers --platform openclassrooms
  {at}ENTITLEMENT_TOKEN={plat} entitlement redeem <TOKEN> learner-42
  {at}ENTITLEMENT_TOKEN={plat} entitlement verify learner-42
  {at}ENTITLEMENT_TOKEN={fund} entitlement activations
  grpcurl -plaintext {settings.listen} list          # reflection
""")
    return 0


# -------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entitlement", description="Operator commands and a client for the "
                                "entitlement service (advisors, platform support staff, funders).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="migrate ENTITLEMENT_DATABASE_URL to the latest schema").set_defaults(func=cmd_db_upgrade)
    db.add_parser("rebuild-report", help="recompute the funding report's rollup from the ledger and activations, "
                  "in ENTITLEMENT_TIMEZONE (after changing it)").set_defaults(func=cmd_db_rebuild_report)

    demo = sub.add_parser("demo", help="local demo").add_subparsers(dest="demo_command", required=True)
    demo.add_parser("init", help="migrate, create secrets and demo callers, import demo/registry.csv").set_defaults(func=cmd_demo_init)

    programs = sub.add_parser("programs", help="program files").add_subparsers(dest="programs_command", required=True)
    check = programs.add_parser("check", help="validate program files without starting the server")
    check.add_argument("dir", nargs="?", default=str(Settings().programs_dir))
    check.set_defaults(func=cmd_programs_check)

    keys = sub.add_parser("keys", help="token signing keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create the first Ed25519 signing key in ENTITLEMENT_KEY_DIR (signs at once)")
    kc.add_argument("--operator", help="who does this, for the event log when a database is configured "
                    "(default: your login name)")
    kc.set_defaults(func=cmd_keys_create)
    rot = keys.add_parser("rotate", help="create the next signing key: published now, signs after --publish-hours; "
                          "the current signer retires then")
    rot.add_argument("--publish-hours", type=_number("number of hours", MAX_HOURS), default=24.0,
                     help="hours the new key is published before it signs (default 24: longer than platforms "
                          "cache the JWKS)")
    rot.add_argument("--operator", help="who does this, for the event log when a database is configured "
                     "(default: your login name)")
    rot.set_defaults(func=cmd_keys_rotate)
    lst = keys.add_parser("list", help="the keys with created, sign_from, retire_after and state "
                          "(next, signing, retiring, expired)")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    lst.set_defaults(func=cmd_keys_list)

    sec = sub.add_parser("secrets", help="the service's secrets").add_subparsers(
        dest="secrets_command", required=True)
    sec.add_parser("init", help="create the pseudonym key (ENTITLEMENT_PSEUDONYM_KEY_FILE, mode 0600) when "
                       "missing; an existing one is never replaced").set_defaults(func=cmd_secrets_init)

    reg = sub.add_parser("registry", help="job-seeker registry extracts").add_subparsers(dest="registry_command", required=True)
    imp = reg.add_parser("import", help="import an extract as a new snapshot")
    imp.add_argument("file")
    imp.add_argument("--extracted-on", required=True, metavar="DATE",
                     help="the date the agency extracted the file, YYYY-MM-DD (required: not later than today, "
                          "not before the current snapshot's)")
    imp.add_argument("--rejects", help="where to write rejected rows (default FILE.rejects.csv)")
    imp.add_argument("--min-ratio", type=_number("ratio"), default=0.5,
                     help="refuse an extract with fewer valid rows than this share of the current snapshot "
                          "(default 0.5; 0 accepts any non-empty extract)")
    imp.add_argument("--keep-snapshots", type=int, default=2,
                     help="complete snapshots whose rows are kept (default 2: current and previous)")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=cmd_registry_import)
    gen = reg.add_parser("generate", help="write a synthetic extract (invented people)")
    gen.add_argument("file")
    gen.add_argument("--rows", type=int, default=1000)
    gen.add_argument("--seed", type=int, default=2015)
    gen.set_defaults(func=cmd_registry_generate)

    jobs = sub.add_parser("jobs", help="settlement and revalidation jobs (run them daily, e.g. from cron)"
                          ).add_subparsers(dest="jobs_command", required=True)
    run = jobs.add_parser("run", help="book the consumption owed and the expiries, up to a date (idempotent)")
    run.add_argument("--until", metavar="DATE", help="settle up to this date YYYY-MM-DD (default today; not later)")
    run.set_defaults(func=cmd_jobs_run)
    jobs.add_parser("revalidate", help="re-check live activations against the current registry snapshot; "
                    "curtail those no longer eligible").set_defaults(func=cmd_jobs_revalidate)
    jobs.add_parser("daily", help="revalidate, then settle up to today: the daily run, in the order that "
                    "matters").set_defaults(func=cmd_jobs_daily)

    doc = sub.add_parser("doctor", help="check the database's invariants (ledger, counters, event log, "
                         "acknowledged requests); exit 1 on any problem")
    doc.add_argument("--quick", action="store_true", help="skip the checks that read every event: each event's leaf hash, and the stored Merkle nodes against their leaves (with --trusted, the log is still checked to extend it, through the stored tree)")
    doc.add_argument("--trusted", metavar="CHECKPOINT", help="a signed checkpoint kept from earlier (GetCheckpoint, "
                     "`audit export`): the log must still extend it")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(func=cmd_doctor)

    callers = sub.add_parser("callers", help="callers managed in the database (bearer tokens)"
                             ).add_subparsers(dest="callers_command", required=True)

    def operator(q: argparse.ArgumentParser) -> None:
        q.add_argument("--operator", help="who does this, for the event log (default: your login name)")

    cc = callers.add_parser("create", help="create a caller; prints its bearer token once")
    cc.add_argument("id", help="caller id (letters, digits, '.', '_' or '-')")
    cc.add_argument("--role", required=True, choices=("platform", "advisor", "funder", "agency", "admin"))
    cc.add_argument("--platform", help="platform id (role platform)")
    cc.add_argument("--advisor", help="advisor id (role advisor, with --agency)")
    cc.add_argument("--agency", help="agency code (role advisor)")
    cc.add_argument("--funder", help="funder id (role funder)")
    cc.add_argument("--expires-days", type=_number("number of days", MAX_DAYS),
                    help="the token expires after this many days (default: never)")
    operator(cc)
    cc.set_defaults(func=cmd_callers_create)
    cl = callers.add_parser("list", help="callers of the database and of the credentials file")
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(func=cmd_callers_list)
    cr = callers.add_parser("rotate", help="a new token; the old one works for the overlap, then stops")
    cr.add_argument("id")
    cr.add_argument("--overlap-minutes", type=_number("number of minutes", MAX_MINUTES),
                    help="how long the old token keeps working (ENTITLEMENT_CALLER_ROTATION_OVERLAP_MINUTES, default 60)")
    cr.add_argument("--expires-days", type=_number("number of days", MAX_DAYS),
                    help="lifetime of the new token (default: as the current one's)")
    operator(cr)
    cr.set_defaults(func=cmd_callers_rotate)
    cv = callers.add_parser("revoke", help="stop every token of a caller (servers notice within their cache time)")
    cv.add_argument("id")
    cv.add_argument("--reason", help="recorded in the event log")
    operator(cv)
    cv.set_defaults(func=cmd_callers_revoke)

    tls = sub.add_parser("tls", help="TLS certificates").add_subparsers(dest="tls_command", required=True)
    mk = tls.add_parser("make-ca", help="a local test CA, a server certificate for localhost/127.0.0.1 and "
                        "client certificates for platforms (mutual TLS)")
    mk.add_argument("dir")
    mk.add_argument("--client", action="append", metavar="CALLER_ID",
                    help="a client certificate naming this caller (repeatable; default platform-openclassrooms)")
    mk.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    mk.set_defaults(func=cmd_tls_make_ca)

    privacy = sub.add_parser("privacy", help="personal data retention").add_subparsers(
        dest="privacy_command", required=True)
    pg = privacy.add_parser("purge", help="delete personal data older than ENTITLEMENT_RETENTION_DAYS (run daily)",
                            description="Delete personal data older than ENTITLEMENT_RETENTION_DAYS from the database, "
                            "and remove the registry extracts a killed server left spooled in TMPDIR on this machine "
                            "(run it daily on every server machine, as the servers' user, with their TMPDIR).")
    pg.add_argument("--retention-days", type=_number("number of days", MAX_DAYS, integer=True),
                    help="override ENTITLEMENT_RETENTION_DAYS (default 1095)")
    pg.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    operator(pg)
    pg.set_defaults(func=cmd_privacy_purge)

    from entitlement import audit_cli
    audit_cli.add_commands(sub)

    from entitlement import client_cli
    client_cli.add_commands(sub, programs)
    return p


def _database_failure(exc: Exception) -> str | None:
    """One line for an error the database raised, None for any other (entitlement/storage/db.py)."""
    from entitlement.storage.db import describe_failure
    url = os.environ.get("ENTITLEMENT_DATABASE_URL", "").strip() or Settings().database_url
    return describe_failure(exc, url)


def main(argv: list[str] | None = None) -> int:
    """Every command's entry. Its output piped into a reader that stops early (`entitlement events
    | head -1`): quiet, as other Unix tools, and exit code 141 (128 + SIGPIPE), not a
    BrokenPipeError traceback (Python docs, "Note on SIGPIPE")."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
    except BrokenPipeError:
        try:  # what is still buffered goes nowhere at exit instead of failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # stdout without a file descriptor (embedded, tests): nothing is flushed to one
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except SystemExit as exc:
        if isinstance(exc.code, str):
            return _fail(exc.code)
        raise
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a database down or misnamed: one line, not a traceback
        message = _database_failure(exc)
        if message is None:
            raise
        return _fail(message)



if __name__ == "__main__":
    raise SystemExit(main())
