"""Pure rules: no server, no database (rules.py imports neither)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entitlement import rules
from entitlement.config import ROOT
from entitlement.money import split_cents
from entitlement.programs import ProgramCatalog, ProgramFileError, load_program

PROGRAMS = ProgramCatalog.load(ROOT / "programs")
PREMIUM = PROGRAMS.get("premium-job-seekers")
IDF = PROGRAMS.get("deuxieme-chance-numerique")
assert PREMIUM and IDF


def facts(**kw: object) -> rules.PersonFacts:
    base = dict(birth_date=dt.date(1990, 5, 17), postal_code="75011", registered_on=dt.date(2016, 1, 4),
                registration_ended_on=None, category=1)
    base.update(kw)
    return rules.PersonFacts(**base)  # type: ignore[arg-type]


@st.composite
def shares(draw: st.DrawFn) -> dict[str, int]:
    n = draw(st.integers(1, 6))
    cuts = sorted(draw(st.lists(st.integers(1, 9999), min_size=n - 1, max_size=n - 1, unique=True)))
    bounds = [0, *cuts, 10000]
    return {f"f{i}": bounds[i + 1] - bounds[i] for i in range(n)}


@given(total=st.integers(0, 10**12), parts=shares())
def test_split_adds_up_to_the_cent(total: int, parts: dict[str, int]) -> None:
    out = split_cents(total, parts)
    assert sum(out.values()) == total
    for funder, bp in parts.items():
        assert abs(out[funder] * 10000 - total * bp) < 10000  # within one cent of the exact share


def test_split_is_deterministic_and_fair() -> None:
    assert split_cents(1, {"a": 5000, "b": 5000}) == {"a": 1, "b": 0}
    assert split_cents(100, {"a": 3333, "b": 3333, "c": 3334}) == {"a": 33, "b": 33, "c": 34}
    with pytest.raises(ValueError):
        split_cents(100, {"a": 5000})


@pytest.mark.parametrize("birth,day,age", [
    ("2000-03-16", "2026-03-15", 25), ("2000-03-16", "2026-03-16", 26),
    ("2000-02-29", "2026-02-28", 25), ("2000-02-29", "2026-03-01", 26), ("2000-02-29", "2028-02-29", 28),
])
def test_age(birth: str, day: str, age: int) -> None:
    assert rules.age_on(dt.date.fromisoformat(birth), dt.date.fromisoformat(day)) == age


@pytest.mark.parametrize("start,months,end", [
    ("2026-03-16", 12, "2027-03-15"), ("2026-01-31", 1, "2026-02-27"), ("2024-01-31", 1, "2024-02-28"),
    ("2026-12-01", 1, "2026-12-31"),
])
def test_access_end(start: str, months: int, end: str) -> None:
    assert rules.access_end(dt.date.fromisoformat(start), months) == dt.date.fromisoformat(end)


def test_departments() -> None:
    assert rules.department_of("75011") == "75"
    assert rules.department_of("97400") == "974"
    # Corsica: Corse-du-Sud (2A) below 20200, Haute-Corse (2B) from it, as program files name them.
    assert [rules.department_of(c) for c in ("20000", "20090", "20169", "20200", "20290", "20600")] == \
        ["2A", "2A", "2A", "2B", "2B", "2B"]


def test_a_program_for_corsica_takes_its_residents_and_refuses_department_20(tmp_path: Path) -> None:
    src = (ROOT / "programs" / "opencfa-apprentices.yaml").read_text()
    idf = '["75", "77", "78", "91", "92", "93", "94", "95"]'
    assert idf in src
    path = tmp_path / "opencfa-apprentices.yaml"
    path.write_text(src.replace(idf, '["2A"]'))
    program = load_program(path)
    day = dt.date(2022, 6, 1)
    young = dict(birth_date=dt.date(2000, 1, 1))
    assert "OUTSIDE_REGION" not in rules.evaluate(program, facts(postal_code="20000", **young), day).failed_reasons
    assert "OUTSIDE_REGION" in rules.evaluate(program, facts(postal_code="20200", **young), day).failed_reasons
    path.write_text(src.replace(idf, '["20"]'))
    with pytest.raises(ProgramFileError) as info:
        load_program(path)
    assert "2A" in str(info.value)


def fresh(day: dt.date) -> rules.Circumstances:
    """Registry data extracted on the decision day."""
    return rules.Circumstances(registry_extracted_on=day)


def test_premium_eligible_and_explained() -> None:
    d = rules.evaluate(PREMIUM, facts(), dt.date(2026, 3, 16), fresh(dt.date(2026, 3, 16)))
    assert d.eligible and d.failed_reasons == []
    assert d.funding_plan is not None
    assert d.funding_plan.total_cents == 24000
    assert {f for f, _, _ in d.funding_plan.shares} == {"ministry-of-labour", "france-travail"}
    assert {p.name for p in d.parameters} == {"activation_months", "categories", "funders", "funders_owe",
                                                "max_registry_age_days", "months_after_registration_end",
                                                "price_per_month_cents"}


@pytest.mark.parametrize("kw,day,reason", [
    ({"registered_on": dt.date(2014, 1, 1)}, "2015-08-31", "PROGRAM_NOT_STARTED"),
    ({"category": 6}, "2026-03-16", "CATEGORY_NOT_COVERED"),
    ({"registration_ended_on": dt.date(2026, 3, 16)}, "2026-03-16", "REGISTRATION_ENDED"),
    ({"registered_on": dt.date(2026, 3, 17)}, "2026-03-16", "REGISTRATION_NOT_STARTED"),
])
def test_premium_refusals(kw: dict[str, object], day: str, reason: str) -> None:
    d = rules.evaluate(PREMIUM, facts(**kw), dt.date.fromisoformat(day), fresh(dt.date.fromisoformat(day)))
    assert not d.eligible and d.failed_reasons == [reason] and d.funding_plan is None


def test_registration_ending_tomorrow_is_still_active() -> None:
    d = rules.evaluate(PREMIUM, facts(registration_ended_on=dt.date(2026, 3, 17)), dt.date(2026, 3, 16),
                       fresh(dt.date(2026, 3, 16)))
    assert d.eligible and d.access_end == dt.date(2026, 4, 30)  # end of the month after the end


def test_region_program_by_department_and_period() -> None:
    day = dt.date(2018, 6, 1)
    assert rules.evaluate(IDF, facts(postal_code="93100"), day).eligible
    assert "OUTSIDE_REGION" in rules.evaluate(IDF, facts(postal_code="69003"), day).failed_reasons
    assert "PROGRAM_ENDED" in rules.evaluate(IDF, facts(), dt.date(2019, 10, 9)).failed_reasons
    assert rules.evaluate(IDF, facts(), dt.date(2019, 10, 8)).eligible


def test_unknown_person_fails_every_criterion_the_same_way() -> None:
    d = rules.evaluate(PREMIUM, None, dt.date(2026, 3, 16), fresh(dt.date(2026, 3, 16)))
    assert not d.eligible
    assert [c.reason_code for c in d.criteria[1:]] == ["NOT_REGISTERED"] * 3 + [""]


@given(day=st.dates(min_value=dt.date(1990, 1, 1), max_value=dt.date(2015, 8, 31)))
def test_never_eligible_before_the_program_starts(day: dt.date) -> None:
    assert not rules.evaluate(PREMIUM, facts(registered_on=dt.date(1989, 1, 1)), day).eligible


@given(day=st.dates(min_value=dt.date(2015, 1, 1), max_value=dt.date(2030, 12, 31)), category=st.integers(1, 8))
def test_evaluation_is_pure(day: dt.date, category: int) -> None:
    f = facts(category=category, registered_on=dt.date(2014, 1, 1))
    first = rules.evaluate(PREMIUM, f, day, fresh(day))
    assert first == rules.evaluate(PREMIUM, f, day, fresh(day))
    assert rules.decision_from_dict(rules.decision_to_dict(first)) == first


def test_a_fourth_program_is_a_file_alone(tmp_path: Path) -> None:
    for f in (ROOT / "programs").glob("*.yaml"):
        shutil.copy(f, tmp_path)
    (tmp_path / "opco-numerique.yaml").write_text("""
id: opco-numerique
title: OPCO digital skills
tier: premium
period: {start: 2021-01-01, end: 2022-12-31}
criteria: [registered, registration_active, age_below]
parameters:
  max_age: {values: {2021-01-01: {value: 30, reference: "Convention OPCO 2021"}}}
  price_per_month_cents: {values: {2021-01-01: {value: 1500, reference: "Negotiated price"}}}
  activation_months: {values: {2021-01-01: {value: 3, reference: "Convention OPCO 2021"}}}
  funders: {values: {2021-01-01: {value: {opco-akto: 7000, region-occitanie: 3000}, reference: "Convention"}}}
""")
    catalog = ProgramCatalog.load(tmp_path)
    program = catalog.get("opco-numerique")
    assert program is not None and len(catalog.all()) == len(PROGRAMS.all()) + 1
    d = rules.evaluate(program, facts(birth_date=dt.date(1995, 1, 1)), dt.date(2022, 6, 1))
    assert d.eligible and d.funding_plan is not None
    assert dict((f, c) for f, _, c in d.funding_plan.shares) == {"opco-akto": 3150, "region-occitanie": 1350}
    assert "AGE_LIMIT_EXCEEDED" in rules.evaluate(program, facts(birth_date=dt.date(1990, 1, 1)),
                                                  dt.date(2022, 6, 1)).failed_reasons


@pytest.mark.parametrize("edit,field", [
    (lambda s: s.replace("tier: premium", "tier: premium\ncolour: blue"), "colour"),
    (lambda s: s.replace("value: 2000", "value: -5"), "parameters.price_per_month_cents.values.2015-09-01.value"),
    # (price x 120 months summed in a 64-bit counter: an unbounded price failed at the first activation)
    (lambda s: s.replace("value: 2000", "value: 100000000000000000"),
     "parameters.price_per_month_cents.values.2015-09-01.value"),
    (lambda s: s.replace("ministry-of-labour: 5000", "ministry-of-labour: 4000"), "parameters.funders.values.2015-09-01.value"),
    (lambda s: s.replace("start: 2015-09-01", "start: 2015-13-01"), "period.start"),
    (lambda s: s.replace("  - registration_active", "  - registration_active\n  - moon_phase"), "criteria[3]"),
    (lambda s: s.replace("  - registration_active", "  - registration_active\n  - registered"), "criteria[3]"),
    (lambda s: s.replace("      2015-09-01:\n        value: 2000", "      2015-09-01:\n        value: 1\n"
                         "        reference: x\n      2015-09-01:\n        value: 2000"), "(file)"),
])
def test_bad_program_files_name_file_and_field(tmp_path: Path, edit: object, field: str) -> None:
    src = (ROOT / "programs" / "premium-job-seekers.yaml").read_text()
    path = tmp_path / "premium-job-seekers.yaml"
    path.write_text(edit(src))  # type: ignore[operator]
    with pytest.raises(ProgramFileError) as info:
        load_program(path)
    assert info.value.field == field and str(path) in str(info.value)


def test_a_parameter_changing_mid_period_applies_from_its_date(tmp_path: Path) -> None:
    src = (ROOT / "programs" / "premium-job-seekers.yaml").read_text()
    changed = src.replace('''        value: 2000
        reference: "Platform list price of Premium, 20 EUR/month (press release, April 2015)"''', '''        value: 2000
        reference: "Platform list price of Premium, 20 EUR/month (press release, April 2015)"
      2020-01-01:
        value: 2500
        reference: "New list price (example)"''')
    assert changed != src
    path = tmp_path / "premium-job-seekers.yaml"
    path.write_text(changed)
    program = load_program(path)
    before = rules.evaluate(program, facts(), dt.date(2019, 12, 31), rules.Circumstances(dt.date(2019, 12, 31)))
    after = rules.evaluate(program, facts(), dt.date(2020, 1, 1), rules.Circumstances(dt.date(2020, 1, 1)))
    assert before.funding_plan and before.funding_plan.price_per_month_cents == 2000
    assert after.funding_plan and after.funding_plan.price_per_month_cents == 2500
    used = {p.name: p for p in after.parameters}["price_per_month_cents"]
    assert used.effective_from == dt.date(2020, 1, 1) and used.reference == "New list price (example)"


@given(st.dates(dt.date(2018, 1, 1), dt.date(2030, 12, 31)), st.integers(0, 36),
       st.dates(dt.date(2017, 1, 1), dt.date(2034, 12, 31)))
def test_months_begun_counts_the_month_starts_on_or_before_the_day(start: dt.date, months: int,
                                                                   day: dt.date) -> None:
    # The definition, month by month (the function computes it in constant time).
    expected = sum(1 for k in range(months) if rules.add_months(start, k) <= day)
    assert rules.months_begun(start, months, day) == expected


def test_parameters_used_is_the_same_answer_each_time_and_follows_a_reloaded_program(tmp_path: Path) -> None:
    catalog = ProgramCatalog.load(ROOT / "programs")
    program = catalog.get("premium-job-seekers")
    assert program is not None
    day = dt.date(2026, 3, 16)
    first = rules.parameters_used(program, day)
    assert rules.parameters_used(program, day) == first
    names = [p.name for p in first]
    assert names == sorted(program.parameters) and names
    # A changed program file loaded again is a new object: its own values, never the memo's.
    src = (ROOT / "programs" / "premium-job-seekers.yaml").read_text(encoding="utf-8")
    price = program.value("price_per_month_cents", day)
    changed = src.replace(f"value: {price.value}", f"value: {price.value + 1}", 1)
    assert changed != src
    (tmp_path / "premium-job-seekers.yaml").write_text(changed, encoding="utf-8")
    reloaded = load_program(tmp_path / "premium-job-seekers.yaml")
    value = {p.name: p.value_json for p in rules.parameters_used(reloaded, day)}["price_per_month_cents"]
    assert value == str(price.value + 1)


# Every memoized piece of the rules (per program and day, rules.per_program_and_day).
_MEMOIZED = ("_program_open", "_funding_plan", "parameters_used", "_category_result", "_registration_active_on",
             "_department_result", "_age_results", "_freshness_result", "_entitlement_end", "_plan_until",
             "_not_registered", "_registration_not_started", "_registration_ended", "_mentor")


class _NoCache(dict):  # type: ignore[type-arg]
    """A cache that keeps nothing."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


class _Afresh:
    """Within the block, rules computes everything anew (each memoized function's undecorated one,
    and no shared decision objects)."""

    def __enter__(self) -> None:
        self.saved = {n: getattr(rules, n) for n in _MEMOIZED}
        for n, fn in self.saved.items():
            setattr(rules, n, fn.__wrapped__)
        self.decisions, rules._DECISIONS = rules._DECISIONS, _NoCache()

    def __exit__(self, *exc: object) -> None:
        for n, fn in self.saved.items():
            setattr(rules, n, fn)
        rules._DECISIONS = self.decisions


_PEOPLE = st.none() | st.builds(
    rules.PersonFacts, birth_date=st.dates(dt.date(1950, 1, 1), dt.date(2012, 12, 31)),
    postal_code=st.sampled_from(["75011", "13001", "97411", "98800", "59000", "69003", "33000"]),
    registered_on=st.dates(dt.date(2014, 1, 1), dt.date(2030, 12, 31)),
    registration_ended_on=st.none() | st.dates(dt.date(2014, 1, 1), dt.date(2030, 12, 31)), category=st.integers(1, 8))


@settings(max_examples=400, deadline=None)
@given(people=st.lists(_PEOPLE, min_size=1, max_size=4), day=st.dates(dt.date(2015, 1, 1), dt.date(2030, 12, 31)),
       extracted=st.none() | st.dates(dt.date(2014, 1, 1), dt.date(2030, 12, 31)),
       seats=st.integers(0, 10**4), cents=st.integers(0, 10**9), mentor=st.sampled_from(["", "M-1"]))
def test_memoized_decisions_equal_decisions_computed_afresh(people: list[rules.PersonFacts | None], day: dt.date,
                                                             extracted: dt.date | None, seats: int, cents: int,
                                                             mentor: str) -> None:
    """Decisions share memoized criteria, plans and end dates between people and calls: the
    same decisions as computed from scratch, for every program, twice in a row."""
    circumstances = rules.Circumstances(registry_extracted_on=extracted, seats_used=seats, cents_committed=cents,
                                        mentor_id=mentor)
    for program in PROGRAMS.all():
        memoized = [rules.evaluate(program, f, day, circumstances) for f in people + people]
        with _Afresh():
            fresh = [rules.evaluate(program, f, day, circumstances) for f in people + people]
        assert memoized == fresh


def test_people_in_the_same_situation_share_one_decision_object() -> None:
    """What entitlement.api.convert caches a decision's bytes by: eligible people with the same
    relevant facts, and unknown people, get the same object on a day; others do not."""
    day = dt.date(2026, 3, 16)
    circumstances = rules.Circumstances(registry_extracted_on=day - dt.timedelta(days=1))
    a = rules.evaluate(PREMIUM, facts(), day, circumstances)
    b = rules.evaluate(PREMIUM, facts(birth_date=dt.date(1991, 2, 3), postal_code="75012"), day, circumstances)
    assert a.eligible and a is b
    assert rules.evaluate(PREMIUM, None, day, circumstances) is rules.evaluate(PREMIUM, None, day, circumstances)
    other_category = rules.evaluate(PREMIUM, facts(category=2), day, circumstances)
    assert other_category is not a and other_category.criteria != a.criteria
    later = rules.evaluate(PREMIUM, facts(), day + dt.timedelta(days=1), circumstances)
    assert later is not a and later.as_of == day + dt.timedelta(days=1)


def test_the_budget_cap_weighs_what_the_decision_would_commit() -> None:
    """A registration known to end soon cuts access short (`months_after_registration_end`), so the
    activation commits fewer months than the program's length: the budget cap and its message weigh
    that commitment, not the full length's cost."""
    day = dt.date(2018, 2, 15)
    person = facts(registration_ended_on=dt.date(2018, 2, 20))  # access until 31 March 2018: 2 months
    budget = IDF.value("max_budget_cents", day).value
    full = rules.funding_plan(IDF, day).total_cents
    roomy = rules.evaluate(IDF, person, day, rules.Circumstances(registry_extracted_on=day))
    assert roomy.eligible and roomy.funding_plan is not None
    commitment = roomy.funding_plan.total_cents
    assert commitment == 2 * IDF.value("price_per_month_cents", day).value < full

    def budget_check(left: int) -> rules.CriterionResult:
        d = rules.evaluate(IDF, person, day, rules.Circumstances(registry_extracted_on=day,
                                                                 cents_committed=budget - left))
        [c] = [c for c in d.criteria if c.criterion == "budget_available"]
        assert d.eligible is c.passed
        return c

    assert budget_check(commitment).passed  # exactly what is left: it fits
    assert budget_check(commitment + 1000).passed
    refused = budget_check(commitment - 1)
    assert refused.reason_code == "CAP_REACHED"
    assert rules.format_eur(commitment) in refused.detail and rules.format_eur(full) not in refused.detail
    # Someone whose access runs the program's whole length still weighs its full cost.
    assert not rules.evaluate(IDF, facts(), day, rules.Circumstances(
        registry_extracted_on=day, cents_committed=budget - full + 1)).eligible
