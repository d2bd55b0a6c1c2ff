"""AIP-155 requests in flight, over the real channel, on both backends: a retry with the same
request_id arriving while the first attempt is still being processed is answered ABORTED (reason
REQUEST_IN_FLIGHT) at once, instead of waiting; once the first is done, a retry replays it. The
first attempt is held in flight by a lock the test takes on the database."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import psycopg
import pytest

from support import Api, Harness, expect_error, next_person

from entitlement import inflight
from entitlement.v1 import activation_pb2

IN_FLIGHT_WAIT_S = 0.5  # time for the first attempt to reach the lock the test holds


@contextmanager
def writers_blocked(h: Harness, activation_id: str) -> Iterator[None]:
    """Make the server's next write on this activation wait: SQLite, the database's write lock;
    PostgreSQL, the activation's row lock."""
    if h.backend == "sqlite":
        conn = sqlite3.connect(h.url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
    else:
        with psycopg.connect(h.url) as pg:
            pg.execute("SELECT id FROM activations WHERE id = %s FOR UPDATE", (activation_id,))
            try:
                yield
            finally:
                pg.rollback()


def suspend(api: Api, name: str, request_id: str) -> activation_pb2.Activation:
    return api.advisor.SuspendActivation(activation_pb2.TransitionActivationRequest(
        name=name, reason="paused", request_id=request_id))


def test_a_retry_while_the_first_attempt_is_processed_is_aborted_then_replays(api: Api, harness: Harness) -> None:
    act = api.activate().activation
    request_id = uuid.uuid4().hex
    with ThreadPoolExecutor(max_workers=1) as pool:
        with writers_blocked(harness, act.name.split("/")[1]):
            first = pool.submit(suspend, api, act.name, request_id)
            time.sleep(IN_FLIGHT_WAIT_S)
            assert not first.done()
            started = time.monotonic()
            f = expect_error(lambda _r: suspend(api, act.name, request_id), None, grpc.StatusCode.ABORTED)
            assert time.monotonic() - started < 5, "the retry waited for the first attempt"
            assert f.reason == "REQUEST_IN_FLIGHT" and f.metadata["in_flight_request_id"] == request_id
        done = first.result(timeout=15)
    assert done.state == activation_pb2.SUSPENDED
    replay = suspend(api, act.name, request_id)  # after the first: the stored answer
    assert replay.state == activation_pb2.SUSPENDED and replay.update_time == done.update_time
    # Another request_id was never blocked by this one: it gets the normal answer.
    f = expect_error(lambda _r: suspend(api, act.name, uuid.uuid4().hex), None, grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "INVALID_STATE"


def test_an_activation_retried_while_in_flight_is_aborted_then_replays(api: Api, harness: Harness) -> None:
    agency_id, birth = next_person()
    request_id = uuid.uuid4().hex
    holder = api.activate().activation  # any activation: on PostgreSQL, hold the program counter instead
    with ThreadPoolExecutor(max_workers=1) as pool:
        if harness.backend == "sqlite":
            blocked = writers_blocked(harness, holder.name.split("/")[1])
        else:
            blocked = _counter_locked(harness, "premium-job-seekers")
        with blocked:
            first = pool.submit(api.activate, agency_id, birth, request_id=request_id)
            time.sleep(IN_FLIGHT_WAIT_S)
            f = expect_error(lambda _r: api.activate(agency_id, birth, request_id=request_id), None,
                             grpc.StatusCode.ABORTED)
            assert f.reason == "REQUEST_IN_FLIGHT"
        done = first.result(timeout=15)
    again = api.activate(agency_id, birth, request_id=request_id)
    assert (again.activation.name, again.activation_token) == (done.activation.name, done.activation_token)


@contextmanager
def _counter_locked(h: Harness, program_id: str) -> Iterator[None]:
    with psycopg.connect(h.url) as pg:
        pg.execute("SELECT program_id FROM program_counters WHERE program_id = %s FOR UPDATE", (program_id,))
        try:
            yield
        finally:
            pg.rollback()


def test_a_request_held_by_another_server_process_is_aborted(api: Api, harness: Harness) -> None:
    """PostgreSQL: the guard spans server processes (a transaction-scoped advisory lock)."""
    if harness.backend != "postgres":
        pytest.skip("SQLite serves one server process per database file: the in-process guard is the guard")
    act = api.activate().activation
    request_id = uuid.uuid4().hex
    key = inflight.advisory_key("advisor-paris", request_id)
    with psycopg.connect(harness.url, autocommit=True) as other_process:
        other_process.execute("SELECT pg_advisory_lock(%s)", (key,))
        f = expect_error(lambda _r: suspend(api, act.name, request_id), None, grpc.StatusCode.ABORTED)
        assert f.reason == "REQUEST_IN_FLIGHT"
        assert api.advisor.GetActivation(activation_pb2.GetActivationRequest(name=act.name)).state \
            == activation_pb2.ACTIVE  # nothing was done
        other_process.execute("SELECT pg_advisory_unlock(%s)", (key,))
    assert suspend(api, act.name, request_id).state == activation_pb2.SUSPENDED
