"""Failures a client can cause or meet, with their RFC 2449/3206 response codes, and regression
tests for injection through the login (in the manner of aiosmtpd's test_smtpsmuggling.py).

The login is the one place where client text reaches the upstream IMAP server before the
client has proved anything, so every quoting-sensitive character is sent through it — in
USER/PASS and, for CR/LF and NUL, inside AUTH PLAIN's base64 — and the mailboxes are read back
through IMAP to show that nothing ran upstream.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.pop3_helpers import (
    STATE_MAILBOX,
    Account,
    PopWire,
    UpstreamView,
    make_account,
    on_the_wire,
    plain_response,
    report_logs,
    running_gateway,
    upstream_view,
)
from tests.support import messages
from tests.support.dovecot import free_port
from tests.support.gateway import GatewayProcess
from tests.support.imap_access import append_message
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
SYS_TEMP = b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n"
NOT_IN_STATE = b"-ERR Command not valid in this state\r\n"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ")

#: every password typed in this module, to be searched for in the gateway's log
PASSWORDS_USED: set[str] = set()


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with running_gateway(upstream, tmp_path_factory.mktemp("pop3-errors")) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gateway: GatewayProcess) -> None:
    report_logs(request, gateway)


@pytest.fixture
def victim(upstream: Upstream) -> Account:
    acct = make_account(upstream, [messages.plain("a", n=1), messages.dotted()], "victim")
    PASSWORDS_USED.add(acct.password)
    return acct


def connect(gw: GatewayProcess) -> PopWire:
    return PopWire.connect(gw.host, gw.pop3_port)


# --------------------------------------------------------------------- bad credentials
def test_wrong_password_then_the_right_one(
    upstream: Upstream, gateway: GatewayProcess, victim: Account
) -> None:
    before = upstream_view(upstream, victim.name)
    wrong = "wrong-password-7f3a"
    PASSWORDS_USED.add(wrong)
    with connect(gateway) as client:
        assert client.command(f"USER {victim.name}") == b"+OK Send your password\r\n"
        assert client.command(f"PASS {wrong}") == AUTH_FAILED
        assert client.command("STAT") == NOT_IN_STATE
        assert client.command(f"PASS {victim.password}") == b"-ERR Send USER first\r\n"
        assert client.auth_plain(victim.name, wrong) == AUTH_FAILED
        client.login(victim.name, victim.password)
        assert client.quit() == b"+OK Bye\r\n"
    assert upstream_view(upstream, victim.name) == before


def test_unknown_user_gets_the_same_answer(gateway: GatewayProcess) -> None:
    PASSWORDS_USED.add("unknown-user-pw-91")
    with connect(gateway) as client:
        assert client.command("USER no-such-user-anywhere") == b"+OK Send your password\r\n"
        assert client.command("PASS unknown-user-pw-91") == AUTH_FAILED
        assert client.auth_plain("no-such-user-anywhere", "unknown-user-pw-91") == AUTH_FAILED


def test_third_failed_login_closes_the_connection(gateway: GatewayProcess, victim: Account) -> None:
    with connect(gateway) as client:
        for attempt in range(3):
            pw = f"guess-{attempt}-c0ffee"
            PASSWORDS_USED.add(pw)
            assert client.auth_plain(victim.name, pw) == AUTH_FAILED
        assert client.read_to_eof() == b""


def test_malformed_auth_plain_responses(gateway: GatewayProcess, victim: Account) -> None:
    with connect(gateway) as client:
        assert client.command("AUTH PLAIN !!!") == (
            b"-ERR [AUTH] Invalid base64 in authentication response\r\n"
        )
        assert client.command("AUTH PLAIN " + "dXNlcgBwdw==") == (  # "user\0pw": two fields
            b"-ERR [AUTH] Malformed PLAIN authentication response\r\n"
        )
        assert client.command(b"AUTH PLAIN " + plain_response(b"\xff\xfe", "x")) == (
            b"-ERR [AUTH] Credentials are not valid UTF-8\r\n"
        )
        assert client.command(b"AUTH PLAIN " + plain_response("", "x")) == (
            b"-ERR [AUTH] Empty user name\r\n"
        )
        assert (
            client.command(
                b"AUTH PLAIN " + plain_response(victim.name, victim.password, b"someone-else")
            )
            == b"-ERR [AUTH] Acting as another user is not allowed\r\n"
        )
        assert client.command("AUTH PLAIN =") == (
            b"-ERR [AUTH] Malformed PLAIN authentication response\r\n"
        )
        # none of these reached the upstream, so none counts as a failed login
        client.login(victim.name, victim.password)


def test_upstream_down_is_a_temporary_failure(
    start_gateway: Callable[..., GatewayProcess], victim: Account
) -> None:
    gw = start_gateway(upstream_imap={"port": free_port()})
    with connect(gw) as client:
        assert client.command(f"USER {victim.name}") == b"+OK Send your password\r\n"
        assert client.command(f"PASS {victim.password}") == SYS_TEMP
        assert client.auth_plain(victim.name, victim.password) == SYS_TEMP
        # not counted as password guesses: the connection stays open
        assert client.auth_plain(victim.name, victim.password) == SYS_TEMP
        assert client.quit() == b"+OK Bye\r\n"
    gw.wait_for_log(r"ERROR popgate\.pop3 login failed, upstream unavailable: cannot reach IMAP")


# --------------------------------------------------------------------- sessions of one device
def test_second_session_of_the_same_device_is_let_in(
    upstream: Upstream, gateway: GatewayProcess, victim: Account
) -> None:
    """No [IN-USE]: the first session may belong to a connection that silently vanished.
    Each session sees its own snapshot; deletes take effect at each one's QUIT."""
    acct = victim
    with connect(gateway) as first:
        first.login(acct.name, acct.password)
        assert first.command("DELE 1") == b"+OK message 1 deleted\r\n"
        with connect(gateway) as second:
            assert second.auth_plain(acct.name, acct.password).startswith(
                b"+OK Logged in, 2 messages"
            )
            assert second.quit() == b"+OK Bye\r\n"
            with connect(gateway) as phone:
                phone.login(f"{acct.name}#phone", acct.password)
                assert phone.command("STAT").startswith(b"+OK 2 ")
                assert phone.quit() == b"+OK Bye\r\n"
            # the first session is untouched by all this
            assert first.command("STAT") == f"+OK 1 {len(acct.messages[1])}\r\n".encode()
            assert first.fetch("RETR 2")[1] == on_the_wire(acct.messages[1])
            assert first.quit() == b"+OK Bye\r\n"
        with connect(gateway) as third:
            third.login(acct.name, acct.password)
            assert third.command("STAT") == f"+OK 1 {len(acct.messages[1])}\r\n".encode()
            assert third.quit() == b"+OK Bye\r\n"
    assert upstream_view(upstream, acct.name).hidden_uids() == {acct.uids[0]}


def test_simultaneous_logins_of_one_device_all_get_in(
    gateway: GatewayProcess, victim: Account
) -> None:
    clients = [connect(gateway) for _ in range(4)]
    try:
        for client in clients:
            assert client.command(f"USER {victim.name}") == b"+OK Send your password\r\n"
        answers: list[bytes] = []
        lock = threading.Lock()

        def login(client: PopWire) -> None:
            answer = client.command(f"PASS {victim.password}")
            with lock:
                answers.append(answer)

        threads = [threading.Thread(target=login, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(answers) == 4
        assert all(a.startswith(b"+OK Logged in") for a in answers), answers
    finally:
        for client in clients:
            client.close()


# --------------------------------------------------------------------- protocol errors
def test_commands_in_the_wrong_state(gateway: GatewayProcess, victim: Account) -> None:
    with connect(gateway) as client:
        for command in (
            "STAT",
            "LIST",
            "LIST 1",
            "UIDL",
            "RETR 1",
            "TOP 1 0",
            "DELE 1",
            "RSET",
            "NOOP",
        ):
            assert client.command(command) == NOT_IN_STATE, command
        assert client.command("PASS x") == b"-ERR Send USER first\r\n"
        assert client.command("USER") == b"-ERR USER needs a user name\r\n"
        for command in ("FOO", "", "RETRX 1", "XTND XLST"):
            assert client.command(command) == b"-ERR Unknown command\r\n", command
        assert client.command(b"\xff\xfe") == b"-ERR Command is not valid UTF-8\r\n"
        client.login(victim.name, victim.password)
        for command in ("USER x", "PASS x", "AUTH PLAIN", "STLS"):
            assert client.command(command) == NOT_IN_STATE, command
        assert client.command("STAT") == f"+OK 2 {sum(map(len, victim.messages))}\r\n".encode()


def test_bad_message_numbers(gateway: GatewayProcess, victim: Account) -> None:
    invalid = b"-ERR Invalid message number\r\n"
    expected = {
        "RETR 0": b"-ERR no such message: 0\r\n",
        "RETR 3": b"-ERR no such message: 3\r\n",
        "LIST 3": b"-ERR no such message: 3\r\n",
        "UIDL 999999999": b"-ERR no such message: 999999999\r\n",
        "DELE 3": b"-ERR no such message: 3\r\n",
        "TOP 3 0": b"-ERR no such message: 3\r\n",
        "RETR -1": invalid,
        "RETR +1": invalid,
        "RETR 1.0": invalid,
        "RETR x": invalid,
        "RETR 1 2": invalid,
        "RETR 1234567890": invalid,
        "RETR \N{SUPERSCRIPT ONE}": invalid,
        "RETR \N{ARABIC-INDIC DIGIT ONE}": invalid,
        "DELE ": b"-ERR Message number required\r\n",
        "RETR": b"-ERR Message number required\r\n",
        "TOP 1": b"-ERR TOP needs a message number and a line count\r\n",
        "TOP 1 x": b"-ERR TOP needs a message number and a line count\r\n",
        "TOP 1 -1": b"-ERR TOP needs a message number and a line count\r\n",
        "TOP x 1": invalid,
        "STAT 1": b"-ERR STAT takes no arguments\r\n",
    }
    with connect(gateway) as client:
        client.login(victim.name, victim.password)
        for command, answer in expected.items():
            assert client.command(command) == answer, command
        assert client.fetch("RETR 01")[1] == on_the_wire(victim.messages[0])
        assert client.command("STAT") == f"+OK 2 {sum(map(len, victim.messages))}\r\n".encode()
        assert client.quit() == b"+OK Bye\r\n"


def test_over_long_lines_are_refused_once_and_the_session_goes_on(
    gateway: GatewayProcess, victim: Account
) -> None:
    with connect(gateway) as client:
        client.login(victim.name, victim.password)
        assert client.command(b"NOOP " + b"x" * 9000) == b"-ERR Line too long\r\n"
        assert client.command("NOOP") == b"+OK\r\n"
        # A megabyte without a line end: one answer, nothing buffered, then normal service.
        for _ in range(16):
            client.send(b"y" * 65536)
        assert client.line() == b"-ERR Line too long\r\n"
        client.send(b"the tail of the long line is dropped with it\r\n")
        assert client.command("STAT").startswith(b"+OK 2 ")
        assert client.quit() == b"+OK Bye\r\n"


# --------------------------------------------------------------------- injection
INJECTED_MAILBOX = "injected"


def smuggling_names(name: str, password: str) -> list[bytes]:
    """User names that would break out of a naively quoted IMAP LOGIN or AUTHENTICATE and run
    commands in the session of ``name`` (whose real password they carry)."""
    user, pw = name.encode(), password.encode()
    return [
        user + b'" "' + pw + b'"\r\nX1 DELETE INBOX\r\nX2 CREATE ' + INJECTED_MAILBOX.encode(),
        user + b" " + pw + b"\r\nX1 DELETE INBOX",
        user + b'" {5}\r\nX1 DELETE INBOX',
        b"{%d}\r\n" % len(user) + user,
        b"{%d+}\r\n" % len(user) + user,
        user + b"\\",
        user + b'\\"',
        user + b")",
        user + b") X1 CREATE " + INJECTED_MAILBOX.encode(),
        user + b"*",
        user + b"*popgate-master",  # Dovecot's master-user separator in this test setup
        b"*",
        user + b"\nX1 DELETE INBOX",
        user + b"\rX1 DELETE INBOX",
        user + b"\r\n",
        user + b"\0" + pw,
        "jürgen-ünïcödé".encode(),
        user + "ü".encode(),
        b'"' + user + b'"',
        user + b" ",
        b" " + user,
    ]


def smuggling_passwords(password: str) -> list[bytes]:
    """Wrong passwords built around the right one, with the same ways out of a quoted string."""
    pw = password.encode()
    return [
        pw + b"\r\nX1 DELETE INBOX",
        pw + b'"\r\nX1 DELETE INBOX\r\n',
        b'" "' + pw,
        pw + b'" {5}',
        b"{%d}\r\n" % len(pw) + pw,
        pw + b"\\",
        pw + b")",
        b"*" + pw,
        pw + b" ",
        pw + b"\0",
        b"\0" + pw,
        pw + "ü".encode(),
        password.upper().encode(),
    ]


def in_parallel(
    attempt: Callable[[bytes, bytes], bytes], pairs: list[tuple[bytes, bytes]]
) -> list[bytes]:
    """Run login attempts concurrently: Dovecot answers each failure after about half a second."""
    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        return list(pool.map(lambda pair: attempt(*pair), pairs))


def own_account(upstream: Upstream, typed: bytes, acct: Account) -> bool:
    """Whether the server itself takes the login name ``typed`` for ``acct``'s account: Cyrus
    canonicalises login names (surrounding spaces dropped, lower case), Dovecot takes them as
    they are. Such a login with the account's own password opens that account and nothing
    else: no way out of the quoting, just another spelling of the same user."""
    if upstream.kind == "cyrus":
        return typed.strip(b" ").lower() == acct.name.lower().encode()
    return typed == acct.name.encode()


def logged_into(acct: Account) -> bytes:
    """The start of the answer to a login into ``acct``'s own, untouched maildrop."""
    return b"+OK Logged in, %d messages" % len(acct.uids)


def assert_untouched(upstream: Upstream, acct: Account, before: UpstreamView) -> None:
    after = upstream_view(upstream, acct.name)
    assert after == before
    assert INJECTED_MAILBOX not in after.mailboxes
    assert sorted(after.inbox_flags) == acct.uids


@pytest.fixture
def attacker(upstream: Upstream) -> Account:
    """An account whose owner tries to make the gateway run IMAP commands of their choosing.
    (Its password appears inside user names, which the gateway may log: not in PASSWORDS_USED.)"""
    return make_account(upstream, [messages.plain("mine", n=5)], "attacker")


def test_login_smuggling_through_auth_plain(
    upstream: Upstream, gateway: GatewayProcess, victim: Account, attacker: Account
) -> None:
    before = {a.name: upstream_view(upstream, a.name) for a in (victim, attacker)}
    passwords = smuggling_passwords(victim.password)
    PASSWORDS_USED.update(p.decode() for p in passwords)
    pairs = [
        (n, attacker.password.encode()) for n in smuggling_names(attacker.name, attacker.password)
    ]
    pairs += [(n, victim.password.encode()) for n in smuggling_names(victim.name, "x")]
    pairs += [(victim.name.encode(), p) for p in passwords]
    owners = {attacker.password.encode(): attacker, victim.password.encode(): victim}

    def attempt(user: bytes, password: bytes) -> bytes:
        with connect(gateway) as client:
            return client.command(b"AUTH PLAIN " + plain_response(user, password))

    answers = in_parallel(attempt, pairs)
    for pair, answer in zip(pairs, answers, strict=True):
        owner = owners.get(pair[1])
        # A NUL inside a field makes four PLAIN fields: refused before any upstream login.
        if b"\0" in pair[0] or b"\0" in pair[1]:
            assert answer == b"-ERR [AUTH] Malformed PLAIN authentication response\r\n", pair
        elif owner is not None and own_account(upstream, pair[0], owner):
            assert answer.startswith(logged_into(owner)), pair
        else:
            assert answer == AUTH_FAILED, pair
    for acct in (victim, attacker):
        assert_untouched(upstream, acct, before[acct.name])


def test_login_smuggling_through_user_and_pass(
    upstream: Upstream, gateway: GatewayProcess, victim: Account, attacker: Account
) -> None:
    before = {a.name: upstream_view(upstream, a.name) for a in (victim, attacker)}
    passwords = [p for p in smuggling_passwords(victim.password) if b"\r" not in p]
    PASSWORDS_USED.update(p.decode() for p in passwords)
    on_one_line = [
        n
        for n in smuggling_names(attacker.name, attacker.password)
        if b"\r" not in n and b"\n" not in n
    ]
    pairs = [(n, attacker.password.encode()) for n in on_one_line]
    pairs += [(victim.name.encode(), p) for p in passwords]

    def attempt(user: bytes, password: bytes) -> bytes:
        with connect(gateway) as client:
            assert client.command(b"USER " + user) == b"+OK Send your password\r\n", user
            return client.command(b"PASS " + password)

    answers = in_parallel(attempt, pairs)
    for pair, answer in zip(pairs, answers, strict=True):
        if pair[1] == attacker.password.encode() and own_account(upstream, pair[0], attacker):
            assert answer.startswith(logged_into(attacker)), pair
        else:
            assert answer == AUTH_FAILED, pair
    for acct in (victim, attacker):
        assert_untouched(upstream, acct, before[acct.name])


def test_special_characters_in_a_real_password_log_in_as_exactly_that_user(
    upstream: Upstream, gateway: GatewayProcess, victim: Account
) -> None:
    password = 'p"w\\{5}) *ü€ X1 DELETE INBOX'
    name = f"{victim.name}-quoting"
    upstream.add_user(name, password)
    PASSWORDS_USED.add(password)
    with upstream.imap_as_master(name) as conn:
        append_message(conn, messages.plain("mine", n=4))
    before = upstream_view(upstream, name)
    with connect(gateway) as client:
        assert client.command(f"USER {name}") == b"+OK Send your password\r\n"
        answer = client.command(f"PASS {password}")
        assert (
            answer
            == f"+OK Logged in, 1 messages ({len(messages.plain('mine', n=4))} octets)\r\n".encode()
        )
        assert client.quit() == b"+OK Bye\r\n"
    with connect(gateway) as client:
        assert client.auth_plain(name, password).startswith(b"+OK Logged in, 1 messages")
        assert client.quit() == b"+OK Bye\r\n"
    # The same password does not open the neighbouring account.
    with connect(gateway) as client:
        assert client.auth_plain(victim.name, password) == AUTH_FAILED
    assert upstream_view(upstream, name) == before


def test_password_with_spaces_via_user_pass(upstream: Upstream, gateway: GatewayProcess) -> None:
    password = "  two  leading, two  inner and one trailing "
    acct = make_account(upstream, [], "spaces")
    name = acct.name + "-s"
    upstream.add_user(name, password)
    PASSWORDS_USED.add(password)
    with connect(gateway) as client:
        assert client.command(f"USER {name}") == b"+OK Send your password\r\n"
        assert client.command(f"PASS {password}") == b"+OK Logged in, 0 messages (0 octets)\r\n"


def test_odd_device_names_stay_within_their_own_view(
    upstream: Upstream, gateway: GatewayProcess, victim: Account
) -> None:
    before = upstream_view(upstream, victim.name)
    devices = [
        'dev" "x',
        "dev\\",
        "dev{5}",
        "dev) X1 DELETE INBOX",
        "dev*",
        "dëv-ünïcode",
        "dev\r\nX1 DELETE INBOX\r\nX-Popgate-State: forged",
    ]
    for device in devices:
        with connect(gateway) as client:
            answer = client.auth_plain(f"{victim.name}#{device}", victim.password)
            assert answer.startswith(b"+OK Logged in, 2 messages"), (device, answer)
            assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
            assert client.quit() == b"+OK Bye\r\n", device
    after = upstream_view(upstream, victim.name)
    assert after.mailboxes == before.mailboxes | {STATE_MAILBOX}
    assert sorted(after.inbox_flags) == victim.uids
    assert after.system_flags() == before.system_flags()
    assert len(after.state_messages) == len(devices)
    for device in devices:
        with connect(gateway) as client:
            client.auth_plain(f"{victim.name}#{device}", victim.password)
            assert client.command("STAT") == f"+OK 1 {len(victim.messages[1])}\r\n".encode()
    with connect(gateway) as client:
        client.login(victim.name, victim.password)
        assert client.command("STAT").startswith(b"+OK 2 ")


# --------------------------------------------------------------------- the log
def test_log_lines_cannot_be_forged_and_hold_no_password(
    upstream: Upstream, gateway: GatewayProcess, victim: Account
) -> None:
    """Last in the module, so it also sweeps what the tests above made the gateway log."""
    wrong = "log-check-wrong-pw-5e1d"
    PASSWORDS_USED.update({wrong, upstream.master_password})
    forged = f"{victim.name}\n2026-01-01T00:00:00Z INFO popgate.pop3 login ok user=admin"
    with connect(gateway) as client:
        assert client.command(f"USER {victim.name}") == b"+OK Send your password\r\n"
        assert client.command(f"PASS {wrong}") == AUTH_FAILED
        assert client.auth_plain(forged, wrong) == AUTH_FAILED
        client.login(victim.name, victim.password)
        assert client.quit() == b"+OK Bye\r\n"
    # the log is written before the answers; wait for the pipe to bring it in
    gateway.wait_for_log(rf"login ok mechanism=USER .*user={re.escape(victim.name)} ")
    log = gateway.log_text()
    assert re.search(r"login failed: .* user=\S*\\n2026-01-01", log), "escaped user name"
    for line in log.splitlines():
        assert LOG_LINE.match(line), f"log line not from the formatter: {line!r}"
    for password in PASSWORDS_USED:
        assert password not in log, f"password {password!r} in the log"
        assert plain_response(victim.name, password).decode() not in log
