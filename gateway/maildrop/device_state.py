"""One POP device's state in one mailbox: what it hid, what it downloaded, its last login.

Each device keeps its own set of hidden messages (the ones it deleted under
``on_delete = "hide"``), so several devices each download every message. The set lives upstream,
in a small state message per device (``DeviceState``), so the gateway itself keeps no state and
any replica serves any session. This module holds that state, its storage format and the bounded
parser for it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate

from gateway.maildrop.uidl import IndexedMessage
from gateway.maildrop.uidset import MAX_UID, UidSet, parse_uid_set

STATE_HEADER = "X-Popgate-State"
STATE_KEY_PREFIX = "pg1-"
# Version 2 adds what the device downloaded and when it was last seen (retention waits for
# every active device); version 1 states still load, as a device that downloaded nothing and
# whose last login is unknown.
_STATE_VERSION = 2
# A state message is written by popgate but readable and writable by anyone with the user's
# password, so reading one must cost a bounded amount whatever it holds. The budget: 4 MiB holds
# some 600,000 single UIDs (alternating deletes in a mailbox of 1.2 million) or 150,000 EMAILIDs.
# The costliest such state (alternating single UIDs) parses in about 0.5 s with some 120 MiB
# for a moment; anything larger is refused unread.
MAX_STATE_BYTES = 4 * 1024 * 1024
_MAX_UID_RANGES = MAX_STATE_BYTES // 2  # "1," is the shortest range
_MAX_EMAILID = 255  # RFC 8474 objectid: 1 to 255 characters
_STATE_FIELDS_V1 = frozenset({"version", "mailbox", "device", "uidvalidity", "uids", "emailids"})
_STATE_FIELDS = _STATE_FIELDS_V1 | {"downloaded", "last_seen"}
# A last-seen time later than this (year 9999) is forged: refused rather than trusted forever.
_MAX_LAST_SEEN = 253402300799


class InvalidState(ValueError):
    """A stored state message that cannot be used; ``str(self)`` says why, quoting none of it.

    The one error state parsing raises, whatever the input: the caller ignores that copy and
    rewrites the state, so a broken or forged message never locks a device out.
    """


@dataclass
class DeviceState:
    """The messages one device has hidden and downloaded in one mailbox, and its last login.

    Messages are remembered by EMAILID where the server has OBJECTID (RFC 8474), which survives a
    UIDVALIDITY change; otherwise by UID under the UIDVALIDITY it was valid for. After a
    UIDVALIDITY change without EMAILIDs the UIDs mean nothing any more and the device sees
    everything again: a re-download, never a loss. UIDs are kept as ranges (``UidSet``), so a
    stored ``1:4294967295`` costs two numbers.

    ``downloaded`` (UIDs whose whole body a RETR sent, under ``uidvalidity``) and ``last_seen``
    (Unix seconds of the last login, recorded at login and at QUIT, at most hourly when
    nothing else changed; 0 = unknown) are what retention asks
    before removing a message (``wait_for_devices``). Downloads are kept by UID only: after a
    UIDVALIDITY change every UIDL changes, the device downloads everything again, and until
    then it holds everything back, which only keeps mail longer.
    """

    mailbox: str
    device: str
    uidvalidity: int = 0
    uids: UidSet = field(default_factory=UidSet)
    emailids: set[str] = field(default_factory=set)
    downloaded: UidSet = field(default_factory=UidSet)
    last_seen: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.uids, UidSet):
            self.uids = UidSet(self.uids)
        if not isinstance(self.downloaded, UidSet):
            self.downloaded = UidSet(self.downloaded)

    def hides(self, msg: IndexedMessage, uidvalidity: int) -> bool:
        """By UID while the UIDVALIDITY is the one the UIDs were recorded under; by EMAILID
        only after it changed. An EMAILID alone never decides in the same UIDVALIDITY: Cyrus
        derives it from the content, so byte-identical messages share one, and one DELE must
        hide one message, not its twins too."""
        if uidvalidity == self.uidvalidity:
            return msg.uid in self.uids
        return msg.emailid is not None and msg.emailid in self.emailids

    def hides_none(self, uidvalidity: int) -> bool:
        """Whether ``hides`` is false for every message of a mailbox at ``uidvalidity``: such
        a device sees what a device without state sees, and shares its view."""
        return not (self.uids if uidvalidity == self.uidvalidity else self.emailids)

    def merge(self, other: DeviceState) -> None:
        """Union with another copy (two replicas may each have written one): hidden and
        downloaded sets alike, and the later of the two last logins."""
        self.emailids |= other.emailids
        self.last_seen = max(self.last_seen, other.last_seen)
        if other.uidvalidity == self.uidvalidity or not (self.uids or self.downloaded):
            self.uidvalidity = other.uidvalidity or self.uidvalidity
            self.uids = self.uids | other.uids
            self.downloaded = self.downloaded | other.downloaded

    def _at(self, uidvalidity: int) -> None:
        if uidvalidity != self.uidvalidity:
            self.uids = UidSet()
            self.downloaded = UidSet()
            self.uidvalidity = uidvalidity

    def hide(self, messages: Iterable[IndexedMessage], uidvalidity: int) -> None:
        self._at(uidvalidity)
        messages = list(messages)
        self.uids = self.uids | UidSet(msg.uid for msg in messages)
        self.emailids.update(msg.emailid for msg in messages if msg.emailid is not None)

    def download(self, uids: Iterable[int], uidvalidity: int) -> bool:
        """Record completed RETRs; True if any of them is new to the state."""
        new = UidSet(uids)
        if uidvalidity == self.uidvalidity and all(uid in self.downloaded for uid in new):
            return False
        self._at(uidvalidity)
        self.downloaded = self.downloaded | new
        return True

    def covers(self, uid: int, uidvalidity: int) -> bool:
        """Whether this device has downloaded or hidden the message: it no longer needs it
        in the mailbox. By UID only (what retention can ask without reading EMAILIDs)."""
        return uidvalidity == self.uidvalidity and (uid in self.downloaded or uid in self.uids)

    def seen(self, when: int) -> None:
        self.last_seen = max(self.last_seen, when)

    def prune(self, present: Sequence[IndexedMessage], newer_from: int | None = None) -> None:
        """Forget messages no longer in the mailbox, so the state never outgrows it.

        ``present`` may be older than what is stored: another session of the same device may
        have hidden a message that arrived after this snapshot. ``newer_from`` (the snapshot's
        UIDNEXT, given when the mailbox has had arrivals since) keeps every UID from there on,
        and every EMAILID (they carry no order); a later UPDATE prunes them.
        """
        self.uids = _prune(self.uids, present, newer_from)
        self.downloaded = _prune(self.downloaded, present, newer_from)
        if newer_from is None:
            self.emailids &= {m.emailid for m in present if m.emailid is not None}

    def drop_unborn(self, uidvalidity: int, uidnext: int) -> bool:
        """Forget UIDs the mailbox has not given out yet; True if there were any.

        Only a forged or corrupt state holds them, and they would hide messages that arrive
        later from this device.
        """
        if uidnext <= 0 or uidvalidity != self.uidvalidity:
            return False
        kept, downloaded = self.uids.below(uidnext), self.downloaded.below(uidnext)
        if kept == self.uids and downloaded == self.downloaded:
            return False
        self.uids, self.downloaded = kept, downloaded
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
                "downloaded": self.downloaded.format(),
                "last_seen": self.last_seen,
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
        if not isinstance(data, dict):
            raise InvalidState("state has the wrong fields")
        version = data.get("version")
        if type(version) is not int or version not in (1, _STATE_VERSION):
            raise InvalidState("state has an unknown version")
        if set(data) != (_STATE_FIELDS_V1 if version == 1 else _STATE_FIELDS):
            raise InvalidState("state has the wrong fields")
        mailbox, device, uidvalidity = data["mailbox"], data["device"], data["uidvalidity"]
        uids, emailids = data["uids"], data["emailids"]
        if not isinstance(mailbox, str) or not isinstance(device, str):
            raise InvalidState("state names no mailbox or device")
        if type(uidvalidity) is not int or not 0 <= uidvalidity <= MAX_UID:
            raise InvalidState("state has an invalid UIDVALIDITY")
        if not isinstance(uids, str):
            raise InvalidState("state has an invalid UID set")
        downloaded, last_seen = data.get("downloaded", ""), data.get("last_seen", 0)
        if not isinstance(downloaded, str):
            raise InvalidState("state has an invalid downloaded set")
        if type(last_seen) is not int or not 0 <= last_seen <= _MAX_LAST_SEEN:
            raise InvalidState("state has an invalid last-seen time")
        # Both sets share the one budget: the whole message is within MAX_STATE_BYTES already,
        # so together they hold at most _MAX_UID_RANGES ranges.
        try:
            uid_set = parse_uid_set(uids, max_ranges=_MAX_UID_RANGES)
            downloaded_set = parse_uid_set(
                downloaded, max_ranges=max(1, _MAX_UID_RANGES - len(uid_set.ranges()))
            )
        except ValueError:
            raise InvalidState("state has an invalid UID set") from None
        if not isinstance(emailids, list) or not all(
            isinstance(e, str) and 0 < len(e) <= _MAX_EMAILID for e in emailids
        ):
            raise InvalidState("state has invalid EMAILIDs")
        return cls(mailbox, device, uidvalidity, uid_set, set(emailids), downloaded_set, last_seen)


@dataclass(frozen=True, slots=True)
class UnreadableState:
    """A stored state copy that cannot be read (forged, corrupt, or over ``MAX_STATE_BYTES``).

    Retention must not take it for "no device": the device it belongs to may not have
    downloaded what others deleted. ``key`` (``state_key``) names the (mailbox, device) pair;
    ``device`` is the device's name when the copy's own headers give one that hashes to
    ``key``, else None. ``reason`` is InvalidState's text, which quotes nothing stored.
    """

    key: str
    device: str | None
    reason: str

    @property
    def label(self) -> str:
        """How logs and reports name it: the device, else its state key."""
        if self.device is not None:
            return f"{self.device} (state {self.key})"
        return f"unknown device (state {self.key})"


# The headers that name a state: at most this much of a copy is looked at for them.
_MAX_HEADER_BYTES = 8 * 1024
_KEY_RE = re.compile(
    rb"^" + re.escape(STATE_HEADER.encode()) + rb":[ \t]*(pg1-[0-9a-f]{32})[ \t]*\r?$",
    re.IGNORECASE | re.MULTILINE,
)
_SUBJECT_RE = re.compile(
    rb"^Subject: POP device state \(([ -~]{1,60})\); used by popgate, keep\r?$", re.MULTILINE
)


def header_key(raw: bytes) -> str | None:
    """The state key a state message's ``X-Popgate-State`` header holds, if well formed."""
    found = _KEY_RE.search(_headers(raw))
    return found.group(1).decode("ascii").lower() if found else None


def unreadable_state(raw: bytes, mailbox: str, key: str, reason: str) -> UnreadableState:
    """Describe an unreadable copy stored under ``key``, naming its device only if the name
    in its Subject (as ``to_message`` writes it) hashes to ``key``: a forged name is never
    shown as a device's."""
    device = None
    found = _SUBJECT_RE.search(_headers(raw))
    if found:
        name = found.group(1).decode("ascii")
        if state_key(mailbox, name) == key:
            device = name
    return UnreadableState(key, device, reason)


def _headers(raw: bytes) -> bytes:
    head = raw[:_MAX_HEADER_BYTES]
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end]


def _prune(uids: UidSet, present: Sequence[IndexedMessage], newer_from: int | None) -> UidSet:
    kept = uids.intersection(m.uid for m in present)
    if newer_from is None:
        return kept
    newer = [(max(a, newer_from), b) for a, b in uids.ranges() if b >= newer_from]
    return kept | UidSet.from_ranges(newer)


def state_key(mailbox: str, device: str) -> str:
    """A search-safe token naming one (mailbox, device) pair, whatever characters they hold."""
    digest = hashlib.sha256(f"{mailbox}\0{device}".encode()).hexdigest()
    return f"{STATE_KEY_PREFIX}{digest[:32]}"


def _ascii(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:60]
