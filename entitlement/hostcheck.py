"""Host settings that hurt this service, checked at start and logged as a warning (as Redis warns
about transparent huge pages): the server still starts, the operator is told what to change.

Loopback TCP under BBR. Linux gives every TCP connection the host's default congestion control
(`net.ipv4.tcp_congestion_control`), loopback ones included, unless their route names one
(`ip route ... congctl NAME`). Many images make BBR the default. Over loopback (MTU 65,536, a
segment of up to 64 KB, round trips of a few microseconds), a sender under BBR holds back the last
part of an answer larger than about two segments for about 40 ms, on 2-4 % of such answers when
several connections are busy (measured on the 2-core machine, PostgreSQL 15 answering 4 threads of
psycopg on 127.0.0.1 every 20 ms: answers up to 126 KB, p99 1.1-1.8 ms; from 158 KB, p99 43-45 ms;
under cubic, the same answers p99 1.8 ms and none over 30 ms; README "PostgreSQL on the same
host"). The sender is what matters: PostgreSQL's backend sending a funder's page of activations
(about 170 KB) to this server, or this server sending a large answer to a client on the same host.
Client-side settings (receive buffers, TCP_QUICKACK, the client socket's own congestion control)
change nothing. So when the database is reached over TCP on a loopback address and connections
accepted there get BBR, the server warns at start, with the remedies: PostgreSQL's Unix socket, or
cubic on the loopback route."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from sqlalchemy.engine import make_url

LOOPBACK_NAMES = {"localhost": "127.0.0.1", "localhost.localdomain": "127.0.0.1", "ip6-localhost": "::1"}
# The kernel's own IPv4 loopback route, as `ip` prints it, for the remedy (with `congctl cubic`
# appended; on this kernel the IPv6 one, ::1, keeps no congctl: there the remedy is the host's
# default, `sysctl net.ipv4.tcp_congestion_control=cubic`, which IPv6 shares).
ROUTE_V4 = "ip route replace table local local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1"
STALLING = frozenset({"bbr"})  # congestion controls measured to stall loopback answers (module docstring)


def database_loopback_address(url: str) -> str | None:
    """The loopback address a PostgreSQL URL reaches over TCP, or None: another host, a Unix socket
    (no host, or a `host` query parameter that is a directory), SQLite. No DNS lookup: only literal
    addresses and the usual names of localhost count."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    host = parsed.host
    query_host = parsed.query.get("host")
    if isinstance(query_host, tuple):  # several hosts: libpq tries them in order; the first decides
        query_host = query_host[0] if query_host else None
    if not host and query_host:
        host = query_host
    if not host or host.startswith("/") or host.startswith("@"):  # libpq's default or a socket directory
        return None
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return LOOPBACK_NAMES[host.lower()]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(address) if address.is_loopback else None


def accepted_congestion_control(address: str = "127.0.0.1") -> str | None:
    """The congestion control the kernel gives a TCP connection accepted on `address` (as a local
    PostgreSQL's backend gets for its connection to us): the route's `congctl` if it names one,
    else the host's default. None where it cannot be read (no TCP_CONGESTION: not Linux; an
    address this host cannot bind)."""
    option = getattr(socket, "TCP_CONGESTION", None)
    if option is None:
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((address, 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname()[:2], timeout=2):
                accepted, _ = listener.accept()
                with accepted:
                    raw = accepted.getsockopt(socket.IPPROTO_TCP, option, 16)
    except OSError:
        return None
    name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return name or None


def database_transport_warning(url: str, congestion_control: str | None = None) -> dict[str, Any] | None:
    """The fields of the start-up warning `loopback_tcp_stalls` when the database is reached over
    loopback TCP whose accepted connections get a stalling congestion control; None otherwise.
    `congestion_control`: the one to judge (tests); by default probed on the database's address."""
    address = database_loopback_address(url)
    if address is None:
        return None
    cc = congestion_control if congestion_control is not None else accepted_congestion_control(address)
    if cc not in STALLING:
        return None
    route = "sysctl -w net.ipv4.tcp_congestion_control=cubic" if ":" in address else ROUTE_V4 + " congctl cubic"
    return {
        "address": address,
        "congestion_control": cc,
        "effect": "answers over about 128 KB (a funder's page of activations) wait about 40 ms, now and then",
        "remedy": ("connect through PostgreSQL's Unix socket (ENTITLEMENT_DATABASE_URL=postgresql://USER@/DB"
                   f"?host=/var/run/postgresql), or give loopback connections cubic: {route} "
                   "(README \"PostgreSQL on the same host\")"),
    }
