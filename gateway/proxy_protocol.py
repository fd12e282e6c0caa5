"""PROXY protocol (HAProxy v1 and v2) in front of the POP3 listeners.

Behind a load balancer every connection comes from the balancer; the PROXY header it sends
first names the real client. The header is read *below* TLS (HAProxy ``send-proxy`` in TCP mode
puts it before the ClientHello), and only then is the POP3 protocol (and, on an implicit TLS
listener, the TLS layer under it) built, with the client's address from the header: so every
rule that looks at ``getPeer()`` (logs, insecure_auth_networks, connection limits, the failure
throttle, the IP forwarded upstream in IMAP ID) sees the client, with nothing to move later.

Parsing is Twisted's (``twisted.protocols.haproxy``'s V1Parser and V2Parser). Twisted's own
wrapper is not used: it starts the wrapped protocol before the header has arrived (so the
greeting and ``connectionMade`` see the balancer's address), wants the signature in the first
read, has no timeout and accepts a header from anyone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from gateway.addresses import Networks, client_ip, format_peer
from gateway.limits import LogBudget

log = logging.getLogger("popgate.proxy")

# A balancer sends the header at once; a peer that has not within this long never will.
HEADER_TIMEOUT = 10.0
# Refusals are logged at most once per this many seconds per reason (a port scan, a
# misconfigured balancer), with the number left out in the next line.
REFUSAL_LOG_INTERVAL = 60.0
_V1_MAX = 107  # the longest v1 header line, CRLF included (the specification's bound)


class ProxyHeaderError(Exception):
    """The connection does not start with a valid PROXY header."""


@dataclass(frozen=True)
class ProxyHeader:
    """The parsed header: ``source`` is the client, None for a v2 LOCAL (the balancer's own
    health check) or a v1 ``UNKNOWN``, where the connection's own peer stands."""

    source: IPv4Address | IPv6Address | None
    remaining: bytes  # what followed the header in the same reads: the client's first bytes


class ProxyHeaderReader:
    """Feeds bytes to the right Twisted parser; sans-IO, bounded (a v2 header is at most
    16 + 65535 octets, a v1 line 107)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._parser: V1Parser | V2Parser | None = None

    def feed(self, data: bytes) -> ProxyHeader | None:
        """None until the header is complete; raises ProxyHeaderError for anything else."""
        if self._parser is None:
            data, self._buffer = self._buffer + data, b""
            if data.startswith(b"PROXY "):
                self._parser = V1Parser()
            elif len(data) >= 16 and data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif b"PROXY "[: len(data)] == data[:6] or (
                len(data) < 16 and V2Parser.PREFIX[: len(data)] == data[:12]
            ):
                self._buffer = data  # a prefix of either signature: wait for more
                return None
            else:
                raise ProxyHeaderError("no PROXY header")
        if isinstance(self._parser, V1Parser):
            line = self._parser.buffer + data
            if line.startswith(b"PROXY UNKNOWN") and b"\r\n" in line[:_V1_MAX]:
                # The balancer's own connection (a health check): Twisted's parser rejects it.
                return ProxyHeader(None, line.split(b"\r\n", 1)[1])
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader as e:
            raise ProxyHeaderError(f"invalid PROXY header ({type(e).__name__})") from None
        if isinstance(self._parser, V1Parser) and len(self._parser.buffer) > _V1_MAX:
            raise ProxyHeaderError("invalid PROXY header (line too long)")
        if info is None:
            return None
        source = info.source
        if not isinstance(source, (IPv4Address, IPv6Address)):
            source = None
        elif client_ip(source.host) is None:  # Twisted's v1 parser takes any word
            raise ProxyHeaderError("invalid PROXY header (source is no IP address)")
        return ProxyHeader(source, remaining or b"")


class ProxyHeaderFactory(WrappingFactory):
    """Wraps a listener's factory: every connection must come from ``trusted`` and start with
    a PROXY header within ``timeout``; only then is the wrapped protocol built, for the
    client's address."""

    noisy = False

    def __init__(
        self,
        wrapped: Factory,
        reactor: IReactorTime,
        trusted: Networks,
        service: str,
        refusal: bytes = b"",
        timeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.trusted = trusted
        self.service = service
        self.refusal = refusal  # written before closing (empty on TLS: the client awaits TLS)
        self.timeout = timeout
        self.refusals = RefusalLog(service, reactor.seconds)

    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper:
        return _HeaderProtocol(self, addr)


class RefusalLog:
    """One warning per refused connection, at most one per reason and REFUSAL_LOG_INTERVAL."""

    REASONS = ("untrusted", "header", "timeout")

    def __init__(self, service: str, clock: Callable[[], float]) -> None:
        self.service = service
        self._budgets = {r: LogBudget(REFUSAL_LOG_INTERVAL, clock) for r in self.REASONS}

    def refused(self, reason: str, host: str | None, port: object, detail: str) -> None:
        left_out = self._budgets[reason].take()
        if left_out is None:
            return
        shown = format_peer(host, port)  # type: ignore[arg-type]
        line = f"{self.service} connection from {shown} refused: {detail}"
        if left_out:
            line += f" ({left_out} more refused for this reason since the last such line)"
        log.warning("%s", line)


class _HeaderProtocol(ProtocolWrapper):
    """Reads the header, then becomes a plain wrapper around the protocol built for the
    client's address (``getPeer()`` answers that address from then on)."""

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.wrappedProtocol = None  # type: ignore[assignment]
        self.addr = addr
        self._reader: ProxyHeaderReader | None = ProxyHeaderReader()
        self._client: IAddress | None = None
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport):
        # Protocol.makeConnection, not ProtocolWrapper's: the wrapped one does not exist yet.
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        if self.addr is None or getattr(self.addr, "host", None) not in self.factory.trusted:
            self._refuse("untrusted", "not in [security] proxy_networks")
            return
        self._timer = self.factory.reactor.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._reader is None:
            if self.wrappedProtocol is not None:
                self.wrappedProtocol.dataReceived(data)
            return
        try:
            header = self._reader.feed(data)
        except ProxyHeaderError as e:
            self._refuse("header", str(e))
            return
        if header is None:
            return
        self._reader = None
        self._cancel_timer()
        self._client = header.source or self.addr
        protocol = self.factory.wrappedFactory.buildProtocol(self._client)
        if protocol is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.wrappedProtocol = protocol
        self.factory.registerProtocol(self)
        protocol.makeConnection(self)
        if header.remaining:
            protocol.dataReceived(header.remaining)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        self._reader = None
        if self.wrappedProtocol is not None:
            super().connectionLost(reason)

    def getPeer(self) -> IAddress:
        if self._client is not None:
            return self._client
        return self.transport.getPeer()  # type: ignore[union-attr]

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("timeout", f"no PROXY header within {self.factory.timeout:g} s")

    def _refuse(self, reason: str, detail: str) -> None:
        self._cancel_timer()
        self._reader = None
        host, port = getattr(self.addr, "host", None), getattr(self.addr, "port", None)
        self.factory.refusals.refused(reason, host, port, detail)
        assert self.transport is not None
        if self.factory.refusal:
            self.transport.write(self.factory.refusal)
        self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
