"""GETMETADATA / SETMETADATA on a StringTransport: the exact commands, the typed answers."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from gateway.proto.imap_responses import Metadata
from gateway.upstream.account import ImapAccount
from gateway.upstream.imap_client import ImapClientProtocol, ImapCommandFailed


def connected(caps: str = "IMAP4rev1 LITERAL+ METADATA") -> tuple[ImapAccount, StringTransport]:
    proto = ImapClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(f"* OK [CAPABILITY {caps}] ready\r\n".encode())
    return ImapAccount(proto), transport


def sent(transport: StringTransport) -> bytes:
    value = transport.value()
    transport.clear()
    return value


def test_getmetadata_options_before_the_mailbox_and_every_value_kind() -> None:
    account, transport = connected()
    d = Deferred.fromCoroutine(
        account.get_metadata("INBOX", ["/private/vendor/popgate/state"], depth="1", max_size=64)
    )
    assert sent(transport) == (
        b'G1 GETMETADATA (MAXSIZE 64 DEPTH 1) "INBOX" ("/private/vendor/popgate/state")\r\n'
    )
    account.proto.dataReceived(
        b"* METADATA INBOX (/private/vendor/popgate/state/A {4}\r\nx\r\ny"
        b' "/private/vendor/popgate/state/b" "quoted" /private/vendor/popgate/state/c NIL)\r\n'
        b"G1 OK [METADATA LONGENTRIES 70000] done\r\n"
    )
    result = d.result
    assert result == Metadata(
        {
            "/private/vendor/popgate/state/a": b"x\r\ny",
            "/private/vendor/popgate/state/b": b"quoted",
        },
        70000,
        [],
    )


def test_a_value_too_large_to_keep_is_named_not_kept() -> None:
    account, transport = connected()
    d = Deferred.fromCoroutine(account.get_metadata("INBOX", ["/private/x"], depth="infinity"))
    assert sent(transport) == b'G1 GETMETADATA (DEPTH infinity) "INBOX" ("/private/x")\r\n'
    big = b"z" * (200 * 1024)
    account.proto.dataReceived(
        b"* METADATA INBOX (/private/x/big {%d}\r\n" % len(big) + big + b")\r\nG1 OK done\r\n"
    )
    assert d.result == Metadata({}, 0, ["/private/x/big"])


def test_setmetadata_quotes_names_sends_literals_and_nil() -> None:
    """Values go as literals even when they could be quoted: Cyrus ends the connection on a
    quoted string over its ``maxquoted``."""
    account, transport = connected()
    d = Deferred.fromCoroutine(
        account.set_metadata(
            'Odd "box"',
            {'/private/a"b': b"line\r\nnext", "/private/c": None, "/private/d": b"plain"},
        )
    )
    assert sent(transport) == (
        b'G1 SETMETADATA "Odd \\"box\\"" ("/private/a\\"b" {10+}\r\nline\r\nnext'
        b' "/private/c" NIL "/private/d" {5+}\r\nplain)\r\n'
    )
    account.proto.dataReceived(b"G1 NO [METADATA MAXSIZE 1024] too big\r\n")
    failure = d.result
    d.addErrback(lambda f: None)
    assert isinstance(failure.value, ImapCommandFailed)
    assert [str(t) for t in failure.value.status.code or ()] == ["METADATA", "MAXSIZE", "1024"]
