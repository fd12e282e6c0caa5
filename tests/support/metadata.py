"""Reading IMAP METADATA (RFC 5464) in tests, independently of popgate's own IMAP client.

imaplib has no GETMETADATA, so the command goes out raw on a logged-in imaplib connection and
the ``* METADATA`` answer is parsed here (entry names as atoms or quoted strings, values as
quoted strings, literals or NIL).
"""

from __future__ import annotations

import imaplib
import re

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
_TOKEN = re.compile(rb'\s*(?:"((?:[^"\\]|\\.)*)"|([^\s()"]+)|(\()|(\)))')


def _read_response(conn: imaplib.IMAP4, tag: bytes) -> list[bytes]:
    """Untagged lines (literals inlined as ``\\0LIT<n>\\0`` markers are avoided: kept raw)."""
    lines = []
    while True:
        line = conn.readline()
        while (m := _LITERAL.search(line)) is not None:
            size = int(m.group(1))
            line = line[: m.start()] + b"\x00" + conn.read(size) + b"\x00" + conn.readline()
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1 :].startswith(b"OK"):
                raise AssertionError(f"IMAP command failed: {line!r}")
            return lines
        lines.append(line)


def _pairs(body: bytes) -> list[tuple[bytes, bytes | None]]:
    """``entry value entry value`` inside the parentheses; literals were marked with NULs."""
    out: list[bytes | None] = []
    pos = 0
    while pos < len(body):
        if body[pos : pos + 1] in (b" ", b"\r", b"\n", b"(", b")"):
            pos += 1
            continue
        if body[pos : pos + 1] == b"\x00":
            end = body.index(b"\x00", pos + 1)
            out.append(body[pos + 1 : end])
            pos = end + 1
            continue
        m = _TOKEN.match(body, pos)
        assert m, body[pos:]
        if m.group(1) is not None:
            out.append(re.sub(rb"\\(.)", rb"\1", m.group(1)))
        else:
            atom = m.group(2)
            out.append(None if atom.upper() == b"NIL" else atom)
        pos = m.end()
    return [(out[i] or b"", out[i + 1]) for i in range(0, len(out) - 1, 2)]


def get_metadata(conn: imaplib.IMAP4, mailbox: str, entry: str) -> dict[str, bytes]:
    """Every entry at or below ``entry`` of ``mailbox`` (DEPTH infinity) with its value."""
    tag = conn._new_tag()  # type: ignore[attr-defined]
    conn.send(tag + f' GETMETADATA (DEPTH infinity) "{mailbox}" "{entry}"\r\n'.encode())
    found: dict[str, bytes] = {}
    for line in _read_response(conn, tag):
        if not line.upper().startswith(b"* METADATA "):
            continue
        body = line[line.index(b"(") :]
        for name, value in _pairs(body):
            if value is not None:
                found[name.decode()] = value
    return found


def set_metadata(conn: imaplib.IMAP4, mailbox: str, values: dict[str, bytes | None]) -> None:
    """SETMETADATA with every value as a non-synchronizing literal (or NIL)."""
    tag = conn._new_tag()  # type: ignore[attr-defined]
    parts = []
    for name, value in values.items():
        if value is None:
            parts.append(f'"{name}" NIL'.encode())
        else:
            parts.append(f'"{name}" {{{len(value)}+}}\r\n'.encode() + value)
    conn.send(tag + f' SETMETADATA "{mailbox}" ('.encode() + b" ".join(parts) + b")\r\n")
    _read_response(conn, tag)
