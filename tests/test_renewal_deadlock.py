"""PostgreSQL: re-activating people whose live activation is past its end date (the settlement job
has not expired it yet: the activation expires it first) while others are activated in the same
program. The expiry took the event log's head before the program's counter row, every other
activation takes them the other way round: they deadlocked (UNAVAILABLE to the callers, a second's
stall each; found by a review). The counter row is now taken first."""

from __future__ import annotations

import collections
import datetime as dt
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import create_pg_database, drop_pg_database
from support import CALLERS, TODAY, make_registry_file, pool_birth

from entitlement import activation, app, doctor, registry
from entitlement.callers import write_callers
from entitlement.clock import FixedClock
from entitlement.config import ROOT, Settings
from entitlement.eligibility import JobSeeker
from entitlement.storage.migrate import upgrade

SHORT = "one-month-test"
SHORT_YAML = f"""
id: {SHORT}
title: One month (test)
tier: premium
period: {{start: 2015-09-01, end: null}}
criteria: [registered, category_covered, registration_active]
parameters:
  months_after_registration_end: {{values: {{2015-09-01: {{value: 1, reference: "x"}}}}}}
  categories: {{values: {{2015-09-01: {{value: [1, 2, 3, 4, 5], reference: "x"}}}}}}
  price_per_month_cents: {{values: {{2015-09-01: {{value: 2000, reference: "x"}}}}}}
  activation_months: {{values: {{2015-09-01: {{value: 1, reference: "x"}}}}}}
  funders: {{values: {{2015-09-01: {{value: {{ministry-of-labour: 5000, france-travail: 5000}}, reference: "x"}}}}}}
"""


def test_renewals_past_the_end_date_beside_other_activations_do_not_deadlock(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend[0] == "sqlite":
        pytest.skip("SQLite has one writer at a time: its transactions never hold row locks in turn")
    admin = request.getfixturevalue("pg_server")
    name, url = create_pg_database(admin)
    programs = tmp_path / "programs"
    shutil.copytree(ROOT / "programs", programs)
    (programs / f"{SHORT}.yaml").write_text(SHORT_YAML)
    settings = Settings(listen="127.0.0.1:0", database_url=url, programs_dir=programs,
                        callers_file=tmp_path / "callers.json", key_dir=tmp_path / "keys",
                        pseudonym_key_file=tmp_path / "pseudonym.key", issuer="urn:entitlement:test",
                        token_ttl_days=30, max_workers=16, grace_seconds=2)
    upgrade(url)
    write_callers(settings.callers_file, CALLERS)
    clock = FixedClock(dt.datetime.combine(TODAY, dt.time(10, 0), tzinfo=dt.timezone.utc))
    ctx = app.build(settings, clock=clock, create_secrets=True)
    try:
        registry.import_extract(ctx.db, ctx.pseudo, clock, make_registry_file(tmp_path / "registry.csv"),
                                extracted_on=TODAY - dt.timedelta(days=1))
        adv = next(c for c in CALLERS if c.id == "advisor-paris")

        def act(i: int) -> str:
            person = JobSeeker(f"P{i:07d}", pool_birth(i))
            try:
                activation.activate(ctx, adv, activation.ActivateCommand(person, SHORT, "openclassrooms", "t"))
                return "OK"
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test counts
                return type(getattr(exc, "orig", None) or exc).__name__
        renewed = range(1, 16)
        assert [act(i) for i in renewed] == ["OK"] * len(renewed)
        clock.advance(dt.timedelta(days=40))  # past the one-month end date; no settlement job ran
        fresh = iter(range(100, 200))
        with ThreadPoolExecutor(8) as pool:
            futures = []
            for i in renewed:  # each renewal among three fresh activations
                futures.append(pool.submit(act, i))
                futures.extend(pool.submit(act, next(fresh)) for _ in range(3))
            outcomes = collections.Counter(f.result() for f in futures)
        assert outcomes == {"OK": len(futures)}, outcomes
        assert not doctor.check(ctx.db)
    finally:
        ctx.db.dispose()
        drop_pg_database(admin, name)
