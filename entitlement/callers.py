"""Who calls: callers, their role and scope, resolved from a bearer token.

Step 1 reads a credentials file (ENTITLEMENT_CALLERS_FILE, JSON) holding, per caller, the SHA-256
of its bearer token (never the token itself), its role and its scope. Step 5 replaces the file by
managed credentials with expiry and rotation; the Caller value handed to handlers stays the same.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROLES = ("platform", "advisor", "funder", "agency", "admin")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Caller:
    id: str
    role: str
    platform_id: str = ""
    advisor_id: str = ""
    agency_code: str = ""
    funder_id: str = ""

    @property
    def actor(self) -> str:
        """How this caller appears as the actor of events (ids of staff, never of job seekers)."""
        if self.role == "advisor":
            return f"advisor:{self.advisor_id}@{self.agency_code}"
        if self.role == "platform":
            return f"platform:{self.platform_id}"
        if self.role == "funder":
            return f"funder:{self.funder_id}"
        if self.role == "agency":
            return f"agency:{self.id}"
        return f"admin:{self.id}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class CallerDirectory:
    def __init__(self, entries: dict[str, Caller]) -> None:
        self._by_hash = entries

    @classmethod
    def load(cls, path: Path) -> "CallerDirectory":
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise SystemExit(f"callers file {path} not found; create it with `entitlement demo init` "
                             "or set ENTITLEMENT_CALLERS_FILE") from None
        except ValueError as exc:
            raise SystemExit(f"callers file {path}: not valid JSON ({exc})") from None
        entries: dict[str, Caller] = {}
        for i, raw in enumerate(doc.get("callers", []) if isinstance(doc, dict) else []):
            where = f"callers file {path}: callers[{i}]"
            if not isinstance(raw, dict):
                raise SystemExit(f"{where}: expected an object")
            digest = raw.get("token_sha256", "")
            if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
                raise SystemExit(f"{where}.token_sha256: expected 64 lowercase hex digits")
            caller = _caller(where, raw)
            entries[digest] = caller
        return cls(entries)

    def resolve(self, token: str) -> Caller | None:
        # Looked up by the SHA-256 of the token: timing reveals nothing usable about the token.
        return self._by_hash.get(token_hash(token))


def _caller(where: str, raw: dict[str, Any]) -> Caller:
    role = raw.get("role")
    if role not in ROLES:
        raise SystemExit(f"{where}.role: one of {', '.join(ROLES)}")
    fields = {"platform": ("platform_id",), "advisor": ("advisor_id", "agency_code"),
              "funder": ("funder_id",), "agency": (), "admin": ()}[role]
    values = {}
    for f in ("id", *fields):
        v = raw.get(f, "")
        if not isinstance(v, str) or not ID_RE.fullmatch(v):
            raise SystemExit(f"{where}.{f}: required, letters, digits, '.', '_' or '-'")
        values[f] = v
    return Caller(role=role, **values)


def write_callers(path: Path, callers: list[Caller]) -> dict[str, str]:
    """Create a credentials file with a fresh random token per caller; returns id -> token."""
    tokens: dict[str, str] = {}
    entries = []
    for c in callers:
        token = secrets.token_urlsafe(32)
        tokens[c.id] = token
        entry = {k: v for k, v in asdict(c).items() if v}
        entry["token_sha256"] = token_hash(token)
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"callers": entries}, indent=2) + "\n")
    path.chmod(0o600)
    return tokens
