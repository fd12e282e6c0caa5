"""The POP3 server conversation as a sans-IO state machine (RFC 1939, 2449, 2595, 3206, 5034).

Bytes from the client go in through :meth:`Pop3Session.receive_data`; :meth:`next_action` hands
out what the I/O layer must do: send bytes, authenticate, fetch a message, apply the deletes,
start TLS or close. While an action that needs the outside world is under way (a login, a
download, the UPDATE) no further command is looked at, so pipelined commands (RFC 2449) are
answered strictly in order. The I/O layer reports back through the ``*_done``/``*_failed``
methods, and feeds a fetched message in through ``body_*``: the session frames the RETR/TOP
answer itself (status line, TOP's cut, dot-stuffing, terminator), so it alone knows when a
multi-line answer starts and ends. Nothing here knows about sockets, Twisted or IMAP.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.limits import MAX_AUTH_FAILURES
from gateway.maildrop.numbering import Column, Maildrop, MaildropError, MessageInfo
from gateway.proto import sasl
from gateway.proto.dotstuff import DotStuffer, TopFilter

# RFC 2449 section 4 caps a command line at 255 octets, but AUTH PLAIN initial responses of long
# passwords exceed that (RFC 5034 lifts the limit for them); anything longer is not a real client.
MAX_LINE = 8192
# Input held for commands not yet looked at (a pipelining client, or one that keeps talking
# while a login, a download or the UPDATE is under way). At this much the I/O layer is asked to
# stop reading (``wants_input``): thousands of pipelined commands, yet a bounded cost per
# connection whatever the client sends.
MAX_BACKLOG = 64 * 1024
# Input beyond this means the I/O layer kept reading after ``wants_input`` turned False (it may
# overshoot by one read, 256 KiB at most): the connection is dropped rather than the memory spent.
MAX_INPUT = 1024 * 1024


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"

    # Every command looks up (state, keyword): members are singletons compared by identity,
    # so the identity hash does, and costs a fraction of Enum's (a Python-level method).
    __hash__ = object.__hash__


# --- actions for the I/O layer ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start TLS now; the ``+OK`` has already been queued as a Send before this."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check these credentials upstream; answer with ``login_done`` or ``login_failed``."""

    username: str
    password: str = ""  # never logged
    mechanism: str = "USER"

    def __repr__(self) -> str:
        return f"Authenticate(username={self.username!r}, mechanism={self.mechanism!r})"


@dataclass(frozen=True, slots=True)
class SendBody:
    """Bytes of the RETR/TOP answer under way (its status line, message text, terminator).

    Apart from ``Send`` because their pace is the upstream's: the I/O layer writes them as
    they come and holds the upstream back while the client does not take them, where answers
    to commands are held back by not reading further commands.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class Retrieve:
    """Fetch this message and feed it in: ``body_begin`` with its size, ``body_data`` with
    each chunk as it arrives, ``body_end``; ``top_lines`` is None for RETR. If the fetch ends
    without the whole body, say ``retrieve_unavailable`` (the message is gone upstream) or
    ``retrieve_failed`` (the upstream failed): the session answers ``-ERR`` if nothing of the
    answer is out yet, else drops the connection (``Abort``)."""

    number: int
    info: MessageInfo
    top_lines: int | None


@dataclass(frozen=True, slots=True)
class Retrieved:
    """The answer to ``request`` is complete, terminator included (queued before this):
    the I/O layer records the download (flags, counters)."""

    request: Retrieve


@dataclass(frozen=True, slots=True)
class Update:
    """Apply the session's deletes upstream (RFC 1939 UPDATE); answer with ``update_done``."""

    deleted: tuple[MessageInfo, ...]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once everything queued has been written."""


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop the connection now, discarding whatever is queued: the session had to end inside a
    multi-line answer, where no ``-ERR`` can be said (the client would read it as message text),
    so the client must see a broken connection rather than a complete-looking answer."""


Action = Send | SendBody | StartTLS | Authenticate | Retrieve | Retrieved | Update | Close | Abort


# --- errors the I/O layer reports back ---------------------------------------------------------


class LoginError(Exception):
    """A failed login, carrying the RFC 2449/3206 response code the client should see."""

    code = "AUTH"
    text = "Authentication failed"


class BadCredentials(LoginError):
    pass


class UpstreamUnavailableReply(LoginError):
    """The POP3 answer when the upstream cannot serve a login (the I/O layer's
    ``UpstreamUnavailable`` or another IMAP failure): temporary, so the client tries again."""

    code = "SYS/TEMP"
    text = "Mail server temporarily unavailable, try again later"


class TooManyFailures(BadCredentials):
    """The client address has too many failed logins waiting; not even checked upstream."""

    code = "SYS/TEMP"
    text = "Too many failed logins from your address, try again later"


class PlaintextDisallowed(LoginError):
    text = "Plaintext authentication disallowed on insecure connections; use STLS or TLS"


# --- the framing of one RETR/TOP answer ---------------------------------------------------------


class _Answer:
    """One RETR/TOP answer as it is framed: its request, whether the status line is out, the
    octets of the message still to come, and the streaming dot-stuffer and TOP cut."""

    __slots__ = ("left", "request", "started", "stuffer", "top")

    def __init__(self, request: Retrieve) -> None:
        self.request = request
        self.started = False  # the status line is queued: from here no -ERR can be said
        self.left = 0  # octets of the message not yet received
        self.stuffer = DotStuffer()
        self.top = TopFilter(request.top_lines) if request.top_lines is not None else None


# --- the session --------------------------------------------------------------------------------


class Pop3Session:
    def __init__(
        self,
        *,
        tls_active: bool,
        stls_available: bool,
        plaintext_allowed: bool,
        implementation: str,
        capabilities_extra: tuple[str, ...] = (),
    ) -> None:
        self.state = State.AUTHORIZATION
        self.tls_active = tls_active
        self._stls_available = stls_available
        self._plaintext_allowed = plaintext_allowed
        self._implementation = implementation
        self._capabilities_extra = capabilities_extra
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, dropping bytes up to its end
        self._actions: deque[Action] = deque()
        self._busy = False
        # A RETR/TOP answer is under way: from the Retrieve handed out until its terminator is
        # queued, or the download ends without one.
        self._in_multiline = False
        self._answer: _Answer | None = None  # the RETR/TOP whose message is being fed in
        self._user: str | None = None
        self._auth_failures = 0
        # A pending SASL exchange waits for the client's next line instead of a command.
        self._continuation: Callable[[bytes], None] | None = None
        self.maildrop: Maildrop | None = None
        self._actions.append(Send(b"+OK popgate ready\r\n"))

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        if len(self._buffer) + len(data) > MAX_INPUT:
            self._buffer.clear()
            self._abort()
            return
        self._buffer += data

    @property
    def wants_input(self) -> bool:
        """Whether the I/O layer should read from the client now. False while the commands
        already received fill the backlog: a busy session stops reading instead of buffering."""
        return self.state is not State.CLOSED and len(self._buffer) < MAX_BACKLOG

    @property
    def backlog(self) -> int:
        """Octets received and not yet looked at."""
        return len(self._buffer)

    @property
    def in_multiline_answer(self) -> bool:
        """A multi-line answer (RETR, TOP) is under way: nothing but its own bytes may follow."""
        return self._in_multiline

    @property
    def retrieving(self) -> Retrieve | None:
        """The RETR/TOP whose message the session is waiting for, else None. Body events for
        any other (a download that ended, a session that was dropped) are to be ignored."""
        answer = self._answer
        return answer.request if answer is not None else None

    @property
    def answer_started(self) -> bool:
        """Part of the RETR/TOP answer under way has been handed out (its status line at
        least): it can only be completed or dropped now."""
        answer = self._answer
        return answer is not None and answer.started

    def next_action(self, *, take_commands: bool = True) -> Action | None:
        """The next thing to do, or None. With ``take_commands`` False only what is already
        decided comes out and no further command is read (the client is not taking answers)."""
        while (
            take_commands
            and not self._actions
            and not self._busy
            and self.state is not State.CLOSED
        ):
            line = self._next_line()
            if line is None:
                break
            self._handle_line(line)
        return self._actions.popleft() if self._actions else None

    def _next_line(self) -> bytes | None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    del self._buffer[:]
                    if not self._discarding:
                        self._discarding = True
                        self._reply_err("Line too long")
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > MAX_LINE:
                self._reply_err("Line too long")
                continue
            return line[:-1] if line.endswith(b"\r") else line

    def pipelined_retrieves(self, limit: int = 16) -> list[MessageInfo]:
        """Messages that RETR commands among the next ``limit`` lines of input will ask for.

        Looks without consuming anything, so the I/O layer can fetch them ahead of time. Stops
        at a TOP (it needs the upstream too, after everything fetched ahead) and at QUIT.
        """
        if self.state is not State.TRANSACTION or self.maildrop is None:
            return []
        found: list[MessageInfo] = []
        buffer, pos = self._buffer, 0
        # Line by line rather than split(): a client may have pipelined thousands of commands,
        # and this is asked again for every message.
        for _ in range(limit):
            end = buffer.find(b"\n", pos)
            if end < 0:
                break
            line, pos = bytes(buffer[pos:end]), end + 1
            keyword, _, arg = line.strip().partition(b" ")
            if keyword.upper() in (b"QUIT", b"TOP"):
                break
            if keyword.upper() == b"RETR" and arg.isdigit() and len(arg) <= 9:
                try:
                    found.append(self.maildrop.message(int(arg)))
                except MaildropError:
                    continue
        return found

    # -- answers from the I/O layer -----------------------------------------------------------

    def tls_started(self) -> None:
        """TLS is up; RFC 2595: forget everything said before it (and anything pipelined)."""
        self.tls_active = True
        self._buffer.clear()
        self._busy = False

    def login_done(self, maildrop: Maildrop) -> None:
        if self.state is State.CLOSED:  # abandoned meanwhile; the I/O layer lets go of it
            return
        self.maildrop = maildrop
        self.state = State.TRANSACTION
        count, octets = maildrop.stat()
        self._reply_ok(f"Logged in, {count} messages ({octets} octets)")
        self._busy = False

    def login_failed(self, error: LoginError) -> None:
        if self.state is State.CLOSED:
            return
        self._user = None
        self._reply_err(error.text, code=error.code)
        self._busy = False
        if isinstance(error, BadCredentials):
            self._auth_failures += 1
            if self._auth_failures >= MAX_AUTH_FAILURES:
                self._close()

    # -- the message of a RETR/TOP, fed in as it arrives -----------------------------------------

    def body_begin(self, request: Retrieve, size: int) -> None:
        """The message starts arriving, ``size`` octets long: the status line goes out.

        Like every ``body_*`` and ``retrieve_*`` call, ignored unless ``request`` is the
        download the session waits for: late events of one that ended go nowhere.
        """
        answer = self._answer
        if answer is None or answer.request is not request or answer.started:
            return
        answer.started = True
        answer.left = size
        # TOP says the whole message's size too: RFC 1939 leaves the octet count free text.
        self._actions.append(SendBody(b"+OK %d octets\r\n" % answer.request.info.size))

    def body_data(self, request: Retrieve, chunk: bytes) -> None:
        """The next chunk of the message. Once its announced size has arrived the answer is
        complete: the terminator follows at once, before the upstream confirms the fetch, so
        the next pipelined command need not wait for that."""
        answer = self._answer
        if answer is None or answer.request is not request:
            return
        if not answer.started:
            self.body_begin(request, 0)  # no size announced: complete with this chunk
        answer.left -= len(chunk)
        if answer.top is not None:
            chunk = answer.top.feed(chunk)
        if chunk:
            self._actions.append(SendBody(answer.stuffer.feed(chunk)))
        if answer.left <= 0:
            self._complete_answer(answer)

    def body_end(self, request: Retrieve) -> None:
        """The message has ended (an empty one, or a size that overstated it)."""
        answer = self._answer
        if answer is None or answer.request is not request:
            return
        if not answer.started:
            self.body_begin(request, 0)
        self._complete_answer(answer)

    def _complete_answer(self, answer: _Answer) -> None:
        self._actions.append(SendBody(answer.stuffer.finish()))
        self._actions.append(Retrieved(answer.request))
        self._answer = None
        self._in_multiline = False
        self._busy = False

    def retrieve_unavailable(self, request: Retrieve) -> None:
        """The fetch ended without the message: it is gone upstream."""
        self._retrieve_ended(request, "Message no longer available upstream")

    def retrieve_failed(self, request: Retrieve) -> None:
        """The fetch failed (timeout, lost link) before the whole message arrived."""
        self._retrieve_ended(request, UpstreamUnavailableReply.text, UpstreamUnavailableReply.code)

    def _retrieve_ended(self, request: Retrieve, text: str, code: str | None = None) -> None:
        answer = self._answer
        if answer is None or answer.request is not request or self.state is State.CLOSED:
            return
        self._answer = None
        if answer.started:
            # A short message must not look complete, and no -ERR can be said inside it.
            self._abort()
            return
        self._in_multiline = False
        self._reply_err(text, code=code)
        self._busy = False

    def abandon(self, text: str, code: str | None = None) -> None:
        """The server ends the session on its own (idle timeout, shutdown, a dead upstream).

        Between answers the client is told why; inside a multi-line answer ``_reply_err``
        turns that into a dropped connection.
        """
        if self.state is State.CLOSED:
            return
        self._reply_err(text, code=code)
        self._close()

    def update_done(self, problem: str | None = None) -> None:
        """The UPDATE finished; ``problem`` names what was not done if it failed part way."""
        if self.state is State.CLOSED:
            return
        if problem is None:
            self._reply_ok("Bye")
        else:
            self._reply_err(f"Some deletes were not applied: {problem}", code="SYS/TEMP")
        self._close()

    def connection_lost(self) -> None:
        """The client went away; nothing of the session's deletes is applied (RFC 1939)."""
        self.state = State.CLOSED
        self._in_multiline = False
        self._answer = None
        self._actions.clear()

    # -- command dispatch ------------------------------------------------------------------

    def _handle_line(self, line: bytes) -> None:
        if self._continuation is not None:
            continuation, self._continuation = self._continuation, None
            continuation(line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply_err("Command is not valid UTF-8")
            return
        keyword, _, rest = text.partition(" ")
        handler = self._handlers.get((self.state, keyword.upper()))
        if handler is None:
            known = any(cmd == keyword.upper() for _, cmd in self._handlers)
            self._reply_err("Command not valid in this state" if known else "Unknown command")
            return
        handler(self, rest)

    # AUTHORIZATION ----------------------------------------------------------------------

    def _capa(self, _arg: str) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self._auth_allowed:
                caps += ["USER", "SASL PLAIN"]
            if self._stls_available and not self.tls_active:
                caps.append("STLS")
        caps += self._capabilities_extra
        caps.append(f"IMPLEMENTATION {self._implementation}")
        self._reply_multiline("Capability list follows", caps)

    @property
    def _auth_allowed(self) -> bool:
        return self.tls_active or self._plaintext_allowed

    def _stls(self, _arg: str) -> None:
        if self.tls_active:
            self._reply_err("TLS already active")
        elif not self._stls_available:
            self._reply_err("STLS not available")
        else:
            self._reply_ok("Begin TLS negotiation")
            self._user = None
            self._actions.append(StartTLS())
            self._busy = True

    def _user_cmd(self, arg: str) -> None:
        if not self._auth_allowed:
            self._reply_err(PlaintextDisallowed.text, code="AUTH")
        elif not arg:
            self._reply_err("USER needs a user name")
        else:
            self._user = arg
            self._reply_ok("Send your password")

    def _pass_cmd(self, arg: str) -> None:
        if self._user is None:
            self._reply_err("Send USER first")
            return
        self._authenticate(self._user, arg, "USER")

    def _auth(self, arg: str) -> None:
        if not arg:
            # Some clients (older Outlook among them) probe with a bare AUTH for the mechanisms.
            self._reply_multiline("Supported mechanisms follow", ["PLAIN"])
            return
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() != "PLAIN":
            self._reply_err("Unsupported authentication mechanism")
            return
        if not self._auth_allowed:
            self._reply_err(PlaintextDisallowed.text, code="AUTH")
            return
        if initial:
            self._sasl_plain(initial.encode("ascii", "replace"))
        else:
            self._actions.append(Send(b"+ \r\n"))
            self._continuation = self._sasl_plain

    def _sasl_plain(self, response: bytes) -> None:
        try:
            credentials = sasl.decode_plain(response)
        except sasl.SaslError as e:
            self._reply_err(e.text, code="AUTH")
            return
        self._authenticate(credentials.user, credentials.password, "PLAIN")

    def _authenticate(self, username: str, password: str, mechanism: str) -> None:
        if not username:
            self._reply_err("Empty user name", code="AUTH")
            return
        self._actions.append(Authenticate(username, password, mechanism))
        self._busy = True

    def _quit_authorization(self, _arg: str) -> None:
        self._reply_ok("Bye")
        self._close()

    # TRANSACTION ------------------------------------------------------------------------

    def _stat(self, arg: str) -> None:
        if arg:
            self._reply_err("STAT takes no arguments")
            return
        count, octets = self._drop.stat()
        self._reply_ok(f"{count} {octets}")

    def _list(self, arg: str) -> None:
        self._scan_listing(arg, "size", "scan listing")

    def _uidl(self, arg: str) -> None:
        self._scan_listing(arg, "uidl", "unique-id listing")

    def _scan_listing(self, arg: str, column: Column, what: str) -> None:
        drop = self._drop
        if arg:
            number = self._number(arg)
            if number is None:
                return
            try:
                info = drop.message(number)
            except MaildropError as e:
                self._reply_err(str(e))
                return
            self._reply_ok(f"{number} {info.size if column == 'size' else info.uidl}")
            return
        count, _ = drop.stat()
        self._reply_listing(f"{count} messages, {what} follows", drop.listing_lines(column))

    def _retr(self, arg: str) -> None:
        number = self._number(arg)
        if number is not None:
            self._start_retrieve(number, None)

    def _top(self, arg: str) -> None:
        msg, _, lines = arg.partition(" ")
        number = self._number(msg)
        if number is None:
            return
        if not lines.isdigit() or not lines.isascii():
            self._reply_err("TOP needs a message number and a line count")
            return
        self._start_retrieve(number, int(lines))

    def _start_retrieve(self, number: int, top_lines: int | None) -> None:
        try:
            info = self._drop.message(number)
        except MaildropError as e:
            self._reply_err(str(e))
            return
        request = Retrieve(number, info, top_lines)
        self._actions.append(request)
        self._answer = _Answer(request)
        self._busy = True
        # From here the I/O layer may be feeding the message in: the answer counts as under
        # way, so whatever ends the session meanwhile drops the connection.
        self._in_multiline = True

    def _dele(self, arg: str) -> None:
        number = self._number(arg)
        if number is None:
            return
        try:
            self._drop.delete(number)
        except MaildropError as e:
            self._reply_err(str(e))
            return
        self._reply_ok(f"message {number} deleted")

    def _rset(self, _arg: str) -> None:
        self._drop.reset()
        count, octets = self._drop.stat()
        self._reply_ok(f"maildrop has {count} messages ({octets} octets)")

    def _noop(self, _arg: str) -> None:
        self._reply_ok("")

    def _quit_transaction(self, _arg: str) -> None:
        # Always through UPDATE, even with nothing deleted: the I/O layer may have work to
        # finish (flags) before the +OK, and learns that the session ended with QUIT.
        self.state = State.UPDATE
        self._actions.append(Update(tuple(self._drop.deleted())))
        self._busy = True

    # -- helpers -----------------------------------------------------------------------------

    @property
    def _drop(self) -> Maildrop:
        assert self.maildrop is not None, "TRANSACTION state without a maildrop"
        return self.maildrop

    def _number(self, arg: str) -> int | None:
        if not arg or not arg.isdigit() or not arg.isascii() or len(arg) > 9:
            self._reply_err("Invalid message number" if arg else "Message number required")
            return None
        return int(arg)

    def _reply_ok(self, text: str) -> None:
        self._actions.append(Send(f"+OK {text}\r\n".encode() if text else b"+OK\r\n"))

    def _reply_err(self, text: str, code: str | None = None) -> None:
        # The one place every -ERR passes: never inside a multi-line answer, where it would
        # read as part of the message (RFC 1939 has no way to end such an answer early).
        if self._in_multiline:
            self._abort()
            return
        prefix = f"-ERR [{code}] " if code else "-ERR "
        self._actions.append(Send(f"{prefix}{text}\r\n".encode()))

    def _reply_multiline(self, first: str, lines: list[str]) -> None:
        self._reply_listing(first, "".join(f"{line}\r\n" for line in lines))

    def _reply_listing(self, first: str, body: str) -> None:
        """``body``: CRLF-terminated lines that never start with "." (message numbers,
        capability names, mechanisms), so they need no dot-stuffing."""
        self._actions.append(Send(f"+OK {first}\r\n{body}.\r\n".encode()))

    def _close(self) -> None:
        if self.state is State.CLOSED:  # already closing, or aborted
            return
        self.state = State.CLOSED
        self._actions.append(Close())

    def _abort(self) -> None:
        self.state = State.CLOSED
        self._in_multiline = False
        self._answer = None
        self._actions.clear()
        self._actions.append(Abort())

    _A, _T = State.AUTHORIZATION, State.TRANSACTION
    _handlers: dict[tuple[State, str], Callable[[Pop3Session, str], None]] = {
        (_A, "CAPA"): _capa,
        (_A, "STLS"): _stls,
        (_A, "USER"): _user_cmd,
        (_A, "PASS"): _pass_cmd,
        (_A, "AUTH"): _auth,
        (_A, "QUIT"): _quit_authorization,
        (_T, "CAPA"): _capa,
        (_T, "STAT"): _stat,
        (_T, "LIST"): _list,
        (_T, "UIDL"): _uidl,
        (_T, "RETR"): _retr,
        (_T, "TOP"): _top,
        (_T, "DELE"): _dele,
        (_T, "RSET"): _rset,
        (_T, "NOOP"): _noop,
        (_T, "QUIT"): _quit_transaction,
    }
    del _A, _T
