"""Clients that misbehave the way devices on real networks do, for tests of the listeners.

    reader = SlowReader(sock, rate=200_000)        # takes at most 200 kB/s, in its own thread
    reader.wait_for(64 * 1024)                     # event: that much has arrived
    reader.wait_eof(timeout=30)                    # event: the server closed or reset
    flood = Flooder(sock, total=200 * 2**20)       # sends junk as fast as the server takes it
    flood.wait_stalled(timeout=30)                 # event: the server stopped reading
    vanished = Vanished(); vanished.keep(sock)     # never sends, reads or closes again (no FIN)
    process_rss(pid)                               # the server's resident memory, in bytes

Every wait has a deadline and raises ``TimeoutError`` when it passes. Threads are daemons and
stop when their socket is closed. The rate of ``SlowReader`` is the client's pace, not a wait
for an event: tests assert on what arrives, never on how long something took.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from pathlib import Path

__all__ = ["Flooder", "SlowReader", "Vanished", "process_rss", "small_window_socket"]


def small_window_socket(
    host: str, port: int, rcvbuf: int = 4096, timeout: float = 15.0
) -> socket.socket:
    """A connected socket whose receive buffer (and so TCP window) is small: what the client
    does not read stays on the server's side instead of in this process's kernel buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


class SlowReader:
    """Reads ``sock`` at no more than ``rate`` bytes per second until EOF or a reset."""

    def __init__(self, sock: socket.socket, rate: int, chunk: int = 4096) -> None:
        self.sock = sock
        self.rate = rate
        self.chunk = chunk
        self.data = bytearray()
        self.reset = False  # the connection ended with an error (RST) rather than a FIN
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        self.sock.settimeout(None)
        try:
            while True:
                # Pace: never ahead of rate * elapsed.
                ahead = len(self.data) / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
                chunk = self.sock.recv(self.chunk)
                if not chunk:
                    break
                with self._cond:
                    self.data += chunk
                    self._cond.notify_all()
        except OSError:
            self.reset = True
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_for(self, size: int, timeout: float = 15.0) -> None:
        """Until at least ``size`` bytes have arrived (TimeoutError, or EOFError if closed)."""
        self._wait(lambda: len(self.data) >= size or self._eof, timeout, f"{size} bytes")
        if len(self.data) < size:
            raise EOFError(f"closed after {len(self.data)} of {size} bytes")

    def wait_eof(self, timeout: float = 30.0) -> bytes:
        """Until the server closes or resets the connection; returns everything received."""
        self._wait(lambda: self._eof, timeout, "the end of the connection")
        self._thread.join(timeout)
        return bytes(self.data)

    def _wait(self, condition: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():  # type: ignore[operator]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{what} not reached within {timeout}s ({len(self.data)} bytes so far)"
                    )
                self._cond.wait(remaining)


class Flooder:
    """Sends ``total`` bytes of ``pattern`` to ``sock`` as fast as the server takes them,
    never reading. ``sent`` counts what the kernel accepted."""

    def __init__(
        self, sock: socket.socket, total: int, pattern: bytes = b"NOOP\r\n", chunk: int = 1 << 16
    ) -> None:
        self.sock = sock
        self.total = total
        self.sent = 0
        self.error: OSError | None = None
        self._block = (pattern * (chunk // len(pattern) + 1))[:chunk]
        self._cond = threading.Condition()
        self._blocked_since: float | None = None  # when the current send started waiting
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.setblocking(False)
        try:
            while self.sent < self.total:
                try:
                    n = self.sock.send(self._block[: self.total - self.sent])
                except BlockingIOError:
                    with self._cond:
                        if self._blocked_since is None:
                            self._blocked_since = time.monotonic()
                        self._cond.notify_all()
                    select.select([], [self.sock], [], 0.1)
                    continue
                with self._cond:
                    self.sent += n
                    self._blocked_since = None
                    self._cond.notify_all()
        except OSError as e:
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def wait_stalled(self, quiet: float = 1.0, timeout: float = 60.0) -> bool:
        """Until the server has taken nothing for ``quiet`` seconds (True: it stopped reading)
        or the whole flood went through or failed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._done:
                since = self._blocked_since
                now = time.monotonic()
                if since is not None and now - since >= quiet:
                    return True
                if now >= deadline:
                    raise TimeoutError(f"flood neither stalled nor finished; sent {self.sent}")
                self._cond.wait(min(0.1, deadline - now))
        return False

    def stop(self) -> None:
        """End the flood (closes the socket)."""
        self.total = self.sent
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(10)


class Vanished:
    """Sockets of clients that silently went away (NAT drop, pulled cable): kept open, never
    read, written or closed until the test ends, so the server sees no FIN and no RST. (The
    kernel still acknowledges what the server sends, so only the server's own rules, not TCP
    keepalive, can tell such a client from a slow one.)"""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []

    def keep(self, sock: socket.socket) -> None:
        self._sockets.append(sock)

    def __enter__(self) -> Vanished:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def process_rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def process_fds(pid: int) -> int:
    """Open file descriptors of process ``pid``."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))
