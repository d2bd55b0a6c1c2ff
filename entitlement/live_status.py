"""The agency's live status source (optional): one person's registration, asked when needed.

It has the shape of the state's status API (API Particulier, "statut demandeur d'emploi"):
`GET {base}/v1/statut-demandeur-emploi?identifiant=...&dateNaissance=YYYY-MM-DD`, a JSON object
with identifiant, civilite, nom, nomUsage, prenom, sexe, dateNaissance, adresse{codePostal,
INSEECommune, localite}, dateInscription, dateCessationInscription (null while registered),
codeCategorieInscription (1-8), libelleCategorieInscription, codeCertificationCNAV.

Only what the rules need is kept (PersonFacts); names and the rest are dropped as soon as the
answer is parsed. Neither the agency id, the birth date nor a name is ever logged or put in an
exception message (causes are dropped with `from None`: urllib/http.client errors can carry the
URL, which holds both).

Resilience: each attempt has a timeout; timeouts, connection errors, 5xx and malformed answers are
retried with exponential backoff and full jitter within an overall deadline; 4xx other than 404
are not retried. A circuit breaker (closed / open / half-open) opens after `breaker_failures`
consecutive failed fetches, fails fast while open and lets one probe through (a single attempt)
after `breaker_reset_s`. Standard library only; the client is thread-safe.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import random
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from entitlement.pseudonym import normalize_agency_id
from entitlement.rules import PersonFacts

PATH = "/v1/statut-demandeur-emploi"
MAX_BODY = 64 * 1024  # a status answer is well under 1 KiB
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}")
_POSTAL_RE = re.compile(r"^[0-9]{5}$")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class LiveStatusUnavailable(Exception):
    """The live source gave no usable answer. `reason` is a short code (`timeout`, `connection`,
    `http_error`, `malformed`, `rejected`, `breaker_open`); `status` the HTTP status when there
    was one. The message never names the person."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class CircuitBreaker:
    """Closed: calls pass, consecutive failures are counted. Open (after `failures` of them):
    calls fail fast. After `reset_s`, half-open: one call (the probe) passes, the others still
    fail fast; its success closes the breaker, its failure opens it again."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_s:
                return HALF_OPEN
            return self._state

    def acquire(self) -> bool | None:
        """None: refuse (open, or a probe is already out). False: a normal call. True: the probe."""
        with self._lock:
            if self._state == CLOSED:
                return False
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_s:
                self._state = HALF_OPEN
            if self._state == HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return None

    def success(self) -> None:
        with self._lock:
            self._state, self._consecutive, self._probing = CLOSED, 0, False

    def failure(self, probe: bool = False) -> None:
        with self._lock:
            self._consecutive += 1
            if self._state == HALF_OPEN or self._consecutive >= self.failures:
                self._state, self._opened_at = OPEN, self._clock()
            if probe:
                self._probing = False


class LiveStatusClient:
    def __init__(self, base_url: str, timeout_s: float, retries: int, backoff_base_s: float,
                 breaker_failures: int, breaker_reset_s: float, bearer_token: str = "",
                 clock: Callable[[], float] = time.monotonic, *, deadline_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> None:
        """`deadline_s` bounds a whole fetch (attempts and waits); by default the worst case of
        the attempts and backoffs. `clock` drives the deadline and the breaker; `sleep` the
        backoff waits (both injectable for tests)."""
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the live status URL must be http:// or https:// with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("the live status URL must have no query, fragment or credentials")
        if timeout_s <= 0 or retries < 0 or backoff_base_s < 0 or breaker_failures < 1 or breaker_reset_s < 0:
            raise ValueError("timeout must be > 0, retries >= 0, backoff >= 0, breaker failures >= 1, "
                             "breaker reset >= 0")
        if bearer_token and not re.fullmatch(r"[\x21-\x7e]+", bearer_token):
            raise ValueError("the live status token must be printable ASCII without spaces")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + PATH
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.deadline_s = deadline_s if deadline_s is not None else (
            timeout_s * (retries + 1) + backoff_base_s * (2 ** retries - 1))
        self._headers = {"Accept": "application/json", "User-Agent": "entitlement"}
        if bearer_token:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._ssl = ssl.create_default_context() if self._https else None
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset_s, clock)

    def fetch(self, agency_id: str, birth_date: dt.date) -> PersonFacts | None:
        """The person's facts, or None when the source does not know them (404) or knows them
        with another birth date. Raises LiveStatusUnavailable when no usable answer came. The
        source is asked for the canonical identifiant (`normalize_agency_id`, the form person keys
        are made of), and an answer counts only if it names exactly that one."""
        agency_id = normalize_agency_id(agency_id)
        ticket = self.breaker.acquire()
        if ticket is None:
            raise LiveStatusUnavailable("breaker_open", "live status source unavailable: circuit breaker open")
        ok = False
        try:
            result = self._fetch(agency_id, birth_date, attempts=1 if ticket else self.retries + 1)
            ok = True
            return result
        finally:  # any other outcome, even an unexpected error, counts as a failure
            if ok:
                self.breaker.success()
            else:
                self.breaker.failure(probe=ticket)

    def _fetch(self, agency_id: str, birth_date: dt.date, attempts: int) -> PersonFacts | None:
        query = urllib.parse.urlencode({"identifiant": agency_id, "dateNaissance": birth_date.isoformat()})
        target = f"{self._path}?{query}"
        deadline = self._clock() + self.deadline_s
        last, made = _Retryable("timeout"), 0
        for attempt in range(attempts):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            made += 1
            try:
                status, body = self._get(target, min(self.timeout_s, remaining))
                if status == 404:
                    return None
                if 400 <= status < 500 or 300 <= status < 400:
                    raise LiveStatusUnavailable("rejected", f"live status source refused the request: "
                                                f"HTTP {status} (not retried)", status)
                if status != 200:
                    raise _Retryable("http_error", status)
                return _parse(body, agency_id, birth_date)
            except _Retryable as exc:
                last = exc
            if attempt + 1 < attempts:
                wait = self._rng.uniform(0, self.backoff_base_s * 2 ** attempt)  # full jitter
                if self._clock() + wait >= deadline:
                    break
                self._sleep(wait)
        detail = f"HTTP {last.status}" if last.status else last.reason
        raise LiveStatusUnavailable(last.reason, f"live status source unavailable: {detail} "
                                    f"(after {made} attempt(s))", last.status)

    def _get(self, target: str, timeout: float) -> tuple[int, bytes]:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            conn.request("GET", target, headers=self._headers)
            resp = conn.getresponse()
            body = resp.read(MAX_BODY + 1) if resp.status == 200 else b""
            return resp.status, body
        except TimeoutError:
            raise _Retryable("timeout") from None
        except (OSError, http.client.HTTPException):
            raise _Retryable("connection") from None
        finally:
            conn.close()


def _parse(body: bytes, agency_id: str, birth_date: dt.date) -> PersonFacts | None:
    """Keep only the fields the rules need; anything unusable is `malformed` (retried)."""
    try:
        if len(body) > MAX_BODY:
            raise ValueError
        raw: Any = json.loads(body.decode("utf-8"))
        if not isinstance(raw, dict):
            raise ValueError
        ident = raw.get("identifiant")
        answered_birth = _date(raw["dateNaissance"])
        address = raw["adresse"]
        postal = address["codePostal"] if isinstance(address, dict) else None
        if not isinstance(postal, str) or not _POSTAL_RE.fullmatch(postal):
            raise ValueError
        registered = _date(raw["dateInscription"])
        ended_raw = raw.get("dateCessationInscription")
        ended = None if ended_raw in (None, "") else _date(ended_raw)
        category = raw["codeCategorieInscription"]
        if isinstance(category, str) and category.isdigit():
            category = int(category)
        if isinstance(category, bool) or not isinstance(category, int) or not 1 <= category <= 8:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _Retryable("malformed") from None
    # An answer about someone else is no answer. Both sides in canonical form, then compared
    # exactly: the same person as the person key the decision is recorded under, never a near match.
    if ident is not None and normalize_agency_id(str(ident)) != normalize_agency_id(agency_id):
        return None
    if answered_birth != birth_date:
        return None  # answered exactly like an unknown identifier
    return PersonFacts(birth_date=answered_birth, postal_code=postal, registered_on=registered,
                       registration_ended_on=ended, category=category)


def _date(value: object) -> dt.date:
    if not isinstance(value, str) or not _DATE_RE.match(value):
        raise ValueError
    return dt.date.fromisoformat(value[:10])
