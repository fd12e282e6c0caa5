"""A loopback listener that connects every client to a target server.

The fault-injecting proxies (``TcpProxy``, ``ImapFaults``) differ only in what they do with
the bytes; accepting, connecting and shutting down live here once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self

from tests.support.dovecot import HOST

__all__ = ["LoopbackForwarder"]


class LoopbackForwarder:
    """Listens on a free port of 127.0.0.1; ``_forward`` gets each (client, server) pair."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((HOST, 0))
        self.host, self.port = HOST, self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._drop_connections()
        self._thread.join(5)

    def _admit(self) -> bool:
        """Whether a new client is connected through (False: it is closed at once)."""
        return True

    def _forward(self, client: socket.socket, server: socket.socket) -> None:
        raise NotImplementedError

    def _drop_connections(self) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._admit():
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._forward(client, server)
