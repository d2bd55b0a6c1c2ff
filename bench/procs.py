"""The processes of a benchmark run, seen from the orchestrating process (which never creates a gRPC
object itself): server and load-generator processes started with `spawn`, and facts about the
machine and the code measured, for the method text."""

from __future__ import annotations

import multiprocessing
import platform
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.config import ServerSpec

MP = multiprocessing.get_context("spawn")  # no process of ours is a fork of one holding gRPC state
READY_TIMEOUT = 120.0
CALL_TIMEOUT = 300.0


class Child:
    """A spawned process and the parent's end of its pipe."""

    def __init__(self, name: str, target: Any, *args: Any) -> None:
        self.name = name
        self.conn, child_end = MP.Pipe()
        self.proc = MP.Process(target=target, args=(*args, child_end), name=name, daemon=True)
        self.proc.start()
        child_end.close()

    def recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"{self.name}: no answer within {timeout:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: exited (code {self.proc.exitcode})") from None

    def close(self, message: Any) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(message)
            except OSError:
                pass
            self.proc.join(15)
        if self.proc.is_alive():  # only this process, by its own handle
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


class Server(Child):
    def __init__(self, spec: ServerSpec) -> None:
        from bench.servers import serve
        super().__init__(f"server {spec.kind}", serve, spec)
        self.spec = spec
        try:
            answer = self.recv(READY_TIMEOUT)
            if answer[0] != "ready":
                raise RuntimeError(f"{self.name} failed to start:\n{answer[1]}")
        except BaseException:
            self.stop()
            raise
        _, self.port, self.pid = answer

    def counts(self) -> dict[str, int]:
        """The server's SQL counters (empty unless its spec asked for them)."""
        self.conn.send("counts")
        return dict(self.recv(30))

    def stop(self) -> None:
        self.close("stop")


class Client(Child):
    def __init__(self) -> None:
        from bench.load import client
        super().__init__("load generator", client)

    def ask(self, kind: str, arg: Any, timeout: float = CALL_TIMEOUT) -> Any:
        self.conn.send((kind, arg))
        status, value = self.recv(timeout)
        if status != "ok":
            raise RuntimeError(f"{self.name}: {kind} failed:\n{value}")
        return value

    def stop(self) -> None:
        self.close(None)


@contextmanager
def servers(specs: list[ServerSpec]) -> Iterator[dict[str, Server]]:
    """One server process per spec, by kind; stopped on exit."""
    started: dict[str, Server] = {}
    try:
        for spec in specs:
            started[spec.kind] = Server(spec)
        yield started
    finally:
        for s in started.values():
            s.stop()


@contextmanager
def server_group(spec: ServerSpec) -> Iterator[list[Server]]:
    """spec.processes server processes on one fixed port (SO_REUSEPORT when more than one), as
    server.py runs them with ENTITLEMENT_PROCESSES; stopped on exit."""
    started: list[Server] = []
    try:
        for i in range(spec.processes):
            log = spec.log_path.with_name(f"{spec.log_path.stem}-{i}{spec.log_path.suffix}")
            started.append(Server(_replace(spec, log_path=log, index=i)))
        yield started
    finally:
        for s in started:
            s.stop()


def _replace(spec: ServerSpec, **changes: Any) -> ServerSpec:
    from dataclasses import replace
    return replace(spec, **changes)


def server_cpus(pid: int) -> str:
    """The CPUs any thread of process `pid` may run on ("0-1", or "0" when pinned), "" if unknown."""
    from entitlement.affinity import cpus_of, ranges
    return ranges(cpus_of(pid))


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Stop a child process started with subprocess: SIGTERM, then SIGKILL if it outlives `timeout`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def loopback_cc_text(address: str = "127.0.0.1") -> str:
    """For a benchmark's method: the congestion control TCP connections accepted on `address` get
    on this machine (the route's `congctl`, else the host's default), which decides whether answers
    over about 128 KB wait about 40 ms now and then (README "PostgreSQL on the same host")."""
    from entitlement import hostcheck
    accepted = hostcheck.accepted_congestion_control(address)
    try:
        default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        default = ""
    if accepted is None:
        return f"TCP congestion control on loopback ({address}): not readable on this system."
    where = ("the host's default" if accepted == default else
             f"the loopback route's `congctl`; the host's default is `{default}`" if default else "the route's")
    text = f"TCP connections on loopback ({address}) got `{accepted}` ({where})"
    if accepted in hostcheck.STALLING:
        return text + (": answers over about 128 KB (a page of ListActivations, from PostgreSQL and to a client) "
                       "may wait about 40 ms (README \"PostgreSQL on the same host\").")
    return text + "."


def free_port() -> int:
    """A port free on 127.0.0.1 now (for servers that must share a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> tuple[str, float]:
    cpu, mem = platform.processor() or platform.machine(), 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return cpu, mem


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def commit() -> str:
    """The commit measured, and whether the service's files differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "entitlement", "programs"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {head}" + (" with uncommitted changes under entitlement/ or programs/" if dirty else "")


def pg_version(url: str) -> str:
    import psycopg
    with psycopg.connect(url, connect_timeout=3) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


def usable_backends(wanted: list[str], pg_admin_url: str, label: str) -> tuple[list[str], str, str]:
    """(the backends of `wanted` that can run, why PostgreSQL was skipped or "", its version or "")."""
    from bench.common import say
    from bench.prepare import pg_problem
    backends, skipped, version = [], "", ""
    for b in wanted:
        problem = pg_problem(pg_admin_url) if b == "postgres" else None
        if problem:
            skipped = f"postgres skipped: not reachable at {pg_admin_url} ({problem})"
            say(f"{label}: {skipped}")
            continue
        if b == "postgres":
            version = pg_version(pg_admin_url)
        backends.append(b)
    return backends, skipped, version
