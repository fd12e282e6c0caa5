"""Property tests of the POP3 session state machine against hostile input (issue 9).

A driver plays the I/O layer the way ``gateway/pop3/server.py`` does: it feeds bytes only while
the session wants input, answers every action (logins that succeed or fail, downloads that
complete, fail part way or find the message gone, UPDATEs), and may end the session on its own
(idle timeout, shutdown) at any point. Whatever the bytes and their chunking:

- nothing raises;
- nothing the session sends falls inside a multi-line answer that is under way: the session
  ends there with ``Abort`` instead (never ``-ERR`` spliced into a message);
- every answer is one line or one complete multi-line answer, and their number and size are
  bounded by the input;
- the input the session holds stays bounded.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.maildrop.numbering import Maildrop, MessageInfo
from gateway.proto import pop3

MESSAGES = [MessageInfo(10, 120, "UIDL-A"), MessageInfo(11, 300, "UIDL-B")]
COMMANDS = [
    b"USER alice\r\n",
    b"PASS pw\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGFsaWNlAHB3\r\n",
    b"AGFsaWNlAHB3\r\n",
    b"*\r\n",
    b"AUTH\r\n",
    b"CAPA\r\n",
    b"STLS\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 2\r\n",
    b"UIDL\r\n",
    b"UIDL 1\r\n",
    b"RETR 1\r\n",
    b"RETR 2\r\n",
    b"RETR 3\r\n",
    b"TOP 1 0\r\n",
    b"TOP 2 5\r\n",
    b"DELE 1\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"RETR 99999999999\r\n",
    b"\r\n",
    b"\n",
]
pieces = st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=40))
# A long run without a line end now and then (the backlog and line limits).
floods = st.builds(lambda b, n: b * n, st.sampled_from([b"x", b"NOOP\r\n"]), st.integers(0, 30_000))
# Most streams log in first (a random USER/PASS pair rarely comes up by itself).
logins = st.sampled_from(
    [
        b"USER alice\r\nPASS pw\r\nRETR 1\r\n",
        b"AUTH PLAIN AGFsaWNlAHB3\r\nRETR 2\r\nRETR 1\r\n",
        b"USER alice\r\nPASS pw\r\n",
        b"",
    ]
)
downloads = st.sampled_from([b"RETR 1\r\n", b"TOP 2 1\r\n"])
streams = st.builds(
    lambda login, rest: login + b"".join(rest),
    logins,
    st.lists(st.one_of(pieces, downloads, pieces, floods), max_size=40),
)
# Answers of one command, at most: a listing of every message, or the capability list.
MAX_ANSWER = 512
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Driver:
    """Plays the I/O layer, checking every action the session hands out."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.session = pop3.Pop3Session(
            tls_active=False,
            stls_available=True,
            plaintext_allowed=True,
            implementation="popgate-fuzz",
        )
        self.retrieving: pop3.Retrieve | None = None  # a RETR/TOP answer is going out
        # The I/O layer reads only while the session wants input, so the backlog may pass
        # MAX_BACKLOG by one read at most: the largest chunk fed so far.
        self.largest_read = 0
        self.body_started = False
        self.ended = False  # Close or Abort handed out
        self.sends = 0
        self.out = 0

    def draw(self, strategy: st.SearchStrategy) -> object:
        return self.data.draw(strategy)

    def pump(self) -> None:
        session = self.session
        while (action := session.next_action()) is not None:
            assert not self.ended, f"{action!r} after the session ended"
            if isinstance(action, pop3.Send):
                assert not self.retrieving, f"{action.data[:40]!r} inside a multi-line answer"
                self.check_answer(action.data)
            elif isinstance(action, pop3.SendBody):
                assert self.retrieving, f"{action.data[:40]!r} outside a RETR/TOP answer"
                self.body += action.data
            elif isinstance(action, pop3.Retrieved):
                assert action.request is self.retrieving
                assert self.body.startswith(b"+OK ") and self.body.endswith(b"\r\n.\r\n")
                self.retrieving = None
            elif isinstance(action, pop3.Abort | pop3.Close):
                self.ended = True
                self.retrieving = None
            elif isinstance(action, pop3.StartTLS):
                session.tls_started()
            elif isinstance(action, pop3.Authenticate):
                self.answer_login()
            elif isinstance(action, pop3.Retrieve):
                assert session.in_multiline_answer and session.retrieving is action
                self.retrieving, self.body_started, self.body = action, False, b""
                self.progress_retrieve()
            elif isinstance(action, pop3.Update):
                problem = self.draw(st.sampled_from([None, "STORE failed"]))
                session.update_done(problem)  # type: ignore[arg-type]

    def check_answer(self, data: bytes) -> None:
        self.sends += 1
        self.out += len(data)
        assert len(data) <= MAX_ANSWER, data[:80]
        assert data.startswith((b"+OK", b"-ERR", b"+ ")), data[:80]
        assert data.endswith(b"\r\n")
        if data.startswith(b"-ERR") or data.count(b"\r\n") == 1:
            assert data.count(b"\r\n") == 1, data  # one line, nothing after it
        else:
            assert data.endswith(b"\r\n.\r\n"), data  # a whole multi-line answer

    def answer_login(self) -> None:
        outcome = self.draw(st.sampled_from(["ok", "bad", "unavailable", "later"]))
        if outcome == "ok":
            self.session.login_done(Maildrop(list(MESSAGES)))
        elif outcome == "bad":
            self.session.login_failed(pop3.BadCredentials())
        elif outcome == "unavailable":
            self.session.login_failed(pop3.UpstreamUnavailableReply())
        else:
            self.pending_login = True

    def progress_retrieve(self) -> None:
        """The download's fate: finished, gone or failed upstream (before a byte or part way),
        or some more of it."""
        session, request = self.session, self.retrieving
        assert request is not None
        outcome = self.draw(st.sampled_from(["more", "more", "done", "gone", "failed"]))
        if outcome == "done":
            session.body_end(request)  # the terminator goes out
        elif outcome == "gone":
            session.retrieve_unavailable(request)
        elif outcome == "failed":
            session.retrieve_failed(request)
        else:
            if not self.body_started:
                self.body_started = True
                session.body_begin(request, self.draw(st.integers(0, 64)))
            session.body_data(request, self.draw(st.sampled_from([b".", b"\r\n", b"x.\n.", b""])))
        if outcome in ("gone", "failed") and not self.body_started:
            self.retrieving = None  # an -ERR answers the command

    pending_login = False

    def step(self, chunk: bytes) -> None:
        """One turn of the reactor: maybe a completion or a timer, then some input."""
        session = self.session
        event = self.draw(st.sampled_from(["input"] * 6 + ["finish"] * 3 + ["abandon"]))
        if event == "finish":
            if self.pending_login:
                self.pending_login = False
                session.login_failed(pop3.BadCredentials())
            elif self.retrieving:
                self.progress_retrieve()
        elif event == "abandon":
            code = self.draw(st.sampled_from([None, "SYS/TEMP"]))
            session.abandon("Idle timeout, closing connection", code)  # type: ignore[arg-type]
        elif session.wants_input:
            session.receive_data(chunk)
            self.largest_read = max(self.largest_read, len(chunk))
        self.pump()
        assert session.backlog < pop3.MAX_BACKLOG + self.largest_read


@FUZZ
@given(streams, st.lists(st.integers(1, 8192), min_size=1, max_size=12), st.data())
def test_any_input_in_any_chunking_keeps_every_rule(
    stream: bytes, sizes: list[int], data: st.DataObject
) -> None:
    driver = Driver(data)
    driver.pump()
    chunks, pos = [], 0
    for size in sizes * (len(stream) // sum(sizes) + 1):
        if pos >= len(stream):
            break
        chunks.append(stream[pos : pos + size])
        pos += size
    for chunk in chunks:
        if driver.ended:
            break
        driver.step(chunk)
    lines = stream.count(b"\n")
    # One answer per line at most, plus the greeting, an over-long-line error per 8 KiB of
    # input without a line end, and the answers to completions (login, download, update).
    assert driver.sends <= 1 + lines + len(stream) // pop3.MAX_LINE + len(chunks) * 2 + 2
    assert driver.out <= driver.sends * MAX_ANSWER


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_raw_bytes_in_any_chunking_never_raise_and_each_answer_is_whole(
    stream: bytes, sizes: list[int]
) -> None:
    """No driver choices at all: logins always fail, every other action is left pending."""
    session = pop3.Pop3Session(
        tls_active=False, stls_available=True, plaintext_allowed=True, implementation="x"
    )
    out = bytearray()

    def pump() -> None:
        while (action := session.next_action()) is not None:
            if isinstance(action, pop3.Send):
                out.extend(action.data)
            elif isinstance(action, pop3.Authenticate):
                session.login_failed(pop3.BadCredentials())
            elif isinstance(action, pop3.StartTLS):
                session.tls_started()

    pump()
    pos = 0
    while pos < len(stream) and session.state is not pop3.State.CLOSED:
        for size in sizes:
            session.receive_data(stream[pos : pos + size])
            pos += size
            pump()
    assert out.startswith(b"+OK popgate ready\r\n")
    assert out.endswith(b"\r\n")
    assert len(out) <= 64 * (stream.count(b"\n") + len(stream) // pop3.MAX_LINE + 2) + 512
