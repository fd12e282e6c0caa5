"""What the gateway asks of Twisted transports beyond ITransport.

Both helpers walk down TLS wrappers (``TLSMemoryBIOProtocol`` keeps the TCP connection in
``.transport``) to the TCP connection that does the socket work.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

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


def unsent_octets(transport: object) -> int | None:
    """Octets written to the socket that the peer has not taken yet (Linux SIOCOUTQ).

    None where the socket cannot be reached or asked.
    """
    for _ in range(_MAX_WRAPPERS):
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            try:
                raw = fcntl.ioctl(handle.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            except OSError:
                return None
            return int(struct.unpack("i", raw)[0])
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None
