"""Synthetic registry extracts: invented people only, for the demo, tests and benchmarks."""

from __future__ import annotations

import csv
import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path

from entitlement.registry import REQUIRED_COLUMNS

FIRST = ["Camille", "Dominique", "Claude", "Alix", "Sacha", "Charlie", "Maxime", "Andrea", "Lou", "Noa"]
LAST = ["Martin", "Bernard", "Thomas", "Petit", "Robert", "Richard", "Durand", "Dubois", "Moreau", "Laurent"]
POSTAL = ["75011", "75020", "93100", "94200", "92000", "77100", "91000", "95000", "69003", "13001",
          "31000", "59000", "33000", "44000", "67000", "97400", "20000"]
COLUMNS = ["identifiant", "civilite", "nom", "prenom", *REQUIRED_COLUMNS[1:]]

# Well-known demo people (README "Demo"): identifiant, birth date, postal code, registered, ended, category
KNOWN = [
    ("DEMO0001", "1990-05-17", "75011", "2024-01-10", "", "1"),   # eligible to Premium, lives in Paris
    ("DEMO0002", "1985-02-03", "69003", "2023-06-01", "2025-03-31", "1"),  # registration ended
    ("DEMO0003", "1978-11-30", "13001", "2022-09-15", "", "6"),   # category 6: not a job seeker
    ("DEMO0004", "2001-07-22", "93100", "2025-02-01", "", "2"),   # eligible, Seine-Saint-Denis
    ("DEMO0005", "1996-02-29", "31000", "2025-09-01", "", "4"),   # eligible, born on 29 February
]


def rows(n: int, seed: int = 2015) -> Iterator[dict[str, str]]:
    """The KNOWN people, then n - len(KNOWN) random ones (identifiants SYN0000001, ...)."""
    for ident, born, postal, since, until, cat in KNOWN[:n]:
        yield {"identifiant": ident, "civilite": "", "nom": "Demo", "prenom": ident.title(),
               "dateNaissance": born, "codePostal": postal, "dateInscription": since,
               "dateCessationInscription": until, "codeCategorieInscription": cat}
    rnd = random.Random(seed)
    base = dt.date(2010, 1, 1)
    for i in range(max(0, n - len(KNOWN))):
        birth = dt.date(1955, 1, 1) + dt.timedelta(days=rnd.randrange(0, 365 * 50))
        reg = base + dt.timedelta(days=rnd.randrange(0, 365 * 16))
        ended = reg + dt.timedelta(days=rnd.randrange(30, 900)) if rnd.random() < 0.3 else None
        yield {"identifiant": f"SYN{i + 1:07d}", "civilite": rnd.choice(["M", "MME"]),
               "nom": rnd.choice(LAST), "prenom": rnd.choice(FIRST), "dateNaissance": birth.isoformat(),
               "codePostal": rnd.choice(POSTAL), "dateInscription": reg.isoformat(),
               "dateCessationInscription": ended.isoformat() if ended else "",
               "codeCategorieInscription": str(rnd.choice([1, 1, 1, 2, 3, 4, 5, 6, 7, 8]))}


def write(path: Path, n: int, seed: int = 2015) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows(n, seed))
