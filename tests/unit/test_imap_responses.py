"""The response decoders, fed what Dovecot and Cyrus send (parsed by the real connection)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from gateway.proto import imap_responses as decode
from gateway.proto.imap import Atom
from gateway.proto.imap_connection import Response
from tests.unit.imap_playbook import Playbook


def answer(*lines: str, capabilities: str = "IMAP4rev1") -> Response:
    """The Response to one command, given the server's lines (the last one tagged G1)."""
    pb = Playbook(capabilities)
    pb.send(Atom("NOOP"))
    pb.written()
    pb.feed("".join(line + "\r\n" for line in lines).encode())
    return pb.responses["G1"]


def test_examine_and_select() -> None:
    response = answer(
        "* FLAGS (\\Answered \\Seen $Forwarded)",
        "* OK [PERMANENTFLAGS (\\Answered \\Seen \\*)] Flags permitted.",
        "* 12 EXISTS",
        "* 0 RECENT",
        "* OK [UIDVALIDITY 1700000000] UIDs valid",
        "* OK [UIDNEXT 40] Predicted next UID",
        "* OK [HIGHESTMODSEQ 77] Highest",
        "G1 OK [READ-WRITE] Select completed.",
    )
    assert decode.opened_mailbox(response) == (1700000000, 12, True, 40, 77)
    bare = answer("* 0 EXISTS", "* OK [PERMANENTFLAGS ()] none", "G1 OK [READ-ONLY] done")
    assert decode.opened_mailbox(bare) == (0, 0, False, 0, 0)


def test_list_with_special_use_and_modified_utf7() -> None:
    response = answer(
        '* LIST (\\HasNoChildren \\Sent) "/" Sent',
        '* LIST (\\HasNoChildren) "." "Entw&APw-rfe"',
        '* LIST (\\Noselect) "/" {4}',
        "Junk",  # a literal name: the previous line ends in {4}, this is its data and the rest
        "G1 OK done",
    )
    entries = decode.listed_mailboxes(response)
    assert entries[:2] == [
        decode.MailboxEntry("Sent", frozenset({"\\hasnochildren", "\\sent"})),
        decode.MailboxEntry("Entwürfe", frozenset({"\\hasnochildren"})),
    ]
    assert entries[2].name == "Junk" and entries[2].attributes == {"\\noselect"}


def test_status_and_quota() -> None:
    assert decode.status_messages(answer('* STATUS "x" (MESSAGES 3 UIDNEXT 9)', "G1 OK")) == 3
    assert decode.status_messages(answer("G1 OK")) is None
    quota = answer(
        '* QUOTAROOT INBOX ""',
        '* QUOTA "" (MESSAGE 10 1000 STORAGE 512 2048)',
        "G1 OK done",
    )
    assert decode.storage_quota(quota) == (512, 2048)
    assert decode.storage_quota(answer('* QUOTAROOT INBOX ""', "G1 OK")) is None


def test_search_and_esearch() -> None:
    assert decode.search_result(answer("* SEARCH 9 2 30", "G1 OK")) == [2, 9, 30]
    assert decode.search_result(answer("* SEARCH", "G1 OK")) == []
    esearch = answer('* ESEARCH (TAG "G1") UID ALL 4:6,2', "G1 OK")
    assert decode.search_result(esearch) == [2, 4, 5, 6]


def test_fetch_index_fast_and_slow_lines() -> None:
    response = answer(
        "* 1 FETCH (UID 4 RFC822.SIZE 100 FLAGS (\\Seen))",
        "* 2 FETCH (UID 6 RFC822.SIZE 200 FLAGS () EMAILID (M6))",
        "* 3 FETCH (FLAGS ($POPDeleted) UID 9 RFC822.SIZE 300 EMAILID (M9))",  # other order
        "* 3 EXPUNGE",
        "G1 OK",
    )
    rows = decode.index_rows(response, lambda *row: row)
    assert rows == [
        (4, 100, frozenset({"\\Seen"}), None),
        (6, 200, frozenset(), "M6"),
        (9, 300, frozenset({"$POPDeleted"}), "M9"),
    ]


def test_fetch_arrivals_and_identities() -> None:
    response = answer(
        '* 1 FETCH (UID 5 RFC822.SIZE 10 INTERNALDATE "17-Jul-1996 02:44:25 -0700")',
        "* 2 FETCH (UID 6 RFC822.SIZE 20)",
        "G1 OK",
    )
    when = datetime(1996, 7, 17, 2, 44, 25, tzinfo=timezone(timedelta(hours=-7)))
    assert decode.arrivals(response) == [(5, 10, when)]
    assert when.astimezone(UTC).hour == 9
    assert list(decode.sizes_and_dates(response)) == [(5, 10, b"17-Jul-1996 02:44:25 -0700")]
    assert list(decode.sizes(response)) == [(5, 10), (6, 20)]


def test_appenduid_and_copyuid() -> None:
    appended = answer("G1 OK [APPENDUID 1700000000 41] Append completed.")
    assert decode.appended_uid(appended.status) == "41"
    assert decode.appended_uid(answer("G1 OK done").status) is None
    copied = answer("G1 OK [COPYUID 38505 304,319:320 3956:3958] Done")
    assert decode.copied_uids(copied.status) == (38505, "304,319:320", "3956:3958")
    assert decode.copied_uids(appended.status) is None


def test_metadata() -> None:
    response = answer(
        '* METADATA "INBOX" (/private/a "one" /private/B {3}',
        "two /private/c NIL)",
        "G1 OK [METADATA LONGENTRIES 9000] done",
    )
    assert decode.metadata(response) == decode.Metadata(
        {"/private/a": b"one", "/private/b": b"two"}, 9000, []
    )
