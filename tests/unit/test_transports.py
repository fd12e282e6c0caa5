"""Helpers that reach through TLS wrappers to the TCP connection."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor

from gateway.transports import (
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PROBES,
    enable_keepalive,
    set_buffer_size,
    unsent_octets,
    write_through,
)


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


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Connection, socket.socket]]:
    """A Twisted TCP transport on one end of a socket pair, the peer's socket on the other."""
    ours, peer = socket.socketpair()
    conn = tcp.Connection(ours, Protocol(), MemoryReactor())
    conn.connected = 1
    peer.setblocking(False)
    with ours, peer:
        yield conn, peer


def queued(conn: tcp.Connection) -> bytes:
    return b"".join(conn._tempDataBuffer)


def test_write_through_sends_at_once_on_an_idle_connection(pair: tuple) -> None:
    conn, peer = pair
    write_through(conn, [b"+OK 4 octets\r\n", b"body", b".\r\n"])
    assert peer.recv(100) == b"+OK 4 octets\r\nbody.\r\n"
    assert queued(conn) == b""


def test_write_through_queues_behind_what_twisted_already_holds(pair: tuple) -> None:
    conn, peer = pair
    conn.write(b"first ")  # waits for the reactor's next turn
    write_through(conn, [b"second"])
    assert queued(conn) == b"first second"  # order kept: nothing overtook "first"
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_write_through_never_bypasses_tls(pair: tuple) -> None:
    conn, peer = pair
    conn.TLS = True  # what startTLS sets: bytes must go through the TLS engine
    tls_writes: list[bytes] = []
    conn.writeSequence = tls_writes.extend
    write_through(conn, [b"secret"])
    assert tls_writes == [b"secret"]
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_what_the_socket_does_not_take_is_queued_in_order(pair: tuple) -> None:
    conn, peer = pair
    conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffer
    write_through(conn, [data[:1000], data[1000:]])
    received = bytearray()
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            break
        received += chunk
    assert 0 < len(received) < len(data)
    assert bytes(received) + queued(conn) == data


def test_keepalive_is_turned_on_through_tls_with_short_timings() -> None:
    """A client gone without a FIN is found in minutes, not Linux's two hours."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as a:
        a.connect(server.getsockname())
        enable_keepalive(_Tls(_Tcp(a)))
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
        assert KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES <= 180
