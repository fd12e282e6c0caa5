"""TLS for both sides of the gateway.

Client-facing (POP3/submission listeners): our certificate, and a floor that may be as low as
TLS 1.0 because the devices this gateway exists for (printers, scanners, old phones) cannot be
upgraded. Upstream-facing (IMAP/SMTP): never below TLS 1.2 and verified by default, because the
gateway forwards the users' real passwords there.

Everything returned here is a Twisted connection creator, so one object works with
``twisted.internet.endpoints`` (``SSL4ServerEndpoint``, ``wrapClientTLS``), with
``TLSMemoryBIOFactory`` and with ``transport.startTLS()`` (STLS/STARTTLS).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Literal, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

# Not re-exported by twisted.internet.ssl, but documented as the trustRoot/cipher interfaces.
from twisted.internet._sslverify import IOpenSSLTrustRoot, defaultCiphers
from twisted.internet.interfaces import (
    IAcceptableCiphers,
    ICipher,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from gateway.config import TLS_VERSIONS, TLSSettings
from gateway.config import TLSVersion as TLSVersionName

__all__ = [
    "ResumingClientTLS",
    "ServerTLS",
    "TLSSetupError",
    "asyncio_server_context",
    "certificate_fingerprint",
    "client_context_factory",
    "describe_certificate",
    "ensure_server_certificate",
    "generate_self_signed",
    "load_second_certificate",
    "load_server_certificate",
    "server_context_factory",
    "upstream_tls",
]

# Ten years, yet still short of 2038: devices with a 32-bit time_t reject later dates.
CERT_VALIDITY = datetime.timedelta(days=3650)

# The one table of client-facing TLS versions: the configuration's name -> (Twisted's constant,
# the standard library's), for the POP3 (Twisted) and submission (asyncio) listeners alike.
_VERSIONS: dict[str, tuple[TLSVersion, ssl.TLSVersion]] = {
    "TLSv1": (TLSVersion.TLSv1_0, ssl.TLSVersion.TLSv1),
    "TLSv1.1": (TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1),
    "TLSv1.2": (TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2),
    "TLSv1.3": (TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
}
assert tuple(_VERSIONS) == TLS_VERSIONS


def _is_legacy(min_version: TLSVersionName) -> bool:
    """Below TLS 1.2 OpenSSL 3 also needs the lower security level (LEGACY_SECURITY_LEVEL)."""
    return TLS_VERSIONS.index(min_version) < TLS_VERSIONS.index("TLSv1.2")


# OpenSSL 3 refuses TLS 1.0/1.1 (and their SHA-1 handshake signatures) at its default security
# level 2, even when the protocol version is allowed. Level 0 lifts that; the cipher list itself
# stays Twisted's vetted default (AES/ChaCha20, no RC4/3DES/NULL/export), so only the protocol
# floor really changes.
LEGACY_SECURITY_LEVEL = 0


class TLSSetupError(Exception):
    """The certificate/key files or the CA file cannot be used; the message says what to fix."""


# --------------------------------------------------------------------------------------------
# Certificates


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` set at creation.

    The key must never exist with wider permissions, not even briefly, hence os.open with the
    mode (no chmod afterwards) on a temporary name that is then renamed over the target.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _subject_alt_names(hostname: str) -> list[x509.GeneralName]:
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        return [x509.DNSName(hostname.encode("idna").decode("ascii"))]
    names: list[x509.GeneralName] = [x509.IPAddress(ip)]
    if ip.version == 4:
        # Some old clients compare the address text against DNS names only.
        names.append(x509.DNSName(hostname))
    return names


KeyType = Literal["rsa", "ecdsa"]


def generate_self_signed(
    hostname: str, cert_file: Path, key_file: Path, key_type: KeyType = "rsa"
) -> None:
    """Write a self-signed certificate for ``hostname`` and its private key (mode 0600).

    RSA 2048 for the first pair: TLS 1.0-era devices often cannot do ECDSA at all. ECDSA P-256
    for the second: its signature costs the server ~0.03 ms against RSA's ~0.8 ms per full
    handshake (docs/benchmark.md). The signature is SHA-256; SHA-1 certificates are refused by
    every current client.
    """
    hostname = hostname.strip()
    if not hostname or any(c.isspace() for c in hostname):
        raise TLSSetupError(f"not a usable host name: {hostname!r}")
    try:
        alt_names = _subject_alt_names(hostname)
    except UnicodeError:
        raise TLSSetupError(f"not a usable host name: {hostname!r}") from None
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    # The CN is limited to 64 characters; the SAN carries the name that clients check anyway.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostname)] if len(hostname) <= 64 else []
    )
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # devices with a slow clock
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=key_type == "rsa",  # TLS 1.0 RSA key exchange
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(key_file, key_pem, 0o600)
    _write_file(cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


_GENERATE_HINT = "Provide both files, or remove both to have a self-signed pair generated."


def _pair_exists(cert_file: Path, key_file: Path, hint: str = _GENERATE_HINT) -> bool:
    """Whether the pair is there; half a pair is an error, never something to overwrite."""
    cert_exists, key_exists = cert_file.exists(), key_file.exists()
    if cert_exists != key_exists:
        present, missing = (cert_file, key_file) if cert_exists else (key_file, cert_file)
        raise TLSSetupError(
            f"{present} exists but {missing} does not; not generating a new pair over it. {hint}"
        )
    return cert_exists


def ensure_server_certificate(settings: TLSSettings, hostname: str) -> bool:
    """Generate the self-signed pairs if no file exists; return whether they were generated.

    That is the first pair (RSA) and the second (ECDSA), and only when none of the four files
    exists: an operator's own first pair never gets a generated second one beside it. Exactly
    one existing file of a pair means something is wrong (a copied cert without its key, a
    half-finished deployment); overwriting it could destroy the operator's real certificate,
    so that is an error instead.
    """
    first = _pair_exists(settings.cert_file, settings.key_file)
    second_cert, second_key = settings.second_pair
    second = _pair_exists(
        second_cert, second_key, "Provide both files of the second pair, or remove both."
    )
    if second and not first:
        raise TLSSetupError(
            f"{second_cert} exists but {settings.cert_file} does not; the second pair is only "
            "served next to a first one. Provide the first pair, or remove both pairs to have "
            "self-signed ones generated."
        )
    if first or second:
        return False
    generate_self_signed(hostname, settings.cert_file, settings.key_file, "rsa")
    generate_self_signed(hostname, second_cert, second_key, "ecdsa")
    return True


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSSetupError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


ServerPair = tuple[x509.Certificate, list[x509.Certificate], PrivateKeyTypes]


def load_server_certificate(settings: TLSSettings) -> ServerPair:
    """Load and cross-check the first pair: (leaf, intermediates, key).

    ``cert_file`` may hold a full chain (leaf first, as ACME clients write it). Checked here,
    once, so a wrong pair fails at start with both file names instead of at the first client.
    """
    return _load_pair(settings.cert_file, settings.key_file)


def load_second_certificate(settings: TLSSettings, first: ServerPair) -> ServerPair | None:
    """Load the second pair if both its files exist (None if neither), checked against the
    first: another key type (OpenSSL keeps one certificate per key type, so a second RSA pair
    would silently replace the first), and self-signed only if the first is too (a generated
    ECDSA pair left next to an operator's real certificate would be shown to every modern
    client)."""
    hint = "Provide both files of the second pair, or remove both to serve the first alone."
    second_cert, second_key = settings.second_pair
    if not _pair_exists(second_cert, second_key, hint):
        return None
    second = _load_pair(second_cert, second_key)
    first_type, second_type = _key_type(first[2]), _key_type(second[2])
    if first_type == second_type:
        raise TLSSetupError(
            f"{second_key} and {settings.key_file} are both {first_type} keys; "
            "the second pair must have another key type (e.g. ECDSA next to RSA)"
        )
    if _self_signed(first[0]) != _self_signed(second[0]):
        signed, self_signed = (
            (settings.cert_file, second_cert)
            if _self_signed(second[0])
            else (second_cert, settings.cert_file)
        )
        raise TLSSetupError(
            f"{self_signed} is self-signed but {signed} is not: clients would see one or the "
            f"other depending on their key type. Replace {self_signed} too, or remove it and "
            "its key to serve one pair"
        )
    return second


def _key_type(key: PrivateKeyTypes) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    return type(key).__name__


def _self_signed(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject


def _load_pair(cert_file: Path, key_file: Path) -> ServerPair:
    cert_data = _read(cert_file, "certificate")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise TLSSetupError(f"{cert_file}: no PEM certificate in it") from None
    key_data = _read(key_file, "private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TLSSetupError(
            f"{key_file}: the key is encrypted; provide it without a passphrase"
        ) from None
    except ValueError:
        raise TLSSetupError(f"{key_file}: no PEM private key in it") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if chain[0].public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise TLSSetupError(f"{key_file} is not the key of the certificate in {cert_file}")
    return chain[0], chain[1:], key


def certificate_fingerprint(cert_file: Path) -> str:
    """SHA-256 fingerprint as ``AB:CD:…``: what users compare when a device asks to trust it."""
    certificate = x509.load_pem_x509_certificate(_read(cert_file, "certificate"))
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


# --------------------------------------------------------------------------------------------
# Client-facing (server) side


@implementer(ICipher)
class _Directive:
    """An OpenSSL cipher-string directive (``@SECLEVEL=0``) riding in the cipher list."""

    def __init__(self, text: str) -> None:
        self.fullName = text


@implementer(IAcceptableCiphers)
class _WithSecurityLevel:
    """Twisted's default cipher selection followed by ``@SECLEVEL=n``.

    CertificateOptions joins the selected ciphers' names into the OpenSSL cipher string; using
    its public IAcceptableCiphers hook keeps us off its private context-building code.
    """

    def __init__(self, level: int) -> None:
        self._base = defaultCiphers
        self._level = level

    def selectCiphers(self, availableCiphers: tuple[ICipher]) -> tuple[ICipher]:
        selected = tuple(self._base.selectCiphers(availableCiphers))
        # Twisted annotates these tuples as 1-tuples; they are really variable-length.
        return cast("tuple[ICipher]", (*selected, _Directive(f"@SECLEVEL={self._level}")))


def server_context_factory(
    settings: TLSSettings, min_version: TLSVersionName
) -> CertificateOptions:
    """Connection creator for our listeners (implicit TLS and STLS/STARTTLS alike).

    ``min_version`` below TLSv1.2 also lowers OpenSSL's security level, without which
    OpenSSL 3 would still refuse those old clients. Raises TLSSetupError for unusable files.
    """
    if min_version not in _VERSIONS:
        raise ValueError(f"unknown TLS version {min_version!r}")
    floor = _VERSIONS[min_version][0]
    first = load_server_certificate(settings)
    second = load_second_certificate(settings, first)
    leaf, intermediates, key = first
    options: dict[str, object] = {}
    if _is_legacy(min_version):
        options["insecurelyLowerMinimumTo"] = floor
        options["acceptableCiphers"] = _WithSecurityLevel(LEGACY_SECURITY_LEVEL)
    else:
        options["raiseMinimumTo"] = floor
    # pyOpenSSL takes cryptography objects directly (its own X509/PKey are deprecated);
    # Twisted's annotations still name the old types.
    # Resumption: a device polling every few minutes skips the certificate and key exchange
    # (docs/benchmark.md, "Handshakes"). Twisted turns both off by default; session IDs (a
    # server-side cache) serve old TLS 1.0 devices, tickets everyone else. The ticket keys are
    # per process: a restart or another process behind SO_REUSEPORT means one full handshake.
    options["enableSessions"] = True
    options["enableSessionTickets"] = True
    factory = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        extraCertChain=intermediates,  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )
    try:
        context = factory.getContext()  # build now: a bad pair or cipher string fails at start
    except SSL.Error as exc:
        raise TLSSetupError(
            f"cannot use {settings.cert_file} / {settings.key_file}: {exc}"
        ) from None
    if second is not None:
        # The factory keeps this context (getContext caches it), so every connection gets both.
        # OpenSSL holds one certificate per key type; the chain file gives the second pair its
        # own intermediates (the first pair's are the context's extra chain).
        second_cert, second_key = settings.second_pair
        try:
            context.use_certificate_chain_file(str(second_cert))
            context.use_privatekey(second[2])  # type: ignore[arg-type]
            context.check_privatekey()
        except SSL.Error as exc:
            raise TLSSetupError(f"cannot use {second_cert} / {second_key}: {exc}") from None
    return factory


def asyncio_server_context(settings: TLSSettings, min_version: TLSVersionName) -> ssl.SSLContext:
    """The same listener TLS as :func:`server_context_factory`, for asyncio servers (aiosmtpd):
    same certificate checks, same floor, the legacy security level only below TLS 1.2."""
    # The same checks and messages as for POP3.
    second = load_second_certificate(settings, load_server_certificate(settings))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version][1]
    if _is_legacy(min_version):
        context.set_ciphers(f"DEFAULT:@SECLEVEL={LEGACY_SECURITY_LEVEL}")
    pairs = [(settings.cert_file, settings.key_file)]
    if second is not None:
        pairs.append(settings.second_pair)
    for cert_file, key_file in pairs:  # one certificate per key type: both are kept
        try:
            context.load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:  # replaced between the check above and here
            raise TLSSetupError(f"cannot use {cert_file} / {key_file}: {exc}") from None
    return context


# --------------------------------------------------------------------------------------------
# Reloading the pair (SIGHUP)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The listeners' certificate and key, replaceable while they serve (SIGHUP).

    Every listener holds this one object, never a context: POP3 (Twisted, implicit TLS and
    STLS) asks :meth:`serverConnectionForTLS` for each new connection, and submission (asyncio,
    465 and STARTTLS) uses :attr:`asyncio_context`, whose SNI callback (run on every
    ClientHello, with or without a server name) switches the handshake to the context current
    at that moment. A connection already set up keeps the context it was made with, so open
    sessions keep the old pair. :meth:`reload` builds both new contexts before replacing
    either, so a broken pair changes nothing.
    """

    def __init__(
        self, settings: TLSSettings, pop3_min: TLSVersionName, submission_min: TLSVersionName
    ) -> None:
        self.settings = settings
        self._versions = (pop3_min, submission_min)
        self.certificate, self.second_certificate, self._twisted, self._asyncio = self._load()
        # The context the submission listeners are created with; it only dispatches.
        self.asyncio_context = asyncio_server_context(settings, submission_min)
        self.asyncio_context.sni_callback = self._switch

    def _load(
        self,
    ) -> tuple[x509.Certificate, x509.Certificate | None, CertificateOptions, ssl.SSLContext]:
        pop3_min, smtp_min = self._versions
        first = load_server_certificate(self.settings)
        second = load_second_certificate(self.settings, first)
        return (
            first[0],
            second[0] if second is not None else None,
            server_context_factory(self.settings, pop3_min),
            asyncio_server_context(self.settings, smtp_min),
        )

    def reload(self) -> x509.Certificate:
        """Read the files (both pairs) again and use them for new handshakes; the new leaf
        certificate of the first pair (:attr:`second_certificate` has the second's).

        Raises TLSSetupError (nothing replaced) when a new pair cannot be used.
        """
        loaded = self._load()
        self.certificate, self.second_certificate, self._twisted, self._asyncio = loaded
        return self.certificate

    @property
    def expires(self) -> datetime.datetime:
        """When the first of the certificates in use expires (the one to renew first)."""
        leaves = [self.certificate, self.second_certificate]
        return min(leaf.not_valid_after_utc for leaf in leaves if leaf is not None)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._twisted.getContext(), None)

    def _switch(self, connection: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        connection.context = self._asyncio


def describe_certificate(certificate: x509.Certificate) -> str:
    """What an operator checks after a rotation: serial, SHA-256 fingerprint, expiry."""
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex(":").upper()
    expires = certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%SZ")
    return f"serial {certificate.serial_number:x}, sha256 {fingerprint}, expires {expires}"


# --------------------------------------------------------------------------------------------
# Upstream (client) side


@implementer(IOpenSSLTrustRoot)
class _SystemTrustPlus:
    """The platform trust store plus, optionally, the anchors in one PEM file.

    ``ca_file`` is documented as *extra* trust anchors, so a private CA does not stop a public
    certificate from verifying after the operator's upstream switches.
    """

    def __init__(self, ca_file: Path | None) -> None:
        self._ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        if self._ca_file is not None:
            context.load_verify_locations(str(self._ca_file))


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS 1.2+ without certificate checks, still sending SNI (verify_certificate = false)."""

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions(
            raiseMinimumTo=TLSVersion.TLSv1_2, enableSessionTickets=True
        )
        try:
            ipaddress.ip_address(hostname)
            self._server_name: bytes | None = None  # RFC 6066: no IP literals in SNI
        except ValueError:
            self._server_name = hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientTLS:
    """One upstream's TLS, offering the last session it established on each new connection.

    Every POP login opens its own IMAP connection; without resumption each one pays a full
    handshake (certificate chain, signature check, key exchange) on both ends. The session is
    kept in memory only, per upstream (host, port, verification, CA file: one creator each, see
    :func:`upstream_tls`), and offered again only to that upstream; a session is recorded
    (:meth:`remember`) after the server has spoken over it, i.e. after the handshake and its
    certificate check succeeded. Resuming a session skips the certificate check, which is the
    point: the session's keys are bound to the peer that was verified when it was made.
    """

    def __init__(self, inner: IOpenSSLClientConnectionCreator) -> None:
        self._inner = inner
        self._session: SSL.Session | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        if self._session is not None:
            connection.set_session(self._session)
        return connection

    def remember(self, transport: object) -> None:
        """Keep the session of ``transport`` (a TLS transport past its handshake) for the next
        connection. TLS 1.3 sends its tickets after the handshake: call this once the server's
        first answer has been read, so the ticket came in before it."""
        connection = _tls_connection(transport)
        if connection is None:
            return
        session = connection.get_session()
        if session is not None:
            self._session = session

    def forget(self) -> None:
        """Drop the kept session (a connection failed: do not offer it again)."""
        self._session = None


def _tls_connection(transport: object) -> SSL.Connection | None:
    """The OpenSSL connection under ``transport``: a TLSMemoryBIOProtocol's own handle
    (implicit TLS), or that of the one a TCP connection put in front of its protocol when it
    started TLS (STARTTLS)."""
    for candidate in (transport, getattr(transport, "protocol", None)):
        handle = getattr(candidate, "getHandle", lambda: None)()
        if isinstance(handle, SSL.Connection):
            return handle
    return None


# The one cache of upstream client TLS: (host, port, verification, CA file and its version) ->
# its creator. Bounded: a CA file rewritten again and again leaves old keys behind.
_UpstreamKey = tuple[str, int, bool, Path | None, tuple[int, int]]
_UPSTREAM_TLS: dict[_UpstreamKey, ResumingClientTLS] = {}
_MAX_UPSTREAM_TLS = 64


def upstream_tls(
    hostname: str, port: int, verify: bool = True, ca_file: Path | None = None
) -> ResumingClientTLS:
    """The process's :class:`ResumingClientTLS` for this upstream (made on first use); every
    upstream TLS connection of the gateway gets its creator here.

    One creator, and so one OpenSSL context, serves every connection to the upstream: building
    a context loads the system trust store and the CA file, which took a quarter of the
    gateway's CPU when every upstream login built its own (docs/benchmark.md, "Submission").
    Keyed by everything that decides how the peer is checked, so a session made under one set
    of checks is never offered under another; the CA file's size and modification time are
    part of the key, so a file replaced on disk is read again.
    """
    key = (hostname, port, verify, ca_file, _file_version(ca_file))
    creator = _UPSTREAM_TLS.get(key)
    if creator is None:
        creator = ResumingClientTLS(client_context_factory(hostname, verify, ca_file))
        if len(_UPSTREAM_TLS) >= _MAX_UPSTREAM_TLS:
            _UPSTREAM_TLS.clear()
        _UPSTREAM_TLS[key] = creator
    return creator


def _file_version(path: Path | None) -> tuple[int, int]:
    """(mtime, size) of ``path``, so a file replaced on disk gets a fresh context; (0, 0) for no
    file or one that cannot be read (building the context reports that)."""
    if path is None:
        return (0, 0)
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


def client_context_factory(
    hostname: str, verify: bool = True, ca_file: Path | None = None
) -> IOpenSSLClientConnectionCreator:
    """A new connection creator for an upstream: TLS 1.2 or newer, verified unless told not.

    Verification checks the chain against the system store (plus ``ca_file``) and the
    ``hostname`` against the certificate via service_identity. Use the result with
    ``endpoints.wrapClientTLS(creator, endpoint)`` for implicit TLS or
    ``transport.startTLS(creator)`` after STARTTLS.

    Each call builds a new OpenSSL context (the trust store loaded again): connections take
    theirs from :func:`upstream_tls`, which keeps one per upstream.
    """
    if not verify:
        return _UnverifiedClientTLS(hostname)
    if ca_file is not None:
        try:
            x509.load_pem_x509_certificates(_read(ca_file, "CA file"))
        except ValueError:
            raise TLSSetupError(f"{ca_file}: no PEM certificate in it") from None
    return optionsForClientTLS(
        hostname,
        trustRoot=_SystemTrustPlus(ca_file),
        # Tickets: TLS 1.2 servers then hand out sessions to resume (ResumingClientTLS).
        extraCertificateOptions={
            "raiseMinimumTo": TLSVersion.TLSv1_2,
            "enableSessionTickets": True,
        },
    )
