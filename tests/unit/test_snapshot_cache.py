"""Reusing a mailbox index only while CONDSTORE says the mailbox is unchanged."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from gateway.maildrop.snapshot_cache import MailboxVersion, SnapshotCache
from gateway.maildrop.uidl import IndexedMessage
from tests.unit.imap_playbook import AccountPlaybook

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


def snapshot(pb: AccountPlaybook, cache: SnapshotCache) -> Deferred[object]:
    return Deferred.fromCoroutine(pb.account.snapshot("INBOX", cache=cache, cache_key=KEY))


EXAMINED = """
    S: * 2 EXISTS
    S: * OK [UIDVALIDITY 9] x
    S: * OK [UIDNEXT 3] x
    S: * OK [HIGHESTMODSEQ {modseq}] x
    S: {tag} OK [READ-ONLY] done
"""
FETCHED = """
    S: * 1 FETCH (UID 1 RFC822.SIZE 10 FLAGS ())
    S: * 2 FETCH (UID 2 RFC822.SIZE 20 FLAGS ())
    S: {tag} OK done
"""


def test_an_unchanged_mailbox_is_not_fetched_again() -> None:
    pb = AccountPlaybook("IMAP4rev1 CONDSTORE")
    cache = SnapshotCache(100)
    first = snapshot(pb, cache)
    pb.play(  # the first time: EXAMINE and FETCH pipelined
        """
        C: G1 EXAMINE "INBOX" (CONDSTORE)
        C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        """
        + EXAMINED.format(modseq=40, tag="G1")
        + FETCHED.format(tag="G2")
    )
    info, index = first.result  # type: ignore[misc]
    assert [m.uid for m in index] == [1, 2]

    again = snapshot(pb, cache)
    pb.play(  # nothing changed: no FETCH
        """
        C: G3 EXAMINE "INBOX" (CONDSTORE)
        """
        + EXAMINED.format(modseq=40, tag="G3")
    )
    info, index = again.result  # type: ignore[misc]
    assert [m.uid for m in index] == [1, 2]

    changed = snapshot(pb, cache)
    pb.play(  # a change: the open is awaited, then the index fetched anew
        """
        C: G4 EXAMINE "INBOX" (CONDSTORE)
        """
        + EXAMINED.format(modseq=41, tag="G4")
        + """
        C: G5 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        """
        + FETCHED.format(tag="G5")
    )
    info, index = changed.result  # type: ignore[misc]
    assert info.highestmodseq == 41 and len(index) == 2
