"""What a POP delete does upstream, per ``[pop3] on_delete`` (see the contract's table).

A policy is plain data: the I/O layer carries it out at QUIT. Keeping it declarative means the
table in docs/ and the code can be checked against each other in a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.maildrop.views import POP_DELETED


@dataclass(frozen=True, slots=True)
class DeletePolicy:
    name: str
    hide_for_device: bool  # record the messages in the device's hidden set
    add_flags: tuple[str, ...]  # flags stored on the deleted messages
    move_to_archive: bool = False
    move_to_trash: bool = False
    expunge: bool = False

    @property
    def removes_from_mailbox(self) -> bool:
        """Whether other devices and IMAP clients stop seeing the message in the mailbox."""
        return self.move_to_archive or self.move_to_trash or self.expunge


POLICIES: dict[str, DeletePolicy] = {
    "hide": DeletePolicy("hide", hide_for_device=True, add_flags=(POP_DELETED,)),
    "seen": DeletePolicy("seen", hide_for_device=True, add_flags=(POP_DELETED, "\\Seen")),
}


class UnsupportedPolicy(ValueError):
    pass


def policy_for(name: str) -> DeletePolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise UnsupportedPolicy(f'on_delete = "{name}" is not implemented yet') from None
