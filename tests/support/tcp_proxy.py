"""A TCP forwarder on loopback that tests can break: the IMAP server "goes down" for popgate.

    with TcpProxy(dovecot.host, dovecot.imap_port) as proxy:
        ...point popgate's [upstream.imap] at proxy.port...
        proxy.refuse = True          # new connections are closed at once (server down)
        proxy.freeze_after = b"APPEND"  # the server's replies stop once the client said this

Threads and blocking sockets only; every thread ends when the proxy is closed.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.dovecot import HOST

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.refuse = False
        self.freeze_after: bytes | None = None
        self.frozen = threading.Event()  # set once a connection froze
        self.connections = 0
        self._listener = socket.create_server((HOST, 0))
        self.host, self.port = HOST, self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.drop_all()
        self._thread.join(5)

    def drop_all(self) -> None:
        """Close every forwarded connection now (the server "crashed")."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
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
        try:
            while True:
                data = source.recv(65536)
                if not data:
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
