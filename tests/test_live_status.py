"""The live status source: the client against a local fake of the agency's endpoint (timeouts,
retries, circuit breaker, minimisation), then through the real server on both backends (the
decision follows the live answer, or falls back to the snapshot and says so)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import socket
import ssl
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest

from support import TODAY, As, Harness, date_msg, identity, next_person

from entitlement import app, facts, live_status, rules
from entitlement.config import ROOT, Settings
from entitlement.live_status import (CLOSED, HALF_OPEN, OPEN, LiveStatusClient,
                                     LiveStatusUnavailable)
from entitlement.programs import ProgramCatalog
from entitlement.registry import SnapshotRef
from entitlement.server_main import Serving, start
from entitlement.tls import make_ca
from entitlement.v1 import activation_pb2, eligibility_pb2

PATH = "/v1/statut-demandeur-emploi"
BIRTH = dt.date(1990, 5, 17)
SECRET_NAMES = ("DUPONTEL", "Jeanne-Marie", "DURANDEAU")


def agency_record(ident: str, birth: dt.date | str, *, postal: str = "75011", registered: str = "2024-01-15",
                  ended: str | None = None, category: Any = 1) -> dict[str, Any]:
    """An answer of the API Particulier shape ("statut demandeur d'emploi")."""
    return {"identifiant": ident, "civilite": "MME", "nom": SECRET_NAMES[0], "nomUsage": SECRET_NAMES[2],
            "prenom": SECRET_NAMES[1], "sexe": "F", "dateNaissance": str(birth),
            "adresse": {"codePostal": postal, "INSEECommune": "75111", "localite": "PARIS 11"},
            "dateInscription": registered, "dateCessationInscription": ended,
            "codeCategorieInscription": category,
            "libelleCategorieInscription": "PERSONNE SANS EMPLOI DISPONIBLE DUREE INDETERMINEE PLEIN TPS",
            "codeCertificationCNAV": "VC"}


class FakeAgency:
    """The agency's status endpoint on 127.0.0.1, with switchable behaviours. Each request takes
    the next behaviour of `script`, else `default`: `ok` (the person of `people`, 404 when
    unknown), `slow` (answers after `slow_s`, longer than the client's timeout), `block` (waits
    for `release`), `500`, `503`, `malformed` (not JSON), `nested` (JSON nested deeper than the
    parser's recursion limit), `401`, `drop` (closes the connection)."""

    def __init__(self) -> None:
        self.people: dict[str, dict[str, Any]] = {}
        self.script: list[str] = []
        self.default = "ok"
        self.slow_s = 5.0
        self.requests = 0
        self.seen: list[tuple[str, dict[str, str], str | None]] = []
        self.release = threading.Event()
        self.stopping = threading.Event()
        self.arrived = threading.Condition()
        agency = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                agency._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the client gave up on a slow answer: a broken pipe is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def start(self) -> "FakeAgency":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self.arrived:
            self.people.clear()
            self.script.clear()
            self.default = "ok"
            self.requests = 0
            self.seen.clear()
            self.release.clear()

    def wait_for_requests(self, n: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: self.requests >= n, timeout=10)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        with self.arrived:
            self.requests += 1
            self.seen.append((url.path, query, h.headers.get("Authorization")))
            behaviour = self.script.pop(0) if self.script else self.default
            self.arrived.notify_all()
        if behaviour == "slow":
            self.stopping.wait(self.slow_s)
        elif behaviour == "block":
            self.release.wait(10)
        if behaviour in ("500", "503", "401"):
            self._send(h, int(behaviour), b'{"error": "x"}')
        elif behaviour == "malformed":
            self._send(h, 200, b'{"identifiant": "P1", "dateNaissance": ')
        elif behaviour == "nested":
            self._send(h, 200, b"[" * 50_000)
        elif behaviour == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        elif url.path != PATH or query.get("identifiant") not in self.people:
            self._send(h, 404, b'{"error": "not_found"}')
        else:
            self._send(h, 200, json.dumps(self.people[query["identifiant"]]).encode())

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except OSError:
            pass


class Trickle:
    """A source on 127.0.0.1 that sends `head` at once, then `tail` one byte every `every_s`
    seconds (each byte well within the client's per-read timeout, the whole far beyond it); over
    TLS with `tls` (a TLS record a byte)."""

    def __init__(self, head: bytes, tail: bytes, every_s: float = 0.05, tls: ssl.SSLContext | None = None) -> None:
        self.head, self.tail, self.every_s, self.tls = head, tail, every_s, tls
        self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def http_body(cls, body: bytes) -> "Trickle":
        """An HTTP 200 whose headers come at once, its body a byte at a time."""
        return cls(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                   % len(body), body)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.recv(65536)  # the request
            conn.sendall(self.head)
            for i in range(len(self.tail)):
                if self.stopping.wait(self.every_s):
                    return
                conn.sendall(self.tail[i:i + 1])
        except OSError:
            pass  # the client cut it off
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()


@contextmanager
def trickling(head: bytes, tail: bytes, tls: ssl.SSLContext | None = None) -> Iterator[Trickle]:
    t = Trickle(head, tail, tls=tls)
    try:
        yield t
    finally:
        t.stop()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def agency() -> Iterator[FakeAgency]:
    fake = FakeAgency().start()
    try:
        yield fake
    finally:
        fake.stop()


def client(agency: FakeAgency, **kw: Any) -> LiveStatusClient:
    args: dict[str, Any] = dict(timeout_s=2.0, retries=2, backoff_base_s=0.001, breaker_failures=100,
                                breaker_reset_s=30, bearer_token="")
    args.update(kw)
    return LiveStatusClient(agency.url, **args)


def unavailable(c: LiveStatusClient, ident: str = "P1", birth: dt.date = BIRTH) -> LiveStatusUnavailable:
    with pytest.raises(LiveStatusUnavailable) as info:
        c.fetch(ident, birth)
    return info.value


def assert_nothing_personal(exc: BaseException, ident: str = "P1", birth: dt.date = BIRTH) -> None:
    text = "".join(traceback.format_exception(exc))
    for secret in (ident, birth.isoformat(), *SECRET_NAMES):
        assert secret not in text


# ------------------------------------------------------------------------------------ answers

def test_registered_person_keeps_only_the_facts_rules_need(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH, postal="93100", ended="2026-02-28", category=2)
    c = client(agency, bearer_token="s3cret-token")
    got = c.fetch("P1", BIRTH)
    assert got == rules.PersonFacts(BIRTH, "93100", dt.date(2024, 1, 15), dt.date(2026, 2, 28), 2)
    # Minimisation: the facts type has no place for names, and nothing of them is kept.
    assert set(rules.PersonFacts._fields) == {
        "birth_date", "postal_code", "registered_on", "registration_ended_on", "category"}
    assert not any(name in repr(got) for name in SECRET_NAMES)
    assert agency.seen == [(PATH, {"identifiant": "P1", "dateNaissance": "1990-05-17"}, "Bearer s3cret-token")]
    assert c.breaker.state == CLOSED


def test_registration_still_open_and_category_as_text(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH, ended=None, category="5")
    got = client(agency).fetch("P1", BIRTH)
    assert got is not None and got.registration_ended_on is None and got.category == 5
    assert agency.seen[0][2] is None  # no token configured: no Authorization header


def test_unknown_person_is_none(agency: FakeAgency) -> None:
    assert client(agency).fetch("NOBODY1", BIRTH) is None
    assert agency.requests == 1  # a 404 is an answer: not retried


def test_wrong_birth_date_is_answered_like_an_unknown_person(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    assert client(agency).fetch("P1", BIRTH + dt.timedelta(days=1)) is None


@pytest.mark.parametrize("ident", ["P2", None, 1, "absent"])
def test_answer_about_someone_else_or_nobody_is_no_answer(agency: FakeAgency, ident: Any) -> None:
    """Not "not registered" (None would decide NOT_REGISTERED for a registered person): no usable
    answer, not retried (asked again, a source mixing people up has no better answer), and a
    failure for the breaker (a source answering about the wrong people is broken)."""
    record = agency_record("P1", BIRTH)
    if ident == "absent":
        del record["identifiant"]
    else:
        record["identifiant"] = ident
    agency.people["P1"] = record
    c = client(agency, retries=2, breaker_failures=1)
    exc = unavailable(c)
    assert exc.reason == "mismatch"
    assert agency.requests == 1
    assert c.breaker.state == OPEN
    assert_nothing_personal(exc)


def test_base_url_with_a_path_prefix(agency: FakeAgency) -> None:
    c = LiveStatusClient(agency.url + "/", 2.0, 0, 0.001, 5, 30, "")
    agency.people["P1"] = agency_record("P1", BIRTH)
    assert c.fetch("P1", BIRTH) is not None
    c = LiveStatusClient(agency.url + "/gateway", 2.0, 0, 0.001, 5, 30, "")
    assert c.fetch("P1", BIRTH) is None  # the fake answers 404 outside its path
    assert agency.seen[-1][0] == "/gateway" + PATH


@pytest.mark.parametrize("url", ["", "ftp://host/x", "http://", "http://h/x?q=1", "http://u:p@h/"])
def test_bad_base_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        LiveStatusClient(url, 1.0, 1, 0.01, 5, 30, "")



@pytest.mark.parametrize("url", ["http://status.agency.example/api", "http://10.1.2.3:8080", "http://[2001:db8::1]/"])
def test_a_plaintext_url_to_another_host_is_refused_unless_insecure(url: str) -> None:
    """Each request carries an identifiant, a birth date and the bearer token: in clear only to
    this machine, as the server's own plaintext guard (found by a review: it accepted any host)."""
    with pytest.raises(ValueError, match="allowed only to a loopback address"):
        LiveStatusClient(url, 1.0, 1, 0.01, 5, 30, "")
    LiveStatusClient(url, 1.0, 1, 0.01, 5, 30, "", insecure=True)  # ENTITLEMENT_INSECURE=1
    LiveStatusClient(url.replace("http://", "https://"), 1.0, 1, 0.01, 5, 30, "")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost:9", "http://[::1]:9/"])
def test_a_plaintext_url_to_this_machine_is_accepted(url: str) -> None:
    LiveStatusClient(url, 1.0, 1, 0.01, 5, 30, "")


def test_a_url_that_is_not_ascii_is_refused_at_start() -> None:
    """(It gave INTERNAL at every check, http.client refusing the request line.)"""
    with pytest.raises(ValueError, match="ASCII"):
        LiveStatusClient("https://agency.example/statut-demandeur-\u00e9", 1.0, 1, 0.01, 5, 30, "")


# ---------------------------------------------------------------------------- retries, timeouts

def test_timeout_then_retry_succeeds(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    agency.script = ["slow"]
    got = client(agency, timeout_s=0.2, retries=2).fetch("P1", BIRTH)
    assert got is not None and got.postal_code == "75011"
    assert agency.requests == 2


@pytest.mark.parametrize("failure", ["500", "503", "malformed", "drop"])
def test_failures_then_success(agency: FakeAgency, failure: str) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    agency.script = [failure, failure]
    assert client(agency, retries=2).fetch("P1", BIRTH) is not None
    assert agency.requests == 3


@pytest.mark.parametrize("failure,reason,status", [("500", "http_error", 500), ("malformed", "malformed", None),
                                                    ("nested", "malformed", None), ("drop", "connection", None),
                                                    ("slow", "timeout", None)])
def test_retries_exhausted(agency: FakeAgency, failure: str, reason: str, status: int | None) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    agency.default = failure
    exc = unavailable(client(agency, retries=2, timeout_s=0.2))
    assert (exc.reason, exc.status) == (reason, status)
    assert "after 3 attempt(s)" in str(exc)
    assert agency.requests == 3
    assert_nothing_personal(exc)


@pytest.mark.parametrize("fields", [{"dateNaissance": "17/05/1990"}, {"adresse": {"codePostal": "7501"}},
                                    {"adresse": None}, {"codeCategorieInscription": 9},
                                    {"codeCategorieInscription": True}, {"dateInscription": None}])
def test_unusable_answers_are_malformed(agency: FakeAgency, fields: dict[str, Any]) -> None:
    agency.people["P1"] = {**agency_record("P1", BIRTH), **fields}
    exc = unavailable(client(agency, retries=0))
    assert exc.reason == "malformed"
    assert_nothing_personal(exc)


@pytest.mark.parametrize("value", ["1990-05-17", "1990-05-17T00:00", "1990-05-17T00:00:00",
                                   "1990-05-17T00:00:00Z", "1990-05-17T00:00:00.000+02:00",
                                   "1990-05-17T00:00:00+0100"])
def test_a_date_may_come_as_its_midnight(agency: FakeAgency, value: str) -> None:
    agency.people["P1"] = {**agency_record("P1", BIRTH), "dateNaissance": value,
                           "dateCessationInscription": value.replace("1990-05-17", "2026-03-17")}
    got = client(agency).fetch("P1", BIRTH)
    assert got is not None and (got.birth_date, got.registration_ended_on) == (BIRTH, dt.date(2026, 3, 17))


@pytest.mark.parametrize("value", ["2026-03-16T23:00:00Z", "2026-03-16T23:00:00.000+00:00", "2026-03-16T12:00",
                                   "2026-03-16 ", "2026-03-16x", "2026-03-16T00:00:00 junk"])
def test_a_date_at_another_time_of_day_is_malformed_not_cut_to_its_day(agency: FakeAgency, value: str) -> None:
    """Cut to its first 10 characters, "2026-03-16T23:00:00Z" (midnight of 17 March in Paris, as an
    instant in UTC) was read as 16 March: a registration ending on the 17th read as ended on the
    16th, a person refused REGISTRATION_ENDED on a day they were registered."""
    agency.people["P1"] = agency_record("P1", BIRTH, ended=value)
    exc = unavailable(client(agency, retries=0))
    assert exc.reason == "malformed"
    assert_nothing_personal(exc)


def test_an_unexpected_error_reading_an_answer_is_no_answer(agency: FakeAgency,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever reading an answer raises, it means "fall back to the snapshot", never an error of
    the call; and it counts against the source."""
    def broken(value: object) -> dt.date:
        raise RuntimeError(f"cannot read {value}")  # (a message that would carry personal data)
    monkeypatch.setattr(live_status, "_date", broken)
    agency.people["P1"] = agency_record("P1", BIRTH)
    c = client(agency, retries=1, breaker_failures=1)
    exc = unavailable(c)
    assert exc.reason == "malformed" and agency.requests == 2
    assert c.breaker.state == OPEN
    assert_nothing_personal(exc)


def test_client_errors_are_not_retried(agency: FakeAgency) -> None:
    agency.default = "401"
    exc = unavailable(client(agency, retries=3))
    assert (exc.reason, exc.status) == ("rejected", 401)
    assert "401" in str(exc)
    assert agency.requests == 1
    assert_nothing_personal(exc)


def test_connection_refused(agency: FakeAgency) -> None:
    with socket.socket() as s:  # bound, never listening: refused, and no other process can take the port meanwhile
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        c = LiveStatusClient(f"http://127.0.0.1:{port}", 0.5, 1, 0.001, 5, 30, "")
        exc = unavailable(c)
    assert exc.reason == "connection"
    assert_nothing_personal(exc)


def test_backoff_is_exponential_with_full_jitter(agency: FakeAgency) -> None:
    agency.default = "500"
    waits: list[float] = []
    clock = FakeClock()
    c = client(agency, retries=4, backoff_base_s=0.1, clock=clock, sleep=waits.append, rng=random.Random(7))
    unavailable(c)
    assert len(waits) == 4 and agency.requests == 5
    for k, wait in enumerate(waits):
        assert 0 <= wait <= 0.1 * 2 ** k


def test_overall_deadline_stops_retries(agency: FakeAgency) -> None:
    agency.default = "500"
    clock = FakeClock()

    def sleep(s: float) -> None:
        clock.t += 1.0  # every wait uses up a second of the deadline

    c = client(agency, retries=10, deadline_s=2.5, clock=clock, sleep=sleep)
    assert "after 3 attempt(s)" in str(unavailable(c))
    assert agency.requests == 3  # at 0, 1 and 2 seconds; none at 3, past the deadline


def fetch_within(c: LiveStatusClient, limit_s: float, ident: str = "P1", birth: dt.date = BIRTH,
                 **kw: Any) -> tuple[Any, float]:
    """(what c.fetch(ident, birth) returned or raised, seconds it took); fails when it takes more
    than `limit_s` (the fetch is then left running, in a daemon thread)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(c.fetch(ident, birth, **kw))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), f"the fetch still runs after {limit_s} s"
    return outcome[0], time.monotonic() - started


TRICKLED = json.dumps(agency_record("P1", BIRTH)).encode()  # ~500 bytes: 25 s at one every 50 ms


@pytest.mark.parametrize("part", ["body", "headers", "body_over_tls"])
def test_an_answer_trickled_in_is_cut_off_at_the_attempts_end(part: str, tmp_path: Path) -> None:
    """The socket timeout bounds each read, not the attempt: a source sending its body or its
    headers a byte every 50 ms held the thread for as long as it went on. Each attempt is cut off
    at its end (0.2 s here): a timeout, retried. Over TLS too (the socket under the TLS layer is
    shut down)."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(TRICKLED), TRICKLED)
    head, tail = (b"", response) if part == "headers" else (response[:-len(TRICKLED)], TRICKLED)
    server_tls = client_tls = None
    if part == "body_over_tls":
        ca = make_ca(tmp_path, [])
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(ca.server_cert, ca.server_key)
        client_tls = ssl.create_default_context(cafile=str(ca.ca_cert))
    with trickling(head, tail, server_tls) as source:
        scheme = "https" if client_tls else "http"
        c = LiveStatusClient(f"{scheme}://127.0.0.1:{source.port}", 0.2, 1, 0.001, 5, 30, "")
        if client_tls:
            c._ssl = client_tls  # (trusts the test CA)
        exc, took = fetch_within(c, 2.0)
        assert isinstance(exc, LiveStatusUnavailable) and exc.reason == "timeout", exc
        assert "after 2 attempt(s)" in str(exc) and source.requests == 2
        assert took < 1.0
        assert_nothing_personal(exc)


def test_one_watchdog_thread_for_every_attempt_and_none_cut_that_ended_in_time(agency: FakeAgency) -> None:
    """Not a thread per attempt: one watchdog, whatever the number of attempts. An attempt that
    ended in time is not cut afterwards (its deadline passes later), and its alarm is dropped."""
    agency.people["P1"] = agency_record("P1", BIRTH)
    # Each attempt's deadline 0.5 s: a local answer comes well within it even when the other
    # pytest-xdist worker loads both CPUs (0.05 s did not always: a fetch was cut, reason timeout).
    c = client(agency, timeout_s=0.5, retries=0)
    for _ in range(30):
        assert c.fetch("P1", BIRTH) is not None
    time.sleep(0.6)  # every deadline past
    assert c.fetch("P1", BIRTH) is not None and c.breaker.state == CLOSED
    assert [t.name for t in threading.enumerate()].count("live-status-watchdog") == 1
    until = time.monotonic() + 2.0
    while live_status._WATCHDOG._heap and time.monotonic() < until:  # (dropped by the watchdog's thread)
        time.sleep(0.01)
    assert not live_status._WATCHDOG._heap


def test_a_callers_budget_bounds_the_fetch_and_proves_nothing_about_the_source(agency: FakeAgency) -> None:
    """A caller with less time than the fetch's own deadline (3 x 2 s here) gives it `budget_s`:
    the fetch ends then (reason `deadline`), and the breaker counts nothing (one failure would open
    it here): the source may be fine, only slower than that caller can wait."""
    agency.default = "slow"
    c = client(agency, timeout_s=2.0, retries=2, breaker_failures=1)
    exc, took = fetch_within(c, 1.5, budget_s=0.2)
    assert isinstance(exc, LiveStatusUnavailable) and exc.reason == "deadline", exc
    assert took < 1.0 and agency.requests == 1
    assert c.breaker.state == CLOSED
    requests = agency.requests
    exc, took = fetch_within(c, 0.5, budget_s=0.0)  # no time left: not asked at all
    assert isinstance(exc, LiveStatusUnavailable) and exc.reason == "deadline", exc
    assert agency.requests == requests and c.breaker.state == CLOSED
    assert_nothing_personal(exc)
    # A failure of the source's own within the budget counts, as without one.
    agency.default = "500"
    exc, took = fetch_within(c, 1.5, budget_s=0.5)
    assert isinstance(exc, LiveStatusUnavailable) and exc.reason == "http_error", exc
    assert c.breaker.state == OPEN


def test_a_probe_cut_short_by_its_caller_lets_the_next_call_probe(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    agency.default = "500"
    clock = FakeClock()
    c = client(agency, timeout_s=2.0, retries=0, breaker_failures=1, breaker_reset_s=30, clock=clock)
    unavailable(c)
    clock.t += 30
    agency.default = "slow"
    exc, _ = fetch_within(c, 1.5, budget_s=0.1)  # the probe, cut short by its caller
    assert isinstance(exc, LiveStatusUnavailable) and exc.reason == "deadline", exc
    assert c.breaker.state == HALF_OPEN
    agency.default = "ok"
    assert c.fetch("P1", BIRTH) is not None  # the next probe, not "breaker_open"
    assert c.breaker.state == CLOSED


def test_live_budget() -> None:
    assert facts.live_budget(None) is None  # no deadline: the source's own bounds
    assert facts.live_budget(1.0) == pytest.approx(0.7)
    assert facts.live_budget(30.0) == pytest.approx(23.9)  # (the fetch's own deadline is shorter)
    assert facts.live_budget(0.15) == 0.0 and facts.live_budget(-1.0) == 0.0  # not worth asking


# ---------------------------------------------------------------------------- circuit breaker

def test_breaker_opens_after_consecutive_failures_and_fails_fast(agency: FakeAgency) -> None:
    agency.default = "500"
    clock = FakeClock()
    c = client(agency, retries=1, breaker_failures=2, breaker_reset_s=30, clock=clock)
    unavailable(c)
    assert c.breaker.state == CLOSED
    unavailable(c)
    assert c.breaker.state == OPEN and agency.requests == 4
    agency.default = "ok"
    for _ in range(5):
        exc = unavailable(c)
        assert exc.reason == "breaker_open"
        assert_nothing_personal(exc)
    assert agency.requests == 4  # nothing reached the source while open
    clock.t += 29
    assert unavailable(c).reason == "breaker_open" and agency.requests == 4


def test_half_open_probe_success_closes_the_breaker(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    agency.default = "500"
    clock = FakeClock()
    c = client(agency, retries=0, breaker_failures=2, breaker_reset_s=30, clock=clock)
    unavailable(c)
    unavailable(c)
    assert c.breaker.state == OPEN and agency.requests == 2
    agency.default = "ok"
    clock.t += 30
    assert c.breaker.state == HALF_OPEN
    assert c.fetch("P1", BIRTH) is not None  # the probe
    assert c.breaker.state == CLOSED and agency.requests == 3
    assert c.fetch("P1", BIRTH) is not None
    assert agency.requests == 4


def test_half_open_probe_failure_reopens_with_a_single_attempt(agency: FakeAgency) -> None:
    agency.default = "500"
    clock = FakeClock()
    c = client(agency, retries=2, breaker_failures=1, breaker_reset_s=30, clock=clock)
    unavailable(c)
    assert c.breaker.state == OPEN and agency.requests == 3
    clock.t += 31
    assert unavailable(c).reason == "http_error"
    assert agency.requests == 4  # the probe is one attempt, not retried
    assert c.breaker.state == OPEN
    assert unavailable(c).reason == "breaker_open" and agency.requests == 4
    clock.t += 31
    agency.default = "ok"
    assert c.fetch("NOBODY1", BIRTH) is None  # a 404 is an answer: the source works
    assert c.breaker.state == CLOSED


def test_only_one_probe_at_a_time(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    agency.default = "500"
    clock = FakeClock()
    c = client(agency, timeout_s=10.0, retries=0, breaker_failures=1, breaker_reset_s=30, clock=clock)
    unavailable(c)
    clock.t += 30
    agency.default = "block"
    results: list[Any] = []
    probe = threading.Thread(target=lambda: results.append(c.fetch("P1", BIRTH)))
    probe.start()
    agency.wait_for_requests(2)  # the probe is at the source, held there
    assert unavailable(c).reason == "breaker_open"  # a second caller does not get through
    assert agency.requests == 2
    agency.release.set()
    probe.join(10)
    assert results and results[0] is not None
    assert c.breaker.state == CLOSED


def test_an_answer_resets_the_failure_count(agency: FakeAgency) -> None:
    agency.people["P1"] = agency_record("P1", BIRTH)
    c = client(agency, retries=0, breaker_failures=2)
    agency.script = ["500", "ok", "500", "ok"]
    unavailable(c)
    assert c.fetch("P1", BIRTH) is not None
    unavailable(c)
    assert c.breaker.state == CLOSED
    assert c.fetch("NOBODY1", BIRTH) is None
    assert c.breaker.state == CLOSED


# ------------------------------------------------------------------ settings, context, records

def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("URL", "TOKEN", "TIMEOUT_MS", "RETRIES", "BREAKER_FAILURES", "BREAKER_RESET_S")
    for name in names:
        monkeypatch.delenv(f"ENTITLEMENT_LIVE_STATUS_{name}", raising=False)
    d = Settings.from_env()
    assert (d.live_status_url, d.live_status_token, d.live_status_timeout_ms, d.live_status_retries,
            d.live_status_breaker_failures, d.live_status_breaker_reset_s) == ("", "", 800, 2, 5, 30)
    assert app.live_status_client(d) is None
    for name, value in {"URL": "https://status.example/api", "TOKEN": "t0k", "TIMEOUT_MS": "250",
                        "RETRIES": "1", "BREAKER_FAILURES": "3", "BREAKER_RESET_S": "10"}.items():
        monkeypatch.setenv(f"ENTITLEMENT_LIVE_STATUS_{name}", value)
    s = Settings.from_env()
    assert (s.live_status_url, s.live_status_token, s.live_status_timeout_ms, s.live_status_retries,
            s.live_status_breaker_failures, s.live_status_breaker_reset_s) == (
        "https://status.example/api", "t0k", 250, 1, 3, 10)
    c = app.live_status_client(s)
    assert c is not None and c.timeout_s == 0.25 and c.retries == 1
    assert (c.breaker.failures, c.breaker.reset_s) == (3, 10)
    with pytest.raises(SystemExit):
        app.live_status_client(dataclasses.replace(s, live_status_url="ftp://x"))
    with pytest.raises(SystemExit):
        app.live_status_client(dataclasses.replace(s, live_status_breaker_failures=0))


def test_facts_source_is_recorded_with_the_decision() -> None:
    program = ProgramCatalog.load(ROOT / "programs").get("premium-job-seekers")
    assert program is not None
    person = rules.PersonFacts(BIRTH, "75011", dt.date(2024, 1, 15), None, 1)
    d = rules.evaluate(program, person, TODAY, rules.Circumstances(registry_extracted_on=TODAY,
                                                                   facts_source="live"))
    stored = rules.decision_to_dict(d)
    assert stored["circumstances"]["facts_source"] == "live"  # type: ignore[index]
    assert rules.decision_from_dict(stored) == d
    del stored["circumstances"]["facts_source"]  # type: ignore[attr-defined]
    assert rules.decision_from_dict(stored).circumstances.facts_source == "snapshot"  # decisions made before
    assert rules.Circumstances().facts_source == "snapshot"


def test_data_date() -> None:
    snap = SnapshotRef(3, TODAY - dt.timedelta(days=90))
    assert facts.data_date(snap, facts.LIVE, TODAY) == TODAY
    assert facts.data_date(snap, facts.SNAPSHOT_FALLBACK, TODAY) == snap.extracted_on
    assert facts.data_date(None, facts.SNAPSHOT, TODAY) is None


# ------------------------------------------------------------------- through the real server

@dataclass
class LiveServer:
    h: Harness
    agency: FakeAgency
    running: Serving
    channel: grpc.Channel
    client: LiveStatusClient

    def advisor(self) -> As:
        return As(self.channel, self.h.tokens["advisor-paris"])

    def platform(self) -> As:
        return As(self.channel, self.h.tokens["platform-oc"])

    def check(self, agency_id: str, birth: dt.date, timeout: float | None = None) -> Any:
        [decision] = self.advisor().CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers"),
            timeout=timeout).decisions
        return decision


@contextmanager
def serving_with_live_source(harness: Harness, url: str | None = None, max_workers: int | None = None,
                             **client: Any) -> Iterator[LiveServer]:
    """A second server on the harness's database and secrets (so its registry snapshot), with
    a live status source configured (a FakeAgency, or `url`; `client`: LiveStatusClient settings)."""
    fake = FakeAgency().start()
    settings0 = dataclasses.replace(harness.ctx.settings, listen="127.0.0.1:0")
    if max_workers is not None:
        settings0 = dataclasses.replace(settings0, max_workers=max_workers)
    ctx = app.build(settings0, clock=harness.clock)
    settings = {"timeout_s": 0.3, "retries": 1, "backoff_base_s": 0.001, "breaker_failures": 1000,
                "breaker_reset_s": 30, "bearer_token": "agency-token", **client}
    live_client = LiveStatusClient(url or fake.url, **settings)
    ctx = dataclasses.replace(ctx, live=live_client)
    running = start(ctx, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield LiveServer(harness, fake, running, channel, live_client)
    finally:
        fake.release.set()
        channel.close()
        running.stop(0)
        ctx.db.dispose()
        fake.stop()


@pytest.fixture(scope="module")
def live_server(harness: Harness) -> Iterator[LiveServer]:
    with serving_with_live_source(harness) as server:
        yield server


@pytest.fixture
def live(live_server: LiveServer) -> LiveServer:
    live_server.agency.reset()
    return live_server


def test_live_answer_decides_even_against_the_snapshot(live: LiveServer) -> None:
    agency_id, birth = next_person()  # registered and active in the snapshot
    live.agency.people[agency_id] = agency_record(agency_id, birth, registered="2024-01-15", ended="2026-03-01")
    d = live.check(agency_id, birth)
    assert d.facts_source == "live"
    assert not d.eligible
    assert [c.reason_code for c in d.criteria if not c.passed] == ["REGISTRATION_ENDED"]
    assert d.registry_snapshot == ""  # the facts were not read from a snapshot
    assert (d.registry_extracted_on.year, d.registry_extracted_on.month, d.registry_extracted_on.day) == (
        TODAY.year, TODAY.month, TODAY.day)
    assert live.agency.seen == [(PATH, {"identifiant": agency_id, "dateNaissance": birth.isoformat()},
                                 "Bearer agency-token")]


def test_a_live_answer_is_fresh_data_for_a_past_day(live: LiveServer) -> None:
    """A check of a past day (`as_of`) answered by the live source, today: data extracted after
    that day is as fresh as data can be for it, never REGISTRY_DATA_STALE."""
    agency_id, birth = next_person()
    live.agency.people[agency_id] = agency_record(agency_id, birth, registered="2024-01-15")
    day = TODAY - dt.timedelta(days=10)
    [d] = live.advisor().CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        as_of=date_msg(day))).decisions
    assert d.facts_source == "live"
    assert d.eligible, [(c.reason_code, c.detail) for c in d.criteria if not c.passed]
    fresh = next(c for c in d.criteria if c.criterion == "registry_data_fresh")
    assert fresh.passed and "0 days" in fresh.detail


def test_live_answer_registers_someone_the_snapshot_says_ended(live: LiveServer) -> None:
    birth = dt.date(1980, 4, 2)  # ENDED01 of the test registry: ended 2026-01-31 in the snapshot
    live.agency.people["ENDED01"] = agency_record("ENDED01", birth, postal="69003", registered="2020-01-06")
    d = live.check("ENDED01", birth)
    assert d.facts_source == "live" and d.eligible
    fresh = next(c for c in d.criteria if c.criterion == "registry_data_fresh")
    assert fresh.passed and "0 days" in fresh.detail


def test_live_not_found_is_not_registered(live: LiveServer) -> None:
    """A 404 about someone the snapshot does not know either (nor on that birth date): not registered."""
    d = live.check("NOBODY1", BIRTH)
    assert d.facts_source == "live" and not d.eligible
    assert "NOT_REGISTERED" in [c.reason_code for c in d.criteria]
    agency_id, birth = next_person()  # in the snapshot, but on another birth date
    d = live.check(agency_id, birth + dt.timedelta(days=1))
    assert d.facts_source == "live" and not d.eligible
    assert "NOT_REGISTERED" in [c.reason_code for c in d.criteria]
    assert live.agency.requests == 2


def test_live_not_found_about_someone_the_snapshot_knows_falls_back_to_it(live: LiveServer) -> None:
    """A source answering 404 for everyone (a wrong base path, a gateway's catch-all) refuses no
    registered person: the snapshot decides, checks and activations alike, and the log says why."""
    agency_id, birth = next_person()  # registered and eligible in the snapshot; the fake does not know them
    d = live.check(agency_id, birth)
    assert (d.facts_source, d.eligible) == ("snapshot_fallback", True), [
        c.reason_code for c in d.criteria if not c.passed]
    assert d.registry_snapshot.startswith("registrySnapshots/")
    other_id, other_birth = next_person()
    act = live.advisor().ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(other_id, other_birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="live 404 test")).activation
    assert act.decision.facts_source == "snapshot_fallback" and act.decision.eligible
    assert act.decision.registry_snapshot.startswith("registrySnapshots/")
    d = live.check("ENDED01", dt.date(1980, 4, 2))  # known to the snapshot as ended: its reason, not NOT_REGISTERED
    assert d.facts_source == "snapshot_fallback"
    assert [c.reason_code for c in d.criteria if not c.passed] == ["REGISTRATION_ENDED"]
    assert live.agency.requests == 3  # one each: a 404 is not retried
    assert live.client.breaker.state == CLOSED  # the source answered
    log = Path(live.h.log_path).read_text()
    assert '"reason": "not_found"' in log
    assert agency_id not in log and other_id not in log and birth.isoformat() not in log


def test_live_source_failing_falls_back_to_the_snapshot(live: LiveServer) -> None:
    agency_id, birth = next_person()
    live.agency.people[agency_id] = agency_record(agency_id, birth, ended="2026-03-01")
    for behaviour in ("500", "slow", "malformed", "nested"):
        live.agency.default = behaviour
        d = live.check(agency_id, birth)  # no error to the caller
        assert d.facts_source == "snapshot_fallback"
        assert d.eligible  # the snapshot's answer: registered and active
        assert d.registry_snapshot.startswith("registrySnapshots/")
    assert live.agency.requests == 8  # two attempts each
    log = Path(live.h.log_path).read_text()
    assert '"event": "live_status_unavailable"' in log
    assert agency_id not in log and birth.isoformat() not in log
    assert not any(name in log for name in SECRET_NAMES)


def test_a_registration_end_given_as_an_instant_falls_back_to_the_snapshot(live: LiveServer) -> None:
    """The source gives the end of a registration as an instant in UTC: midnight of the day after
    TODAY in Paris (2026-03-16T23:00:00Z is 17 March, 00:00 in Paris). Cut to its date, it ended
    TODAY and the person, registered today, was refused REGISTRATION_ENDED on the live answer; a
    date-time that is not a midnight is no usable answer: the snapshot decides, and says so."""
    agency_id, birth = next_person()  # registered and eligible in the snapshot
    paris_midnight = dt.datetime.combine(TODAY + dt.timedelta(days=1), dt.time(), ZoneInfo("Europe/Paris"))
    instant = paris_midnight.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert instant.startswith(TODAY.isoformat())
    live.agency.people[agency_id] = agency_record(agency_id, birth, ended=instant)
    d = live.check(agency_id, birth)
    assert (d.facts_source, d.eligible) == ("snapshot_fallback", True), [
        c.reason_code for c in d.criteria if not c.passed]
    # The same end as a date: the live answer decides (registered today, ending tomorrow).
    live.agency.people[agency_id] = agency_record(agency_id, birth, ended=(TODAY + dt.timedelta(days=1)).isoformat())
    d = live.check(agency_id, birth)
    assert (d.facts_source, d.eligible) == ("live", True), [c.reason_code for c in d.criteria if not c.passed]


def test_an_answer_about_someone_else_falls_back_to_the_snapshot(live: LiveServer) -> None:
    """The source answers 200 about another person (a gateway's mix-up, a cache keyed wrongly), or
    names nobody: no answer about this one. A registered person is not refused NOT_REGISTERED on
    it (nor anyone granted on facts that may be another's): the snapshot decides."""
    agency_id, birth = next_person()  # registered and eligible in the snapshot
    nameless = agency_record(agency_id, birth, ended="2026-03-01")
    del nameless["identifiant"]
    for record in (agency_record("ZZ" + agency_id, birth), nameless):
        live.agency.people[agency_id] = record
        d = live.check(agency_id, birth)
        assert (d.facts_source, d.eligible) == ("snapshot_fallback", True), [
            c.reason_code for c in d.criteria if not c.passed]
    assert live.agency.requests == 2  # not retried
    log = Path(live.h.log_path).read_text()
    assert '"reason": "mismatch"' in log
    assert agency_id not in log and birth.isoformat() not in log


def test_a_caller_deadline_shorter_than_the_live_source_still_gets_the_snapshot(harness: Harness) -> None:
    """The default settings (800 ms an attempt, 2 retries: 2.55 s a lookup) and an agency that
    stalls: a check with a 1 s deadline gets the snapshot's answer in time, not DEADLINE_EXCEEDED.
    That lookup, cut short by the caller, does not open the breaker (1 failure would)."""
    with serving_with_live_source(harness, timeout_s=0.8, retries=2, backoff_base_s=0.05,
                                  breaker_failures=1) as server:
        server.agency.default = "slow"
        agency_id, birth = next_person()  # registered and eligible in the snapshot
        started = time.monotonic()
        try:
            d = server.check(agency_id, birth, timeout=1.0)
        except grpc.RpcError as err:
            pytest.fail(f"{err.code().name} after {time.monotonic() - started:.2f} s instead of the snapshot's answer")
        assert (d.facts_source, d.eligible) == ("snapshot_fallback", True)
        assert server.client.breaker.state == CLOSED
        server.agency.default = "ok"
        server.agency.people[agency_id] = agency_record(agency_id, birth)
        assert server.check(agency_id, birth).facts_source == "live"


@contextmanager
def serving_with_a_trickling_source(harness: Harness, agency_id: str, birth: dt.date,
                                    max_workers: int | None = None) -> Iterator[LiveServer]:
    """A server whose live source answers 200 at once, then its body (the person's record) a byte
    every 50 ms: 25 s in all. Each attempt takes 0.3 s at most, two a lookup."""
    source = Trickle.http_body(json.dumps(agency_record(agency_id, birth)).encode())
    try:
        with serving_with_live_source(harness, url=f"http://127.0.0.1:{source.port}", max_workers=max_workers,
                                      timeout_s=0.3, retries=1) as server:
            yield server
    finally:
        source.stop()


def test_a_source_trickling_its_answer_falls_back_to_the_snapshot(harness: Harness) -> None:
    """The check gets the snapshot's answer in about 2 x 0.3 s, not DEADLINE_EXCEEDED once the
    agency has trickled for as long as the caller waits."""
    agency_id, birth = next_person()  # registered and eligible in the snapshot
    with serving_with_a_trickling_source(harness, agency_id, birth) as server:
        started = time.monotonic()
        try:
            d = server.check(agency_id, birth, timeout=2.5)
        except grpc.RpcError as err:
            pytest.fail(f"{err.code().name} after {time.monotonic() - started:.1f} s instead of the "
                        "snapshot's answer")
        assert (d.facts_source, d.eligible) == ("snapshot_fallback", True)


def test_checks_on_a_trickling_source_do_not_starve_the_server(harness: Harness) -> None:
    """Two checks given up by their callers after 1 s held both pool threads for as long as the
    agency trickled (the breaker never opened: nothing had failed), and every other call waited:
    here ListPrograms, answered in a millisecond otherwise."""
    agency_id, birth = next_person()
    with serving_with_a_trickling_source(harness, agency_id, birth, max_workers=2) as server:
        def give_up_check() -> None:
            try:
                server.check(agency_id, birth, timeout=1.0)
            except grpc.RpcError:
                pass
        checks = [threading.Thread(target=give_up_check) for _ in range(2)]
        for th in checks:
            th.start()
        for th in checks:
            th.join()
        try:
            server.advisor().ListPrograms(eligibility_pb2.ListProgramsRequest(), timeout=1.5)
        except grpc.RpcError as err:
            pytest.fail(f"ListPrograms: {err.code().name}: the pool is held by checks nobody waits for")


def test_activation_records_where_its_facts_came_from(live: LiveServer) -> None:
    agency_id, birth = next_person()
    live.agency.people[agency_id] = agency_record(agency_id, birth)
    decision = live.check(agency_id, birth)
    resp = live.advisor().ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="live test"))
    act = resp.activation
    assert act.decision.facts_source == "live" and act.decision == decision
    again = live.advisor().GetActivation(activation_pb2.GetActivationRequest(name=act.name))
    assert again.decision == decision

    other_id, other_birth = next_person()
    live.agency.default = "503"
    resp = live.advisor().ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(other_id, other_birth), program="programs/premium-job-seekers",
        platform="platforms/openclassrooms", reason="fallback test"))
    assert resp.activation.decision.facts_source == "snapshot_fallback"
    assert resp.activation.decision.registry_snapshot.startswith("registrySnapshots/")


def test_server_without_live_source_says_snapshot(harness: Harness) -> None:
    advisor = As(harness.channel, harness.tokens["advisor-paris"])
    agency_id, birth = next_person()
    [d] = advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers")).decisions
    assert d.facts_source == "snapshot" and d.eligible


def test_a_check_waiting_for_the_live_source_holds_up_no_other_call(harness: Harness) -> None:
    """With a live status source, CheckEligibility may wait on the network: it runs in the pool in
    either server model (entitlement/aio_server.py: on SQLite the event-loop server answers the hot
    reads on its loop, except such a check). While one check waits for an answer the agency holds
    back, another caller's verification is answered."""
    with serving_with_live_source(harness, timeout_s=30, retries=0) as server:
        fake = server.agency
        agency_id, birth = next_person()
        fake.people[agency_id] = agency_record(agency_id, birth)
        fake.default = "block"  # answers only once `release` is set
        answers: list[Any] = []
        checking = threading.Thread(target=lambda: answers.append(server.check(agency_id, birth)))
        checking.start()
        fake.wait_for_requests(1)  # the check is waiting for the agency
        status = server.platform().VerifyEntitlement(
            activation_pb2.VerifyEntitlementRequest(account_id="nobody-while-waiting"), timeout=20)
        assert not status.active
        assert checking.is_alive() and not answers  # answered while the check still waits
        fake.release.set()
        checking.join(timeout=20)
        assert len(answers) == 1 and answers[0].facts_source == "live" and answers[0].eligible


def test_the_cli_check_says_where_the_facts_came_from(live: LiveServer, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`entitlement check` printed `registry none` for a live answer, as if no registry data existed,
    and nothing at all when the live source failed and a registry extract decided instead (found by
    a review): the advisor at the desk could not tell an answer of today from one of an extract
    weeks old. Its header now names the source, the extract and its date, and says when the live
    source gave no usable answer."""
    from entitlement import cli
    monkeypatch.delenv("ENTITLEMENT_TOKEN", raising=False)

    def facts_line(agency_id: str, birth: dt.date) -> str:
        capsys.readouterr()
        code = cli.main(["check", agency_id, birth.isoformat(), "--program", "premium-job-seekers",
                         "--address", f"127.0.0.1:{live.running.port}", f"--token={live.h.tokens['advisor-paris']}"])
        out, err = capsys.readouterr()
        assert code == 0, err
        return next(line for line in out.splitlines() if line.startswith("facts: "))

    extracted = (TODAY - dt.timedelta(days=1)).isoformat()  # the harness's extract
    agency_id, birth = next_person()
    live.agency.people[agency_id] = agency_record(agency_id, birth)
    line = facts_line(agency_id, birth)
    assert "live status source" in line and TODAY.isoformat() in line and "none" not in line, line

    live.agency.default = "500"
    line = facts_line(agency_id, birth)
    assert "registrySnapshots/" in line and extracted in line, line
    assert "live status source gave no usable answer" in line and "out of date" in line, line


def test_a_live_answer_for_a_past_day_is_dated_the_day_it_was_given(live: LiveServer) -> None:
    """A check of a past day (`as_of`) answered by the live source today: the answer's
    registry_extracted_on ("the date of the answer when facts_source is live") said the past day,
    as if the source had answered then (found by a review: the date the freshness rule judged, as
    fresh as data can be for that day, was reported as the data's date). It says today; the rule
    still judges the data fresh for that day."""
    agency_id, birth = next_person()
    live.agency.people[agency_id] = agency_record(agency_id, birth, registered="2024-01-15")
    day = TODAY - dt.timedelta(days=10)
    [d] = live.advisor().CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        as_of=date_msg(day))).decisions
    assert d.facts_source == "live" and d.eligible and d.registry_snapshot == ""
    assert (d.registry_extracted_on.year, d.registry_extracted_on.month, d.registry_extracted_on.day) == (
        TODAY.year, TODAY.month, TODAY.day)
    [today] = live.advisor().CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers")).decisions
    assert today.registry_extracted_on == d.registry_extracted_on
