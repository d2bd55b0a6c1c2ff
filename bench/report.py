"""The figures: a table for the terminal, BENCHMARKS.md, and a conclusion computed from them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from bench.config import (AIO, AIO_ECHO_INLINE, AIO_INLINE, CHECK, ECHO, ECHO_MODELS, ECHO_OF, MODELS, SYNC, VERIFY, RunResult,
                          bench_event_loop, event_loop_text)

# A difference in throughput below this is called small (and, with a single round, level).
LEVEL = 0.05

HEAD = ("backend", "model", "rpc", "conc", "req/s", "x echo", "p50 ms", "p95 ms", "p99 ms",
        "srv CPU s", "srv CPU/call us", "cli CPU s", "errors")


@dataclass(frozen=True)
class Method:
    """How the figures were obtained (the short, exact method section)."""

    date: str
    nproc: int
    cpu: str
    memory_gib: float
    python: str
    grpcio: str
    warmup: float
    seconds: float
    rounds: int
    commit: str
    concurrency: tuple[int, ...]
    backends: tuple[str, ...]
    skipped: str            # why a wanted backend was not run ("" when none)
    postgres_version: str
    people: int
    activations: int
    workers: int
    log_level: str
    parity: str             # result of the parity probes
    elapsed_s: float
    loadavg: str            # /proc/loadavg (1, 5, 15 min) when the run began


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[max(1, min(rank, len(sorted_values))) - 1]


def p99_without_worst(calls: list[tuple[float, float]], slow: float, span: float) -> float:
    """(due time, latency) pairs of an open-loop window: the p99 latency once the calls due within
    the `span` seconds holding the most calls slower than `slow` are left out (nothing left out when
    none is that slow). Tells one short stall (one burst of late calls: the p99 falls well under
    `slow`) from latency spread over the window (it stays): a diagnostic, never a verdict."""
    late = sorted(due for due, latency in calls if latency > slow)
    worst, start, j = 0, None, 0
    for i, t in enumerate(late):  # the span starting at each late call's due time
        while j < len(late) and late[j] < t + span:
            j += 1
        if j - i > worst:
            worst, start = j - i, t
    kept = sorted(latency for due, latency in calls
                  if start is None or not start <= due < start + span)
    return percentile(kept, 99)


def echo_of(results: list[RunResult], r: RunResult) -> RunResult | None:
    if r.method == ECHO or r.model not in ECHO_OF:
        return None
    for e in results:
        if e.method == ECHO and e.model == ECHO_OF[r.model] and e.concurrency == r.concurrency:
            return e
    return None


def _ratio(r: RunResult, results: list[RunResult]) -> float:
    """req/s over the echo floor of the same model at the same concurrency (nan without one)."""
    e = echo_of(results, r)
    return r.rps / e.rps if e and e.rps else float("nan")


def _row(results: list[RunResult], r: RunResult) -> tuple[str, ...]:
    x = _ratio(r, results)
    ratio = "-" if math.isnan(x) else f"{x:.2f}"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
    return (r.backend, r.model, r.method, str(r.concurrency), f"{r.rps:,.0f}", ratio, f"{r.p50_ms:.2f}",
            f"{r.p95_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.server_cpu_s:.2f}", f"{r.cpu_us_per_call:,.0f}",
            f"{r.client_cpu_s:.2f}", errors)


def _ordered(results: list[RunResult]) -> list[RunResult]:
    backends = list(dict.fromkeys(r.backend for r in results))
    methods = [ECHO, CHECK, VERIFY]
    models = [*ECHO_MODELS, *MODELS]
    return sorted(results, key=lambda r: (backends.index(r.backend), methods.index(r.method), r.concurrency,
                                          models.index(r.model) if r.model in models else len(models)))


def text_table(results: list[RunResult]) -> str:
    rows = [HEAD] + [_row(results, r) for r in _ordered(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    numeric = set(range(3, 12))
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: list[RunResult]) -> str:
    rows = [_row(results, r) for r in _ordered(results)]
    out = ["| " + " | ".join(HEAD) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(HEAD))) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _gmean(values: Iterable[float]) -> float:
    vs = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in vs) / len(vs)) if vs else float("nan")


def _pct(ratio: float) -> str:
    return f"{abs(ratio - 1) * 100:.0f}%"


def pairs(results: list[RunResult], other: str = AIO) -> list[tuple[RunResult, RunResult]]:
    """(sync, other model) runs of the same backend, RPC and concurrency, real handlers only."""
    out = []
    for s in results:
        if s.model == SYNC and s.method != ECHO:
            for a in results:
                if (a.model == other and a.backend == s.backend and a.method == s.method
                        and a.concurrency == s.concurrency):
                    out.append((s, a))
    return out


# Two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 beyond the table).
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
        12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09, 25: 2.06,
        30: 2.04, 40: 2.02, 60: 2.00}


def _t95(df: int) -> float:
    return next((_T95[k] for k in sorted(_T95) if k >= df), 1.96)


def paired_rounds(ps: list[tuple[RunResult, RunResult]]) -> list[float]:
    """log(aio / sync) throughput of each round, paired with the adjacent round of the other model."""
    return [math.log(a.round_rps[k] / s.round_rps[k]) for s, a in ps
            for k in range(min(len(s.round_rps), len(a.round_rps))) if s.round_rps[k] > 0 and a.round_rps[k] > 0]


def interval(logs: list[float]) -> tuple[float, float, float] | None:
    """Geometric mean ratio and its 95% confidence interval from paired log ratios."""
    n = len(logs)
    if n < 2:
        return None
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = _t95(n - 1) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def conclusion(results: list[RunResult]) -> str:
    ps = [(s, a) for s, a in pairs(results) if s.rps and a.rps]
    if not ps:
        return "No pair of runs to compare."
    tput = [a.rps / s.rps for s, a in ps]
    g = _gmean(tput)
    cpu = _gmean(a.cpu_us_per_call / s.cpu_us_per_call for s, a in ps if s.cpu_us_per_call and a.cpu_us_per_call)
    p99 = _gmean(a.p99_ms / s.p99_ms for s, a in ps if s.p99_ms and a.p99_ms)
    aio_wins = sum(1 for t in tput if t > 1)
    cases = (f"{len(ps)} cases ({len({s.backend for s, _ in ps})} backend(s) x {len({s.method for s, _ in ps})} RPCs x "
             f"{len({s.concurrency for s, _ in ps})} concurrency levels)")
    spread = f"per case from {min(tput):.2f}x to {max(tput):.2f}x, aio ahead in {aio_wins} of {len(ps)}"
    logs = paired_rounds(ps)
    ci = interval(logs)
    ci_txt = (f"; 95% confidence interval of the aio/sync ratio over the {len(logs)} paired rounds: "
              f"{ci[1]:.2f}x to {ci[2]:.2f}x" if ci else "")
    if ci and ci[1] <= 1 <= ci[2] or not ci and abs(math.log(g)) < math.log(1 + LEVEL):
        head = (f"For our handlers neither model is measurably faster on this machine: over the {cases} the aio "
                f"server's throughput is {g:.2f}x the sync server's (geometric mean; {spread}{ci_txt}).")
    else:
        faster, slower = (AIO, SYNC) if g > 1 else (SYNC, AIO)
        lead = g if g > 1 else 1 / g
        size = " (a small margin)" if lead < 1 + LEVEL else ""
        head = (f"For our handlers the {faster} server is faster on this machine: over the {cases} its throughput "
                f"is {lead:.2f}x the {slower} server's, {_pct(lead)} more requests per second{size} (geometric mean; "
                f"aio/sync {spread}{ci_txt}).")
    by_backend = []
    for backend in dict.fromkeys(s.backend for s, _ in ps):
        gb = _gmean(a.rps / s.rps for s, a in ps if s.backend == backend)
        by_backend.append(f"{backend} {gb:.2f}x")

    def echo(model: str, attr: str) -> float:
        """Geometric mean over concurrency levels of an echo model's rps or CPU per call, over sync-echo's."""
        return _gmean(getattr(a, attr) / getattr(s, attr) for s in results for a in results
                      if s.model == ECHO_OF[SYNC] and a.model == model and s.concurrency == a.concurrency
                      and getattr(s, attr) and getattr(a, attr))

    echo_txt = ""
    ge, gi = echo(ECHO_OF[AIO], "rps"), echo(AIO_ECHO_INLINE, "rps")
    if not math.isnan(ge):
        sync_echo_us = _gmean(r.cpu_us_per_call for r in results if r.model == ECHO_OF[SYNC])
        aio_echo_us = _gmean(r.cpu_us_per_call for r in results if r.model == ECHO_OF[AIO])
        handler_us = _gmean(s.cpu_us_per_call for s, _ in ps)
        echo_txt = (f" On the bare echo floor aio/sync throughput is {ge:.2f}x with the same thread hop as our "
                    f"handlers" + (f" ({gi:.2f}x when aio answers on the event loop)" if not math.isnan(gi) else "")
                    + f", and the server spends {aio_echo_us:,.0f} us of CPU per echo call on aio against "
                    f"{sync_echo_us:,.0f} us on sync, while a real call costs {handler_us:,.0f} us on sync "
                    f"(geometric means): the difference between the models is "
                    f"{(aio_echo_us - sync_echo_us) / handler_us:.0%} of a real call's cost"
                    + (", so our handlers' own work, not the server model, decides the throughput."
                       if abs(aio_echo_us - sync_echo_us) < 0.1 * handler_us else "."))
    return (f"{head} Per backend, aio/sync throughput is {', '.join(by_backend)}. Server CPU per call aio/sync: "
            f"{cpu:.2f}x; p99 latency aio/sync: {p99:.2f}x.{echo_txt}{inline_text(results)}")


def inline_text(results: list[RunResult]) -> str:
    """What running the hot reads on the event loop (model aio-inline) does, per backend and RPC:
    its throughput over the sync server's, and each model's ratio to its own echo floor."""
    ps = [(s, a) for s, a in pairs(results, AIO_INLINE) if s.rps and a.rps]
    if not ps:
        return ""
    parts = []
    for backend in dict.fromkeys(s.backend for s, _ in ps):
        for method in dict.fromkeys(s.method for s, _ in ps if s.backend == backend):
            here = [(s, a) for s, a in ps if s.backend == backend and s.method == method]
            g = _gmean(a.rps / s.rps for s, a in here)
            xs = [x for s, _ in here if not math.isnan(x := _ratio(s, results))]
            xi = [x for _, a in here if not math.isnan(x := _ratio(a, results))]
            parts.append(f"{backend} {method} {g:.2f}x (x echo {_gmean(xs):.2f} on sync, {_gmean(xi):.2f} on "
                         f"aio-inline)")
    return (" With the hot reads run on the event loop instead of a pool thread (aio-inline: no thread "
            "hand-over for those calls), throughput over the sync server's, and each model's ratio to its "
            f"own echo floor (geometric means over the concurrency levels): {'; '.join(parts)}.")


def foreign_load(results: list[RunResult]) -> float:
    """Cores used, on average over the measured windows of the echo and SQLite runs, by processes
    other than the server and the load generator (PostgreSQL runs excluded: its backends count)."""
    rs = [r for r in results if r.backend != "postgres" and r.seconds]
    total = sum(r.seconds for r in rs)
    return sum(r.other_cores * r.seconds for r in rs) / total if total else 0.0


def saturation(results: list[RunResult], nproc: int) -> str:
    """How busy the 2 shared cores were in the echo runs (the client is then part of the limit)."""
    echo = [r for r in results if r.method == ECHO and r.seconds]
    if not echo:
        return ""
    busiest = max(echo, key=lambda r: (r.server_cpu_s + r.client_cpu_s) / r.seconds)
    cores = (busiest.server_cpu_s + busiest.client_cpu_s) / busiest.seconds
    real = [r for r in results if r.method != ECHO and r.seconds]
    real_txt = ""
    if real:
        lo = min(r.server_cpu_s / r.seconds for r in real)
        hi = max(r.server_cpu_s / r.seconds for r in real)
        busy = sum(r.machine_cpu_s for r in real) / sum(r.seconds for r in real)
        real_txt = (f" In the real-handler runs the server process uses {lo:.2f} to {hi:.2f} cores whatever the "
                    f"model and the concurrency, while the machine as a whole is {busy:.2f} of {nproc} cores busy "
                    f"(server, client, PostgreSQL): the server process, not the machine, is the limit.")
    return (f"In the echo runs the server and the client together use up to {cores:.1f} cores "
            f"({busiest.model}, {busiest.concurrency} in flight: server {busiest.server_cpu_s / busiest.seconds:.2f}, "
            f"client {busiest.client_cpu_s / busiest.seconds:.2f}), so the echo floor is partly bounded by the "
            f"shared machine.{real_txt}")


def markdown(method: Method, results: list[RunResult]) -> str:
    conc = " and ".join(str(c) for c in method.concurrency)
    skipped = f" ({method.skipped})" if method.skipped else ""
    pg = f" (PostgreSQL {method.postgres_version})" if method.postgres_version else ""
    per_round = method.seconds / method.rounds
    return f"""## Server models: sync thread pool vs grpc.aio (hot reads on a pool thread or on the event loop)

Written by `python -m bench` (the server-model part of `make bench`, code in `bench/`); each run rewrites this section.

Question: for our real handlers, is the sync thread-pool gRPC server (`entitlement.server_main.start`) or a `grpc.aio` server faster on this machine?

### Method

- Machine: `nproc` = {method.nproc} ({method.cpu}), {method.memory_gib:.0f} GiB. Run on {method.date}; {method.elapsed_s:.0f} s in all. Python {method.python}, grpcio {method.grpcio}. Code: {method.commit}.
- Backends: {", ".join(method.backends)}{pg}{skipped}. Synthetic registry of {method.people:,} people; {method.activations} activations created and redeemed to platform accounts through the real RPCs. CheckEligibility (advisor, program premium-job-seekers) cycles over registry people; VerifyEntitlement (platform) over the redeemed accounts. FixedClock at 2026-03-16. Servers log at `{method.log_level}` (one JSON access line per call) to a file.
- Server models, each in its own process: **sync** = `server_main.start` unchanged (ENTITLEMENT_SERVER_MODEL=threads) (ThreadPoolExecutor of {method.workers}, its behaviours wrapped around each method); **aio** = `grpc.aio.server` with each of our methods wrapped once in the production behaviours, as the sync server wraps them (`server_main.call_behaviors`, `wrapping.wrap_handler`), the wrapped call run with `loop.run_in_executor` on a ThreadPoolExecutor of {method.workers} (streams on a pool of their own) (`entitlement/aio_server.py`, nothing inline); **aio-inline** = the same aio server with the two hot reads (CheckEligibility, VerifyEntitlement) run on the event loop itself: the production event-loop server (ENTITLEMENT_SERVER_MODEL=event-loop, the default on SQLite) (no thread hand-over; the sync server cannot do this, its handler waits for the request message that only its polling thread delivers; a blocking PostgreSQL round trip then stops the loop); **sync-echo** / **aio-echo** = the same set-ups with no interceptor and one bytes-in/bytes-out method (aio-echo hops to the pool as our handlers must; **aio-echo-inline** answers on the event loop, the floor of aio-inline). Every aio server, ours and the echoes, on {event_loop_text(bench_event_loop(), 'BENCH_EVENT_LOOP')}.
- Parity check before timing, same requests to every model (successes and each error path): {method.parity}.
- Load: one grpc.aio client process, one channel, pre-serialized requests, {conc} calls in flight. Each case (model x RPC x concurrency) is measured for {method.seconds:g} s in {method.rounds} rounds of {per_round:g} s, each after {method.warmup:g} s of warm-up calls; the models alternate round by round (sync, aio, aio-inline, then the other way round, ...), and the conclusion compares rounds of the same index. Client and server share the {method.nproc} cores.
- Columns: req/s = calls completed OK in the measured windows / their length; x echo = req/s over the echo server of the same model at the same concurrency; p50/p95/p99 = client-side latency; srv CPU s = utime+stime of the server process (/proc/PID/stat) over the {method.seconds:g} s measured; srv CPU/call = that per call; cli CPU s = the client's.
- Other load on the machine: load average {method.loadavg} when the run began; during the echo and SQLite windows, processes other than the server and the client used {foreign_load(results):.2f} cores on average. Absolute figures drift by up to a third between invocations on this shared VM; compare models within one run.

### Results

{markdown_table(results)}

### Conclusion

{conclusion(results)} {saturation(results, method.nproc)}
"""
