"""The POP3 view of a mailbox for one session: message numbers, sizes, UIDLs and pending deletes.

Built once at login from an upstream snapshot, so message numbers stay stable for the whole
session whatever IMAP clients do meanwhile (RFC 1939 section 5). Deletes are only recorded here;
they reach the upstream mailbox in the UPDATE state, through a delete policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple


class MessageInfo(NamedTuple):
    """One message as POP sees it; ``uid`` addresses it upstream in the selected mailbox.

    A named tuple for the same reason as IndexedMessage: one per message per login."""

    uid: int
    size: int
    uidl: str


class MaildropError(Exception):
    """A message number the client may not use; ``str(self)`` is the text for ``-ERR``."""


class NoSuchMessage(MaildropError):
    def __init__(self, number: int | str) -> None:
        super().__init__(f"no such message: {number}")


class MessageDeleted(MaildropError):
    def __init__(self, number: int) -> None:
        super().__init__(f"message {number} already deleted")


class Maildrop:
    __slots__ = ("_deleted", "_messages", "_octets")

    def __init__(self, messages: Sequence[MessageInfo]) -> None:
        self._messages = tuple(messages)
        self._deleted: set[int] = set()
        self._octets = sum(m.size for m in self._messages)

    def __len__(self) -> int:
        return len(self._messages)

    def stat(self) -> tuple[int, int]:
        """Count and total octets of the messages not marked deleted."""
        return len(self._messages) - len(self._deleted), self._octets

    def message(self, number: int) -> MessageInfo:
        if not 1 <= number <= len(self._messages):
            raise NoSuchMessage(number)
        if number in self._deleted:
            raise MessageDeleted(number)
        return self._messages[number - 1]

    def listing(self) -> Iterator[tuple[int, MessageInfo]]:
        deleted = self._deleted
        for number, info in enumerate(self._messages, 1):
            if number not in deleted:
                yield number, info

    def following(self, number: int, count: int = 1) -> list[MessageInfo]:
        """The first ``count`` messages after ``number`` not marked deleted: what a sequential
        download asks for next."""
        found: list[MessageInfo] = []
        for n in range(number + 1, len(self._messages) + 1):
            if len(found) == count:
                break
            if n not in self._deleted:
                found.append(self._messages[n - 1])
        return found

    def delete(self, number: int) -> None:
        info = self.message(number)
        self._deleted.add(number)
        self._octets -= info.size

    def reset(self) -> None:
        self._deleted.clear()
        self._octets = sum(m.size for m in self._messages)

    def deleted(self) -> list[MessageInfo]:
        """The messages marked deleted, in message-number order."""
        return [self._messages[n - 1] for n in sorted(self._deleted)]
