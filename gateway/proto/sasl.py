"""SASL decoding shared by POP3 ``AUTH`` and SMTP ``AUTH`` (RFC 4616 PLAIN, the LOGIN
mechanism's base64 lines): one implementation, so both listeners accept and refuse exactly the
same credentials. And the client side of XOAUTH2 / OAUTHBEARER for the upstream logins with
OAuth 2.0 tokens. No I/O; errors carry the text the client is told.
"""

from __future__ import annotations

import base64
import binascii
import json
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


# -- client side: OAuth 2.0 bearer tokens upstream ------------------------------------------
#
# XOAUTH2 (Google, https://developers.google.com/gmail/imap/xoauth2-protocol; Microsoft,
# https://learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth)
# and OAUTHBEARER (RFC 7628). Both send the token in the initial response; a server that refuses
# it sends one challenge holding a JSON error, which the client must answer (XOAUTH2: an empty
# response, OAUTHBEARER: a single ^A) before the server ends the exchange with its failure.

OAUTH_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
# RFC 6750 2.1 b64token: what a bearer token may hold. Anything else could break the framing.
_B64TOKEN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/")
# An error challenge larger than this is not an OAuth error status: nobody's is.
MAX_ERROR_CHALLENGE = 4096


class UnusableCredential(ValueError):
    """A user name or token that cannot be framed in the mechanism (control characters, a token
    outside RFC 6750's b64token). The message never contains the token."""


def _check_token(token: str) -> bytes:
    raw = token.encode("ascii", "replace")
    body = raw.rstrip(b"=")
    if not body or not set(body) <= _B64TOKEN:
        raise UnusableCredential("access token is not an RFC 6750 b64token")
    return raw


def _check_user(user: str) -> bytes:
    raw = user.encode("utf-8")
    if not raw or any(b < 0x20 or b == 0x7F for b in raw):
        raise UnusableCredential("user name is empty or holds control characters")
    return raw


def xoauth2_response(user: str, token: str) -> bytes:
    """The XOAUTH2 initial client response, before base64: ``user=U^Aauth=Bearer T^A^A``."""
    return b"user=" + _check_user(user) + b"\x01auth=Bearer " + _check_token(token) + b"\x01\x01"


def _saslname(user: bytes) -> bytes:
    """RFC 5801 saslname: ``,`` and ``=`` escaped as ``=2C`` and ``=3D``."""
    return user.replace(b"=", b"=3D").replace(b",", b"=2C")


def oauthbearer_response(user: str, token: str, host: str = "", port: int = 0) -> bytes:
    """The RFC 7628 initial client response, before base64:
    ``n,a=U,^Ahost=H^Aport=P^Aauth=Bearer T^A^A`` (host and port when given)."""
    pairs = b""
    if host:
        pairs += b"host=" + _check_user(host) + b"\x01"
    if port:
        pairs += b"port=%d\x01" % port
    gs2 = b"n,a=" + _saslname(_check_user(user)) + b","
    return gs2 + b"\x01" + pairs + b"auth=Bearer " + _check_token(token) + b"\x01\x01"


def oauth_response(mechanism: str, user: str, token: str, host: str = "", port: int = 0) -> bytes:
    """The initial response of ``mechanism`` (one of OAUTH_MECHANISMS, any case)."""
    name = mechanism.upper()
    if name == "XOAUTH2":
        return xoauth2_response(user, token)
    if name == "OAUTHBEARER":
        return oauthbearer_response(user, token, host, port)
    raise ValueError(f"not an OAuth SASL mechanism: {mechanism}")


def oauth_error_reply(mechanism: str) -> bytes:
    """What the client answers to an error challenge (before base64), so the server can end the
    exchange: XOAUTH2 an empty response, OAUTHBEARER a single ^A (RFC 7628 3.2.3)."""
    return b"\x01" if mechanism.upper() == "OAUTHBEARER" else b""


@dataclass(frozen=True, slots=True)
class OAuthFailure:
    """A server's error challenge (RFC 7628 3.2.2; XOAUTH2 sends the same JSON).

    ``status`` is an RFC 6749/6750 error code (``invalid_token``) or, from XOAUTH2 servers, an
    HTTP status ("401", Google also "400"); "" when the challenge was not such a JSON object.
    """

    status: str
    scope: str = ""

    @property
    def token_rejected(self) -> bool:
        """The token itself was refused (expired, revoked, unknown): a fresh one may work.
        Other statuses (``insufficient_scope``, "403") mean a fresh token would be refused too."""
        return self.status.lower() in ("invalid_token", "401", "400")


def parse_oauth_challenge(challenge: bytes | str) -> OAuthFailure:
    """The server's error challenge, still base64 (as it came after ``+ `` or ``334 ``)."""
    text = challenge.encode("ascii", "replace") if isinstance(challenge, str) else challenge
    if len(text) > MAX_ERROR_CHALLENGE * 2:
        return OAuthFailure("")
    try:
        decoded = base64.b64decode(text.strip(), validate=True)
        document = json.loads(decoded.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return OAuthFailure("")
    if not isinstance(document, dict):
        return OAuthFailure("")
    status, scope = document.get("status"), document.get("scope")
    return OAuthFailure(
        str(status) if isinstance(status, str | int) else "",
        scope if isinstance(scope, str) else "",
    )
