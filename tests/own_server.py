"""A server of a test's own: a fresh database (of the session's backend), its own registry, its own
clock. For tests that must not touch the shared harness: importing a new registry snapshot,
running the jobs over every activation, stopping the server.

Its registry holds LEDGER_PEOPLE people `L0000001`, ... born in 2002 (so under 26), living in Paris,
registered since 2024 in category 1: eligible to premium-job-seekers and, with a mentor, to
opencfa-apprentices.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import create_pg_database, drop_pg_database
from support import CALLERS, TODAY, Harness

from entitlement import app, registry
from entitlement.callers import write_callers
from entitlement.clock import FixedClock
from entitlement.config import ROOT, Settings
from entitlement.server_main import start
from entitlement.storage.migrate import upgrade
from entitlement.synthetic import COLUMNS

LEDGER_PEOPLE = 1000  # people the whole run takes, one by one (next_ledger_person), across every own server
Person = tuple[str, str, str, str, str]  # birth, postal code, registered, ended ("" = open), category

_counter = itertools.count(1)
_lock = threading.Lock()


def person(i: int) -> tuple[str, dt.date]:
    return f"L{i:07d}", dt.date(2002, 1, 1) + dt.timedelta(days=i)


def next_ledger_person() -> tuple[str, dt.date]:
    """A person of the own servers' registry that no other test of this run has used."""
    with _lock:
        i = next(_counter)
    assert i <= LEDGER_PEOPLE, "own-server registry exhausted: raise LEDGER_PEOPLE"
    return person(i)


def default_people() -> dict[str, Person]:
    people = {}
    for i in range(1, LEDGER_PEOPLE + 1):
        agency_id, birth = person(i)
        people[agency_id] = (birth.isoformat(), "75011", "2024-01-15", "", "1")
    return people


def write_registry(path: Path, people: dict[str, Person]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for ident, (birth, postal, reg, end, cat) in people.items():
            w.writerow({"identifiant": ident, "nom": "Ledger", "prenom": "Person", "dateNaissance": birth,
                        "codePostal": postal, "dateInscription": reg, "dateCessationInscription": end,
                        "codeCategorieInscription": cat})
    return path


@contextmanager
def own_server(backend: str, root: Path, request: pytest.FixtureRequest, *,
               people: dict[str, Person] | None = None, watch_poll_ms: int = 100,
               make_channel: Callable[[int], grpc.Channel] | None = None,
               server_url: Callable[[str], str] | None = None, import_registry: bool = True,
               **overrides: Any) -> Iterator[Harness]:
    """The real server on a fresh database of `backend`, over a real channel (`make_channel(port)`,
    plaintext by default); `overrides` replace Settings fields (TLS, rate limits, ...). The server
    reaches its database at `server_url(url)` when given (a fault-injecting proxy, tests/tcp_proxy.py);
    the harness's `url` stays the direct one."""
    root.mkdir(parents=True, exist_ok=True)
    admin, pg_name = None, None
    if backend == "sqlite":
        url = f"sqlite:///{root / 'own.db'}"
    else:
        admin = request.getfixturevalue("pg_server")
        pg_name, url = create_pg_database(admin)
    settings = Settings(
        listen="127.0.0.1:0", database_url=url, programs_dir=ROOT / "programs",
        callers_file=root / "callers.json", key_dir=root / "keys", pseudonym_key_file=root / "pseudonym.key",
        issuer="urn:entitlement:test", token_ttl_days=30, max_workers=8, grace_seconds=2,
        watch_poll_ms=watch_poll_ms)
    settings = dataclasses.replace(settings, **overrides)
    if server_url is not None:
        settings = dataclasses.replace(settings, database_url=server_url(url))
    upgrade(url)
    tokens = write_callers(settings.callers_file, CALLERS)
    # In the settings' time zone, as the server's own clock (SystemClock(settings.timezone)).
    clock = FixedClock(dt.datetime.combine(TODAY, dt.time(10, 0), tzinfo=dt.timezone.utc), settings.timezone)
    ctx = app.build(settings, clock=clock, create_secrets=True)
    if import_registry:  # (without: an empty event log)
        extract = write_registry(root / "registry.csv", people if people is not None else default_people())
        registry.import_extract(ctx.db, ctx.pseudo, clock, extract, extracted_on=TODAY - dt.timedelta(days=1))
    running = start(ctx, settings.listen)
    channel = make_channel(running.port) if make_channel else grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Harness(backend=backend, url=url, ctx=ctx, running=running, channel=channel, tokens=tokens,
                      clock=clock, log_path=root / "server.log")
    finally:
        channel.close()
        running.stop(0)
        ctx.db.dispose()
        if admin and pg_name:
            drop_pg_database(admin, pg_name)


@contextmanager
def on_day(h: Harness, day: dt.date) -> Iterator[None]:
    """Set the server's clock to `day` (same time of day), and always put it back."""
    delta = dt.timedelta(days=(day - h.clock.today()).days)
    h.clock.advance(delta)
    try:
        yield
    finally:
        h.clock.advance(-delta)


