"""`python -m bench.mixed` (part of `make bench`): a platform's checks while other callers' long
calls run beside them, on the real server.

Every other benchmark measures one RPC at a time. A server serves them all at once: signups'
CheckEligibility calls (well under a millisecond of work each) arrive while a funder pages through
activations (about 2 ms of Python a page of 100) or advisors activate people (about 1.5 ms). One
interpreter lock serves every thread of a process: a check's steps (gRPC's poller, the pool thread,
its read, its log line) wait for it while a long call runs Python. This measures what that does to
the checks' latency, and what the long calls get meanwhile.

For each backend: a fresh database (migrated, a synthetic registry imported, activations made by
the real RPC for the pages to list), served by the real server (`entitlement.server_main.start`,
the backend's production model, the production behaviours). Two load-generator processes: the
foreground sends CheckEligibility at a fixed rate (open loop: each call on time whatever the
others' fate, its latency counted from when it was due); the background keeps BENCH_MIXED_INFLIGHT
calls of one long RPC in flight (closed loop): ListActivations, ActivateEntitlement, or nothing (the
reference). Each case is measured in rounds, the cases taking turns round by round (their order
reversed every other round); the rounds' latencies are merged before percentiles are taken.

The experiment behind docs/PERFORMANCE-LOG.md (ninth session): BENCH_MIXED_INTERVALS=5000,1000,500 serves
each backend with one server per interpreter switch interval (`sys.setswitchinterval`, in us; how
long a thread that wants the lock waits before the running one is made to let go; 5,000 is Python's
own, which server.py keeps), side by side on the same database, taking turns in every round.

Settings (environment):
  BENCH_MIXED_RATE       foreground checks a second (400)
  BENCH_MIXED_INFLIGHT   background calls in flight (2)
  BENCH_MIXED_INTERVALS  switch intervals compared, in us (none: Python's own, as server.py)
  BENCH_MIXED_ROUNDS     rounds (4); BENCH_SECONDS measured per case and round (3)
  BENCH_WARMUP           unmeasured seconds before each case's round (0.5)
  BENCH_QUICK=1          the test's mode: small registry, one short round
  BENCH_BACKENDS, BENCH_PG_URL, BENCH_PEOPLE, BENCH_WORKERS: as for `python -m bench.rpcs`
  BENCH_OUTPUT           BENCHMARKS.md (its "mixed" section is rewritten); "-" to only print
  BENCH_JSON             also write the results as JSON to this file (the test reads it)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from array import array
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import collector_out_of_the_way, say
from bench.config import (ACTIVATE, ADVISOR_ID, CHECK, FUNDER_CALLER_ID, LIST, SYNC, FillSpec, LoadSpec, PagesSpec,
                          ServerSpec, _float, _int, _list)
from bench.prepare import imported_database, prepare_common
from bench.procs import CALL_TIMEOUT, Client, Server, commit, loadavg, machine, server_group, usable_backends
from bench.report import percentile
from bench.rpcs import UNLIMITED_RATE, activate_requests, backend_model, check_requests, list_first_page
from bench.sections import replace_section
from bench.servers import SWITCH_INTERVAL_EVENT
from entitlement.config import ROOT, Settings

SECTION = "mixed"
PYTHON_DEFAULT_US = 5000  # sys.getswitchinterval() of a fresh interpreter, in us
NONE = "-"  # the background of the reference case: nothing
START_DELAY_S = 1.0  # from a round's start to both load generators' warm-up (their channels open first)


@dataclass(frozen=True)
class MixedConfig:
    rate: float
    inflight: int
    intervals: tuple[int, ...]
    rounds: int
    seconds: float
    warmup: float
    people: int
    pages: int              # pages of 100 the background lists, cycling (made by the real RPC first)
    backgrounds: tuple[str, ...]
    backends: tuple[str, ...]
    pg_admin_url: str
    workers: int
    output: Path | None
    json_path: Path | None

    @classmethod
    def from_env(cls) -> "MixedConfig":
        quick = os.environ.get("BENCH_QUICK", "") == "1"
        usage = "BENCH_MIXED_INTERVALS must list switch intervals in us, each at least 100, e.g. 5000,1000"
        try:
            intervals = tuple(dict.fromkeys(int(v) for v in _list("BENCH_MIXED_INTERVALS", "")))
        except ValueError:
            raise SystemExit(usage) from None
        if intervals and min(intervals) < 100:
            raise SystemExit(usage)
        backends = tuple(_list("BENCH_BACKENDS", "sqlite,postgres"))
        if set(backends) - {"sqlite", "postgres"}:
            raise SystemExit(f"BENCH_BACKENDS: unknown backend(s) in {backends}")
        out = os.environ.get("BENCH_OUTPUT", "").strip()
        rate, inflight = _float("BENCH_MIXED_RATE", 400.0), _int("BENCH_MIXED_INFLIGHT", 2)
        if rate <= 0 or inflight < 1:
            raise SystemExit("BENCH_MIXED_RATE must be positive and BENCH_MIXED_INFLIGHT at least 1")
        return cls(rate=rate, inflight=inflight, intervals=intervals or (0,),
                   rounds=max(1, _int("BENCH_MIXED_ROUNDS", 1 if quick else 4)),
                   seconds=_float("BENCH_SECONDS", 0.6 if quick else 3.0),
                   warmup=_float("BENCH_WARMUP", 0.2 if quick else 0.5),
                   people=max(_int("BENCH_PEOPLE", 4000 if quick else 50_000), 1000), pages=2 if quick else 10,
                   backgrounds=(NONE, LIST, ACTIVATE), backends=backends,
                   pg_admin_url=os.environ.get("BENCH_PG_URL", "").strip() or "postgresql://postgres@127.0.0.1:5432/test",
                   workers=max(_int("BENCH_WORKERS", Settings().max_workers), 1),
                   output=None if out == "-" else Path(out) if out else ROOT / "BENCHMARKS.md",
                   json_path=Path(os.environ["BENCH_JSON"]) if os.environ.get("BENCH_JSON") else None)


@dataclass
class Case:
    backend: str
    model: str
    interval_us: int        # 0: Python's own, as server.py
    background: str
    seconds: float = 0.0
    checks: int = 0
    check_errors: dict[str, int] = field(default_factory=dict)
    check_ms: dict[str, float] = field(default_factory=dict)   # p50, p95, p99, max
    background_calls: int = 0
    background_seconds: float = 0.0
    background_errors: dict[str, int] = field(default_factory=dict)
    background_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, max
    server_cpu_s: float = 0.0

    @property
    def background_rps(self) -> float:
        return self.background_calls / self.background_seconds if self.background_seconds else 0.0

    @property
    def server_cores(self) -> float:
        return self.server_cpu_s / self.seconds if self.seconds else 0.0


def _ms(latencies: list[float]) -> dict[str, float]:
    s = sorted(latencies)
    return {"p50": percentile(s, 50) * 1000, "p95": percentile(s, 95) * 1000, "p99": percentile(s, 99) * 1000,
            "max": (s[-1] * 1000) if s else 0.0}


def _merge(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def one_round(fg: Client, bg: Client, server: Server, cfg: MixedConfig, background: str,
              loads: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both load generators on `server` at once: the checks at cfg.rate, and the background's calls
    (none for NONE) kept in flight over the same window."""
    collector_out_of_the_way()
    # One start for both (each opens its channels first, which a busy machine can make slow): their
    # windows coincide, as the check below requires.
    common = {"port": server.port, "server_pid": server.pid, "warmup": cfg.warmup, "seconds": cfg.seconds,
              "channels": 4, "start_at": time.time() + START_DELAY_S}
    fg.conn.send(("run", LoadSpec(method=CHECK, rate=cfg.rate, **loads[CHECK], **common)))
    if background != NONE:
        bg.conn.send(("run", LoadSpec(method=background, concurrency=cfg.inflight, **loads[background], **common)))
    answers = []
    for client in (fg, bg) if background != NONE else (fg,):
        status, value = client.recv(CALL_TIMEOUT)
        if status != "ok":
            raise RuntimeError(f"{client.name}: run failed:\n{value}")
        answers.append(value)
    if background == NONE:
        return answers[0], None
    f, b = answers
    if b["dry"]:
        raise SystemExit(f"bench.mixed: the {background} requests ran out within a round: raise BENCH_PEOPLE")
    # Each load generator opens its channels before its window: the two windows must coincide.
    overlap = min(f["wall_end"], b["wall_end"]) - max(f["wall_start"], b["wall_start"])
    if overlap < 0.9 * f["seconds"]:
        raise SystemExit(f"bench.mixed: the {background} calls ran beside only {max(overlap, 0):.2f} s of the "
                         f"checks' {f['seconds']:.2f} s window")
    return f, b


def measure_cases(fg: Client, bg: Client, servers: list[tuple[int, Server]], cfg: MixedConfig, backend: str,
                  model: str, loads: dict[str, dict[str, Any]]) -> list[Case]:
    """Every background on every server, in cfg.rounds rounds: within a round each background in
    turn, and for each the servers in turn, both orders reversed every other round, so that the
    machine's drift falls on every case alike."""
    keys = [(b, us) for b in cfg.backgrounds for us, _ in servers]
    cases = {k: Case(backend, model, k[1], k[0]) for k in keys}
    check_lat: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    bg_lat: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    for r in range(cfg.rounds):
        backgrounds, order = list(cfg.backgrounds), list(servers)
        if r % 2:
            backgrounds.reverse()
            order.reverse()
        for background in backgrounds:
            for us, server in order:
                f, b = one_round(fg, bg, server, cfg, background, loads)
                c = cases[background, us]
                c.seconds += f["seconds"]
                c.checks += f["calls"]
                c.server_cpu_s += f["server_cpu_s"]
                _merge(c.check_errors, f["errors"])
                check_lat[background, us].extend(array("d", f["latencies"]))
                if b is not None:
                    c.background_calls += b["calls"]
                    c.background_seconds += b["seconds"]
                    _merge(c.background_errors, b["errors"])
                    bg_lat[background, us].extend(array("d", b["latencies"]))
    for k, c in cases.items():
        c.check_ms = _ms(check_lat[k])
        c.background_ms = _ms(bg_lat[k]) if c.background != NONE else {}
    return [cases[k] for k in keys]


def measure_backend(cfg: MixedConfig, fg: Client, bg: Client, common: Any, backend: str, url: str) -> list[Case]:
    model = backend_model("auto", backend)
    adv, fund = common.tokens[ADVISOR_ID], common.tokens[FUNDER_CALLER_ID]
    pool_name = f"{backend}:activate"
    # The background's activations take each eligible person once: enough for every round.
    bg.ask("pool", (pool_name, activate_requests(common.candidates, f"mixed-{backend}")))
    out: list[Case] = []
    with ExitStack() as stack:
        servers = [(us, stack.enter_context(server_group(spec_for(cfg, common, backend, url, us)))[0])
                   for us in cfg.intervals]
        for us, server in servers:
            confirm_interval(server, us)
        first = servers[0][1]
        # Activations for the pages to list, made by the real RPC (not measured).
        have = bg.ask("fill", FillSpec(port=first.port, token=adv, source=pool_name, target=f"{backend}:made",
                                       count=cfg.pages * 100, concurrency=4), timeout=CALL_TIMEOUT)
        if have < cfg.pages * 100:
            raise SystemExit(f"bench.mixed: only {have} activations made for the pages; raise BENCH_PEOPLE")
        pages = bg.ask("pages", PagesSpec(port=first.port, token=fund, first=list_first_page(), pages=cfg.pages))
        loads = {CHECK: {"requests": check_requests(common.people), "token": adv},
                 LIST: {"requests": pages, "token": fund},
                 ACTIVATE: {"requests": (), "token": adv, "pool": pool_name}}
        cases = measure_cases(fg, bg, servers, cfg, backend, model, loads)
        for c in cases:
            say(f"  {backend:8} {_interval(c.interval_us):>14}  behind {c.background:20} checks {c.checks / c.seconds:6.0f}/s "
                f"p50 {c.check_ms['p50']:6.2f} p99 {c.check_ms['p99']:7.2f} max {c.check_ms['max']:7.2f} ms"
                + (f"  | {c.background_rps:5.0f}/s p99 {c.background_ms['p99']:7.2f} ms" if c.background_ms else "")
                + f"  srv {c.server_cores:.2f} cores"
                + (f"  errors {c.check_errors} {c.background_errors}" if c.check_errors or c.background_errors else ""))
        out.extend(cases)
    return out


def confirm_interval(server: Server, us: int) -> None:
    """The switch interval the server says it runs with (bench.servers logs it when one is set)."""
    if not us:
        return
    said = [json.loads(line)["us"] for line in server.spec.log_path.read_text().splitlines()
            if SWITCH_INTERVAL_EVENT in line]
    if said != [us]:
        raise SystemExit(f"bench.mixed: the server asked for a switch interval of {us} us says {said}")


def _interval(us: int) -> str:
    return f"{us:,} us" if us else f"{PYTHON_DEFAULT_US:,} us (Python's)"


def spec_for(cfg: MixedConfig, common: Any, backend: str, url: str, interval_us: int) -> ServerSpec:
    """The real server as bench.rpcs runs it (its model and behaviours; the rate limiter set never to
    refuse), with this switch interval (0: Python's own)."""
    return ServerSpec(kind=SYNC, workers=cfg.workers, log_path=common.tmp / "logs" / f"{backend}-switch{interval_us}.log",
                      database_url=url, callers_file=common.callers_file, key_dir=common.key_dir,
                      pseudonym_key_file=common.pseudonym_key_file, check_rate_per_min=UNLIMITED_RATE,
                      check_burst=UNLIMITED_RATE, server_model=backend_model("auto", backend),
                      switch_interval_us=interval_us)


# ---------------------------------------------------------------------------------------- report

def _label(background: str, cfg: MixedConfig) -> str:
    return "nothing" if background == NONE else f"{background} x {cfg.inflight}"


def table(cases: list[Case], cfg: MixedConfig) -> str:
    head = ("backend", "model", "switch interval", "behind the checks", "checks/s", "p50 ms", "p95 ms", "p99 ms",
            "max ms", "background calls/s", "background p99 ms", "server cores", "errors")
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|"]
    for c in cases:
        errors = {**c.check_errors, **{f"background {k}": v for k, v in c.background_errors.items()}}
        rows.append("| " + " | ".join((
            c.backend, c.model, _interval(c.interval_us), _label(c.background, cfg), f"{c.checks / c.seconds:,.0f}",
            f"{c.check_ms['p50']:.2f}", f"{c.check_ms['p95']:.2f}", f"{c.check_ms['p99']:.2f}", f"{c.check_ms['max']:.2f}",
            f"{c.background_rps:,.0f}" if c.background != NONE else "-",
            f"{c.background_ms['p99']:.2f}" if c.background_ms else "-", f"{c.server_cores:.2f}",
            ", ".join(f"{k} {v}" for k, v in errors.items()) or "0")) + " |")
    return "\n".join(rows)


def summary(cases: list[Case], cfg: MixedConfig) -> str:
    lines = []
    for backend in dict.fromkeys(c.backend for c in cases):
        for background in cfg.backgrounds:
            row = [c for c in cases if c.backend == backend and c.background == background]
            if not row:
                continue
            parts = [(f"{_interval(c.interval_us)}: " if len(cfg.intervals) > 1 else "") + f"checks' p99 {c.check_ms['p99']:.2f} ms"
                     + (f", {c.background} {c.background_rps:,.0f}/s (p99 {c.background_ms['p99']:.1f} ms)"
                        if c.background_ms else "") for c in row]
            lines.append(f"- {backend}, behind {_label(background, cfg)}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _backgrounds_text(cfg: MixedConfig) -> str:
    what = {NONE: "nothing", LIST: f"ListActivations (a funder's pages of 100, cycling over the first {cfg.pages})",
            ACTIVATE: "ActivateEntitlement (an advisor's, each person once)"}
    return ", ".join(what[b] for b in cfg.backgrounds)


def markdown(cfg: MixedConfig, cases: list[Case], meta: dict[str, Any]) -> str:
    return "\n".join([
        "## Checks behind long calls (`python -m bench.mixed`)",
        "",
        f"- Run on {meta['date']}, {meta['commit']}, Python {meta['python']}; `nproc` = {meta['nproc']} "
        f"({meta['cpu']}), {meta['memory_gib']:.0f} GiB; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end; {meta['elapsed']:.0f} s in all."
        + (f" PostgreSQL {meta['pg_version']}." if meta.get("pg_version") else "")
        + (f" Skipped: {meta['skipped']}." if meta.get("skipped") else ""),
        "- Server: per backend, the real one (`server_main.start`, the backend's production model, production "
        "behaviours: access log, caller, rate limiter set never to refuse), on a fresh database "
        f"(a synthetic registry of {cfg.people:,} people; {cfg.pages * 100:,} activations made first by the real "
        "RPC)" + ("" if len(cfg.intervals) == 1 else
                  "; one server per interpreter switch interval, side by side on that database, the same in all "
                  "else (the experiment of `BENCH_MIXED_INTERVALS`)") + ".",
        f"- Load: one load generator sends CheckEligibility (an advisor's, cycling over registry people) at "
        f"{cfg.rate:g} calls a second, open loop (each call on time whatever the others' fate; latency from when it "
        f"was due); a second one keeps {cfg.inflight} calls of a long RPC in flight beside them (closed loop, its "
        "window started at the same instant as the checks' and checked to coincide with it): " + _backgrounds_text(cfg) + ". Each case: "
        f"{cfg.rounds} rounds of {cfg.seconds:g} s (each after {cfg.warmup:g} s unmeasured), the cases taking turns "
        "within each round, in reverse order every other round; percentiles over the rounds' merged latencies.",
        "",
        table(cases, cfg),
        "",
        summary(cases, cfg),
    ])


def main() -> int:
    cfg = MixedConfig.from_env()
    began, load_start, code = time.monotonic(), loadavg(), commit()
    tmp = Path(tempfile.mkdtemp(prefix="entitlement-bench-mixed-"))
    fg: Client | None = None
    bg: Client | None = None
    cases: list[Case] = []
    try:
        backends, skipped, pg_ver = usable_backends(list(cfg.backends), cfg.pg_admin_url, "bench.mixed")
        say(f"bench.mixed: checks at {cfg.rate:g}/s behind {cfg.inflight} long calls in flight; switch interval "
            f"{', '.join(_interval(us) for us in cfg.intervals)}; {cfg.rounds} rounds of {cfg.seconds:g} s; temp dir {tmp}")
        common = prepare_common(tmp, cfg.people)
        fg = Client()
        bg = Client()
        for backend in backends:
            with imported_database(backend, common, cfg.pg_admin_url, "bench.mixed") as url:
                cases.extend(measure_backend(cfg, fg, bg, common, backend, url))
    except KeyboardInterrupt:
        say("bench.mixed: interrupted")
        return 130
    finally:
        for client in (fg, bg):
            if client is not None:
                client.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    cpu, mem = machine()
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": code,
            "python": platform.python_version(), "nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
            "memory_gib": mem, "load_start": load_start, "load_end": loadavg(),
            "elapsed": time.monotonic() - began, "pg_version": pg_ver, "skipped": skipped}
    say("")
    say(table(cases, cfg))
    say("")
    say(summary(cases, cfg))
    if cfg.json_path is not None:
        cfg.json_path.write_text(json.dumps({"cases": [asdict(c) | {"background_rps": c.background_rps}
                                                       for c in cases]}, indent=1))
    if cfg.output is not None:
        replace_section(cfg.output, SECTION, markdown(cfg, cases, meta))
        say(f"bench.mixed: wrote {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
