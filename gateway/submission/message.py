"""What the gateway does to a submitted message, as pure functions on bytes (no I/O).

- line ends are made CRLF (bare LF/CR would be read differently by different servers: SMTP
  smuggling upstream, a refused APPEND on Cyrus);
- a Message-ID is added when the client sent none (RFC 6409 section 8.3), so the relayed message
  and its Sent copy carry the same one and a retried Sent copy can be recognised;
- the Sent copy gets a ``Bcc:`` field for recipients that appear only in the envelope, so the
  user can later see everyone the message went to. The relayed message never carries it.

Headers are handled as bytes: a device may send raw 8-bit header text, and a copy must keep
every byte it does not mean to change.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Sequence
from email.utils import getaddresses

CRLF = b"\r\n"
_LINE_END = re.compile(rb"\r\n|\n|\r")
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
# Fields whose addresses count as "visible" recipients (RFC 5322 3.6.3 and 3.6.6).
VISIBLE_RECIPIENT_FIELDS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")
# Folded header lines stay under the RFC 5322 recommendation of 78 characters where possible.
FOLD_AT = 78


class MessageRefused(ValueError):
    """Mail cannot carry this message; ``reply`` is the SMTP reply that says why."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def normalize_line_endings(data: bytes) -> bytes:
    """Every line ends with CRLF, the last one included (RFC 5322 2.3: CR and LF only together)."""
    normalized = _LINE_END.sub(CRLF, data)
    if normalized and not normalized.endswith(CRLF):
        normalized += CRLF
    return normalized


def check_content(data: bytes) -> None:
    """Refuse what no mail store can keep: NUL is not allowed in mail (RFC 5322 2.3, RFC 6152)."""
    if b"\0" in data:
        raise MessageRefused("554 5.6.0 Message contains NUL characters, which mail cannot carry")


def split_header(message: bytes) -> tuple[bytes, bytes]:
    """``(header, body)``; the header keeps its last CRLF, the body starts after the empty line.

    A message that starts with an empty line has no header; one without an empty line is all
    header (RFC 5322 allows a message without a body).
    """
    if message.startswith(CRLF):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 4 :]


def join_header(header: bytes, body: bytes) -> bytes:
    return header + CRLF + body


def header_fields(header: bytes) -> list[tuple[str, bytes]]:
    """The fields of ``header`` in order, as ``(lower-case name, raw bytes incl. folds)``.

    Lines that are neither a field nor a continuation are kept as nameless entries, so joining
    all raw parts gives back ``header`` unchanged.
    """
    fields: list[tuple[str, bytes]] = []
    for line in header.split(CRLF)[:-1] if header else []:
        raw = line + CRLF
        if line[:1] in (b" ", b"\t") and fields:
            name, previous = fields[-1]
            fields[-1] = (name, previous + raw)
            continue
        match = _FIELD_NAME.match(line)
        fields.append((match.group(1).decode("ascii").lower() if match else "", raw))
    return fields


def field_value(raw: bytes) -> str:
    """The unfolded value of one raw field, decoded leniently (8-bit header text survives)."""
    _, _, value = raw.partition(b":")
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", value).rstrip(b"\r\n")
    return unfolded.decode("utf-8", "surrogateescape").strip()


def header_values(message: bytes, name: str) -> list[str]:
    header, _ = split_header(message)
    wanted = name.lower()
    return [field_value(raw) for field, raw in header_fields(header) if field == wanted]


def message_id(message: bytes) -> str | None:
    """The Message-ID field's value (``<...>``), or None when there is none or it is empty."""
    for value in header_values(message, "message-id"):
        if value:
            return value
    return None


def new_message_id(sender: str, hostname: str) -> str:
    """``<time.random@domain>``: the sender's domain when it has one (what most MSAs do)."""
    _, _, domain = sender.rpartition("@")
    domain = domain.strip("<>[] ") or hostname
    if not re.fullmatch(r"[A-Za-z0-9.-]+", domain):
        domain = hostname
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime())}.{secrets.token_hex(8)}@{domain}>"


def ensure_message_id(message: bytes, make_id: str) -> tuple[bytes, str, bool]:
    """``(message, message_id, added)``: a Message-ID field is appended to the header if the
    message has none, using ``make_id``."""
    existing = message_id(message)
    if existing is not None:
        return message, existing, False
    header, body = split_header(message)
    field = b"Message-ID: " + make_id.encode("ascii") + CRLF
    if not header and not body:
        return field, make_id, True
    return join_header(header + field, body), make_id, True


def _addresses(values: Iterable[str]) -> set[str]:
    found = set()
    for _name, address in getaddresses(list(values)):
        if "@" in address:
            found.add(address.strip().lower())
    return found


def envelope_only(recipients: Sequence[str], message: bytes) -> list[str]:
    """The envelope recipients that no To/Cc/Bcc (or Resent-) field names: the blind copies.

    Addresses compare case-insensitively (local parts are case-sensitive on paper, but no real
    mailbox relies on it, and a false "visible" would lose the record). Order and the client's
    spelling are kept; duplicates go.
    """
    header, _ = split_header(message)
    visible = _addresses(
        field_value(raw) for name, raw in header_fields(header) if name in VISIBLE_RECIPIENT_FIELDS
    )
    seen: set[str] = set()
    hidden = []
    for rcpt in recipients:
        key = rcpt.strip().lower()
        if key and key not in visible and key not in seen:
            seen.add(key)
            hidden.append(rcpt.strip())
    return hidden


def _fold(start: bytes, addresses: Sequence[str]) -> bytes:
    """``start`` followed by the addresses, comma separated, folded before ``FOLD_AT``."""
    out, line = b"", start
    for i, address in enumerate(addresses):
        piece = address.encode("utf-8", "surrogateescape")
        if i < len(addresses) - 1:
            piece += b","
        if len(line) + 1 + len(piece) > FOLD_AT and line.strip():
            out += line + CRLF
            line = b""
        line += b" " + piece
    return out + line + CRLF


def sent_copy(message: bytes, bcc: Sequence[str]) -> bytes:
    """The copy for the Sent mailbox: ``message`` with the blind recipients in a Bcc field.

    RFC 5322 allows one Bcc field: an existing one is extended, else one is appended to the
    header. Nothing else changes.
    """
    if not bcc:
        return message
    header, body = split_header(message)
    fields = header_fields(header)
    for index, (name, raw) in enumerate(fields):
        if name == "bcc":
            kept = raw[:-2]
            if field_value(raw):
                kept += b","
            fields[index] = (name, _fold(kept, bcc))
            return join_header(b"".join(r for _, r in fields), body)
    return join_header(header + _fold(b"Bcc:", bcc), body)
