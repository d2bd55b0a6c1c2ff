"""`python -m bench.activation_floor` at a tiny size on SQLite, without valgrind, so the benchmark
cannot rot: it captured real activations, its raw replay wrote what they wrote (the bench checks
the events, activations and ledger entries a replay leaves), and its figures hang together: the
floor is below the full path, the budget is the targets' arithmetic on the echo rate, the profile
saw SQLAlchemy and the DBAPI, the parts were timed natively and the real server served the same
work. Nothing about speed is asserted (that is what the benchmark prints)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_floor_benchmark_is_coherent(tmp_path: Path) -> None:
    out, js = tmp_path / "BENCHMARKS.md", tmp_path / "floor.json"
    env = {**os.environ, "BENCH_BACKENDS": "sqlite", "BENCH_OUTPUT": str(out), "BENCH_JSON": str(js),
           "BENCH_FLOOR_ACTIVATIONS": "12", "BENCH_FLOOR_WARMUP": "3", "BENCH_FLOOR_ROUNDS": "1",
           "BENCH_FLOOR_VG_ACTIVATIONS": "0", "BENCH_FLOOR_ECHO_SECONDS": "0.5"}
    proc = subprocess.run([sys.executable, "-m", "bench.activation_floor"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(js.read_text())
    assert doc["echo"]["rps"] > 0 and doc["echo"]["server_cpu_us"] > 0
    (sqlite,) = doc["backends"]
    assert sqlite["backend"] == "sqlite"
    # One transaction per activation, its statements captured (BEGIN IMMEDIATE included).
    assert sqlite["ops"]["commits"] == 1 and sqlite["ops"]["statements"] >= 8
    assert "synchronous=FULL" in sqlite["durability"] and "journal_mode=wal" in sqlite["durability"]
    replay, full = sqlite["replay"][0], sqlite["inprocess"][0]
    # The floor is below the whole path in CPU (the replay's work is a part of the path's; wall time
    # is not compared: an fsync made slow by another process's disk use, the other make test worker's
    # in CI, put one replay's wall above its full run's, 3,992 against 2,664 us).
    assert 0 < replay["client_cpu_us"] < full["client_cpu_us"]
    assert replay["wall_us"] > 0 and full["wall_us"] > 0
    # The grouped replay (4 activations per commit, as SQLite's group commit sends them) ran and
    # wrote what the captured run wrote (the bench checks its outcome too).
    (grouped,) = sqlite["grouped"]
    assert grouped["client_cpu_us"] > 0 and grouped["wall_us"] > 0
    assert sqlite["profile_us"]["SQLAlchemy ORM/Core"] > 0
    assert sum(v for k, v in sqlite["profile_us"].items() if k.startswith("raw DBAPI")) > 0
    text = out.read_text()
    assert text.count("<!-- section:activation-floor -->") == 1 and "<!-- /section:activation-floor -->" in text
    budget = 1e6 / (0.25 * doc["echo"]["rps"])
    assert f"| sqlite | >= 0.25 x echo | {0.25 * doc['echo']['rps']:,.0f} | {budget:,.0f} |" in text
    assert "### Conclusion" in text and "of B" in text
    assert "| sqlite | raw replay, 4 per commit (group commit) |" in text
    # The parts timed natively (CPU, no valgrind), each on its own: the table in CPU time, and the
    # conclusion drawn from it rather than from instruction counts.
    cpu = sqlite["cpu_us"]
    for part in ("activate", "replay", "sign", "ed25519", "hash", "rules", "proto", "accesslog"):
        assert cpu[part] > 0, part
    assert "### In CPU time" in text and "**floor + the parts alone**" in text
    # The same work served by server.py (its production model), at each concurrency, every call
    # answered OK (a failed call raises in the bench and fails the run above).
    assert [s["concurrency"] for s in sqlite["served"]] == [1, 8]
    for served in sqlite["served"]:
        assert served["calls"] == 12 and served["cpu_us"] > 0 and served["wall_us"] > 0
        assert len(served["rounds_cpu_us"]) == 1  # one per round (BENCH_FLOOR_ROUNDS)
    assert "| sqlite | **served** by server.py, 8 in flight" in text


def test_tiny_floor_benchmark_replays_postgresqls_pipeline(tmp_path: Path, pg_server: str) -> None:
    """On PostgreSQL the replay sends the pipelined statements as the service does, on libpq itself
    (bench/activation_floor.py `_RawPipeline`): it must write what the captured activations wrote
    (the bench checks the events, activations and ledger entries it leaves, and fails otherwise),
    one transaction each, and stay below the whole in-process path."""
    out, js = tmp_path / "BENCHMARKS.md", tmp_path / "floor.json"
    env = {**os.environ, "BENCH_BACKENDS": "postgres", "BENCH_PG_URL": pg_server, "BENCH_OUTPUT": str(out),
           "BENCH_JSON": str(js), "BENCH_FLOOR_ACTIVATIONS": "12", "BENCH_FLOOR_WARMUP": "3",
           "BENCH_FLOOR_ROUNDS": "1", "BENCH_FLOOR_VG_ACTIVATIONS": "0", "BENCH_FLOOR_ECHO_SECONDS": "0.5"}
    proc = subprocess.run([sys.executable, "-m", "bench.activation_floor"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (pg,) = json.loads(js.read_text())["backends"]
    assert pg["backend"] == "postgres"
    assert pg["ops"]["commits"] == 1 and pg["ops"]["statements"] >= 8
    replay, full = pg["replay"][0], pg["inprocess"][0]
    assert 0 < replay["client_cpu_us"] < full["client_cpu_us"]
    assert "| postgres | raw replay (floor) |" in out.read_text()
