"""Sample messages for seeding test and demo mailboxes.

Every builder returns the raw bytes to APPEND, already with CRLF line ends, so that what
the IMAP server returns for ``BODY[]`` is byte-for-byte the same (imaplib would turn bare
LF into CRLF on APPEND anyway).
"""

from __future__ import annotations

import base64
import random

_CRLF = b"\r\n"


def crlf(text: str | bytes) -> bytes:
    """Encode ``text`` as UTF-8 (if needed) and make every line end CRLF."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return data.replace(b"\r\n", b"\n").replace(b"\n", _CRLF)


def _headers(subject: str, *, msg_id: str, extra: str = "") -> str:
    return (
        "From: Sender <sender@example.test>\n"
        "To: Recipient <rcpt@example.test>\n"
        f"Subject: {subject}\n"
        "Date: Mon, 02 Mar 2026 10:00:00 +0000\n"
        f"Message-ID: <{msg_id}@example.test>\n"
        "MIME-Version: 1.0\n"
        f"{extra}"
    )


def plain(subject: str = "Hello", body: str = "Hello.\nSecond line.\n", *, n: int = 1) -> bytes:
    """A small text/plain message."""
    return crlf(
        _headers(subject, msg_id=f"plain-{n}")
        + "Content-Type: text/plain; charset=us-ascii\n\n"
        + body
    )


def dotted() -> bytes:
    """Lines starting with "." and "..", a lone "." and " ." (POP3 dot-stuffing)."""
    body = (
        "Dot-stuffing check.\n"
        ".\n"
        "..\n"
        ".leading dot\n"
        "..two leading dots\n"
        "...three\n"
        " .space then dot\n"
        ".\n"
        "last line\n"
    )
    return crlf(
        _headers("Dots", msg_id="dotted") + "Content-Type: text/plain; charset=us-ascii\n\n" + body
    )


def no_final_newline() -> bytes:
    """The body does not end with a line break."""
    return crlf(
        _headers("No final newline", msg_id="nonl")
        + "Content-Type: text/plain; charset=us-ascii\n\n"
        + "first line\nthe last line has no newline"
    )


def utf8_8bit() -> bytes:
    """8-bit UTF-8 in the body (Content-Transfer-Encoding: 8bit) and an RFC 2047 subject."""
    body = "Grüße aus Köln — ½ € ✓\n日本語のテキスト\nΕλληνικά, русский, emoji 📬\n"  # noqa: RUF001
    return crlf(
        _headers("=?UTF-8?Q?Gr=C3=BC=C3=9Fe?=", msg_id="utf8")
        + "Content-Type: text/plain; charset=utf-8\n"
        + "Content-Transfer-Encoding: 8bit\n\n"
        + body
    )


def with_attachment(size: int = 300 * 1024, *, name: str = "data.bin", seed: int = 1) -> bytes:
    """multipart/mixed with a text part and a base64 attachment of ``size`` raw bytes
    (about 4/3 of that on the wire)."""
    payload = random.Random(seed).randbytes(size)
    b64 = base64.encodebytes(payload).decode("ascii")  # 76-column lines, LF ends
    boundary = "=_popgate_boundary_42"
    text = (
        _headers("Attachment", msg_id=f"attach-{seed}")
        + f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n'
        + "This is a multi-part message in MIME format.\n\n"
        + f"--{boundary}\n"
        + "Content-Type: text/plain; charset=us-ascii\n\n"
        + "See the attached file.\n\n"
        + f"--{boundary}\n"
        + f'Content-Type: application/octet-stream; name="{name}"\n'
        + "Content-Transfer-Encoding: base64\n"
        + f'Content-Disposition: attachment; filename="{name}"\n\n'
        + b64
        + f"\n--{boundary}--\n"
    )
    return crlf(text)


def corpus() -> list[bytes]:
    """The standard set used by the real-client tests."""
    return [
        plain("First", n=1),
        dotted(),
        with_attachment(),
        no_final_newline(),
        utf8_8bit(),
        plain("Last", "Bye.\n", n=2),
    ]


def demo_corpus() -> list[bytes]:
    """A handful of messages for ``./tests/demo``."""
    return [
        plain("Welcome to the popgate demo", "This message lives in IMAP; you read it by POP3.\n"),
        plain("A second plain message", "Nothing special here.\nJust two lines.\n", n=2),
        with_attachment(20 * 1024, name="report.bin"),
        dotted(),
        utf8_8bit(),
    ]
