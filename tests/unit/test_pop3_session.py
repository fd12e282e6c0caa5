"""The POP3 state machine, driven in memory: transcripts of client lines and server answers."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable

import pytest

from gateway.maildrop.numbering import Maildrop, MessageInfo
from gateway.proto import pop3

MESSAGES = [MessageInfo(10, 120, "UIDL-A"), MessageInfo(11, 300, "UIDL-B")]


class Client:
    """Feeds lines to a session and collects what it would send; records other actions."""

    def __init__(self, *, tls: bool = False, plaintext: bool = True, stls: bool = True) -> None:
        self.session = pop3.Pop3Session(
            tls_active=tls,
            stls_available=stls,
            plaintext_allowed=plaintext,
            implementation="popgate-test",
        )
        self.actions: list[pop3.Action] = []
        self.out = bytearray()
        self.closed = False
        self.pump()

    def pump(self) -> None:
        while (action := self.session.next_action()) is not None:
            if isinstance(action, pop3.Send | pop3.SendBody):
                self.out += action.data
            elif isinstance(action, pop3.Close):
                self.closed = True
            else:
                self.actions.append(action)

    def send(self, data: bytes) -> bytes:
        """Send raw bytes; return what the server answered to them."""
        start = len(self.out)
        self.session.receive_data(data)
        self.pump()
        return bytes(self.out[start:])

    def line(self, text: str) -> bytes:
        return self.send(text.encode() + b"\r\n")

    def take(self, kind: type) -> pop3.Action:
        action = self.actions.pop(0)
        assert isinstance(action, kind), action
        return action

    def answer(self, call: object, *args: object) -> bytes:
        start = len(self.out)
        call(*args)  # type: ignore[operator]
        self.pump()
        return bytes(self.out[start:])

    def body(
        self, request: pop3.Retrieve, *chunks: bytes, size: int | None = None, end: bool = True
    ) -> bytes:
        """The upstream delivers ``request``'s message in these chunks, its size (by default
        theirs) announced first as an IMAP literal's is; return what the client received."""
        start = len(self.out)
        self.session.body_begin(request, sum(map(len, chunks)) if size is None else size)
        for chunk in chunks:
            self.session.body_data(request, chunk)
            self.pump()
        if end:
            self.session.body_end(request)
        self.pump()
        return bytes(self.out[start:])

    def logged_in(self) -> Client:
        self.line("USER alice")
        self.line("PASS secret")
        self.take(pop3.Authenticate)
        self.answer(self.session.login_done, Maildrop(MESSAGES))
        return self


def test_greeting_and_capa_before_login() -> None:
    c = Client()
    assert bytes(c.out) == b"+OK popgate ready\r\n"
    assert c.line("CAPA") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\nIMPLEMENTATION popgate-test\r\n.\r\n"
    )


def test_capa_hides_login_where_plaintext_is_not_allowed() -> None:
    c = Client(plaintext=False)
    capa = c.line("CAPA")
    assert b"USER\r\n" not in capa and b"SASL" not in capa and b"STLS\r\n" in capa
    assert c.line("USER alice").startswith(b"-ERR [AUTH] ")
    assert c.line("AUTH PLAIN AGFsaWNlAHNlY3JldA==").startswith(b"-ERR [AUTH] ")
    assert c.actions == []


def test_user_pass_login_and_password_not_in_repr() -> None:
    c = Client()
    assert c.line("USER alice#phone") == b"+OK Send your password\r\n"
    assert c.line("PASS my secret pw") == b""  # waits for the upstream
    auth = c.take(pop3.Authenticate)
    assert (auth.username, auth.password) == ("alice#phone", "my secret pw")
    assert "secret" not in repr(auth)
    assert c.answer(c.session.login_done, Maildrop(MESSAGES)) == (
        b"+OK Logged in, 2 messages (420 octets)\r\n"
    )
    assert c.session.state is pop3.State.TRANSACTION


@pytest.mark.parametrize(
    ("error", "answer"),
    [
        (pop3.BadCredentials(), b"-ERR [AUTH] Authentication failed\r\n"),
        (
            pop3.UpstreamUnavailableReply(),
            b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n",
        ),
    ],
)
def test_login_failures_carry_response_codes(error: pop3.LoginError, answer: bytes) -> None:
    c = Client()
    c.line("USER alice")
    c.line("PASS x")
    c.take(pop3.Authenticate)
    assert c.answer(c.session.login_failed, error) == answer
    assert c.session.state is pop3.State.AUTHORIZATION
    assert c.line("PASS x") == b"-ERR Send USER first\r\n"


def test_repeated_bad_passwords_close_the_connection() -> None:
    c = Client()
    for _ in range(pop3.MAX_AUTH_FAILURES):
        c.line("USER alice")
        c.line("PASS x")
        c.take(pop3.Authenticate)
        c.answer(c.session.login_failed, pop3.BadCredentials())
    assert c.closed


def test_auth_plain_initial_response_and_continuation() -> None:
    c = Client()
    token = base64.b64encode(b"\0alice\0pw").decode()
    assert c.line(f"AUTH PLAIN {token}") == b""
    assert c.take(pop3.Authenticate).username == "alice"
    c.answer(c.session.login_failed, pop3.BadCredentials())
    assert c.line("AUTH PLAIN") == b"+ \r\n"
    assert c.line(token) == b""
    auth = c.take(pop3.Authenticate)
    assert (auth.username, auth.password, auth.mechanism) == ("alice", "pw", "PLAIN")


@pytest.mark.parametrize(
    "response",
    [
        "*",  # cancelled
        "not base64!",
        base64.b64encode(b"alice\0pw").decode(),  # two fields
        base64.b64encode(b"bob\0alice\0pw").decode(),  # act as another user
        base64.b64encode(b"\0\xff\0pw").decode(),  # not UTF-8
    ],
)
def test_auth_plain_bad_responses(response: str) -> None:
    c = Client()
    c.line("AUTH PLAIN")
    assert c.line(response).startswith(b"-ERR [AUTH] ")
    assert c.actions == []


def test_bare_auth_lists_mechanisms_and_others_are_refused() -> None:
    c = Client()
    assert c.line("AUTH") == b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert c.line("AUTH CRAM-MD5") == b"-ERR Unsupported authentication mechanism\r\n"


def test_stls_discards_pipelined_input() -> None:
    c = Client()
    # An attacker injects a command after STLS, before the handshake (CVE-2011-0411 style).
    assert c.send(b"STLS\r\nUSER evil\r\n") == b"+OK Begin TLS negotiation\r\n"
    c.take(pop3.StartTLS)
    c.answer(c.session.tls_started)
    assert c.line("CAPA").count(b"STLS") == 0
    assert c.line("PASS x") == b"-ERR Send USER first\r\n"


def test_stls_refused_when_tls_is_active_or_unavailable() -> None:
    assert Client(tls=True).line("STLS") == b"-ERR TLS already active\r\n"
    assert Client(stls=False).line("STLS") == b"-ERR STLS not available\r\n"


def test_transaction_listing_commands() -> None:
    c = Client().logged_in()
    assert c.line("STAT") == b"+OK 2 420\r\n"
    assert c.line("LIST") == b"+OK 2 messages, scan listing follows\r\n1 120\r\n2 300\r\n.\r\n"
    assert c.line("LIST 2") == b"+OK 2 300\r\n"
    assert c.line("UIDL") == (
        b"+OK 2 messages, unique-id listing follows\r\n1 UIDL-A\r\n2 UIDL-B\r\n.\r\n"
    )
    assert c.line("UIDL 1") == b"+OK 1 UIDL-A\r\n"
    assert c.line("LIST 3") == b"-ERR no such message: 3\r\n"
    assert c.line("LIST 0") == b"-ERR no such message: 0\r\n"
    assert c.line("LIST x") == b"-ERR Invalid message number\r\n"
    assert c.line("NOOP") == b"+OK\r\n"


def test_dele_rset_and_deleted_messages_disappear_from_listings() -> None:
    c = Client().logged_in()
    assert c.line("DELE 1") == b"+OK message 1 deleted\r\n"
    assert c.line("DELE 1") == b"-ERR message 1 already deleted\r\n"
    assert c.line("STAT") == b"+OK 1 300\r\n"
    assert c.line("LIST") == b"+OK 1 messages, scan listing follows\r\n2 300\r\n.\r\n"
    assert c.line("RETR 1") == b"-ERR message 1 already deleted\r\n"
    assert c.line("RSET") == b"+OK maildrop has 2 messages (420 octets)\r\n"
    assert c.line("STAT") == b"+OK 2 420\r\n"


def test_retr_and_top_wait_for_the_download() -> None:
    c = Client().logged_in()
    assert c.send(b"RETR 2\r\nTOP 1 5\r\nSTAT\r\n") == b""
    retr = c.take(pop3.Retrieve)
    assert (retr.info.uid, retr.top_lines) == (11, None)
    assert c.actions == []  # TOP is not looked at before RETR finished
    assert c.body(retr, b"body\r\n") == b"+OK 300 octets\r\nbody\r\n.\r\n"
    assert c.take(pop3.Retrieved).request is retr
    top = c.take(pop3.Retrieve)
    assert (top.info.uid, top.top_lines) == (10, 5)
    assert c.body(top, b"H: 1\r\n\r\nbody\r\n") == (
        b"+OK 120 octets\r\nH: 1\r\n\r\nbody\r\n.\r\n+OK 2 420\r\n"
    )


def test_pipelined_retrieves_peeks_at_waiting_retrs_without_consuming_them() -> None:
    c = Client().logged_in()
    c.send(b"RETR 1\r\nRETR 2\r\nNOOP\r\nRETR 9\r\nretr 1\r\nTOP 2 0\r\nRETR 2\r\nRETR")
    first = c.take(pop3.Retrieve)
    assert first.info.uid == 10
    peeked = c.session.pipelined_retrieves()
    assert [m.uid for m in peeked] == [11, 10]  # no such message 9; stops at TOP
    assert [m.uid for m in c.session.pipelined_retrieves(limit=1)] == [11]
    c.body(first, b"x\r\n")
    c.take(pop3.Retrieved)
    assert c.take(pop3.Retrieve).info.uid == 11  # nothing was consumed by peeking
    assert [m.uid for m in c.session.pipelined_retrieves()] == [10]


def test_retrieve_of_a_message_gone_upstream() -> None:
    c = Client().logged_in()
    c.line("RETR 1")
    retr = c.take(pop3.Retrieve)
    assert (
        c.answer(c.session.retrieve_unavailable, retr)
        == b"-ERR Message no longer available upstream\r\n"
    )
    assert not c.session.in_multiline_answer and c.session.retrieving is None


def test_top_argument_errors() -> None:
    c = Client().logged_in()
    assert c.line("TOP 1") == b"-ERR TOP needs a message number and a line count\r\n"
    assert c.line("TOP 1 -1") == b"-ERR TOP needs a message number and a line count\r\n"


def test_quit_without_deletes_still_passes_through_update() -> None:
    c = Client().logged_in()
    assert c.line("QUIT") == b""
    assert c.take(pop3.Update).deleted == ()
    assert c.answer(c.session.update_done, None) == b"+OK Bye\r\n"
    assert c.closed


def test_quit_applies_deletes_before_answering() -> None:
    c = Client().logged_in()
    c.line("DELE 2")
    assert c.line("QUIT") == b""  # no +OK before the mailbox is updated
    update = c.take(pop3.Update)
    assert [m.uid for m in update.deleted] == [11]
    assert c.answer(c.session.update_done, None) == b"+OK Bye\r\n"
    assert c.closed


def test_failed_update_is_reported() -> None:
    c = Client().logged_in()
    c.line("DELE 1")
    c.line("QUIT")
    c.take(pop3.Update)
    answer = c.answer(c.session.update_done, "1 deletes not applied")
    assert answer.startswith(b"-ERR [SYS/TEMP] ") and b"not applied" in answer
    assert c.closed


def test_commands_in_the_wrong_state_and_unknown_ones() -> None:
    c = Client()
    assert c.line("STAT") == b"-ERR Command not valid in this state\r\n"
    assert c.line("XYZZY") == b"-ERR Unknown command\r\n"
    c.logged_in()
    assert c.line("USER bob") == b"-ERR Command not valid in this state\r\n"
    assert c.line("stat") == b"+OK 2 420\r\n"  # keywords are case-insensitive


def test_over_long_line_is_refused_and_the_session_goes_on() -> None:
    c = Client()
    answer = c.send(b"USER " + b"a" * (pop3.MAX_LINE + 10))
    assert answer == b"-ERR Line too long\r\n"
    assert c.send(b"aaaa\r\nCAPA\r\n").startswith(b"+OK Capability")


def test_bare_lf_and_split_lines_are_accepted() -> None:
    c = Client()
    assert c.send(b"US") == b""
    assert c.send(b"ER alice\n") == b"+OK Send your password\r\n"


def test_connection_lost_forgets_deletes() -> None:
    c = Client().logged_in()
    c.line("DELE 1")
    c.session.connection_lost()
    c.pump()
    assert c.actions == [] and c.session.state is pop3.State.CLOSED


def test_the_messages_a_sequential_download_wants_next_skip_deleted_ones() -> None:
    drop = Maildrop([MessageInfo(uid, 10, f"U{uid}") for uid in range(1, 6)])
    drop.delete(3)
    assert [m.uid for m in drop.following(1, 3)] == [2, 4, 5]
    assert [m.uid for m in drop.following(1)] == [2]
    assert drop.following(5, 3) == []


# --- ending a session inside a multi-line answer, and bounded input ----------------------------


def test_abandoned_between_answers_the_client_is_told_why() -> None:
    c = Client().logged_in()
    assert c.answer(c.session.abandon, "Server shutting down", "SYS/TEMP") == (
        b"-ERR [SYS/TEMP] Server shutting down\r\n"
    )
    assert c.closed and c.session.state is pop3.State.CLOSED


def test_abandoned_inside_a_download_the_connection_is_dropped_without_an_error_line() -> None:
    c = Client().logged_in()
    c.line("RETR 1")
    c.take(pop3.Retrieve)
    assert c.session.in_multiline_answer
    assert c.answer(c.session.abandon, "Server shutting down", "SYS/TEMP") == b""
    c.take(pop3.Abort)
    assert not c.closed and c.session.state is pop3.State.CLOSED  # Abort, not a polite Close


def test_no_error_line_can_follow_a_retrieve_whatever_ends_the_session() -> None:
    """Every way the session can end with an -ERR, tried inside a multi-line answer."""
    for end in (
        lambda s, r: s.abandon("Idle timeout, closing connection"),
        lambda s, r: s.retrieve_failed(r),
        lambda s, r: s.retrieve_unavailable(r),
        lambda s, r: s.receive_data(b"x" * (pop3.MAX_INPUT + 1)),
    ):
        c = Client().logged_in()
        c.line("RETR 2")
        retr = c.take(pop3.Retrieve)
        assert c.body(retr, b"part", size=300, end=False) == b"+OK 300 octets\r\npart"
        assert c.answer(end, c.session, retr) == b""
        c.take(pop3.Abort)
        assert c.body(retr, b" rest") == b""  # a late completion changes nothing
        assert c.actions == []


def test_after_the_answer_is_complete_errors_are_lines_again() -> None:
    c = Client().logged_in()
    c.line("RETR 1")
    c.body(c.take(pop3.Retrieve), b"whole\r\n")
    assert not c.session.in_multiline_answer
    assert c.answer(c.session.abandon, "Idle timeout, closing connection") == (
        b"-ERR Idle timeout, closing connection\r\n"
    )


def test_a_busy_session_stops_wanting_input_at_the_backlog_limit() -> None:
    c = Client()
    c.line("USER alice")
    c.line("PASS secret")
    c.take(pop3.Authenticate)  # busy: the login is under way
    assert c.session.wants_input
    c.send(b"NOOP\r\n" * (pop3.MAX_BACKLOG // 6 + 1))
    assert not c.session.wants_input
    c.answer(c.session.login_failed, pop3.BadCredentials())
    # The login answered, the backlog is worked off (NOOP is not valid before login) and
    # input is wanted again.
    assert c.session.wants_input and c.out.count(b"-ERR Command not valid in this state") > 1000


def test_input_beyond_the_hard_limit_drops_the_connection() -> None:
    c = Client()
    c.line("USER alice")
    c.line("PASS secret")
    c.take(pop3.Authenticate)
    for _ in range(pop3.MAX_INPUT // 65536):
        c.send(b"x" * 65536)
    assert c.actions == []
    c.send(b"x")
    c.take(pop3.Abort)
    assert not c.session.wants_input


# --- RETR/TOP framing: the session turns the upstream's chunks into the answer ------------------

# Lines that start with "." (one, two, a lone one), an LF without CR before a dot, no final CRLF.
DOTTED = b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nbare\n.lf\r\nlast"
DOTTED_ANSWER = (
    b"+OK 120 octets\r\n"
    b"Subject: dots\r\n\r\n..starts with a dot\r\n...two\r\n..\r\nbare\n..lf\r\nlast"
    b"\r\n.\r\n"
)


def retr(c: Client, command: str = "RETR 1") -> pop3.Retrieve:
    assert c.line(command) == b""  # nothing before the message starts arriving
    return c.take(pop3.Retrieve)  # type: ignore[return-value]


def test_retr_frames_the_message_dot_stuffed_whatever_the_chunking() -> None:
    whole = Client().logged_in()
    assert whole.body(retr(whole), DOTTED) == DOTTED_ANSWER
    # Split in two at every byte, then in three at every pair of bytes: a "." or a CRLF at a
    # chunk boundary is stuffed exactly as inside a chunk.
    splits = [(i,) for i in range(len(DOTTED) + 1)] + [
        (i, j) for i in range(1, len(DOTTED)) for j in range(i + 1, len(DOTTED))
    ]
    for cuts in splits:
        bounds = (0, *cuts, len(DOTTED))
        chunks = [DOTTED[a:b] for a, b in itertools.pairwise(bounds)]
        c = Client().logged_in()
        request = retr(c)
        assert c.body(request, *chunks) == DOTTED_ANSWER, cuts
        assert c.take(pop3.Retrieved).request is request
    one_by_one = Client().logged_in()
    chunks = [DOTTED[i : i + 1] for i in range(len(DOTTED))]
    assert one_by_one.body(retr(one_by_one), *chunks) == DOTTED_ANSWER


def test_a_crlf_split_across_chunks_ends_the_line_before_the_terminator() -> None:
    c = Client().logged_in()
    assert c.body(retr(c), b"one\r", b"\n.two\r", b"\n") == (
        b"+OK 120 octets\r\none\r\n..two\r\n.\r\n"
    )


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (b"no line end", b"no line end\r\n.\r\n"),
        (b"ends with a dot\r\n.", b"ends with a dot\r\n..\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"", b".\r\n"),
    ],
)
def test_a_body_without_final_crlf_gets_one_before_the_terminator(
    body: bytes, answer: bytes
) -> None:
    c = Client().logged_in()
    assert c.body(retr(c), body) == b"+OK 120 octets\r\n" + answer


def test_an_empty_literal_is_an_empty_message() -> None:
    c = Client().logged_in()
    request = retr(c)
    c.session.body_begin(request, 0)
    c.session.body_end(request)
    c.pump()
    assert bytes(c.out).endswith(b"+OK 120 octets\r\n.\r\n")
    c.take(pop3.Retrieved)


HEADERS = b"From: a\r\nSubject: s\r\n\r\n"
BODY_LINES = b"l1\r\n.l2\r\nl3\r\n"


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        ("TOP 1 0", HEADERS),
        ("TOP 1 2", HEADERS + b"l1\r\n..l2\r\n"),
        ("TOP 1 3", HEADERS + b"l1\r\n..l2\r\nl3\r\n"),
        ("TOP 1 50", HEADERS + b"l1\r\n..l2\r\nl3\r\n"),  # more lines than the body has
    ],
)
def test_top_passes_the_header_and_n_lines_whatever_the_chunking(
    command: str, answer: bytes
) -> None:
    message = HEADERS + BODY_LINES
    for cut in range(len(message) + 1):
        c = Client().logged_in()
        request = retr(c, command)
        assert c.body(request, message[:cut], message[cut:]) == (
            b"+OK 120 octets\r\n" + answer + b".\r\n"
        ), cut
        assert c.take(pop3.Retrieved).request.top_lines == request.top_lines


def test_top_of_a_message_without_a_body_or_without_a_final_line_end() -> None:
    c = Client().logged_in()
    assert c.body(retr(c, "TOP 1 0"), b"From: a\r\nSubject: no body") == (
        b"+OK 120 octets\r\nFrom: a\r\nSubject: no body\r\n.\r\n"
    )
    c.take(pop3.Retrieved)
    assert c.body(retr(c, "TOP 1 5"), b"From: a\r\n\r\nlast line") == (
        b"+OK 120 octets\r\nFrom: a\r\n\r\nlast line\r\n.\r\n"
    )


def test_top_drops_the_rest_of_the_message_and_ends_at_the_literal() -> None:
    c = Client().logged_in()
    request = retr(c, "TOP 1 1")
    assert c.body(request, b"H: 1\r\n\r\nfirst\r\n", size=1000, end=False) == (
        b"+OK 120 octets\r\nH: 1\r\n\r\nfirst\r\n"
    )
    assert c.session.in_multiline_answer  # the rest is still to come from upstream
    for _ in range(5):
        c.session.body_data(request, b"x" * 100 + b"\r\n.more\r\n")
    c.session.body_end(request)
    c.pump()
    assert bytes(c.out).endswith(b"first\r\n.\r\n")
    c.take(pop3.Retrieved)


def test_the_answer_ends_when_the_announced_size_has_arrived() -> None:
    """The terminator and the next pipelined answer do not wait for the end of the literal;
    the late end of the finished download, arriving during the next one, changes nothing."""
    c = Client().logged_in()
    c.send(b"RETR 1\r\nNOOP\r\nRETR 2\r\n")
    first = c.take(pop3.Retrieve)
    assert c.body(first, b"abc\r\n", end=False) == b"+OK 120 octets\r\nabc\r\n.\r\n+OK\r\n"
    c.take(pop3.Retrieved)
    second = c.take(pop3.Retrieve)
    c.session.body_end(first)  # the first literal's end event
    c.session.body_data(first, b"late")
    c.session.retrieve_unavailable(first)  # and its FETCH's completion
    c.pump()
    assert c.actions == [] and c.session.retrieving is second
    assert c.body(second, b"two\r\n") == b"+OK 300 octets\r\ntwo\r\n.\r\n"


def test_commands_pipelined_during_a_body_wait_for_its_terminator() -> None:
    c = Client().logged_in()
    c.send(b"RETR 1\r\nSTAT\r\n")
    request = c.take(pop3.Retrieve)
    assert c.body(request, b"part\r\n", size=12, end=False) == b"+OK 120 octets\r\npart\r\n"
    assert c.send(b"NOOP\r\n") == b""  # not even looked at inside the body
    assert c.body(request, b"rest\r\n") == b"rest\r\n.\r\n+OK 2 420\r\n+OK\r\n"


@pytest.mark.parametrize(
    "end",
    [
        lambda s, r: s.abandon("Server shutting down", "SYS/TEMP"),
        lambda s, r: s.retrieve_failed(r),
        lambda s, r: s.retrieve_unavailable(r),
    ],
    ids=["shutdown", "upstream-failed", "gone-part-way"],
)
def test_abort_in_the_middle_of_a_body(end: Callable[..., None]) -> None:
    c = Client().logged_in()
    c.send(b"RETR 2\r\nNOOP\r\n")
    request = c.take(pop3.Retrieve)
    assert c.body(request, b"Subject: x\r\n\r\n.half", size=300, end=False) == (
        b"+OK 300 octets\r\nSubject: x\r\n\r\n..half"
    )
    assert c.answer(end, c.session, request) == b""  # no -ERR, no terminator
    c.take(pop3.Abort)
    assert c.session.state is pop3.State.CLOSED and c.session.retrieving is None
    # What the upstream still delivers, and the pipelined NOOP, go nowhere.
    assert c.body(request, b" of it\r\n") == b""
    assert c.actions == [] and not c.closed


def test_a_download_that_fails_before_its_first_byte_is_an_error_answer() -> None:
    c = Client().logged_in()
    request = retr(c)
    assert c.answer(c.session.retrieve_failed, request) == (
        b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n"
    )
    assert c.line("NOOP") == b"+OK\r\n"
    assert c.body(request, b"too late\r\n") == b""  # the download is over for the session
