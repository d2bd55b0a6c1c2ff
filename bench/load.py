"""The load-generator process (grpc.aio client). `client(conn)` is the target of a `spawn`
process and serves requests from the orchestrator over `conn`:

  ("seed", SeedSpec)                 -> list of redeemed account ids (real RPCs: Activate, Redeem)
  ("probe", (ports, probes))         -> per probe, per port: (status code name, response bytes)
  ("run", LoadSpec)                  -> dict of measurements (see run_load)
  ("pool", (name, requests))         -> size of the named pool after adding `requests` to it
  ("fill", FillSpec)                 -> size of the target pool (unmeasured Activate calls, see fill)
  ("pages", PagesSpec)               -> ListActivations requests of pages 1..n (page tokens followed)
  None                               -> exit

Pools are lists of pre-serialized requests kept in this process between requests, each used once
(ActivateEntitlement needs a new person and request id per call, RedeemActivationToken a new token).

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
from collections import Counter, deque
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.common import collector_out_of_the_way
from bench.config import ACTIVATE, LIST, METHOD_PATHS, PLATFORM_ID, PROGRAM, FillSpec, LoadSpec, PagesSpec, SeedSpec

CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_PROBE_S = 1.5
MAX_OPEN_LOOP_IN_FLIGHT = 2000  # open loop: calls due while this many are in flight are counted, not sent
# Each channel its own connection (grpc shares one between channels with the same arguments
# otherwise): with SO_REUSEPORT the kernel spreads connections, not calls, over the processes.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]

POOLS: dict[str, deque[bytes]] = {}  # named pools of requests, each used once


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return _stat_cpu(fh.read())


def _stat_cpu(data: bytes) -> float:
    """utime + stime, in seconds, of a /proc/<pid>/stat record."""
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "; field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def _per_thread(pid: int, name: str, read: Any) -> dict[str, float]:
    """`read(file contents)` of /proc/<pid>/task/<tid>/<name> for each live thread, by thread id."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}", "rb") as fh:
                out[tid] = read(fh.read())
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return out


def _switches(status: bytes) -> float:
    return float(sum(int(line.split()[1]) for line in status.splitlines()
                     if line.startswith((b"voluntary_ctxt_switches:", b"nonvoluntary_ctxt_switches:"))))


def context_switches(pid: int) -> dict[str, float]:
    """Context switches of each live thread of a process so far, voluntary and not
    (/proc/<pid>/task/*/status), by thread id: see `grown`."""
    return _per_thread(pid, "status", _switches)


def run_queue_wait(pid: int) -> dict[str, float]:
    """Seconds each live thread of a process has spent runnable but not running (waiting in a run
    queue for a CPU; /proc/<pid>/task/*/schedstat, its second field, in ns), by thread id."""
    return _per_thread(pid, "schedstat", lambda data: int(data.split()[1]) / 1e9)


def grown(before: dict[str, float], after: dict[str, float]) -> float:
    """What the threads alive at the end added since `before`: a thread born meanwhile counts in
    full, one that ended meanwhile not at all (its share is lost, never subtracted)."""
    return sum(v - before.get(tid, 0.0) for tid, v in after.items())


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat", "rb") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK  # user nice system idle iowait irq softirq steal


def postgres_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every live process named postgres (the database's backends
    and workers, whoever their clients are), by pid."""
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if stat[:stat.rindex(b")")].endswith(b"(postgres"):
            out[int(entry)] = _stat_cpu(stat)
    return out


def postgres_cpu_seconds() -> float:
    return sum(postgres_cpu().values())


def postgres_cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """The database's CPU between two readings: each process alive at the second reading, less what
    it had at the first (all of it when it started in between). A process that ended in between
    takes its count with it (left out: the sum once went negative when other clients' backends
    ended during a window)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items() if cpu >= before.get(pid, 0.0))


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
            elif kind == "pool":
                name, requests = arg
                POOLS.setdefault(name, deque()).extend(requests)
                result = len(POOLS[name])
            elif kind == "fill":
                result = asyncio.run(fill(arg))
            elif kind == "pages":
                result = asyncio.run(pages(arg))
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


def server_cpu(pids: tuple[int, ...]) -> list[float]:
    return [cpu_seconds(p) for p in pids]


class _Redeems:
    """Turns ActivateEntitlement answers into RedeemActivationToken requests (a new account each)."""

    def __init__(self, pool: str) -> None:
        from entitlement.v1 import activation_pb2
        self.pool = POOLS.setdefault(pool, deque()) if pool else None
        self._parse = activation_pb2.ActivateEntitlementResponse.FromString
        self._make = activation_pb2.RedeemActivationTokenRequest
        self._prefix = f"bench-{pool}-{os.getpid()}-{time.monotonic_ns()}-"
        self._n = 0

    def add(self, response: bytes) -> None:
        if self.pool is None:
            return
        token = self._parse(response).activation_token
        if token:
            self._n += 1
            self.pool.append(self._make(token=token, account_id=f"{self._prefix}{self._n}").SerializeToString())


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Closed loop (`concurrency` calls in flight) or open loop (`rate` calls a second, each sent on
    time whatever the others' fate, its latency counted from when it was due) for warmup + seconds;
    the window after the warm-up is measured. With a pool, the window ends when the pool runs dry."""
    collector_out_of_the_way()
    metadata = _bearer(spec.token)
    pids = spec.server_pids or (spec.server_pid,)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{spec.port}", options=CHANNEL_OPTIONS)
                for _ in range(max(1, spec.channels))]
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 15) for ch in channels))
        calls = [ch.unary_unary(METHOD_PATHS[spec.method]) for ch in channels]
        pool = POOLS.get(spec.pool) if spec.pool else None
        if spec.pool and pool is None:
            raise ValueError(f"no pool {spec.pool!r}")
        requests, n_req = spec.requests, len(spec.requests)
        keep = _Redeems(spec.keep_tokens) if spec.keep_tokens and spec.method == ACTIVATE else None
        responses: list[bytes] = []
        latencies: list[float] = []
        # Open loop: when each measured OK call was due (perf_counter; wall clock in the result), in
        # the order of `latencies` (bench.rpcs: the p99 without the window's worst tenth of a second).
        dues: list[float] | None = [] if spec.rate > 0 else None
        codes: Counter[str] = Counter()
        made = 0
        counter = 0
        if spec.start_at:
            await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        t0 = time.perf_counter()
        t_start, t_end = t0 + spec.warmup, t0 + spec.warmup + spec.seconds
        dry_at: list[float] = []  # when the pool ran dry

        def next_request() -> bytes | None:
            nonlocal counter
            if pool is not None:
                if not pool:
                    if not dry_at:
                        dry_at.append(time.perf_counter())
                    return None
                return pool.popleft()
            counter += 1
            return requests[counter % n_req]

        async def one(k: int, request: bytes, begun: float) -> None:
            nonlocal made
            perf = time.perf_counter
            try:
                response = await calls[k % len(calls)](request, metadata=metadata, timeout=30)
                code = "OK"
                if keep is not None:
                    responses.append(response)
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            done = perf()
            made += 1
            if t_start <= done <= t_end and not (dry_at and done > dry_at[0]):
                codes[code] += 1
                if code == "OK":
                    latencies.append(done - begun)
                    if dues is not None:
                        dues.append(begun)

        async def worker(k: int) -> None:
            perf = time.perf_counter
            while True:
                begun = perf()
                if begun >= t_end:
                    return
                request = next_request()
                if request is None:
                    return
                await one(k, request, begun)

        async def dispatcher() -> None:
            """Open loop: call i is due at t0 + i / rate; each wake-up sends every call due."""
            in_flight: set[asyncio.Task[None]] = set()
            interval, i = 1.0 / spec.rate, 0
            perf = time.perf_counter
            while True:
                now = perf()
                if now >= t_end:
                    break
                while t0 + i * interval <= now:
                    due = t0 + i * interval
                    i += 1
                    if len(in_flight) >= MAX_OPEN_LOOP_IN_FLIGHT:
                        if t_start <= due <= t_end:
                            codes["CLIENT_BACKLOG"] += 1
                        continue
                    request = next_request()
                    if request is None:
                        break
                    task = asyncio.create_task(one(i, request, due))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                if dry_at:
                    break
                await asyncio.sleep(max(0.0, min(t0 + i * interval, t_end) - perf()))
            if in_flight:
                await asyncio.gather(*in_flight)

        if spec.rate > 0:
            tasks = [asyncio.create_task(dispatcher())]
        else:
            tasks = [asyncio.create_task(worker(k)) for k in range(spec.concurrency)]
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        # The sampled interval, w0 to w1, spans the CPU readings; scaled to the window below. The
        # /proc walks (context switches, the database's CPU) are just outside it, so that what they
        # cost is neither counted as the client's nor stretches the interval.
        d0, x0 = postgres_cpu(), [context_switches(p) for p in pids]
        q0, k0 = [run_queue_wait(p) for p in pids], run_queue_wait(os.getpid())
        w0, wall0 = time.perf_counter(), time.time()
        s0, c0, m0 = server_cpu(pids), cpu_seconds(os.getpid()), machine_busy_seconds()
        while time.perf_counter() < t_end and not dry_at:
            await asyncio.sleep(min(0.05, max(0.0, t_end - time.perf_counter())))
        s1, c1, m1 = server_cpu(pids), cpu_seconds(os.getpid()), machine_busy_seconds()
        w1 = time.perf_counter()
        q1, k1 = [run_queue_wait(p) for p in pids], run_queue_wait(os.getpid())
        x1, d1 = [context_switches(p) for p in pids], postgres_cpu()
        await asyncio.gather(*tasks)
    finally:
        for ch in channels:
            await ch.close()
    if keep is not None:
        for r in responses:
            keep.add(r)
    # The window: from the end of the warm-up to its end, or to when the pool ran dry.
    window = (min(t_end, dry_at[0]) if dry_at else t_end) - t_start
    window = max(window, 1e-9)
    scale = window / (w1 - w0) if w1 > w0 else 1.0  # CPU sampled interval -> window (a few ms apart)
    ok = codes.pop("OK", 0)
    each = [(b - a) * scale for a, b in zip(s0, s1)]
    return {"seconds": window, "calls": ok, "errors": dict(codes), "made": made, "dry": bool(dry_at),
            "latencies": array("d", latencies).tobytes(),
            "server_cpu_s": sum(each), "server_cpu_each": each, "client_cpu_s": (c1 - c0) * scale,
            "machine_cpu_s": (m1 - m0) * scale,
            "server_switches": sum(grown(a, b) for a, b in zip(x0, x1)) * scale,
            "server_wait_s": sum(grown(a, b) for a, b in zip(q0, q1)) * scale, "client_wait_s": grown(k0, k1) * scale,
            "postgres_cpu_s": postgres_cpu_between(d0, d1) * scale,
            "wall_start": wall0 - (w0 - t_start), "wall_end": wall0 - (w0 - t_start) + window,
            "dues": array("d", [wall0 - (w0 - d) for d in dues or ()]).tobytes()}


async def fill(spec: FillSpec) -> int:
    """See FillSpec; calls not granted (whatever the reason) are an error: the pool holds people
    known to be eligible."""
    source, target = POOLS.get(spec.source, deque()), POOLS.setdefault(spec.target, deque())
    keep = _Redeems(spec.target)
    metadata = _bearer(spec.token)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spec.port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 15)
        call = channel.unary_unary(METHOD_PATHS[ACTIVATE])

        async def worker() -> None:
            while len(target) < spec.count and source:
                keep.add(await call(source.popleft(), metadata=metadata, timeout=30))

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return len(target)


async def pages(spec: PagesSpec) -> tuple[bytes, ...]:
    from entitlement.v1 import audit_pb2
    first = audit_pb2.ListActivationsRequest.FromString(spec.first)
    out = [spec.first]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{spec.port}") as channel:
        call = channel.unary_unary(METHOD_PATHS[LIST])
        request = first
        while len(out) < spec.pages:
            answer = audit_pb2.ListActivationsResponse.FromString(
                await call(request.SerializeToString(), metadata=_bearer(spec.token), timeout=30))
            if not answer.next_page_token:
                break
            request = audit_pb2.ListActivationsRequest()
            request.CopyFrom(first)
            request.page_token = answer.next_page_token
            out.append(request.SerializeToString())
    return tuple(out)
