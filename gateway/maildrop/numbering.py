"""The POP3 view of a mailbox for one session: message numbers, sizes, UIDLs and pending deletes.

Built once at login from an upstream snapshot, so message numbers stay stable for the whole
session whatever IMAP clients do meanwhile (RFC 1939 section 5). Deletes are only recorded here;
they reach the upstream mailbox in the UPDATE state, through a delete policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

Column = Literal["size", "uidl"]


class MessageInfo(NamedTuple):
    """One message as POP sees it; ``uid`` addresses it upstream in the selected mailbox."""

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


class Messages:
    """The messages a maildrop starts with, in message-number order, held as columns.

    Immutable, so every session that sees the same messages (polls of an unchanged mailbox,
    devices that hid nothing) shares one, with its listings rendered once. A 10,000-message
    poll used to build 10,000 tuples and 10,000 listing lines per login (docs/benchmark.md).
    """

    __slots__ = ("_listings", "octets", "sizes", "uidls", "uids")

    def __init__(self, uids: Sequence[int], sizes: Sequence[int], uidls: Sequence[str]) -> None:
        if not len(uids) == len(sizes) == len(uidls):
            raise ValueError("columns of different lengths")
        self.uids = tuple(uids)
        self.sizes = tuple(sizes)
        self.uidls = tuple(uidls)
        self.octets = sum(self.sizes)
        self._listings: dict[Column, str] = {}

    @classmethod
    def of(cls, messages: Sequence[MessageInfo]) -> Messages:
        return cls(
            [m.uid for m in messages], [m.size for m in messages], [m.uidl for m in messages]
        )

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: int) -> MessageInfo:
        return MessageInfo(self.uids[i], self.sizes[i], self.uidls[i])

    def column(self, column: Column) -> Sequence[int] | Sequence[str]:
        return self.sizes if column == "size" else self.uidls

    def listing(self, column: Column) -> str:
        """Every message's ``number value`` line (RFC 1939 scan listing or unique-id listing),
        CRLF-terminated, rendered at most once."""
        text = self._listings.get(column)
        if text is None:
            text = "".join([f"{n} {v}\r\n" for n, v in enumerate(self.column(column), 1)])
            self._listings[column] = text
        return text


class Maildrop:
    __slots__ = ("_deleted", "_messages", "_octets")

    def __init__(self, messages: Sequence[MessageInfo] | Messages) -> None:
        self._messages = messages if isinstance(messages, Messages) else Messages.of(messages)
        self._deleted: set[int] = set()
        self._octets = self._messages.octets

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
        for number in range(1, len(self._messages) + 1):
            if number not in deleted:
                yield number, self._messages[number - 1]

    def listing_lines(self, column: Column) -> str:
        """The ``number value`` lines of the messages not marked deleted, CRLF-terminated:
        the body of a LIST or UIDL answer. Shared with other sessions until a DELE."""
        if not self._deleted:
            return self._messages.listing(column)
        deleted = self._deleted
        values = self._messages.column(column)
        return "".join([f"{n} {v}\r\n" for n, v in enumerate(values, 1) if n not in deleted])

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
        self._octets = self._messages.octets

    def deleted(self) -> list[MessageInfo]:
        """The messages marked deleted, in message-number order."""
        return [self._messages[n - 1] for n in sorted(self._deleted)]
