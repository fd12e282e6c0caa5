"""Streaming transforms for POP3 multi-line bodies (RFC 1939 section 3).

Messages arrive from IMAP in chunks of arbitrary size and are written to the POP client as they
arrive, so every transform here keeps the little state a chunk boundary needs (was the last byte a
line feed?) and never the message itself.
"""

from __future__ import annotations

TERMINATOR = b".\r\n"


class DotStuffer:
    """Byte-stuffs a message body and frames its end.

    A line that begins with "." gets a second one, so the client never mistakes it for the end of
    the response. Lines are taken to start after every LF, bare or not: a lenient client that splits
    on LF must not see a premature terminator either.
    """

    __slots__ = ("_at_line_start",)

    def __init__(self) -> None:
        self._at_line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        # This runs over every byte a device downloads, so it is built from the fastest C
        # loops bytes offers. Most octets of a mailbox are base64 attachments, which never
        # contain a ".": memrchr finds the last dot, and only the part up to it is searched
        # for line starts. split + join is one search pass where replace needs two.
        last_dot = chunk.rfind(b".")
        if last_dot < 0:
            stuffed = chunk
        elif last_dot < len(chunk) // 2:
            head = chunk[: last_dot + 1]
            stuffed = b"\n..".join(head.split(b"\n.")) + chunk[last_dot + 1 :]
        else:
            stuffed = b"\n..".join(chunk.split(b"\n."))
        if self._at_line_start and chunk[0] == 0x2E:
            stuffed = b"." + stuffed
        self._at_line_start = chunk[-1] == 0x0A
        return stuffed

    def finish(self) -> bytes:
        """The terminator, preceded by a CRLF when the body did not end a line itself."""
        return TERMINATOR if self._at_line_start else b"\r\n" + TERMINATOR


class TopFilter:
    """Passes the header, the blank line after it and then ``lines`` body lines (POP3 TOP)."""

    __slots__ = ("_done", "_in_header", "_lines_left", "_prev")

    def __init__(self, lines: int) -> None:
        self._in_header = True
        self._lines_left = lines
        # The last bytes seen, to find a blank line split across chunks; a virtual line feed
        # before the message lets an empty header (a message starting with CRLF) be found.
        self._prev = b"\n"
        self._done = False

    @property
    def done(self) -> bool:
        """True once everything TOP asked for has passed; later chunks are dropped."""
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        if self._done or not chunk:
            return b""
        start = 0
        if self._in_header:
            end = _header_end(self._prev, chunk)
            if end < 0:
                self._prev = (self._prev + chunk)[-3:]
                return chunk
            self._in_header = False
            start = end
            if self._lines_left == 0:
                self._done = True
                return chunk[:end]
        pos = start
        while self._lines_left > 0:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                return chunk
            pos = nl + 1
            self._lines_left -= 1
        self._done = True
        return chunk[:pos]


def _header_end(prev: bytes, chunk: bytes) -> int:
    """Index in ``chunk`` just past the header's terminating blank line, or -1.

    ``prev`` holds the last bytes of the previous chunk so a blank line split across two chunks
    is still found. A message that starts with a blank line has an empty header.
    """
    data = prev + chunk
    best = -1
    for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        i = data.find(sep)
        if i >= 0 and (best < 0 or i + len(sep) < best):
            best = i + len(sep)
    if best < 0:
        return -1
    return best - len(prev)
