"""The load-generator process (grpc.aio client). `client(conn)` is the target of a `spawn`
process and serves requests from the orchestrator over `conn`:

  ("seed", SeedSpec)                 -> list of redeemed account ids (real RPCs: Activate, Redeem)
  ("probe", (ports, probes))         -> per probe, per port: (status code name, response bytes)
  ("run", LoadSpec)                  -> dict of measurements (see run_load)
  None                               -> exit

Requests are pre-serialized: the client sends and receives bytes, so its own CPU per call is the
gRPC stack only. Latency is measured per call with perf_counter; a call counts when it completes
inside the measured window (after the warm-up); latencies are returned raw (seconds) so that
rounds can be merged before percentiles are taken. Server CPU is read from /proc/<pid>/stat (utime +
stime of all its threads) at the window's edges; the client's own CPU likewise.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
import traceback
from array import array
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.config import METHOD_PATHS, PLATFORM_ID, PROGRAM, LoadSpec, SeedSpec

CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_PROBE_S = 1.5


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "; field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat", "rb") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK  # user nice system idle iowait irq softirq steal


def client(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the orchestrator stops us in order
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, arg = msg
        try:
            if kind == "seed":
                result: Any = asyncio.run(seed(arg))
            elif kind == "probe":
                result = asyncio.run(probe(*arg))
            elif kind == "run":
                result = asyncio.run(run_load(arg))
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def seed(spec: SeedSpec) -> list[tuple[str, str, str]]:
    """Activate candidates (advisor) until `count` are granted, redeeming each token to a new
    platform account (platform), 4 calls at a time; candidates found not eligible are skipped.
    Returns (account id, agency id, birth date ISO) of each redeemed activation."""
    from google.type import date_pb2

    from entitlement.v1 import activation_pb2, activation_pb2_grpc, common_pb2
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spec.port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 15)
        stub = activation_pb2_grpc.ActivationServiceStub(channel)
        todo = iter(enumerate(spec.candidates))
        done: list[tuple[str, str, str]] = []

        async def worker() -> None:
            for i, (agency_id, birth_iso) in todo:
                if len(done) >= spec.count:
                    return
                birth = dt.date.fromisoformat(birth_iso)
                try:
                    act = await stub.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                        request_id=f"bench-seed-{i}", program=f"programs/{PROGRAM}",
                        platform=f"platforms/{PLATFORM_ID}", reason="benchmark seed",
                        job_seeker=common_pb2.JobSeekerIdentity(agency_id=agency_id, birth_date=date_pb2.Date(
                            year=birth.year, month=birth.month, day=birth.day))),
                        metadata=_bearer(spec.advisor_token), timeout=30)
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # not eligible after all
                        continue
                    raise
                account = f"bench-account-{i:06d}"
                status = await stub.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
                    token=act.activation_token, account_id=account), metadata=_bearer(spec.platform_token), timeout=30)
                if not status.active:
                    raise RuntimeError(f"seed: account {account} not active after redeem")
                done.append((account, agency_id, birth_iso))

        await asyncio.gather(*(worker() for _ in range(4)))
    if len(done) < spec.count:
        raise RuntimeError(f"seed: only {len(done)} of {len(spec.candidates)} candidates were granted an "
                           f"activation, {spec.count} wanted: raise BENCH_PEOPLE or lower BENCH_ACTIVATIONS")
    return done[:spec.count]


async def probe(ports: list[int], probes: list[tuple[str, str, str, bytes, tuple[tuple[str, str], ...]]]
                ) -> list[list[tuple[str, bytes]]]:
    """Send each probe (label, shape uu/us/su, method path, request bytes, metadata) to every port;
    return what came back: status code name, and the response bytes (a server stream's responses
    joined, for STREAM_PROBE_S at most) or, for an error, any streamed responses followed by the
    serialized google.rpc.Status."""
    out = []
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    try:
        for _label, shape, path, request, metadata in probes:
            row = []
            for ch in channels:
                parts: list[bytes] = []
                try:
                    if shape == "us":  # a server stream: what arrives within a short deadline
                        async for r in ch.unary_stream(path)(request, metadata=metadata, timeout=STREAM_PROBE_S):
                            parts.append(bytes(r))
                        response = b"".join(parts)
                    elif shape == "su":
                        response = await ch.stream_unary(path)(iter([request]), metadata=metadata, timeout=15)
                    else:
                        response = await ch.unary_unary(path)(request, metadata=metadata, timeout=15)
                    row.append(("OK", bytes(response)))
                except grpc.aio.AioRpcError as err:
                    details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
                    row.append((err.code().name, b"".join(parts) + (details if isinstance(details, bytes) else b"")))
            out.append(row)
    finally:
        for ch in channels:
            await ch.close()
    return out


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Keep `concurrency` calls in flight for warmup + seconds; measure the window after warm-up."""
    metadata = _bearer(spec.token)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spec.port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 15)
        call = channel.unary_unary(METHOD_PATHS[spec.method])
        requests, n_req = spec.requests, len(spec.requests)
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        t0 = time.perf_counter()
        t_start, t_end = t0 + spec.warmup, t0 + spec.warmup + spec.seconds

        async def worker(k: int) -> None:
            i = k
            perf = time.perf_counter
            while True:
                begun = perf()
                if begun >= t_end:
                    return
                try:
                    await call(requests[i % n_req], metadata=metadata, timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                done = perf()
                if t_start <= done <= t_end:
                    codes[code] += 1
                    if code == "OK":
                        latencies.append(done - begun)
                i += spec.concurrency

        tasks = [asyncio.create_task(worker(k)) for k in range(spec.concurrency)]
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        s0, c0, m0, w0 = cpu_seconds(spec.server_pid), cpu_seconds(os.getpid()), machine_busy_seconds(), time.perf_counter()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        s1, c1, m1, w1 = cpu_seconds(spec.server_pid), cpu_seconds(os.getpid()), machine_busy_seconds(), time.perf_counter()
        await asyncio.gather(*tasks)
    ok = codes.pop("OK", 0)
    return {"seconds": t_end - t_start, "calls": ok, "errors": dict(codes),
            "latencies": array("d", latencies).tobytes(),
            # CPU is scaled from the sampled interval to the window (they differ by a few ms).
            "server_cpu_s": (s1 - s0) * spec.seconds / (w1 - w0), "client_cpu_s": (c1 - c0) * spec.seconds / (w1 - w0),
            "machine_cpu_s": (m1 - m0) * spec.seconds / (w1 - w0)}
