"""A TCP relay for fault injection: the server talks to PostgreSQL through it, and a test cuts the
database away without touching the machine's PostgreSQL (other tests use it).

`cut()`: every relayed connection is closed (both sides) and the port stops listening, so a new
connection is refused, as when the database host is down. `silence()`: every relayed connection is
closed, and new ones are accepted but never answered, as when the host stops answering (a client
then waits for its own timeouts). `freeze()`: connections stay open but
carry nothing, as when a peer vanished without closing. `restore()`: relay again, on the same port.
"""

from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False
        self._silent = False
        self._held: set[socket.socket] = set()  # accepted while silent, never answered
        self._frozen = False  # relayed connections stay open but carry nothing (`freeze`)
        self.port = 0
        self.accepted = 0  # connections relayed since the start (a figure for the report)
        # The port stays this proxy's while cut: a socket bound to it (never listening, so a new
        # connection is still refused) until close(). Let go, the port could be taken during an
        # outage by another process binding port 0 (under pytest-xdist, the other worker's servers):
        # restore() then failed (address in use), or the server under test reached that process
        # instead of the database.
        self._reserve = self._bound(0)
        self.port = self._reserve.getsockname()[1]
        self._listen()

    @staticmethod
    def _bound(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # (the reserve and the listener)
        sock.bind(("127.0.0.1", port))
        return sock

    def url_for(self, url: str) -> str:
        """`url` (postgresql://user@host:port/db) pointed at this proxy instead."""
        scheme, rest = url.split("://", 1)
        userinfo, hostpath = rest.rsplit("@", 1) if "@" in rest else ("", rest)
        path = hostpath.split("/", 1)[1]
        return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/{path}"

    def _listen(self) -> None:
        listener = self._bound(self.port)
        listener.listen(128)
        listener.settimeout(0.05)  # the accept loop notices a cut within this
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name="proxy-accept", daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._lock:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._silent:
                    self._held.add(client)
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._frozen:  # frozen: read and dropped, as on a path that lost its peer
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src)
            self._drop(dst)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        """Close every relayed connection and refuse new ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = set(self._conns), set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # Linux: stop listening now, even while accept() waits
            except OSError:
                pass
            listener.close()
        for sock in conns:
            self._drop(sock)

    def silence(self) -> None:
        """Close every relayed connection; accept new ones but never answer them."""
        with self._lock:
            self._silent = True
            conns, self._conns = set(self._conns), set()
        for sock in conns:
            self._drop(sock)

    def freeze(self) -> None:
        """Keep every relayed connection open but carry nothing more either way: a peer that
        vanished without closing (a laptop closed, a NAT that dropped the flow)."""
        self._frozen = True

    def restore(self) -> None:
        """Relay connections again, on the same port (those held while silent are closed)."""
        with self._lock:
            self._silent = False
            held, self._held = set(self._held), set()
            listening = self._listener is not None
        for sock in held:
            self._drop(sock)
        if not listening and not self._closed:
            self._listen()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.restore()  # closes the held ones; no new listener once closed
        self._reserve.close()
