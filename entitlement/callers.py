"""Who calls: callers, their role and scope, resolved from a bearer token (or, under mutual TLS,
from a platform's client certificate).

Two sources, both read (nothing is copied from one to the other):
- the credentials file (ENTITLEMENT_CALLERS_FILE, JSON): per caller the SHA-256 of its bearer
  token (never the token itself), its role and its scope. Read once at start; the bootstrap source
  (local demo, tests, the first admin). No expiry, no rotation: edit the file and restart;
- the `caller_credentials` table, managed with `entitlement callers create|list|rotate|revoke`
  (entitlement/credentials.py): tokens with an expiry, rotation with an overlap, revocation.

Why SHA-256 and not bcrypt/argon2: our tokens are 32 random bytes (256 bits), not passwords. Nobody
can brute-force a 256-bit preimage, so a slow hash would add nothing but CPU per call; a fast hash
also lets the database find a token by an indexed equality lookup.

Lookups in the table are cached in memory for ENTITLEMENT_CALLER_CACHE_SECONDS (default 10) per
token, so a call does not hit the database each time: a revocation takes effect on every server
process within that time. Expiry is checked against the clock at each call, on the cached row.
A token the table does not hold is not remembered: it is looked up again at its next call (a
caller created meanwhile is accepted at once, and random tokens cannot push the entries of real
callers out of the bounded cache).
The Caller value handed to handlers is the same whatever the source.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entitlement.errors import PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from entitlement.storage.db import Database

ROLES = ("platform", "advisor", "funder", "agency", "admin")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# An advisor's agency code: stored with each activation it makes (activations.agency_code, 16
# characters) and in the actor of its events; ListActivations filters on it with the same pattern.
AGENCY_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$")


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


def new_token() -> str:
    """A fresh bearer token: 32 random bytes, URL-safe base64 (43 characters), never beginning with
    "-": one in 64 did, and `entitlement check ... --token -Xy...` then failed ("argument --token:
    expected one argument"; argparse takes it for an option). Drawing again costs under 0.03 bits."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{16,512}$")  # anything else is refused without a lookup


class CallerDirectory:
    """The credentials file: token hash -> caller."""

    def __init__(self, entries: dict[str, Caller]) -> None:
        self._by_hash = entries
        self._by_id = {c.id: c for c in entries.values()}
        self.platforms = frozenset(c.platform_id for c in entries.values() if c.role == "platform")

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
        first: dict[str, tuple[int, Caller]] = {}  # by id and by token hash: the entry that came first
        for i, raw in enumerate(doc.get("callers", []) if isinstance(doc, dict) else []):
            where = f"callers file {path}: callers[{i}]"
            if not isinstance(raw, dict):
                raise SystemExit(f"{where}: expected an object")
            digest = raw.get("token_sha256", "")
            if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
                raise SystemExit(f"{where}.token_sha256: expected 64 lowercase hex digits")
            caller = _caller(where, raw)
            # One id is one caller (several tokens of one caller are fine), one token one entry: the
            # later entry silently took the token, or the id, of the earlier one.
            if "t:" + digest in first:
                raise SystemExit(f"{where}.token_sha256: the token of callers[{first['t:' + digest][0]}] too")
            seen = first.get("i:" + caller.id)
            if seen is not None and seen[1] != caller:
                raise SystemExit(f"{where}.id: {caller.id} is callers[{seen[0]}] already, with another role or "
                                 "scope (one id, one caller)")
            first.setdefault("i:" + caller.id, (i, caller))
            first["t:" + digest] = (i, caller)
            entries[digest] = caller
        return cls(entries)

    @classmethod
    def empty(cls) -> "CallerDirectory":
        return cls({})

    def resolve(self, token: str) -> Caller | None:
        # Looked up by the SHA-256 of the token: timing reveals nothing usable about the token.
        return self._by_hash.get(token_hash(token))

    def resolve_digest(self, digest: str) -> Caller | None:
        """`resolve` for a token whose SHA-256 (hex) the caller already computed."""
        return self._by_hash.get(digest)

    def get(self, caller_id: str) -> Caller | None:
        return self._by_id.get(caller_id)


@dataclass(frozen=True)
class Credential:
    """A caller as one of its credentials presents it, with that credential's validity."""

    caller: Caller
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None

    def problem(self, now: dt.datetime) -> str:
        """"" when usable now, else REVOKED, EXPIRED or MISCONFIGURED (an advisor made before agency
        codes were held to 16 characters, the size activations store: every activation it made
        would fail)."""
        if self.revoked_at is not None:  # at once, whatever the clocks say
            return "REVOKED"
        if self.expires_at is not None and self.expires_at <= now:
            return "EXPIRED"
        if self.caller.role == "advisor" and not AGENCY_CODE_RE.fullmatch(self.caller.agency_code):
            return "MISCONFIGURED"
        return ""


class Directory:
    """Both sources behind one lookup, with the in-memory cache of the table's answers.

    `authenticate(token)` -> Caller or an Unauthenticated error (missing, invalid, expired,
    revoked); `by_id(caller_id)` -> the caller a client certificate names, when it has a usable
    credential. The file is looked at first (no database work for its callers)."""

    MAX_ENTRIES = 10_000  # answers remembered (tokens the table holds, certificates' callers); the oldest go first

    def __init__(self, file: CallerDirectory, db: "Database | None", now: Callable[[], dt.datetime], *,
                 ttl_seconds: float = 10.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.file, self.db, self.now, self.ttl = file, db, now, ttl_seconds
        self._monotonic = monotonic
        self._cache: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    # -- the cache ------------------------------------------------------------------------------

    def _cached(self, key: str, load: Callable[[], Any], *, keep_none: bool = True) -> Any:
        """`load()`, remembered under `key` for the cache time; a None answer only with `keep_none`."""
        if self.ttl > 0:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None and self._monotonic() - hit[0] < self.ttl:
                    return hit[1]
        value = load()
        if self.ttl > 0 and (value is not None or keep_none):
            with self._lock:
                self._cache[key] = (self._monotonic(), value)
                self._cache.move_to_end(key)
                while len(self._cache) > self.MAX_ENTRIES:
                    self._cache.popitem(last=False)
        return value

    def forget(self) -> None:
        """Drop the cache (the next lookups read the table)."""
        with self._lock:
            self._cache.clear()

    # -- lookups --------------------------------------------------------------------------------

    def resolve(self, token: str) -> Caller | None:
        """The caller of a usable token, else None (kept for callers that need no reason)."""
        from entitlement.errors import Unauthenticated
        try:
            return self.authenticate(token)
        except Unauthenticated:
            return None

    def authenticate(self, token: str) -> Caller:
        if not token or not TOKEN_RE.fullmatch(token):
            raise Unauthenticated("invalid credentials", reason="CREDENTIALS_INVALID")
        digest = token_hash(token)
        caller = self.file.resolve_digest(digest)
        if caller is not None:
            return caller
        # An unknown token is not remembered (a None answer): remembered, it kept a caller created
        # just after a failed attempt with its token refused for the cache time, and a stream of
        # random tokens pushed every real caller's entry out of the cache (found by a review).
        cred: Credential | None = self._cached("t:" + digest, lambda: self._by_hash(digest), keep_none=False)
        if cred is None:
            raise Unauthenticated("invalid credentials", reason="CREDENTIALS_INVALID")
        problem = cred.problem(self.now())
        if problem == "REVOKED":
            raise Unauthenticated("these credentials were revoked", reason="CREDENTIALS_REVOKED")
        if problem == "EXPIRED":
            raise Unauthenticated("these credentials have expired", reason="CREDENTIALS_EXPIRED")
        if self.file.get(cred.caller.id) is not None:  # one id, two callers (see `shared_ids`)
            raise PermissionDenied(f"caller {cred.caller.id} is also a caller of the credentials file: an operator "
                                   "must revoke this one and create it again under another id",
                                   reason="CALLER_MISCONFIGURED")
        if problem == "MISCONFIGURED":
            raise PermissionDenied("this caller's agency code is not 1 to 16 letters, digits, '.', '_' or '-': "
                                   "an operator must create it again with a valid one", reason="CALLER_MISCONFIGURED")
        return cred.caller

    def by_id(self, caller_id: str) -> Caller | None:
        """The caller named `caller_id` (a client certificate's), when it has a usable credential."""
        caller = self.file.get(caller_id)
        if caller is not None:
            return caller
        creds: tuple[Credential, ...] = self._cached("i:" + caller_id, lambda: self._by_caller(caller_id))
        now = self.now()
        for cred in creds:
            if not cred.problem(now):
                return cred.caller
        return None

    def platform_known(self, platform_id: str) -> bool:
        """Some caller of role platform with this platform id has a usable credential (the file's
        always do): the platforms an activation may be made for. A known answer is remembered for
        the cache time; an unknown one is not (a platform created meanwhile is known at once)."""
        if platform_id in self.file.platforms:
            return True
        return bool(self._cached("p:" + platform_id, lambda: self._platform_in_table(platform_id) or None,
                                 keep_none=False))

    def _platform_in_table(self, platform_id: str) -> bool:
        if self.db is None:
            return False
        from sqlalchemy import select

        from entitlement.storage.models import CallerCredential
        with self.db.read() as s:
            rows = s.execute(select(CallerCredential).where(CallerCredential.role == "platform",
                                                            CallerCredential.platform_id == platform_id,
                                                            CallerCredential.revoked_at.is_(None))).scalars().all()
        now = self.now()
        return any(not credential_of(r).problem(now) for r in rows)

    def shared_ids(self) -> list[str]:
        """The ids of the credentials file that the table holds too: each would be two callers
        (roles and scopes of their own) under one id, sharing its rate limit, its idempotency
        records and, under mutual TLS, its certificate. The server refuses to start with any."""
        ids = sorted(self.file._by_id)
        if self.db is None or not ids:
            return []
        from sqlalchemy import select

        from entitlement.storage.models import CallerCredential
        with self.db.read() as s:
            return sorted(s.execute(select(CallerCredential.caller_id).where(
                CallerCredential.caller_id.in_(ids)).distinct()).scalars())

    def _by_hash(self, digest: str) -> Credential | None:
        if self.db is None:
            return None
        from sqlalchemy import select

        from entitlement.storage.models import CallerCredential
        with self.db.read() as s:
            row = s.execute(select(CallerCredential).where(CallerCredential.token_sha256 == digest)
                            ).scalar_one_or_none()
            return credential_of(row) if row is not None else None

    def _by_caller(self, caller_id: str) -> tuple[Credential, ...]:
        if self.db is None:
            return ()
        from sqlalchemy import select

        from entitlement.storage.models import CallerCredential
        with self.db.read() as s:
            rows = s.execute(select(CallerCredential).where(CallerCredential.caller_id == caller_id)
                             .order_by(CallerCredential.created_at.desc())).scalars().all()
            return tuple(credential_of(r) for r in rows)


def credential_of(row: Any) -> Credential:
    """A CallerCredential row as a Credential (times in UTC)."""
    def utc(t: dt.datetime | None) -> dt.datetime | None:
        return None if t is None else (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc))
    caller = Caller(id=row.caller_id, role=row.role, platform_id=row.platform_id, advisor_id=row.advisor_id,
                    agency_code=row.agency_code, funder_id=row.funder_id)
    return Credential(caller, utc(row.expires_at), utc(row.revoked_at))


SCOPE_FIELDS: dict[str, tuple[str, ...]] = {
    "platform": ("platform_id",), "advisor": ("advisor_id", "agency_code"), "funder": ("funder_id",),
    "agency": (), "admin": ()}


def _caller(where: str, raw: dict[str, Any]) -> Caller:
    role = raw.get("role")
    if role not in ROLES:
        raise SystemExit(f"{where}.role: one of {', '.join(ROLES)}")
    values = {}
    for f in ("id", *SCOPE_FIELDS[role]):
        v = raw.get(f, "")
        if f == "agency_code":
            if not isinstance(v, str) or not AGENCY_CODE_RE.fullmatch(v):
                raise SystemExit(f"{where}.{f}: required, 1 to 16 letters, digits, '.', '_' or '-'")
        elif not isinstance(v, str) or not ID_RE.fullmatch(v):
            raise SystemExit(f"{where}.{f}: required, letters, digits, '.', '_' or '-'")
        values[f] = v
    return Caller(role=role, **values)


def make_caller(caller_id: str, role: str, **scope: str) -> Caller:
    """A Caller checked like the file's entries (ValueError naming the problem): the scope fields
    of the role are required, the others must be empty."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    wanted = SCOPE_FIELDS[role]
    for f, v in scope.items():
        if v and f not in wanted:
            raise ValueError(f"a {role} has no {f.replace('_id', '').replace('_code', '')}")
    raw = {"id": caller_id, **{f: scope.get(f, "") for f in wanted}, "role": role}
    try:
        return _caller("caller", raw)
    except SystemExit as exc:
        raise ValueError(str(exc.code).removeprefix("caller.")) from None


def write_callers(path: Path, callers: list[Caller]) -> dict[str, str]:
    """Create a credentials file with a fresh random token per caller; returns id -> token."""
    tokens: dict[str, str] = {}
    entries = []
    for c in callers:
        token = new_token()
        tokens[c.id] = token
        entry = {k: v for k, v in asdict(c).items() if v}
        entry["token_sha256"] = token_hash(token)
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"callers": entries}, indent=2) + "\n")
    path.chmod(0o600)
    return tokens
