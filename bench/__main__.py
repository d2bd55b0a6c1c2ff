"""`python -m bench` (make bench): prepare the data, start each server model in its own process,
drive them from a load-generator process, print the table and write BENCHMARKS.md.

Settings (environment):
  BENCH_SECONDS      measured seconds per model and case (5), split into BENCH_ROUNDS rounds (4) in
                     which the models alternate (sync aio aio-inline, then backwards, ...)
  BENCH_WARMUP       unmeasured seconds of calls before each round (0.5)
  BENCH_CONCURRENCY  calls in flight (8,32)
  BENCH_PEOPLE       synthetic registry size (20000); BENCH_ACTIVATIONS redeemed activations (200)
  BENCH_WORKERS      unary thread-pool size of every model (the server's default, Settings.max_workers)
  BENCH_BACKENDS     sqlite,postgres (postgres is skipped when BENCH_PG_URL does not answer)
  BENCH_PG_URL       postgresql://postgres@127.0.0.1:5432/test (admin URL to create a throwaway db; its host,
                     port and query are kept: postgresql://postgres@/test?host=/var/run/postgresql
                     goes through the Unix socket)
  BENCH_LOG_LEVEL    the servers' log level (info); their logs go to files in the temp dir
  BENCH_OUTPUT       BENCHMARKS.md (its "server-models" section is rewritten); "-" to only print
  BENCH_KEEP=1       keep the temp dir (databases, server logs)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from array import array
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from bench.config import (ADVISOR_ID, AIO, CHECK, ECHO, ECHO_MODELS, METHOD_PATHS, MODELS, PLATFORM_CALLER_ID,
                          PROGRAM, SYNC, VERIFY, BenchConfig, LoadSpec, RunResult, SeedSpec, ServerSpec)
from bench.common import say, status_key
from bench.prepare import Common, imported_database, prepare_common
from bench.procs import Client, Server, commit, machine, servers, usable_backends
from bench.sections import replace_section

SECTION = "server-models"  # our section of BENCHMARKS.md


def server_spec(kind: str, cfg: BenchConfig, common: Common, backend: str, url: str = "") -> ServerSpec:
    return ServerSpec(kind=kind, workers=cfg.workers, log_path=common.tmp / "logs" / f"{backend}-{kind}.log",
                      log_level=cfg.log_level, database_url=url, callers_file=common.callers_file,
                      key_dir=common.key_dir, pseudonym_key_file=common.pseudonym_key_file)


# ------------------------------------------------------------------------------------- requests

def check_requests(common: Common, n: int = 2000) -> tuple[bytes, ...]:
    from google.type import date_pb2

    from entitlement.v1 import common_pb2, eligibility_pb2
    step = max(1, len(common.people) // n)
    return tuple(eligibility_pb2.CheckEligibilityRequest(
        program=f"programs/{PROGRAM}", job_seeker=common_pb2.JobSeekerIdentity(
            agency_id=agency_id, birth_date=date_pb2.Date(year=b.year, month=b.month, day=b.day))
    ).SerializeToString() for agency_id, b in common.people[::step][:n])


def verify_requests(accounts: list[str]) -> tuple[bytes, ...]:
    from entitlement.v1 import activation_pb2
    return tuple(activation_pb2.VerifyEntitlementRequest(account_id=a).SerializeToString() for a in accounts)


def hot_loads(common: Common, accounts: list[str]) -> dict[str, tuple[tuple[bytes, ...], str]]:
    """The two hot reads' requests and the token each is sent with: CheckEligibility (advisor) over
    registry people, VerifyEntitlement (platform) over redeemed accounts."""
    return {CHECK: (check_requests(common), common.tokens[ADVISOR_ID]),
            VERIFY: (verify_requests(accounts), common.tokens[PLATFORM_CALLER_ID])}


def probes(common: Common, person: tuple[str, dt.date],
           accounts: list[str]) -> list[tuple[str, str, str, bytes, tuple[tuple[str, str], ...]]]:
    """Requests whose answers must be identical from every model: successes and each error path
    the interceptors and handlers map (a fixed x-request-id makes error details comparable)."""
    from google.type import date_pb2

    from entitlement.v1 import activation_pb2, common_pb2, eligibility_pb2
    adv, plat = common.tokens[ADVISOR_ID], common.tokens[PLATFORM_CALLER_ID]

    def md(token: str | None) -> tuple[tuple[str, str], ...]:
        rid = (("x-request-id", "bench-probe-0001"),)
        return rid + ((("authorization", f"Bearer {token}"),) if token is not None else ())

    agency_id, b = person
    ok_check = eligibility_pb2.CheckEligibilityRequest(program=f"programs/{PROGRAM}", job_seeker=common_pb2.JobSeekerIdentity(
        agency_id=agency_id, birth_date=date_pb2.Date(year=b.year, month=b.month, day=b.day))).SerializeToString()
    all_programs = eligibility_pb2.CheckEligibilityRequest(job_seeker=common_pb2.JobSeekerIdentity(
        agency_id=agency_id, birth_date=date_pb2.Date(year=b.year, month=b.month, day=b.day))).SerializeToString()
    bad = eligibility_pb2.CheckEligibilityRequest(program="nope", job_seeker=common_pb2.JobSeekerIdentity(
        agency_id="!!")).SerializeToString()
    future = eligibility_pb2.CheckEligibilityRequest(as_of=date_pb2.Date(year=2099, month=1, day=1),
                                                     job_seeker=common_pb2.JobSeekerIdentity(
        agency_id=agency_id, birth_date=date_pb2.Date(year=b.year, month=b.month, day=b.day))).SerializeToString()
    verify_ok = activation_pb2.VerifyEntitlementRequest(account_id=accounts[0]).SerializeToString()
    verify_none = activation_pb2.VerifyEntitlementRequest(account_id="nobody").SerializeToString()
    base = "/entitlement.v1.ActivationService/"
    return [
        ("CheckEligibility OK", "uu", METHOD_PATHS[CHECK], ok_check, md(adv)),
        ("CheckEligibility all programs", "uu", METHOD_PATHS[CHECK], all_programs, md(adv)),
        ("VerifyEntitlement redeemed account", "uu", METHOD_PATHS[VERIFY], verify_ok, md(plat)),
        ("VerifyEntitlement unknown account", "uu", METHOD_PATHS[VERIFY], verify_none, md(plat)),
        ("no credentials", "uu", METHOD_PATHS[CHECK], ok_check, md(None)),
        ("bad token", "uu", METHOD_PATHS[CHECK], ok_check, md("not-a-token")),
        ("wrong role", "uu", METHOD_PATHS[CHECK], ok_check, md(plat)),
        ("invalid fields", "uu", METHOD_PATHS[CHECK], bad, md(adv)),
        ("undecodable request bytes", "uu", METHOD_PATHS[CHECK], b"\xff\xff\xff", md(adv)),
        ("as_of in the future", "uu", METHOD_PATHS[CHECK], future, md(adv)),
        ("ReportUsage, empty request", "uu", base + "ReportUsage", b"", md(plat)),
        ("GetSigningKeys", "uu", base + "GetSigningKeys", b"", md(plat)),
        ("server stream until its deadline (WatchEntitlementChanges)", "us", base + "WatchEntitlementChanges", b"",
         md(plat)),
        ("server stream, bad request (WatchEntitlementChanges)", "us", base + "WatchEntitlementChanges",
         activation_pb2.WatchEntitlementChangesRequest(cursor="not-a-cursor").SerializeToString(), md(plat)),
        ("client stream, role refused (RegistryService/ImportExtract)", "su",
         "/entitlement.v1.RegistryService/ImportExtract", b"", md(adv)),
        ("health check", "uu", "/grpc.health.v1.Health/Check", b"", ()),
        ("unknown method", "uu", "/entitlement.v1.EligibilityService/Nope", b"", md(adv)),
    ]


def compare_probes(labels: list[str], answers: list[list[tuple[str, bytes]]],
                   models: tuple[str, ...] = (SYNC, AIO)) -> list[str]:
    """Differences between the first model's answers and each other's (errors compared as parsed
    google.rpc.Status with unpacked details: map fields such as ErrorInfo.metadata serialize in no
    fixed order)."""
    diffs = []
    for label, row in zip(labels, answers):
        code_a, body_a = row[0]
        for model, (code_b, body_b) in zip(models[1:], row[1:]):
            same = code_a == code_b and (body_a == body_b if code_a == "OK" else status_key(body_a) == status_key(body_b))
            if not same:
                diffs.append(f"{label}: {models[0]} {code_a} vs {model} {code_b}")
    return diffs


# ------------------------------------------------------------------------------------------ runs

def measure(client: Client, srv: dict[str, Server], models: tuple[str, ...], backend: str, method: str,
            requests: tuple[bytes, ...], token: str, concurrency: int, cfg: BenchConfig) -> list[RunResult]:
    """One case for each model: cfg.rounds rounds in alternating order (A B, B A, ...), each a
    warm-up then seconds/rounds measured; the rounds of a model are merged (calls, CPU, latencies)."""
    per_round = cfg.seconds / cfg.rounds
    parts: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    for k in range(cfg.rounds):
        for model in (models if k % 2 == 0 else tuple(reversed(models))):
            parts[model].append(client.ask("run", LoadSpec(
                port=srv[model].port, server_pid=srv[model].pid, method=method, requests=requests, token=token,
                concurrency=concurrency, warmup=cfg.warmup, seconds=per_round)))
    out = []
    for model in models:
        ms = parts[model]
        latencies = sorted(x for m in ms for x in array("d", m["latencies"]))
        errors: dict[str, int] = {}
        for m in ms:
            for code, n in m["errors"].items():
                errors[code] = errors.get(code, 0) + n
        r = RunResult(backend=backend, model=model, method=method, concurrency=concurrency,
                      seconds=sum(m["seconds"] for m in ms), calls=sum(m["calls"] for m in ms), errors=errors,
                      p50_ms=report.percentile(latencies, 50) * 1e3, p95_ms=report.percentile(latencies, 95) * 1e3,
                      p99_ms=report.percentile(latencies, 99) * 1e3,
                      server_cpu_s=sum(m["server_cpu_s"] for m in ms), client_cpu_s=sum(m["client_cpu_s"] for m in ms),
                      machine_cpu_s=sum(m["machine_cpu_s"] for m in ms),
                      round_rps=tuple(m["calls"] / m["seconds"] for m in ms), calls_made=sum(m["made"] for m in ms))
        errs = f"  errors {r.errors}" if r.errors else ""
        say(f"  {backend:<8} {model:<15} {method:<17} c={concurrency:<3} {r.rps:>8,.0f} req/s  p50 {r.p50_ms:6.2f} ms  "
            f"p99 {r.p99_ms:6.2f} ms  server CPU {r.server_cpu_s:5.2f} s{errs}")
        out.append(r)
    return out


def main() -> int:
    cfg = BenchConfig.from_env()
    began = time.monotonic()
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    code = commit()  # before the run: the tree may change while it goes on
    tmp = Path(tempfile.mkdtemp(prefix="entitlement-bench-"))
    client: Client | None = None
    results: list[RunResult] = []
    parity: list[str] = []
    try:
        say(f"bench: {cfg.seconds:g} s measured per model and case in {cfg.rounds} alternating round(s), each after "
            f"{cfg.warmup:g} s warm-up; concurrency {cfg.concurrency}; {cfg.workers} workers; temp dir {tmp}")
        backends, skipped, pg_ver = usable_backends(list(cfg.backends), cfg.pg_admin_url, "bench")
        common = prepare_common(tmp, cfg.people)
        say(f"bench: synthetic registry of {cfg.people:,} people")
        client = Client()

        say("bench: echo floor")
        echo_req = check_requests(common, 1)
        with servers([server_spec(k, cfg, common, "echo") for k in ECHO_MODELS]) as srv:
            for conc in cfg.concurrency:
                results += measure(client, srv, ECHO_MODELS, "-", ECHO, echo_req, "", conc, cfg)

        for backend in backends:
            with imported_database(backend, common, cfg.pg_admin_url, "bench") as url:
                with servers([server_spec(SYNC, cfg, common, backend, url)]) as sync_srv:
                    t = time.monotonic()
                    seeded = client.ask("seed", SeedSpec(
                        port=sync_srv[SYNC].port, advisor_token=common.tokens[ADVISOR_ID],
                        platform_token=common.tokens[PLATFORM_CALLER_ID],
                        candidates=tuple((a, b.isoformat()) for a, b in common.candidates), count=cfg.activations))
                    accounts = [acc for acc, _, _ in seeded]
                    say(f"bench: {backend}: {len(accounts)} activations created and redeemed through the RPCs "
                        f"({time.monotonic() - t:.1f} s)")
                    others = tuple(m for m in MODELS if m != SYNC)
                    with servers([server_spec(m, cfg, common, backend, url) for m in others]) as aio_srv:
                        srv = {**sync_srv, **aio_srv}
                        _, agency_id, birth = seeded[0]
                        pr = probes(common, (agency_id, dt.date.fromisoformat(birth)), accounts)
                        answers = client.ask("probe", ([srv[m].port for m in MODELS], pr))
                        diffs = compare_probes([p[0] for p in pr], answers, MODELS)
                        parity.append(f"{backend}: {len(pr) * len(others) - len(diffs)}/{len(pr) * len(others)} identical "
                                      f"({', '.join(others)} against sync)"
                                      + (f" (DIFFERENT: {'; '.join(diffs)})" if diffs else ""))
                        say(f"bench: {backend}: parity probes: {parity[-1]}")
                        if diffs:
                            raise SystemExit("bench: the aio variant does not answer like the sync server; "
                                             "fix entitlement/aio_server.py before comparing speed")
                        for method, (reqs, token) in hot_loads(common, accounts).items():
                            for conc in cfg.concurrency:
                                results += measure(client, srv, MODELS, backend, method, reqs, token, conc, cfg)
    except KeyboardInterrupt:
        say("bench: interrupted")
        return 130
    finally:
        if client is not None:
            client.stop()
        if cfg.keep:
            say(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - began
    say("")
    say(report.text_table(results))
    say("")
    say(report.conclusion(results) + " " + report.saturation(results, len(os.sched_getaffinity(0))))
    say(f"Load average at start {loadavg}; other processes used {report.foreign_load(results):.2f} cores during "
        f"the echo and SQLite windows.")
    cpu, mem = machine()
    nproc = len(os.sched_getaffinity(0))
    how = report.Method(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), nproc=nproc, cpu=cpu, memory_gib=mem,
        python=platform.python_version(), grpcio=metadata.version("grpcio"), warmup=cfg.warmup, seconds=cfg.seconds,
        rounds=cfg.rounds, commit=code, concurrency=cfg.concurrency, backends=tuple(backends), skipped=skipped,
        postgres_version=pg_ver, people=cfg.people, activations=cfg.activations, workers=cfg.workers,
        log_level=cfg.log_level, parity="; ".join(parity) or "not run", elapsed_s=elapsed, loadavg=loadavg)
    if cfg.output is not None:
        # BENCHMARKS.md holds one section per benchmark (bench/sections.py); this one is ours.
        replace_section(cfg.output, SECTION, report.markdown(how, results))
        say(f"\nbench: wrote {cfg.output} ({elapsed:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
