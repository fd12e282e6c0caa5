"""Where each device's state lives upstream: IMAP METADATA entries, or the state mailbox.

``[pop3] state_store`` chooses (docs/pop3.md, "Where the per-device state lives"):

``mailbox`` (:class:`MailboxStore`)
    one small message per (mailbox, device) in ``[pop3] state_mailbox``, found by a header token
    (``STATE_HEADER``). IMAP clients see that mailbox.
``metadata`` (:class:`MetadataStore`)
    private METADATA entries (RFC 5464) of the served mailbox, under ``ENTRY_ROOT``: nothing an
    IMAP client lists, searches or downloads. State found in the state mailbox is carried over
    first, then removed (and the mailbox, once empty).
``auto``
    METADATA when the server takes a private entry on the served mailbox (tried once per user
    and remembered in the entry ``MARKER``), else the mailbox.

Both stores hold the same bytes (:meth:`DeviceState.to_message`) and merge the same way. A
write never replaces in place: it adds a new copy, then removes the copies it read (in
METADATA both in one SETMETADATA). Two writers that overlap each leave their copy, and the next
read merges them (a union), so no writer's hidden messages are lost and the state is never
absent. See gateway/maildrop/device_state.py for what the state means.

Anyone with the user's password can write the state, so reading is bounded: at most
``MAX_COPIES`` copies, each read only up to ``MAX_STATE_BYTES`` (a partial FETCH; METADATA
entries over ``CHUNK_SIZE`` are not sent). A copy that cannot be used is ignored and the state
rewritten without it, with one log line: a broken state costs a device at most a re-download,
never a lockout. ``load_all`` (retention, ``popgate device list``) reports such copies
(``UnreadableState``) instead of skipping them: retention removes nothing for a user while
one of its devices' state cannot be read.

A copy in METADATA is spread over entries of at most ``CHUNK_SIZE`` octets (``<writer>-<i>-<n>``,
``i`` of ``n``), because servers limit a value's size; it counts only when all ``n`` are there.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import make_msgid
from typing import Protocol

from twisted.internet.defer import Deferred

from gateway.config import Pop3Settings
from gateway.host import host_name
from gateway.maildrop.device_state import (
    MAX_STATE_BYTES,
    STATE_HEADER,
    STATE_KEY_PREFIX,
    DeviceState,
    InvalidState,
    UnreadableState,
    header_key,
    unreadable_state,
)
from gateway.maildrop.uidl import IndexedMessage
from gateway.upstream.account import ImapAccount
from gateway.upstream.imap_client import BodyCollector, ImapCommandFailed, ImapError

log = logging.getLogger("popgate.state")

# Normally one copy, two after an interrupted write; more only by hand or by forgery. The
# newest are read, the others removed at the next write.
MAX_COPIES = 8

# Entry names are lower case throughout: Dovecot lower-cases them.
ENTRY_ROOT = "/private/vendor/popgate"
STATE_ROOT = f"{ENTRY_ROOT}/state"
# Set once METADATA proved usable for this mailbox ("auto" then never tries the mailbox again).
MARKER = f"{ENTRY_ROOT}/store"
MARKER_VALUE = b"metadata 1"
# Written and removed once, before the marker, to learn whether state entries are taken too.
PROBE = f"{STATE_ROOT}/probe"
# Octets per entry value, under every limit found: Dovecot's file dict takes any size (20 MB
# tried) but rewrites the user's whole attribute file at each change; its SQL dict schema keeps
# values in a VARCHAR(65535); Cyrus reads literals of any size but a quoted value over its
# maxquoted setting ends the connection. A 10,000-message state is 55 KB with scattered UIDs
# (Dovecot), 335 KB with Cyrus's EMAILIDs too: 2 or 11 entries. A server answering
# [METADATA MAXSIZE n] to a write gets entries of n octets instead.
CHUNK_SIZE = 32 * 1024
MIN_CHUNK_SIZE = 1024
# A copy missing some of its entries is being written right now, or its writer crashed in the
# middle on a server that does not apply SETMETADATA whole. Only the latter is removed.
STALE_PARTIAL_SECONDS = 600.0


class StateStoreError(ImapError):
    """The chosen store cannot be used on this server (e.g. ``metadata`` without METADATA)."""


class StateStore(Protocol):
    name: str

    async def load(
        self,
        account: ImapAccount,
        mailbox: str,
        device: str,
        *,
        uidvalidity: int = 0,
        uidnext: int = 0,
    ) -> DeviceState: ...

    async def save(
        self,
        account: ImapAccount,
        state: DeviceState,
        present: Sequence[IndexedMessage],
        newer_from: int | None = None,
    ) -> None: ...

    async def reset(self, account: ImapAccount, mailbox: str, device: str) -> int: ...

    async def load_all(self, account: ImapAccount, mailbox: str) -> DeviceStates: ...


# How long ``auto`` trusts a refusal of popgate's METADATA entries (Cyrus without
# annotation_allow_undefined refuses them for good): meanwhile a login only reads the marker,
# instead of probing with two writes and logging the refusal again at every poll.
PROBE_AGAIN_AFTER = 3600.0
_MAX_REFUSALS = 10_000


class RecentRefusals:
    """(user, mailbox) pairs whose server refused popgate's METADATA entries lately."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[key]
            return False
        return True

    def add(self, key: tuple[str, str]) -> None:
        self._until[key] = self._clock() + PROBE_AGAIN_AFTER
        self._until.move_to_end(key)
        while len(self._until) > _MAX_REFUSALS:
            self._until.popitem(last=False)


_RECENT_REFUSALS = RecentRefusals()


async def open_store(account: ImapAccount, settings: Pop3Settings, mailbox: str) -> StateStore:
    """The store ``[pop3] state_store`` names for this account and served mailbox.

    ``auto`` tries: METADATA is used when the server offers it *and* takes our private entry
    on ``mailbox``; the outcome is kept in that entry, so later logins only read it. A refusal
    is remembered (RecentRefusals) for PROBE_AGAIN_AFTER.
    """
    legacy = MailboxStore(settings.state_mailbox)
    if _surely_mailbox_store(account, settings):
        return legacy
    metadata = MetadataStore(legacy)
    if settings.state_store == "metadata":
        if not _offers_metadata(account):
            raise StateStoreError("state_store is metadata, but the IMAP server has no METADATA")
        refused = await metadata.refusal(account, mailbox)
        if refused is not None:
            raise StateStoreError(
                f"state_store is metadata, but the IMAP server refuses popgate's private "
                f"METADATA entries on {mailbox} ({refused})"
            )
        return metadata
    if await metadata.usable(account, mailbox, _RECENT_REFUSALS):
        return metadata
    return legacy


def _offers_metadata(account: ImapAccount) -> bool:
    return account.offers("METADATA")


def _surely_mailbox_store(account: ImapAccount, settings: Pop3Settings) -> bool:
    """Whether the store is the state mailbox without asking the server anything: so
    configured, or ``auto`` on a server that does not offer METADATA."""
    return settings.state_store == "mailbox" or (
        settings.state_store == "auto" and not _offers_metadata(account)
    )


def merge_copies(
    state: DeviceState, copies: Sequence[bytes], uidvalidity: int = 0, uidnext: int = 0
) -> list[str]:
    """Merge every usable copy into ``state``; the reasons the others were not (fully) usable.

    With the mailbox's ``uidvalidity`` and ``uidnext``, UIDs it has not given out yet are
    dropped (and reported): they would hide future messages.
    """
    problems = []
    for raw in copies:
        try:
            found = DeviceState.from_message(raw, state.mailbox, state.device)
        except InvalidState as e:
            problems.append(str(e))
            continue
        if found.drop_unborn(uidvalidity, uidnext):
            problems.append("state hides UIDs not given out yet")
        state.merge(found)
    return problems


def _report(state: DeviceState, problems: list[str], what: str = "state message(s)") -> None:
    # Names the device (a login name, not a secret) and never quotes the stored content.
    log.warning(
        "device %r: ignored %d unusable %s in %s (%s); rewriting its state",
        state.device,
        len(problems),
        what,
        state.mailbox,
        "; ".join(sorted(set(problems))),
    )


def _state_message(state: DeviceState) -> bytes:
    """The state as the message both stores hold, dated now."""
    message_id = make_msgid("popgate-state", domain=host_name())
    return state.to_message(date=time.time(), message_id=message_id)


def _check_size(state: DeviceState, message: bytes) -> None:
    if len(message) > MAX_STATE_BYTES:
        # Written anyway (it is the truth), but the next read will refuse it: the device will
        # see its hidden messages again. Only a mailbox with well over 100,000 hidden messages
        # gets here.
        log.error(
            "device %r: state of %d bytes exceeds the %d-byte limit; it will not be readable",
            state.device,
            len(message),
            MAX_STATE_BYTES,
        )


@dataclass
class DeviceStates:
    """Every device's state for one mailbox, and the stored copies that could not be read."""

    states: list[DeviceState] = field(default_factory=list)
    unreadable: list[UnreadableState] = field(default_factory=list)


def merge_by_device(mailbox: str, copies: Sequence[DeviceState]) -> list[DeviceState]:
    states: dict[str, DeviceState] = {}
    for found in copies:
        states.setdefault(found.device, DeviceState(mailbox, found.device)).merge(found)
    return sorted(states.values(), key=lambda s: s.device)


# --------------------------------------------------------------------------------------------
# The state mailbox


@dataclass
class MailboxStore:
    """State messages in ``state_mailbox`` (visible to IMAP clients)."""

    state_mailbox: str
    name: str = "mailbox"

    async def _find(self, account: ImapAccount, key: str) -> list[int]:
        """UIDs of the state messages whose header holds ``key`` (a substring match)."""
        return await account.search_header(STATE_HEADER, key)

    async def _bodies(self, account: ImapAccount, uids: list[int]) -> dict[int, bytes]:
        """The bodies of the newest ``MAX_COPIES`` of ``uids``, each cut after MAX_STATE_BYTES
        + 1 bytes (more than that is invalid anyway, and the cut is what tells)."""
        uids = sorted(uids)[-MAX_COPIES:]
        if not uids:
            return {}
        sinks = {uid: BodyCollector() for uid in uids}
        await account.fetch_body_prefixes(sinks, MAX_STATE_BYTES + 1)
        return {uid: sink.bodies[0] for uid, sink in sinks.items() if sink.bodies}

    async def _read(
        self,
        account: ImapAccount,
        state: DeviceState,
        uids: list[int],
        uidvalidity: int = 0,
        uidnext: int = 0,
    ) -> list[str]:
        problems = []
        if len(uids) > MAX_COPIES:
            problems.append(f"{len(uids)} copies, only the newest {MAX_COPIES} read")
        bodies = await self._bodies(account, uids)
        return problems + merge_copies(state, list(bodies.values()), uidvalidity, uidnext)

    async def count(self, account: ImapAccount) -> int | None:
        """Messages in the state mailbox (STATUS: the selection stays); 0 when there is no
        such mailbox, None when the server did not say."""
        try:
            return await account.count_messages(self.state_mailbox)
        except ImapCommandFailed:
            return 0

    async def remove(self, account: ImapAccount, uids: list[int]) -> None:
        if uids and not await account.expunge(uids):
            # No UIDPLUS: only the gateway's own state messages live here, all marked for removal.
            await account.expunge_deleted()

    async def load(
        self,
        account: ImapAccount,
        mailbox: str,
        device: str,
        *,
        uidvalidity: int = 0,
        uidnext: int = 0,
        counted: int | None = None,
    ) -> DeviceState:
        """The device's state; empty when it has none yet.

        A STATUS first (``counted``: its answer, if the login asked ahead): while no device has
        hidden anything there is no state mailbox (or an empty one), and the served mailbox
        stays selected, so the login does not open it again. Only a state mailbox holding
        messages is opened (EXAMINE: it then stays selected).

        ``uidvalidity`` and ``uidnext`` of ``mailbox`` (if known) let a state that names UIDs
        not given out yet be caught and repaired.
        """
        state = DeviceState(mailbox, device)
        stored = counted if counted is not None else await self.count(account)
        if stored == 0:
            return state  # no state mailbox, or an empty one: nothing hidden anywhere yet
        # The SEARCH goes out with the EXAMINE (one round trip): it runs in whatever the
        # EXAMINE leaves selected, and is dropped unread if the EXAMINE failed.
        opened = Deferred.fromCoroutine(account.examine(self.state_mailbox))
        searched = Deferred.fromCoroutine(self._find(account, state.key))
        try:
            await opened
        except ImapCommandFailed:
            searched.addErrback(lambda failure: failure.trap(ImapError))
            return state  # gone since the STATUS
        except BaseException:
            searched.addErrback(lambda failure: failure.trap(ImapError))
            raise
        found = await searched
        problems = await self._read(account, state, found, uidvalidity, uidnext)
        if problems:
            _report(state, problems)
            await self._repair(account, state, found)
        return state

    async def _repair(self, account: ImapAccount, state: DeviceState, old: list[int]) -> None:
        """Replace every stored copy with the state merged from the usable ones.

        Best effort: if the server refuses (no rights, over quota) the device still logs in with
        what could be read, and the next write tries again.
        """
        try:
            await account.select(self.state_mailbox)
            await self._write(account, state, old)
        except ImapCommandFailed as e:
            log.warning("device %r: state not rewritten: %s", state.device, e.status.text)

    async def _write(self, account: ImapAccount, state: DeviceState, old: list[int]) -> None:
        message = _state_message(state)
        _check_size(state, message)
        await account.append(self.state_mailbox, message, ["\\Seen"])
        await self.remove(account, old)

    async def save(
        self,
        account: ImapAccount,
        state: DeviceState,
        present: Sequence[IndexedMessage],
        newer_from: int | None = None,
    ) -> None:
        """Merge with what is stored now, write the result, then remove the older copies.

        Entries for messages not in ``present`` (gone from the mailbox) are dropped on the way.
        """
        await account.create_mailbox(self.state_mailbox)
        await account.select(self.state_mailbox)
        old = await self._find(account, state.key)
        problems = await self._read(account, state, old)
        if problems:
            _report(state, problems)
        state.prune(present, newer_from)
        await self._write(account, state, old)

    async def reset(self, account: ImapAccount, mailbox: str, device: str) -> int:
        """Forget everything ``device`` has hidden; returns the number of state copies removed."""
        try:
            await account.select(self.state_mailbox)
        except ImapCommandFailed:
            return 0
        old = await self._find(account, DeviceState(mailbox, device).key)
        await self.remove(account, old)
        return len(old)

    async def states(
        self, account: ImapAccount, mailbox: str
    ) -> tuple[list[DeviceState], list[int], list[UnreadableState]]:
        """Every state copy for ``mailbox``, the UIDs to remove once they are carried over
        (theirs, and those of our state messages nobody can read: the mailbox store would
        replace those at the device's next login), and what those unreadable ones are.
        Selects the state mailbox read-write; empty when there is none. Read a batch at a
        time, each body cut after MAX_STATE_BYTES + 1: memory stays bounded."""
        try:
            await account.select(self.state_mailbox)
        except ImapCommandFailed:
            return [], [], []
        found, done, unreadable = [], [], []
        uids = await self._find(account, STATE_KEY_PREFIX)
        for i in range(0, len(uids), MAX_COPIES):
            for uid, raw in (await self._bodies(account, uids[i : i + MAX_COPIES])).items():
                try:
                    state = DeviceState.parse(raw)
                except InvalidState as e:
                    done.append(uid)
                    key = header_key(raw)
                    # Without a well-formed key it is no device's state: no load reads it.
                    # With one it may be this mailbox's (the key is a hash: it cannot tell).
                    if key is not None:
                        unreadable.append(unreadable_state(raw, mailbox, key, str(e)))
                    continue
                if state.mailbox == mailbox:
                    found.append(state)
                    done.append(uid)
        return found, done, unreadable

    async def load_all(self, account: ImapAccount, mailbox: str) -> DeviceStates:
        """Every device's state for ``mailbox``, and the copies that cannot be read."""
        copies, _, unreadable = await self.states(account, mailbox)
        return DeviceStates(merge_by_device(mailbox, copies), _one_per_key(unreadable))


# --------------------------------------------------------------------------------------------
# METADATA


def new_writer_id() -> str:
    """Lower-case hex, sortable by time (nanoseconds), unique without coordination."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def writer_time(writer: str) -> float:
    try:
        return int(writer[:16], 16) / 1e9
    except ValueError:
        return 0.0


def chunk_entries(key: str, writer: str, data: bytes, size: int) -> dict[str, bytes]:
    """``data`` as entries ``STATE_ROOT/key/writer-i-n`` of at most ``size`` octets each."""
    pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    n = len(pieces)
    return {f"{STATE_ROOT}/{key}/{writer}-{i}-{n}": piece for i, piece in enumerate(pieces)}


@dataclass
class StoredCopies:
    """The copies of one key found in METADATA: whole ones joined, partial ones set aside."""

    whole: dict[str, bytes] = field(default_factory=dict)  # writer → the copy's bytes
    names: list[str] = field(default_factory=list)  # entries of whole and of stale partial copies
    partial: int = 0
    oversized: int = 0  # entries over the chunk size: no copy popgate wrote

    def newest(self) -> list[bytes]:
        """At most ``MAX_COPIES`` whole copies, the newest writers'."""
        return [self.whole[w] for w in sorted(self.whole)[-MAX_COPIES:]]


def assemble(values: dict[str, bytes], prefix: str, now: float) -> StoredCopies:
    """Group entries ``prefix/writer-i-n`` by writer; a copy counts when all ``n`` are there."""
    parts: dict[str, dict[int, bytes]] = {}
    counts: dict[str, int] = {}
    names: dict[str, list[str]] = {}
    for name, value in values.items():
        if not name.startswith(prefix + "/"):
            continue
        writer, _, rest = name[len(prefix) + 1 :].partition("-")
        index, _, count = rest.partition("-")
        if not (writer and index.isdigit() and count.isdigit()) or "/" in writer:
            continue
        i, n = int(index), int(count)
        if i >= n or counts.setdefault(writer, n) != n:
            continue
        parts.setdefault(writer, {})[i] = value
        names.setdefault(writer, []).append(name)
    found = StoredCopies()
    for writer, pieces in parts.items():
        if len(pieces) == counts[writer]:
            found.whole[writer] = b"".join(pieces[i] for i in range(counts[writer]))
            found.names += names[writer]
        else:
            found.partial += 1
            if now - writer_time(writer) > STALE_PARTIAL_SECONDS:
                found.names += names[writer]
    return found


@dataclass
class MetadataStore:
    """State in private METADATA entries of the served mailbox; carries the state mailbox over."""

    legacy: MailboxStore
    name: str = "metadata"
    chunk_size: int = CHUNK_SIZE

    async def marked(self, account: ImapAccount, mailbox: str) -> bool:
        """Whether our marker entry is on ``mailbox``: a gateway took METADATA for it."""
        found = await account.get_metadata(mailbox, [MARKER])
        return found.values.get(MARKER) == MARKER_VALUE

    async def refusal(self, account: ImapAccount, mailbox: str) -> str | None:
        """None when the server keeps our private entry on ``mailbox`` (read it, else try it);
        else the server's answer. Offering METADATA is not enough: Cyrus offers it but refuses
        entries it does not define unless ``annotation_allow_undefined`` is set."""
        try:
            if await self.marked(account, mailbox):
                return None
            # A state-shaped entry first: a Cyrus whose annotation_definitions name only some
            # of our entries takes the marker but refuses every state entry.
            await account.set_metadata(mailbox, {PROBE: b"1"})
            await account.set_metadata(mailbox, {MARKER: MARKER_VALUE, PROBE: None})
        except ImapCommandFailed as e:
            return str(e)
        return None

    async def usable(self, account: ImapAccount, mailbox: str, refusals: RecentRefusals) -> bool:
        """For ``auto``. After a refusal, only the marker is read until PROBE_AGAIN_AFTER:
        another gateway may have taken METADATA meanwhile (its state is then there)."""
        key = (account.user, mailbox)
        if key in refusals:
            try:
                return await self.marked(account, mailbox)
            except ImapCommandFailed:
                return False
        refused = await self.refusal(account, mailbox)
        if refused is not None:
            refusals.add(key)
            log.info(
                "METADATA not usable on %s (%s); using the state mailbox, asking again in %d s",
                mailbox,
                refused,
                PROBE_AGAIN_AFTER,
            )
        return refused is None

    async def _copies(self, account: ImapAccount, mailbox: str, key: str) -> StoredCopies:
        prefix = f"{STATE_ROOT}/{key}"
        found = await account.get_metadata(mailbox, [prefix], depth="1", max_size=self.chunk_size)
        copies = assemble(found.values, prefix, time.time())
        if found.long_entries:
            # [METADATA LONGENTRIES n]: n is the size of the largest value left out. None of
            # ours is that large: learn the names (values over 64 KiB are not kept) so the
            # next write removes them.
            log.warning("state entries of %s over %d octets ignored (the largest: %d octets)",
                        mailbox, self.chunk_size, found.long_entries)  # fmt: skip
            again = await account.get_metadata(mailbox, [prefix], depth="1")
            oversized = [n for n, v in again.values.items() if len(v) > self.chunk_size]
            names = [n for n in [*oversized, *again.streamed] if n.startswith(prefix)]
            copies.names += names
            copies.oversized = len(names)
        return copies

    async def _write(self, account: ImapAccount, state: DeviceState, remove: Sequence[str]) -> None:
        """One SETMETADATA: the new copy first, then the removal of what it replaces."""
        data = _state_message(state)
        _check_size(state, data)
        size = self.chunk_size
        while True:
            values: dict[str, bytes | None] = dict(
                chunk_entries(state.key, new_writer_id(), data, size)
            )
            values.update((name, None) for name in remove)
            try:
                await account.set_metadata(state.mailbox, values)
                return
            except ImapCommandFailed as e:
                code = e.status.code or ()
                if len(code) >= 3 and str(code[1]).upper() == "MAXSIZE":
                    limit = int(str(code[2])) if str(code[2]).isdigit() else 0
                    if MIN_CHUNK_SIZE <= limit < size:
                        size = limit  # the server said how much it takes: spread thinner
                        continue
                raise

    async def migrate(self, account: ImapAccount, mailbox: str) -> int:
        """Carry every state message for ``mailbox`` over from the state mailbox, then remove
        them (and the mailbox, once nothing is left in it). Returns the messages removed.

        Written to METADATA first, removed only afterwards: a failure in between leaves the
        state in both places, which the next read merges.
        """
        if await account.mailbox_messages(self.legacy.state_mailbox) is None:
            return 0
        copies, uids, _ = await self.legacy.states(account, mailbox)
        for state in merge_by_device(mailbox, copies):
            await self._write(account, state, ())
        if uids:
            await self.legacy.remove(account, uids)
        with contextlib.suppress(ImapCommandFailed):  # nothing selected if it could not be opened
            await account.unselect()
        if await account.mailbox_messages(self.legacy.state_mailbox) == 0:
            await account.delete_mailbox(self.legacy.state_mailbox)
            log.info("state mailbox %s carried over to METADATA and removed",
                     self.legacy.state_mailbox)  # fmt: skip
        return len(uids)

    async def _read(
        self, account: ImapAccount, state: DeviceState, uidvalidity: int = 0, uidnext: int = 0
    ) -> tuple[StoredCopies, list[str]]:
        copies = await self._copies(account, state.mailbox, state.key)
        problems = []
        if len(copies.whole) > MAX_COPIES:
            problems.append(f"{len(copies.whole)} copies, only the newest {MAX_COPIES} read")
        if copies.oversized:
            problems.append(f"{copies.oversized} entries over {self.chunk_size} octets")
        problems += merge_copies(state, copies.newest(), uidvalidity, uidnext)
        return copies, problems

    async def load(
        self,
        account: ImapAccount,
        mailbox: str,
        device: str,
        *,
        uidvalidity: int = 0,
        uidnext: int = 0,
    ) -> DeviceState:
        await self.migrate(account, mailbox)
        state = DeviceState(mailbox, device)
        copies, problems = await self._read(account, state, uidvalidity, uidnext)
        if problems:
            _report(state, problems, "state copies in METADATA")
            try:  # best effort, as in the mailbox store: the next write tries again
                await self._write(account, state, copies.names)
            except ImapCommandFailed as e:
                log.warning("device %r: state not rewritten: %s", state.device, e.status.text)
        return state

    async def save(
        self,
        account: ImapAccount,
        state: DeviceState,
        present: Sequence[IndexedMessage],
        newer_from: int | None = None,
    ) -> None:
        await self.migrate(account, state.mailbox)
        copies, problems = await self._read(account, state)
        if problems:
            _report(state, problems, "state copies in METADATA")
        state.prune(present, newer_from)
        await self._write(account, state, copies.names)

    async def reset(self, account: ImapAccount, mailbox: str, device: str) -> int:
        key = DeviceState(mailbox, device).key
        prefix = f"{STATE_ROOT}/{key}"
        found = await account.get_metadata(mailbox, [prefix], depth="1")
        names = [n for n in [*found.values, *found.streamed] if n.startswith(prefix + "/")]
        if names:
            await account.set_metadata(mailbox, dict.fromkeys(names))
        # Entries of no whole copy (partial, oversized) count as one: something was removed.
        copies = len(assemble(found.values, prefix, time.time()).whole) or int(bool(names))
        return copies + await self.legacy.reset(account, mailbox, device)

    async def load_all(self, account: ImapAccount, mailbox: str) -> DeviceStates:
        """Every device's state for ``mailbox``, also what still waits in the state mailbox,
        and the copies that cannot be read (each repaired when its device next logs in)."""
        found = await account.get_metadata(
            mailbox, [STATE_ROOT], depth="infinity", max_size=self.chunk_size
        )
        by_key: dict[str, dict[str, bytes]] = {}
        for name, value in found.values.items():
            key = _entry_key(name)
            if key:
                by_key.setdefault(key, {})[name] = value
        copies, unreadable = [], []
        if found.long_entries:
            # popgate writes no entry over chunk_size: one is a forged or broken copy. Learn
            # their names (values over 64 KiB are not kept) to say whose state it is.
            again = await account.get_metadata(mailbox, [STATE_ROOT], depth="infinity")
            names = [n for n, v in again.values.items() if len(v) > self.chunk_size]
            for key in sorted({k for k in map(_entry_key, [*names, *again.streamed]) if k}):
                reason = f"state entry over {self.chunk_size} octets"
                unreadable.append(UnreadableState(key, None, reason))
        for key, values in by_key.items():
            for raw in assemble(values, f"{STATE_ROOT}/{key}", time.time()).newest():
                try:
                    state = DeviceState.parse(raw)
                except InvalidState as e:
                    unreadable.append(unreadable_state(raw, mailbox, key, str(e)))
                    continue
                if state.mailbox == mailbox and state.key == key:
                    copies.append(state)
                else:
                    unreadable.append(UnreadableState(key, None, "state names another device"))
        legacy, _, unreadable_legacy = await self.legacy.states(account, mailbox)
        return DeviceStates(
            merge_by_device(mailbox, [*copies, *legacy]),
            _one_per_key([*unreadable, *unreadable_legacy]),
        )


def _entry_key(name: str) -> str | None:
    """The state key of an entry ``STATE_ROOT/key/writer-i-n``; None for others (the probe).
    Only a well-formed key can be a device's: no load reads any other."""
    if not name.startswith(STATE_ROOT + "/"):
        return None
    key, sep, _ = name[len(STATE_ROOT) + 1 :].partition("/")
    return key if sep and _WELL_FORMED_KEY.fullmatch(key) else None


_WELL_FORMED_KEY = re.compile(rf"{STATE_KEY_PREFIX}[0-9a-f]{{32}}")


def _one_per_key(unreadable: Sequence[UnreadableState]) -> list[UnreadableState]:
    """One report per state key (several copies may be broken), naming the device if any
    copy did."""
    by_key: dict[str, UnreadableState] = {}
    for u in unreadable:
        if u.key not in by_key or (by_key[u.key].device is None and u.device is not None):
            by_key[u.key] = u
    return sorted(by_key.values(), key=lambda u: (u.device is None, u.device or "", u.key))


# --------------------------------------------------------------------------------------------
# The module's face for the POP3 backend and the admin commands


def ask_ahead(account: ImapAccount, settings: Pop3Settings) -> Deferred[int | None] | None:
    """For a login that will read the device state: the first command of that read, sent now,
    so that it travels with the login's EXAMINE and index FETCH (a round trip less; with a
    distant upstream that is a good part of a poll). Only where the store is surely the state
    mailbox (no METADATA offered, or ``state_store = "mailbox"``): its STATUS. Never fails:
    an error leaves it to ``load`` to ask again, and to report."""
    if not _surely_mailbox_store(account, settings):
        return None
    store = MailboxStore(settings.state_mailbox)

    async def count() -> int | None:
        try:
            return await store.count(account)
        except ImapError:
            return None

    return Deferred.fromCoroutine(count())


async def load(
    account: ImapAccount,
    settings: Pop3Settings,
    mailbox: str,
    device: str,
    *,
    uidvalidity: int = 0,
    uidnext: int = 0,
    ahead: Deferred[int | None] | None = None,
) -> DeviceState:
    """The device's state; empty when it has none yet. May change the selected mailbox
    (``account.selected`` says which is open afterwards).

    ``uidvalidity`` and ``uidnext`` of ``mailbox`` (if known) let a state that names UIDs not
    given out yet be caught and repaired. ``ahead``: what ``ask_ahead`` sent.
    """
    store = await open_store(account, settings, mailbox)
    if isinstance(store, MailboxStore):
        counted = await ahead if ahead is not None else None
        return await store.load(
            account, mailbox, device, uidvalidity=uidvalidity, uidnext=uidnext, counted=counted
        )
    return await store.load(account, mailbox, device, uidvalidity=uidvalidity, uidnext=uidnext)


async def save(
    account: ImapAccount,
    settings: Pop3Settings,
    state: DeviceState,
    present: Sequence[IndexedMessage],
    newer_from: int | None = None,
) -> None:
    """Merge with what is stored now and write the result.

    Entries for messages not in ``present`` (gone from the mailbox) are dropped on the way,
    except those ``DeviceState.prune`` keeps for ``newer_from``.
    """
    store = await open_store(account, settings, state.mailbox)
    await store.save(account, state, present, newer_from)


async def reset(account: ImapAccount, settings: Pop3Settings, mailbox: str, device: str) -> int:
    """Forget everything ``device`` has hidden; returns the number of state copies removed."""
    store = await open_store(account, settings, mailbox)
    return await store.reset(account, mailbox, device)


async def load_all(account: ImapAccount, settings: Pop3Settings, mailbox: str) -> DeviceStates:
    """Every device's state for ``mailbox`` and the copies that cannot be read (for retention
    and ``popgate device list``)."""
    store = await open_store(account, settings, mailbox)
    return await store.load_all(account, mailbox)
