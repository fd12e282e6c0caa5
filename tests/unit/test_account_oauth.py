"""AUTHENTICATE XOAUTH2 / OAUTHBEARER on the wire (StringTransport): SASL-IR or the
continuation, the answered error challenge, and which refusal is a refused token."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from gateway.config import ImapUpstream
from gateway.upstream.account import ImapAccount, LoginRejected, TokenRejected, UpstreamUnavailable
from gateway.upstream.imap_client import ImapClientProtocol

SETTINGS = ImapUpstream(host="imap.example.com", port=993, auth="oauth2")
XOAUTH2 = base64.b64encode(b"user=alice\x01auth=Bearer tok\x01\x01")
BEARER = base64.b64encode(
    b"n,a=alice,\x01host=imap.example.com\x01port=993\x01auth=Bearer tok\x01\x01"
)


def challenge(status: str) -> bytes:
    return b"+ " + base64.b64encode(b'{"status":"%s","schemes":"bearer"}' % status.encode())


def login(caps: str, mechanism: str) -> tuple[Deferred[None], ImapClientProtocol, StringTransport]:
    proto = ImapClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(f"* OK [CAPABILITY IMAP4rev1 {caps}] ready\r\n".encode())
    account = ImapAccount(proto)
    d = Deferred.fromCoroutine(account._login_oauth("alice", "tok", mechanism, SETTINGS, None))
    return d, proto, transport


def sent(transport: StringTransport) -> bytes:
    value = transport.value()
    transport.clear()
    return value


def failure_of(d: Deferred[Any]) -> BaseException:
    errors: list[BaseException] = []
    d.addErrback(lambda f: errors.append(f.value))
    assert errors, "expected a failure"
    return errors[0]


def test_sasl_ir_success() -> None:
    d, proto, transport = login("SASL-IR AUTH=XOAUTH2", "xoauth2")
    assert sent(transport) == b"G1 AUTHENTICATE XOAUTH2 " + XOAUTH2 + b"\r\n"
    proto.dataReceived(b"G1 OK Logged in\r\n")
    assert d.called and d.result is None
    assert sent(transport) == b""  # nothing more: the pending empty reply is dropped


def test_sasl_ir_error_challenge_is_answered_and_means_a_refused_token() -> None:
    d, proto, transport = login("SASL-IR AUTH=XOAUTH2", "xoauth2")
    sent(transport)
    proto.dataReceived(challenge("401") + b"\r\n")
    assert sent(transport) == b"\r\n"  # XOAUTH2: the empty response
    proto.dataReceived(b"G1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert isinstance(failure_of(d), TokenRejected)


def test_continuation_then_oauthbearer_error_reply() -> None:
    d, proto, transport = login("AUTH=OAUTHBEARER", "oauthbearer")
    assert sent(transport) == b"G1 AUTHENTICATE OAUTHBEARER\r\n"
    proto.dataReceived(b"+ \r\n")
    assert sent(transport) == BEARER + b"\r\n"
    proto.dataReceived(challenge("invalid_token") + b"\r\n")
    assert sent(transport) == b"AQ==\r\n"  # OAUTHBEARER: a single ^A
    proto.dataReceived(b"G1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    assert isinstance(failure_of(d), TokenRejected)


def test_continuation_success() -> None:
    d, proto, transport = login("AUTH=XOAUTH2", "xoauth2")
    assert sent(transport) == b"G1 AUTHENTICATE XOAUTH2\r\n"
    proto.dataReceived(b"+ \r\n")
    assert sent(transport) == XOAUTH2 + b"\r\n"
    proto.dataReceived(b"G1 OK Logged in\r\n")
    assert d.called and d.result is None


def test_insufficient_scope_is_not_a_refused_token() -> None:
    d, proto, _transport = login("SASL-IR AUTH=OAUTHBEARER", "oauthbearer")
    proto.dataReceived(challenge("insufficient_scope") + b"\r\n")
    proto.dataReceived(b"G1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    error = failure_of(d)
    assert isinstance(error, LoginRejected) and not isinstance(error, TokenRejected)


def test_a_temporary_refusal_is_unavailable() -> None:
    d, proto, _transport = login("SASL-IR AUTH=XOAUTH2", "xoauth2")
    proto.dataReceived(b"G1 NO [UNAVAILABLE] Temporary authentication failure.\r\n")
    assert isinstance(failure_of(d), UpstreamUnavailable)


@pytest.mark.parametrize("caps", ["SASL-IR AUTH=PLAIN", "AUTH=OAUTHBEARER"])
def test_a_mechanism_not_offered_is_unavailable_and_nothing_is_sent(caps: str) -> None:
    d, _proto, transport = login(caps, "xoauth2")
    assert isinstance(failure_of(d), UpstreamUnavailable)
    assert sent(transport) == b""


def test_a_token_that_would_break_the_line_is_never_sent() -> None:
    proto = ImapClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n")
    coroutine = ImapAccount(proto)._login_oauth(
        "alice", "t\r\nG9 LOGOUT", "xoauth2", SETTINGS, None
    )
    d = Deferred.fromCoroutine(coroutine)
    assert isinstance(failure_of(d), LoginRejected)
    assert transport.value() == b""
