"""Implicit TLS towards the upstream that hands the IMAP client whole reads, not records.

Twisted's ``TLSMemoryBIOProtocol`` decrypts a socket read record by record and passes every
record (at most 16 KiB of plaintext) to the protocol on its own. The IMAP client reads
256 KiB at a time (``READ_SIZE``) because each ``dataReceived`` is a round through the parser,
the message sinks and the POP3 writes; over TLS that round ran once per record, 16 times per
read. Here the records decrypted from one socket read are joined and delivered once, so a TLS
upstream costs the parser and the POP3 side what a plain one does (docs/benchmark.md, "TLS CPU").
Only the delivery changes: the bytes, their order and the handling of TLS errors and shutdown
are Twisted's.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

# What one SSL_read may return; a record holds at most 16 KiB, so this never splits one.
_RECORD_READ = 2**15


class WholeReadTLSTransport(BufferingTLSTransport):
    """Twisted's TLS transport, delivering the plaintext of one socket read in one call.

    Overrides ``_flushReceiveBIO``, the one place Twisted turns the receive BIO into
    ``dataReceived`` calls; it is the same loop, collecting instead of delivering per record.
    """

    def _flushReceiveBIO(self) -> None:
        chunks: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                chunks.append(self._tlsConnection.recv(_RECORD_READ))
            except WantReadError:
                break  # the rest of a record is still on its way
            except ZeroReturnError:  # the peer closed TLS: what came before it first
                self._deliver(chunks)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(chunks)
                self._tlsShutdownFinished(Failure())
        self._deliver(chunks)
        self._flushSendBIO()  # handshake messages, alerts, TLS 1.3 key updates

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            ProtocolWrapper.dataReceived(self, data)
        chunks.clear()


class _WholeReadTLSFactory(TLSMemoryBIOFactory):
    protocol = WholeReadTLSTransport


async def connect_tls(
    endpoint: IStreamClientEndpoint,
    creator: IOpenSSLClientConnectionCreator,
    factory: IProtocolFactory,
) -> None:
    """``endpoint.connect(factory)`` through ``wrapClientTLS(creator, ...)``, with the transport
    above. ``factory`` should let go of its protocol once built (account's ``_OneConnection``):
    anything else that holds it would keep the session alive after its connection closed."""
    await endpoint.connect(_WholeReadTLSFactory(creator, True, factory))
