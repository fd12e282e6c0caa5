"""The POP3 glue carries the limits out: a failed login's answer is held back by a reactor
timer (nobody else waits meanwhile), a connection over the limits is told so and closed.
In memory: StringTransport, and a clock moved by hand."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.addresses import Networks
from gateway.config import SecuritySettings
from gateway.limits import ClientLimits
from gateway.maildrop.login import Login
from gateway.maildrop.numbering import Maildrop, MessageInfo
from gateway.metrics import DISCARD
from gateway.pop3.server import Listener, Pop3Factory
from gateway.upstream.account import LoginRejected

AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"


class FakeDrop:
    def __init__(self) -> None:
        self.numbered = Maildrop([MessageInfo(5, 12, "U5")])
        self.imap_transport = self

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def observe_reads(self, observer: Any) -> None:
        pass

    def fetch_many(self, sinks: Any) -> Any:
        raise AssertionError("not fetched in these tests")

    async def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class FakeService:
    """Checks passwords at once, and counts the checks (what reaches the upstream)."""

    capabilities = ()
    metrics = DISCARD  # what Pop3Protocol counts into; nobody reads it here

    def __init__(self) -> None:
        self.checked: list[str] = []

    def parse_login(self, name: str) -> Login:
        return Login.parse(name, "#")

    async def open(self, login: Login, password: str, peer_ip: str | None) -> FakeDrop:
        self.checked.append(password)
        if password != "right":
            raise LoginRejected("no")
        return FakeDrop()


class Setup:
    def __init__(self, **security: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.service = FakeService()
        self.limits = ClientLimits(SecuritySettings(**security), self.reactor.seconds)
        listener = Listener(None, False, Networks(["0.0.0.0/0", "::/0"]), 600.0, self.limits)
        self.sessions: set[Any] = set()
        self.factory = Pop3Factory(self.service, self.reactor, listener, self.sessions)  # type: ignore[arg-type]

    def connect(self, host: str = "192.0.2.1", port: int = 4000) -> StringTransport:
        peer: Any = (
            IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        )
        protocol = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        transport.protocol = protocol  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        return transport

    def send(self, transport: StringTransport, *lines: str) -> bytes:
        transport.clear()
        protocol = transport.protocol  # type: ignore[attr-defined]
        for line in lines:
            protocol.dataReceived(f"{line}\r\n".encode())
        return transport.value()


def test_a_failed_login_is_answered_after_the_delay() -> None:
    setup = Setup(auth_failure_delay=2.0, auth_failure_max_delay=15.0)
    client = setup.connect()

    assert setup.send(client, "USER alice", "PASS wrong") == b"+OK Send your password\r\n"
    assert setup.service.checked == ["wrong"]
    setup.reactor.advance(1.99)
    assert client.value() == b"+OK Send your password\r\n"
    setup.reactor.advance(0.01)
    assert client.value().endswith(AUTH_FAILED)


def test_the_delay_does_not_hold_up_other_clients() -> None:
    setup = Setup(auth_failure_delay=2.0, auth_failure_max_delay=15.0)
    guesser = setup.connect("192.0.2.1")
    setup.send(guesser, "USER alice", "PASS wrong")
    neighbour = setup.connect("192.0.2.1", 4001)
    other = setup.connect("198.51.100.7")

    assert setup.send(other, "USER bob", "PASS right").endswith(
        b"+OK Logged in, 1 messages (12 octets)\r\n"
    )
    # The same address waits its turn even for another user: its check comes when it may.
    setup.send(neighbour, "USER carol", "PASS right")
    assert setup.service.checked == ["wrong", "right"]
    setup.reactor.advance(2.0)
    assert guesser.value().endswith(AUTH_FAILED)
    assert setup.service.checked == ["wrong", "right", "right"]
    assert neighbour.value().endswith(b"+OK Logged in, 1 messages (12 octets)\r\n")


def test_parallel_connections_share_one_schedule() -> None:
    setup = Setup(auth_failure_delay=2.0, auth_failure_max_delay=15.0)
    clients = [setup.connect(port=5000 + n) for n in range(5)]
    for client in clients:
        setup.send(client, "USER alice", "PASS wrong")

    answered_at = {}
    for second in range(1, 60):
        setup.reactor.advance(1.0)
        for n, client in enumerate(clients):
            if n not in answered_at and client.value().endswith(AUTH_FAILED):
                answered_at[n] = second

    assert sorted(answered_at.values()) == [2, 6, 14, 29, 44]


def test_a_client_that_leaves_during_the_delay_leaves_no_timer() -> None:
    setup = Setup(auth_failure_delay=2.0, auth_failure_max_delay=15.0)
    client = setup.connect()
    setup.send(client, "USER alice", "PASS wrong")

    client.protocol.connectionLost(None)  # type: ignore[attr-defined]

    assert setup.reactor.getDelayedCalls() == []
    assert setup.limits.connections.total == 0


def test_connections_over_the_limit_are_refused() -> None:
    setup = Setup(max_connections=3, max_connections_per_ip=2)
    first = setup.connect("192.0.2.1", 1)
    setup.connect("192.0.2.1", 2)
    third = setup.connect("::ffff:192.0.2.1", 3)  # the same client, through a [::] listener
    setup.connect("198.51.100.7", 1)
    fourth = setup.connect("203.0.113.5", 1)

    assert (
        third.value()
        == b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"
    )
    assert third.disconnecting
    assert fourth.value() == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert fourth.disconnecting
    assert len(setup.sessions) == 3

    first.protocol.connectionLost(None)  # type: ignore[attr-defined]
    again = setup.connect("192.0.2.1", 4)
    assert not again.disconnecting
    assert setup.send(again, "NOOP") == b"-ERR Command not valid in this state\r\n"
