"""Transcripts for the sans-IO IMAP connection, in the style of mitmproxy's Playbook.

    pb.play('''
        C: G1 UID FETCH 7 (UID BODY.PEEK[])
        S: * 1 FETCH (UID 7 BODY[] {5}
        S: hello)
        S: G1 OK done
    ''')

``C:`` lines are what the client must have written by then (exactly, CRLF added); ``S:`` lines
are fed to it (CRLF added). What the connection reports is kept in ``events``, in a compact
form: ``("body", tag, uid, size)``, ``("data", bytes)``, ``("end",)``, ``("done", tag, kind)``,
``("greeting", kind)``, ``("bye", text)``.
"""

from __future__ import annotations

from gateway.proto.imap import CommandPart, LiteralChunk, LiteralEnd
from gateway.proto.imap_connection import (
    BodyBegin,
    Bye,
    Command,
    Completed,
    ConnectionEvent,
    Greeting,
    ImapConnection,
    Response,
)

Compact = tuple[object, ...]


def compact(event: ConnectionEvent) -> Compact:
    if isinstance(event, BodyBegin):
        return ("body", event.command.tag, event.uid, event.size)
    if isinstance(event, LiteralChunk):
        return ("data", event.data)
    if isinstance(event, LiteralEnd):
        return ("end",)
    if isinstance(event, Completed):
        return ("done", event.command.tag, event.response.status.kind)
    if isinstance(event, Greeting):
        return ("greeting", event.status.kind)
    assert isinstance(event, Bye)
    return ("bye", event.status.text)


def merge_chunks(events: list[Compact]) -> list[Compact]:
    """Consecutive ``data`` events as one: how a body was cut into reads does not matter."""
    merged: list[Compact] = []
    for event in events:
        if event[0] == "data" and merged and merged[-1][0] == "data":
            merged[-1] = ("data", merged[-1][1] + event[1])  # type: ignore[operator]
        else:
            merged.append(event)
    return merged


def steps(transcript: str) -> list[tuple[str, bytes]]:
    """``C: text`` / ``S: text`` lines (indented as you like, blank lines skipped) as (who,
    the line with its CRLF)."""
    result = []
    for line in transcript.splitlines():
        line = line.lstrip()
        if line:
            who, _, text = line.partition(":")
            result.append((who, text.removeprefix(" ").encode() + b"\r\n"))
    return result


class Playbook:
    def __init__(self, capabilities: str = "IMAP4rev1", stream_threshold: int = 64 * 1024):
        self.conn = ImapConnection(stream_threshold)
        self.events: list[Compact] = []
        self.responses: dict[str, Response] = {}
        self.feed(f"* OK [CAPABILITY {capabilities}] ready\r\n".encode())
        assert self.events == [("greeting", "OK")]
        self.events.clear()

    def send(self, *parts: CommandPart, **options: object) -> Command:
        return self.conn.send(*parts, **options)  # type: ignore[arg-type]

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, Completed):
                self.responses[event.command.tag] = event.response
            self.events.append(compact(event))

    def written(self) -> bytes:
        return b"".join(self.conn.data_to_send())

    def play(self, transcript: str) -> None:
        expected = b""
        for who, data in steps(transcript):
            if who == "C":
                expected += data
                continue
            assert who == "S", data
            assert self.written() == expected
            expected = b""
            self.feed(data)
        assert self.written() == expected


class AccountPlaybook:
    """The same transcripts for an ``ImapAccount`` on a StringTransport: ``C:`` lines are what
    the account's operations wrote, ``S:`` lines the server's answers."""

    def __init__(
        self, capabilities: str = "IMAP4rev1", clock: object = None, timeout: float = 0
    ) -> None:
        # Imported here: the connection's own transcripts need no Twisted.
        from twisted.internet.testing import StringTransport

        from gateway.upstream.account import ImapAccount
        from gateway.upstream.imap_client import ImapClientProtocol

        self.protocol = ImapClientProtocol(clock, timeout)  # type: ignore[arg-type]
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(f"* OK [CAPABILITY {capabilities}] ready\r\n".encode())
        self.account = ImapAccount(self.protocol)

    def written(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return bytes(value)

    def play(self, transcript: str) -> None:
        expected = b""
        for who, data in steps(transcript):
            if who == "C":
                expected += data
                continue
            assert who == "S", data
            assert self.written() == expected
            expected = b""
            self.protocol.dataReceived(data)
        assert self.written() == expected
