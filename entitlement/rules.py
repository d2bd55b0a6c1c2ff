"""Eligibility rules as pure functions: facts + program + date -> explained decision.

No I/O, no gRPC, no SQL: this module imports only the standard library and the program model,
so it can be imported and tested alone, and any past decision can be recomputed from the facts,
the program file version and the date stored with it.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from entitlement.money import split_cents
from entitlement.programs import Program


@dataclass(frozen=True)
class PersonFacts:
    """What the registry says about one job seeker: only the fields rules need (minimisation)."""

    birth_date: dt.date
    postal_code: str
    registered_on: dt.date
    registration_ended_on: dt.date | None
    category: int


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


def access_end(start: dt.date, months: int) -> dt.date:
    """Last day (inclusive) of `months` months of access starting on `start`."""
    return add_months(start, months) - dt.timedelta(days=1)


def department_of(postal_code: str) -> str:
    """Department of a French postal code: 3 digits overseas (97x, 98x), else the first 2."""
    return postal_code[:3] if postal_code[:2] in ("97", "98") else postal_code[:2]


_Check = Callable[[Program, PersonFacts, dt.date], CriterionResult]


def _registered(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    return CriterionResult("registered", True, "", "Found in the agency registry with this birth date.")


def _category_covered(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    covered = program.value("categories", day).value
    if f.category in covered:
        return CriterionResult("category_covered", True, "", f"Category {f.category} is covered.")
    return CriterionResult("category_covered", False, "CATEGORY_NOT_COVERED",
                           f"Registration category {f.category} is not covered (covered: "
                           f"{', '.join(map(str, covered))}).")


def _registration_active(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    if f.registered_on > day:
        return CriterionResult("registration_active", False, "REGISTRATION_NOT_STARTED",
                               f"Registration starts on {f.registered_on.isoformat()}, after {day.isoformat()}.")
    ended = f.registration_ended_on
    if ended is not None and ended <= day:
        return CriterionResult("registration_active", False, "REGISTRATION_ENDED",
                               f"Registration ended on {ended.isoformat()} (cessation d'inscription).")
    return CriterionResult("registration_active", True, "", f"Registration active on {day.isoformat()}.")


def _resident_in_departments(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    departments = program.value("departments", day).value
    dep = department_of(f.postal_code)
    if dep in departments:
        return CriterionResult("resident_in_departments", True, "", f"Lives in department {dep}.")
    return CriterionResult("resident_in_departments", False, "OUTSIDE_REGION",
                           f"Lives in department {dep}, outside the program's area "
                           f"({', '.join(departments)}).")


def _age_below(program: Program, f: PersonFacts, day: dt.date) -> CriterionResult:
    limit = program.value("max_age", day).value
    if age_on(f.birth_date, day) < limit:
        return CriterionResult("age_below", True, "", f"Under {limit} on {day.isoformat()}.")
    return CriterionResult("age_below", False, "AGE_LIMIT_EXCEEDED",
                           f"Aged {limit} or more on {day.isoformat()}.")


CHECKS: dict[str, _Check] = {
    "registered": _registered,
    "category_covered": _category_covered,
    "registration_active": _registration_active,
    "resident_in_departments": _resident_in_departments,
    "age_below": _age_below,
}


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
    price = program.value("price_per_month_cents", day).value
    months = program.value("activation_months", day).value if months is None else months
    shares = program.funders_on(day)
    total = price * months
    amounts = split_cents(total, shares)
    return FundingPlan(price, months, total,
                       tuple((f, shares[f], amounts[f]) for f in sorted(shares)))


def parameters_used(program: Program, day: dt.date) -> tuple[ParameterUsed, ...]:
    out = []
    for name in sorted(program.parameters):
        v = program.value(name, day)
        out.append(ParameterUsed(name, json.dumps(v.value, sort_keys=True), v.effective_from, v.reference))
    return tuple(out)


def evaluate(program: Program, facts: PersonFacts | None, day: dt.date) -> Decision:
    """Evaluate every criterion of `program` for a person (None: not in the registry) on `day`."""
    results = [_program_open(program, day)]
    for name in program.criteria:
        if facts is None:
            results.append(CriterionResult(name, False, "NOT_REGISTERED",
                                           "No registration found for this identifier and birth date."))
        else:
            results.append(CHECKS[name](program, facts, day))
    eligible = all(r.passed for r in results)
    return Decision(
        program_id=program.id,
        program_version=program.version,
        as_of=day,
        eligible=eligible,
        criteria=tuple(results),
        parameters=parameters_used(program, day),
        funding_plan=funding_plan(program, day) if eligible else None,
    )


def decision_to_dict(d: Decision) -> dict[str, object]:
    """Plain JSON-able form, stored with each activation so the decision can be shown again as it was."""
    plan = d.funding_plan
    return {
        "program_id": d.program_id, "program_version": d.program_version, "as_of": d.as_of.isoformat(),
        "eligible": d.eligible,
        "criteria": [[c.criterion, c.passed, c.reason_code, c.detail] for c in d.criteria],
        "parameters": [[p.name, p.value_json, p.effective_from.isoformat(), p.reference] for p in d.parameters],
        "funding_plan": None if plan is None else {
            "price_per_month_cents": plan.price_per_month_cents, "months": plan.months,
            "total_cents": plan.total_cents, "shares": [list(s) for s in plan.shares]},
    }


def decision_from_dict(raw: dict[str, Any]) -> Decision:
    plan = raw["funding_plan"]
    return Decision(
        program_id=raw["program_id"], program_version=raw["program_version"],
        as_of=dt.date.fromisoformat(raw["as_of"]), eligible=raw["eligible"],
        criteria=tuple(CriterionResult(*c) for c in raw["criteria"]),
        parameters=tuple(ParameterUsed(n, v, dt.date.fromisoformat(e), r) for n, v, e, r in raw["parameters"]),
        funding_plan=None if plan is None else FundingPlan(
            plan["price_per_month_cents"], plan["months"], plan["total_cents"],
            tuple((f, int(bp), int(c)) for f, bp, c in plan["shares"])),
    )

