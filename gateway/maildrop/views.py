"""Per-device views of one mailbox: which messages a POP device still sees, and their UIDLs.

A POP login ``alice#phone`` is user ``alice`` on device ``phone``. Each device keeps its own set
of hidden messages (the ones it deleted under ``on_delete = "hide"``), so several devices each
download every message. The set lives upstream, in a small state message per device (see
``DeviceState``), so the gateway itself keeps no state and any replica serves any session.

Every message some device has hidden also carries the keyword ``POP_DELETED`` upstream. That
keyword is what retention looks for, what IMAP users can search for, and what lets a login skip
reading the device state when no message carries it. The invariant: where the server accepts
keywords, a hidden message always has the keyword (UPDATE stores it before the state).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import NamedTuple

from gateway.maildrop.numbering import Maildrop, MessageInfo
from gateway.maildrop.uidset import MAX_UID, UidSet, parse_uid_set

POP_DELETED = "$POPDeleted"
DEFAULT_DEVICE = "default"
STATE_HEADER = "X-Popgate-State"
STATE_KEY_PREFIX = "pg1-"
_STATE_VERSION = 1
# A state message is written by popgate but readable and writable by anyone with the user's
# password, so reading one must cost a bounded amount whatever it holds. The budget: 4 MiB holds
# some 600,000 single UIDs (alternating deletes in a mailbox of 1.2 million) or 150,000 EMAILIDs.
# The costliest such state (alternating single UIDs) parses in about 0.5 s with some 120 MiB
# for a moment; anything larger is refused unread.
MAX_STATE_BYTES = 4 * 1024 * 1024
_MAX_UID_RANGES = MAX_STATE_BYTES // 2  # "1," is the shortest range
_MAX_EMAILID = 255  # RFC 8474 objectid: 1 to 255 characters
_STATE_FIELDS = frozenset({"version", "mailbox", "device", "uidvalidity", "uids", "emailids"})


@dataclass(frozen=True, slots=True)
class Login:
    """A POP user name split into the upstream user and the device."""

    user: str
    device: str

    @classmethod
    def parse(cls, name: str, separator: str) -> Login:
        if separator and separator in name:
            user, _, device = name.rpartition(separator)
            if user and device:
                return cls(user, device)
        return cls(name, DEFAULT_DEVICE)


class IndexedMessage(NamedTuple):
    """What the gateway learns about one upstream message at login (no body).

    A named tuple: a login makes one per message, and a 10,000-message mailbox should not
    spend its time in dataclass constructors.
    """

    uid: int
    size: int
    flags: frozenset[str]
    emailid: str | None = None


class InvalidState(ValueError):
    """A stored state message that cannot be used; ``str(self)`` says why, quoting none of it.

    The one error state parsing raises, whatever the input: the caller ignores that copy and
    rewrites the state, so a broken or forged message never locks a device out.
    """


@dataclass
class DeviceState:
    """The messages one device has hidden in one mailbox.

    Messages are remembered by EMAILID where the server has OBJECTID (RFC 8474), which survives a
    UIDVALIDITY change; otherwise by UID under the UIDVALIDITY it was valid for. After a
    UIDVALIDITY change without EMAILIDs the UIDs mean nothing any more and the device sees
    everything again: a re-download, never a loss. UIDs are kept as ranges (``UidSet``), so a
    stored ``1:4294967295`` costs two numbers.
    """

    mailbox: str
    device: str
    uidvalidity: int = 0
    uids: UidSet = field(default_factory=UidSet)
    emailids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not isinstance(self.uids, UidSet):
            self.uids = UidSet(self.uids)

    def hides(self, msg: IndexedMessage, uidvalidity: int) -> bool:
        """By UID while the UIDVALIDITY is the one the UIDs were recorded under; by EMAILID
        only after it changed. An EMAILID alone never decides in the same UIDVALIDITY: Cyrus
        derives it from the content, so byte-identical messages share one, and one DELE must
        hide one message, not its twins too."""
        if uidvalidity == self.uidvalidity:
            return msg.uid in self.uids
        return msg.emailid is not None and msg.emailid in self.emailids

    def merge(self, other: DeviceState) -> None:
        """Union with another copy (two replicas may each have written one)."""
        self.emailids |= other.emailids
        if other.uidvalidity == self.uidvalidity or not self.uids:
            self.uidvalidity = other.uidvalidity or self.uidvalidity
            self.uids = self.uids | other.uids

    def hide(self, messages: Iterable[IndexedMessage], uidvalidity: int) -> None:
        if uidvalidity != self.uidvalidity:
            self.uids = UidSet()
            self.uidvalidity = uidvalidity
        messages = list(messages)
        self.uids = self.uids | UidSet(msg.uid for msg in messages)
        self.emailids.update(msg.emailid for msg in messages if msg.emailid is not None)

    def prune(self, present: Sequence[IndexedMessage], newer_from: int | None = None) -> None:
        """Forget messages no longer in the mailbox, so the state never outgrows it.

        ``present`` may be older than what is stored: another session of the same device may
        have hidden a message that arrived after this snapshot. ``newer_from`` (the snapshot's
        UIDNEXT, given when the mailbox has had arrivals since) keeps every UID from there on,
        and every EMAILID (they carry no order); a later UPDATE prunes them.
        """
        kept = self.uids.intersection(m.uid for m in present)
        if newer_from is None:
            self.uids = kept
            self.emailids &= {m.emailid for m in present if m.emailid is not None}
        else:
            newer = [(max(a, newer_from), b) for a, b in self.uids.ranges() if b >= newer_from]
            self.uids = kept | UidSet.from_ranges(newer)

    def drop_unborn(self, uidvalidity: int, uidnext: int) -> bool:
        """Forget UIDs the mailbox has not given out yet; True if there were any.

        Only a forged or corrupt state holds them, and they would hide messages that arrive
        later from this device.
        """
        if uidnext <= 0 or uidvalidity != self.uidvalidity or not self.uids:
            return False
        kept = self.uids.below(uidnext)
        if kept == self.uids:
            return False
        self.uids = kept
        return True

    @property
    def key(self) -> str:
        return state_key(self.mailbox, self.device)

    def to_message(self, *, date: float, message_id: str) -> bytes:
        """An RFC 5322 message holding this state, to APPEND to the state mailbox.

        ``date`` (Unix seconds) and ``message_id`` come from the caller: making them takes a
        clock and this host's name, which this layer does not touch.
        """
        body = json.dumps(
            {
                "version": _STATE_VERSION,
                "mailbox": self.mailbox,
                "device": self.device,
                "uidvalidity": self.uidvalidity,
                "uids": self.uids.format(),
                "emailids": sorted(self.emailids),
            },
            separators=(",", ":"),
        )
        headers = [
            "From: popgate <popgate@localhost>",
            "To: popgate <popgate@localhost>",
            f"Subject: POP device state ({_ascii(self.device)}); used by popgate, keep",
            f"Date: {formatdate(date, localtime=False)}",
            f"Message-ID: {message_id}",
            f"{STATE_HEADER}: {self.key}",
            "MIME-Version: 1.0",
            "Content-Type: application/json; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        return ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode("utf-8")

    @classmethod
    def from_message(cls, raw: bytes, mailbox: str, device: str) -> DeviceState:
        """Parse the state message of this mailbox and device; raises InvalidState only."""
        state = cls.parse(raw)
        if state.mailbox != mailbox or state.device != device:
            # The search token is a hash of both names: only a forged message gets here.
            raise InvalidState("state names another mailbox or device")
        return state

    @classmethod
    def parse(cls, raw: bytes) -> DeviceState:
        """Parse a state message of any device; raises InvalidState, and nothing else.

        Bounded before any work (``MAX_STATE_BYTES``), strict about every field, and UID sets
        stay ranges: no input makes this loop, recurse without bound or allocate much more
        than its own size.
        """
        if len(raw) > MAX_STATE_BYTES:
            raise InvalidState(f"state larger than {MAX_STATE_BYTES} bytes")
        _, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            _, _, body = raw.partition(b"\n\n")
        try:
            data = json.loads(body.decode("utf-8"))
        except RecursionError:
            # json's C scanner counts its own depth and stops cleanly at the recursion limit;
            # no valid state nests deeper than two levels.
            raise InvalidState("state nested too deeply") from None
        except (UnicodeDecodeError, ValueError):
            raise InvalidState("state is not JSON") from None
        if not isinstance(data, dict) or set(data) != _STATE_FIELDS:
            raise InvalidState("state has the wrong fields")
        if type(data["version"]) is not int or data["version"] != _STATE_VERSION:
            raise InvalidState("state has an unknown version")
        mailbox, device, uidvalidity = data["mailbox"], data["device"], data["uidvalidity"]
        uids, emailids = data["uids"], data["emailids"]
        if not isinstance(mailbox, str) or not isinstance(device, str):
            raise InvalidState("state names no mailbox or device")
        if type(uidvalidity) is not int or not 0 <= uidvalidity <= MAX_UID:
            raise InvalidState("state has an invalid UIDVALIDITY")
        if not isinstance(uids, str):
            raise InvalidState("state has an invalid UID set")
        try:
            uid_set = parse_uid_set(uids, max_ranges=_MAX_UID_RANGES)
        except ValueError:
            raise InvalidState("state has an invalid UID set") from None
        if not isinstance(emailids, list) or not all(
            isinstance(e, str) and 0 < len(e) <= _MAX_EMAILID for e in emailids
        ):
            raise InvalidState("state has invalid EMAILIDs")
        return cls(mailbox, device, uidvalidity, uid_set, set(emailids))


def state_key(mailbox: str, device: str) -> str:
    """A search-safe token naming one (mailbox, device) pair, whatever characters they hold."""
    digest = hashlib.sha256(f"{mailbox}\0{device}".encode()).hexdigest()
    return f"{STATE_KEY_PREFIX}{digest[:32]}"


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


def _ascii(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:60]
