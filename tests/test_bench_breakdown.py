"""bench.breakdown runs (at a tiny size) and its figures hang together, so that it cannot rot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from entitlement.config import ROOT


@pytest.mark.skipif(not (shutil.which("valgrind") and shutil.which("gcc")
                         and Path("/usr/include/valgrind/callgrind.h").exists()),
                    reason="needs valgrind, its headers and gcc (on every machine kind here)")
def test_breakdown_counts_every_piece(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n| threads | Echo (sync-echo, floor) | 300 | 364,000 | 1.00 | - |\n"
                   "| event-loop | Echo (aio-echo-inline, floor) | 300 | 490,000 | 1.00 | - |\n")
    env = {**os.environ, "BENCH_BREAKDOWN_CALLS": "5", "BENCH_OUTPUT": str(out)}
    proc = subprocess.run([sys.executable, "-m", "bench.breakdown"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {}
    for line in out.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("CheckEligibility", "VerifyEntitlement", "both"):
            rows[(cells[0], cells[1])] = int(cells[2].replace(",", ""))
    assert len(rows) == 12, rows
    assert all(v > 1000 for v in rows.values()), rows
    for rpc in ("CheckEligibility", "VerifyEntitlement"):
        whole = rows[(rpc, "the handler as gRPC calls it (bytes in, bytes out)")]
        parts = [v for (r, label), v in rows.items() if r == rpc and label.startswith("of which")]
        assert all(p < whole for p in parts), (rpc, rows)
    assert "beyond the echo call" in out.read_text()
    assert "the thread-pool model's floor): 364,000 instructions" in out.read_text()  # that model's echo row
