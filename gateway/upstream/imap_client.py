"""Twisted glue for the sans-IO ``ImapConnection``: bytes in and out, flow control, timeouts.

Every protocol rule (tags, pipelining, literals, which response belongs to which command) lives
in ``gateway.proto.imap_connection``. Here: each command's Deferred, the sinks its message bodies
stream to (the transport can be paused as a push producer, so a slow POP client slows the IMAP
download too), and the timer. Only ``gateway.upstream.account`` issues commands.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from gateway.proto.imap import CommandPart, LiteralChunk, LiteralEnd, ResponseError, Status
from gateway.proto.imap_connection import (
    BodyBegin,
    Bye,
    Command,
    Completed,
    ConnectionEvent,
    Greeting,
    ImapConnection,
)
from gateway.proto.imap_connection import Response as Response
from gateway.transports import send_at_once, set_buffer_size, write_through


class ImapError(Exception):
    """Base of everything that goes wrong talking to the upstream IMAP server."""


class ImapConnectionLost(ImapError):
    pass


class ImapTimeout(ImapError):
    """The server did not answer within the timeout; the connection has been closed."""


class ImapCommandFailed(ImapError):
    """A NO or BAD completion; ``status`` holds the server's code and text."""

    def __init__(self, command: str, status: Status, challenges: Sequence[str] = ()) -> None:
        super().__init__(f"{command} failed: {status.kind} {status.text}")
        self.status = status
        # The server's continuation texts, for AUTHENTICATE (a SASL error challenge).
        self.challenges = tuple(challenges)


class BodySink(TypingProtocol):
    """Receives a streamed literal. ``begin`` tells the size before any data."""

    def literal_begin(self, size: int) -> None: ...
    def literal_data(self, data: bytes) -> None: ...
    def literal_end(self) -> None: ...


class ReadObserver(TypingProtocol):
    """Told when the responses of one read from the server start and end being dispatched.

    A sink that writes per event (one write per message body) can hold its writes meanwhile
    and send them at ``read_done`` in one system call.
    """

    def read_started(self) -> None: ...
    def read_done(self) -> None: ...


class BodyCollector:
    """A BodySink that keeps each body whole: for small ones (state messages, Sent copies)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._parts: list[bytes] = []

    def literal_begin(self, size: int) -> None:
        self._parts = []

    def literal_data(self, data: bytes) -> None:
        self._parts.append(data)

    def literal_end(self) -> None:
        self.bodies.append(b"".join(self._parts))


@dataclass(eq=False, slots=True)
class _Call:
    deferred: Deferred[Response]
    sink: BodySink | None  # takes any body no UID-bound sink claims
    sinks: Mapping[int, BodySink]  # the body of each of these UIDs


# Bytes read from the socket at once: message bodies are the bulk of the traffic, and every read
# costs a round through parser, sinks and writes (Twisted's default is 64 KiB).
READ_SIZE = 256 * 1024
# Over TLS each socket read goes whole into the connection's receive BIO, and OpenSSL keeps that
# buffer at its largest size for the life of the connection (SSL_MODE_RELEASE_BUFFERS, which
# Twisted sets, frees the record buffers, not the BIO's): a 256 KiB read left every TLS session
# holding a quarter MiB after its first download. Twisted hands the plaintext over in 32 KiB
# pieces anyway, so the larger read would only save recv calls (docs/benchmark.md, "Memory per
# session").
TLS_READ_SIZE = 64 * 1024


class ImapClientProtocol(Protocol):
    """Carries bytes between the socket and an ``ImapConnection``; keeps the timer.

    Every wait for the server is bounded: while a command is outstanding and reading is not
    paused by us, ``timeout`` seconds without a byte from the server fail every command with
    ``ImapTimeout`` and close the connection (a hung server must not hold a device for ever).
    The clock is injected, so tests drive it with ``twisted.internet.task.Clock``.
    """

    def __init__(self, clock: IReactorTime | None = None, timeout: float = 0) -> None:
        """``timeout`` > 0 (with a ``clock``): the longest wait for the server while a command
        is outstanding; 0 waits for ever (only for tests of other things)."""
        self.connection = ImapConnection()
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self._paused = False
        self.greeting: Deferred[Status] = Deferred()
        self._calls: dict[Command, _Call] = {}
        self._body_sink: BodySink | None = None
        self.read_observer: ReadObserver | None = None

    # -- public ---------------------------------------------------------------------------

    def command(
        self,
        *parts: CommandPart,
        sink: BodySink | None = None,
        sinks: Mapping[int, BodySink] | None = None,
        continuation: bytes | Sequence[bytes] | None = None,
    ) -> Deferred[Response]:
        """Send a command; the Deferred fires with its Response, or fails with ImapError.

        Message bodies in the responses go to the sink ``sinks`` names for their UID, else to
        ``sink``, which takes every body no UID-bound sink claims. ``continuation`` is a line
        sent when the server asks for more (a SASL response for a server without SASL-IR); a
        sequence of lines answers that many requests, one each.
        """
        sinks = sinks or {}
        command = self.connection.send(
            *parts, body_uids=sinks.keys(), any_body=sink is not None, continuation=continuation
        )
        d: Deferred[Response] = Deferred()
        if self.connection.closed:
            d.errback(ImapConnectionLost("connection to IMAP server lost"))
            return d
        self._calls[command] = _Call(d, sink, sinks)
        self._flush()
        return d

    def has(self, capability: str) -> bool:
        return self.connection.has(capability)

    @property
    def capabilities(self) -> frozenset[str]:
        return self.connection.capabilities

    def start_tls(self, context: IOpenSSLClientConnectionCreator) -> None:
        """Switch to TLS after a successful STARTTLS; forget what was said in the clear."""
        self.connection.forget_capabilities()
        ITLSTransport(self.transport).startTLS(context)
        set_buffer_size(self.transport, TLS_READ_SIZE)

    def pauseProducing(self) -> None:
        """Stop reading (the POP client is slow); the server is not waited for meanwhile."""
        self._paused = True
        self._watch()
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self._paused = False
        self._watch()
        self.transport.resumeProducing()  # type: ignore[union-attr]

    # -- Twisted ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        tls = ISSLTransport.providedBy(self.transport)  # implicit TLS: a TLS wrapper
        set_buffer_size(self.transport, TLS_READ_SIZE if tls else READ_SIZE)
        send_at_once(self.transport)  # pipelined commands leave together, not an RTT apart

    def dataReceived(self, data: bytes) -> None:
        connection = self.connection
        connection.receive_data(data)
        observer = self.read_observer
        if observer is not None:
            observer.read_started()
        try:
            while (event := connection.next_event()) is not None:
                if isinstance(event, LiteralChunk):
                    if self._body_sink is not None:
                        self._body_sink.literal_data(event.data)
                else:
                    self._handle(event)
            self._flush()
        except ResponseError as e:
            self._fail_all(ImapError(f"protocol error from IMAP server: {e}"))
            self.transport.loseConnection()  # type: ignore[union-attr]
        finally:
            if observer is not None:
                observer.read_done()
            self._watch(progress=True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        message = "connection to IMAP server lost"
        if reason is not None and not reason.check(ConnectionDone):
            # A refused certificate ends the connection too: the operator needs to see why.
            message += f": {reason.getErrorMessage()}"
        self._fail_all(ImapConnectionLost(message))

    # -- internals --------------------------------------------------------------------------

    def _handle(self, event: ConnectionEvent) -> None:
        if isinstance(event, BodyBegin):
            call = self._calls[event.command]
            uid_sink = call.sinks.get(event.uid) if event.uid is not None else None
            self._body_sink = uid_sink if uid_sink is not None else call.sink
            if self._body_sink is not None:
                self._body_sink.literal_begin(event.size)
        elif isinstance(event, LiteralEnd):
            if self._body_sink is not None:
                self._body_sink.literal_end()
            self._body_sink = None
        elif isinstance(event, Completed):
            d = self._calls.pop(event.command).deferred
            status = event.response.status
            if status.kind == "OK":
                d.callback(event.response)
            else:
                d.errback(ImapCommandFailed(event.command.name, status, event.command.challenges))
        elif isinstance(event, Greeting):
            if event.status.kind in ("OK", "PREAUTH"):
                self.greeting.callback(event.status)
            else:
                self.greeting.errback(ImapCommandFailed("greeting", event.status))
        elif isinstance(event, Bye):
            self._fail_all(ImapConnectionLost(f"IMAP server said BYE: {event.status.text}"))

    def _flush(self) -> None:
        out = self.connection.data_to_send()
        if out and self.transport is not None:
            write_through(self.transport, out)
        self._watch()

    def _watch(self, progress: bool = False) -> None:
        """Run the timer exactly while the server owes an answer and we are reading.

        ``progress``: bytes just arrived, so the wait starts again from now.
        """
        if self._clock is None or self._timeout <= 0:
            return
        timer = self._timer
        waiting = self.connection.awaiting_server and not self._paused
        if not waiting:
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = None
        elif timer is None or not timer.active():
            self._timer = self._clock.callLater(self._timeout, self._timed_out)
        elif progress:
            timer.reset(self._timeout)

    def _timed_out(self) -> None:
        self._timer = None
        oldest = self.connection.oldest
        waited_for = oldest.name if oldest is not None else "command"
        self._fail_all(
            ImapTimeout(f"no answer from IMAP server to {waited_for} within {self._timeout:g}s")
        )
        if self.transport is not None:
            # No LOGOUT: the server is not answering; nothing more is read or written.
            abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
            abort()

    def _fail_all(self, error: ImapError) -> None:
        if not self.connection.greeted:
            self.connection.greeted = True
            self.greeting.errback(error)
        waiting = [self._calls.pop(command) for command in self.connection.abandon()]
        self._body_sink = None
        self._watch()
        for call in waiting:
            call.deferred.errback(error)
