"""The Twisted glue around the POP3 session: timers on a Clock, framing on a StringTransport."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.addresses import Networks
from gateway.maildrop.login import Login
from gateway.maildrop.numbering import Maildrop, MessageInfo
from gateway.metrics import DISCARD
from gateway.pop3.backend import UpdateFailed
from gateway.pop3.server import Listener, Pop3Protocol
from gateway.upstream.account import LoginRejected

IDLE = 600.0


class FakeProducer:
    def __init__(self) -> None:
        self.resumed = 0
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.resumed += 1
        self.paused = False

    def stopProducing(self) -> None:
        pass


class FakeMaildrop:
    """Stands in for Pop3Mailbox: the test decides when body chunks arrive."""

    def __init__(self, messages: list[MessageInfo]) -> None:
        self.numbered = Maildrop(messages)
        self.imap_transport = FakeProducer()
        self.fetches: list[tuple[MessageInfo, Any, Deferred[None]]] = []
        self.updates: list[list[int]] = []
        self.update_error: str | None = None
        self.retrieved_uids: list[tuple[int, bool]] = []
        self.finished: bool | None = None
        self.observer: Any = None
        self.closed = False

    def fetch(self, info: MessageInfo, sink: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.fetches.append((info, sink, d))
        return d

    def observe_reads(self, observer: Any) -> None:
        self.observer = observer

    def fetch_many(self, sinks: Mapping[int, Any]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        by_uid = {info.uid: info for _, info in self.numbered.listing()}
        self.fetches.extend((by_uid[uid], sink, d) for uid, sink in sinks.items())
        return d

    async def update(self, deleted: Any) -> None:
        self.updates.append([m.uid for m in deleted])
        if self.update_error:
            raise UpdateFailed(self.update_error)

    def record_retrieved(self, info: MessageInfo, whole: bool) -> None:
        self.retrieved_uids.append((info.uid, whole))

    async def after_quit(self, deleted_any: bool) -> None:
        self.finished = deleted_any
        self.closed = True

    async def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeService:
    capabilities = ("EXPIRE NEVER",)
    metrics = DISCARD  # what Pop3Protocol counts into; nobody reads it here

    def __init__(self, drop: FakeMaildrop, password: str = "pw") -> None:
        self.drop = drop
        self.password = password
        # Set to a Deferred to hold logins until the test fires it (a slow upstream, a delay).
        self.gate: Deferred[None] | None = None

    def parse_login(self, name: str) -> Login:
        return Login.parse(name, "#")

    async def open(self, login: Login, password: str, peer_ip: str | None) -> FakeMaildrop:
        if self.gate is not None:
            await self.gate
        if password != self.password:
            raise LoginRejected("no")
        return self.drop


def connect(
    drop: FakeMaildrop | None = None,
) -> tuple[Pop3Protocol, StringTransport, MemoryReactorClock, FakeMaildrop]:
    drop = drop or FakeMaildrop([MessageInfo(5, 12, "U5"), MessageInfo(6, 3, "U6")])
    reactor = MemoryReactorClock()
    protocol = Pop3Protocol(
        FakeService(drop),  # type: ignore[arg-type]
        reactor,
        Listener(None, False, Networks(["127.0.0.0/8"]), IDLE),
    )
    transport = StringTransport(peerAddress=_Peer())
    protocol.makeConnection(transport)
    return protocol, transport, reactor, drop


class _Peer:
    host = "127.0.0.1"
    port = 40000


def deliver(sink: Any, body: bytes) -> None:
    """A whole body arriving at once, as a small message does."""
    sink.literal_begin(len(body))
    sink.literal_data(body)
    sink.literal_end()


def said(transport: StringTransport) -> bytes:
    value = transport.value()
    transport.clear()
    return value


def login(protocol: Pop3Protocol, transport: StringTransport) -> None:
    protocol.dataReceived(b"USER alice\r\nPASS pw\r\n")
    assert said(transport).endswith(b"+OK Logged in, 2 messages (15 octets)\r\n")


def test_idle_connection_is_closed_after_the_timeout() -> None:
    _protocol, transport, reactor, _ = connect()
    reactor.advance(IDLE - 1)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.value().endswith(b"-ERR Idle timeout, closing connection\r\n")
    assert transport.disconnecting


def test_each_command_restarts_the_idle_timer() -> None:
    protocol, transport, reactor, _ = connect()
    for _ in range(3):
        reactor.advance(IDLE - 1)
        protocol.dataReceived(b"CAPA\r\n")
    assert not transport.disconnecting


def test_a_slow_download_is_not_idle_while_bytes_move() -> None:
    protocol, transport, reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    (_, sink, done) = drop.fetches[0]
    sink.literal_begin(11)
    for chunk in (b"a\r\n", b".b\r\n", b"c\r\n."):
        reactor.advance(IDLE - 1)
        sink.literal_data(chunk)
    assert not transport.disconnecting
    sink.literal_end()
    done.callback(None)
    # Dot-stuffed across chunk boundaries, CRLF added before the terminator.
    assert said(transport) == b"+OK 12 octets\r\na\r\n..b\r\nc\r\n..\r\n.\r\n"
    assert drop.retrieved_uids == [(5, True)]
    # The IMAP reads follow the client's pace for the whole session, not beyond QUIT.
    assert transport.producer is not None and transport.streaming
    transport.producer.pauseProducing()
    assert drop.imap_transport.paused
    transport.producer.resumeProducing()
    assert not drop.imap_transport.paused
    transport.producer.pauseProducing()
    protocol.dataReceived(b"QUIT\r\n")  # waits: the client takes nothing
    assert drop.updates == [] and drop.imap_transport.paused
    transport.producer.resumeProducing()
    assert drop.updates == [[]]
    # After QUIT nothing ties the IMAP reads to the client any more (the LOGOUT must get
    # through), and nothing holds the close back.
    assert transport.producer is None and transport.disconnecting
    assert not drop.imap_transport.paused


def test_pipelined_commands_wait_for_the_download() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 2\r\nSTAT\r\n")
    (_, sink, done) = drop.fetches[0]
    sink.literal_begin(4)
    sink.literal_data(b"x\r\n")
    assert said(transport) == b"+OK 3 octets\r\nx\r\n"  # no STAT answer inside the body
    sink.literal_data(b"y")
    # The literal's size says the message is whole: the answer ends and STAT is answered
    # without waiting for the FETCH's completion.
    assert said(transport) == b"y\r\n.\r\n+OK 2 15\r\n"
    done.callback(None)
    assert said(transport) == b""


def test_message_gone_upstream_before_any_byte() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    drop.fetches[0][2].callback(None)
    assert said(transport) == b"-ERR Message no longer available upstream\r\n"


def test_download_failing_midway_drops_the_connection() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    (_, sink, done) = drop.fetches[0]
    sink.literal_begin(12)
    sink.literal_data(b"partial")
    done.errback(ConnectionError("upstream gone"))
    assert not said(transport).endswith(b".\r\n")  # never a short message that looks complete
    assert transport.disconnected or transport.disconnecting


def test_quit_answers_only_after_the_update() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"DELE 2\r\nQUIT\r\n")
    assert said(transport) == b"+OK message 2 deleted\r\n+OK Bye\r\n"
    assert drop.updates == [[6]] and drop.finished is True and drop.closed


def test_failed_update_is_an_error_to_the_client() -> None:
    drop = FakeMaildrop([MessageInfo(5, 12, "U5")])
    drop.update_error = "1 deletes not applied (flagging failed)"
    protocol, transport, _reactor, _ = connect(drop)
    protocol.dataReceived(b"USER a\r\nPASS pw\r\nDELE 1\r\nQUIT\r\n")
    assert said(transport).endswith(
        b"-ERR [SYS/TEMP] Some deletes were not applied: "
        b"1 deletes not applied (flagging failed)\r\n"
    )


def test_dropped_connection_applies_nothing() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"DELE 1\r\n")
    assert transport.producer is not None
    transport.producer.stopProducing()  # what Twisted does first when the client is gone
    protocol.connectionLost(None)
    assert drop.updates == [] and drop.closed
    assert drop.imap_transport.resumed == 1  # paused or not, the LOGOUT must get through


def test_bad_password() -> None:
    protocol, transport, _reactor, _drop = connect()
    protocol.dataReceived(b"USER alice\r\nPASS nope\r\n")
    assert said(transport).endswith(b"-ERR [AUTH] Authentication failed\r\n")


def test_a_stalled_download_is_cut_without_an_error_line_inside_the_message() -> None:
    protocol, transport, reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    (_, sink, _) = drop.fetches[0]
    sink.literal_begin(12)
    sink.literal_data(b"part of\r\n")  # 9 of 12 octets, then nothing
    said(transport)
    reactor.advance(IDLE)
    assert transport.value() == b""  # no "-ERR" that the client would take for message text
    assert transport.disconnecting or transport.disconnected


def test_pipelined_retrs_are_fetched_ahead_and_each_ends_at_its_literal() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\nRETR 2\r\nQUIT\r\n")
    # Both FETCHes went out at once: the second is fetched ahead for the pipelined RETR 2.
    assert [info.uid for info, _, _ in drop.fetches] == [5, 6]
    (_, first, first_done), (_, second, second_done) = drop.fetches
    # The server sends both bodies before either FETCH completes, as Dovecot does.
    deliver(first, b"first body\r\n")
    deliver(second, b"2\r\n")
    assert said(transport) == (
        b"+OK 12 octets\r\nfirst body\r\n.\r\n+OK 3 octets\r\n2\r\n.\r\n+OK Bye\r\n"
    )
    first_done.callback(None)
    second_done.callback(None)
    assert said(transport) == b""  # the completions change nothing any more
    assert drop.retrieved_uids == [(5, True), (6, True)] and drop.finished is False


def test_answers_caused_by_one_upstream_read_go_out_in_one_write() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    writes: list[list[bytes]] = []
    transport.writeSequence = writes.append  # type: ignore[method-assign]
    protocol.dataReceived(b"RETR 1\r\nRETR 2\r\n")
    (_, first, _), (_, second, _) = drop.fetches
    drop.observer.read_started()
    deliver(first, b"first body\r\n")
    deliver(second, b"2\r\n")
    assert writes == []  # held while the read is being handled
    drop.observer.read_done()
    assert [b"".join(w) for w in writes] == [
        b"+OK 12 octets\r\nfirst body\r\n.\r\n+OK 3 octets\r\n2\r\n.\r\n"
    ]
    protocol.dataReceived(b"NOOP\r\nNOOP\r\n")
    assert b"".join(writes[-1]) == b"+OK\r\n+OK\r\n"  # pipelined commands: one write too


# --- bug: -ERR written inside a download at shutdown (issue 9) ---------------------------------


def test_shutdown_inside_a_download_drops_the_connection_without_an_error_line() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    (_, sink, _) = drop.fetches[0]
    sink.literal_begin(12)
    sink.literal_data(b"part of")
    assert said(transport) == b"+OK 12 octets\r\npart of"
    protocol.shut_down()
    sink.literal_data(b" it\r\n")  # the rest arriving after the drop goes nowhere
    assert transport.value() == b""  # no "-ERR" that the client would take for message text
    assert transport.disconnected  # aborted: loseConnection leaves this False


def test_shutdown_between_answers_tells_the_client() -> None:
    protocol, transport, _reactor, _drop = connect()
    login(protocol, transport)
    protocol.shut_down()
    assert said(transport) == b"-ERR [SYS/TEMP] Server shutting down\r\n"
    assert transport.disconnecting and not transport.disconnected


def test_shutdown_while_a_login_is_under_way_forgets_the_login() -> None:
    protocol, transport, _reactor, drop = connect()
    service = protocol.service
    service.gate = Deferred()  # type: ignore[attr-defined]
    protocol.dataReceived(b"USER alice\r\nPASS pw\r\n")
    said(transport)
    protocol.shut_down()
    assert said(transport) == b"-ERR [SYS/TEMP] Server shutting down\r\n"
    service.gate.callback(None)  # type: ignore[attr-defined]
    assert said(transport) == b""  # no "+OK Logged in" after the goodbye
    assert drop.closed


# --- bug: unbounded input while a session is busy (issue 9) ------------------------------------


def test_a_session_busy_with_a_download_stops_reading_instead_of_buffering() -> None:
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    assert transport.producerState == "producing"
    protocol.dataReceived(b"NOOP\r\n" * 20_000)  # 120 KB while the download has not started
    assert transport.producerState == "paused"
    (_, sink, done) = drop.fetches[0]
    deliver(sink, b"twelve bytes")
    done.callback(None)
    # The download finished, the backlog was answered, reading goes on.
    assert said(transport).count(b"+OK\r\n") == 20_000
    assert transport.producerState == "producing"


def test_an_unauthenticated_session_busy_with_its_login_stops_reading() -> None:
    protocol, transport, _reactor, _drop = connect()
    service = protocol.service
    service.gate = Deferred()  # type: ignore[attr-defined]
    protocol.dataReceived(b"USER alice\r\nPASS wrong\r\n")
    protocol.dataReceived(b"\x00junk" * 20_000)  # no line end at all
    assert transport.producerState == "paused"
    service.gate.callback(None)  # type: ignore[attr-defined]
    assert said(transport).endswith(b"-ERR [AUTH] Authentication failed\r\n-ERR Line too long\r\n")
    assert transport.producerState == "producing"


def test_a_client_that_does_not_read_its_answers_is_not_answered_further() -> None:
    protocol, transport, _reactor, _drop = connect()
    login(protocol, transport)
    assert transport.producer is not None
    transport.producer.pauseProducing()  # Twisted: the client's write buffer is full
    protocol.dataReceived(b"LIST\r\n" * 20_000)
    assert said(transport) == b""  # no answers pile up in the gateway
    assert transport.producerState == "paused"  # and the commands wait in the kernel
    transport.producer.resumeProducing()
    assert said(transport).count(b"+OK 2 messages, scan listing follows") == 20_000
    assert transport.producerState == "producing"


def test_input_that_overshoots_the_pause_is_still_bounded() -> None:
    """A transport that delivers more after being paused (one read's worth may) is cut off
    before the session's buffer outgrows its hard limit."""
    protocol, transport, _reactor, _drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    said(transport)
    for _ in range(32):
        protocol.dataReceived(b"y" * 65536)
    assert transport.disconnected
    assert protocol.session is not None and not protocol.session.wants_input


def test_shutdown_reaches_a_client_that_stopped_reading_its_download() -> None:
    """The client's buffer is full (Twisted paused us): the drop must not wait for it."""
    protocol, transport, _reactor, drop = connect()
    login(protocol, transport)
    protocol.dataReceived(b"RETR 1\r\n")
    (_, sink, _) = drop.fetches[0]
    sink.literal_begin(12)
    sink.literal_data(b"part")
    assert transport.producer is not None
    transport.producer.pauseProducing()
    said(transport)
    protocol.shut_down()
    assert transport.value() == b"" and transport.disconnected  # aborted at once
