"""Program files: the data that says who a program is for, what it gives and who pays.

One YAML file per program in the programs folder (ENTITLEMENT_PROGRAMS_DIR, default `programs/`).
Every parameter is dated, OpenFisca style: `values: {2015-09-01: {value: 2000, reference: ...}}`;
a decision uses the value in force on its date. A bad file stops the server at start with a
message naming the file and the field; `entitlement programs check DIR` runs the same checks.
The format is documented in programs/README.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from entitlement.money import BASIS_POINTS

PROGRAM_ID_RE = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
FUNDER_ID_RE = re.compile(r"^[a-z][a-z0-9-]{1,62}$")

# criterion -> parameters it reads (besides the ones every program has)
CRITERIA: dict[str, tuple[str, ...]] = {
    "registered": (),
    "category_covered": ("categories",),
    "registration_active": (),
    "resident_in_departments": ("departments",),
    "age_below": ("max_age",),
    "mentor_assigned": (),
    "seats_available": ("max_seats",),
    "budget_available": ("max_budget_cents",),
    "registry_data_fresh": ("max_registry_age_days",),
}
COMMON_PARAMETERS = ("price_per_month_cents", "activation_months", "funders")
MAX_PRICE_CENTS = 10_000_000  # 100,000 EUR a month: far above any real price, far below 64-bit sums
MAX_CAP = 10**15  # seats or cents: the counters stay far below 64 bits
# Parameters any program may set. `months_after_registration_end`: when the registry knows the
# registration's end, access ends on the last day of the Nth month after it (0: that same month).
# `funders_owe`: `access` (each month of access begun is owed; the default when absent) or `use`
# (only months the platform reports as used are owed). `usage_report_days`: for `use`, how many
# days after a month of access ends its usage may still be reported (default 31).
OPTIONAL_PARAMETERS = ("months_after_registration_end", "funders_owe", "usage_report_days")
FUNDERS_OWE = ("access", "use")
DEFAULTS: dict[str, Any] = {"funders_owe": "access", "usage_report_days": 31}
TOP_LEVEL_KEYS = {"id", "title", "description", "tier", "period", "criteria", "parameters"}


class _Loader(yaml.SafeLoader):
    """Safe YAML without implicit timestamps: dates stay text until we parse them, so a bad date
    is reported with its field instead of failing inside the YAML parser."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    """PyYAML keeps the last of duplicate keys silently; two values dated the same day (or two
    `criteria:` keys) must be an error instead."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class ProgramFileError(ValueError):
    def __init__(self, path: Path, field: str, message: str) -> None:
        super().__init__(f"{path}: {field}: {message}")
        self.path = path
        self.field = field


@dataclass(frozen=True)
class DatedValue:
    effective_from: dt.date
    value: Any
    reference: str


@dataclass(frozen=True)
class Parameter:
    name: str
    values: tuple[DatedValue, ...]  # sorted by effective_from

    def at(self, day: dt.date) -> DatedValue | None:
        found = None
        for v in self.values:
            if v.effective_from <= day:
                found = v
            else:
                break
        return found


@dataclass(frozen=True)
class Program:
    id: str
    title: str
    description: str
    tier: str
    start: dt.date
    end: dt.date | None
    criteria: tuple[str, ...]
    parameters: Mapping[str, Parameter]
    version: str
    source: Path

    @property
    def name(self) -> str:
        return f"programs/{self.id}"

    def is_open(self, day: dt.date) -> bool:
        return self.start <= day and (self.end is None or day <= self.end)

    def value(self, name: str, day: dt.date) -> DatedValue:
        """The parameter value in force on `day` (the program start's value for earlier days)."""
        param = self.parameters[name]
        return param.at(max(day, self.start)) or param.values[0]

    def optional_value(self, name: str, day: dt.date) -> DatedValue | None:
        return self.value(name, day) if name in self.parameters else None

    def value_or_default(self, name: str, day: dt.date) -> Any:
        """An optional parameter's value in force on `day`, or its documented default (DEFAULTS)."""
        found = self.optional_value(name, day)
        return found.value if found is not None else DEFAULTS[name]

    def funders_on(self, day: dt.date) -> dict[str, int]:
        return dict(self.value("funders", day).value)


def _date(path: Path, field: str, raw: object) -> dt.date:
    if isinstance(raw, dt.datetime) or not isinstance(raw, (dt.date, str)):
        raise ProgramFileError(path, field, f"expected a date YYYY-MM-DD, got {raw!r}")
    if isinstance(raw, str):
        try:
            return dt.date.fromisoformat(raw)
        except ValueError:
            raise ProgramFileError(path, field, f"expected a date YYYY-MM-DD, got {raw!r}") from None
    return raw


def _check_value(path: Path, field: str, name: str, value: object) -> None:
    def fail(msg: str) -> None:
        raise ProgramFileError(path, field, msg)

    if name in ("price_per_month_cents",):
        # (Bounded: an activation commits price x up to 120 months, summed in the program's 64-bit
        # counter; an unbounded price failed at the first activation with a database error.)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PRICE_CENTS:
            fail(f"must be an integer number of cents from 0 to {MAX_PRICE_CENTS}")
    elif name in ("activation_months", "max_age"):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 120:
            fail("must be an integer from 1 to 120")
    elif name in ("max_seats", "max_budget_cents"):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CAP:
            fail(f"must be an integer from 1 to {MAX_CAP}")
    elif name == "max_registry_age_days":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 3650:
            fail("must be an integer number of days from 1 to 3650")
    elif name == "funders_owe":
        if value not in FUNDERS_OWE:
            fail("must be `access` (each month of access begun is owed) or `use` (months reported used)")
    elif name == "usage_report_days":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 366:
            fail("must be an integer number of days from 1 to 366")
    elif name == "months_after_registration_end":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 24:
            fail("must be an integer number of months from 0 to 24")
    elif name == "categories":
        if (not isinstance(value, list) or not value
                or any(not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= 8 for c in value)):
            fail("must be a non-empty list of registration categories 1 to 8")
    elif name == "departments":
        if not isinstance(value, list) or not value or any(
                not isinstance(d, str) or not re.fullmatch(r"[0-9]{2,3}|2A|2B", d) or d == "20" for d in value):
            fail("must be a non-empty list of department codes as strings, e.g. ['75', '93'] "
                 "(Corsica: '2A', '2B')")
    elif name == "funders":
        if not isinstance(value, dict) or not value:
            fail("must map funder ids to shares in basis points")
        assert isinstance(value, dict)
        for funder, share in value.items():
            if not isinstance(funder, str) or not FUNDER_ID_RE.fullmatch(funder):
                fail(f"bad funder id {funder!r} (lowercase letters, digits, '-')")
            if not isinstance(share, int) or isinstance(share, bool) or share <= 0:
                fail(f"share of {funder} must be a positive integer of basis points")
        if sum(value.values()) != BASIS_POINTS:
            fail(f"shares must sum to {BASIS_POINTS} basis points (100%), got {sum(value.values())}")


def _parameter(path: Path, name: str, raw: object) -> Parameter:
    field = f"parameters.{name}"
    if not isinstance(raw, dict) or set(raw) != {"values"} or not isinstance(raw["values"], dict) or not raw["values"]:
        raise ProgramFileError(path, field, "expected {values: {DATE: {value: ..., reference: ...}}}")
    values = []
    for raw_day, entry in raw["values"].items():
        day = _date(path, f"{field}.values", raw_day)
        vfield = f"{field}.values.{day.isoformat()}"
        if not isinstance(entry, dict):
            raise ProgramFileError(path, vfield, "expected {value: ..., reference: ...}")
        unknown = set(entry) - {"value", "reference"}
        if unknown:
            raise ProgramFileError(path, f"{vfield}.{sorted(unknown)[0]}", "unknown key")
        if "value" not in entry:
            raise ProgramFileError(path, f"{vfield}.value", "missing")
        reference = entry.get("reference")
        if not isinstance(reference, str) or not reference.strip():
            raise ProgramFileError(path, f"{vfield}.reference", "every value needs a reference (law, convention, call)")
        _check_value(path, f"{vfield}.value", name, entry["value"])
        values.append(DatedValue(day, entry["value"], reference.strip()))
    values.sort(key=lambda v: v.effective_from)
    return Parameter(name, tuple(values))


def load_program(path: Path) -> Program:
    raw_bytes = path.read_bytes()
    try:
        doc = yaml.load(raw_bytes, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ProgramFileError(path, "(file)", f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ProgramFileError(path, "(file)", "expected a mapping at the top level")
    unknown = set(doc) - TOP_LEVEL_KEYS
    if unknown:
        raise ProgramFileError(path, sorted(unknown)[0], "unknown key")
    for key in ("id", "title", "tier", "period", "criteria", "parameters"):
        if key not in doc:
            raise ProgramFileError(path, key, "missing")
    pid = doc["id"]
    if not isinstance(pid, str) or not PROGRAM_ID_RE.fullmatch(pid):
        raise ProgramFileError(path, "id", "lowercase letters, digits and '-', 2 to 63 characters")
    if path.stem != pid:
        raise ProgramFileError(path, "id", f"must match the file name ({path.stem!r})")
    period = doc["period"]
    if not isinstance(period, dict) or "start" not in period or set(period) - {"start", "end"}:
        raise ProgramFileError(path, "period", "expected {start: DATE, end: DATE or null}")
    start = _date(path, "period.start", period["start"])
    end = None if period.get("end") is None else _date(path, "period.end", period["end"])
    if end is not None and end < start:
        raise ProgramFileError(path, "period.end", "is before period.start")
    criteria = doc["criteria"]
    if not isinstance(criteria, list) or not criteria:
        raise ProgramFileError(path, "criteria", "expected a non-empty list")
    for i, c in enumerate(criteria):
        if c not in CRITERIA:
            raise ProgramFileError(path, f"criteria[{i}]", f"unknown criterion {c!r}; known: {', '.join(CRITERIA)}")
        if c in criteria[:i]:
            raise ProgramFileError(path, f"criteria[{i}]", f"criterion {c!r} is listed twice")
    params_raw = doc["parameters"]
    if not isinstance(params_raw, dict):
        raise ProgramFileError(path, "parameters", "expected a mapping")
    needed = set(COMMON_PARAMETERS) | {p for c in criteria for p in CRITERIA[c]}
    for name in sorted(needed - set(params_raw)):
        raise ProgramFileError(path, f"parameters.{name}", "missing")
    for name in sorted(set(params_raw) - needed - set(OPTIONAL_PARAMETERS)):
        raise ProgramFileError(path, f"parameters.{name}", "unknown parameter for these criteria")
    parameters = {name: _parameter(path, name, params_raw[name]) for name in sorted(params_raw)}
    for name, param in parameters.items():
        if param.values[0].effective_from > start:
            raise ProgramFileError(path, f"parameters.{name}.values",
                                   f"first value starts after the program ({start.isoformat()})")
    for key in ("title", "description", "tier"):
        if key in doc and not isinstance(doc[key], str):
            raise ProgramFileError(path, key, "expected text")
    return Program(
        id=pid,
        title=doc["title"],
        description=str(doc.get("description") or ""),
        tier=doc["tier"],
        start=start,
        end=end,
        criteria=tuple(criteria),
        parameters=parameters,
        version=hashlib.sha256(raw_bytes).hexdigest()[:16],
        source=path,
    )


class ProgramCatalog:
    """The programs in force, by id. Immutable once loaded."""

    def __init__(self, programs: list[Program]) -> None:
        self._by_id = {p.id: p for p in sorted(programs, key=lambda p: p.id)}

    @classmethod
    def load(cls, directory: Path) -> "ProgramCatalog":
        if not directory.is_dir():
            raise ProgramFileError(directory, "(folder)", "programs folder not found")
        files = sorted(directory.glob("*.yaml"))
        if not files:
            raise ProgramFileError(directory, "(folder)", "no *.yaml program file")
        return cls([load_program(f) for f in files])

    def get(self, program_id: str) -> Program | None:
        return self._by_id.get(program_id)

    def all(self) -> list[Program]:
        return list(self._by_id.values())

    def funded_by(self, funder: str) -> list[str]:
        """Ids of programs the funder has a share of on any date: a superset of what it may audit,
        which is the activations it has a share of (entitlement.audit.funds)."""
        return [p.id for p in self._by_id.values()
                if any(funder in v.value for v in p.parameters["funders"].values)]
