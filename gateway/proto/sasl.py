"""SASL decoding shared by POP3 ``AUTH`` and SMTP ``AUTH`` (RFC 4616 PLAIN, the LOGIN
mechanism's base64 lines). One implementation, so both listeners accept and refuse exactly the
same credentials. No I/O; errors carry the text the client is told.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field


class SaslError(Exception):
    """A client response that cannot be used; ``text`` is what the client is told."""

    text = "Malformed authentication response"

    def __init__(self) -> None:
        super().__init__(self.text)


class Cancelled(SaslError):
    text = "Authentication cancelled"


class InvalidBase64(SaslError):
    text = "Invalid base64 in authentication response"


class MalformedPlain(SaslError):
    text = "Malformed PLAIN authentication response"


class NotUtf8(SaslError):
    text = "Credentials are not valid UTF-8"


class ForeignIdentity(SaslError):
    """PLAIN with an authorization identity other than the user: acting for someone else."""

    text = "Acting as another user is not allowed"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)  # never logged


def decode_base64(response: bytes | str) -> bytes:
    """One base64 client response (RFC 4422); ``=`` is the empty response, ``*`` cancels."""
    text = response.encode("ascii", "replace") if isinstance(response, str) else response
    text = text.strip()
    if text == b"*":
        raise Cancelled()
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64() from None


def decode_text(response: bytes | str) -> str:
    """A base64 response that must hold UTF-8 text (a LOGIN user name or password)."""
    try:
        return decode_base64(response).decode("utf-8")
    except UnicodeDecodeError:
        raise NotUtf8() from None


def decode_plain(response: bytes | str) -> Credentials:
    """RFC 4616 PLAIN from its base64 client response."""
    return parse_plain(decode_base64(response))


def parse_plain(message: bytes) -> Credentials:
    """RFC 4616: ``authzid NUL authcid NUL passwd``, already base64-decoded. An authorization
    identity is accepted only when it names the user itself."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise MalformedPlain()
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise NotUtf8() from None
    if authzid and authzid != authcid:
        raise ForeignIdentity()
    return Credentials(authcid, password)
