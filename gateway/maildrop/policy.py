"""What a POP delete does upstream, per ``[pop3] on_delete`` (see the contract's table).

A policy is plain data: the I/O layer carries it out at QUIT. Keeping it declarative means the
table in docs/ and the code can be checked against each other in a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.maildrop.uidl import POP_DELETED

Folder = Literal["archive", "trash"]


@dataclass(frozen=True, slots=True)
class DeletePolicy:
    name: str
    hide_for_device: bool  # record the messages in the device's hidden set
    add_flags: tuple[str, ...]  # flags stored on the deleted messages first
    move_to: Folder | None = None
    expunge: bool = False

    @property
    def removes_from_mailbox(self) -> bool:
        """Whether other devices and IMAP clients stop seeing the message in the mailbox."""
        return self.move_to is not None or self.expunge


POLICIES: dict[str, DeletePolicy] = {
    "hide": DeletePolicy("hide", hide_for_device=True, add_flags=(POP_DELETED,)),
    "seen": DeletePolicy("seen", hide_for_device=True, add_flags=(POP_DELETED, "\\Seen")),
    # The keyword travels with the moved message: IMAP users can tell POP deletes apart.
    "archive": DeletePolicy("archive", False, (POP_DELETED,), move_to="archive"),
    "trash": DeletePolicy("trash", False, (POP_DELETED,), move_to="trash"),
    "expunge": DeletePolicy("expunge", False, (), expunge=True),
}


def policy_for(name: str) -> DeletePolicy:
    return POLICIES[name]


def expire_capability(
    delete_after_days: int, quota_high_percent: int, after_all_devices_days: int = 0
) -> str:
    """The RFC 2449 EXPIRE capability: the minimum days a message stays on the server.

    Only retention removes messages without the device's own DELE: those some POP device
    deleted, after ``delete_after_days`` or at any time when quota-driven, and those every
    active device downloaded, after ``after_all_devices_days``. ``wait_for_devices`` changes
    nothing here: it only keeps messages longer, and a device that stays away longer than
    ``device_inactive_days`` is not waited for, so the shortest rule is what a device can rely
    on.
    """
    if quota_high_percent:
        return "EXPIRE 0"
    days = [d for d in (delete_after_days, after_all_devices_days) if d > 0]
    if days:
        return f"EXPIRE {min(days)}"
    return "EXPIRE NEVER"
