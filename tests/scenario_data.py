"""Loads the scenario files of tests/scenarios/ (data, readable without Python): person facts,
a date, the expected decision. Each registered person gets a stable identifiant `SCnnnnnn` so the
same cases can be imported into the test registry and checked through the real server."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from entitlement import rules

DIR = Path(__file__).parent / "scenarios"


@dataclass(frozen=True)
class Scenario:
    file: str
    program_id: str
    name: str
    day: dt.date
    agency_id: str | None  # None: not in the registry
    facts: rules.PersonFacts | None
    mentor: str
    usage: tuple[int, int] | None
    registry_extracted_on: dt.date | None
    eligible: bool
    reasons: frozenset[str]
    access_end: dt.date | None
    total_cents: int | None

    @property
    def id(self) -> str:
        return f"{self.program_id}: {self.name}"

    @property
    def server_checkable(self) -> bool:
        """Usage and data age are circumstances of the live server; those cases run on pure rules."""
        return self.usage is None and self.registry_extracted_on is None


def _date(v: Any) -> dt.date:
    return v if isinstance(v, dt.date) else dt.date.fromisoformat(str(v))


def load() -> list[Scenario]:
    out: list[Scenario] = []
    n = 0
    for path in sorted(DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for case in doc["cases"]:
            person = case.get("person")
            facts, agency_id = None, None
            if person is not None:
                n += 1
                agency_id = f"SC{n:06d}"
                facts = rules.PersonFacts(
                    birth_date=_date(person["birth"]), postal_code=str(person["postal"]),
                    registered_on=_date(person["registered"]),
                    registration_ended_on=_date(person["ended"]) if person.get("ended") else None,
                    category=int(person["category"]))
            expect = case["expect"]
            usage = case.get("usage")
            out.append(Scenario(
                file=path.name, program_id=doc["program"], name=case["name"], day=_date(case["date"]),
                agency_id=agency_id, facts=facts, mentor=str(case.get("mentor", "")),
                usage=(int(usage["seats_used"]), int(usage["cents_committed"])) if usage else None,
                registry_extracted_on=_date(case["registry_extracted_on"]) if case.get("registry_extracted_on") else None,
                eligible=bool(expect["eligible"]), reasons=frozenset(expect.get("reasons", [])),
                access_end=_date(expect["access_end"]) if expect.get("access_end") else None,
                total_cents=expect.get("total_cents")))
    return out


def registry_rows() -> list[dict[str, str]]:
    """Extract rows (registry CSV columns) for every scenario person."""
    rows = []
    for s in load():
        if s.facts is None or s.agency_id is None:
            continue
        f = s.facts
        rows.append({"identifiant": s.agency_id, "nom": "Scenario", "prenom": "Person",
                     "dateNaissance": f.birth_date.isoformat(), "codePostal": f.postal_code,
                     "dateInscription": f.registered_on.isoformat(),
                     "dateCessationInscription": f.registration_ended_on.isoformat() if f.registration_ended_on else "",
                     "codeCategorieInscription": str(f.category)})
    return rows
