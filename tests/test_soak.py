"""The soak (`python -m stress.soak`, 10 minutes in `make stress`) run for a few seconds, so that
its code cannot rot; and its memory verdict on made-up samples."""

from __future__ import annotations

import re
import subprocess
import sys

from stress.soak import Sample, memory_verdict

from entitlement.config import ROOT


def _samples(rss: list[float]) -> list[Sample]:
    return [Sample(float(i), mb, i * 100, {}) for i, mb in enumerate(rss)]


def test_memory_verdict() -> None:
    warm_then_flat = [80, 95, 104, 110, 110.5, 109.8, 110.2, 110.9, 110.4]
    assert memory_verdict(_samples(warm_then_flat), 5.0)[0]
    leaking = [100 + 2 * i for i in range(9)]  # +2 MB a sample: the last third is ~6 MB above the middle
    ok, text = memory_verdict(_samples(leaking), 5.0)
    assert not ok and "GROWING" in text
    assert not memory_verdict(_samples([100, 100, 100]), 5.0)[0]  # too few samples to judge


def test_a_short_soak_passes() -> None:
    run = subprocess.run([sys.executable, "-m", "stress.soak", "--minutes", "0.17", "--sample-seconds", "0.5",
                          "--clients", "3", "--max-growth", "15"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "VERDICT: OK" in run.stdout
    rows = [line.split() for line in run.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\.\d\s+\d+\s", line)]
    assert len(rows) >= 10, run.stdout
    calls = [int(r[2]) for r in rows]
    assert calls == sorted(calls) and calls[-1] > calls[0]
    assert "doctor:" in run.stdout and "every invariant holds" in run.stdout
