"""bench.loopback: PostgreSQL's answers by size over loopback TCP and its Unix socket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.loopback import SOCKET, TCP, Case, conclusion, socket_url
from entitlement import hostcheck

ROOT = Path(__file__).resolve().parent.parent


def test_the_socket_url_keeps_user_and_database() -> None:
    assert socket_url("postgresql://postgres@127.0.0.1:5432/test", "/var/run/postgresql") == \
        "postgresql://postgres@/test?host=%2Fvar%2Frun%2Fpostgresql"


def test_the_conclusion_counts_the_late_answers_per_transport() -> None:
    fast = (0.5,) * 99
    cases = [Case(TCP, 32, fast), Case(TCP, 170, fast + (43.0, 44.0)), Case(SOCKET, 170, fast + (2.0,))]
    text = conclusion(cases, "bbr")
    assert "170 KB: 2 of 101 over TCP; over the Unix socket 0 of 100" in text
    assert "The smallest size with any: 170 KB" in text and "remedies apply" in text
    assert "not known to stall" in conclusion(cases, "cubic")
    assert conclusion([Case(TCP, 170, fast)], "cubic").startswith("No answer over loopback TCP was held back")
    assert Case(TCP, 170, fast + (43.0,)).row()[-1] == "1 (1.0 %)"


def test_the_benchmark_measures_both_transports_and_writes_its_section(pg_server: str, tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "BENCH_PG_URL": pg_server, "BENCH_SECONDS": "0.3", "BENCH_SIZES_KB": "4,170",
           "BENCH_OUTPUT": str(out)}
    proc = subprocess.run([sys.executable, "-m", "bench.loopback"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.count("<!-- section:loopback -->") == 1
    rows = [line for line in text.splitlines() if line.startswith(("| loopback TCP |", "| Unix socket |"))]
    transports = [TCP] + ([SOCKET] if "The Unix socket: not measured" not in text else [])
    assert [tuple(r.split(" | ")[:2]) for r in rows] == [(f"| {t}", size) for t in transports for size in ("4", "170")]
    assert all(int(r.split(" | ")[2].replace(",", "")) > 0 for r in rows)  # queries answered in every case
    cc = hostcheck.accepted_congestion_control("127.0.0.1")
    if cc is not None and hostcheck.database_loopback_address(pg_server) == "127.0.0.1":
        assert f"TCP connections on loopback (127.0.0.1) got `{cc}`" in text
