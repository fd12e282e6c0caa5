"""Reads and writes per-device state messages in the user's state mailbox upstream.

One small message per (mailbox, device), found by a header token (``STATE_HEADER``). Writing is
append-new-then-remove-old, so a crash in between leaves two copies that the next read merges;
the state is never absent. See gateway/maildrop/views.py for what the state means.

Anyone with the user's password can write into the state mailbox, so reading is bounded: at most
``MAX_COPIES`` copies, each fetched only up to ``MAX_STATE_BYTES`` (a partial FETCH, so the
server sends no more). A copy that cannot be used is ignored and the state rewritten without
it, with one log line: a broken state costs a device at most a re-download, never a lockout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gateway.maildrop.uidset import format_uid_set
from gateway.maildrop.views import (
    MAX_STATE_BYTES,
    STATE_HEADER,
    STATE_KEY_PREFIX,
    DeviceState,
    IndexedMessage,
    InvalidState,
)
from gateway.proto.imap import Atom, encode_mailbox
from gateway.upstream.account import ImapAccount, search_result
from gateway.upstream.imap_client import BodyCollector, ImapCommandFailed

log = logging.getLogger("popgate.state")

# Normally one copy, two after an interrupted write; more only by hand or by forgery. The
# newest are read, the others removed at the next write.
MAX_COPIES = 8


async def _find(account: ImapAccount, key: str) -> list[int]:
    """UIDs of the state messages whose header holds ``key`` (a substring match)."""
    response = await account.proto.command(
        Atom("UID"), Atom("SEARCH"), Atom("HEADER"), STATE_HEADER, key
    )
    return search_result(response)


async def _bodies(account: ImapAccount, uids: list[int]) -> list[bytes]:
    """The bodies of the newest ``MAX_COPIES`` of ``uids``, each cut after MAX_STATE_BYTES + 1
    bytes (more than that is invalid anyway, and the cut is what tells)."""
    uids = sorted(uids)[-MAX_COPIES:]
    if not uids:
        return []
    sink = BodyCollector()
    await account.proto.command(
        Atom("UID"),
        Atom("FETCH"),
        Atom(format_uid_set(uids)),
        [Atom(f"BODY.PEEK[]<0.{MAX_STATE_BYTES + 1}>")],
        sink=sink,
    )
    return sink.bodies


async def _read(
    account: ImapAccount,
    state: DeviceState,
    uids: list[int],
    uidvalidity: int = 0,
    uidnext: int = 0,
) -> list[str]:
    """Merge every usable copy into ``state``; the reasons the others were not (fully) usable.

    With the mailbox's ``uidvalidity`` and ``uidnext``, UIDs it has not given out yet are
    dropped (and reported): they would hide future messages.
    """
    problems = []
    if len(uids) > MAX_COPIES:
        problems.append(f"{len(uids)} copies, only the newest {MAX_COPIES} read")
    for raw in await _bodies(account, uids):
        try:
            found = DeviceState.from_message(raw, state.mailbox, state.device)
        except InvalidState as e:
            problems.append(str(e))
            continue
        if found.drop_unborn(uidvalidity, uidnext):
            problems.append("state hides UIDs not given out yet")
        state.merge(found)
    return problems


def _report(state: DeviceState, problems: list[str]) -> None:
    # Names the device (a login name, not a secret) and never quotes the stored content.
    log.warning(
        "device %r: ignored %d unusable state message(s) in %s (%s); rewriting its state",
        state.device,
        len(problems),
        state.mailbox,
        "; ".join(sorted(set(problems))),
    )


async def _remove(account: ImapAccount, uids: list[int]) -> None:
    if uids and not await account.expunge(uids):
        # No UIDPLUS: only the gateway's own state messages live here, all marked for removal.
        await account.proto.command(Atom("EXPUNGE"))


async def load(
    account: ImapAccount,
    state_mailbox: str,
    mailbox: str,
    device: str,
    *,
    uidvalidity: int = 0,
    uidnext: int = 0,
) -> DeviceState:
    """The device's state; empty when it has none yet. Leaves ``state_mailbox`` selected.

    ``uidvalidity`` and ``uidnext`` of ``mailbox`` (if known) let a state that names UIDs not
    given out yet be caught and repaired.
    """
    state = DeviceState(mailbox, device)
    try:
        await account.examine(state_mailbox)
    except ImapCommandFailed:
        return state  # no state mailbox: nothing hidden anywhere yet
    found = await _find(account, state.key)
    problems = await _read(account, state, found, uidvalidity, uidnext)
    if problems:
        _report(state, problems)
        await _repair(account, state_mailbox, state, found)
    return state


async def _repair(
    account: ImapAccount, state_mailbox: str, state: DeviceState, old: list[int]
) -> None:
    """Replace every stored copy with the state merged from the usable ones.

    Best effort: if the server refuses (no rights, over quota) the device still logs in with
    what could be read, and the next write tries again.
    """
    try:
        await account.examine(state_mailbox, readonly=False)
        await _write(account, state_mailbox, state, old)
    except ImapCommandFailed as e:
        log.warning("device %r: state not rewritten: %s", state.device, e.status.text)


async def _write(
    account: ImapAccount, state_mailbox: str, state: DeviceState, old: list[int]
) -> None:
    message = state.to_message()
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
    await account.proto.command(
        Atom("APPEND"), encode_mailbox(state_mailbox), [Atom("\\Seen")], message
    )
    await _remove(account, old)


async def save(
    account: ImapAccount,
    state_mailbox: str,
    state: DeviceState,
    present: Sequence[IndexedMessage],
    newer_from: int | None = None,
) -> None:
    """Merge with what is stored now, write the result, then remove the older copies.

    Entries for messages not in ``present`` (gone from the mailbox) are dropped on the way,
    except those ``DeviceState.prune`` keeps for ``newer_from``.
    """
    await account.create_mailbox(state_mailbox)
    await account.examine(state_mailbox, readonly=False)
    old = await _find(account, state.key)
    problems = await _read(account, state, old)
    if problems:
        _report(state, problems)
    state.prune(present, newer_from)
    await _write(account, state_mailbox, state, old)


async def reset(account: ImapAccount, state_mailbox: str, mailbox: str, device: str) -> int:
    """Forget everything ``device`` has hidden; returns the number of state copies removed."""
    try:
        await account.examine(state_mailbox, readonly=False)
    except ImapCommandFailed:
        return 0
    old = await _find(account, DeviceState(mailbox, device).key)
    await _remove(account, old)
    return len(old)


async def load_all(account: ImapAccount, state_mailbox: str, mailbox: str) -> list[DeviceState]:
    """Every device's state for ``mailbox`` (for ``popgate device list``)."""
    try:
        await account.examine(state_mailbox)
    except ImapCommandFailed:
        return []
    states: dict[str, DeviceState] = {}
    uids = await _find(account, STATE_KEY_PREFIX)
    for i in range(0, len(uids), MAX_COPIES):  # a batch at a time: memory stays bounded
        for raw in await _bodies(account, uids[i : i + MAX_COPIES]):
            try:
                found = DeviceState.parse(raw)
            except InvalidState:
                continue  # repaired when that device next logs in
            if found.mailbox == mailbox:
                states.setdefault(found.device, DeviceState(mailbox, found.device)).merge(found)
    return sorted(states.values(), key=lambda s: s.device)
