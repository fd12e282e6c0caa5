"""Reads and writes per-device state messages in the user's state mailbox upstream.

One small message per (mailbox, device), found by a header token (``STATE_HEADER``). Writing is
append-new-then-remove-old, so a crash in between leaves two copies that the next read merges;
the state is never absent. See gateway/maildrop/views.py for what the state means.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.maildrop.uidset import format_uid_set
from gateway.maildrop.views import STATE_HEADER, STATE_KEY_PREFIX, DeviceState, IndexedMessage
from gateway.proto.imap import Atom, encode_mailbox
from gateway.upstream.account import ImapAccount, search_result
from gateway.upstream.imap_client import BodyCollector, ImapCommandFailed


async def _find(account: ImapAccount, key: str) -> list[int]:
    """UIDs of the state messages whose header holds ``key`` (a substring match)."""
    response = await account.proto.command(
        Atom("UID"), Atom("SEARCH"), Atom("HEADER"), STATE_HEADER, key
    )
    return search_result(response)


async def _bodies(account: ImapAccount, uids: list[int]) -> list[bytes]:
    if not uids:
        return []
    sink = BodyCollector()
    await account.proto.command(
        Atom("UID"), Atom("FETCH"), Atom(format_uid_set(uids)), [Atom("BODY.PEEK[]")], sink=sink
    )
    return sink.bodies


async def _read(account: ImapAccount, state: DeviceState, uids: list[int]) -> None:
    for raw in await _bodies(account, uids):
        found = DeviceState.from_message(raw, state.mailbox, state.device)
        if found is not None:
            state.merge(found)


async def _remove(account: ImapAccount, uids: list[int]) -> None:
    if uids and not await account.expunge(uids):
        # No UIDPLUS: only the gateway's own state messages live here, all marked for removal.
        await account.proto.command(Atom("EXPUNGE"))


async def load(account: ImapAccount, state_mailbox: str, mailbox: str, device: str) -> DeviceState:
    """The device's state; empty when it has none yet. Leaves ``state_mailbox`` selected."""
    state = DeviceState(mailbox, device)
    try:
        await account.examine(state_mailbox)
    except ImapCommandFailed:
        return state  # no state mailbox: nothing hidden anywhere yet
    await _read(account, state, await _find(account, state.key))
    return state


async def save(
    account: ImapAccount,
    state_mailbox: str,
    state: DeviceState,
    present: Sequence[IndexedMessage],
) -> None:
    """Merge with what is stored now, write the result, then remove the older copies.

    Entries for messages not in ``present`` (gone from the mailbox) are dropped on the way.
    """
    await account.create_mailbox(state_mailbox)
    await account.examine(state_mailbox, readonly=False)
    old = await _find(account, state.key)
    await _read(account, state, old)
    state.prune(present)
    await account.proto.command(
        Atom("APPEND"), encode_mailbox(state_mailbox), [Atom("\\Seen")], state.to_message()
    )
    await _remove(account, old)


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
    for raw in await _bodies(account, await _find(account, STATE_KEY_PREFIX)):
        found = DeviceState.parse(raw)
        if found is not None and found.mailbox == mailbox:
            states.setdefault(found.device, DeviceState(mailbox, found.device)).merge(found)
    return sorted(states.values(), key=lambda s: s.device)
