"""Helpers that reach through TLS wrappers to the TCP connection."""

from __future__ import annotations

import socket

from gateway.transports import set_buffer_size, unsent_octets


class _Tcp:
    bufferSize = 65536

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket | None:
        return self.sock


class _Tls:
    """Like TLSMemoryBIOProtocol: no socket of its own, the TCP connection in ``transport``."""

    def __init__(self, transport: object) -> None:
        self.transport = transport

    def getHandle(self) -> object:
        return object()


def test_buffer_size_is_set_on_the_tcp_connection_under_tls() -> None:
    tcp = _Tcp()
    set_buffer_size(_Tls(tcp), 256 * 1024)
    assert tcp.bufferSize == 256 * 1024


def test_unsent_octets_of_a_real_socket_and_of_none() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 100)
        queued = unsent_octets(_Tls(_Tcp(a)))
        assert queued is not None and queued >= 100  # a unix socket counts buffer memory
        b.recv(100)
        assert unsent_octets(_Tls(_Tcp(a))) == 0
    assert unsent_octets(_Tls(_Tcp(None))) is None
    assert unsent_octets(object()) is None
