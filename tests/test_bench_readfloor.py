"""`python -m bench.readfloor` at a tiny size on both backends, so that it cannot rot: every server
of the ladder answered both RPCs through its own path without an error, every step past the echo
sent the RPC's one statement a call, the table and its reading were written to its section of
BENCHMARKS.md. Nothing about speed is asserted (the benchmark
prints the figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.readfloor import ECHOES, HEADER, SECTION, SERVERS

ROOT = Path(__file__).resolve().parent.parent


def test_the_ladder_answers_both_rpcs_on_both_backends(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    admin = request.getfixturevalue("pg_server")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n")
    env = {**os.environ, "BENCH_BACKENDS": "sqlite,postgres", "BENCH_PG_URL": admin, "BENCH_OUTPUT": str(out),
           "BENCH_SECONDS": "0.4", "BENCH_ROUNDS": "2", "BENCH_WARMUP": "0.1", "BENCH_CONCURRENCY": "4",
           "BENCH_PEOPLE": "1000", "BENCH_ACTIVATIONS": "5"}
    env.pop("BENCH_KEEP", None)
    proc = subprocess.run([sys.executable, "-m", "bench.readfloor"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert f"<!-- section:{SECTION} -->" in text
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(HEADER) and cells[0] in ("sqlite", "postgres"):
            rows.append(dict(zip(HEADER, cells)))
    seen = {(r["backend"], r["rpc"], r["server"]) for r in rows}
    assert seen == {(b, rpc, s) for b in ("sqlite", "postgres") for rpc in ("CheckEligibility", "VerifyEntitlement")
                    for s in SERVERS}, seen
    for r in rows:
        assert r["errors"] == "0", r  # every server answered every call of its windows
        assert float(r["req/s"].replace(",", "")) > 0 and float(r["srv CPU us/call"].replace(",", "")) > 0, r
        if r["server"] in ECHOES:  # each ladder's own echo (thread pool, event loop)
            assert r["x echo"] == "1.00" and r["step's CPU us/call"] == "-" and r["SQL/call"] == "-", r
        else:
            float(r["step's CPU us/call"].replace(",", ""))  # a signed number of microseconds
            # Every other step makes the RPC's one read a call (the health monitor's pings add a few).
            assert 1.0 <= float(r["SQL/call"]) < 1.2, r
    for backend in ("sqlite", "postgres"):
        for rpc in ("CheckEligibility", "VerifyEntitlement"):
            assert f"**{backend} {rpc}**" in text
