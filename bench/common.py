"""What the benchmark modules share: their settings from the environment and small helpers."""

from __future__ import annotations

import os

import psycopg

from entitlement.config import ROOT

BACKENDS = [b for b in os.environ.get("BENCH_BACKENDS", "sqlite,postgres").split(",") if b]
PG_ADMIN = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
OUTPUT = os.environ.get("BENCH_OUTPUT", str(ROOT / "BENCHMARKS.md"))


def say(msg: str) -> None:
    print(msg, flush=True)


def pg_reachable() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False
