"""A small, fast POP3 client on asyncio for the benchmark.

It does as little as a client can: no parsing of bodies, no un-stuffing on the way. A multi-line
response is found by its terminator and handed back as the exact wire bytes between the status
line and the end (dot-stuffed, terminator included), so the caller can compare them with the
expected wire form in one ``==`` (a memcmp). poplib splits every line and is too slow to measure
a gateway with.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence

TERMINATOR = b"\r\n.\r\n"


class PopError(Exception):
    """``-ERR`` from the server, a broken connection or a timeout."""


class _Reader(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self, timeout: float) -> None:
        """Wait for more bytes (or the end of the connection), at most ``timeout`` seconds."""
        if self.closed:
            raise PopError(f"connection closed by server ({self.error or 'EOF'})")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(PopError("no answer in time"))


class PopClient:
    """One POP3 connection. Every ``await`` is bounded by ``timeout`` seconds."""

    def __init__(self, reader: _Reader, timeout: float) -> None:
        self._r = reader
        self.timeout = timeout
        self.greeting = b""

    @classmethod
    async def connect(
        cls, host: str, port: int, timeout: float = 120.0, tls: ssl.SSLContext | None = None
    ) -> PopClient:
        """``tls``: implicit TLS (POP3S) with that context."""
        loop = asyncio.get_running_loop()
        try:
            _, reader = await asyncio.wait_for(
                loop.create_connection(
                    _Reader,
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                    # asyncio's own 60 s would end a handshake before ``timeout`` does
                    ssl_handshake_timeout=timeout if tls else None,
                ),
                timeout,
            )
        except (OSError, TimeoutError) as e:
            raise PopError(f"connect to {host}:{port} failed: {e!r}") from e
        client = cls(reader, timeout)
        client.greeting = await client._status()
        return client

    # ----------------------------------------------------------------- wire
    def send(self, data: bytes) -> None:
        transport = self._r.transport
        if transport is None or self._r.closed:
            raise PopError("connection closed")
        transport.write(data)

    async def _line(self) -> bytes:
        """The next CRLF-terminated line, without the CRLF."""
        buf = self._r.buffer
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 2]
                return line
            start = max(0, len(buf) - 1)
            await self._more()

    async def _more(self) -> None:
        await self._r.more(self.timeout)

    async def _status(self) -> bytes:
        line = await self._line()
        if not line.startswith(b"+OK"):
            raise PopError(line.decode("utf-8", "replace"))
        return line

    async def _body(self) -> bytes:
        """After a ``+OK`` status line: everything up to and including the terminator
        (an empty body is the terminator line alone)."""
        buf = self._r.buffer
        while len(buf) < 3:
            await self._more()
        if buf[:3] == b".\r\n":  # empty body
            del buf[:3]
            return b".\r\n"
        scan = 0
        while True:
            end = buf.find(TERMINATOR, scan)
            if end >= 0:
                body = bytes(buf[: end + 5])
                del buf[: end + 5]
                return body
            scan = max(0, len(buf) - 4)
            await self._more()

    # ----------------------------------------------------------------- commands
    async def command(self, line: str) -> bytes:
        self.send(line.encode() + b"\r\n")
        return await self._status()

    async def multiline(self, line: str) -> tuple[bytes, bytes]:
        """(status line, body as sent: dot-stuffed, terminator included)."""
        self.send(line.encode() + b"\r\n")
        status = await self._status()
        return status, await self._body()

    async def read_multiline(self) -> tuple[bytes, bytes]:
        """The next multi-line response, for pipelined commands sent with :meth:`send`."""
        status = await self._status()
        return status, await self._body()

    async def login(self, user: str, password: str) -> None:
        await self.command(f"USER {user}")
        await self.command(f"PASS {password}")

    async def quit(self) -> None:
        await self.command("QUIT")
        self.close()

    def close(self) -> None:
        transport = self._r.transport
        if transport is not None:
            transport.close()

    async def __aenter__(self) -> PopClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.close()


def pipelined_retr(numbers: Sequence[int]) -> bytes:
    """All RETR commands as one write (RFC 2449 PIPELINING)."""
    return b"".join(b"RETR %d\r\n" % n for n in numbers)


def parse_uidl(body: bytes) -> list[tuple[int, str]]:
    """``1 abc\\r\\n2 def\\r\\n.\\r\\n`` → [(1, "abc"), (2, "def")]."""
    out = []
    for line in body[:-3].split(b"\r\n"):
        if line:
            number, _, uid = line.partition(b" ")
            out.append((int(number), uid.decode("ascii")))
    return out
