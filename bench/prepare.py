"""Data the servers serve, prepared by the orchestrating process (no gRPC here): secrets and the
callers file, the synthetic registry extract, and one migrated, imported database per backend."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.common import pg_url, say
from bench.config import ADVISOR_ID, FUNDER_CALLER_ID, FUNDER_ID, NOW, PLATFORM_CALLER_ID, PLATFORM_ID, TODAY
from entitlement import registry, synthetic
from entitlement.callers import Caller, write_callers
from entitlement.clock import FixedClock
from entitlement.pseudonym import Pseudonymizer
from entitlement.registry import ExtractError
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.tokens import KeyStore

CALLERS = [
    Caller(id=ADVISOR_ID, role="advisor", advisor_id="A0001", agency_code="75011"),
    Caller(id=PLATFORM_CALLER_ID, role="platform", platform_id=PLATFORM_ID),
    Caller(id=FUNDER_CALLER_ID, role="funder", funder_id=FUNDER_ID),
]


@dataclass(frozen=True)
class Common:
    """What every backend shares: files under the temp dir, tokens, and the people to ask about."""

    tmp: Path
    callers_file: Path
    key_dir: Path
    pseudonym_key_file: Path
    extract: Path
    tokens: dict[str, str]                # caller id -> bearer token
    people: list[tuple[str, dt.date]]     # every row of the extract: (agency id, birth date)
    candidates: list[tuple[str, dt.date]]  # rows likely eligible to PROGRAM today (the server decides)


def prepare_common(tmp: Path, people_count: int) -> Common:
    callers_file, key_dir, pseudo_file = tmp / "callers.json", tmp / "keys", tmp / "pseudonym.key"
    tokens = write_callers(callers_file, CALLERS)
    KeyStore.load(key_dir, create=True)
    Pseudonymizer.from_file(pseudo_file, create=True)
    extract = tmp / "registry.csv"
    synthetic.write(extract, people_count)
    people, candidates = [], []
    for row in synthetic.rows(people_count):
        birth = dt.date.fromisoformat(row["dateNaissance"])
        people.append((row["identifiant"], birth))
        # A cheap pre-filter (registered, category 1-5, registration running today); whether an
        # activation is granted is the server's decision, made by the real RPC when seeding.
        ended = row["dateCessationInscription"]
        if (row["codeCategorieInscription"] in {"1", "2", "3", "4", "5"} and dt.date.fromisoformat(row["dateInscription"]) <= TODAY
                and (not ended or dt.date.fromisoformat(ended) > TODAY)):
            candidates.append((row["identifiant"], birth))
    return Common(tmp, callers_file, key_dir, pseudo_file, extract, tokens, people, candidates)


def pg_problem(admin_url: str) -> str | None:
    """None when PostgreSQL answers at admin_url, else the first line of the error."""
    try:
        with psycopg.connect(admin_url, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def database(backend: str, common: Common, pg_admin_url: str) -> Iterator[str]:
    """An empty database for `backend` (a SQLite file in the temp dir, or a throwaway PostgreSQL
    database `entitlement_bench_<random>` dropped on exit); yields its URL."""
    if backend == "sqlite":
        yield f"sqlite:///{common.tmp / 'entitlement.db'}"
        return
    name = f"entitlement_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url(pg_admin_url, name)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def imported_database(backend: str, common: Common, pg_admin_url: str, label: str) -> Iterator[str]:
    """`database`, migrated and with the synthetic extract imported (migrate_and_import), said so
    under `label` (the benchmark's name); yields its URL."""
    t = time.monotonic()
    with database(backend, common, pg_admin_url) as url:
        summary = migrate_and_import(url, common)
        say(f"{label}: {backend}: migrated, {summary.rows_imported:,} people imported ({time.monotonic() - t:.1f} s)")
        yield url


def migrate_and_import(url: str, common: Common) -> registry.ImportSummary:
    """Schema at head, then the synthetic extract imported as the current registry snapshot."""
    upgrade(url)
    db = Database(url, pool_size=2)
    try:
        summary = registry.import_extract(db, Pseudonymizer.from_file(common.pseudonym_key_file), FixedClock(NOW),
                                          common.extract, extracted_on=TODAY - dt.timedelta(days=1))
    except ExtractError as exc:
        raise SystemExit(f"benchmark registry extract: {exc}") from None
    finally:
        db.dispose()
    if summary.rows_rejected:
        raise SystemExit(f"benchmark registry extract: {summary.rows_rejected} rows rejected")
    return summary
