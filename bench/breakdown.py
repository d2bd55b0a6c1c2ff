"""Where a check's and a verification's instructions go (`python -m bench.breakdown`).

bench.instructions counts the whole server process per call; this counts the pieces of the two hot
reads in-process, with the same tool (valgrind's callgrind counts instructions: the same figure
however loaded the machine is). The process switches counting on and off around N calls of each
piece through callgrind's client requests (a 3-line C helper compiled here with gcc and loaded with
ctypes), so that one valgrind run measures every piece; each count is divided by N.

The pieces are the real code (a server Context built from the same settings as server.py, the
production behaviours and servicers), called directly: no gRPC, no network. What gRPC itself
costs is the echo call of bench.instructions (its thread-pool model's). The figures say how far a check or a verification is
from what the targets of issue #8 allow (a call of at most 1 / target echo calls).

Needs valgrind and gcc (both on every machine kind here). BENCH_BREAKDOWN_CALLS sets N (200).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import say
from bench.procs import commit
from bench.sections import replace_section
from entitlement.config import ROOT

SECTION = "breakdown"
_HELPER_C = """#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""


def _measure_in_child(prep: Path, n: int, helper: Path, out: Path) -> None:
    """Runs under valgrind: builds the service, measures each piece, writes the labels in order."""
    env, tokens, people = json.loads((prep / "env.json").read_text())
    people = [(a, dt.date.fromisoformat(b)) for a, b in people]
    os.environ.update({k: v for k, v in env.items() if k.startswith("ENTITLEMENT_")})
    import grpc

    from bench.instructions import PROGRAM, who
    from entitlement import app, eligibility, logs, registry
    from entitlement.activation import _VERIFY, verify
    from entitlement.api import convert, wrapping
    from entitlement.api.accesslog import AccessLogInterceptor
    from entitlement.api.identity import CallerInterceptor, _caller
    from entitlement.api.servicers import ActivationServicer, EligibilityServicer
    from entitlement.config import Settings
    from entitlement.v1 import activation_pb2, eligibility_pb2

    cg = ctypes.CDLL(str(helper))
    settings = Settings.from_env()
    logs.configure("info", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the life of the process
    ctx = app.build(settings)
    from entitlement.server_main import tune_gc

    class Context:  # what the behaviours and servicers read of a grpc.ServicerContext
        def __init__(self, token: str) -> None:
            self.md = (("authorization", "Bearer " + token),)

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return self.md

        def time_remaining(self) -> float:
            return 30.0

        def is_active(self) -> bool:
            return True

        def abort_with_status(self, status: Any) -> None:
            raise RuntimeError(status)

        def code(self) -> None:
            return None

    labels: list[tuple[str, str]] = []
    tune_gc()  # as server.py: a full collection inside one window of a few calls made a part exceed its whole

    def measure(rpc: str, label: str, fn: Callable[[int], object]) -> None:
        for k in range(max(20, n)):  # the same people as measured: their caches warm (as bench.instructions's)
            fn(k)
        # Every window starts with the collector's generations empty (uncounted): a collection of
        # what earlier pieces left, falling inside a window of a few calls, made a part exceed its
        # whole (the test's 5 calls, CI of 8e1110a's successor).
        gc.collect()
        cg.cg_start()
        for k in range(n):
            fn(k)
        cg.cg_stop()
        labels.append((rpc, label))

    behaviours = (AccessLogInterceptor(), CallerInterceptor(ctx.callers, client_certificates=False))
    # CheckEligibility
    adv = Context(tokens["bench-advisor"])
    svc = EligibilityServicer(ctx)
    reqs = [eligibility_pb2.CheckEligibilityRequest(job_seeker=who(p), program=PROGRAM) for p in people]
    raw = [r.SerializeToString() for r in reqs]
    method = "/entitlement.v1.EligibilityService/CheckEligibility"
    wrapped = wrapping.wrap_handler(grpc.unary_unary_rpc_method_handler(
        svc.CheckEligibility, request_deserializer=eligibility_pb2.CheckEligibilityRequest.FromString,
        response_serializer=eligibility_pb2.CheckEligibilityResponse.SerializeToString), method, behaviours)
    m = len(people)
    measure("CheckEligibility", "the handler as gRPC calls it (bytes in, bytes out)", lambda k: wrapped.response_serializer(
        wrapped.unary_unary(wrapped.request_deserializer(raw[k % m]), adv)))
    measure("CheckEligibility", "of which the servicer method", lambda k: svc.CheckEligibility(reqs[k % m], adv))

    def check(k: int) -> eligibility.CheckResult:
        r = reqs[k % m]
        b = r.job_seeker.birth_date
        return eligibility.check(ctx, eligibility.JobSeeker(r.job_seeker.agency_id, dt.date(b.year, b.month, b.day)),
                                 "premium-job-seekers", None)
    measure("CheckEligibility", "of which eligibility.check (lookup + rules)", check)
    keys = [ctx.pseudo.person_key(p[0]) for p in people]
    measure("CheckEligibility", "of which the registry lookup (hot read)",
            lambda k: registry.lookup(ctx.db.hot, keys[k % m], people[k % m][1]))
    measure("CheckEligibility", "of which the person key (HMAC-SHA256)", lambda k: ctx.pseudo.person_key(people[k % m][0]))
    results = [check(k) for k in range(m)]
    measure("CheckEligibility", "of which the answer (convert.check_answer: its bytes, kept per decision)",
            lambda k: convert.check_answer(results[k % m].decisions, results[k % m].snapshot))
    # VerifyEntitlement
    plat = Context(tokens["bench-platform"])
    asv = ActivationServicer(ctx)
    platform = ctx.callers.authenticate(tokens["bench-platform"])
    vreq = activation_pb2.VerifyEntitlementRequest(account_id="bench-account-none")
    vraw = vreq.SerializeToString()
    vmethod = "/entitlement.v1.ActivationService/VerifyEntitlement"
    vwrapped = wrapping.wrap_handler(grpc.unary_unary_rpc_method_handler(
        asv.VerifyEntitlement, request_deserializer=activation_pb2.VerifyEntitlementRequest.FromString,
        response_serializer=activation_pb2.EntitlementStatus.SerializeToString), vmethod, behaviours)
    measure("VerifyEntitlement", "the handler as gRPC calls it (bytes in, bytes out)", lambda k: vwrapped.response_serializer(
        vwrapped.unary_unary(vwrapped.request_deserializer(vraw), plat)))
    token = _caller.set(platform)
    measure("VerifyEntitlement", "of which the servicer method", lambda k: asv.VerifyEntitlement(vreq, plat))
    _caller.reset(token)
    measure("VerifyEntitlement", "of which the hot read", lambda k: ctx.db.hot.first(
        _VERIFY, {"platform": "openclassrooms", "account": "bench-account-none"}))
    status = verify(ctx, platform, "bench-account-none")
    measure("VerifyEntitlement", "of which the protobuf conversion", lambda k: convert.status(status))
    # The edge, shared by both.
    acc, ident = behaviours

    # Each around nothing, as it wraps a unary method (`around_unary`: what every read goes through).
    access, identity = (b.around_unary(lambda request, context: None, method) for b in (acc, ident))
    measure("both", "access log (request id, error mapping, the JSON line)", lambda k: access(None, adv))
    measure("both", "caller identity (bearer token, role)", lambda k: identity(None, adv))
    out.write_text(json.dumps(labels))


def _totals(pattern: Path) -> list[int]:
    files = sorted(pattern.parent.glob(pattern.name + ".*"), key=lambda f: (len(f.name), f.name))
    totals = []
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals: ") and int(line.split()[1]) > 0:
                totals.append(int(line.split()[1]))
    return totals


def run(n: int, tmp: Path) -> list[tuple[str, str, int]]:
    from bench.instructions import prepare
    helper = tmp / "libcg.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(helper), "-x", "c", "-"],
                   input=_HELPER_C.encode(), check=True)
    prep = tmp / "prep"
    prep.mkdir()
    env, tokens, people = prepare(prep)
    (prep / "env.json").write_text(json.dumps([env, tokens, [(a, b.isoformat()) for a, b in people[:500]]]))
    out, labels = tmp / "cg.out", tmp / "labels.json"
    subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
                    sys.executable, "-c", "import sys; from pathlib import Path; from bench.breakdown import "
                    f"_measure_in_child as m; m(Path({str(prep)!r}), {n}, Path({str(helper)!r}), Path({str(labels)!r}))"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    names = json.loads(labels.read_text())
    totals = _totals(out)
    if len(totals) != len(names):
        raise SystemExit(f"bench.breakdown: {len(totals)} counts for {len(names)} pieces")
    return [(rpc, label, total // n) for (rpc, label), total in zip(names, totals)]


TARGETS = {"CheckEligibility": 0.5, "VerifyEntitlement": 0.6}


def markdown(rows: list[tuple[str, str, int]], echo: int | None, n: int, seconds: float) -> str:
    lines = [
        "## Where a check's and a verification's instructions go (`python -m bench.breakdown`)",
        "",
        f"- Run on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {commit()}; {seconds:.0f} s in all.",
        f"- valgrind (callgrind) instruction counts per call, in-process, {n} calls of each piece after 20 "
        "unmeasured ones and a collection of the cyclic garbage (uncounted) "
        "(the real code, no gRPC: its own cost is the echo call of section \"instructions\"). "
        "CheckEligibility cycles over 500 registry people (about half eligible: their answer carries a "
        "funding plan); VerifyEntitlement asks for an account with no activation.",
    ]
    if echo:
        lines.append(f"- Echo call (section \"instructions\", the thread-pool model's floor): {echo:,} instructions. A target ratio r allows "
                     "a call of at most echo / r instructions in all, gRPC's part included: "
                     + ", ".join(f"{rpc} {echo / r - echo:,.0f} beyond the echo call (r = {r})"
                                 for rpc, r in TARGETS.items()) + ".")
    lines += ["", "| rpc | piece | instructions/call |", "|---|---|---:|"]
    lines += [f"| {rpc} | {label} | {count:,} |" for rpc, label, count in rows]
    return "\n".join(lines) + "\n"


def _echo_from_benchmarks(path: Path) -> int | None:
    """The thread-pool model's echo call of section "instructions" (these pieces are the thread-pool
    server's path: the handler as its pool thread calls it)."""
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        if line.startswith("| threads | Echo ("):
            return int(line.split("|")[4].strip().replace(",", ""))
    return None


def main() -> int:
    if not (shutil.which("valgrind") and shutil.which("gcc") and Path("/usr/include/valgrind/callgrind.h").exists()):
        say("bench.breakdown: needs valgrind, its headers and gcc; skipped")
        return 0
    n = int(os.environ.get("BENCH_BREAKDOWN_CALLS", "200"))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as d:
        rows = run(n, Path(d))
    for rpc, label, count in rows:
        say(f"{rpc:18s} {label:55s} {count:>10,}")
    out = os.environ.get("BENCH_OUTPUT", "").strip()
    if out != "-":
        path = Path(out) if out else ROOT / "BENCHMARKS.md"
        replace_section(path, SECTION, markdown(rows, _echo_from_benchmarks(path), n, time.time() - started))
        say(f"bench.breakdown: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
