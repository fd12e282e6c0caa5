"""One mailbox index fetch shared by the logins that wait for it (coalescing, not a cache).

When many devices of one user log in at once (``alice#dev1``, ``alice#dev2``, …), each would
fetch the same index (``UID FETCH 1:* (UID RFC822.SIZE FLAGS …)``, one line per message) on its
own connection. Instead, a login may take the result of an index fetch of the same upstream
user and mailbox that is *in flight*, under two rules that keep every session's snapshot at
least as new as its own login:

1. The fetch was sent after the login started (``started > since``): the server answers a
   command after it receives it, so the index shows the mailbox at a moment after the login:
   mail delivered before the login is in it, mail expunged before the login is not.
2. The joining session's own EXAMINE reports the mailbox the leader's EXAMINE reported
   (:func:`same_mailbox`): same UIDVALIDITY, UIDNEXT and EXISTS (and HIGHESTMODSEQ when both
   have one). Otherwise mail came or went between the two, and the session fetches its own.

A landed flight stays joinable while logins of its key that started before it are still on
their way (their upstream login can take longer than the fetch); once none is, it is forgotten.
Only those logins can take it, so it is never a cache: a login that starts later never sees it.
Logical time is a counter (one tick per login and per fetch sent) rather than a clock: on one
reactor thread the order of events is exact, whatever the clock's resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.maildrop.snapshot_cache import MailboxVersion
from gateway.maildrop.uidl import IndexedMessage, MailboxIndex

Key = tuple[str, str]  # (upstream user, mailbox)
Landed = tuple[MailboxVersion, Sequence[IndexedMessage]]
Waiter = Callable[[Landed | None], None]


def same_mailbox(leader: MailboxVersion, joiner: MailboxVersion) -> bool:
    """Whether two EXAMINEs saw the same set of messages.

    UIDNEXT grows with every arrival and EXISTS falls with every expunge (an arrival and an
    expunge together still move UIDNEXT), so equal (UIDVALIDITY, UIDNEXT, EXISTS) means no
    message came or went between them. A server without UIDNEXT gives no such proof.
    """
    if leader.uidvalidity != joiner.uidvalidity or not leader.uidvalidity:
        return False
    if not leader.uidnext or (leader.uidnext, leader.exists) != (joiner.uidnext, joiner.exists):
        return False
    if leader.highestmodseq and joiner.highestmodseq:
        return leader.highestmodseq == joiner.highestmodseq
    return True


@dataclass(eq=False)
class Flight:
    """One index fetch; sessions that join it wait for :meth:`land` or :meth:`fail`."""

    key: Key
    started: int
    _owner: IndexFlights
    _waiters: list[Waiter] = field(default_factory=list)
    done: bool = False
    result: Landed | None = None

    def wait(self, waiter: Waiter) -> None:
        """Call ``waiter`` with (leader's version, index) when the fetch lands (at once if it
        has), or with None if it failed."""
        if self.done:
            waiter(self.result)
        else:
            self._waiters.append(waiter)

    def land(self, version: MailboxVersion, index: Sequence[IndexedMessage]) -> None:
        self._finish((version, MailboxIndex.of(index)))  # shared by sessions

    def fail(self) -> None:
        """The leader's fetch failed: every waiter fetches its own."""
        self._finish(None)

    def _finish(self, result: Landed | None) -> None:
        if self.done:
            return
        self.done, self.result = True, result
        self._owner._landed(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter(result)


class IndexFlights:
    """The index fetches that logins may still join, at most one per (user, mailbox)."""

    def __init__(self) -> None:
        self._now = 0
        self._flights: dict[Key, Flight] = {}
        self._logging_in: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def tick(self) -> int:
        """A logical time after every earlier tick."""
        self._now += 1
        return self._now

    def login(self, key: Key) -> int:
        """A login of ``key`` starts; its tick. Pair with :meth:`logged_in`."""
        self._logging_in[key] = self._logging_in.get(key, 0) + 1
        return self.tick()

    def logged_in(self, key: Key) -> None:
        """A login of ``key`` has its snapshot (or failed): it joins nothing any more."""
        left = self._logging_in.get(key, 0) - 1
        if left > 0:
            self._logging_in[key] = left
            return
        self._logging_in.pop(key, None)
        flight = self._flights.get(key)
        if flight is not None and flight.done:
            del self._flights[key]

    def joinable(self, key: Key, since: int) -> Flight | None:
        """The fetch of ``key`` sent after ``since`` (a login's tick), in flight or landed."""
        flight = self._flights.get(key)
        if flight is None or flight.started <= since:
            return None
        return flight

    def start(self, key: Key) -> Flight:
        """A fetch of ``key`` is being sent now. It replaces an older flight of ``key`` for
        later joiners (the older one still lands for those already waiting on it)."""
        flight = Flight(key, self.tick(), self)
        self._flights[key] = flight
        return flight

    def _landed(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is not flight:
            return
        if flight.result is None or not self._logging_in.get(flight.key):
            del self._flights[flight.key]
