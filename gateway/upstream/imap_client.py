"""A thin Twisted IMAP client: feeds bytes to the sans-IO parser, matches responses to commands.

Commands may be pipelined; untagged responses belong to the oldest command still waiting, which
is exact for how the gateway pipelines (FETCHes of one mailbox, in order). Large literals are not
collected: they go to the ``sink`` of the command that asked for them, chunk by chunk, and the
transport can be paused as a push producer so a slow POP client slows the IMAP download too.

Every wait for the server is bounded: while a command is outstanding and reading is not paused
by us, ``timeout`` seconds without a byte from the server fail every command with
``ImapTimeout`` and close the connection (a hung server must not hold a device for ever). The
clock is injected, so tests drive it with ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from gateway.proto.imap import (
    CommandPart,
    Continuation,
    Data,
    FetchBatch,
    LiteralBegin,
    LiteralChunk,
    LiteralEnd,
    ResponseError,
    ResponseParser,
    Status,
    encode_command,
    fetch_uid,
)
from gateway.transports import set_buffer_size, write_through


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


@dataclass
class Response:
    status: Status
    untagged: list[Data | Status | FetchBatch] = field(default_factory=list)


@dataclass(eq=False)
class _Pending:
    name: str
    tag: str
    parts: deque[bytes]
    deferred: Deferred[Response]
    sink: BodySink | None  # takes any body no UID-bound sink claims
    sinks: Mapping[int, BodySink]  # the body of each of these UIDs
    untagged: list[Data | Status | FetchBatch] = field(default_factory=list)
    challenges: list[str] = field(default_factory=list)  # the "+ " texts it was sent


# Bytes read from the socket at once: message bodies are the bulk of the traffic, and every read
# costs a round through parser, sinks and writes (Twisted's default is 64 KiB).
READ_SIZE = 256 * 1024


class ImapClientProtocol(Protocol):
    def __init__(self, clock: IReactorTime | None = None, timeout: float = 0) -> None:
        """``timeout`` > 0 (with a ``clock``): the longest wait for the server while a command
        is outstanding; 0 waits for ever (only for tests of other things)."""
        self.parser = ResponseParser()
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self._paused = False
        self.greeting: Deferred[Status] = Deferred()
        self.capabilities: frozenset[str] = frozenset()
        self._counter = 0
        self._pending: deque[_Pending] = deque()  # sent (or being sent), oldest first
        self._unsent: deque[_Pending] = deque()  # queued behind a synchronizing literal
        self._continuing: _Pending | None = None  # waiting for "+" to send its next part
        self._streaming_to: BodySink | None = None
        self._greeted = False
        self._lost = False
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

        Message bodies in the responses go to the sink ``sinks`` names for their UID (servers
        answer pipelined FETCHes interleaved, so order alone cannot tell whose body is whose),
        else to ``sink``, which takes every body no UID-bound sink claims. ``continuation`` is a
        line sent when the server asks for more (a SASL response for a server without SASL-IR);
        a sequence of lines answers that many requests, one each.
        """
        self._counter += 1
        tag = f"G{self._counter}"
        encoded = encode_command(tag, *parts, literal_plus=self.has("LITERAL+"))
        name = " ".join(str(p) for p in parts[:2] if isinstance(p, str) and p.isupper())
        lines = deque(encoded.parts)
        if isinstance(continuation, bytes):
            continuation = (continuation,)
        lines.extend(line + b"\r\n" for line in continuation or ())
        pending = _Pending(name or "command", tag, lines, Deferred(), sink, sinks or {})
        if self._lost:
            pending.deferred.errback(ImapConnectionLost("connection to IMAP server lost"))
            return pending.deferred
        if self._continuing is not None or self._unsent:
            self._unsent.append(pending)
        else:
            self._send(pending)
        return pending.deferred

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    def start_tls(self, context: IOpenSSLClientConnectionCreator) -> None:
        """Switch to TLS after a successful STARTTLS; forget what was said in the clear."""
        self.capabilities = frozenset()
        ITLSTransport(self.transport).startTLS(context)

    def update_capabilities(self, tokens: Sequence[object]) -> None:
        self.capabilities = frozenset(str(t).upper() for t in tokens[1:] if isinstance(t, str))

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
        set_buffer_size(self.transport, READ_SIZE)

    def dataReceived(self, data: bytes) -> None:
        self.parser.receive_data(data)
        observer = self.read_observer
        if observer is not None:
            observer.read_started()
        try:
            while (event := self.parser.next_event()) is not None:
                self._dispatch(event)
        except ResponseError as e:
            self._fail_all(ImapError(f"protocol error from IMAP server: {e}"))
            self.transport.loseConnection()  # type: ignore[union-attr]
        finally:
            if observer is not None:
                observer.read_done()
            self._watch(progress=True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        message = "connection to IMAP server lost"
        if reason is not None and not reason.check(ConnectionDone):
            # A refused certificate ends the connection too: the operator needs to see why.
            message += f": {reason.getErrorMessage()}"
        self._fail_all(ImapConnectionLost(message))

    # -- internals --------------------------------------------------------------------------

    def _send(self, pending: _Pending) -> None:
        self._pending.append(pending)
        write_through(self.transport, [pending.parts.popleft()])
        if pending.parts:
            self._continuing = pending
        self._watch()

    def _watch(self, progress: bool = False) -> None:
        """Run the timer exactly while the server owes an answer and we are reading.

        ``progress``: bytes just arrived, so the wait starts again from now.
        """
        if self._clock is None or self._timeout <= 0:
            return
        timer = self._timer
        waiting = bool(self._pending) and not self._paused and not self._lost
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
        waited_for = self._pending[0].name if self._pending else "command"
        self._fail_all(
            ImapTimeout(f"no answer from IMAP server to {waited_for} within {self._timeout:g}s")
        )
        if self.transport is not None:
            # No LOGOUT: the server is not answering; nothing more is read or written.
            abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
            abort()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, LiteralChunk):
            if self._streaming_to is not None:
                self._streaming_to.literal_data(event.data)
        elif isinstance(event, LiteralBegin):
            uid = event.uid if event.uid is not None else fetch_uid(event.prefix)
            self._streaming_to = self._sink_for(uid)
            if self._streaming_to is not None:
                self._streaming_to.literal_begin(event.size)
        elif isinstance(event, LiteralEnd):
            if self._streaming_to is not None:
                self._streaming_to.literal_end()
            self._streaming_to = None
        elif isinstance(event, Data):
            self._untagged(event)
        elif isinstance(event, Status):
            if event.tag != "*":
                self._complete(event)
            else:
                self._untagged(event)
        elif isinstance(event, FetchBatch):
            if self._pending:
                self._pending[0].untagged.append(event)
        elif isinstance(event, Continuation):
            self._continue(event)

    def _untagged(self, event: Status | Data) -> None:
        if isinstance(event, Status):
            if event.code_name == "CAPABILITY" and event.code:
                self.update_capabilities(event.code)
            if not self._greeted:
                self._greeted = True
                if event.kind in ("OK", "PREAUTH"):
                    self.greeting.callback(event)
                else:
                    self.greeting.errback(ImapCommandFailed("greeting", event))
                return
            if event.kind == "BYE":
                self._fail_all(ImapConnectionLost(f"IMAP server said BYE: {event.text}"))
                return
        elif event.tokens and str(event.tokens[0]).upper() == "CAPABILITY":
            self.update_capabilities(event.tokens)
        if self._pending:
            self._pending[0].untagged.append(event)
            if isinstance(event, Data):
                _deliver_inline_bodies(event, self._sink_for)

    def _sink_for(self, uid: int | None) -> BodySink | None:
        """The sink waiting for the body of ``uid``, else the first one taking any body."""
        if uid is not None:
            for p in self._pending:
                if uid in p.sinks:
                    return p.sinks[uid]
        return next((p.sink for p in self._pending if p.sink is not None), None)

    def _complete(self, status: Status) -> None:
        if status.code_name == "CAPABILITY" and status.code:
            self.update_capabilities(status.code)
        for pending in self._pending:
            if pending.tag == status.tag:
                break
        else:
            return  # a tag we never sent: ignore rather than misattribute
        self._pending.remove(pending)
        if pending is self._continuing:
            self._continuing = None  # refused before its literal was wanted
            self._flush_unsent()
        if status.kind == "OK":
            pending.deferred.callback(Response(status, pending.untagged))
        else:
            failure = ImapCommandFailed(pending.name, status, pending.challenges)
            pending.deferred.errback(failure)

    def _continue(self, event: Continuation) -> None:
        pending = self._continuing
        if pending is None:
            return
        if len(pending.challenges) < 4:  # bounded, whatever the server sends
            pending.challenges.append(event.text)
        write_through(self.transport, [pending.parts.popleft()])
        if not pending.parts:
            self._continuing = None
            self._flush_unsent()

    def _flush_unsent(self) -> None:
        while self._unsent and self._continuing is None:
            self._send(self._unsent.popleft())

    def _fail_all(self, error: ImapError) -> None:
        if not self._greeted:
            self._greeted = True
            self.greeting.errback(error)
        waiting = list(self._pending) + list(self._unsent)
        self._pending.clear()
        self._unsent.clear()
        self._continuing = None
        self._lost = True
        self._watch()
        for pending in waiting:
            pending.deferred.errback(error)


def _deliver_inline_bodies(event: Data, sink_for: Callable[[int | None], BodySink | None]) -> None:
    """Hand a body that arrived inside its FETCH line to its sink, as if it had been streamed.

    Small literals are parsed inline; callers should not have to care which way a body came.
    """
    tokens = event.tokens
    if len(tokens) < 3 or str(tokens[1]).upper() != "FETCH" or not isinstance(tokens[2], list):
        return
    items = tokens[2]
    if not any(isinstance(value, bytes) for value in items[1::2]):
        return  # every body was streamed already (or there is none)
    uid = None
    for i in range(0, len(items) - 1, 2):
        if str(items[i]).upper() == "UID" and str(items[i + 1]).isdigit():
            uid = int(str(items[i + 1]))
    for i in range(0, len(items) - 1, 2):
        value = items[i + 1]
        if isinstance(value, bytes) and str(items[i]).upper().startswith("BODY["):
            sink = sink_for(uid)
            if sink is None:
                return
            sink.literal_begin(len(value))
            sink.literal_data(value)
            sink.literal_end()
