"""A TCP forwarder on loopback that tests can break: the IMAP server "goes down" for popgate.

    with TcpProxy(dovecot.host, dovecot.imap_port) as proxy:
        ...point popgate's [upstream.imap] at proxy.port...
        proxy.refuse = True          # new connections are closed at once (server down)
        proxy.freeze_after = b"APPEND"  # the server's replies stop once the client said this
        proxy.hold_until(4)          # nothing is forwarded until 4 connections have arrived

Threads and blocking sockets only; every thread ends when the proxy is closed.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.forwarder import LoopbackForwarder

__all__ = ["TcpProxy"]


class TcpProxy(LoopbackForwarder):
    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.refuse = False
        self.freeze_after: bytes | None = None
        self.frozen = threading.Event()  # set once a connection froze
        self.connections = 0
        self.client_closed = 0  # connections whose client (popgate) closed its side
        self._sockets: list[socket.socket] = []
        self._release_at = 0
        self._released = threading.Event()
        self._released.set()

    def hold_until(self, connections: int) -> None:
        """Forward nothing, either way, until ``connections`` connections have arrived (from
        now on): every client has begun before any server has said a word."""
        with self._lock:
            self._release_at = self.connections + connections
            self._released.clear()

    def drop_all(self) -> None:
        """Close every forwarded connection now (the server "crashed")."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _drop_connections(self) -> None:
        self.drop_all()

    def _admit(self) -> bool:
        return not self.refuse

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            self._sockets += [client, upstream]
            self.connections += 1
            if self.connections >= self._release_at:
                self._released.set()
        frozen = threading.Event()
        threading.Thread(
            target=self._pump, args=(client, upstream, frozen, True), daemon=True
        ).start()
        threading.Thread(
            target=self._pump, args=(upstream, client, frozen, False), daemon=True
        ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, frozen: threading.Event, from_client: bool
    ) -> None:
        seen = b""
        if not self._released.wait(60):
            return  # the other connections never came: the test fails on what it awaits
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    if from_client:
                        with self._lock:
                            self.client_closed += 1
                    break
                if from_client and self.freeze_after is not None and not frozen.is_set():
                    seen = (seen + data)[-4096:]
                    if self.freeze_after in seen:
                        frozen.set()
                        self.frozen.set()
                if not from_client and frozen.is_set():
                    continue  # swallow the server's replies
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
