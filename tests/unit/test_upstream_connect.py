"""How long popgate waits for the upstream IMAP server to greet a new connection."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import ImapUpstream, TLSSettings
from gateway.tls import generate_self_signed, server_context_factory
from gateway.transports import _socket_of
from gateway.upstream.account import ImapAccount, UpstreamUnavailable, connect


def test_the_greeting_waits_as_long_as_any_imap_response() -> None:
    """A burst of logins can keep a server that forks a login process per connection from
    greeting within the TCP connect timeout (15 s); the greeting (with the TLS handshake before
    it) is an IMAP response, bounded by [upstream.imap] timeout."""
    reactor = MemoryReactorClock()
    settings = ImapUpstream(host="127.0.0.1", port=143, security="none", timeout=60)
    connecting = Deferred.fromCoroutine(connect(reactor, settings))
    _, _, factory, _, _ = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)  # connected; the server says nothing yet
    reactor.advance(59)
    assert not connecting.called
    reactor.advance(2)
    failure = connecting.result  # type: ignore[attr-defined]
    connecting.addErrback(lambda f: None)
    assert isinstance(failure.value, UpstreamUnavailable)
    assert "no greeting from IMAP server 127.0.0.1 within 60s" in str(failure.value)
    assert transport.disconnecting or transport.disconnected


def test_a_login_without_an_answer_is_an_unavailable_upstream() -> None:
    """The login's own deadline (60 s) ends as UpstreamUnavailable (`-ERR [SYS/TEMP]`), not as
    an unexpected error (seen with 2,000 devices at once: Twisted's TimeoutError escaped)."""
    reactor = MemoryReactorClock()
    settings = ImapUpstream(host="127.0.0.1", port=143, security="none", timeout=0)
    opening = Deferred.fromCoroutine(ImapAccount.open(reactor, settings, "alice", "secret"))
    _, _, factory, _, _ = reactor.tcpClients[0]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
    assert b"AUTHENTICATE PLAIN" in transport.value()  # the login went out; no answer comes
    reactor.advance(61)
    failure = opening.result  # type: ignore[attr-defined]
    opening.addErrback(lambda f: None)
    assert isinstance(failure.value, UpstreamUnavailable)
    assert str(failure.value) == "no login answer within 60s"


class _Greeter(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")


@pytest.mark.parametrize("security", ["none", "tls"])
@pytest_twisted.ensureDeferred
async def test_pipelined_commands_are_not_held_back_by_nagle(security: str, tmp_path: Path) -> None:
    """The gateway pipelines commands written one by one (STATUS, EXAMINE, FETCH at a login).
    With Nagle's algorithm each would wait for the ACK of the one before: a round trip apart
    over a real network. The upstream socket has TCP_NODELAY, in clear and over TLS."""
    factory = ServerFactory.forProtocol(_Greeter)
    if security == "tls":
        pair = TLSSettings(cert_file=tmp_path / "c.crt", key_file=tmp_path / "c.key")
        generate_self_signed("localhost", pair.cert_file, pair.key_file)
        contexts = server_context_factory(pair, "TLSv1.2")
        port = reactor.listenSSL(0, factory, contexts, interface="127.0.0.1")
        settings = ImapUpstream(
            host="127.0.0.1",
            port=port.getHost().port,
            security="tls",
            verify_certificate=False,
            timeout=10,
        )
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        settings = ImapUpstream(
            host="127.0.0.1", port=port.getHost().port, security="none", timeout=10
        )
    try:
        proto = await connect(reactor, settings)
        sock = _socket_of(proto.transport)
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        proto.transport.abortConnection()  # type: ignore[union-attr]
    finally:
        await port.stopListening()
