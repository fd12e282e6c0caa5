"""A finished POP3 session is freed by reference counting alone, at once.

The gateway raises the collector's thresholds (a large login builds tens of thousands of
objects), so a session caught in reference cycles would live until a full collection: the
soak's RSS growth. Here the gateway runs in the test's process against the private upstream,
a real client downloads over a real socket and QUITs, and with the cyclic collector off the
session's objects must be gone once both connections have closed.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from gateway.app import Gateway
from gateway.config import load_config
from tests.conftest import base_gateway_config
from tests.support import messages
from tests.support.gateway import dump_toml
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

#: How long any step may take before the test fails instead of hanging.
DEADLINE = 30.0


@pytest.fixture
def no_cyclic_collection() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()  # whatever earlier tests left does not count
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _PopClient(Protocol):
    """Logs in (pipelined), says when the login was answered, collects everything, and says
    when the server closed the connection."""

    def __init__(self, login: bytes) -> None:
        self.login = login
        self.received = bytearray()
        self.logged_in: Deferred[None] | None = Deferred()
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.login)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        # greeting, USER, PASS
        if self.logged_in is not None and self.received.count(b"+OK") >= 3:
            d, self.logged_in = self.logged_in, None
            d.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(bytes(self.received))


def _when_lost(protocol: Any) -> Deferred[None]:
    """Fires after ``protocol.connectionLost`` has run. The hook removes itself, so it leaves
    no reference behind (a bound method stored on its own instance would be a cycle)."""
    d: Deferred[None] = Deferred()
    original = type(protocol).connectionLost
    ref = weakref.ref(protocol)

    def lost(reason: Failure | None = None) -> None:
        instance = ref()
        assert instance is not None
        del instance.__dict__["connectionLost"]
        original(instance, reason)
        d.callback(None)

    protocol.connectionLost = lost
    return d


@pytest.mark.parametrize("upstream_security", ["starttls", "tls"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "pop3s"])
@pytest_twisted.ensureDeferred
async def test_a_finished_session_is_freed_without_the_cyclic_collector(
    upstream: Upstream,
    tmp_path: Path,
    no_cyclic_collection: None,
    tls: bool,
    upstream_security: str,
) -> None:
    body = messages.plain("freed", "a body to download\n" * 50)
    user = f"freed{tls:d}{upstream_security}"
    password = "pw-freed-secret"
    upstream.add_user(user, password)
    upstream.append_many(user, password, [body], "INBOX")
    config_file = tmp_path / "popgate.toml"
    config = base_gateway_config(upstream, tmp_path)
    if upstream_security == "tls":  # implicit TLS: the whole-read transport (tls_transport.py)
        config["upstream.imap"].update(security="tls", port=upstream.imaps_port)
    config_file.write_text(dump_toml(config))
    gateway = Gateway(reactor, load_config(config_file))
    await gateway.start()
    try:
        port = gateway.ports[1 if tls else 0].getHost().port
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if tls:
            endpoint = wrapClientTLS(ssl.CertificateOptions(), endpoint)
        client = _PopClient(f"USER {user}\r\nPASS {password}\r\n".encode())
        await connectProtocol(endpoint, client)
        assert client.logged_in is not None
        await client.logged_in.addTimeout(DEADLINE, reactor)
        (protocol,) = gateway.pop3_sessions
        maildrop = protocol.maildrop
        assert maildrop is not None
        account = maildrop.account
        imap = account.proto
        refs = {
            "Pop3Protocol": weakref.ref(protocol),
            "Pop3Session": weakref.ref(protocol.session),
            "Pop3Mailbox": weakref.ref(maildrop),
            "ImapAccount": weakref.ref(account),
            "ImapClientProtocol": weakref.ref(imap),
        }
        pop_lost = _when_lost(protocol)
        imap_lost = _when_lost(imap)
        del protocol, maildrop, account, imap
        assert client.transport is not None
        client.transport.write(b"RETR 1\r\nQUIT\r\n")

        answer = await client.closed.addTimeout(DEADLINE, reactor)
        assert b"\r\n" + body.replace(b"\r\n.", b"\r\n..") + b".\r\n+OK" in answer
        await pop_lost.addTimeout(DEADLINE, reactor)
        await imap_lost.addTimeout(
            DEADLINE, reactor
        )  # the LOGOUT after QUIT, then the server closed
        # The transports finish their own clean-up after connectionLost returns.
        await deferLater(reactor, 0)
        assert [name for name, ref in refs.items() if ref() is not None] == []
    finally:
        await gateway.stop()
