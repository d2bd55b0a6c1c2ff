"""What the benchmark modules share: their settings from the environment and small helpers."""

from __future__ import annotations

import gc
import os

import psycopg
from sqlalchemy.engine import make_url

from entitlement.config import ROOT

BACKENDS = [b for b in os.environ.get("BENCH_BACKENDS", "sqlite,postgres").split(",") if b]
PG_ADMIN = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
OUTPUT = os.environ.get("BENCH_OUTPUT", str(ROOT / "BENCHMARKS.md"))


def say(msg: str) -> None:
    print(msg, flush=True)


def pg_url(admin_url: str, database: str) -> str:
    """The URL of another database on the server of `admin_url`, with the same user, host, port and
    query (`postgresql://postgres@/test?host=/var/run/postgresql`: PostgreSQL's Unix socket)."""
    return make_url(admin_url).set(database=database).render_as_string(hide_password=False)


def pg_database(url: str) -> str:
    """The database name of a PostgreSQL URL."""
    return make_url(url).database or ""


def pg_reachable() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def collector_out_of_the_way() -> None:
    """Before a measured run, in the load generator and in the orchestrator: what the process holds
    (modules, pools of requests, earlier runs' results: about 100,000 objects) collected once and
    moved out of the cyclic collector's sight (`gc.freeze`, as the server does at start:
    entitlement/server_main.py `tune_gc`; cheap once done). Without it a full collection took each
    of these processes 60-80 ms about every 30 s: in the load generator, one inside a measured
    window held back every call in flight (an open-loop window counts each call from when it was
    due: the echo server's p99 at half rate read 87 ms, 2026-12-05); in the orchestrator, it took
    a core from the server and the load generator."""
    gc.collect()
    gc.freeze()


def status_key(body: bytes) -> tuple[object, ...]:
    """A serialized google.rpc.Status as (code, message, details unpacked), for comparing errors of
    two servers: map fields such as ErrorInfo.metadata serialize in no fixed order."""
    from google.rpc import error_details_pb2, status_pb2
    st = status_pb2.Status.FromString(body)
    details: list[object] = []
    for d in st.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                details.append(msg)
                break
        else:
            details.append(d)
    return st.code, st.message, details
