"""Reads and writes per-device state messages in the user's state mailbox upstream.

One small message per (mailbox, device), found by a header token (``STATE_HEADER``). Writing is
append-new-then-remove-old, so a crash in between leaves two copies that the next read merges;
the state is never absent. See gateway/maildrop/views.py for what the state means.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.maildrop.uidset import format_uid_set
from gateway.maildrop.views import STATE_HEADER, DeviceState, IndexedMessage
from gateway.proto.imap import Atom, Data
from gateway.upstream.account import ImapAccount
from gateway.upstream.imap_client import ImapCommandFailed


class _Collect:
    """A body sink that keeps small bodies (state messages) whole."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._parts: list[bytes] = []

    def literal_begin(self, size: int) -> None:
        self._parts = []

    def literal_data(self, data: bytes) -> None:
        self._parts.append(data)

    def literal_end(self) -> None:
        self.bodies.append(b"".join(self._parts))


async def _find(account: ImapAccount, key: str) -> list[int]:
    response = await account.proto.command(
        Atom("UID"), Atom("SEARCH"), Atom("HEADER"), STATE_HEADER, key
    )
    uids: list[int] = []
    for item in response.untagged:
        if isinstance(item, Data) and item.tokens and str(item.tokens[0]).upper() == "SEARCH":
            uids.extend(int(str(t)) for t in item.tokens[1:] if str(t).isdigit())
    return uids


async def _read(account: ImapAccount, state: DeviceState, uids: list[int]) -> None:
    if not uids:
        return
    sink = _Collect()
    await account.proto.command(
        Atom("UID"), Atom("FETCH"), Atom(format_uid_set(uids)), [Atom("BODY.PEEK[]")], sink=sink
    )
    for raw in sink.bodies:
        found = DeviceState.from_message(raw, state.mailbox, state.device)
        if found is not None:
            state.merge(found)


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
    try:
        await account.proto.command(Atom("CREATE"), state_mailbox)
    except ImapCommandFailed:
        pass  # ALREADYEXISTS, or a real problem that SELECT below reports
    await account.examine(state_mailbox, readonly=False)
    old = await _find(account, state.key)
    await _read(account, state, old)
    state.prune(present)
    await account.proto.command(Atom("APPEND"), state_mailbox, [Atom("\\Seen")], state.to_message())
    if not old:
        return
    uid_set = Atom(format_uid_set(old))
    await account.proto.command(
        Atom("UID"), Atom("STORE"), uid_set, Atom("+FLAGS.SILENT"), [Atom("\\Deleted")]
    )
    if account.proto.has("UIDPLUS"):
        await account.proto.command(Atom("UID"), Atom("EXPUNGE"), uid_set)
    else:
        # Only the gateway's own state messages live here, all marked for removal anyway.
        await account.proto.command(Atom("EXPUNGE"))
