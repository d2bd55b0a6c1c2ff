"""Eligibility rules as pure functions: facts + program + date -> explained decision.

No I/O, no gRPC, no SQL: this module imports only the standard library and the program model,
so it can be imported and tested alone, and any past decision can be recomputed from the facts,
the program file version and the date stored with it.
"""

from __future__ import annotations

import calendar
import functools
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from entitlement.money import format_eur, split_cents
from entitlement.programs import CRITERIA, DatedValue, Parameter, Program


class PersonFacts(NamedTuple):
    """What the registry says about one job seeker: only the fields rules need (minimisation).
    Immutable (a named tuple: one per check, cheaper to make than a frozen dataclass)."""

    birth_date: dt.date
    postal_code: str
    registered_on: dt.date
    registration_ended_on: dt.date | None
    category: int


class Circumstances(NamedTuple):
    """What a decision depends on besides the person's registration, recorded with it: the age
    of the registry data, the program's use of its caps, the advisor's attestations, and where
    the facts came from (`facts_source`: "snapshot", "live", or "snapshot_fallback" when the live
    source failed and the latest snapshot, possibly stale, was used). Immutable; a named tuple
    rather than a frozen dataclass: every check makes one and hashes it (the decision cache's
    key), four times faster."""

    registry_extracted_on: dt.date | None = None
    seats_used: int = 0
    cents_committed: int = 0
    mentor_id: str = ""
    facts_source: str = "snapshot"


@dataclass(frozen=True)
class CriterionResult:
    criterion: str
    passed: bool
    reason_code: str
    detail: str


@dataclass(frozen=True)
class ParameterUsed:
    name: str
    value_json: str
    effective_from: dt.date
    reference: str


@dataclass(frozen=True)
class FundingPlan:
    price_per_month_cents: int
    months: int
    total_cents: int
    shares: tuple[tuple[str, int, int], ...]  # (funder, basis points, cents), by funder id


@dataclass(frozen=True)
class Decision:
    program_id: str
    program_version: str
    as_of: dt.date
    eligible: bool
    criteria: tuple[CriterionResult, ...]
    parameters: tuple[ParameterUsed, ...]
    funding_plan: FundingPlan | None
    access_end: dt.date | None = None  # last day of access for an activation starting on as_of
    circumstances: Circumstances = Circumstances()

    @property
    def failed_reasons(self) -> list[str]:
        """Reason codes of the failed criteria, each once, in criterion order."""
        return list(dict.fromkeys(c.reason_code for c in self.criteria if not c.passed))


def age_on(birth_date: dt.date, day: dt.date) -> int:
    """Age in whole years on `day`. A 29 February birthday is reached on 1 March in common years."""
    return day.year - birth_date.year - ((day.month, day.day) < (birth_date.month, birth_date.day))


def add_months(day: dt.date, months: int) -> dt.date:
    """Same day `months` later, clamped to the month's last day (31 Jan + 1 month = 28/29 Feb)."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return dt.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


_T = TypeVar("_T")


def per_program_and_day(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Memoize `fn(program, day, *more)` per (program object, day, more): programs are immutable
    once loaded, and every check of a day asks the same questions of them (a reloaded program is a
    new object, so a stale answer is never served). Bounded: cleared at 4,096 entries."""
    cache: dict[tuple[Any, ...], tuple[Program, _T]] = {}

    @functools.wraps(fn)
    def memoized(program: Program, day: dt.date, *more: Any) -> _T:
        key = (id(program), day, *more)
        hit = cache.get(key)
        if hit is not None and hit[0] is program:
            return hit[1]
        out = fn(program, day, *more)
        if len(cache) >= 4096:
            cache.clear()
        cache[key] = (program, out)
        return out
    return memoized


def access_end(start: dt.date, months: int) -> dt.date:
    """Last day (inclusive) of `months` months of access starting on `start`."""
    return add_months(start, months) - dt.timedelta(days=1)


def department_of(postal_code: str) -> str:
    """Department of a French postal code: 3 digits overseas (97x, 98x); Corsica's 20xxx are
    Corse-du-Sud (2A) below 20200, Haute-Corse (2B) from it (the codes program files name); else
    the first 2 digits."""
    head = postal_code[:2]
    if head == "20":
        return "2A" if postal_code < "20200" else "2B"
    return postal_code[:3] if head in ("97", "98") else head


_Check = Callable[[Program, PersonFacts, dt.date], CriterionResult]
_CircumstanceCheck = Callable[[Program, Circumstances, dt.date], CriterionResult]


# A criterion's result depends on the program and the day and on one or two facts with few values
# (a category, a department, whether a limit is met): the checks below are memoized on exactly
# those, so a day's checks share their results (immutable) instead of formatting them anew;
# tests/test_rules.py compares them with the results built afresh.

_REGISTERED = CriterionResult("registered", True, "", "Found in the agency registry with this birth date.")


def _registered(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    return _REGISTERED


def _category_covered(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    return _category_result(program, day, f.category)


@per_program_and_day
def _category_result(program: Program, day: dt.date, category: int) -> CriterionResult:
    covered = program.value("categories", day).value
    if category in covered:
        return CriterionResult("category_covered", True, "", f"Category {category} is covered.")
    return CriterionResult("category_covered", False, "CATEGORY_NOT_COVERED",
                           f"Registration category {category} is not covered (covered: "
                           f"{', '.join(map(str, covered))}): met only by a registration in a covered category, "
                           "as the agency's data records it.")


def _registration_active(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    if f.registered_on > day:
        return _registration_not_started(program, day, f.registered_on)
    ended = f.registration_ended_on
    if ended is not None and ended <= day:
        return _registration_ended(program, day, ended)
    return _registration_active_on(program, day)


@per_program_and_day
def _registration_active_on(program: Program, day: dt.date) -> CriterionResult:
    return CriterionResult("registration_active", True, "", f"Registration active on {day.isoformat()}.")


@per_program_and_day
def _registration_not_started(program: Program, day: dt.date, registered_on: dt.date) -> CriterionResult:
    return CriterionResult("registration_active", False, "REGISTRATION_NOT_STARTED",
                           f"Registration starts on {registered_on.isoformat()}, after {day.isoformat()}: "
                           f"this criterion is met from {registered_on.isoformat()}.")


@per_program_and_day
def _registration_ended(program: Program, day: dt.date, ended: dt.date) -> CriterionResult:
    return CriterionResult("registration_active", False, "REGISTRATION_ENDED",
                           f"Registration ended on {ended.isoformat()} (cessation d'inscription): met again "
                           "once registered again with the agency (France Travail) and its data shows it.")


def _resident_in_departments(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    return _department_result(program, day, department_of(f.postal_code))


@per_program_and_day
def _department_result(program: Program, day: dt.date, dep: str) -> CriterionResult:
    departments = program.value("departments", day).value
    if dep in departments:
        return CriterionResult("resident_in_departments", True, "", f"Lives in department {dep}.")
    return CriterionResult("resident_in_departments", False, "OUTSIDE_REGION",
                           f"Lives in department {dep}, outside the program's area "
                           f"({', '.join(departments)}).")


def _age_below(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    limit, passed, failed = _age_results(program, day)
    return passed if age_on(f.birth_date, day) < limit else failed


@per_program_and_day
def _age_results(program: Program, day: dt.date) -> tuple[int, CriterionResult, CriterionResult]:
    limit = program.value("max_age", day).value
    return (limit, CriterionResult("age_below", True, "", f"Under {limit} on {day.isoformat()}."),
            CriterionResult("age_below", False, "AGE_LIMIT_EXCEEDED", f"Aged {limit} or more on {day.isoformat()}."))


_NO_MENTOR = CriterionResult("mentor_assigned", False, "MENTOR_NOT_ASSIGNED",
                             "The program requires a mentor (tuteur): once one is arranged, give the mentor's "
                             "id with the check and the activation (mentor_id; --mentor on the command line).")


def _mentor_assigned(program: Program, c: Circumstances, day: dt.date) -> CriterionResult:
    return _mentor(c.mentor_id) if c.mentor_id else _NO_MENTOR


@functools.lru_cache(maxsize=4096)
def _mentor(mentor_id: str) -> CriterionResult:
    """Which mentor the advisor attested, in the decision stored with the activation: what the
    funders of a program requiring one audit (it said "A mentor is assigned.", the id kept in the
    decision's circumstances, which no answer shows)."""
    return CriterionResult("mentor_assigned", True, "", f"Mentor {mentor_id} assigned (the advisor's attestation).")


def _seats_available(program: Program, c: Circumstances, day: dt.date) -> CriterionResult:
    seats = program.value("max_seats", day).value
    if c.seats_used < seats:
        return CriterionResult("seats_available", True, "", f"{seats - c.seats_used} of {seats} seats left.")
    return CriterionResult("seats_available", False, "CAP_REACHED", f"All {seats} seats are taken.")


def _budget_available(program: Program, c: Circumstances, day: dt.date,
                      cost: int | None = None) -> CriterionResult:
    """`cost`: what the activation would commit (evaluate gives it: fewer months than the program's
    length when access is cut short at the registration's end); default the full length's cost."""
    budget = program.value("max_budget_cents", day).value
    if cost is None:
        cost = funding_plan(program, day).total_cents
    if c.cents_committed + cost <= budget:
        return CriterionResult("budget_available", True, "",
                               f"{format_eur(budget - c.cents_committed)} of {format_eur(budget)} left.")
    return CriterionResult("budget_available", False, "CAP_REACHED",
                           f"The budget of {format_eur(budget)} cannot cover another {format_eur(cost)}.")


def _registry_data_fresh(program: Program, c: Circumstances, day: dt.date) -> CriterionResult:
    return _freshness_result(program, day, c.registry_extracted_on)


@per_program_and_day
def _freshness_result(program: Program, day: dt.date, extracted_on: dt.date | None) -> CriterionResult:
    limit = program.value("max_registry_age_days", day).value
    if extracted_on is None:
        return CriterionResult("registry_data_fresh", False, "REGISTRY_DATA_STALE",
                               f"No registry data imported: {_IMPORT_NEEDED}")
    age = (day - extracted_on).days
    if age < 0:  # data dated after the day decided: a wrong date, never fresh data (README "Registry extracts")
        return CriterionResult("registry_data_fresh", False, "REGISTRY_DATA_STALE",
                               f"Registry data is dated {extracted_on.isoformat()}, after {day.isoformat()}: "
                               "a wrong extraction date (ask the service's operators).")
    if age <= limit:
        return CriterionResult("registry_data_fresh", True, "", f"Registry data is {age} days old.")
    return CriterionResult("registry_data_fresh", False, "REGISTRY_DATA_STALE",
                           f"Registry data is {age} days old (extracted on {extracted_on.isoformat()}); the "
                           f"program accepts at most {limit}: {_IMPORT_NEEDED}")


_IMPORT_NEEDED = "no one is eligible until a newer agency extract is imported (ask the service's operators)."


CIRCUMSTANCE_CHECKS: dict[str, _CircumstanceCheck] = {
    "mentor_assigned": _mentor_assigned,
    "seats_available": _seats_available,
    "budget_available": _budget_available,
    "registry_data_fresh": _registry_data_fresh,
}

CHECKS: dict[str, _Check] = {
    "registered": _registered,
    "category_covered": _category_covered,
    "registration_active": _registration_active,
    "resident_in_departments": _resident_in_departments,
    "age_below": _age_below,
}


@per_program_and_day
def _program_open(program: Program, day: dt.date) -> CriterionResult:
    if day < program.start:
        return CriterionResult("program_open", False, "PROGRAM_NOT_STARTED",
                               f"The program starts on {program.start.isoformat()}.")
    if program.end is not None and day > program.end:
        return CriterionResult("program_open", False, "PROGRAM_ENDED",
                               f"The program ended on {program.end.isoformat()}.")
    return CriterionResult("program_open", True, "", "The program is open on this date.")


def funding_plan(program: Program, day: dt.date, months: int | None = None) -> FundingPlan:
    """Cost of `months` months of access (default: the program's activation length) from `day`,
    split between the funders in force on `day`."""
    return _funding_plan(program, day, program.value("activation_months", day).value if months is None else months)


@per_program_and_day
def _funding_plan(program: Program, day: dt.date, months: int) -> FundingPlan:
    price = program.value("price_per_month_cents", day).value
    shares = program.funders_on(day)
    total = price * months
    amounts = split_cents(total, shares)
    return FundingPlan(price, months, total,
                       tuple((f, shares[f], amounts[f]) for f in sorted(shares)))


@per_program_and_day
def parameters_used(program: Program, day: dt.date) -> tuple[ParameterUsed, ...]:
    """Every parameter of `program` in force on `day`, as recorded with a decision (memoized: every
    check of a day asks the same question)."""
    return tuple(ParameterUsed(name, json.dumps(v.value, sort_keys=True), v.effective_from, v.reference)
                 for name in sorted(program.parameters) for v in (program.value(name, day),))


def entitlement_end(program: Program, facts: PersonFacts, start: dt.date) -> dt.date:
    """Last day of access for an activation starting on `start`: the program's length, cut at the
    end of the Nth month after the registration's end when the registry knows it and the program
    sets `months_after_registration_end`."""
    return _entitlement_end(program, start, facts.registration_ended_on)


@per_program_and_day
def _entitlement_end(program: Program, start: dt.date, ended: dt.date | None) -> dt.date:
    end = access_end(start, program.value("activation_months", start).value)
    after = program.optional_value("months_after_registration_end", start)
    if after is not None and ended is not None:
        cut_month = add_months(ended.replace(day=1), after.value)
        cut = cut_month.replace(day=calendar.monthrange(cut_month.year, cut_month.month)[1])
        end = min(end, max(cut, start))
    return end


@dataclass(frozen=True)
class Revalidation:
    """Whether the holder of a live activation is still eligible, and if not, from when."""

    eligible: bool
    failed_reasons: tuple[str, ...] = ()
    stopped_on: dt.date | None = None  # the day they stopped being eligible, as far as the data tells
    access_end: dt.date | None = None  # the last day of access that gives


def granted(program: Program | None, decision: Decision) -> Program:
    """The program as an activation was granted it: the criteria its decision evaluated and the
    parameter values it used, both recorded with the decision (`program`: the program file loaded
    now, None when it is gone; it gives the title and tier only). Revalidation judges a holder by
    these: by the file as it is now, a criterion added later (its parameter must be dated from the
    program's start, so it reaches back) cut every holder it did not suit at the next extract, a
    past value rewritten in place changed the terms of activations made under it, and a program
    whose file was removed was never revalidated at all. A stored decision without its criteria or
    a criterion's parameter (none is written so) is judged by the file, when there is one."""
    names = tuple(c.criterion for c in decision.criteria if c.criterion in CRITERIA)
    stored = {p.name: p for p in decision.parameters}
    complete = bool(names) and all(param in stored for n in names for param in CRITERIA[n])
    if program is not None and not complete:
        return program
    key = (decision.program_id, decision.program_version, decision.as_of, names, decision.parameters,
           None if program is None else (program.title, program.tier))
    hit = _GRANTED.get(key)
    if hit is None:
        hit = Program(
            id=decision.program_id, title=program.title if program else "", description="",
            tier=program.tier if program else "", start=decision.as_of, end=None, criteria=names,
            parameters={p.name: Parameter(p.name, (DatedValue(p.effective_from, json.loads(p.value_json),
                                                              p.reference),))
                        for p in decision.parameters},
            version=decision.program_version, source=program.source if program else Path(""))
        if len(_GRANTED) >= 1024:
            _GRANTED.clear()
        _GRANTED[key] = hit
    return hit


# One shared object per distinct set of terms: the memoized rules key on the program object.
_GRANTED: dict[tuple[Any, ...], Program] = {}


def revalidate(program: Program, facts: PersonFacts | None, start: dt.date, today: dt.date,
               data_date: dt.date) -> Revalidation:
    """Re-check the holder of an activation that began on `start` against newer registry facts
    (`data_date`: the date of the extract they come from), on `today`.

    `program`: the program as the activation was granted it (`granted`: the criteria and values
    recorded with its decision). Only the person criteria count: the circumstances (caps, mentor,
    data freshness) were judged when the activation was made. The person's facts are the new ones,
    but the terms they are held to are those the activation was granted on: its criteria, and every
    parameter in force on `start` (the categories
    and departments covered, the age limit, on which the age is judged too, as then), so a dated
    value taking effect later changes new decisions, never an activation made before it (judged by
    today's values, a program narrowing its categories from 1 April curtailed every holder it no
    longer covered at the next extract, from that extract's date). Only whether the registration
    is active is judged on `today`. When
    eligibility is lost, it was lost on the registration's end if that is why, else on the data's
    date (the first the service knows of it); access then ends as at activation
    (`entitlement_end`): on the last day of the Nth month after that day's month with
    `months_after_registration_end`, else the day before it; never before `start`."""
    failed: list[str] = []
    for name in program.criteria:
        if name in CIRCUMSTANCE_CHECKS:
            continue
        if facts is None:
            failed.append("NOT_REGISTERED")
            break
        result = CHECKS[name](program, facts, today if name == "registration_active" else start)
        if not result.passed:
            failed.append(result.reason_code)
    if not failed:
        return Revalidation(True)
    ended = facts.registration_ended_on if facts is not None else None
    stopped = ended if ended is not None and ended <= today and "REGISTRATION_ENDED" in failed else data_date
    after = program.optional_value("months_after_registration_end", start)
    if after is not None:
        cut_month = add_months(stopped.replace(day=1), after.value)
        end = cut_month.replace(day=calendar.monthrange(cut_month.year, cut_month.month)[1])
    else:
        end = stopped - dt.timedelta(days=1)
    return Revalidation(False, tuple(dict.fromkeys(failed)), stopped, max(end, start))


def evaluate(program: Program, facts: PersonFacts | None, day: dt.date,
             circumstances: Circumstances = Circumstances()) -> Decision:
    """Evaluate every criterion of `program` for a person (None: not in the registry) on `day`."""
    results = [_program_open(program, day)]
    unknown_told = False  # NOT_REGISTERED's advice given once, on the first criterion that fails so
    for name in program.criteria:
        if name == "budget_available" and facts is not None:  # the cap weighs what would be committed
            cost = _plan_until(program, day, entitlement_end(program, facts, day)).total_cents
            results.append(_budget_available(program, circumstances, day, cost))
        elif name in CIRCUMSTANCE_CHECKS:
            results.append(CIRCUMSTANCE_CHECKS[name](program, circumstances, day))
        elif facts is None:
            results.append(_not_registered(name, circumstances.facts_source,
                                           circumstances.registry_extracted_on is None, not unknown_told))
            unknown_told = True
        else:
            results.append(CHECKS[name](program, facts, day))
    eligible = all(r.passed for r in results)
    end = entitlement_end(program, facts, day) if eligible and facts is not None else None
    return _decision(program, day, tuple(results), end, circumstances)


@functools.lru_cache(maxsize=64)
def _not_registered(criterion: str, source: str = "snapshot", no_data: bool = False,
                    advice: bool = True) -> CriterionResult:
    """Alike for an unknown identifier and a birth date that does not match (nothing tells them
    apart), and saying what the advisor can do (`advice`, on the decision's first such criterion;
    the others say it in short): check both, or wait for data recent enough."""
    if not advice:
        return CriterionResult(criterion, False, "NOT_REGISTERED",
                               "Unknown: no registration found for this identifier and birth date.")
    if source == "live":
        where = "the agency's live status source knows no registration for this identifier and birth date"
    elif no_data:
        return CriterionResult(criterion, False, "NOT_REGISTERED",
                               "No registry data imported: no one can be found until an operator imports the "
                               "agency's extract.")
    else:
        where = ("no registration found for this identifier and birth date in the agency's registry data "
                 "(of the date the decision gives; a newer registration shows from the next extract)")
    return CriterionResult(criterion, False, "NOT_REGISTERED",
                           f"{where[0].upper()}{where[1:]}: check the identifier and the birth date with the job "
                           "seeker (the birth date must be the one the agency records).")


def _decision(program: Program, day: dt.date, criteria: tuple[CriterionResult, ...], end: dt.date | None,
              circumstances: Circumstances) -> Decision:
    """The decision these results make: one shared (immutable) object per distinct set of results,
    end date and circumstances for a program and day, so that people in the same situation get the
    same object and its conversions are made once (entitlement.api.convert). The cache holds the
    results it is keyed on by identity, so an id in a key is never reused while the entry lives."""
    key = (id(program), day, end, circumstances, *map(id, criteria))
    hit = _DECISIONS.get(key)
    if hit is not None and hit[0] is program:
        return hit[1]
    decision = Decision(
        program_id=program.id,
        program_version=program.version,
        as_of=day,
        eligible=all(r.passed for r in criteria),
        criteria=criteria,
        parameters=parameters_used(program, day),
        funding_plan=None if end is None else _plan_until(program, day, end),
        access_end=end,
        circumstances=circumstances,
    )
    if len(_DECISIONS) >= 4096:
        _DECISIONS.clear()
    _DECISIONS[key] = (program, decision)
    return decision


_DECISIONS: dict[tuple[Any, ...], tuple[Program, Decision]] = {}


@per_program_and_day
def _plan_until(program: Program, day: dt.date, end: dt.date) -> FundingPlan:
    """The funding plan of an activation from `day` to `end` (the months of access begun by then)."""
    months = program.value("activation_months", day).value
    return funding_plan(program, day, months=months_begun(day, months, end))


def months_begun(start: dt.date, months: int, day: dt.date) -> int:
    """How many of the `months` months of access beginning on `start` have begun by `day`: the
    count of k in [0, months) with add_months(start, k) <= day. add_months grows with k, so the
    last such k is the calendar-month distance from start to day, or one less when day falls
    before start's day of month (clamped) in its month."""
    k = (day.year - start.year) * 12 + day.month - start.month
    if k >= 0 and add_months(start, k) > day:
        k -= 1
    return max(0, min(months, k + 1))


def decision_to_dict(d: Decision) -> dict[str, object]:
    """Plain JSON-able form, stored with each activation so the decision can be shown again as it was."""
    plan, c = d.funding_plan, d.circumstances
    return {
        "program_id": d.program_id, "program_version": d.program_version, "as_of": d.as_of.isoformat(),
        "eligible": d.eligible,
        "criteria": [[c.criterion, c.passed, c.reason_code, c.detail] for c in d.criteria],
        "parameters": [[p.name, p.value_json, p.effective_from.isoformat(), p.reference] for p in d.parameters],
        "funding_plan": None if plan is None else {
            "price_per_month_cents": plan.price_per_month_cents, "months": plan.months,
            "total_cents": plan.total_cents, "shares": [list(s) for s in plan.shares]},
        "access_end": d.access_end.isoformat() if d.access_end else None,
        "circumstances": {
            "registry_extracted_on": c.registry_extracted_on.isoformat() if c.registry_extracted_on else None,
            "seats_used": c.seats_used, "cents_committed": c.cents_committed, "mentor_id": c.mentor_id,
            "facts_source": c.facts_source},
    }


def _stored_parameters(raw: list[list[str]]) -> tuple[ParameterUsed, ...]:
    """The parameters of a stored decision, one shared tuple per distinct list: every activation of
    a program and day recorded the same ones, so a page of activations converts them once
    (entitlement.api.convert memoizes by tuple)."""
    key = tuple(tuple(p) for p in raw)
    hit = _STORED_PARAMETERS.get(key)
    if hit is None:
        hit = tuple(ParameterUsed(n, v, dt.date.fromisoformat(e), r) for n, v, e, r in key)
        if len(_STORED_PARAMETERS) >= 4096:
            _STORED_PARAMETERS.clear()
        _STORED_PARAMETERS[key] = hit
    return hit


_STORED_PARAMETERS: dict[tuple[tuple[str, ...], ...], tuple[ParameterUsed, ...]] = {}


def decision_from_dict(raw: dict[str, Any]) -> Decision:
    plan = raw["funding_plan"]
    circ = raw.get("circumstances") or {}
    extracted = circ.get("registry_extracted_on")
    return Decision(
        program_id=raw["program_id"], program_version=raw["program_version"],
        as_of=dt.date.fromisoformat(raw["as_of"]), eligible=raw["eligible"],
        criteria=tuple(CriterionResult(*c) for c in raw["criteria"]),
        parameters=_stored_parameters(raw["parameters"]),
        funding_plan=None if plan is None else FundingPlan(
            plan["price_per_month_cents"], plan["months"], plan["total_cents"],
            tuple((f, int(bp), int(c)) for f, bp, c in plan["shares"])),
        access_end=dt.date.fromisoformat(raw["access_end"]) if raw.get("access_end") else None,
        circumstances=Circumstances(
            registry_extracted_on=dt.date.fromisoformat(extracted) if extracted else None,
            seats_used=int(circ.get("seats_used", 0)), cents_committed=int(circ.get("cents_committed", 0)),
            mentor_id=str(circ.get("mentor_id", "")), facts_source=str(circ.get("facts_source", "snapshot"))),
    )

