"""The sans-IO IMAP client connection, as transcripts: exact bytes out, events in order."""

from __future__ import annotations

import pytest

from gateway.proto.imap import Atom, Data, ResponseError, Status
from gateway.proto.imap_connection import ImapConnection
from tests.unit.imap_playbook import Compact, Playbook, merge_chunks

FETCH_BODY = (Atom("UID"), Atom("FETCH"))
BODY_ITEMS = Atom("(UID BODY.PEEK[])")


def test_greeting_and_capabilities_from_every_place_the_server_names_them() -> None:
    conn = ImapConnection()
    assert not conn.greeted and not conn.has("IDLE")
    pb = Playbook("IMAP4rev1 IDLE")
    assert pb.conn.greeted and pb.conn.has("idle")
    pb.send(Atom("CAPABILITY"))
    pb.send(Atom("LOGIN"), "u", "p")
    pb.play("""
        C: G1 CAPABILITY
        C: G2 LOGIN "u" "p"
        S: * CAPABILITY IMAP4rev1 LITERAL+
        S: G1 OK done
        S: G2 OK [CAPABILITY IMAP4rev1 MOVE UIDPLUS] logged in
    """)
    assert pb.events == [("done", "G1", "OK"), ("done", "G2", "OK")]
    assert pb.conn.capabilities == {"IMAP4REV1", "MOVE", "UIDPLUS"}
    pb.conn.forget_capabilities()
    assert not pb.conn.has("MOVE")


def test_a_bye_greeting_is_the_greeting() -> None:
    conn = ImapConnection()
    conn.receive_data(b"* BYE too many connections\r\n")
    event = conn.next_event()
    assert event is not None and event.status.kind == "BYE"  # type: ignore[union-attr]
    assert conn.greeted


def test_pipelined_commands_answered_out_of_order() -> None:
    pb = Playbook()
    first = pb.send(*FETCH_BODY, Atom("7"), BODY_ITEMS, body_uids={7})
    second = pb.send(*FETCH_BODY, Atom("9"), BODY_ITEMS, body_uids={9})
    noop = pb.send(Atom("NOOP"))
    pb.play("""
        C: G1 UID FETCH 7 (UID BODY.PEEK[])
        C: G2 UID FETCH 9 (UID BODY.PEEK[])
        C: G3 NOOP
        S: * 2 FETCH (UID 9 BODY[] {4}
        S: nine)
        S: G3 OK nothing new
        S: * 1 FETCH (UID 7 BODY[] {5}
        S: seven)
        S: G2 OK second
        S: G1 OK first
    """)
    assert pb.events == [
        ("body", "G2", 9, 4),
        ("data", b"nine"),
        ("end",),
        ("done", "G3", "OK"),
        ("body", "G1", 7, 5),
        ("data", b"seven"),
        ("end",),
        ("done", "G2", "OK"),
        ("done", "G1", "OK"),
    ]
    assert not pb.conn.awaiting_server and pb.conn.oldest is None
    assert (first.tag, second.tag, noop.tag) == ("G1", "G2", "G3")


def test_a_body_no_uid_claims_goes_to_the_oldest_command_taking_any() -> None:
    pb = Playbook()
    pb.send(Atom("UID"), Atom("STORE"), Atom("1"), Atom("+FLAGS.SILENT"), [Atom("\\Seen")])
    pb.send(*FETCH_BODY, Atom("2"), BODY_ITEMS, any_body=True)
    pb.send(*FETCH_BODY, Atom("3"), BODY_ITEMS, body_uids={3})
    pb.play("""
        C: G1 UID STORE 1 +FLAGS.SILENT (\\Seen)
        C: G2 UID FETCH 2 (UID BODY.PEEK[])
        C: G3 UID FETCH 3 (UID BODY.PEEK[])
        S: * 3 FETCH (UID 3 BODY[] {1}
        S: c)
        S: * 2 FETCH (BODY[] {1}
        S: b UID 2)
        S: * 4 FETCH (UID 4 BODY[] {1}
        S: d)
    """)
    # UID 3 is claimed by G3; the inline body without its UID up front, and the UID nobody
    # asked for, go to G2, the only command taking any body.
    assert merge_chunks(pb.events) == [
        ("body", "G3", 3, 1),
        ("data", b"c"),
        ("end",),
        ("body", "G2", 2, 1),
        ("data", b"b"),
        ("end",),
        ("body", "G2", 4, 1),
        ("data", b"d"),
        ("end",),
    ]


RESPONSE_WITH_LITERALS = (
    b"* 1 FETCH (UID 7 BODY[] {12}\r\nline\r\n.\r\nend)\r\n"  # streamed: UID comes first
    b"* 2 FETCH (BODY[] {3}\r\nabc UID 8)\r\n"  # inline: the whole line is needed first
    b"* 3 FETCH (UID 9 BODY[HEADER] {0}\r\n)\r\n"  # empty
    b'* METADATA "INBOX" (/private/x {2}\r\nhi)\r\n'  # not a body: kept in the response
    b"G1 OK done\r\n"
)


def play_in_pieces(pieces: list[bytes]) -> tuple[list[Compact], list[object]]:
    pb = Playbook()
    pb.send(*FETCH_BODY, Atom("7:9"), BODY_ITEMS, body_uids={7, 8, 9})
    pb.written()
    for piece in pieces:
        pb.feed(piece)
    untagged = pb.responses["G1"].untagged
    return merge_chunks(pb.events), [
        item.tokens[:2] if isinstance(item, Data) else item for item in untagged
    ]


def test_literals_split_at_every_byte() -> None:
    whole = play_in_pieces([RESPONSE_WITH_LITERALS])
    assert whole[0] == [
        ("body", "G1", 7, 12),
        ("data", b"line\r\n.\r\nend"),
        ("end",),
        ("body", "G1", 8, 3),
        ("data", b"abc"),
        ("end",),
        ("body", "G1", 9, 0),
        ("end",),
        ("done", "G1", "OK"),
    ]
    assert whole[1] == [["1", "FETCH"], ["2", "FETCH"], ["3", "FETCH"], ["METADATA", b"INBOX"]]
    data = RESPONSE_WITH_LITERALS
    for cut in range(1, len(data)):
        assert play_in_pieces([data[:cut], data[cut:]]) == whole, cut
    assert play_in_pieces([data[i : i + 1] for i in range(len(data))]) == whole


def test_bye_in_the_middle_of_a_command() -> None:
    pb = Playbook()
    fetch = pb.send(*FETCH_BODY, Atom("1:2"), BODY_ITEMS, body_uids={1, 2})
    pb.play("""
        C: G1 UID FETCH 1:2 (UID BODY.PEEK[])
        S: * 1 FETCH (UID 1 BODY[] {2}
        S: ab)
        S: * BYE server shutting down
    """)
    assert pb.events == [
        ("body", "G1", 1, 2),
        ("data", b"ab"),
        ("end",),
        ("bye", "server shutting down"),
    ]
    # The caller closes: what was waiting is handed back to be failed, nothing more is sent.
    assert pb.conn.abandon() == [fetch]
    assert pb.conn.closed and not pb.conn.awaiting_server
    later = pb.send(Atom("NOOP"))
    assert later.tag == "G2" and pb.written() == b""
    pb.play("""
        S: G1 OK too late
        S: * 2 FETCH (UID 2 BODY[] {2}
        S: cd)
    """)
    assert pb.events[4:] == []  # no command owns them any more


def test_untagged_expunge_during_a_fetch() -> None:
    pb = Playbook()
    pb.send(*FETCH_BODY, Atom("5,6"), BODY_ITEMS, body_uids={5, 6})
    pb.play("""
        C: G1 UID FETCH 5,6 (UID BODY.PEEK[])
        S: * 1 FETCH (UID 5 BODY[] {4}
        S: five)
        S: * 2 EXPUNGE
        S: * 1 EXISTS
        S: G1 OK [EXPUNGEISSUED] some were gone
    """)
    assert pb.events == [("body", "G1", 5, 4), ("data", b"five"), ("end",), ("done", "G1", "OK")]
    response = pb.responses["G1"]
    assert response.status.code_name == "EXPUNGEISSUED"
    tokens = [item.tokens for item in response.untagged if isinstance(item, Data)]
    assert tokens[1:] == [["2", "EXPUNGE"], ["1", "EXISTS"]]


def test_a_synchronizing_literal_refused_with_no() -> None:
    pb = Playbook()
    append = pb.send(Atom("APPEND"), "Sent", b"From: a\r\n\r\nhi\r\n")
    noop = pb.send(Atom("NOOP"))
    pb.play("""
        C: G1 APPEND "Sent" {15}
        S: G1 NO [TOOBIG] message too large
        C: G2 NOOP
        S: G2 OK
    """)
    # The literal is never sent; the command queued behind it goes as soon as the NO is in.
    assert pb.events == [("done", "G1", "NO"), ("done", "G2", "OK")]
    assert pb.responses["G1"].status.code_name == "TOOBIG"
    assert (append.tag, noop.tag) == ("G1", "G2")


def test_a_synchronizing_literal_waits_for_the_continuation() -> None:
    pb = Playbook()
    pb.send(Atom("LOGIN"), "us\r\ner", "pw")
    pb.send(Atom("NOOP"))
    pb.play("""
        C: G1 LOGIN {6}
        S: + go ahead
        C: us
        C: er "pw"
        C: G2 NOOP
        S: G1 OK
        S: G2 OK
    """)
    assert pb.events == [("done", "G1", "OK"), ("done", "G2", "OK")]


def test_literal_plus_sends_everything_at_once() -> None:
    pb = Playbook("IMAP4rev1 LITERAL+")
    pb.send(Atom("APPEND"), "Sent", b"x\r\n")
    pb.send(Atom("NOOP"))
    pb.play("""
        C: G1 APPEND "Sent" {3+}
        C: x
        C:
        C: G2 NOOP
        S: G1 OK [APPENDUID 1 5] done
    """)
    assert pb.events == [("done", "G1", "OK")]


def test_sasl_continuation_line_and_unknown_tags() -> None:
    pb = Playbook()
    pb.send(Atom("AUTHENTICATE"), Atom("PLAIN"), continuation=b"AHUAcA==")
    pb.play("""
        C: G1 AUTHENTICATE PLAIN
        S: +
        C: AHUAcA==
        S: X9 OK not ours
        S: + nobody asked
        S: G1 OK welcome
    """)
    assert pb.events == [("done", "G1", "OK")]


def test_untagged_status_belongs_to_the_oldest_command() -> None:
    pb = Playbook()
    pb.send(Atom("EXAMINE"), "INBOX")
    pb.send(Atom("NOOP"))
    pb.play("""
        C: G1 EXAMINE "INBOX"
        C: G2 NOOP
        S: * OK [UIDVALIDITY 42] ok
        S: G1 OK [READ-ONLY] done
        S: * 3 RECENT
        S: G2 OK
    """)
    [status] = pb.responses["G1"].untagged
    assert isinstance(status, Status) and status.code == ("UIDVALIDITY", "42")
    assert [u.tokens for u in pb.responses["G2"].untagged] == [["3", "RECENT"]]  # type: ignore[union-attr]


def test_garbage_from_the_server_is_a_protocol_error() -> None:
    pb = Playbook()
    pb.send(Atom("NOOP"))
    with pytest.raises(ResponseError):
        pb.feed(b"G1 WHATEVER\r\n")
