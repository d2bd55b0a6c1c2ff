"""Instructions per call, counted by valgrind (`python -m bench.instructions`).

Throughput on a shared 2-core VM swings with whatever else runs; an instruction count does not:
callgrind counts the instructions the server process executes, the same for the same code and
inputs whatever the machine is doing. This benchmark runs the real server (`server.py`, the
production entry, with its collector tuning) in each server model (ENTITLEMENT_SERVER_MODEL threads,
then event-loop), and the bare echo server of that model built like it (threads: the same
`grpc.server`, thread pool and options; event-loop: grpc.aio answering on its loop; no behaviour),
under `valgrind --tool=callgrind`, switches counting on only around N sequential calls of one RPC
(after warm-up calls), and divides.

The echo/ours ratio of instructions is the throughput ratio a server-bound run would show (the
server process runs Python under one GIL: its throughput is the inverse of its cost per call);
compare it with the ratios of `python -m bench` and `python -m bench.rpcs`, which include the
client's share of the machine and contention.

Needs valgrind (on every machine kind here). BENCH_INSTR_CALLS sets N (default 900; Activate
and Redeem use N/3 people). A window must hold enough calls for the cyclic collector's runs to
average out: the figure includes them, and with 300 calls a verification read 0.58 or 0.62 of
echo depending on whether a collection fell inside its window (the same code, run after more or
fewer allocations).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
from google.type import date_pb2

from bench.common import say
from bench.config import ECHO_SERVICE, event_loop_text
from bench.procs import commit, free_port, stop_process
from bench.sections import replace_section
from bench.servers import OPTIONS, _echo, aio_echo
from entitlement import registry, synthetic
from entitlement.callers import Caller, write_callers
from entitlement.clock import SystemClock
from entitlement.config import ROOT, Settings
from entitlement.pseudonym import Pseudonymizer
from entitlement.storage.db import Database
from entitlement.storage.migrate import upgrade
from entitlement.server_main import concurrency_limit, tune_gc
from entitlement.tokens import KeyStore
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, common_pb2,
                            eligibility_pb2, eligibility_pb2_grpc)

PROGRAM = "programs/premium-job-seekers"
FUNDER = "ministry-of-labour"  # a funder of PROGRAM
LIST_PAGE = 100
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
PEOPLE = 2000


def wait_port(port: int, proc: subprocess.Popen[bytes], limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"server not listening on {port} after {limit_s:.0f} s")


MODELS = (("threads", "sync-echo"), ("event-loop", "aio-echo-inline"))  # each server model and its floor


def echo_server(port: int, model: str = "threads") -> None:
    """The floor of a server model, served until killed: for threads, the bench's sync echo server
    (bench/servers.py: built as entitlement.server_main builds ours, no behaviour); for the event
    loop, a grpc.aio echo server answering on its loop (as entitlement.aio_server answers the hot
    reads), same options, concurrency bound and collector tuning."""
    settings = Settings()  # the defaults server.py runs with: its pool size and concurrency bound
    if model == "event-loop":  # on the loop server.py runs (ENTITLEMENT_EVENT_LOOP, as its environment says)
        from entitlement.aio_server import new_event_loop
        with asyncio.Runner(loop_factory=lambda: new_event_loop(Settings.from_env().event_loop)) as runner:
            runner.run(_aio_echo_server(port, settings))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
                         options=OPTIONS,
                         maximum_concurrent_rpcs=concurrency_limit(settings))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    tune_gc()  # as server.py's serve_forever
    server.start()
    server.wait_for_termination()


async def _aio_echo_server(port: int, settings: Settings) -> None:
    server = aio_echo(settings.max_workers, None)  # answered on the loop
    server.add_insecure_port(f"127.0.0.1:{port}")
    tune_gc()
    await server.start()
    await server.wait_for_termination()


@contextmanager
def under_callgrind(argv: list[str], env: dict[str, str], port: int, out: Path) -> Iterator[Callable[[Callable[[], None]], int]]:
    """Run argv under callgrind with counting off; yields `count(work)`, which counts the
    instructions the server executes while `work()` runs (the dump after each count resets them)."""
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p", *argv]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)

        def count(work: Callable[[], None]) -> int:
            for f in out.parent.glob(out.name + ".*"):
                f.unlink()
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
            work()
            subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
            return _totals(out)
        yield count
    finally:
        stop_process(proc, timeout=60)


def _totals(out: Path) -> int:
    """The sum of the `totals:` lines of the dumps (a dump's `summary:` line can read 0)."""
    deadline = time.monotonic() + 30
    while True:
        files = list(out.parent.glob(out.name + ".*"))
        texts = [f.read_text(errors="replace") for f in files]
        if texts and all("\ntotals:" in t for t in texts) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return sum(int(m.group(1)) for t in texts for m in re.finditer(r"^totals: (\d+)", t, re.MULTILINE))


def prepare(tmp: Path) -> tuple[dict[str, str], dict[str, str], list[tuple[str, dt.date]]]:
    """A migrated SQLite database with a synthetic registry; returns (env, tokens, people)."""
    callers_file, key_dir, pseudo_file = tmp / "callers.json", tmp / "keys", tmp / "pseudonym.key"
    tokens = write_callers(callers_file, [
        Caller(id="bench-advisor", role="advisor", advisor_id="A0001", agency_code="75011"),
        Caller(id="bench-platform", role="platform", platform_id="openclassrooms"),
        Caller(id="bench-funder", role="funder", funder_id=FUNDER),
    ])
    KeyStore.load(key_dir, create=True)
    pseudo = Pseudonymizer.from_file(pseudo_file, create=True)
    extract = tmp / "registry.csv"
    synthetic.write(extract, PEOPLE)
    url = f"sqlite:///{tmp / 'entitlement.db'}"
    upgrade(url)
    db = Database(url, pool_size=2)
    try:
        registry.import_extract(db, pseudo, SystemClock(), extract,
                                extracted_on=SystemClock().today() - dt.timedelta(days=1))
    finally:
        db.dispose()
    people = [(r["identifiant"], dt.date.fromisoformat(r["dateNaissance"])) for r in synthetic.rows(PEOPLE)]
    env = {**os.environ, "ENTITLEMENT_DATABASE_URL": url, "ENTITLEMENT_CALLERS_FILE": str(callers_file),
           "ENTITLEMENT_KEY_DIR": str(key_dir), "ENTITLEMENT_PSEUDONYM_KEY_FILE": str(pseudo_file),
           "ENTITLEMENT_LOG_KEY_FILE": str(tmp / "log.key"), "ENTITLEMENT_CHECK_RATE_PER_MIN": "0",
           "ENTITLEMENT_PROCESSES": "1", "ENTITLEMENT_LOG_LEVEL": "info"}
    return env, tokens, people


def repeat(n: int, call: Callable[..., object], indexed: bool = False) -> None:
    for i in range(n):
        call(i) if indexed else call()


def who(person: tuple[str, dt.date]) -> common_pb2.JobSeekerIdentity:
    agency_id, birth = person
    return common_pb2.JobSeekerIdentity(agency_id=agency_id, birth_date=date_pb2.Date(
        year=birth.year, month=birth.month, day=birth.day))


Row = tuple[str, str, int, int, float]  # model, rpc, calls, instructions, bytes of the request (rows listed)


def measure_model(model: str, floor: str, n: int, tmp: Path, env: dict[str, str], tokens: dict[str, str],
                  people: list[tuple[str, dt.date]]) -> list[Row]:
    """The floor of `model`, then server.py in that model (ENTITLEMENT_SERVER_MODEL), every RPC."""
    rows: list[Row] = []
    # The floor.
    port = free_port()
    with under_callgrind([sys.executable, "-c", f"from bench.instructions import echo_server; echo_server({port}, {model!r})"],
                         dict(os.environ), port, tmp / f"echo-{model}.cg") as count:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(ECHO_METHOD)
            payload = b"x" * 80
            md = (("authorization", "Bearer " + "a" * 43),)
            for _ in range(50):
                call(payload, metadata=md, timeout=120)
            total = count(lambda: repeat(n, lambda: call(payload, metadata=md, timeout=120)))
            rows.append((model, f"Echo ({floor}, floor)", n, total, len(payload)))
            say(f"{model}: echo: {total // n:,} instructions/call")

    # Ours.
    port = free_port()
    env["ENTITLEMENT_LISTEN"] = f"127.0.0.1:{port}"
    env["ENTITLEMENT_SERVER_MODEL"] = model
    with under_callgrind([sys.executable, "server.py"], env, port, tmp / f"server-{model}.cg") as count:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            adv = (("authorization", f"Bearer {tokens['bench-advisor']}"),)
            plat = (("authorization", f"Bearer {tokens['bench-platform']}"),)
            elig = eligibility_pb2_grpc.EligibilityServiceStub(ch)
            act = activation_pb2_grpc.ActivationServiceStub(ch)
            # Warm-up, and the people the server finds eligible (for the writes).
            eligible = []
            for p in people:
                r = elig.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(job_seeker=who(p), program=PROGRAM),
                                          metadata=adv, timeout=120)
                if r.decisions[0].eligible:
                    eligible.append(p)
                if len(eligible) >= 2 * (n // 3) + 2:
                    break
            writes = max(1, n // 3)
            if len(eligible) < 2 * writes + 2:
                raise SystemExit(f"only {len(eligible)} eligible people in the synthetic registry")
            check_req = eligibility_pb2.CheckEligibilityRequest(job_seeker=who(eligible[0]), program=PROGRAM)
            total = count(lambda: repeat(n, lambda: elig.CheckEligibility(check_req, metadata=adv, timeout=120)))
            rows.append((model, "CheckEligibility", n, total, check_req.ByteSize()))
            say(f"{model}: CheckEligibility: {total // n:,} instructions/call")

            def activate(p: tuple[str, dt.date], i: int) -> activation_pb2.ActivateEntitlementResponse:
                return act.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                    request_id=f"bench-instr-{i}", job_seeker=who(p), program=PROGRAM,
                    platform="platforms/openclassrooms", reason="bench"), metadata=adv, timeout=120)
            first = activate(eligible[-1], 10**6)  # warm-up of the write path
            act.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
                token=first.activation_token, account_id="bench-account-0"), metadata=plat, timeout=120)
            made: list[str] = []
            batch = eligible[1:1 + writes]
            total = count(lambda: made.extend(activate(p, i).activation_token for i, p in enumerate(batch)))
            rows.append((model, "ActivateEntitlement", writes, total, 0))
            say(f"{model}: ActivateEntitlement: {total // writes:,} instructions/call")
            total = count(lambda: repeat(len(made), lambda i: act.RedeemActivationToken(
                activation_pb2.RedeemActivationTokenRequest(token=made[i], account_id=f"bench-account-{i + 1}"),
                metadata=plat, timeout=120), indexed=True))
            rows.append((model, "RedeemActivationToken", len(made), total, 0))
            say(f"{model}: RedeemActivationToken: {total // len(made):,} instructions/call")
            verify_req = activation_pb2.VerifyEntitlementRequest(account_id="bench-account-1")
            if not act.VerifyEntitlement(verify_req, metadata=plat, timeout=120).active:
                raise SystemExit("the redeemed account is not active")
            total = count(lambda: repeat(n, lambda: act.VerifyEntitlement(verify_req, metadata=plat, timeout=120)))
            rows.append((model, "VerifyEntitlement", n, total, verify_req.ByteSize()))
            say(f"{model}: VerifyEntitlement: {total // n:,} instructions/call")
            # The funder's first page, newest first: the activations made above (as bench.rpcs lists
            # them, pages of 100; a page costs the same at any depth).
            aud = audit_pb2_grpc.AuditServiceStub(ch)
            fund = (("authorization", f"Bearer {tokens['bench-funder']}"),)
            list_req = audit_pb2.ListActivationsRequest(page_size=LIST_PAGE, funder=FUNDER)
            listed = len(aud.ListActivations(list_req, metadata=fund, timeout=120).activations)
            lists = max(10, n // 10)
            total = count(lambda: repeat(lists, lambda: aud.ListActivations(list_req, metadata=fund, timeout=120)))
            rows.append((model, f"ListActivations ({listed} per page)", lists, total, listed))
            say(f"{model}: ListActivations: {total // lists:,} instructions/call, {total // lists // max(listed, 1):,} per row")
    return rows


def main() -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        say("bench.instructions: valgrind is not installed; skipped")
        return 0
    n = int(os.environ.get("BENCH_INSTR_CALLS", "900"))
    started = time.time()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as d:
        for model, floor in MODELS:  # each on a database of its own (the same synthetic people)
            tmp = Path(d) / model
            tmp.mkdir()
            env, tokens, people = prepare(tmp)
            rows += measure_model(model, floor, n, tmp, env, tokens, people)
    write_section(rows, time.time() - started)
    return 0


TARGETS = {"CheckEligibility": 0.5, "VerifyEntitlement": 0.6, "ActivateEntitlement": 0.25}


def write_section(rows: list[Row], seconds: float) -> None:
    n = rows[0][2]
    lines = [
        "## Instructions per call, counted by valgrind (`python -m bench.instructions`)",
        "",
        f"- Run on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {commit()}, Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}; {seconds:.0f} s in all.",
        "- `valgrind --tool=callgrind` counts every instruction the server process executes (all threads), "
        "switched on only around sequential calls of one RPC after warm-up calls: the same figure for the "
        "same code and inputs however loaded the machine is (the timed benchmarks swing by a third here). "
        f"{n:,} calls per read RPC and {max(1, n // 3):,} per write: the cyclic collector's runs, counted with "
        "the calls, average out over such a window (with 300 calls a verification read 0.58 or 0.62 of echo "
        "depending on whether a collection fell inside it).",
        "- Servers, per server model (`ENTITLEMENT_SERVER_MODEL`, README \"Server models\"; SQLite's default is "
        "event-loop): `server.py` as in production (SQLite, 2,000 synthetic people, a database of its own per "
        "model, one JSON access line per call, rate limit off) and the echo server of that model, built the "
        "same way (threads: `grpc.server` with the same pool and options; event-loop: `grpc.aio.server` "
        f"answering on its loop, {event_loop_text(Settings.from_env().event_loop, 'ENTITLEMENT_EVENT_LOOP')}, as the event-loop server answers CheckEligibility and "
        "VerifyEntitlement on its own; both "
        "with the same concurrency bound and collector tuning, no behaviour, an 80-byte payload and an "
        "`authorization` header like ours).",
        f"- ListActivations: a funder's ({FUNDER}) first page of {LIST_PAGE}, newest first, over the activations "
        "the ActivateEntitlement calls made (real decisions, each with its caps' counters); per row = per call / "
        "the rows of the page.",
        "- x echo = the model's echo instructions per call / the RPC's: the throughput ratio a run bound by the "
        "server process would show (one GIL: throughput is the inverse of the cost per call). Targets of issue "
        "\"Step 7\" are throughput ratios on the 2-core machine.",
        "",
        "| model | rpc | calls | instructions/call | x echo | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    echo = {model: total / calls for model, rpc, calls, total, _ in rows if rpc.startswith("Echo")}
    for model, rpc, calls, total, _size in rows:
        per = total / calls
        ratio = echo[model] / per
        target = TARGETS.get(rpc)
        verdict = "-" if target is None else (f">= {target}: met" if ratio >= target else f">= {target}: not met")
        lines.append(f"| {model} | {rpc} | {calls:,} | {per:,.0f} | {ratio:.2f} | {verdict} |" if ratio >= 0.1 else
                     f"| {model} | {rpc} | {calls:,} | {per:,.0f} | {ratio:.3f} | {verdict} |")
    for model, rpc, calls, total, listed in rows:
        if rpc.startswith("ListActivations") and listed:
            lines += ["", f"ListActivations ({model}): {total / calls / listed:,.0f} instructions per row listed."]
    replace_section(ROOT / "BENCHMARKS.md", "instructions", "\n".join(lines))
    say("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
