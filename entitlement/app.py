"""The service's dependencies, built once at start and shared by the use cases."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from entitlement.callers import CallerDirectory, Directory
from entitlement.clock import Clock, SystemClock
from entitlement.config import Settings
from entitlement.live_status import LiveStatusClient
from entitlement.logtree import load_signer
from entitlement.note import Signer
from entitlement.programs import ProgramCatalog
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.migrate import ensure_current
from entitlement.tokens import KeyStore


@dataclass(frozen=True)
class Context:
    settings: Settings
    db: Database
    catalog: ProgramCatalog
    keys: KeyStore
    pseudo: Pseudonymizer
    callers: Directory  # the credentials file and the caller_credentials table (entitlement/callers.py)
    clock: Clock
    live: LiveStatusClient | None = None  # the agency's live status source, when configured
    # Signs the event log's checkpoints (entitlement/logtree.py); None when no key file exists.
    log_signer: Signer | None = None


LIVE_STATUS_BACKOFF_BASE_S = 0.05  # first retry waits up to 50 ms, the second up to 100 ms, ...


def live_status_client(settings: Settings) -> LiveStatusClient | None:
    """The live status client of the settings, or None when no URL is configured."""
    if not settings.live_status_url:
        return None
    try:
        return LiveStatusClient(
            settings.live_status_url, timeout_s=settings.live_status_timeout_ms / 1000,
            retries=settings.live_status_retries, backoff_base_s=LIVE_STATUS_BACKOFF_BASE_S,
            breaker_failures=settings.live_status_breaker_failures,
            breaker_reset_s=settings.live_status_breaker_reset_s, bearer_token=settings.live_status_token,
            insecure=settings.insecure)
    except ValueError as exc:
        raise SystemExit(f"ENTITLEMENT_LIVE_STATUS_*: {exc}") from None


SQLITE_CHECKPOINT_EVERY_S = 0.25


def build(settings: Settings, *, clock: Clock | None = None, create_secrets: bool = False) -> Context:
    """Load and check everything the server needs; raise SystemExit with the fix when something is
    missing (bad program file, unmigrated database, missing key)."""
    catalog = ProgramCatalog.load(settings.programs_dir)
    # One connection per thread that may hold one: the two pools', and the event loop's thread
    # (the event-loop server model runs CheckEligibility's caller lookup there).
    db = Database(settings.database_url, pool_size=settings.max_workers + settings.stream_workers + 1,
                  lock_timeout_ms=settings.db_lock_timeout_ms, statement_timeout_ms=settings.db_statement_timeout_ms,
                  connect_timeout_s=settings.db_connect_timeout_s,
                  # SQLite: WAL checkpoints off the commits' path (entitlement/storage/db.py).
                  checkpoint_every_s=SQLITE_CHECKPOINT_EVERY_S,
                  # PostgreSQL: the planner's statistics kept current (entitlement/storage/pgstats.py).
                  analyze_every_s=settings.db_analyze_every_s)
    try:
        return _context(settings, db, catalog, clock, create_secrets)
    except BaseException:
        db.dispose()  # its pools and checkpoint thread go with the failed start
        raise


def _context(settings: Settings, db: Database, catalog: ProgramCatalog, clock: Clock | None,
             create_secrets: bool) -> Context:
    ensure_current(db)
    clock = clock or SystemClock(settings.timezone)
    # The credentials file is optional once callers are managed in the database.
    callers = Directory(CallerDirectory.load(settings.callers_file) if settings.callers_file.exists()
                        else CallerDirectory.empty(), db, clock.now, ttl_seconds=settings.caller_cache_seconds)
    shared = callers.shared_ids()
    if shared:
        raise SystemExit(f"caller id(s) {', '.join(shared)} in both the credentials file {settings.callers_file} "
                         "and the database (`entitlement callers list`): one id would be two callers. Give the "
                         "file's callers other ids (ids of the database are never reused, even revoked)")
    return Context(
        settings=settings,
        db=db,
        catalog=catalog,
        # Re-read on use when the folder changes (entitlement/tokens.py): rotation needs no restart.
        keys=KeyStore.load(settings.key_dir, create=create_secrets, now=clock.now(),
                           token_ttl=dt.timedelta(days=settings.token_ttl_days)),
        pseudo=Pseudonymizer.from_file(settings.pseudonym_key_file, create=create_secrets),
        callers=callers,
        clock=clock,
        live=live_status_client(settings),
        log_signer=load_signer(settings.log_key_path, settings.log_origin, create=create_secrets),
    )
