"""`python -m bench.mixed` at a tiny size on both backends, so that it cannot rot: every case (checks
alone, behind a funder's pages, behind advisors' activations, on two servers with their own switch
intervals) answered every call of its windows without an error, the background made its calls
beside the checks (the benchmark stops when the two windows do not coincide, and when a server does
not say it runs with the interval asked for), and the section was written. Nothing about speed is
asserted (the benchmark prints the figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.mixed import SECTION

ROOT = Path(__file__).resolve().parent.parent


def test_checks_alone_and_behind_pages_on_both_backends(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    admin = request.getfixturevalue("pg_server")
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "mixed.json"
    out.write_text("# Benchmarks\n")
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_BACKENDS": "sqlite,postgres", "BENCH_PG_URL": admin,
           "BENCH_OUTPUT": str(out), "BENCH_JSON": str(results), "BENCH_MIXED_INTERVALS": "5000,1000",
           "BENCH_MIXED_RATE": "200"}
    proc = subprocess.run([sys.executable, "-m", "bench.mixed"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads(results.read_text())["cases"]
    seen = {(c["backend"], c["background"], c["interval_us"]) for c in cases}
    assert seen == {(b, bg, us) for b in ("sqlite", "postgres") for bg in ("-", "ListActivations", "ActivateEntitlement")
                    for us in (5000, 1000)}, seen
    for c in cases:
        assert c["checks"] > 0 and not c["check_errors"], c
        assert c["seconds"] > 0 and 0 < c["check_ms"]["p50"] <= c["check_ms"]["p99"] <= c["check_ms"]["max"], c
        if c["background"] == "-":
            assert c["background_calls"] == 0 and not c["background_ms"], c
        else:
            assert c["background_calls"] > 0 and not c["background_errors"], c
            assert c["background_ms"]["p99"] > 0, c
    text = out.read_text()
    assert f"<!-- section:{SECTION} -->" in text and f"<!-- /section:{SECTION} -->" in text
    assert "| postgres | threads | 1,000 us | ListActivations x 2 |" in text
    assert "| sqlite | event-loop | 5,000 us | ActivateEntitlement x 2 |" in text
    assert "| sqlite | event-loop | 5,000 us | nothing |" in text
    assert "commit commit" not in text


def test_a_bad_interval_is_refused_naming_the_setting() -> None:
    env = {**os.environ, "BENCH_MIXED_INTERVALS": "5000,50", "BENCH_OUTPUT": "-"}
    proc = subprocess.run([sys.executable, "-m", "bench.mixed"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "BENCH_MIXED_INTERVALS must list switch intervals in us" in proc.stderr
    assert "Traceback" not in proc.stderr
