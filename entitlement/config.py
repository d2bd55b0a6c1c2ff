"""Every setting of the service, read once from the environment with a documented default."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from entitlement import affinity

ROOT = Path(__file__).resolve().parent.parent
SERVER_MODELS = ("auto", "threads", "event-loop")  # Settings.server_model
AUTO, THREADS, EVENT_LOOP = SERVER_MODELS
EVENT_LOOPS = ("auto", "uvloop", "asyncio")  # Settings.event_loop (the event-loop model's loop)
LOOP_WRITES = ("auto", "off")  # Settings.loop_writes
AUTO_LOOP, UVLOOP, ASYNCIO = EVENT_LOOPS


class EventLoopUnavailable(Exception):
    """ENTITLEMENT_EVENT_LOOP asks for a loop this installation does not have."""


def resolve_event_loop(setting: str) -> str:
    """The loop ENTITLEMENT_EVENT_LOOP gives the event-loop model (README "Server models"):
    `uvloop` (libuv's loop, in Cython) for `auto` where it is installed, `asyncio` (the standard
    library's) for `asyncio` or where uvloop is not; `uvloop` asked for but not installed raises
    EventLoopUnavailable (server.py refuses to start)."""
    if setting not in EVENT_LOOPS:
        raise ValueError(f"event loop setting must be one of {', '.join(EVENT_LOOPS)}, got {setting!r}")
    if setting == ASYNCIO:
        return ASYNCIO
    try:
        importlib.import_module("uvloop")
    except ImportError:
        if setting == UVLOOP:
            raise EventLoopUnavailable("ENTITLEMENT_EVENT_LOOP is uvloop, but uvloop is not installed "
                                       "(pip install uvloop; it has no Windows build): set it to auto or asyncio") from None
        return ASYNCIO
    return UVLOOP


def resolve_server_model(setting: str, sqlite: bool) -> str:
    """The server model a setting gives (README "Server models"): `auto` is the event loop on SQLite
    (its reads are local: answered on the loop) and the thread pool on PostgreSQL (every read is a
    network round trip, which must not stop a loop)."""
    if setting == AUTO:
        return EVENT_LOOP if sqlite else THREADS
    return setting
DEFAULT_CHECK_RATE_PER_MIN = 120  # the server's (from_env) default; see Settings.check_rate_per_min


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _bool(name: str, default: bool) -> bool:
    raw = _env(name, "1" if default else "0").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 1 or 0, got {raw!r}")


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _env(name, default).lower()
    if value not in allowed:
        raise SystemExit(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


# Upper bounds of durations (settings and command-line arguments): beyond them a date computed from
# one leaves the calendar (OverflowError), and no policy needs that long.
MAX_DAYS = 36500  # 100 years
MAX_HOURS = 87600  # 10 years
MAX_MINUTES = 5256000  # 10 years
# PostgreSQL's lock_timeout and statement_timeout, and libpq's tcp_user_timeout (ms), are 32-bit:
# beyond, every connection is refused ("invalid value for parameter").
PG_MAX_MS = 2_147_483_647
# gRPC's counts and its keepalive times in milliseconds are C ints too (beyond: OverflowError at start).
C_INT_MAX = 2_147_483_647
MAX_THREADS = 10_000  # per pool: 8 call slots per thread stay within a C int (ENTITLEMENT_MAX_CONCURRENT_RPCS)
MAX_INTERVAL_MS = 86_400_000  # a day: the polls, pings and timeouts in ms (beyond, waits overflow time_t)


MAX_PROCESSES = 256  # server processes on one port (ENTITLEMENT_PROCESSES)


def _int(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SystemExit(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SystemExit(f"{name} must be at most {maximum}, got {value}")
    return value


def _timezone(name: str, default: str) -> str:
    value = _env(name, default)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise SystemExit(f"{name} must be a time zone of the IANA database (e.g. Europe/Paris, UTC), "
                         f"got {value!r}") from None
    return value


@dataclass(frozen=True)
class Settings:
    """Documented in README.md ("Configuration"); keep both in step."""

    listen: str = "127.0.0.1:50051"
    database_url: str = f"sqlite:///{ROOT / 'var' / 'entitlement.db'}"
    programs_dir: Path = ROOT / "programs"
    callers_file: Path = ROOT / "var" / "callers.json"
    key_dir: Path = ROOT / "var" / "keys"
    pseudonym_key_file: Path = ROOT / "var" / "secrets" / "pseudonym.key"
    issuer: str = "urn:entitlement"
    token_ttl_days: int = 30
    max_workers: int = 4  # threads for the unary calls (entitlement/server_main.py: fewer fight less over the GIL)
    import_idle_seconds: int = 60  # ImportExtract: the longest wait for the extract's next chunk (then ABORTED)
    stream_workers: int = 8  # threads for streaming calls (change streams, log streams, imports), apart
    # Calls a server process accepts at once, queued ones included (beyond: RESOURCE_EXHAUSTED from
    # gRPC itself); 0: 8 per thread of the two pools (entitlement/server_main.py).
    max_concurrent_rpcs: int = 0
    processes: int = 1
    # auto | threads | event-loop (entitlement/server_main.py, entitlement/aio_server.py; README
    # "Server models"): auto is the event loop on SQLite and the thread pool on PostgreSQL.
    server_model: str = "auto"
    # auto | uvloop | asyncio: the event-loop model's loop (entitlement/aio_server.py `new_event_loop`;
    # README "Server models"): auto is uvloop where it is installed (a dependency everywhere but
    # Windows), else the standard library's. The thread-pool model runs no loop.
    event_loop: str = "auto"
    # auto | off: on SQLite, the event-loop model runs an activation's and a redemption's write on the
    # loop itself when nothing would make it wait (entitlement/aio_server.py `_loop_write`; README
    # "Server models"); off: always in the pool, as every other write.
    loop_writes: str = "auto"
    # auto | off | a list of CPUs: pin each server process to one CPU (entitlement/affinity.py).
    cpu_affinity: affinity.Setting = affinity.AUTO
    grace_seconds: int = 10
    log_level: str = "info"
    timezone: str = "Europe/Paris"
    # The agency's live status source (entitlement/live_status.py); empty URL: snapshots only.
    live_status_url: str = ""
    live_status_token: str = ""  # sent as "Authorization: Bearer ..." when set
    live_status_timeout_ms: int = 800  # per attempt
    live_status_retries: int = 2  # retries after the first attempt (timeouts, connection errors, 5xx)
    live_status_breaker_failures: int = 5  # consecutive failed lookups that open the circuit breaker
    live_status_breaker_reset_s: int = 30  # how long it stays open before one probe is let through
    watch_poll_ms: int = 500  # how often a WatchEntitlementChanges stream reads the event log
    watch_max_streams: int = 4  # change streams served at once per process (each holds a worker)
    watch_max_per_caller: int = 2  # of those, held by one caller at once (one platform cannot take them all)
    public_streams: int = 8  # open Health.Watch / reflection streams per process, each (entitlement/api/public.py)
    # HTTP/2 keepalive pings to clients with calls open: a connection that answers none within the
    # timeout is closed, ending its calls (a change stream's slot, a push holding the import) instead
    # of leaving them to the kernel's TCP keepalive, about two hours.
    keepalive_seconds: int = 60
    keepalive_timeout_seconds: int = 20
    # Transport (README "Security"): TLS with this certificate and key; with a client CA, mutual TLS.
    # Without TLS the server only listens on loopback addresses, unless insecure is set.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    insecure: bool = False
    # Callers managed in the database (entitlement/callers.py): token lookups are cached this long
    # (a revocation takes effect within it); a rotated token keeps working for the overlap.
    caller_cache_seconds: int = 10
    caller_rotation_overlap_minutes: int = 60
    # Per-caller token bucket on CheckEligibility and ActivateEntitlement (entitlement/api/ratelimit.py).
    # 0 = no limit. The environment's default is 120 a minute (from_env); Settings built by hand
    # (tests, benchmarks, embedding) have no limit unless they ask for one.
    check_rate_per_min: int = 0
    check_burst: int = 20
    retention_days: int = 1095  # personal data kept this long (`entitlement privacy purge`)
    # The event log's checkpoints (entitlement/logtree.py): the origin line naming the log (also the
    # signing key's name), and the Ed25519 key that signs them, its own key (never a token key).
    # Empty file setting: log.key beside the pseudonym key (var/secrets/log.key by default).
    log_origin: str = "entitlement.local/audit-log"
    log_key_file: str = ""
    # Database outages (entitlement/dbhealth.py, entitlement/storage/db.py; README "Database outage").
    # Every wait on the database is bounded, so a call answers UNAVAILABLE instead of hanging:
    # - db_lock_timeout_ms: the longest wait for a lock. SQLite: the busy timeout of the write lock
    #   (also capped by the call's remaining deadline, so the caller gets UNAVAILABLE before its
    #   deadline); PostgreSQL: lock_timeout. 0 = no bound (on SQLite, but the call's deadline).
    # - db_statement_timeout_ms: PostgreSQL statement_timeout; 0 = none (the default: one statement of
    #   a large registry import may legitimately run for minutes).
    # - db_connect_timeout_s: PostgreSQL connect_timeout (libpq: whole seconds, at least 2), also the
    #   TCP user timeout and keepalive time, so a silent network fails a call instead of hanging it.
    # - db_ping_ms: how often the health monitor pings the database (health goes NOT_SERVING after a
    #   failed ping, back to SERVING after a good one; while NOT_SERVING, calls that need the
    #   database answer UNAVAILABLE at once); 0 = no monitor (health stays SERVING). A call meeting
    #   an outage makes it ping at once. Recovery is noticed within about one interval.
    # - db_ping_timeout_ms: a ping that has not answered within this is a failed ping, unless the
    #   database answered this process's calls after it was sent; a monitor that woke late (the
    #   process stood still) waits as long again, at most this (entitlement/dbhealth.py).
    # - db_analyze_every_s: PostgreSQL only; how often a server process ANALYZEs the tables that changed
    #   by more than autovacuum's threshold since their last analyze (entitlement/storage/pgstats.py:
    #   plans made on stale statistics were measured 10 to 500 times slower); 0 = never (autovacuum's
    #   business alone).
    # Settings built by hand (tests, benchmarks) keep these defaults. The command-line tools'
    # own Database objects (migrations, doctor, imports, jobs) keep theirs: a 30 s SQLite lock wait,
    # no PostgreSQL timeouts.
    db_lock_timeout_ms: int = 5000
    db_statement_timeout_ms: int = 0
    db_connect_timeout_s: int = 3
    db_ping_ms: int = 1000
    db_ping_timeout_ms: int = 2000
    db_analyze_every_s: int = 30

    @property
    def log_key_path(self) -> Path:
        return Path(self.log_key_file) if self.log_key_file else self.pseudonym_key_file.parent / "log.key"

    @classmethod
    def from_env(cls) -> "Settings":
        d = cls()
        return cls(
            listen=_env("ENTITLEMENT_LISTEN", d.listen),
            database_url=_env("ENTITLEMENT_DATABASE_URL", d.database_url),
            programs_dir=Path(_env("ENTITLEMENT_PROGRAMS_DIR", str(d.programs_dir))),
            callers_file=Path(_env("ENTITLEMENT_CALLERS_FILE", str(d.callers_file))),
            key_dir=Path(_env("ENTITLEMENT_KEY_DIR", str(d.key_dir))),
            pseudonym_key_file=Path(_env("ENTITLEMENT_PSEUDONYM_KEY_FILE", str(d.pseudonym_key_file))),
            issuer=_env("ENTITLEMENT_ISSUER", d.issuer),
            token_ttl_days=_int("ENTITLEMENT_TOKEN_TTL_DAYS", d.token_ttl_days, minimum=1, maximum=MAX_DAYS),
            max_workers=_int("ENTITLEMENT_MAX_WORKERS", d.max_workers, minimum=1, maximum=MAX_THREADS),
            stream_workers=_int("ENTITLEMENT_STREAM_WORKERS", d.stream_workers, minimum=1,
                                  maximum=MAX_THREADS),
            import_idle_seconds=_int("ENTITLEMENT_IMPORT_IDLE_SECONDS", d.import_idle_seconds, minimum=1,
                                     maximum=86_400),
            max_concurrent_rpcs=_int("ENTITLEMENT_MAX_CONCURRENT_RPCS", d.max_concurrent_rpcs, minimum=0,
                                       maximum=C_INT_MAX),
            # (at most MAX_PROCESSES: a mistyped count forked that many servers, each with its pools)
            processes=_int("ENTITLEMENT_PROCESSES", d.processes, minimum=1, maximum=MAX_PROCESSES),
            server_model=_choice("ENTITLEMENT_SERVER_MODEL", d.server_model, SERVER_MODELS),
            event_loop=_choice("ENTITLEMENT_EVENT_LOOP", d.event_loop, EVENT_LOOPS),
            loop_writes=_choice("ENTITLEMENT_LOOP_WRITES", d.loop_writes, LOOP_WRITES),
            cpu_affinity=affinity.parse(_env(affinity.ENV, str(d.cpu_affinity))),
            grace_seconds=_int("ENTITLEMENT_GRACE_SECONDS", d.grace_seconds, minimum=0),
            log_level=_env("ENTITLEMENT_LOG_LEVEL", d.log_level),
            timezone=_timezone("ENTITLEMENT_TIMEZONE", d.timezone),
            live_status_url=_env("ENTITLEMENT_LIVE_STATUS_URL", d.live_status_url),
            live_status_token=_env("ENTITLEMENT_LIVE_STATUS_TOKEN", d.live_status_token),
            live_status_timeout_ms=_int("ENTITLEMENT_LIVE_STATUS_TIMEOUT_MS", d.live_status_timeout_ms, minimum=1,
                                          maximum=MAX_INTERVAL_MS),
            live_status_retries=_int("ENTITLEMENT_LIVE_STATUS_RETRIES", d.live_status_retries, minimum=0),
            live_status_breaker_failures=_int("ENTITLEMENT_LIVE_STATUS_BREAKER_FAILURES",
                                              d.live_status_breaker_failures, minimum=1),
            live_status_breaker_reset_s=_int("ENTITLEMENT_LIVE_STATUS_BREAKER_RESET_S",
                                             d.live_status_breaker_reset_s, minimum=1),
            watch_poll_ms=_int("ENTITLEMENT_WATCH_POLL_MS", d.watch_poll_ms, minimum=1, maximum=MAX_INTERVAL_MS),
            watch_max_streams=_int("ENTITLEMENT_WATCH_MAX_STREAMS", d.watch_max_streams, minimum=1),
            watch_max_per_caller=_int("ENTITLEMENT_WATCH_MAX_PER_CALLER", d.watch_max_per_caller, minimum=1),
            public_streams=_int("ENTITLEMENT_PUBLIC_STREAMS", d.public_streams, minimum=1),
            keepalive_seconds=_int("ENTITLEMENT_KEEPALIVE_SECONDS", d.keepalive_seconds, minimum=1,
                                   maximum=C_INT_MAX // 1000),
            keepalive_timeout_seconds=_int("ENTITLEMENT_KEEPALIVE_TIMEOUT_SECONDS", d.keepalive_timeout_seconds,
                                           minimum=1, maximum=C_INT_MAX // 1000),
            tls_cert_file=_env("ENTITLEMENT_TLS_CERT_FILE", d.tls_cert_file),
            tls_key_file=_env("ENTITLEMENT_TLS_KEY_FILE", d.tls_key_file),
            tls_client_ca_file=_env("ENTITLEMENT_TLS_CLIENT_CA_FILE", d.tls_client_ca_file),
            insecure=_bool("ENTITLEMENT_INSECURE", d.insecure),
            caller_cache_seconds=_int("ENTITLEMENT_CALLER_CACHE_SECONDS", d.caller_cache_seconds, minimum=0),
            caller_rotation_overlap_minutes=_int("ENTITLEMENT_CALLER_ROTATION_OVERLAP_MINUTES",
                                                 d.caller_rotation_overlap_minutes, minimum=0, maximum=MAX_MINUTES),
            check_rate_per_min=_int("ENTITLEMENT_CHECK_RATE_PER_MIN", DEFAULT_CHECK_RATE_PER_MIN, minimum=0),
            check_burst=_int("ENTITLEMENT_CHECK_BURST", d.check_burst, minimum=1),
            retention_days=_int("ENTITLEMENT_RETENTION_DAYS", d.retention_days, minimum=1, maximum=MAX_DAYS),
            log_origin=_env("ENTITLEMENT_LOG_ORIGIN", d.log_origin),
            log_key_file=_env("ENTITLEMENT_LOG_KEY_FILE", d.log_key_file),
            db_lock_timeout_ms=_int("ENTITLEMENT_DB_LOCK_TIMEOUT_MS", d.db_lock_timeout_ms, minimum=0, maximum=PG_MAX_MS),
            db_statement_timeout_ms=_int("ENTITLEMENT_DB_STATEMENT_TIMEOUT_MS", d.db_statement_timeout_ms,
                                         minimum=0, maximum=PG_MAX_MS),
            db_connect_timeout_s=_int("ENTITLEMENT_DB_CONNECT_TIMEOUT_S", d.db_connect_timeout_s, minimum=2,
                                      maximum=PG_MAX_MS // 1000),
            db_ping_ms=_int("ENTITLEMENT_DB_PING_MS", d.db_ping_ms, minimum=0, maximum=MAX_INTERVAL_MS),
            db_ping_timeout_ms=_int("ENTITLEMENT_DB_PING_TIMEOUT_MS", d.db_ping_timeout_ms, minimum=1,
                                    maximum=MAX_INTERVAL_MS),
            db_analyze_every_s=_int("ENTITLEMENT_DB_ANALYZE_EVERY_S", d.db_analyze_every_s, minimum=0,
                                    maximum=86_400),
        )
