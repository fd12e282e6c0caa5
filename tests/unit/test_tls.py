"""gateway.tls: certificate generation, and real handshakes over loopback.

The handshake tests use the real reactor (pytest-twisted) on 127.0.0.1 with port 0, and the
system ``openssl s_client`` as the old device, because what matters is what a TLS 1.0 client
really gets, not what our objects claim.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from OpenSSL._util import lib as openssl_lib
from service_identity import VerificationError
from twisted.internet import reactor, utils
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IListeningPort, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

import gateway.tls
from gateway.config import TLSSettings
from gateway.tls import (
    ResumingClientTLS,
    TLSSetupError,
    _WithSecurityLevel,
    asyncio_server_context,
    certificate_fingerprint,
    client_context_factory,
    ensure_server_certificate,
    generate_self_signed,
    load_server_certificate,
    server_context_factory,
    upstream_tls,
)

GREETING = b"+OK popgate ready\r\n"
OPENSSL = shutil.which("openssl") or "openssl"
HANDSHAKE_GUARD = 20  # seconds; only turns a hang into a failure, never waited for normally


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> TLSSettings:
    """One certificate for "localhost" (key generation is the slow part) shared by the module."""
    directory = tmp_path_factory.mktemp("certs")
    settings = TLSSettings(cert_file=directory / "popgate.crt", key_file=directory / "popgate.key")
    generate_self_signed("localhost", settings.cert_file, settings.key_file)
    return settings


@pytest.fixture
def zero_umask() -> Iterator[None]:
    """With umask 0 a naive open() would create 0666 files: proves the mode is set on purpose."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# --------------------------------------------------------------------------- generation


def test_generated_key_is_private_from_creation(tmp_path: Path, zero_umask: None) -> None:
    cert, key = tmp_path / "a" / "b" / "popgate.crt", tmp_path / "a" / "b" / "popgate.key"

    generate_self_signed("mail.example.org", cert, key)

    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert sorted(p.name for p in cert.parent.iterdir()) == ["popgate.crt", "popgate.key"]


def test_generated_certificate_names_and_validity(pair: TLSSettings) -> None:
    certificate = x509.load_pem_x509_certificate(pair.cert_file.read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)

    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3652)
    assert certificate.not_valid_after_utc.year < 2038
    assert constraints.value.ca is False
    assert certificate.signature_hash_algorithm is not None
    assert certificate.signature_hash_algorithm.name == "sha256"


def test_ip_literal_gets_an_ip_san(tmp_path: Path) -> None:
    generate_self_signed("192.0.2.10", tmp_path / "c.crt", tmp_path / "c.key")

    certificate = x509.load_pem_x509_certificate((tmp_path / "c.crt").read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.10")]
    assert san.get_values_for_type(x509.DNSName) == ["192.0.2.10"]


def test_ipv6_literal_gets_only_an_ip_san(tmp_path: Path) -> None:
    generate_self_signed("::1", tmp_path / "c.crt", tmp_path / "c.key")

    certificate = x509.load_pem_x509_certificate((tmp_path / "c.crt").read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == []


@pytest.mark.parametrize("hostname", ["", "two words"])
def test_unusable_hostname(tmp_path: Path, hostname: str) -> None:
    with pytest.raises(TLSSetupError):
        generate_self_signed(hostname, tmp_path / "c.crt", tmp_path / "c.key")

    assert list(tmp_path.iterdir()) == []


def test_fingerprint_matches_the_certificate(pair: TLSSettings) -> None:
    certificate = x509.load_pem_x509_certificate(pair.cert_file.read_bytes())
    expected = certificate.fingerprint(hashes.SHA256()).hex(":").upper()

    assert certificate_fingerprint(pair.cert_file) == expected
    assert len(expected.split(":")) == 32


# --------------------------------------------------------------------------- ensure / load


def test_ensure_generates_when_neither_file_exists(tmp_path: Path) -> None:
    settings = TLSSettings(cert_file=tmp_path / "c" / "x.crt", key_file=tmp_path / "k" / "x.key")

    generated = ensure_server_certificate(settings, "localhost")

    assert generated is True
    leaf, intermediates, _key = load_server_certificate(settings)
    assert intermediates == []
    assert leaf.subject.rfc4514_string() == "CN=localhost"


def test_ensure_keeps_an_existing_pair(pair: TLSSettings) -> None:
    before = (pair.cert_file.read_bytes(), pair.key_file.read_bytes())

    generated = ensure_server_certificate(pair, "other-name")

    assert generated is False
    assert (pair.cert_file.read_bytes(), pair.key_file.read_bytes()) == before


@pytest.mark.parametrize("present", ["cert_file", "key_file"])
def test_ensure_refuses_half_a_pair(tmp_path: Path, present: str) -> None:
    settings = TLSSettings(cert_file=tmp_path / "x.crt", key_file=tmp_path / "x.key")
    existing: Path = getattr(settings, present)
    existing.write_text("operator's file")

    with pytest.raises(TLSSetupError) as caught:
        ensure_server_certificate(settings, "localhost")

    assert str(existing) in str(caught.value)
    assert existing.read_text() == "operator's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing.name]


def test_mismatched_pair_is_refused(tmp_path: Path, pair: TLSSettings) -> None:
    generate_self_signed("localhost", tmp_path / "other.crt", tmp_path / "other.key")
    settings = TLSSettings(cert_file=pair.cert_file, key_file=tmp_path / "other.key")

    with pytest.raises(TLSSetupError, match="is not the key of the certificate"):
        load_server_certificate(settings)
    with pytest.raises(TLSSetupError):
        server_context_factory(settings, "TLSv1.2")


@pytest.mark.parametrize(
    ("cert_text", "key_text", "message"),
    [
        ("garbage", None, "no PEM certificate"),
        (None, "garbage", "no PEM private key"),
    ],
)
def test_unreadable_pem(
    tmp_path: Path, pair: TLSSettings, cert_text: str | None, key_text: str | None, message: str
) -> None:
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_bytes(cert_text.encode() if cert_text else pair.cert_file.read_bytes())
    key.write_bytes(key_text.encode() if key_text else pair.key_file.read_bytes())

    with pytest.raises(TLSSetupError, match=message):
        load_server_certificate(TLSSettings(cert_file=cert, key_file=key))


def test_encrypted_key_is_refused_clearly(tmp_path: Path, pair: TLSSettings) -> None:
    key = serialization.load_pem_private_key(pair.key_file.read_bytes(), password=None)
    (tmp_path / "enc.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )

    with pytest.raises(TLSSetupError, match="encrypted"):
        load_server_certificate(TLSSettings(pair.cert_file, tmp_path / "enc.key"))


def test_chain_file_keeps_intermediates(tmp_path: Path, pair: TLSSettings) -> None:
    generate_self_signed("intermediate.example", tmp_path / "i.crt", tmp_path / "i.key")
    chain = tmp_path / "chain.crt"
    chain.write_bytes(pair.cert_file.read_bytes() + (tmp_path / "i.crt").read_bytes())

    leaf, intermediates, _key = load_server_certificate(TLSSettings(chain, pair.key_file))

    assert leaf.subject.rfc4514_string() == "CN=localhost"
    assert [c.subject.rfc4514_string() for c in intermediates] == ["CN=intermediate.example"]


def test_unknown_min_version(pair: TLSSettings) -> None:
    with pytest.raises(ValueError, match="SSLv3"):
        server_context_factory(pair, "SSLv3")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- live handshakes


class Greeter(Protocol):
    """Server side: greet, then close (so s_client and our clients finish on their own)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(GREETING)
        self.transport.loseConnection()


class Collector(Protocol):
    """Client side: keep what arrives and why the connection ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        assert reason is not None
        self.reason = reason
        self.lost.callback(None)  # callback(Failure) would turn into an errback


def port_number(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def factory_of(build: Callable[[], Protocol]) -> ServerFactory:
    """A factory whose protocols need constructor arguments."""

    class _Factory(ServerFactory):
        def buildProtocol(self, addr: object) -> Protocol:
            protocol = build()
            protocol.factory = self
            return protocol

    return _Factory()


def start(creator: object, factory: ServerFactory | None = None) -> IListeningPort:
    """Listen on 127.0.0.1, a free port: TLS with ``creator``, or plain TCP when it is None."""
    chosen = factory if factory is not None else factory_of(Greeter)
    if creator is None:
        return reactor.listenTCP(0, chosen, interface="127.0.0.1")
    return reactor.listenSSL(0, chosen, creator, interface="127.0.0.1")  # type: ignore[attr-defined]


@asynccontextmanager
async def listening(creator: object, factory: ServerFactory | None = None) -> AsyncIterator[int]:
    """``start``, yield the port number, stop listening afterwards."""
    port = start(creator, factory)
    try:
        yield port_number(port)
    finally:
        await maybeDeferred(port.stopListening)


class Session(NamedTuple):
    """What ``openssl s_client`` reports: exit status, negotiated protocol/cipher, app data."""

    status: int
    protocol: str
    cipher: str  # "0000" when no cipher was agreed, i.e. the handshake failed
    greeted: bool


async def s_client(port: int, *flags: str) -> Session:
    """Run ``openssl s_client`` as an old device would."""
    # The client side needs SECLEVEL=0 as well, or the system OpenSSL refuses TLS 1.0 itself.
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *flags]
    if "-cipher" not in flags:
        args += ["-cipher", "DEFAULT@SECLEVEL=0"]
    result = utils.getProcessOutputAndValue(OPENSSL, args, env=dict(os.environ))
    result.addTimeout(HANDSHAKE_GUARD, reactor)
    raw, _err, status = await result
    out = raw.decode("utf-8", "replace")
    protocol = re.search(r"^\s*Protocol\s*:\s*(\S+)", out, re.MULTILINE)
    cipher = re.search(r"^\s*Cipher\s*:\s*(\S+)", out, re.MULTILINE)
    return Session(
        status=status,
        protocol=protocol[1] if protocol else "",
        cipher=cipher[1] if cipher else "",
        greeted=GREETING.decode().strip() in out,
    )


@pytest_twisted.ensureDeferred
async def test_tls1_floor_lets_a_tls1_client_in(pair: TLSSettings) -> None:
    async with listening(server_context_factory(pair, "TLSv1")) as port:
        session = await s_client(port, "-tls1")

    assert session.status == 0
    assert session.protocol == "TLSv1"
    assert session.cipher not in ("", "0000")
    assert session.greeted


@pytest_twisted.ensureDeferred
async def test_tls11_is_allowed_by_a_tls1_floor(pair: TLSSettings) -> None:
    async with listening(server_context_factory(pair, "TLSv1")) as port:
        session = await s_client(port, "-tls1_1")

    assert (session.status, session.protocol, session.greeted) == (0, "TLSv1.1", True)


@pytest_twisted.ensureDeferred
async def test_tls1_floor_serves_plain_rsa_key_exchange(pair: TLSSettings) -> None:
    """Devices without ECDHE negotiate AES128-SHA (RSA key exchange): keep that working."""
    async with listening(server_context_factory(pair, "TLSv1")) as port:
        session = await s_client(port, "-tls1", "-cipher", "AES128-SHA@SECLEVEL=0")

    assert (session.status, session.protocol, session.cipher) == (0, "TLSv1", "AES128-SHA")
    assert session.greeted


@pytest_twisted.ensureDeferred
async def test_tls1_floor_still_prefers_modern_tls(pair: TLSSettings) -> None:
    async with listening(server_context_factory(pair, "TLSv1")) as port:
        session = await s_client(port)

    assert (session.status, session.protocol, session.greeted) == (0, "TLSv1.3", True)


@pytest_twisted.ensureDeferred
async def test_tls11_floor_refuses_tls1(pair: TLSSettings) -> None:
    async with listening(server_context_factory(pair, "TLSv1.1")) as port:
        refused = await s_client(port, "-tls1")
        accepted = await s_client(port, "-tls1_1")

    assert (refused.cipher, refused.greeted) == ("0000", False)
    assert refused.status != 0
    assert (accepted.status, accepted.protocol, accepted.greeted) == (0, "TLSv1.1", True)


@pytest_twisted.ensureDeferred
async def test_tls12_floor_refuses_tls1(pair: TLSSettings) -> None:
    async with listening(server_context_factory(pair, "TLSv1.2")) as port:
        refused = await s_client(port, "-tls1")
        accepted = await s_client(port, "-tls1_2")

    assert refused.status != 0
    assert (refused.cipher, refused.greeted) == ("0000", False)
    assert (accepted.status, accepted.protocol, accepted.greeted) == (0, "TLSv1.2", True)


@pytest_twisted.ensureDeferred
async def test_tls13_floor_refuses_tls12(pair: TLSSettings) -> None:
    async with listening(server_context_factory(pair, "TLSv1.3")) as port:
        session = await s_client(port, "-tls1_2")

    assert session.status != 0
    assert (session.cipher, session.greeted) == ("0000", False)


async def connect(port: int, creator: IOpenSSLClientConnectionCreator) -> Collector:
    """Connect with ``creator``; the result holds what arrived and why the connection ended.

    A failed handshake may surface either as the connect Deferred's error or as the reason
    for connectionLost, depending on when OpenSSL gives up; both end up in ``reason``.
    """
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    connecting = endpoint.connect(Factory.forProtocol(Collector))
    connecting.addTimeout(HANDSHAKE_GUARD, reactor)
    try:
        protocol = await connecting
    except (SSL.Error, VerificationError):
        failed = Collector()
        failed.reason = Failure()
        return failed
    assert isinstance(protocol, Collector)
    lost = protocol.lost
    lost.addTimeout(HANDSHAKE_GUARD, reactor)
    await lost
    return protocol


def refused(protocol: Collector) -> bool:
    assert protocol.reason is not None
    return protocol.reason.check(SSL.Error, VerificationError) is not None


@pytest.fixture
def tls_port(pair: TLSSettings) -> Iterator[int]:
    port = start(server_context_factory(pair, "TLSv1.2"))
    yield port_number(port)
    pytest_twisted.blockon(maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_client_rejects_an_untrusted_certificate(tls_port: int) -> None:
    protocol = await connect(tls_port, client_context_factory("localhost"))

    assert protocol.data == b""
    assert refused(protocol)


@pytest_twisted.ensureDeferred
async def test_client_trusts_ca_file(tls_port: int, pair: TLSSettings) -> None:
    protocol = await connect(
        tls_port, client_context_factory("localhost", verify=True, ca_file=pair.cert_file)
    )

    assert protocol.data == GREETING
    assert not refused(protocol)


@pytest_twisted.ensureDeferred
async def test_client_rejects_another_hostname_even_if_trusted(
    tls_port: int, pair: TLSSettings
) -> None:
    protocol = await connect(
        tls_port, client_context_factory("imap.example.com", ca_file=pair.cert_file)
    )

    assert protocol.data == b""
    assert refused(protocol)


@pytest_twisted.ensureDeferred
async def test_client_without_verification_connects(tls_port: int) -> None:
    protocol = await connect(tls_port, client_context_factory("imap.example.com", verify=False))

    assert protocol.data == GREETING


@pytest_twisted.ensureDeferred
async def test_client_never_goes_below_tls12(pair: TLSSettings) -> None:
    leaf, _chain, key = load_server_certificate(pair)
    tls1_only = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        insecurelyLowerMinimumTo=TLSVersion.TLSv1_0,
        lowerMaximumSecurityTo=TLSVersion.TLSv1_0,
        acceptableCiphers=_WithSecurityLevel(0),
    )
    async with listening(tls1_only) as port:
        unverified = await connect(port, client_context_factory("localhost", verify=False))
        verified = await connect(port, client_context_factory("localhost", ca_file=pair.cert_file))

    assert unverified.data == b""
    assert refused(unverified)
    assert verified.data == b""
    assert refused(verified)


@pytest.fixture
def upstream_cache(monkeypatch: pytest.MonkeyPatch) -> dict[object, ResumingClientTLS]:
    """An empty upstream TLS cache for this test (ports are reused between tests)."""
    cache: dict[object, ResumingClientTLS] = {}
    monkeypatch.setattr(gateway.tls, "_UPSTREAM_TLS", cache)
    return cache


def test_upstream_tls_is_the_one_cache_of_client_creators(
    tmp_path: Path, pair: TLSSettings, upstream_cache: dict[object, ResumingClientTLS]
) -> None:
    """Building an OpenSSL client context loads the system trust store: once per upstream (host,
    port, verification, CA file), not once per login; client_context_factory only builds."""
    ca_file = tmp_path / "ca.pem"
    shutil.copyfile(pair.cert_file, ca_file)

    first = upstream_tls("localhost", 993, ca_file=ca_file)
    others = [
        upstream_tls("imap.example.com", 993, ca_file=ca_file),
        upstream_tls("localhost", 143, ca_file=ca_file),
        upstream_tls("localhost", 993, verify=False),
        upstream_tls("localhost", 993),
    ]

    assert upstream_tls("localhost", 993, ca_file=ca_file) is first
    assert len({id(c) for c in [first, *others]}) == 5
    assert len(upstream_cache) == 5
    # Each upstream its own OpenSSL context: nothing shared behind upstream_tls's back.
    assert len({id(c._inner) for c in [first, *others]}) == 5
    assert client_context_factory("localhost", ca_file=ca_file) is not client_context_factory(
        "localhost", ca_file=ca_file
    )


def test_upstream_tls_cache_is_bounded(upstream_cache: dict[object, ResumingClientTLS]) -> None:
    for port in range(1, gateway.tls._MAX_UPSTREAM_TLS + 10):
        upstream_tls("localhost", port, verify=False)

    assert 0 < len(upstream_cache) <= gateway.tls._MAX_UPSTREAM_TLS


@pytest_twisted.ensureDeferred
async def test_upstream_tls_follows_a_replaced_ca_file(
    tls_port: int,
    pair: TLSSettings,
    tmp_path: Path,
    upstream_cache: dict[object, ResumingClientTLS],
) -> None:
    ca_file = tmp_path / "ca.pem"
    shutil.copyfile(pair.cert_file, ca_file)
    before = upstream_tls("localhost", tls_port, ca_file=ca_file)
    trusted = await connect(tls_port, before)
    generate_self_signed("localhost", tmp_path / "other.crt", tmp_path / "other.key")
    replacement = (tmp_path / "other.crt").read_bytes() + b"\n"  # another size, surely
    ca_file.write_bytes(replacement)

    after = upstream_tls("localhost", tls_port, ca_file=ca_file)
    distrusted = await connect(tls_port, after)

    assert after is not before
    assert trusted.data == GREETING
    assert distrusted.data == b""
    assert refused(distrusted)


def test_client_ca_file_must_hold_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")

    with pytest.raises(TLSSetupError, match="no PEM certificate"):
        client_context_factory("localhost", ca_file=tmp_path / "ca.pem")
    with pytest.raises(TLSSetupError, match="cannot read CA file"):
        client_context_factory("localhost", ca_file=tmp_path / "missing.pem")


# --------------------------------------------------------------------------- STARTTLS


class StlsServer(LineReceiver):
    """A POP3-ish server: ``STLS`` upgrades the connection, then ``CAPA`` proves it works."""

    def __init__(self, creator: CertificateOptions) -> None:
        self.creator = creator

    def connectionMade(self) -> None:
        self.sendLine(b"+OK ready")

    def lineReceived(self, line: bytes) -> None:
        assert self.transport is not None
        if line == b"STLS":
            self.sendLine(b"+OK begin TLS")
            self.transport.startTLS(self.creator)  # type: ignore[attr-defined]
        elif line == b"CAPA":
            self.sendLine(b"+OK over TLS")
            self.transport.loseConnection()


class StlsClient(LineReceiver):
    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self.creator = creator
        self.lines: list[bytes] = []
        self.lost: Deferred[None] = Deferred()
        self.peer_certificate: object = None
        self.reason: Failure | None = None

    def lineReceived(self, line: bytes) -> None:
        assert self.transport is not None
        self.lines.append(line)
        if line == b"+OK ready":
            self.sendLine(b"STLS")
        elif line == b"+OK begin TLS":
            self.transport.startTLS(self.creator)  # type: ignore[attr-defined]
            self.sendLine(b"CAPA")
        elif line == b"+OK over TLS":
            self.peer_certificate = self.transport.getPeerCertificate()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        assert reason is not None
        self.reason = reason
        self.lost.callback(None)  # callback(Failure) would turn into an errback


async def stls_exchange(
    server_creator: CertificateOptions, client_creator: IOpenSSLClientConnectionCreator
) -> tuple[StlsClient, Failure]:
    async with listening(None, factory_of(lambda: StlsServer(server_creator))) as port:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await endpoint.connect(factory_of(lambda: StlsClient(client_creator)))
        assert isinstance(client, StlsClient)
        client.lost.addTimeout(HANDSHAKE_GUARD, reactor)
        await client.lost
    assert client.reason is not None
    return client, client.reason


@pytest_twisted.ensureDeferred
async def test_starttls_both_sides(pair: TLSSettings) -> None:
    client, _reason = await stls_exchange(
        server_context_factory(pair, "TLSv1.2"),
        client_context_factory("localhost", ca_file=pair.cert_file),
    )

    assert client.lines == [b"+OK ready", b"+OK begin TLS", b"+OK over TLS"]
    assert client.peer_certificate is not None


@pytest_twisted.ensureDeferred
async def test_starttls_client_verifies_the_hostname(pair: TLSSettings) -> None:
    client, reason = await stls_exchange(
        server_context_factory(pair, "TLSv1.2"),
        client_context_factory("imap.example.com", ca_file=pair.cert_file),
    )

    assert client.lines == [b"+OK ready", b"+OK begin TLS"]
    assert reason.check(SSL.Error, VerificationError) is not None


# --------------------------------------------------------------------------- upstream resumption


class SessionProbe(Collector):
    """Client side, as gateway.upstream.account.connect does: once the server has spoken,
    note whether the handshake resumed a session and hand the session to the creator."""

    def __init__(self, creator: ResumingClientTLS) -> None:
        super().__init__()
        self.creator = creator
        self.resumed: bool | None = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.resumed is None and GREETING in self.data:
            connection = self.transport.getHandle()  # type: ignore[union-attr]
            self.resumed = bool(openssl_lib.SSL_session_reused(connection._ssl))
            self.creator.remember(self.transport)


async def probe(port: int, creator: ResumingClientTLS) -> SessionProbe:
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    connecting = endpoint.connect(factory_of(lambda: SessionProbe(creator)))
    connecting.addTimeout(HANDSHAKE_GUARD, reactor)
    protocol = await connecting
    assert isinstance(protocol, SessionProbe)
    protocol.lost.addTimeout(HANDSHAKE_GUARD, reactor)
    await protocol.lost
    return protocol


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest_twisted.ensureDeferred
async def test_upstream_connections_resume_the_last_session(
    pair: TLSSettings, version: str
) -> None:
    """The second login's handshake to the same upstream resumes the first one's session
    (TLS 1.3 ticket after the handshake; TLS 1.2 ticket), verified as before."""
    highest = {"TLSv1.3": TLSVersion.TLSv1_3, "TLSv1.2": TLSVersion.TLSv1_2}[version]
    leaf, _chain, key = load_server_certificate(pair)
    server = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        lowerMaximumSecurityTo=highest,
        enableSessions=True,
        enableSessionTickets=True,
    )
    creator = ResumingClientTLS(client_context_factory("localhost", ca_file=pair.cert_file))
    async with listening(server) as port:
        first = await probe(port, creator)
        second = await probe(port, creator)
        creator.forget()
        third = await probe(port, creator)

    assert [p.data for p in (first, second, third)] == [GREETING] * 3
    assert (first.resumed, second.resumed, third.resumed) == (False, True, False)


@pytest_twisted.ensureDeferred
async def test_upstream_session_is_not_offered_to_another_creator(
    pair: TLSSettings, tls_port: int
) -> None:
    """Sessions stay with the creator (one per upstream and set of checks) that made them."""
    verified = ResumingClientTLS(client_context_factory("localhost", ca_file=pair.cert_file))
    other = ResumingClientTLS(client_context_factory("localhost", verify=False))
    await probe(tls_port, verified)
    elsewhere = await probe(tls_port, other)

    assert (elsewhere.data, elsewhere.resumed) == (GREETING, False)


# --------------------------------------------------------------------------- two pairs


@pytest.fixture(scope="module")
def dual(tmp_path_factory: pytest.TempPathFactory) -> TLSSettings:
    """The self-signed default: RSA in popgate.crt/.key, ECDSA beside it (-ecdsa)."""
    directory = tmp_path_factory.mktemp("dual")
    settings = TLSSettings(cert_file=directory / "popgate.crt", key_file=directory / "popgate.key")
    assert ensure_server_certificate(settings, "localhost") is True
    return settings


def key_type_of(cert_file: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return f"ECDSA {key.curve.name}"


async def served_key_bits(port: int, *flags: str) -> tuple[int, str]:
    """``openssl s_client``'s exit status and the server key it reports ("2048" for RSA-2048,
    "256" for ECDSA P-256)."""
    args = ["s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *flags]
    result = utils.getProcessOutputAndValue(OPENSSL, args, env=dict(os.environ))
    result.addTimeout(HANDSHAKE_GUARD, reactor)
    raw, _err, status = await result
    bits = re.search(r"^Server public key is (\d+) bit", raw.decode("utf-8", "replace"), re.M)
    return status, bits[1] if bits else ""


def test_the_default_is_an_rsa_pair_and_an_ecdsa_pair_beside_it(dual: TLSSettings) -> None:
    second_cert, second_key = dual.second_pair

    assert (second_cert.name, second_key.name) == ("popgate-ecdsa.crt", "popgate-ecdsa.key")
    assert key_type_of(dual.cert_file) == "RSA-2048"
    assert key_type_of(second_cert) == "ECDSA secp256r1"
    assert stat.S_IMODE(second_key.stat().st_mode) == 0o600


# Each client gets the pair it can use: ECDSA wherever ECDSA is possible (cheaper for the
# gateway), RSA for clients that offer only RSA suites or RSA signatures (old devices).
DUAL_CASES = [
    ((), "256"),  # TLS 1.3, everything offered
    (("-tls1_2",), "256"),
    (("-tls1_2", "-cipher", "aECDSA"), "256"),
    (("-tls1_2", "-cipher", "aRSA"), "2048"),
    (("-tls1_2", "-sigalgs", "ECDSA+SHA256"), "256"),
    (("-tls1_2", "-sigalgs", "RSA+SHA256"), "2048"),
    (("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"), "2048"),
    (("-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256"), "256"),
    (("-tls1", "-cipher", "aRSA@SECLEVEL=0"), "2048"),
    (("-tls1", "-cipher", "AES128-SHA@SECLEVEL=0"), "2048"),  # RSA key exchange
    (("-tls1", "-cipher", "aECDSA@SECLEVEL=0"), "256"),
]


@pytest.mark.parametrize(("flags", "bits"), DUAL_CASES)
@pytest_twisted.ensureDeferred
async def test_dual_pair_serves_each_client_the_key_it_asks_for(
    dual: TLSSettings, flags: tuple[str, ...], bits: str
) -> None:
    async with listening(server_context_factory(dual, "TLSv1")) as port:
        status, served = await served_key_bits(port, *flags)

    assert (status, served) == (0, bits)


@pytest_twisted.ensureDeferred
async def test_one_pair_alone_still_serves_everyone(pair: TLSSettings) -> None:
    """An operator's single pair (no -ecdsa files beside it) keeps working unchanged."""
    async with listening(server_context_factory(pair, "TLSv1")) as port:
        modern = await served_key_bits(port)
        ecdsa_only = await served_key_bits(port, "-tls1_2", "-cipher", "aECDSA")

    assert modern == (0, "2048")
    assert ecdsa_only[0] != 0  # no ECDSA key to offer: the handshake fails, as before


def test_second_pair_of_the_same_key_type_is_refused(tmp_path: Path) -> None:
    settings = TLSSettings(cert_file=tmp_path / "a.crt", key_file=tmp_path / "a.key")
    second_cert, second_key = settings.second_pair
    generate_self_signed("localhost", settings.cert_file, settings.key_file, "rsa")
    generate_self_signed("localhost", second_cert, second_key, "rsa")

    with pytest.raises(TLSSetupError, match="both RSA keys"):
        server_context_factory(settings, "TLSv1.2")


def test_self_signed_second_pair_beside_a_ca_signed_first_is_refused(
    tmp_path: Path,
) -> None:
    """The trap: an operator puts a real certificate over the generated popgate.crt and
    forgets the generated popgate-ecdsa.crt; modern clients would still get the self-signed
    one."""
    settings = TLSSettings(cert_file=tmp_path / "popgate.crt", key_file=tmp_path / "popgate.key")
    assert ensure_server_certificate(settings, "localhost") is True
    issue_server_cert_rsa(settings.cert_file, settings.key_file, tmp_path)

    with pytest.raises(TLSSetupError, match=r"popgate-ecdsa\.crt is self-signed but"):
        server_context_factory(settings, "TLSv1.2")
    with pytest.raises(TLSSetupError, match=r"popgate-ecdsa\.crt is self-signed but"):
        asyncio_server_context(settings, "TLSv1.2")


def issue_server_cert_rsa(cert_file: Path, key_file: Path, scratch: Path) -> None:
    """An RSA leaf signed by a throwaway CA (i.e. not self-signed), over the given files."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))


def test_ensure_refuses_a_second_pair_without_a_first(tmp_path: Path) -> None:
    settings = TLSSettings(cert_file=tmp_path / "popgate.crt", key_file=tmp_path / "popgate.key")
    second_cert, second_key = settings.second_pair
    generate_self_signed("localhost", second_cert, second_key, "ecdsa")

    with pytest.raises(
        TLSSetupError, match=r"popgate-ecdsa\.crt exists but .*popgate\.crt does not"
    ):
        ensure_server_certificate(settings, "localhost")
    assert not settings.cert_file.exists()


def test_ensure_keeps_an_operator_pair_alone(pair: TLSSettings) -> None:
    """An existing first pair never gets a generated second pair beside it."""
    assert ensure_server_certificate(pair, "localhost") is False
    assert not any(p.exists() for p in pair.second_pair)


def test_explicit_second_pair_paths(tmp_path: Path, dual: TLSSettings) -> None:
    moved = TLSSettings(
        cert_file=dual.cert_file,
        key_file=dual.key_file,
        second_cert_file=tmp_path / "ec.pem",
        second_key_file=tmp_path / "ec.key",
    )
    assert moved.second_pair == (tmp_path / "ec.pem", tmp_path / "ec.key")
    shutil.copy2(dual.second_pair[0], tmp_path / "ec.pem")

    with pytest.raises(TLSSetupError, match=r"ec\.pem exists but .*ec\.key does not"):
        server_context_factory(moved, "TLSv1.2")
