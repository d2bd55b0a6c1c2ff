"""Soak: mixed load against a real `server.py` process for N minutes, with its memory sampled.

    python -m stress.soak [--minutes 10] [--clients 4] [--sample-seconds 5] [--backend sqlite|postgres]

The server runs on a fresh database in a temp dir (SQLite by default; `--backend postgres` creates
a throwaway database at --pg-url and drops it). Client threads call, by weight: CheckEligibility,
VerifyEntitlement, ActivateEntitlement (with request_ids), Suspend/Resume/RevokeActivation,
RedeemActivationToken, GetActivation, ListActivations, GetFundingReport, GetCheckpoint, and a few
calls that must be refused (the expected errors below). Each client owns its people and their
activations, so no two clients race on one activation: any other error is a defect.

Every --sample-seconds: the server's RSS (VmRSS of /proc/PID/status), the calls answered and the
errors by status; printed as a table as it goes. Then the verdict, which fails (exit 1) unless:
- memory is flat: after a warm-up (the first third of the run), the median RSS of the last third
  is at most --max-growth percent (default 5) above the median of the middle third; a leak of a
  few bytes per call shows there, a one-off cache fill does not;
- the only errors are the EXPECTED ones, each from the call made to provoke it;
- the server answered all along, stops with SIGTERM and exit code 0, and the database keeps every
  invariant, every acknowledged activation, transition and redemption included (entitlement.doctor).
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime as dt
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entitlement import doctor, registry, synthetic
from entitlement.callers import Caller, write_callers
from entitlement.clock import SystemClock
from entitlement.config import ROOT
from entitlement.doctor import Acknowledged
from entitlement.logtree import create_key_file
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.tokens import generate_key
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, common_pb2,
                            eligibility_pb2, eligibility_pb2_grpc)

ADVISOR, PLATFORM, FUNDER = "soak-advisor", "soak-platform", "soak-funder"
CALLERS = [
    Caller(id=ADVISOR, role="advisor", advisor_id="A0001", agency_code="75011"),
    Caller(id=PLATFORM, role="platform", platform_id="openclassrooms"),
    Caller(id=FUNDER, role="funder", funder_id="france-travail"),
]
PROGRAM, PLATFORM_NAME = "programs/premium-job-seekers", "platforms/openclassrooms"
PEOPLE = 600  # eligible people SOAK000001 ... (each client owns a share; revoked ones are activated again)
FILLER = 3000  # synthetic people for checks (assorted decisions)
NOT_ELIGIBLE = synthetic.KNOWN[1]  # DEMO0002: registration ended
CALL_TIMEOUT = 30.0

# The errors the soak provokes on purpose, and the only ones it accepts: (status, ErrorInfo reason).
EXPECTED = {
    ("FAILED_PRECONDITION", "NOT_ELIGIBLE"): "ActivateEntitlement of a person whose registration ended",
    # An advisor is told the same for a missing activation as for one of another agency (AIP-211).
    ("PERMISSION_DENIED", "OUT_OF_SCOPE"): "GetActivation (as an advisor) of an id that does not exist",
    ("ALREADY_EXISTS", "TOKEN_ALREADY_REDEEMED"): "RedeemActivationToken of a token already redeemed",
}
WEIGHTS = {"check": 24, "verify": 16, "activate": 12, "transition": 12, "redeem": 8, "get": 6, "list": 5,
           "report": 3, "checkpoint": 3, "refused": 3}


def _birth(i: int) -> dt.date:
    return dt.date(1975, 1, 1) + dt.timedelta(days=i * 11)


def _date(d: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def _identity(agency_id: str, birth: dt.date | str) -> common_pb2.JobSeekerIdentity:
    if isinstance(birth, str):
        birth = dt.date.fromisoformat(birth)
    return common_pb2.JobSeekerIdentity(agency_id=agency_id, birth_date=_date(birth))


# ------------------------------------------------------------------------------------------ the server

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _database(backend: str, root: Path, pg_url: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{root / 'soak.db'}"
        return
    name = f"entitlement_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _prepare(root: Path, url: str) -> dict[str, str]:
    """Secrets, callers, a migrated database with the soak registry; returns the server's environment
    (the tokens are in the callers file's companion dict, see _serve)."""
    key_file = root / "secrets" / "pseudonym.key"
    pseudo = Pseudonymizer.from_file(key_file, create=True)
    create_key_file(key_file.parent / "log.key")
    generate_key(root / "keys")
    upgrade(url)
    extract = root / "registry.csv"
    with extract.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=synthetic.COLUMNS, lineterminator="\n")
        w.writeheader()
        for i in range(1, PEOPLE + 1):
            w.writerow({"identifiant": f"SOAK{i:06d}", "civilite": "", "nom": "Soak", "prenom": "Person",
                        "dateNaissance": _birth(i).isoformat(), "codePostal": "75011",
                        "dateInscription": "2024-01-15", "dateCessationInscription": "",
                        "codeCategorieInscription": "1"})
        w.writerows(synthetic.rows(FILLER))
    db = Database(url, pool_size=1)
    try:
        registry.import_extract(db, pseudo, SystemClock(), extract, extracted_on=dt.date.today())
    finally:
        db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLEMENT_")}
    env.update({
        "ENTITLEMENT_DATABASE_URL": url,
        "ENTITLEMENT_PROGRAMS_DIR": str(ROOT / "programs"),
        "ENTITLEMENT_CALLERS_FILE": str(root / "callers.json"),
        "ENTITLEMENT_KEY_DIR": str(root / "keys"),
        "ENTITLEMENT_PSEUDONYM_KEY_FILE": str(key_file),
        "ENTITLEMENT_CHECK_RATE_PER_MIN": "0",  # the soak is one advisor calling all day
        "ENTITLEMENT_LOG_LEVEL": "warning",  # warnings and errors only: the log stays small
        "ENTITLEMENT_GRACE_SECONDS": "10",
        "PYTHONUNBUFFERED": "1",
    })
    return env


class ServerProcess:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.address = f"127.0.0.1:{_free_port()}"
        self.log_path = root / "server.stderr"
        self._log = self.log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT,
                                     env={**env, "ENTITLEMENT_LISTEN": self.address}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        channel = grpc.insecure_channel(self.address)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"the server did not serve within 60 s:\n{self.log_tail()}")
                time.sleep(0.1)
        finally:
            channel.close()

    def rss_mb(self) -> float:
        """Resident set size of the server process, in MB (Linux /proc; `ps` elsewhere)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.proc.pid)], capture_output=True, text=True)
        return int(out.stdout.strip() or 0) / 1024

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def stop(self) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()
        return int(self.proc.returncode)


# ------------------------------------------------------------------------------------------ the clients

@dataclass
class Tally:
    """Calls answered and errors, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # status -> count
    expected: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    acknowledged: list[Acknowledged] = field(default_factory=list)

    def answered(self) -> None:
        with self.lock:
            self.calls += 1

    def failed(self, op: str, err: grpc.RpcError, provoked: tuple[str, str] | None) -> None:
        code, reason = err.code().name, _reason(err)
        with self.lock:
            self.calls += 1
            self.errors[code] += 1
            if provoked is not None and (code, reason) == provoked:
                self.expected[(code, reason)] += 1
            else:
                self.unexpected[(op, code, reason or (err.details() or "")[:80])] += 1


def _reason(err: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for d in status.details if status is not None else ():
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return str(info.reason)
    return ""


@dataclass
class Mine:
    activation_id: str
    person: int
    token: str
    state: str = "active"
    account_id: str = ""


class Client:
    """One client thread's calls. It owns people `person % clients == index` and their activations."""

    def __init__(self, index: int, clients: int, address: str, tokens: dict[str, str], tally: Tally,
                 rng: random.Random) -> None:
        self.channel = grpc.insecure_channel(address)
        self.eligibility = eligibility_pb2_grpc.EligibilityServiceStub(self.channel)
        self.activation = activation_pb2_grpc.ActivationServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.md = {c: (("authorization", f"Bearer {tokens[c]}"),) for c in tokens}
        self.tally, self.rng = tally, rng
        self.free = [i for i in range(1, PEOPLE + 1) if i % clients == index]
        self.live: dict[str, Mine] = {}
        self.redeemed: list[Mine] = []
        self.ops, self.weights = list(WEIGHTS), list(WEIGHTS.values())
        self.checked = [(r["identifiant"], r["dateNaissance"]) for r in synthetic.rows(FILLER)]

    def call(self, op: str, fn: Callable[..., Any], request: Any, caller: str,
             provoked: tuple[str, str] | None = None) -> Any:
        try:
            resp = fn(request, metadata=self.md[caller], timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            self.tally.failed(op, err, provoked)
            return None
        self.tally.answered()
        if provoked is not None:  # it should have been refused
            with self.tally.lock:
                self.tally.unexpected[(op, "OK", f"expected {provoked[0]} {provoked[1]}")] += 1
        return resp

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                getattr(self, "op_" + self.rng.choices(self.ops, self.weights)[0])()
        finally:
            self.channel.close()

    def op_check(self) -> None:
        agency_id, birth = self.rng.choice(self.checked)
        self.call("check", self.eligibility.CheckEligibility,
                  eligibility_pb2.CheckEligibilityRequest(job_seeker=_identity(agency_id, birth)), ADVISOR)

    def op_verify(self) -> None:
        account = self.rng.choice(self.redeemed).account_id if self.redeemed else f"nobody-{uuid.uuid4().hex[:8]}"
        self.call("verify", self.activation.VerifyEntitlement,
                  activation_pb2.VerifyEntitlementRequest(account_id=account), PLATFORM)

    def op_activate(self) -> None:
        if not self.free:
            return self.op_transition()
        person = self.free.pop(self.rng.randrange(len(self.free)))
        rid = uuid.uuid4().hex
        resp = self.call("activate", self.activation.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
            request_id=rid, job_seeker=_identity(f"SOAK{person:06d}", _birth(person)), program=PROGRAM,
            platform=PLATFORM_NAME, reason="soak"), ADVISOR)
        if resp is None:
            return  # an unexpected error, counted; this person stays out of the game
        m = Mine(resp.activation.name.split("/", 1)[1], person, resp.activation_token)
        self.live[m.activation_id] = m
        with self.tally.lock:
            self.tally.acknowledged.append(Acknowledged("activate", m.activation_id, ADVISOR, rid))

    def op_transition(self) -> None:
        if not self.live:
            return self.op_check()
        m = self.live[self.rng.choice(list(self.live))]
        if self.rng.random() < 0.25:
            action, new_state = "revoke", "revoked"
        elif m.state == "active":
            action, new_state = "suspend", "suspended"
        else:
            action, new_state = "resume", "active"
        rid = uuid.uuid4().hex
        fn = getattr(self.activation, f"{action.title()}Activation")
        if self.call(action, fn, activation_pb2.TransitionActivationRequest(
                name=f"activations/{m.activation_id}", reason=f"soak {action}", request_id=rid), ADVISOR) is None:
            del self.live[m.activation_id]  # counted as unexpected; leave it alone from now on
            return
        m.state = new_state
        with self.tally.lock:
            self.tally.acknowledged.append(Acknowledged(action, m.activation_id, ADVISOR, rid))
        if new_state == "revoked":
            del self.live[m.activation_id]
            self.free.append(m.person)  # may be activated again

    def op_redeem(self) -> None:
        waiting = [m for m in self.live.values() if not m.account_id]
        if not waiting:
            return self.op_verify()
        m = self.rng.choice(waiting)
        account = f"soak-{m.activation_id}"
        if self.call("redeem", self.activation.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
                token=m.token, account_id=account), PLATFORM) is None:
            del self.live[m.activation_id]
            return
        m.account_id = account
        self.redeemed.append(m)
        if len(self.redeemed) > 200:
            self.redeemed.pop(0)
        with self.tally.lock:
            self.tally.acknowledged.append(Acknowledged("redeem", m.activation_id, account_id=account))

    def op_get(self) -> None:
        if not self.live:
            return self.op_check()
        self.call("get", self.activation.GetActivation, activation_pb2.GetActivationRequest(
            name=f"activations/{self.rng.choice(list(self.live))}"), ADVISOR)

    def op_list(self) -> None:
        self.call("list", self.audit.ListActivations, audit_pb2.ListActivationsRequest(page_size=50), FUNDER)

    def op_report(self) -> None:
        self.call("report", self.audit.GetFundingReport, audit_pb2.GetFundingReportRequest(), FUNDER)

    def op_checkpoint(self) -> None:
        self.call("checkpoint", self.audit.GetCheckpoint, audit_pb2.GetCheckpointRequest(), FUNDER)

    def op_refused(self) -> None:
        pick = self.rng.randrange(3)
        if pick == 0:
            self.call("activate", self.activation.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
                request_id=uuid.uuid4().hex, job_seeker=_identity(NOT_ELIGIBLE[0], NOT_ELIGIBLE[1]), program=PROGRAM,
                platform=PLATFORM_NAME, reason="soak"), ADVISOR, provoked=("FAILED_PRECONDITION", "NOT_ELIGIBLE"))
        elif pick == 1:
            self.call("get", self.activation.GetActivation, activation_pb2.GetActivationRequest(
                name=f"activations/{uuid.uuid4().hex}"), ADVISOR, provoked=("PERMISSION_DENIED", "OUT_OF_SCOPE"))
        elif self.redeemed:
            m = self.rng.choice(self.redeemed)
            self.call("redeem", self.activation.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
                token=m.token, account_id=m.account_id), PLATFORM,
                provoked=("ALREADY_EXISTS", "TOKEN_ALREADY_REDEEMED"))


# ------------------------------------------------------------------------------------------ the verdict

@dataclass
class Sample:
    t: float
    rss_mb: float
    calls: int
    errors: dict[str, int]


def memory_verdict(samples: list[Sample], max_growth_pct: float) -> tuple[bool, str]:
    """Flat: the median RSS of the last third of the samples at most `max_growth_pct` above the
    median of the middle third (the first third is warm-up)."""
    n = len(samples)
    if n < 6:
        return False, f"memory: only {n} samples, too few to judge (run longer or sample more often)"
    middle = statistics.median(s.rss_mb for s in samples[n // 3: 2 * n // 3])
    last = statistics.median(s.rss_mb for s in samples[2 * n // 3:])
    growth = (last - middle) / middle * 100
    ok = growth <= max_growth_pct
    return ok, (f"memory {'flat' if ok else 'GROWING'}: median RSS {middle:.1f} MB in the middle third, "
                f"{last:.1f} MB in the last third ({growth:+.1f}%, limit +{max_growth_pct:g}%)")


def _row(s: Sample, previous: Sample | None) -> str:
    rate = (s.calls - previous.calls) / (s.t - previous.t) if previous and s.t > previous.t else 0.0
    errors = " ".join(f"{k}={v}" for k, v in sorted(s.errors.items())) or "-"
    return f"{s.t:8.0f} {s.rss_mb:8.1f} {s.calls:9d} {rate:8.1f}  {errors}"


def say(msg: str) -> None:
    print(msg, flush=True)


def soak(minutes: float, clients: int, sample_s: float, backend: str, pg_url: str, max_growth_pct: float,
         seed: int, keep: bool) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="entitlement-soak-"))
    failures: list[str] = []
    try:
        with _database(backend, tmp, pg_url) as url:
            env = _prepare(tmp, url)
            tokens = write_callers(tmp / "callers.json", CALLERS)
            server = ServerProcess(tmp, env)
            say(f"soak: {minutes:g} min, {clients} clients, {backend}, seed {seed}, server pid {server.proc.pid} "
                f"on {server.address}, RSS every {sample_s:g} s (temp dir {tmp})")
            say(f"{'time s':>8} {'RSS MB':>8} {'calls':>9} {'calls/s':>8}  errors by status (cumulative)")
            tally, stop = Tally(), threading.Event()
            rng = random.Random(seed)
            workers = [Client(i, clients, server.address, tokens, tally, random.Random(rng.random()))
                       for i in range(clients)]
            threads = [threading.Thread(target=w.run, args=(stop,), name=f"soak-{i}") for i, w in enumerate(workers)]
            samples: list[Sample] = []
            started = time.monotonic()
            end = started + minutes * 60

            def sample() -> None:
                with tally.lock:
                    s = Sample(time.monotonic() - started, server.rss_mb(), tally.calls, dict(tally.errors))
                say(_row(s, samples[-1] if samples else None))
                samples.append(s)

            sample()
            for t in threads:
                t.start()
            died = False
            while time.monotonic() < end:
                time.sleep(max(0.0, min(sample_s, end - time.monotonic())))
                if server.proc.poll() is not None:
                    died = True
                    break
                sample()
            stop.set()
            for t in threads:
                t.join(timeout=CALL_TIMEOUT + 10)
            if died:
                code = server.proc.returncode
                how = ("it exited 0: someone else sent it SIGTERM or SIGINT" if code == 0 else
                       f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
                failures.append(f"the server stopped before the end ({how}):\n{server.log_tail()}")
            rc = server.stop()
            if not died and rc != 0:
                failures.append(f"the server stopped with exit code {rc} after SIGTERM:\n{server.log_tail()}")

            ok, memory = memory_verdict(samples[1:], max_growth_pct)  # samples[0]: before any call
            if not ok:
                failures.append(memory)
            say("")
            say(f"{tally.calls} calls in {samples[-1].t:.0f} s; errors by status: {dict(tally.errors) or 'none'}")
            say("expected errors (provoked on purpose, each counted only from the call that provokes it):")
            for key, why in EXPECTED.items():
                say(f"  {key[0]} {key[1]}: {tally.expected.get(key, 0)}  ({why})")
            if tally.unexpected:
                failures.append("unexpected errors: " + ", ".join(
                    f"{op} {code} {reason}: {n}" for (op, code, reason), n in sorted(tally.unexpected.items())))
            if tally.calls == 0:
                failures.append("no call was answered")
            db = Database(url, pool_size=1)
            try:
                problems = doctor.check(db, acknowledged=tally.acknowledged)
            finally:
                db.dispose()
            say(f"doctor: {len(tally.acknowledged)} acknowledged requests checked, "
                f"{'every invariant holds' if not problems else f'{len(problems)} problem(s)'}")
            if problems:
                failures.append("doctor: " + "; ".join(f"{p.code} {p.detail}" for p in problems[:10]))
            say(memory)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        say("VERDICT: FAIL")
        for f in failures:
            say(f"  - {f}")
        return 1
    say("VERDICT: OK (memory flat, only expected errors, clean stop, invariants hold)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stress.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    p.add_argument("--clients", type=int, default=4, help="client threads, one call in flight each (default 4)")
    p.add_argument("--sample-seconds", type=float, default=5.0, help="RSS sampling period (default 5)")
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--pg-url", default=os.environ.get("ENTITLEMENT_TEST_PG_URL",
                                                       "postgresql://postgres@127.0.0.1:5432/test"),
                   help="admin URL where --backend postgres creates (and drops) its database")
    p.add_argument("--max-growth", type=float, default=5.0,
                   help="memory is flat when the last third's median RSS is at most this percent above the "
                        "middle third's (default 5)")
    p.add_argument("--seed", type=int, default=None, help="the clients' random choices (default: random, printed)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (database, server log)")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.clients < 1 or a.sample_seconds <= 0:
        p.error("--minutes and --sample-seconds must be positive, --clients at least 1")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 32)
    return soak(a.minutes, a.clients, a.sample_seconds, a.backend, a.pg_url, a.max_growth, seed, a.keep)


if __name__ == "__main__":
    sys.exit(main())
