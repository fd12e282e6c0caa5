"""Every POP3 command against the real gateway and Dovecot, checked byte for byte.

One gateway serves the whole module; each test has a user of its own, so nothing a test
deletes is seen by another. Sizes and bodies are compared with what IMAP reports for the
same messages (RFC822.SIZE, BODY[]), which is what the gateway promises to pass through.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest

from tests.integration.pop3_helpers import (
    GREETING,
    TERMINATOR,
    Account,
    PopWire,
    make_account,
    on_the_wire,
    plain_response,
    report_logs,
    rfc822_sizes,
    running_gateway,
    top_of,
    trust_gateway_cert,
    unstuff,
    upstream_view,
)
from tests.support import messages
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

IMPLEMENTATION = re.compile(rb"IMPLEMENTATION popgate-\S+\r\n")


def dots_everywhere(size: int = 1024 * 1024, seed: int = 7) -> bytes:
    """About ``size`` bytes where most lines start with "." (lines of random length, so some
    fall on every chunk boundary the gateway's IMAP reads and writes may have)."""
    rng = random.Random(seed)
    head = messages.crlf(
        "From: Sender <sender@example.test>\nTo: Recipient <rcpt@example.test>\n"
        "Subject: Dots on every line\nMessage-ID: <dots-everywhere@example.test>\n\n"
    )
    lines = [head]
    total = len(head)
    choices = [b".", b"..", b".x", b"", b"x.", b". ", b"..."]
    while total < size:
        line = rng.choice(choices) + b"y" * rng.randrange(0, 120) + b"\r\n"
        lines.append(line)
        total += len(line)
    lines.append(b".\r\nlast line\r\n")
    return b"".join(lines)


CORPUS = [*messages.corpus(), dots_everywhere()]


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with running_gateway(upstream, tmp_path_factory.mktemp("pop3-commands")) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gateway: GatewayProcess) -> None:
    report_logs(request, gateway)


@pytest.fixture(scope="module")
def corpus_account(upstream: Upstream) -> Account:
    """A mailbox only read (never changed) by the tests that use it."""
    return make_account(upstream, CORPUS, "corpus")


@pytest.fixture
def small_account(upstream: Upstream) -> Account:
    """A fresh mailbox of three small messages, for tests that delete."""
    return make_account(
        upstream, [messages.plain(f"m{i}", f"body {i}\n", n=i) for i in range(1, 4)], "small"
    )


def connect(gw: GatewayProcess) -> PopWire:
    return PopWire.connect(gw.host, gw.pop3_port)


def logged_in(gw: GatewayProcess, account: Account) -> PopWire:
    client = connect(gw)
    client.login(account.name, account.password)
    return client


# --------------------------------------------------------------------- greeting, CAPA
def test_greeting(gateway: GatewayProcess) -> None:
    with connect(gateway) as client:
        assert client.greeting == GREETING
        assert client.quit() == b"+OK Bye\r\n"


def test_capa_before_login_on_the_plain_port(gateway: GatewayProcess) -> None:
    with connect(gateway) as client:
        client.send(b"CAPA\r\n")
        assert client.line() == b"+OK Capability list follows\r\n"
        raw = client.multiline_raw()
    assert IMPLEMENTATION.search(raw), raw
    caps = IMPLEMENTATION.sub(b"IMPLEMENTATION x\r\n", raw)
    assert caps == (
        b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
        b"USER\r\nSASL PLAIN\r\nSTLS\r\nEXPIRE NEVER\r\nIMPLEMENTATION x\r\n.\r\n"
    )


def test_capa_after_login_offers_no_login_commands(
    gateway: GatewayProcess, corpus_account: Account
) -> None:
    with logged_in(gateway, corpus_account) as client:
        status, caps = client.listing("CAPA")
        assert status == b"+OK Capability list follows\r\n"
        assert caps[:-1] == [
            b"TOP",
            b"UIDL",
            b"RESP-CODES",
            b"AUTH-RESP-CODE",
            b"PIPELINING",
            b"EXPIRE NEVER",  # on_delete = "hide" and no retention: nothing is ever removed
        ]
        assert caps[-1].startswith(b"IMPLEMENTATION popgate-")
        assert client.quit() == b"+OK Bye\r\n"


def test_capa_on_the_tls_port_and_after_stls_has_no_stls(gateway: GatewayProcess) -> None:
    context, hostname = trust_gateway_cert(gateway)
    with PopWire.connect(
        gateway.host, gateway.pop3s_port, tls=context, server_hostname=hostname
    ) as client:
        assert client.greeting == GREETING
        _, caps = client.listing("CAPA")
        assert b"STLS" not in caps
        assert b"USER" in caps and b"SASL PLAIN" in caps
        assert client.command("STLS") == b"-ERR TLS already active\r\n"
    with connect(gateway) as client:
        client.stls(context, hostname)
        _, caps = client.listing("CAPA")
        assert b"STLS" not in caps
        assert b"USER" in caps and b"SASL PLAIN" in caps


# --------------------------------------------------------------------- logging in
def test_user_pass_reports_the_maildrop(gateway: GatewayProcess, corpus_account: Account) -> None:
    total = sum(len(m) for m in corpus_account.messages)
    with connect(gateway) as client:
        assert client.command(f"USER {corpus_account.name}") == b"+OK Send your password\r\n"
        answer = client.command(f"PASS {corpus_account.password}")
        assert answer == f"+OK Logged in, {len(CORPUS)} messages ({total} octets)\r\n".encode()
        assert client.quit() == b"+OK Bye\r\n"


def test_auth_plain_with_initial_response(gateway: GatewayProcess, small_account: Account) -> None:
    with connect(gateway) as client:
        answer = client.auth_plain(small_account.name, small_account.password)
        assert answer.startswith(b"+OK Logged in, 3 messages ("), answer
        assert client.command("STAT").startswith(b"+OK 3 ")


def test_auth_plain_with_continuation(gateway: GatewayProcess, small_account: Account) -> None:
    with connect(gateway) as client:
        client.send(b"AUTH PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        answer = client.command(plain_response(small_account.name, small_account.password))
        assert answer.startswith(b"+OK Logged in, 3 messages ("), answer


def test_auth_plain_authzid_equal_to_the_user_is_accepted(
    gateway: GatewayProcess, small_account: Account
) -> None:
    with connect(gateway) as client:
        answer = client.auth_plain(
            small_account.name, small_account.password, authzid=small_account.name.encode()
        )
        assert answer.startswith(b"+OK Logged in, "), answer


def test_auth_without_mechanism_lists_plain(gateway: GatewayProcess) -> None:
    with connect(gateway) as client:
        assert client.listing("AUTH") == (b"+OK Supported mechanisms follow\r\n", [b"PLAIN"])
        assert client.command("AUTH CRAM-MD5") == b"-ERR Unsupported authentication mechanism\r\n"
        client.send(b"AUTH PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        assert client.command("*") == b"-ERR [AUTH] Authentication cancelled\r\n"
        assert client.command("NOOP") == b"-ERR Command not valid in this state\r\n"


# --------------------------------------------------------------------- STAT, LIST, UIDL
def test_stat_list_and_uidl_agree_with_imap(
    upstream: Upstream, gateway: GatewayProcess, corpus_account: Account
) -> None:
    acct = corpus_account
    sizes = rfc822_sizes(upstream, acct.name, acct.password)
    assert [sizes[u] for u in acct.uids] == [len(m) for m in acct.messages]
    with logged_in(gateway, acct) as client:
        total = sum(sizes.values())
        assert client.command("STAT") == f"+OK {len(acct.uids)} {total}\r\n".encode()

        status, listing = client.listing("LIST")
        assert status == f"+OK {len(acct.uids)} messages, scan listing follows\r\n".encode()
        expected = [f"{n} {sizes[uid]}".encode() for n, uid in enumerate(acct.uids, 1)]
        assert listing == expected

        status, uidls = client.listing("UIDL")
        assert status == f"+OK {len(acct.uids)} messages, unique-id listing follows\r\n".encode()
        numbers = [line.split(b" ")[0] for line in uidls]
        values = [line.split(b" ")[1] for line in uidls]
        assert numbers == [str(n).encode() for n in range(1, len(acct.uids) + 1)]
        assert len(set(values)) == len(values)
        for value in values:
            assert re.fullmatch(rb"[\x21-\x7e]{1,70}", value), value

        for n, uid in enumerate(acct.uids, 1):
            assert client.command(f"LIST {n}") == f"+OK {n} {sizes[uid]}\r\n".encode()
            assert client.command(f"UIDL {n}") == b"+OK %d %s\r\n" % (n, values[n - 1])
        assert client.quit() == b"+OK Bye\r\n"


# --------------------------------------------------------------------- RETR, TOP
def test_retr_returns_exactly_the_stored_bytes(
    gateway: GatewayProcess, corpus_account: Account
) -> None:
    assert corpus_account.messages == CORPUS  # stored as APPENDed
    with logged_in(gateway, corpus_account) as client:
        for n, stored in enumerate(corpus_account.messages, 1):
            status, body = client.fetch(f"RETR {n}")
            assert status == f"+OK {len(stored)} octets\r\n".encode()
            assert body == on_the_wire(stored), f"message {n}"
        assert client.quit() == b"+OK Bye\r\n"


def test_retr_dot_stuffs_every_line_that_starts_with_a_dot(
    gateway: GatewayProcess, corpus_account: Account
) -> None:
    n = CORPUS.index(messages.dotted()) + 1
    with logged_in(gateway, corpus_account) as client:
        client.send(f"RETR {n}\r\n".encode())
        client.line()
        raw = client.multiline_raw()
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert body == (
        b"Dot-stuffing check.\r\n"
        b"..\r\n"
        b"...\r\n"
        b"..leading dot\r\n"
        b"...two leading dots\r\n"
        b"....three\r\n"
        b" .space then dot\r\n"
        b"..\r\n"
        b"last line\r\n"
        b".\r\n"
    )


def test_retr_of_a_message_without_final_line_break_ends_the_line_first(
    gateway: GatewayProcess, corpus_account: Account
) -> None:
    n = CORPUS.index(messages.no_final_newline()) + 1
    stored = corpus_account.messages[n - 1]
    assert stored.endswith(b"no newline")
    with logged_in(gateway, corpus_account) as client:
        client.send(f"RETR {n}\r\n".encode())
        client.line()
        assert client.multiline_raw().endswith(b"the last line has no newline\r\n.\r\n")


@pytest.mark.parametrize("lines", [0, 3, 1000])
def test_top(gateway: GatewayProcess, corpus_account: Account, lines: int) -> None:
    with logged_in(gateway, corpus_account) as client:
        for n, stored in enumerate(corpus_account.messages, 1):
            status, body = client.fetch(f"TOP {n} {lines}")
            assert status.startswith(b"+OK "), status
            assert body == top_of(stored, lines), f"TOP {n} {lines}"


# --------------------------------------------------------------------- DELE, RSET, NOOP, QUIT
def test_dele_rset_noop_quit_replies(gateway: GatewayProcess, small_account: Account) -> None:
    sizes = [len(m) for m in small_account.messages]
    with logged_in(gateway, small_account) as client:
        assert client.command("NOOP") == b"+OK\r\n"
        assert client.command("DELE 2") == b"+OK message 2 deleted\r\n"
        assert client.command("DELE 2") == b"-ERR message 2 already deleted\r\n"
        assert client.command("STAT") == f"+OK 2 {sizes[0] + sizes[2]}\r\n".encode()
        assert client.listing("LIST")[1] == [f"1 {sizes[0]}".encode(), f"3 {sizes[2]}".encode()]
        assert [line.split()[0] for line in client.listing("UIDL")[1]] == [b"1", b"3"]
        for command in ("LIST 2", "UIDL 2", "RETR 2", "TOP 2 0"):
            assert client.command(command) == b"-ERR message 2 already deleted\r\n", command
        assert (
            client.command("RSET")
            == f"+OK maildrop has 3 messages ({sum(sizes)} octets)\r\n".encode()
        )
        assert client.command("STAT") == f"+OK 3 {sum(sizes)}\r\n".encode()
        assert client.fetch("RETR 2")[1] == on_the_wire(small_account.messages[1])
        assert client.quit() == b"+OK Bye\r\n"


def test_quit_in_authorization_state(gateway: GatewayProcess) -> None:
    with connect(gateway) as client:
        assert client.command("USER nobody-in-particular") == b"+OK Send your password\r\n"
        assert client.quit() == b"+OK Bye\r\n"


def test_commands_are_case_insensitive(gateway: GatewayProcess, small_account: Account) -> None:
    with connect(gateway) as client:
        assert client.command(f"user {small_account.name}") == b"+OK Send your password\r\n"
        assert client.command(f"pass {small_account.password}").startswith(b"+OK Logged in")
        assert client.command("stat").startswith(b"+OK 3 ")
        assert client.command("Quit") == b"+OK Bye\r\n"


# --------------------------------------------------------------------- pipelining
def test_pipelined_commands_are_answered_in_order(
    gateway: GatewayProcess, corpus_account: Account
) -> None:
    first, second = corpus_account.messages[:2]
    with logged_in(gateway, corpus_account) as client:
        client.send(b"RETR 1\r\nRETR 2\r\nUIDL\r\nQUIT\r\n")
        assert client.line() == f"+OK {len(first)} octets\r\n".encode()
        assert unstuff(client.multiline_raw()) == on_the_wire(first)
        assert client.line() == f"+OK {len(second)} octets\r\n".encode()
        assert unstuff(client.multiline_raw()) == on_the_wire(second)
        assert client.line().endswith(b"unique-id listing follows\r\n")
        assert len(client.lines()) == len(CORPUS)
        assert client.line() == b"+OK Bye\r\n"
        assert client.read_to_eof() == b""


def test_a_whole_session_in_one_write(
    upstream: Upstream, gateway: GatewayProcess, small_account: Account
) -> None:
    acct = small_account
    sizes = [len(m) for m in acct.messages]
    script = (
        f"CAPA\r\nUSER {acct.name}\r\nPASS {acct.password}\r\nSTAT\r\nLIST\r\n"
        "TOP 1 0\r\nDELE 1\r\nNOOP\r\nRSET\r\nDELE 3\r\nLIST 3\r\nQUIT\r\n"
    )
    with connect(gateway) as client:
        client.send(script.encode())
        assert client.line() == b"+OK Capability list follows\r\n"
        assert client.multiline_raw().endswith(TERMINATOR)
        assert client.line() == b"+OK Send your password\r\n"
        assert client.line() == f"+OK Logged in, 3 messages ({sum(sizes)} octets)\r\n".encode()
        assert client.line() == f"+OK 3 {sum(sizes)}\r\n".encode()
        assert client.line() == b"+OK 3 messages, scan listing follows\r\n"
        assert client.lines() == [f"{n} {s}".encode() for n, s in enumerate(sizes, 1)]
        assert client.line() == f"+OK {sizes[0]} octets\r\n".encode()
        assert unstuff(client.multiline_raw()) == top_of(acct.messages[0], 0)
        assert client.line() == b"+OK message 1 deleted\r\n"
        assert client.line() == b"+OK\r\n"
        assert client.line() == f"+OK maildrop has 3 messages ({sum(sizes)} octets)\r\n".encode()
        assert client.line() == b"+OK message 3 deleted\r\n"
        assert client.line() == b"-ERR message 3 already deleted\r\n"
        assert client.line() == b"+OK Bye\r\n"
        assert client.read_to_eof() == b""
    assert upstream_view(upstream, acct.name).hidden_uids() == {acct.uids[2]}


def test_served_after_commands_split_across_writes(
    gateway: GatewayProcess, small_account: Account
) -> None:
    with logged_in(gateway, small_account) as client:
        for byte in b"STAT\r\n":
            client.send(bytes([byte]))
        assert client.line().startswith(b"+OK 3 ")
        client.send(b"NO")
        client.send(b"OP\r\nLIST 1")
        assert client.line() == b"+OK\r\n"
        client.send(b"\r\n")
        assert client.line() == f"+OK 1 {len(small_account.messages[0])}\r\n".encode()
