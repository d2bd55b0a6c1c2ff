"""Every setting of the service, read once from the environment with a documented default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


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
    max_workers: int = 16
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
            token_ttl_days=_int("ENTITLEMENT_TOKEN_TTL_DAYS", d.token_ttl_days),
            max_workers=_int("ENTITLEMENT_MAX_WORKERS", d.max_workers),
            grace_seconds=_int("ENTITLEMENT_GRACE_SECONDS", d.grace_seconds),
            log_level=_env("ENTITLEMENT_LOG_LEVEL", d.log_level),
            timezone=_env("ENTITLEMENT_TIMEZONE", d.timezone),
            live_status_url=_env("ENTITLEMENT_LIVE_STATUS_URL", d.live_status_url),
            live_status_token=_env("ENTITLEMENT_LIVE_STATUS_TOKEN", d.live_status_token),
            live_status_timeout_ms=_int("ENTITLEMENT_LIVE_STATUS_TIMEOUT_MS", d.live_status_timeout_ms),
            live_status_retries=_int("ENTITLEMENT_LIVE_STATUS_RETRIES", d.live_status_retries),
            live_status_breaker_failures=_int("ENTITLEMENT_LIVE_STATUS_BREAKER_FAILURES",
                                              d.live_status_breaker_failures),
            live_status_breaker_reset_s=_int("ENTITLEMENT_LIVE_STATUS_BREAKER_RESET_S",
                                             d.live_status_breaker_reset_s),
            watch_poll_ms=_int("ENTITLEMENT_WATCH_POLL_MS", d.watch_poll_ms),
            watch_max_streams=_int("ENTITLEMENT_WATCH_MAX_STREAMS", d.watch_max_streams),
        )
