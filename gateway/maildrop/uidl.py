"""Which messages a POP device sees, and their UIDLs.

Every message some device has hidden also carries the keyword ``POP_DELETED`` upstream. That
keyword is what retention looks for, what IMAP users can search for, and what lets a login skip
reading the device state when no message carries it. The invariant: where the server accepts
keywords, a hidden message always has the keyword (UPDATE stores it before the state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from gateway.maildrop.numbering import Maildrop, Messages

if TYPE_CHECKING:
    from gateway.maildrop.device_state import DeviceState

POP_DELETED = "$POPDeleted"


class IndexedMessage(NamedTuple):
    """What the gateway learns about one upstream message at login (no body).

    A named tuple: a login makes one per message, and a 10,000-message mailbox should not
    spend its time in dataclass constructors.
    """

    uid: int
    size: int
    flags: frozenset[str]
    emailid: str | None = None


def uidl_for(msg: IndexedMessage, uidvalidity: int) -> str:
    """The message's UIDL: its UID and the mailbox's UIDVALIDITY, as Dovecot's default
    ``pop3_uidl_format = %08Xu%08Xv`` writes them (lower-case hex, despite the ``X``).

    RFC 1939 asks for a unique-id that is unique in the maildrop and persistent across
    sessions. A UID is never reused under one UIDVALIDITY, so this one never names another
    message, on any server, from any replica. The EMAILID is not used: Cyrus derives it from
    the content (byte-identical messages share it, RFC 8474 allows that), so no rule built on
    it alone is unique, and a rule that made twins unique by looking at the other messages would
    change a UIDL's meaning when a twin leaves. The cost is a one-time re-download on servers
    with OBJECTID, where popgate used to serve EMAILIDs (docs/pop3.md); devices moving from
    Dovecot's own POP3 keep their UIDLs.
    """
    return f"{msg.uid:08x}{uidvalidity:08x}"


class MailboxIndex(tuple[IndexedMessage, ...]):
    """An upstream mailbox's index as a login saw it, in UID order.

    Logins share one (the snapshot cache, a shared index fetch), so what it shows a device that
    hides nothing is worked out once and kept with it: a poll of an unchanged 10,000-message
    mailbox then builds no per-message objects at all.
    """

    _visible: tuple[int, Messages] | None = None

    @classmethod
    def of(cls, index: Sequence[IndexedMessage]) -> MailboxIndex:
        """``index`` as a MailboxIndex: itself if it is one (keeping its view), else a copy."""
        return index if isinstance(index, MailboxIndex) else cls(index)

    def visible(self, uidvalidity: int) -> Messages:
        """The messages not ``\\Deleted`` upstream, numbered, under ``uidvalidity``."""
        memo = self._visible
        if memo is None or memo[0] != uidvalidity:
            memo = (uidvalidity, _numbered(self, uidvalidity, None))
            self._visible = memo
        return memo[1]


def build_maildrop(
    index: Sequence[IndexedMessage], uidvalidity: int, state: DeviceState | None
) -> Maildrop:
    """The session's maildrop: everything not ``\\Deleted`` upstream nor hidden for the device."""
    if state is not None and not state.hides_none(uidvalidity):
        return Maildrop(_numbered(index, uidvalidity, state))
    if isinstance(index, MailboxIndex):
        return Maildrop(index.visible(uidvalidity))
    return Maildrop(_numbered(index, uidvalidity, None))


def _numbered(
    index: Sequence[IndexedMessage], uidvalidity: int, state: DeviceState | None
) -> Messages:
    if state is None:
        kept = [m for m in index if "\\Deleted" not in m.flags]
    else:
        kept = [m for m in index if "\\Deleted" not in m.flags and not state.hides(m, uidvalidity)]
    uids = [m.uid for m in kept]
    # uidl_for, inlined ("%" is the quickest of Python's formatters here): this runs once per
    # message of a fresh index (tests/unit/test_views.py holds the two to the same result).
    uidls = ["%08x%08x" % (u, uidvalidity) for u in uids]  # noqa: UP031
    return Messages(uids, [m.size for m in kept], uidls)


def needs_state(index: Sequence[IndexedMessage], keywords_allowed: bool) -> bool:
    """Whether the device state must be read: only when some message could be hidden."""
    return not keywords_allowed or any(POP_DELETED in m.flags for m in index)
