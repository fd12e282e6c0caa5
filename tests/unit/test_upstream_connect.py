"""How long popgate waits for the upstream IMAP server to greet a new connection."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import ImapUpstream
from gateway.upstream.account import UpstreamUnavailable, connect


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
