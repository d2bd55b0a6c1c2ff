"""structlog set-up: one JSON object per line on stderr, with the request context bound by the
access-log interceptor. Log lines carry ids of staff and resources, pseudonyms of job seekers,
never a name, birth date or agency identifier."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _add_pid(_logger: object, _name: str, event: dict[str, object]) -> dict[str, object]:
    """Which server process wrote the line (several may share a port: ENTITLEMENT_PROCESSES)."""
    event["pid"] = os.getpid()
    return event


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    if level not in LEVELS:
        raise SystemExit(f"ENTITLEMENT_LOG_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_pid,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        # Loggers are cached for speed, except when a stream is given (tests reconfigure per server).
        cache_logger_on_first_use=stream is None,
    )
