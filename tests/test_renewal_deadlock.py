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

from pg_context import pg_context
from support import CALLERS, pool_birth

from entitlement import activation, doctor
from entitlement.config import ROOT
from entitlement.eligibility import JobSeeker

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
    programs = tmp_path / "programs"
    shutil.copytree(ROOT / "programs", programs)
    (programs / f"{SHORT}.yaml").write_text(SHORT_YAML)
    with pg_context(request.getfixturevalue("pg_server"), tmp_path, programs, max_workers=16) as (ctx, clock):
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
