"""entitlement/hostcheck.py: the start-up warning about loopback TCP under a congestion control
that stalls large answers (README "PostgreSQL on the same host")."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from entitlement import hostcheck

AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
DEFAULT = Path("/proc/sys/net/ipv4/tcp_congestion_control")


@pytest.mark.parametrize(("url", "address"), [
    ("postgresql://postgres@127.0.0.1:5432/test", "127.0.0.1"),
    ("postgresql+psycopg://u@localhost/db", "127.0.0.1"),
    ("postgresql://u@LOCALHOST:6432/db", "127.0.0.1"),
    ("postgresql://u@127.0.0.2/db", "127.0.0.2"),
    ("postgresql://u@[::1]:5432/db", "::1"),
    ("postgresql://u@/db?host=127.0.0.1", "127.0.0.1"),
    ("postgresql://u@/db?host=/var/run/postgresql", None),  # the Unix socket
    ("postgresql://u@/db", None),  # libpq's default: the Unix socket
    ("postgresql://u@db.internal:5432/db", None),  # another host (no DNS lookup)
    ("postgresql://u@10.0.0.5/db", None),
    ("sqlite:///var/lib/entitlement/entitlement.db", None),
])
def test_the_database_address_counts_only_loopback_tcp(url: str, address: str | None) -> None:
    assert hostcheck.database_loopback_address(url) == address


def test_the_warning_names_the_congestion_control_and_both_remedies() -> None:
    fields = hostcheck.database_transport_warning("postgresql://u@127.0.0.1/db", congestion_control="bbr")
    assert fields is not None
    assert fields["address"] == "127.0.0.1" and fields["congestion_control"] == "bbr"
    assert "host=/var/run/postgresql" in fields["remedy"]
    assert "127.0.0.1" in fields["remedy"] and "congctl cubic" in fields["remedy"]
    # ::1: the kernel keeps no congctl on IPv6's loopback route; the remedy is the host's default.
    v6 = hostcheck.database_transport_warning("postgresql://u@[::1]/db", congestion_control="bbr")
    assert v6 is not None and "tcp_congestion_control=cubic" in v6["remedy"] and "congctl" not in v6["remedy"]


@pytest.mark.parametrize(("url", "cc"), [
    ("postgresql://u@127.0.0.1/db", "cubic"),
    ("postgresql://u@127.0.0.1/db", "reno"),
    ("postgresql://u@/db?host=/var/run/postgresql", "bbr"),
    ("postgresql://u@db.internal/db", "bbr"),
    ("sqlite:///x.db", "bbr"),
])
def test_no_warning_without_loopback_tcp_under_bbr(url: str, cc: str) -> None:
    assert hostcheck.database_transport_warning(url, congestion_control=cc) is None


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION") or not AVAILABLE.exists(),
                    reason="TCP_CONGESTION: Linux only")
def test_the_probe_reads_what_the_kernel_gives_an_accepted_loopback_connection() -> None:
    cc = hostcheck.accepted_congestion_control("127.0.0.1")
    assert cc in AVAILABLE.read_text().split()
    # The route decides when it names one (`congctl`), else the host's default.
    try:
        route = subprocess.run(["ip", "route", "get", "127.0.0.1"], capture_output=True, text=True, timeout=5).stdout
    except FileNotFoundError:
        route = None
    if route is not None:
        words = route.split()
        expected = words[words.index("congctl") + 1] if "congctl" in words else DEFAULT.read_text().strip()
        assert cc == expected
    # An address this host cannot bind: unknown, not an error.
    assert hostcheck.accepted_congestion_control("192.0.2.123") is None
