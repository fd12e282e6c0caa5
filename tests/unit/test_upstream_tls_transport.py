"""WholeReadTLSTransport: the plaintext of one socket read reaches the IMAP client in one
``dataReceived`` instead of one per TLS record, byte for byte the same (in-memory transports,
real OpenSSL on both ends)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from gateway.config import TLSSettings
from gateway.tls import client_context_factory, generate_self_signed, server_context_factory
from gateway.upstream.tls_transport import WholeReadTLSTransport, _WholeReadTLSFactory

RECORD = 16 * 1024
BODY = bytes(range(256)) * (40 * RECORD // 256) + b"tail"  # 40 full records and a bit


class Sender(Protocol):
    """Server side: one large write once the connection is up, then a clean TLS close."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(BODY)
        self.transport.loseConnection()


class Counter(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> TLSSettings:
    directory: Path = tmp_path_factory.mktemp("certs")
    settings = TLSSettings(cert_file=directory / "s.crt", key_file=directory / "s.key")
    generate_self_signed("localhost", settings.cert_file, settings.key_file)
    return settings


def transfer(pair: TLSSettings, client_factory: type[TLSMemoryBIOFactory]) -> Counter:
    clock = Clock()
    counter = Counter()
    server = TLSMemoryBIOFactory(
        server_context_factory(pair, "TLSv1.2"), False, Factory.forProtocol(Sender), clock=clock
    )
    client = client_factory(
        client_context_factory("localhost", verify=False),
        True,
        Factory.forProtocol(lambda: counter),
        clock=clock,
    )
    _c, _s, pump = connectedServerAndClient(
        lambda: server.buildProtocol(None),
        lambda: client.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    for _ in range(50):  # each pump moves everything written so far, in one piece
        pump.pump()
        clock.advance(0)  # the server's write aggregation
    return counter


def test_one_read_is_delivered_once_with_the_same_bytes(pair: TLSSettings) -> None:
    whole = transfer(pair, _WholeReadTLSFactory)
    per_record = transfer(pair, TLSMemoryBIOFactory)

    assert b"".join(whole.reads) == BODY == b"".join(per_record.reads)
    assert len(per_record.reads) > len(BODY) // RECORD  # Twisted: one call per record
    assert len(whole.reads) == 1  # the pump hands over all the ciphertext in one piece
    # The clean TLS close after the data still ends the connection the usual way.
    assert whole.reason is not None and whole.reason.check(ConnectionDone)
    assert per_record.reason is not None and per_record.reason.check(ConnectionDone)


def test_the_transport_is_the_gateways(pair: TLSSettings) -> None:
    assert issubclass(_WholeReadTLSFactory.protocol, WholeReadTLSTransport)
    assert issubclass(WholeReadTLSTransport, TLSMemoryBIOProtocol)
