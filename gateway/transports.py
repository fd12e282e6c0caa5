"""What the gateway asks of Twisted transports beyond ITransport.

``set_buffer_size`` and ``unsent_octets`` walk down TLS wrappers (``TLSMemoryBIOProtocol``
keeps the TCP connection in ``.transport``) to the TCP connection that does the socket work.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

from twisted.internet import tcp

_MAX_WRAPPERS = 3


def set_buffer_size(transport: object, size: int) -> None:
    """Read up to ``size`` octets per ``recv`` and let that much wait unsent before a
    producer is paused (Twisted's default is 64 KiB for both)."""
    for _ in range(_MAX_WRAPPERS):
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = size
        transport = getattr(transport, "transport", None)
        if transport is None:
            return


# TCP keepalive on client connections: first probe after this long without traffic, then every
# KEEPALIVE_INTERVAL; after KEEPALIVE_PROBES unanswered the kernel resets the connection
# (about two minutes for a peer that vanished without a FIN, instead of Linux's two hours).
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_PROBES = 4


def enable_keepalive(transport: object) -> None:
    """Turn on TCP keepalive with the timings above, where the socket can be reached."""
    sock = _socket_of(transport)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except OSError:  # already closed by the peer: nothing to keep alive
        return


def send_at_once(transport: object) -> None:
    """Turn Nagle's algorithm off (TCP_NODELAY) where the socket can be reached.

    Both sides write whole commands and answers. With Nagle on, a small write waits while an
    earlier one is unacknowledged: pipelined IMAP commands written one by one (STATUS, EXAMINE,
    FETCH) would leave a round trip apart, and a short POP reply could wait for a delayed ACK.
    """
    sock = _socket_of(transport)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # already closed by the peer
        return


def _socket_of(transport: object) -> socket.socket | None:
    for _ in range(_MAX_WRAPPERS):
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def unsent_octets(transport: object) -> int | None:
    """Octets written to the socket that the peer has not taken yet (Linux SIOCOUTQ).

    None where the socket cannot be reached or asked.
    """
    sock = _socket_of(transport)
    if sock is None:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return None
    return int(struct.unpack("i", raw)[0])


def write_through(transport: object, pieces: list[bytes]) -> None:
    """Write ``pieces`` now, with one ``sendmsg``, when nothing is queued before them.

    Twisted queues every write until the reactor's next turn reports the socket writable:
    for a relay that is an extra loop turn, two ``epoll_ctl`` calls and a copy per write, and
    a download is thousands of writes. Where the transport is a plain TCP connection with an
    empty queue, this sends straight away; whatever the socket does not take (or any error,
    which Twisted then finds and handles itself) goes through the transport as usual, so the
    order of bytes, flow control and connection loss behave exactly as before. On TLS, or if
    Twisted's internals ever change shape, it simply writes through the transport. ``pieces``
    is consumed: callers hand over a list of their own.
    """
    sock = _idle_socket(transport)
    if sock is not None:
        try:
            sent = sock.sendmsg(pieces)
        except OSError:  # would block, or an error Twisted's own write will report
            sent = 0
        while pieces and sent >= len(pieces[0]):
            sent -= len(pieces.pop(0))
        if pieces and sent:
            pieces[0] = pieces[0][sent:]
    if pieces:
        transport.writeSequence(pieces)  # type: ignore[attr-defined]


def _idle_socket(transport: object) -> socket.socket | None:
    """The socket of a clear-text TCP transport with nothing waiting to be written."""
    if not isinstance(transport, tcp.Connection):
        return None
    t = transport
    try:
        if (
            t.TLS
            or not t.connected
            or t.disconnecting
            or t._writeDisconnected
            or t._tempDataLen
            or len(t.dataBuffer) > t.offset
        ):
            return None
    except AttributeError:
        return None
    sock = t.socket
    return sock if isinstance(sock, socket.socket) else None
