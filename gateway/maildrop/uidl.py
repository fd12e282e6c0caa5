"""Which messages a POP device sees, and their UIDLs.

Every message some device has hidden also carries the keyword ``POP_DELETED`` upstream. That
keyword is what retention looks for, what IMAP users can search for, and what lets a login skip
reading the device state when no message carries it. The invariant: where the server accepts
keywords, a hidden message always has the keyword (UPDATE stores it before the state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from gateway.maildrop.numbering import Maildrop, MessageInfo

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


def build_maildrop(
    index: Sequence[IndexedMessage], uidvalidity: int, state: DeviceState | None
) -> Maildrop:
    """The session's maildrop: everything not ``\\Deleted`` upstream nor hidden for the device."""
    # uidl_for, inlined: this runs once per message and a call was 15 % of a poll's time
    # (docs/benchmark.md); tests/unit/test_views.py holds the two to the same result.
    suffix = f"{uidvalidity:08x}"
    return Maildrop(
        [
            MessageInfo(m.uid, m.size, f"{m.uid:08x}{suffix}")
            for m in index
            if "\\Deleted" not in m.flags
            and not (state is not None and state.hides(m, uidvalidity))
        ]
    )


def needs_state(index: Sequence[IndexedMessage], keywords_allowed: bool) -> bool:
    """Whether the device state must be read: only when some message could be hidden."""
    return not keywords_allowed or any(POP_DELETED in m.flags for m in index)
