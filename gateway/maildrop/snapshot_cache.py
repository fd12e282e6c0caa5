"""Snapshots of recently seen mailboxes, reused while the server says nothing has changed.

Most POP logins are polls of a mailbox that has not changed since the device's last visit. With
CONDSTORE (RFC 7162) the server reports a mailbox's HIGHESTMODSEQ on EXAMINE: while UIDVALIDITY,
UIDNEXT, EXISTS and HIGHESTMODSEQ are all unchanged, no message has arrived, left or changed its
flags, so the previous index is still exact and the 10,000-line FETCH can be skipped. Anything
else (and every server without CONDSTORE) gets a fresh FETCH. Only the index is cached; per-device
state is read at every login as before, so the gateway's behaviour is the same with or without
this cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.maildrop.uidl import IndexedMessage, MailboxIndex


@dataclass(frozen=True, slots=True)
class MailboxVersion:
    uidvalidity: int
    uidnext: int
    exists: int
    highestmodseq: int

    @property
    def trustworthy(self) -> bool:
        """Only a server that reports mod-sequences can vouch for "nothing changed"."""
        return self.highestmodseq > 0 and self.uidnext > 0 and self.uidvalidity > 0


class SnapshotCache:
    """Least-recently-used mailbox indexes, bounded by the number of messages held."""

    def __init__(self, max_messages: int) -> None:
        self.max_messages = max_messages
        self._entries: OrderedDict[tuple[str, str], tuple[MailboxVersion, Sequence[IndexedMessage]]]
        self._entries = OrderedDict()
        self._messages = 0

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def get(self, key: tuple[str, str], version: MailboxVersion) -> Sequence[IndexedMessage] | None:
        """The cached index of ``key`` if the mailbox is still at ``version``."""
        entry = self._entries.get(key)
        if entry is None or not version.trustworthy or entry[0] != version:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(
        self, key: tuple[str, str], version: MailboxVersion, index: Sequence[IndexedMessage]
    ) -> None:
        self.discard(key)
        if not version.trustworthy or len(index) > self.max_messages:
            return
        self._entries[key] = (version, MailboxIndex.of(index))  # shared by sessions
        self._messages += len(index)
        while self._messages > self.max_messages:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._messages -= len(evicted)

    def discard(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._messages -= len(entry[1])
