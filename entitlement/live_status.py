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

Resilience: each attempt has a timeout, in wall time from the connection to the answer's last
byte (a socket timeout bounds each read only: a source sending its answer a byte at a time would
hold the thread for ever; one watchdog thread cuts every attempt off at its end); timeouts,
connection errors, 5xx and malformed answers are retried with exponential backoff and full jitter
within an overall deadline, itself shortened to the caller's budget when one is given; 4xx other
than 404 and answers about someone else are not retried. A circuit breaker (closed / open /
half-open) opens after `breaker_failures` consecutive failed fetches, fails fast while open and
lets one probe through (a single attempt) after `breaker_reset_s`; a fetch cut short by its
caller's budget proves nothing about the source and counts neither way. Standard library only; the
client is thread-safe. (Not bounded: the host name's resolution, getaddrinfo; use an IP address or
a local resolver when that matters.)
"""

from __future__ import annotations

import datetime as dt
import heapq
import ipaddress
import http.client
import itertools
import json
import os
import random
import re
import socket
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
# A civil date: YYYY-MM-DD, or that day's midnight as a date-time (`T00:00:00`, zero fractions, an
# optional offset): some status APIs give dates so. Any other time of day is refused (`malformed`),
# never cut to its first 10 characters: a date sent as an instant in UTC ("2026-03-16T23:00:00Z"
# for 17 March in Paris) would become the day before (a registration read as ended a day early).
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T00:00(:00(\.0+)?)?(Z|[+-][0-9]{2}:?[0-9]{2})?)?")
_POSTAL_RE = re.compile(r"^[0-9]{5}$")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class LiveStatusUnavailable(Exception):
    """The live source gave no usable answer. `reason` is a short code (`timeout`, `connection`,
    `http_error`, `malformed`, `rejected`, `mismatch`: an answer about someone else or naming
    nobody, `breaker_open`, `deadline`: the caller's deadline left no time or cut the fetch short
    before the source failed on its own account); `status` the HTTP status when there was one. The
    message never names the person."""

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

    def release(self, probe: bool = False) -> None:
        """A call that proved nothing either way (cut short by its caller's deadline): nothing
        counted; a probe's turn passes to the next call."""
        if probe:
            with self._lock:
                self._probing = False


class _Alarm:
    __slots__ = ("action", "fired")

    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action
        self.fired = False


class _Watchdog:
    """One daemon thread for the ends of every attempt in flight (started at the first; a
    threading.Timer would start a thread per live call): a heap of (time.monotonic() deadline,
    alarm), disarmed alarms dropped when they reach its top. An alarm's action runs on that thread
    under the watchdog's lock: once `disarm` has returned, it has run to its end or never will (the
    attempt may then close its socket: a closed socket's number may be another's by then). Actions
    must be short and never block."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """No alarm, no thread (also in a forked child: it has none of its parent's threads)."""
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._order = itertools.count()  # (ties: never compare two alarms)
        self._thread: threading.Thread | None = None

    def arm(self, at: float, action: Callable[[], None]) -> _Alarm:
        alarm = _Alarm(action)
        with self._cond:
            heapq.heappush(self._heap, (at, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="live-status-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._cond.notify()  # sooner than what the thread waits for
        return alarm

    def disarm(self, alarm: _Alarm) -> bool:
        """Stop the alarm: True when in time, False when its action ran."""
        with self._cond:
            alarm.action = None
            return not alarm.fired

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                now = time.monotonic()
                while heap and (heap[0][2].action is None or heap[0][0] <= now):
                    alarm = heapq.heappop(heap)[2]
                    if alarm.action is not None:
                        alarm.fired = True
                        try:
                            alarm.action()
                        except Exception:  # noqa: BLE001 - the watchdog must outlive any action
                            pass
                        alarm.action = None
                self._cond.wait(heap[0][0] - now if heap else None)


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.reset)


def _cut(conn: http.client.HTTPConnection) -> None:
    """(The watchdog's action, at an attempt's end.) Shut the attempt's socket down: a blocked read
    or write returns or fails at once. socket.socket's own method: SSLSocket's would first try a
    TLS goodbye. No socket yet (or a TLS one still in its handshake, which the TLS layer bounds by
    the timeout on its own): the attempt sees the alarm has gone off once connected."""
    sock = conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass


def _loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name


class LiveStatusClient:
    def __init__(self, base_url: str, timeout_s: float, retries: int, backoff_base_s: float,
                 breaker_failures: int, breaker_reset_s: float, bearer_token: str = "",
                 clock: Callable[[], float] = time.monotonic, *, deadline_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
                 insecure: bool = False) -> None:
        """`deadline_s` bounds a whole fetch (attempts and waits); by default the worst case of
        the attempts and backoffs. `clock` drives the deadline and the breaker; `sleep` the
        backoff waits (both injectable for tests). `insecure`: an http:// URL may name another host
        than a loopback address (ENTITLEMENT_INSECURE, as for the server's own plaintext)."""
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the live status URL must be http:// or https:// with a host")
        if not base_url.isascii():
            raise ValueError("the live status URL must be ASCII (percent-encode its path)")
        # Each request carries a person's identifiant and birth date, and the bearer token: in
        # clear only to this machine (found by a review: the server's own plaintext guard did not
        # cover its outgoing calls).
        if parts.scheme == "http" and not insecure and not _loopback_host(parts.hostname):
            raise ValueError("an http:// URL is allowed only to a loopback address (identifiants, birth dates "
                             "and the token would cross the network in clear): use https://, or set "
                             "ENTITLEMENT_INSECURE=1")
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

    def fetch(self, agency_id: str, birth_date: dt.date, budget_s: float | None = None) -> PersonFacts | None:
        """The person's facts, or None when the source does not know them (404) or knows them
        with another birth date. Raises LiveStatusUnavailable when no usable answer came. The
        source is asked for the canonical identifiant (`normalize_agency_id`, the form person keys
        are made of), and an answer counts only if it names exactly that one (else `mismatch`).
        `budget_s`: the most time the caller gives the whole fetch (None: `deadline_s`); when it
        leaves none, or cuts the fetch short before the source failed on its own account, the
        reason is `deadline` and the breaker counts nothing (the source may be fine)."""
        agency_id = normalize_agency_id(agency_id)
        if budget_s is not None and budget_s <= 0:
            raise LiveStatusUnavailable("deadline", "live status source not asked: no time left in the call")
        ticket = self.breaker.acquire()
        if ticket is None:
            raise LiveStatusUnavailable("breaker_open", "live status source unavailable: circuit breaker open")
        ok = neutral = False
        try:
            result = self._fetch(agency_id, birth_date, 1 if ticket else self.retries + 1, budget_s)
            ok = True
            return result
        except LiveStatusUnavailable as exc:
            neutral = exc.reason == "deadline"
            raise
        finally:  # any other outcome, even an unexpected error, counts as a failure
            if ok:
                self.breaker.success()
            elif neutral:
                self.breaker.release(probe=ticket)
            else:
                self.breaker.failure(probe=ticket)

    def _fetch(self, agency_id: str, birth_date: dt.date, attempts: int,
               budget_s: float | None) -> PersonFacts | None:
        query = urllib.parse.urlencode({"identifiant": agency_id, "dateNaissance": birth_date.isoformat()})
        target = f"{self._path}?{query}"
        start = self._clock()
        own = start + self.deadline_s
        deadline = own if budget_s is None else min(own, start + budget_s)
        # failed: an attempt failed on the source's own account (not a timeout the caller's budget
        # made shorter than `timeout_s`)
        last, made, failed = _Retryable("timeout"), 0, False
        for attempt in range(attempts):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            made += 1
            cut_by_caller = deadline < own and remaining < self.timeout_s
            try:
                status, body = self._get(target, min(self.timeout_s, remaining))
                if status == 404:
                    return None
                if 400 <= status < 500 or 300 <= status < 400:
                    raise LiveStatusUnavailable("rejected", f"live status source refused the request: "
                                                f"HTTP {status} (not retried)", status)
                if status != 200:
                    raise _Retryable("http_error", status)
                try:
                    return _parse(body, agency_id, birth_date)
                except (_Retryable, LiveStatusUnavailable):
                    raise
                except Exception:  # noqa: BLE001 - whatever the answer, it only ever means "no answer"
                    raise _Retryable("malformed") from None
            except _Retryable as exc:
                last = exc
                failed = failed or not (cut_by_caller and exc.reason == "timeout")
            if attempt + 1 < attempts:
                wait = self._rng.uniform(0, self.backoff_base_s * 2 ** attempt)  # full jitter
                if self._clock() + wait >= deadline:
                    break
                self._sleep(wait)
        if deadline < own and not failed:
            raise LiveStatusUnavailable("deadline", f"live status source unavailable: the call's deadline "
                                        f"cut it short (after {made} attempt(s))")
        detail = f"HTTP {last.status}" if last.status else last.reason
        raise LiveStatusUnavailable(last.reason, f"live status source unavailable: {detail} "
                                    f"(after {made} attempt(s))", last.status)

    def _get(self, target: str, timeout: float) -> tuple[int, bytes]:
        """One attempt, cut off `timeout` seconds (wall time) after it starts (reason `timeout`)."""
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        alarm = _WATCHDOG.arm(time.monotonic() + timeout, lambda: _cut(conn))
        cut = False
        try:
            try:
                conn.connect()
                if alarm.fired:  # it went off before there was a socket to shut down
                    raise TimeoutError
                conn.request("GET", target, headers=self._headers)
                resp = conn.getresponse()
                body = resp.read(MAX_BODY + 1) if resp.status == 200 else b""
            finally:
                cut = not _WATCHDOG.disarm(alarm)
            if cut:  # what came may have been cut short (a body without a length ends at the cut)
                raise _Retryable("timeout")
            return resp.status, body
        except TimeoutError:
            raise _Retryable("timeout") from None
        except (OSError, ValueError, http.client.HTTPException):
            raise _Retryable("timeout" if cut else "connection") from None
        finally:
            conn.close()


def _parse(body: bytes, agency_id: str, birth_date: dt.date) -> PersonFacts | None:
    """Keep only the fields the rules need; anything unusable is `malformed` (retried), an answer
    not naming exactly this person `mismatch` (LiveStatusUnavailable)."""
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
    except (ValueError, KeyError, TypeError, RecursionError):  # (UnicodeDecodeError is a ValueError;
        raise _Retryable("malformed") from None                 # RecursionError: JSON nested too deep)
    # An answer about someone else, or naming nobody, is no answer about this person (not "not
    # registered": the snapshot decides instead), and a source giving one is broken (not retried;
    # a breaker failure). Both sides in canonical form, then compared exactly: the same person as
    # the person key the decision is recorded under, never a near match.
    if not isinstance(ident, str) or normalize_agency_id(ident) != normalize_agency_id(agency_id):
        raise LiveStatusUnavailable("mismatch", "live status source answered about someone else, or "
                                    "named nobody (not retried)")
    if answered_birth != birth_date:
        return None  # answered exactly like an unknown identifier
    return PersonFacts(birth_date=answered_birth, postal_code=postal, registered_on=registered,
                       registration_ended_on=ended, category=category)


def _date(value: object) -> dt.date:
    if not isinstance(value, str) or not _DATE_RE.fullmatch(value):
        raise ValueError
    return dt.date.fromisoformat(value[:10])
