"""`python -m bench` (the server models) in a tiny run on SQLite, so the benchmark cannot rot: the
aio twins answer every parity probe (successes and each error path) exactly as the real sync server
does, the aio-inline model's hot reads included, and every model got successful calls. Nothing
about speed is asserted (that is what the benchmark prints)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from bench.config import AIO_INLINE, CHECK, ECHO, ECHO_MODELS, MODELS, SYNC, VERIFY

ROOT = Path(__file__).resolve().parent.parent


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| backend")]


def test_tiny_server_models_benchmark_runs_every_model(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "BENCH_BACKENDS": "sqlite", "BENCH_OUTPUT": str(out), "BENCH_SECONDS": "0.4",
           "BENCH_ROUNDS": "2", "BENCH_WARMUP": "0.1", "BENCH_CONCURRENCY": "4", "BENCH_PEOPLE": "1000",
           "BENCH_ACTIVATIONS": "3"}
    env.pop("BENCH_KEEP", None)
    proc = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    others = [m for m in MODELS if m != SYNC]
    assert AIO_INLINE in others
    parity = re.search(r"parity probes: sqlite: (\d+)/(\d+) identical \((.*?) against sync\)", proc.stdout)
    assert parity, proc.stdout[-3000:]
    same, asked, models = int(parity[1]), int(parity[2]), parity[3].split(", ")
    assert models == others and same == asked and asked >= 10 * len(others), parity[0]

    rows = _table_rows(out.read_text())
    seen = {(r[1], r[2]) for r in rows}
    for model in ECHO_MODELS:
        assert (model, ECHO) in seen, (model, sorted(seen))
    for model in MODELS:
        for method in (CHECK, VERIFY):
            assert (model, method) in seen, (model, method, sorted(seen))
    for r in rows:
        if r[1] in (*MODELS, *ECHO_MODELS):
            assert float(r[4].replace(",", "")) > 0, r  # req/s
            assert r[-1] == "0", r  # errors
    assert "aio-inline" in out.read_text() and "With the hot reads run on the event loop" in out.read_text()
