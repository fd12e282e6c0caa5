"""Reusing a mailbox index only while CONDSTORE says the mailbox is unchanged."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from gateway.maildrop.snapshot_cache import MailboxVersion, SnapshotCache
from gateway.maildrop.views import IndexedMessage
from gateway.upstream.account import ImapAccount
from gateway.upstream.imap_client import ImapClientProtocol

V1 = MailboxVersion(uidvalidity=9, uidnext=3, exists=2, highestmodseq=40)
INDEX = [IndexedMessage(1, 10, frozenset()), IndexedMessage(2, 20, frozenset())]
KEY = ("alice", "INBOX")


def test_hit_only_for_the_same_version() -> None:
    cache = SnapshotCache(100)
    cache.put(KEY, V1, INDEX)
    assert cache.get(KEY, V1) == tuple(INDEX)
    for changed in (
        MailboxVersion(9, 3, 2, 41),  # a flag changed
        MailboxVersion(9, 4, 3, 41),  # a message arrived
        MailboxVersion(9, 3, 1, 41),  # one was expunged
        MailboxVersion(8, 3, 2, 40),  # the mailbox was rebuilt
    ):
        assert cache.get(KEY, changed) is None
    assert cache.get(("bob", "INBOX"), V1) is None


def test_no_mod_sequences_no_caching() -> None:
    cache = SnapshotCache(100)
    unversioned = MailboxVersion(9, 3, 2, 0)
    cache.put(KEY, unversioned, INDEX)
    assert not cache.known(KEY) and cache.get(KEY, unversioned) is None


def test_bounded_by_messages_least_recently_used_first() -> None:
    cache = SnapshotCache(4)
    cache.put(("a", "INBOX"), V1, INDEX)
    cache.put(("b", "INBOX"), V1, INDEX)
    assert cache.get(("a", "INBOX"), V1) is not None  # a is now the most recent
    cache.put(("c", "INBOX"), V1, INDEX)
    assert cache.known(("a", "INBOX")) and cache.known(("c", "INBOX"))
    assert not cache.known(("b", "INBOX"))
    cache.put(("huge", "INBOX"), V1, INDEX * 3)  # larger than the whole cache: not kept
    assert not cache.known(("huge", "INBOX")) and len(cache) == 2


EXAMINE_REPLY = (
    b"* 2 EXISTS\r\n* OK [UIDVALIDITY 9] x\r\n* OK [UIDNEXT 3] x\r\n"
    b"* OK [HIGHESTMODSEQ %d] x\r\n%s OK [READ-ONLY] done\r\n"
)
FETCH_REPLY = (
    b"* 1 FETCH (UID 1 RFC822.SIZE 10 FLAGS ())\r\n"
    b"* 2 FETCH (UID 2 RFC822.SIZE 20 FLAGS ())\r\n%s OK done\r\n"
)


def account() -> tuple[ImapAccount, StringTransport]:
    proto = ImapClientProtocol()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"* OK [CAPABILITY IMAP4rev1 CONDSTORE] hi\r\n")
    return ImapAccount(proto), transport


def run_snapshot(
    acct: ImapAccount, transport: StringTransport, cache: SnapshotCache, modseq: int
) -> tuple[list[bytes], object]:
    """Answer the account's commands like a server would, until the snapshot is done."""
    d = Deferred.fromCoroutine(acct.snapshot("INBOX", cache=cache, cache_key=KEY))
    sent: list[bytes] = []
    while not d.called:
        lines = transport.value().splitlines()
        transport.clear()
        if not lines:
            break
        for line in lines:
            sent.append(line)
            tag = line.split()[0]
            if b"EXAMINE" in line:
                acct.proto.dataReceived(EXAMINE_REPLY % (modseq, tag))
            elif b"FETCH" in line:
                acct.proto.dataReceived(FETCH_REPLY % tag)
    return sent, d.result


def test_an_unchanged_mailbox_is_not_fetched_again() -> None:
    acct, transport = account()
    cache = SnapshotCache(100)
    sent, (info, index) = run_snapshot(acct, transport, cache, 40)  # type: ignore[misc]
    assert [s.split()[1] for s in sent] == [b"EXAMINE", b"UID"]  # pipelined, first time
    assert [m.uid for m in index] == [1, 2]
    sent, (info, index) = run_snapshot(acct, transport, cache, 40)  # type: ignore[misc]
    assert [s.split()[1] for s in sent] == [b"EXAMINE"]  # nothing changed: no FETCH
    assert sent[0].endswith(b"(CONDSTORE)")
    assert [m.uid for m in index] == [1, 2]
    sent, (info, index) = run_snapshot(acct, transport, cache, 41)  # type: ignore[misc]
    assert [s.split()[1] for s in sent] == [b"EXAMINE", b"UID"]  # a change: fetched anew
    assert info.highestmodseq == 41 and len(index) == 2
