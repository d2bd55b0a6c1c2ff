"""ENTITLEMENT_PROCESSES=N: several server processes on one port (SO_REUSEPORT), supervised."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc

from support import As, identity, pool_birth
from test_server_ops import Server, prepare

from entitlement.v1 import eligibility_pb2


def test_two_processes_share_the_port_and_stop_together(fresh_url: str, tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", fresh_url)
    d.extra_env["ENTITLEMENT_PROCESSES"] = "2"
    server = Server(d)
    try:
        channels = [grpc.insecure_channel(d.address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(16)]
        for i, channel in enumerate(channels, start=1):
            resp = As(channel, d.tokens["advisor-paris"]).CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
                job_seeker=identity(f"P{i:07d}", pool_birth(i)), program="programs/premium-job-seekers"))
            assert resp.decisions[0].eligible
        pids = {line["pid"] for line in d.log_lines() if line.get("event") == "rpc"}
        assert len(pids) == 2, f"connections were served by {len(pids)} process(es)"
        assert server.proc.pid not in pids  # the supervisor serves nothing itself
        for channel in channels:
            channel.close()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        stopped = [line["pid"] for line in d.log_lines() if line.get("event") == "stopped"]
        assert sorted(stopped) == sorted(pids)
    finally:
        server.close()


def test_several_processes_need_a_fixed_port(tmp_path: Path) -> None:
    d = prepare(tmp_path / "srv", with_registry=False)
    d.extra_env.update({"ENTITLEMENT_PROCESSES": "2", "ENTITLEMENT_LISTEN": "127.0.0.1:0"})
    result = d.run()
    assert result.returncode == 2 and "fixed port" in result.stderr
