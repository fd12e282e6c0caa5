"""PROXY header reading and the refusals around it, on in-memory transports and a fake clock."""

from __future__ import annotations

import logging
import socket
import struct

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.addresses import Networks
from gateway.config import ConfigError, load_config
from gateway.proxy_protocol import (
    HEADER_TIMEOUT,
    ProxyHeaderError,
    ProxyHeaderFactory,
    ProxyHeaderReader,
)

V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\r\n"


def v2(source: str = "192.0.2.9", port: int = 41000, command: int = 0x21) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    addresses += struct.pack("!HH", port, 110)
    if command == 0x20:  # LOCAL: no addresses
        return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, 0x11]) + struct.pack("!H", 12) + addresses


# -- the reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [V1, v2()])
def test_header_split_anywhere_then_client_bytes(header: bytes) -> None:
    data = header + b"CAPA\r\n"
    for cut in range(1, len(header) + 1):
        reader = ProxyHeaderReader()
        first = reader.feed(data[:cut])
        result = first if first is not None else reader.feed(data[cut:])
        assert result is not None, cut
        assert result.source is not None
        assert result.source.host in ("192.0.2.7", "192.0.2.9")
        after = data[cut:] if first is not None else b""  # what goes to the protocol directly
        assert result.remaining + after == b"CAPA\r\n"


def test_v1_and_v2_sources() -> None:
    one = ProxyHeaderReader().feed(V1)
    two = ProxyHeaderReader().feed(v2("198.51.100.4", 5555))
    assert one is not None and one.source == IPv4Address("TCP", "192.0.2.7", 40000)
    assert two is not None and two.source == IPv4Address("TCP", "198.51.100.4", 5555)


def test_local_and_unknown_keep_the_connection_s_own_peer() -> None:
    local = ProxyHeaderReader().feed(v2(command=0x20))
    unknown = ProxyHeaderReader().feed(b"PROXY UNKNOWN\r\nCAPA\r\n")
    assert local is not None and local.source is None
    assert unknown is not None and unknown.source is None and unknown.remaining == b"CAPA\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"CAPA\r\n",  # a client talking POP3 straight away
        b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello
        b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n",
        b"PROXY " + b"1" * 200,  # no line end within the 107 octets v1 allows
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\0" * 12,  # v2 signature, version 3
    ],
)
def test_anything_else_is_an_error(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderReader().feed(data)


# -- the Twisted glue ------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self, addr: object) -> None:
        self.addr = addr
        self.peer: object = None
        self.received = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = self.transport.getPeer()
        self.transport.write(b"+OK hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RecordingFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: object) -> Recorder:  # type: ignore[override]
        protocol = Recorder(addr)
        self.built.append(protocol)
        return protocol


def connect(
    peer: str = "10.0.0.5", refusal: bytes = b"-ERR refused\r\n"
) -> tuple[RecordingFactory, StringTransport, Protocol, Clock]:
    clock = Clock()
    inner = RecordingFactory()
    factory = ProxyHeaderFactory(inner, clock, Networks(["10.0.0.0/8"]), "pop3", refusal)
    addr = IPv4Address("TCP", peer, 33333)
    protocol = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    protocol.makeConnection(transport)
    return inner, transport, protocol, clock


def test_the_client_protocol_is_built_for_the_header_s_address() -> None:
    inner, transport, protocol, _ = connect()
    assert inner.built == [] and transport.value() == b""  # no greeting before the header
    protocol.dataReceived(V1 + b"USER alice\r\n")
    [client] = inner.built
    assert client.addr == IPv4Address("TCP", "192.0.2.7", 40000)
    assert client.peer == IPv4Address("TCP", "192.0.2.7", 40000)
    assert client.received == b"USER alice\r\n"
    assert transport.value() == b"+OK hello\r\n"
    protocol.dataReceived(b"PASS x\r\n")
    assert client.received == b"USER alice\r\nPASS x\r\n"


def test_untrusted_peer_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "popgate.proxy")
    inner, transport, protocol, _ = connect(peer="203.0.113.1")
    protocol.dataReceived(V1)
    assert inner.built == []
    assert transport.value() == b"-ERR refused\r\n" and transport.disconnecting
    assert "pop3 connection from 203.0.113.1:33333 refused" in caplog.text


def test_no_header_is_refused() -> None:
    inner, transport, protocol, _ = connect()
    protocol.dataReceived(b"CAPA\r\n")
    assert inner.built == [] and transport.value() == b"-ERR refused\r\n"
    assert transport.disconnecting


def test_a_header_that_never_arrives_times_out() -> None:
    inner, transport, protocol, clock = connect(refusal=b"")
    protocol.dataReceived(V1[:10])
    clock.advance(HEADER_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and transport.value() == b"" and inner.built == []


def test_refusal_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "popgate.proxy")
    clock = Clock()
    factory = ProxyHeaderFactory(RecordingFactory(), clock, Networks(["10.0.0.0/8"]), "pop3")
    for i in range(5):
        addr = IPv4Address("TCP", "203.0.113.1", 1000 + i)
        factory.buildProtocol(addr).makeConnection(StringTransport(peerAddress=addr))
    assert caplog.text.count("refused") == 1
    clock.advance(61)
    addr = IPv4Address("TCP", "203.0.113.1", 2000)
    factory.buildProtocol(addr).makeConnection(StringTransport(peerAddress=addr))
    assert "(4 more refused for this reason since the last such line)" in caplog.text


# -- configuration ---------------------------------------------------------------------------


def write_config(tmp_path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "popgate.toml"
    path.write_text('[upstream.imap]\nhost = "127.0.0.1"\n' + text)
    return path


def test_proxy_protocol_needs_proxy_networks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(tmp_path, "[pop3]\nproxy_protocol = true\n")
    with pytest.raises(ConfigError, match=r"proxy_protocol.*proxy_networks"):
        load_config(path, environ={})


def test_proxy_settings_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(
        tmp_path,
        '[pop3]\nproxy_protocol = true\n[security]\nproxy_networks = ["10.1.0.0/16", "::1"]\n',
    )
    config = load_config(path, environ={})
    assert config.pop3.proxy_protocol and not config.submission.proxy_protocol
    assert "10.1.2.3" in config.security.proxies and "::ffff:10.1.2.3" in config.security.proxies
    assert "10.2.0.1" not in config.security.proxies


def test_bad_proxy_network_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(tmp_path, '[security]\nproxy_networks = ["10.1.0.0/33"]\n')
    with pytest.raises(ConfigError, match="proxy_networks"):
        load_config(path, environ={})


def test_submission_proxy_protocol_is_refused_with_implicit_tls(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(
        tmp_path,
        '[upstream.smtp]\nhost = "127.0.0.1"\n'
        '[submission]\nlisten = ["127.0.0.1:0"]\nlisten_tls = ["127.0.0.1:0"]\n'
        'proxy_protocol = true\n[security]\nproxy_networks = ["10.0.0.0/8"]\n',
    )
    with pytest.raises(ConfigError, match=r"proxy_protocol.*listen_tls"):
        load_config(path, environ={})
