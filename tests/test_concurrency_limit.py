"""The server's concurrency limit (ENTITLEMENT_MAX_CONCURRENT_RPCS): calls past it are refused
RESOURCE_EXHAUSTED by gRPC before any handler, and served again once calls end; the setting is read
and checked from the environment; the default is 8 per thread of the two pools."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from own_server import own_server
from support import Api

from entitlement.config import Settings
from entitlement.server_main import concurrency_limit
from entitlement.v1 import activation_pb2


def _open_stream(api: Api) -> Any:
    call = api.as_("platform-oc").WatchEntitlementChanges(activation_pb2.WatchEntitlementChangesRequest(),
                                                           timeout=30)
    next(iter(call))  # its bookmark: the stream is open and counts against the limit
    return call


def test_calls_past_the_limit_are_refused_then_served_again(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with own_server(backend[0], tmp_path / "own", request, max_concurrent_rpcs=2, stream_workers=4) as server:
        api = Api(server)
        keys = activation_pb2.GetSigningKeysRequest()
        assert api.platform.GetSigningKeys(keys, timeout=10).jwks_json  # under the limit: served
        streams = [_open_stream(api) for _ in range(2)]
        try:
            with pytest.raises(grpc.RpcError) as info:
                api.platform.GetSigningKeys(keys, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert "limit" in (info.value.details() or "").lower()
        finally:
            for call in streams:
                call.cancel()
        # The cancelled streams end on the server within its poll interval: then calls pass again.
        deadline = time.monotonic() + 15
        while True:
            try:
                assert api.platform.GetSigningKeys(keys, timeout=10).jwks_json
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert time.monotonic() < deadline, "still refused 15 s after the streams were cancelled"
                time.sleep(0.05)


def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENTITLEMENT_MAX_CONCURRENT_RPCS", raising=False)
    d = Settings.from_env()
    assert d.max_concurrent_rpcs == 0
    assert concurrency_limit(d) == (d.max_workers + d.stream_workers) * 8
    monkeypatch.setenv("ENTITLEMENT_MAX_CONCURRENT_RPCS", "500")
    s = Settings.from_env()
    assert s.max_concurrent_rpcs == 500
    assert concurrency_limit(s) == 500
    for bad in ("-1", "many"):
        monkeypatch.setenv("ENTITLEMENT_MAX_CONCURRENT_RPCS", bad)
        with pytest.raises(SystemExit) as info:
            Settings.from_env()
        assert "ENTITLEMENT_MAX_CONCURRENT_RPCS" in str(info.value)
