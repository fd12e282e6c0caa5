"""The Twisted IMAP client on a StringTransport: tagging, literals, routing bodies to sinks."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.proto.imap import Atom
from gateway.upstream.imap_client import (
    READ_SIZE,
    TLS_READ_SIZE,
    ImapClientProtocol,
    ImapCommandFailed,
    ImapConnectionLost,
    ImapTimeout,
)


class Sink:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def literal_begin(self, size: int) -> None:
        self.events.append(("begin", size))

    def literal_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def literal_end(self) -> None:
        self.events.append(("end",))

    @property
    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")


def connected(caps: str = "IMAP4rev1") -> tuple[ImapClientProtocol, StringTransport]:
    proto = ImapClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(f"* OK [CAPABILITY {caps}] ready\r\n".encode())
    return proto, transport


def sent(transport: StringTransport) -> bytes:
    value = transport.value()
    transport.clear()
    return value


def test_greeting_capabilities_and_tagged_completion() -> None:
    proto, transport = connected("IMAP4rev1 LITERAL+ AUTH=PLAIN")
    assert proto.has("literal+") and proto.has("AUTH=PLAIN")
    d = proto.command(Atom("NOOP"))
    assert sent(transport) == b"G1 NOOP\r\n"
    proto.dataReceived(b"* 3 EXISTS\r\nG1 OK done\r\n")
    response = d.result
    assert response.status.kind == "OK" and response.untagged[0].tokens == ["3", "EXISTS"]


def test_synchronizing_literal_waits_for_continuation_and_queues_later_commands() -> None:
    proto, transport = connected()
    d1 = proto.command(Atom("LOGIN"), "us\r\ner", "pw")
    d2 = proto.command(Atom("NOOP"))
    assert sent(transport) == b"G1 LOGIN {6}\r\n"  # nothing more before "+"
    proto.dataReceived(b"+ go ahead\r\n")
    assert sent(transport) == b'us\r\ner "pw"\r\nG2 NOOP\r\n'
    proto.dataReceived(b"G1 NO [AUTHENTICATIONFAILED] no\r\nG2 OK fine\r\n")
    failure = d1.result
    d1.addErrback(lambda f: None)
    assert isinstance(failure.value, ImapCommandFailed)
    assert failure.value.status.code_name == "AUTHENTICATIONFAILED"
    assert d2.result.status.kind == "OK"


def test_inline_body_reaches_the_sink_even_behind_a_pipelined_store() -> None:
    proto, _transport = connected()
    store = proto.command(Atom("UID"), Atom("STORE"), Atom("1"), Atom("+FLAGS.SILENT"), [])
    sink = Sink()
    fetch = proto.command(Atom("UID"), Atom("FETCH"), Atom("2"), [Atom("BODY.PEEK[]")], sink=sink)
    proto.dataReceived(b"* 2 FETCH (UID 2 BODY[] {5}\r\nhello)\r\n")
    proto.dataReceived(b"G1 OK stored\r\nG2 OK fetched\r\n")
    assert sink.events == [("begin", 5), ("data", b"hello"), ("end",)]
    assert store.result.status.kind == fetch.result.status.kind == "OK"


def test_large_body_streams_to_the_sink() -> None:
    proto, _transport = connected()
    proto.connection.parser.stream_threshold = 4
    sink = Sink()
    d = proto.command(Atom("UID"), Atom("FETCH"), Atom("7"), [Atom("BODY.PEEK[]")], sink=sink)
    proto.dataReceived(b"* 1 FETCH (UID 7 BODY[] {10}\r\n01234")
    assert sink.events == [("begin", 10), ("data", b"01234")]
    proto.dataReceived(b"56789)\r\nG1 OK\r\n")
    assert sink.body == b"0123456789" and sink.events[-1] == ("end",)
    assert d.result.status.kind == "OK"


def test_connection_lost_and_bye_fail_what_is_pending() -> None:
    proto, _transport = connected()
    d = proto.command(Atom("NOOP"))
    proto.dataReceived(b"* BYE shutting down\r\n")
    with pytest.raises(ImapConnectionLost):
        d.result.raiseException()
    later = proto.command(Atom("NOOP"))
    later_failure = later.result
    later.addErrback(lambda f: None)
    assert isinstance(later_failure.value, ImapConnectionLost)
    d.addErrback(lambda f: None)


def test_protocol_garbage_drops_the_connection() -> None:
    proto, transport = connected()
    d = proto.command(Atom("NOOP"))
    proto.dataReceived(b"G1 WHATEVER\r\n")
    assert transport.disconnecting
    assert d.called
    d.addErrback(lambda f: None)


@pytest.mark.parametrize("threshold", [4, 64 * 1024])  # streamed or inline bodies
def test_pipelined_fetches_answered_together_each_get_their_own_body(threshold: int) -> None:
    proto, _ = connected()
    proto.connection.parser.stream_threshold = threshold
    first, second = Sink(), Sink()
    proto.command(Atom("UID"), Atom("FETCH"), Atom("2"), [], sinks={2: first})
    proto.command(Atom("UID"), Atom("FETCH"), Atom("3"), [], sinks={3: second})
    # Dovecot answers pipelined FETCHes before their completions, in any order it likes.
    proto.dataReceived(
        b"* 3 FETCH (UID 3 BODY[] {5}\r\nthree)\r\n"
        b"* 2 FETCH (UID 2 BODY[] {3}\r\ntwo)\r\n"
        b"G1 OK\r\nG2 OK\r\n"
    )
    assert first.body == b"two" and second.body == b"three"


@pytest.mark.parametrize(
    "second",
    [
        b"* 2 FETCH (UID 7 BODY[] {5}\r\nseven)\r\n",  # streamed: the UID comes first
        b"* 2 FETCH (BODY[] {5}\r\nseven UID 7)\r\n",  # collected: the UID comes at the end
    ],
)
def test_one_fetch_of_several_uids_gives_each_body_to_its_sink(second: bytes) -> None:
    proto, transport = connected()
    sinks = {7: Sink(), 3: Sink()}
    d = proto.command(Atom("UID"), Atom("FETCH"), Atom("3,7"), [], sinks=sinks)
    assert transport.value().endswith(b"UID FETCH 3,7 ()\r\n")
    proto.dataReceived(b"* 1 FETCH (UID 3 BODY[] {5}\r\nthree)\r\n" + second + b"G1 OK\r\n")
    assert sinks[3].body == b"three" and sinks[7].body == b"seven"
    assert d.result.status.kind == "OK"


def test_a_body_nobody_asked_for_is_dropped() -> None:
    proto, _ = connected()
    sink = Sink()
    d = proto.command(Atom("UID"), Atom("FETCH"), Atom("2"), [], sinks={2: sink})
    proto.dataReceived(b"* 9 FETCH (UID 9 BODY[] {3}\r\nbad)\r\nG1 OK\r\n")
    assert sink.events == [] and d.result.status.kind == "OK"


# --------------------------------------------------------------------- response timeout
def timed(timeout: float = 60) -> tuple[ImapClientProtocol, StringTransport, Clock]:
    clock = Clock()
    proto = ImapClientProtocol(clock, timeout)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
    return proto, transport, clock


def failure_of(d: Deferred[Any]) -> BaseException:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the command has not failed"
    return failures[0].value


def test_a_command_without_answer_times_out_and_closes_the_connection() -> None:
    proto, transport, clock = timed(60)
    first, second = proto.command(Atom("NOOP")), proto.command(Atom("NOOP"))
    clock.advance(59.9)
    assert not first.called and not transport.disconnecting
    clock.advance(0.2)
    for d in (first, second):
        error = failure_of(d)
        assert isinstance(error, ImapTimeout) and "within 60s" in str(error)
    assert transport.disconnecting  # the link is closed, not left to a hung server
    assert clock.getDelayedCalls() == []
    assert isinstance(failure_of(proto.command(Atom("NOOP"))), ImapConnectionLost)


def test_bytes_arriving_restart_the_wait() -> None:
    proto, _transport, clock = timed(60)
    sink = Sink()
    d = proto.command(Atom("UID"), Atom("FETCH"), Atom("1"), Atom("BODY[]"), sink=sink)
    clock.advance(50)
    proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {10}\r\n01234")
    clock.advance(50)
    proto.dataReceived(b"56789)\r\n")
    clock.advance(50)
    assert not d.called
    clock.advance(10)  # 60 s after the last byte, inside nothing of this command's answer
    assert isinstance(failure_of(d), ImapTimeout)
    assert sink.body == b"0123456789"


def test_a_stall_inside_a_literal_times_out() -> None:
    proto, _transport, clock = timed(5)
    sink = Sink()
    d = proto.command(Atom("UID"), Atom("FETCH"), Atom("1"), Atom("BODY[]"), sink=sink)
    proto.dataReceived(b"* 1 FETCH (UID 1 BODY[] {100000}\r\n" + b"x" * 1000)
    clock.advance(5)
    assert isinstance(failure_of(d), ImapTimeout)
    assert ("end",) not in sink.events  # the sink never sees a complete body


def test_no_timer_runs_while_nothing_is_awaited_or_reading_is_paused() -> None:
    proto, transport, clock = timed(60)
    assert clock.getDelayedCalls() == []
    d = proto.command(Atom("NOOP"))
    proto.dataReceived(b"G1 OK done\r\n")
    assert d.called and clock.getDelayedCalls() == []
    waiting = proto.command(Atom("UID"), Atom("FETCH"), Atom("1"), Atom("BODY[]"))
    proto.pauseProducing()  # the POP client reads slowly: not the server's fault
    assert transport.producerState == "paused"
    clock.advance(3600)
    assert not waiting.called
    proto.resumeProducing()
    assert transport.producerState == "producing"
    clock.advance(59)
    assert not waiting.called
    clock.advance(1)
    assert isinstance(failure_of(waiting), ImapTimeout)


@implementer(ITLSTransport)
class _SocketTransport(StringTransport):
    """Has the read size Twisted's TCP transports have."""

    bufferSize = 65536
    TLS = False

    def startTLS(self, context: object) -> None:
        self.TLS = True


@implementer(ISSLTransport)
class _TLSWrapper(_SocketTransport):
    """Stands for implicit TLS: the protocol sits on a TLS transport from the start."""


def test_reads_are_large_in_the_clear_and_smaller_over_tls() -> None:
    """Over TLS each read goes whole into OpenSSL's receive buffer, kept at its largest for the
    connection's life; Twisted hands the plaintext over in 32 KiB pieces anyway."""
    plain = _SocketTransport()
    ImapClientProtocol().makeConnection(plain)
    assert plain.bufferSize == READ_SIZE

    implicit = _TLSWrapper()
    ImapClientProtocol().makeConnection(implicit)
    assert implicit.bufferSize == TLS_READ_SIZE < READ_SIZE

    upgraded = _SocketTransport()
    proto = ImapClientProtocol()
    proto.makeConnection(upgraded)
    proto.start_tls(object())  # type: ignore[arg-type]
    assert upgraded.TLS and upgraded.bufferSize == TLS_READ_SIZE
