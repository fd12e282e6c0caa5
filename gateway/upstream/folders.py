"""Finds (and creates) the mailboxes deleted messages go to: the archive and Trash."""

from __future__ import annotations

from gateway.config import Pop3Settings
from gateway.maildrop.policy import Folder
from gateway.upstream.account import ImapAccount

CONVENTIONAL_TRASH = "Trash"


async def resolve_folder(
    account: ImapAccount, folder: Folder, settings: Pop3Settings, *, create: bool = True
) -> str:
    """The mailbox name for ``folder``, created when missing (unless ``create`` is false).

    Trash is the SPECIAL-USE ``\\Trash`` mailbox (RFC 6154) unless ``trash_folder`` names one,
    else the conventional ``Trash``; the archive is ``archive_folder``.
    """
    if folder == "archive":
        name = settings.archive_folder
    elif settings.trash_folder != "auto":
        name = settings.trash_folder
    else:
        found = await account.find_special_use("\\Trash")
        if found is not None:
            return found
        name = CONVENTIONAL_TRASH
    if create:
        await account.create_mailbox(name)
    return name
