"""ENTITLEMENT_PROCESSES=N: several server processes on one port (SO_REUSEPORT), supervised."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from support import As, identity, pool_birth
from test_server_ops import Server, prepare

from entitlement import hostcheck
from entitlement.v1 import eligibility_pb2


def test_two_processes_share_the_port_and_stop_together(fresh_url: str, tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", fresh_url)
    d.extra_env["ENTITLEMENT_PROCESSES"] = "2"
    server = Server(d)
    try:
        # Server() returns once either process answers health checks; the other may still be
        # starting (seen once in CI on PostgreSQL: all 16 connections went to the first): wait
        # until both said "serving" (each logs it once it is bound), so the kernel spreads them.
        deadline = time.monotonic() + 30
        while sum(1 for line in d.log_lines() if line.get("event") == "serving") < 2:
            assert time.monotonic() < deadline, "the second process never said serving"
            time.sleep(0.05)
        channels = [grpc.insecure_channel(d.address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(16)]
        for i, channel in enumerate(channels, start=1):
            resp = As(channel, d.tokens["advisor-paris"]).CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                job_seeker=identity(f"P{i:07d}", pool_birth(i)), program="programs/premium-job-seekers"))
            assert resp.decisions[0].eligible
        pids = {line["pid"] for line in d.log_lines() if line.get("event") == "rpc"}
        assert len(pids) == 2, f"connections were served by {len(pids)} process(es)"
        assert server.proc.pid not in pids  # the supervisor serves nothing itself
        # ENTITLEMENT_SERVER_MODEL unset (auto): the event loop on SQLite, the thread pool on PostgreSQL.
        models = [(line["server_model"], line["event_loop"], line["loop_writes"])
                  for line in d.log_lines() if line.get("event") == "serving"]
        # ENTITLEMENT_EVENT_LOOP unset (auto): uvloop for the event loop; the thread pool runs none.
        # ENTITLEMENT_LOOP_WRITES unset (auto): the signup's writes on the loop on SQLite.
        sqlite_line = ("event-loop", "uvloop", ["ActivateEntitlement", "RedeemActivationToken"])
        assert models == [sqlite_line if fresh_url.startswith("sqlite") else ("threads", None, [])] * 2
        # Each process warns at start when its database is on loopback TCP under BBR (the test
        # database: 127.0.0.1), with the congestion control the kernel gives such a connection.
        warned = [line for line in d.log_lines() if line.get("event") == "loopback_tcp_stalls"]
        cc = hostcheck.accepted_congestion_control("127.0.0.1")
        if fresh_url.startswith("sqlite") or hostcheck.database_loopback_address(fresh_url) is None \
                or cc not in hostcheck.STALLING:
            assert warned == []
        else:
            assert [(w["level"], w["congestion_control"], w["address"]) for w in warned] == [("warning", cc, "127.0.0.1")] * 2
            assert {w["pid"] for w in warned} == pids
        for channel in channels:
            channel.close()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        stopped = [line["pid"] for line in d.log_lines() if line.get("event") == "stopped"]
        assert sorted(stopped) == sorted(pids)
    finally:
        server.close()


def _without_uvloop(root: Path) -> str:
    """A PYTHONPATH under which `import uvloop` fails, as where it is not installed (a package of
    that name, first on the path, that raises ImportError)."""
    (root / "uvloop").mkdir(parents=True)
    (root / "uvloop" / "__init__.py").write_text('raise ImportError("uvloop hidden by the test")\n')
    return os.pathsep.join([str(root), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])


@pytest.mark.parametrize("asked", ["the other model", "the event loop on asyncio", "auto where uvloop is not installed"])
def test_the_other_server_model_serves_and_stops_as_asked(asked: str, fresh_url: str, tmp_path: Path) -> None:
    """ENTITLEMENT_SERVER_MODEL set against auto's choice (the thread pool on SQLite, the event loop
    on PostgreSQL), or the event loop on the standard library's loop (ENTITLEMENT_EVENT_LOOP=asyncio,
    against auto's uvloop; or auto where uvloop cannot be imported): served, said in the "serving"
    line, stopped cleanly by SIGTERM."""
    if asked == "the other model":
        model = "threads" if fresh_url.startswith("sqlite") else "event-loop"
        env, loop = {"ENTITLEMENT_SERVER_MODEL": model}, None if model == "threads" else "uvloop"
    elif asked == "the event loop on asyncio":
        model, loop = "event-loop", "asyncio"
        env = {"ENTITLEMENT_SERVER_MODEL": model, "ENTITLEMENT_EVENT_LOOP": loop}
    else:
        model, loop = "event-loop", "asyncio"
        env = {"ENTITLEMENT_SERVER_MODEL": model, "PYTHONPATH": _without_uvloop(tmp_path / "path")}
    d = prepare(tmp_path / "srv", fresh_url)
    d.extra_env.update(env)
    server = Server(d)
    try:
        resp = As(server.channel, d.tokens["advisor-paris"]).CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity("P0000001", pool_birth(1)), program="programs/premium-job-seekers"))
        assert resp.decisions[0].eligible
        assert [(line["server_model"], line["event_loop"]) for line in d.log_lines()
                if line.get("event") == "serving"] == [(model, loop)]
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        assert [line["event"] for line in d.log_lines()][-2:] == ["stopping", "stopped"]
    finally:
        server.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_uvloop_asked_for_where_it_is_not_installed_is_refused_at_start(processes: int, tmp_path: Path) -> None:
    """ENTITLEMENT_EVENT_LOOP=uvloop where uvloop cannot be imported: refused before serving, once
    (with several processes, by the supervisor, before any is started), exit 2, the reason said."""
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env.update({"ENTITLEMENT_EVENT_LOOP": "uvloop", "ENTITLEMENT_PROCESSES": str(processes),
                        "PYTHONPATH": _without_uvloop(tmp_path / "path")})
    result = d.run()
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("entitlement: cannot start: ENTITLEMENT_EVENT_LOOP is uvloop, but uvloop is not "
                               "installed") == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name,value,allowed", [("ENTITLEMENT_SERVER_MODEL", "fibers", "auto, threads, event-loop"),
                                                ("ENTITLEMENT_EVENT_LOOP", "trio", "auto, uvloop, asyncio")])
def test_an_unknown_server_model_or_loop_is_refused_at_start(name: str, value: str, allowed: str,
                                                              tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env[name] = value
    result = d.run()
    assert result.returncode != 0
    assert f"{name} must be one of {allowed}, got {value!r}" in result.stderr
    assert "Traceback" not in result.stderr


def test_several_processes_need_a_fixed_port(tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env.update({"ENTITLEMENT_PROCESSES": "2", "ENTITLEMENT_LISTEN": "127.0.0.1:0"})
    result = d.run()
    assert result.returncode == 2 and "fixed port" in result.stderr


# ENTITLEMENT_CPU_AFFINITY (entitlement/affinity.py): a server process pinned to one CPU, every
# thread of it, read back from /proc while it serves.

def _threads_cpus(pid: int) -> set[int]:
    cpus: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpus |= os.sched_getaffinity(int(task.name))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return cpus


def _two_cpus() -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip(f"this machine lets the tests run on one CPU only ({allowed}): nothing to pin apart")
    return allowed


def test_a_cpu_list_pins_a_single_process_and_all_its_threads(tmp_path: Path) -> None:
    cpu = _two_cpus()[-1]
    d = prepare(tmp_path / "srv")
    d.extra_env["ENTITLEMENT_CPU_AFFINITY"] = str(cpu)
    server = Server(d)
    try:
        resp = As(server.channel, d.tokens["advisor-paris"]).CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity("P0000001", pool_birth(1)), program="programs/premium-job-seekers"))
        assert resp.decisions[0].eligible
        assert len(list(Path(f"/proc/{server.proc.pid}/task").iterdir())) > 4  # gRPC's and the pool's threads
        assert _threads_cpus(server.proc.pid) == {cpu}
        serving = [line for line in d.log_lines() if line.get("event") == "serving"]
        assert serving and serving[0]["cpus"] == [cpu]
    finally:
        server.close()


def test_a_single_process_is_left_to_the_kernel_by_default(tmp_path: Path) -> None:
    allowed = set(_two_cpus())
    d = prepare(tmp_path / "srv", with_registry=False)
    server = Server(d)
    try:
        assert _threads_cpus(server.proc.pid) == allowed
        assert [line["cpus"] for line in d.log_lines() if line.get("event") == "serving"] == [sorted(allowed)]
    finally:
        server.close()


def test_one_process_per_cpu_pins_each_to_its_own_by_default(tmp_path: Path) -> None:
    allowed = _two_cpus()
    if len(allowed) > 4:
        pytest.skip(f"{len(allowed)} CPUs: the test runs one server process per CPU, up to 4")
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env["ENTITLEMENT_PROCESSES"] = str(len(allowed))  # auto pins when they are as many as the CPUs
    server = Server(d)
    try:
        serving: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30  # the first to serve answers the health check; the others may follow
        while len(serving) < len(allowed) and time.monotonic() < deadline:
            time.sleep(0.1)
            serving = [line for line in d.log_lines() if line.get("event") == "serving"]
        assert len(serving) == len(allowed), serving
        assert sorted(line["cpus"] for line in serving) == [[cpu] for cpu in allowed]
        for line in serving:
            assert _threads_cpus(line["pid"]) == set(line["cpus"])
    finally:
        server.close()


@pytest.mark.parametrize("value, message", [
    ("fast", "must be auto, off or a list of CPUs"),
    ("2-1", "must be auto, off or a list of CPUs"),
    ("0-99999999999", "must be auto, off or a list of CPUs"),
    ("4095", "CPU 4095 is not one this process may run on"),
])
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_bad_cpu_affinity_is_refused_at_start(tmp_path: Path, value: str, message: str, processes: str) -> None:
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env.update({"ENTITLEMENT_CPU_AFFINITY": value, "ENTITLEMENT_PROCESSES": processes})
    result = d.run()
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    # Once: with 2 processes the supervisor refuses it before starting any.
    assert result.stderr.count("ENTITLEMENT_CPU_AFFINITY") == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def _serving_pids(d: Any, count: int) -> list[int]:
    deadline = time.monotonic() + 30
    while True:
        pids = [line["pid"] for line in d.log_lines() if line.get("event") == "serving"]
        if len(pids) >= count:
            return pids
        assert time.monotonic() < deadline, f"{len(pids)} of {count} processes said serving"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_one_worker_ending_alone_stops_the_others_and_is_said(sig: signal.Signals, fresh_url: str,
                                                               tmp_path: Path) -> None:
    """One server process of two killed (kill -9), or stopped alone (SIGTERM to it, not to the
    supervisor: it drains and exits 0): the port must not go on at half its capacity unseen. The
    supervisor says which process ended and how, stops the other, and exits non-zero."""
    d = prepare(tmp_path / "srv", fresh_url, with_registry=False)
    d.extra_env["ENTITLEMENT_PROCESSES"] = "2"
    server = Server(d)
    try:
        victim, other = _serving_pids(d, 2)
        os.kill(victim, sig)
        assert server.proc.wait(timeout=30) == 1
        ended = [line for line in d.log_lines() if line.get("event") == "worker_ended"]
        assert [(e["level"], e["worker_pid"]) for e in ended] == [("error", victim)], ended
        how = ("exit_code", 0) if sig == signal.SIGTERM else ("signal", "SIGKILL")
        assert ended[0][how[0]] == how[1]
        assert other in [line["pid"] for line in d.log_lines() if line.get("event") == "stopped"]
        with pytest.raises(ProcessLookupError):
            os.kill(other, 0)
    finally:
        server.close()


def test_workers_stop_when_their_supervisor_is_killed(fresh_url: str, tmp_path: Path) -> None:
    """The supervisor killed (kill -9, the OOM killer): its server processes must not go on serving
    the port unsupervised (a server.py started again would share the port with them, SO_REUSEPORT,
    whatever their version). Each is stopped as by SIGTERM: drained, "stopped" logged."""
    d = prepare(tmp_path / "srv", fresh_url, with_registry=False)
    d.extra_env["ENTITLEMENT_PROCESSES"] = "2"
    server = Server(d)
    pids = _serving_pids(d, 2)
    try:
        server.proc.kill()
        server.proc.wait(timeout=15)
        deadline = time.monotonic() + 30
        alive = set(pids)
        while alive and time.monotonic() < deadline:
            for pid in list(alive):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    alive.discard(pid)
            time.sleep(0.1)
        assert not alive, f"server processes {sorted(alive)} still run without their supervisor"
        assert sorted(line["pid"] for line in d.log_lines() if line.get("event") == "stopped") == sorted(pids)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.close()


@pytest.mark.parametrize("model", ["threads", "event-loop"])
@pytest.mark.parametrize("processes", [1, 2])
def test_a_port_in_use_stops_the_start_in_one_line(model: str, processes: int, tmp_path: Path) -> None:
    """The port held by another program (listening, without SO_REUSEPORT): the server process says
    so in one line, no traceback, and server.py exits non-zero (with 2 processes the supervisor
    says which ended) instead of hanging."""
    import socket
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env.update({"ENTITLEMENT_SERVER_MODEL": model, "ENTITLEMENT_PROCESSES": str(processes)})
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", d.port))
    holder.listen()
    try:
        result = d.run()
    finally:
        holder.close()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # (With 2, the second may be stopped by the supervisor before it reaches the port.)
    assert 1 <= result.stderr.count(f"cannot listen on {d.address}") <= processes, result.stderr[-3000:]
    if processes > 1:
        assert '"event": "worker_ended"' in result.stderr, result.stderr[-3000:]


def _spawned_children(pid: int) -> list[int]:
    """The server processes a supervisor started (multiprocessing's spawn children), by /proc."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                out.append(int(child))
    return out


@pytest.mark.parametrize("how", ["SIGTERM to the supervisor", "Ctrl-C to the process group"])
def test_a_stop_asked_while_the_workers_start_is_a_clean_stop(how: str, fresh_url: str, tmp_path: Path) -> None:
    """A deployment stopped right after it started (a rollout undone, Ctrl-C in a terminal): the
    server processes are still starting (importing, opening the database), before they handle
    signals themselves. The supervisor must exit 0 without a `worker_ended` error or a traceback:
    it asked them to stop (a process still starting ends by SIGTERM's default action; one that
    got SIGINT from the terminal too waits for the supervisor's SIGTERM)."""
    import subprocess

    from test_server_ops import PYTHON

    from entitlement.config import ROOT
    d = prepare(tmp_path / "srv", fresh_url, with_registry=False)
    d.extra_env["ENTITLEMENT_PROCESSES"] = "2"
    with d.log_path.open("w", encoding="utf-8") as stderr:
        proc = subprocess.Popen([PYTHON, "server.py"], cwd=ROOT, env=d.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while len(_spawned_children(proc.pid)) < 2:
                assert proc.poll() is None, d.log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the supervisor never started its two processes"
                time.sleep(0.005)
            workers = _spawned_children(proc.pid)
            # Asked while they start: a spawned interpreter takes far longer than this to import
            # the service and bind the port (it has not said "serving").
            if how.startswith("SIGTERM"):
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the supervisor did not stop within 30 s of the stop; its processes: "
                            f"{_spawned_children(proc.pid)}; log:\n{d.log_path.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    text = d.log_path.read_text()
    assert not any(line.get("event") == "serving" for line in d.log_lines()), \
        "a process was already serving: the stop did not land while they started"
    assert code == 0, text[-3000:]
    assert "worker_ended" not in text and "Traceback" not in text, text[-3000:]
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
