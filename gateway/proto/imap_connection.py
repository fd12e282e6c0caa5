"""An IMAP client connection without I/O: commands in, bytes out; bytes in, events out.

In the spirit of h11's ``Connection``. It owns everything that is protocol rather than
transport: tags, the queue of commands (pipelined, except behind a synchronizing literal, which
waits for the server's ``+``), LITERAL+ where offered, the greeting, BYE, capabilities, and
which command each response belongs to. The caller writes ``data_to_send()`` and feeds what it
reads to ``receive_data()``; it keeps the clock (timeouts) and the socket.

Which command an untagged response belongs to: the oldest one still waiting, which is exact
for how the gateway pipelines (FETCHes of one mailbox, in order). Message bodies are claimed by
UID, because servers answer pipelined FETCHes interleaved: a body goes to the command that
asked for its UID, else to the oldest one that takes any body. They come out as ``BodyBegin``,
``LiteralChunk``..., ``LiteralEnd``, chunk by chunk as they arrive, so a 50 MB body is never
held whole; a body that arrived inside its FETCH line comes out the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

from gateway.proto.imap import (
    CommandPart,
    Continuation,
    Data,
    FetchBatch,
    LiteralBegin,
    LiteralChunk,
    LiteralEnd,
    ResponseParser,
    Status,
    encode_command,
    fetch_uid,
)

Untagged = Data | Status | FetchBatch
_NO_UIDS: frozenset[int] = frozenset()


@dataclass(eq=False, slots=True)
class Command:
    """One command, from ``send`` until its tagged completion."""

    name: str  # e.g. "UID FETCH", for messages
    tag: str
    parts: deque[bytes]  # still to send; each after a continuation request
    body_uids: Container[int]  # the UIDs whose bodies this command asked for
    any_body: bool  # takes every body no command claims by UID
    untagged: list[Untagged] = field(default_factory=list)
    challenges: list[str] = field(default_factory=list)  # the "+ " texts it was sent (at most 4)


@dataclass(slots=True)
class Response:
    status: Status
    untagged: list[Untagged] = field(default_factory=list)


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's first response: OK, PREAUTH, or BYE (it will not serve us)."""

    status: Status


@dataclass(frozen=True, slots=True)
class Completed:
    """The tagged completion of ``command`` (OK, NO or BAD), with its untagged responses."""

    command: Command
    response: Response


@dataclass(frozen=True, slots=True)
class Bye:
    """An untagged BYE after the greeting: the server is closing; nothing more completes."""

    status: Status


@dataclass(slots=True)
class BodyBegin:
    """A message body for ``command`` begins; ``LiteralChunk``s and a ``LiteralEnd`` follow."""

    command: Command
    uid: int | None
    size: int


# What ``next_event`` returns. LiteralChunk and LiteralEnd are the parser's own events, passed
# on as they are: one or more per downloaded message, so nothing is built for them.
ConnectionEvent = Greeting | Completed | Bye | BodyBegin | LiteralChunk | LiteralEnd


class ImapConnection:
    def __init__(self, stream_threshold: int = 64 * 1024) -> None:
        self.parser = ResponseParser(stream_threshold)
        self.capabilities: frozenset[str] = frozenset()
        self.greeted = False
        self.closed = False
        self._counter = 0
        self._pending: deque[Command] = deque()  # sent (or being sent), oldest first
        self._unsent: deque[Command] = deque()  # queued behind a synchronizing literal
        self._continuing: Command | None = None  # waiting for "+" to send its next part
        self._outgoing: list[bytes] = []
        self._events: deque[ConnectionEvent] = deque()  # made from one parser event
        self._routing = False  # the literal being received goes out as body events

    # -- commands in, bytes out ---------------------------------------------------------------

    def send(
        self,
        *parts: CommandPart,
        body_uids: Container[int] = _NO_UIDS,
        any_body: bool = False,
        continuation: bytes | Sequence[bytes] | None = None,
    ) -> Command:
        """Queue a command; its bytes are in ``data_to_send()`` as soon as they may go.

        ``continuation`` is a line sent when the server asks for more (a SASL response for a
        server without SASL-IR); a sequence of lines answers that many requests, one each (the
        answer to a SASL error challenge). On a closed connection nothing is queued.
        """
        self._counter += 1
        tag = f"G{self._counter}"
        encoded = encode_command(tag, *parts, literal_plus=self.has("LITERAL+"))
        name = " ".join(str(p) for p in parts[:2] if isinstance(p, str) and p.isupper())
        lines = deque(encoded.parts)
        if isinstance(continuation, bytes):
            continuation = (continuation,)
        lines.extend(line + b"\r\n" for line in continuation or ())
        command = Command(name or "command", tag, lines, body_uids, any_body)
        if self.closed:
            return command
        if self._continuing is not None or self._unsent:
            self._unsent.append(command)
        else:
            self._start(command)
        return command

    def data_to_send(self) -> list[bytes]:
        """The bytes to write now, in order (a list the caller may keep)."""
        out, self._outgoing = self._outgoing, []
        return out

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    def forget_capabilities(self) -> None:
        """After STARTTLS: what was said in the clear is not to be trusted."""
        self.capabilities = frozenset()

    @property
    def awaiting_server(self) -> bool:
        """A command has been sent and the server owes its answer."""
        return bool(self._pending)

    @property
    def oldest(self) -> Command | None:
        return self._pending[0] if self._pending else None

    def abandon(self) -> list[Command]:
        """Close: every command not completed, oldest first; nothing more is sent or read."""
        waiting = list(self._pending) + list(self._unsent)
        self._pending.clear()
        self._unsent.clear()
        self._continuing = None
        self._events.clear()
        self.closed = True
        return waiting

    # -- bytes in, events out -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self.parser.receive_data(data)

    def next_event(self) -> ConnectionEvent | None:
        """The next event, or None until more data arrives. Raises ``ResponseError`` on input
        that is not IMAP: the connection cannot be trusted further."""
        events = self._events
        if events:
            return events.popleft()
        parser = self.parser
        while (event := parser.next_event()) is not None:
            if isinstance(event, LiteralChunk):
                if self._routing:
                    return event
            elif isinstance(event, LiteralBegin):
                uid = event.uid if event.uid is not None else fetch_uid(event.prefix)
                owner = self._claim(uid)
                self._routing = owner is not None
                if owner is not None:
                    return BodyBegin(owner, uid, event.size)
            elif isinstance(event, LiteralEnd):
                if self._routing:
                    self._routing = False
                    return event
            elif isinstance(event, FetchBatch):
                if self._pending:
                    self._pending[0].untagged.append(event)
            elif isinstance(event, Data):
                self._data(event)
                if events:
                    return events.popleft()
            elif isinstance(event, Status):
                made = self._status(event) if event.tag == "*" else self._complete(event)
                if made is not None:
                    return made
            elif isinstance(event, Continuation):
                self._continue(event)
        return None

    # -- internals ----------------------------------------------------------------------------

    def _start(self, command: Command) -> None:
        self._pending.append(command)
        self._outgoing.append(command.parts.popleft())
        if command.parts:
            self._continuing = command

    def _claim(self, uid: int | None) -> Command | None:
        """The command waiting for the body of ``uid``, else the first one taking any body."""
        if uid is not None:
            for command in self._pending:
                if uid in command.body_uids:
                    return command
        return next((c for c in self._pending if c.any_body), None)

    def _update_capabilities(self, tokens: Sequence[object]) -> None:
        self.capabilities = frozenset(str(t).upper() for t in tokens[1:] if isinstance(t, str))

    def _data(self, event: Data) -> None:
        tokens = event.tokens
        if tokens and str(tokens[0]).upper() == "CAPABILITY":
            self._update_capabilities(tokens)
        if self._pending:
            self._pending[0].untagged.append(event)
            self._inline_bodies(event)

    def _inline_bodies(self, event: Data) -> None:
        """Bodies that arrived inside their FETCH line go out as if they had been streamed.

        Small literals are parsed inline; callers should not have to care which way a body
        came.
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
                owner = self._claim(uid)
                if owner is None:
                    return
                self._events.append(BodyBegin(owner, uid, len(value)))
                self._events.append(LiteralChunk(value))
                self._events.append(LiteralEnd())

    def _status(self, status: Status) -> ConnectionEvent | None:
        """An untagged status response."""
        if status.code_name == "CAPABILITY" and status.code:
            self._update_capabilities(status.code)
        if not self.greeted:
            self.greeted = True
            return Greeting(status)
        if status.kind == "BYE":
            return Bye(status)
        if self._pending:
            self._pending[0].untagged.append(status)
        return None

    def _complete(self, status: Status) -> Completed | None:
        if status.code_name == "CAPABILITY" and status.code:
            self._update_capabilities(status.code)
        for command in self._pending:
            if command.tag == status.tag:
                break
        else:
            return None  # a tag we never sent: ignore rather than misattribute
        self._pending.remove(command)
        if command is self._continuing:
            self._continuing = None  # refused before its literal was wanted
            self._start_unsent()
        return Completed(command, Response(status, command.untagged))

    def _continue(self, event: Continuation) -> None:
        command = self._continuing
        if command is None:
            return
        if len(command.challenges) < 4:  # bounded, whatever the server sends
            command.challenges.append(event.text)
        self._outgoing.append(command.parts.popleft())
        if not command.parts:
            self._continuing = None
            self._start_unsent()

    def _start_unsent(self) -> None:
        while self._unsent and self._continuing is None:
            self._start(self._unsent.popleft())
