"""Pure decoders of the IMAP responses popgate reads: a ``Response`` in, typed values out.

One function per kind of answer, so the facade (``gateway.upstream.account``) never walks
tokens itself. Malformed or missing parts are skipped rather than guessed at: a decoder returns
what the server clearly said.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, TypeVar

from gateway.proto.imap import (
    Data,
    FetchBatch,
    Status,
    StreamedLiteral,
    Token,
    decode_mailbox,
    fetch_items,
)
from gateway.proto.imap_connection import Response

# --- EXAMINE / SELECT ----------------------------------------------------------------------------


class OpenedMailbox(NamedTuple):
    uidvalidity: int
    exists: int
    keywords_allowed: bool  # PERMANENTFLAGS has \* : the client may create its own keywords
    uidnext: int
    highestmodseq: int  # 0: the server reports none (no CONDSTORE)


def opened_mailbox(response: Response) -> OpenedMailbox:
    """What an EXAMINE or SELECT answer says about the mailbox."""
    uidvalidity, exists, keywords, uidnext, modseq = 0, 0, False, 0, 0
    for item in response.untagged:
        if isinstance(item, Data):
            if len(item.tokens) >= 2 and str(item.tokens[1]).upper() == "EXISTS":
                exists = int(str(item.tokens[0]))
        elif not isinstance(item, Status) or not item.code or len(item.code) < 2:
            continue
        elif item.code_name == "UIDVALIDITY":
            uidvalidity = int(str(item.code[1]))
        elif item.code_name == "UIDNEXT":
            uidnext = int(str(item.code[1]))
        elif item.code_name == "HIGHESTMODSEQ":
            modseq = int(str(item.code[1]))
        elif item.code_name == "PERMANENTFLAGS":
            flags = item.code[1]
            keywords = isinstance(flags, list) and "\\*" in flags
    return OpenedMailbox(uidvalidity, exists, keywords, uidnext, modseq)


# --- LIST (with SPECIAL-USE) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    name: str
    attributes: frozenset[str]  # lower-cased, e.g. "\\trash", "\\hasnochildren"


def listed_mailboxes(response: Response) -> list[MailboxEntry]:
    """Every ``* LIST (attributes) delimiter name``; attributes lower-cased (Cyrus sends
    ``\\sent``), names decoded from modified UTF-7."""
    entries = []
    for item in response.untagged:
        if not isinstance(item, Data) or len(item.tokens) < 4:
            continue
        if str(item.tokens[0]).upper() != "LIST" or not isinstance(item.tokens[1], list):
            continue
        raw = item.tokens[3]
        name = raw if isinstance(raw, bytes) else str(raw).encode()
        attributes = frozenset(str(a).lower() for a in item.tokens[1])
        entries.append(MailboxEntry(decode_mailbox(name), attributes))
    return entries


# --- STATUS, QUOTA ------------------------------------------------------------------------------


def status_messages(response: Response) -> int | None:
    """MESSAGES from ``* STATUS name (MESSAGES n)``, if the answer has it."""
    for item in response.untagged:
        if isinstance(item, Data) and len(item.tokens) >= 3:
            if str(item.tokens[0]).upper() == "STATUS" and isinstance(item.tokens[2], list):
                attrs = item.tokens[2]
                for i in range(0, len(attrs) - 1, 2):
                    if str(attrs[i]).upper() == "MESSAGES" and str(attrs[i + 1]).isdigit():
                        return int(str(attrs[i + 1]))
    return None


def storage_quota(response: Response) -> tuple[int, int] | None:
    """(used, limit) in KiB of the STORAGE resource in a GETQUOTAROOT answer, if any."""
    for item in response.untagged:
        if not isinstance(item, Data) or len(item.tokens) < 3:
            continue
        if str(item.tokens[0]).upper() != "QUOTA" or not isinstance(item.tokens[2], list):
            continue
        resources = item.tokens[2]
        for i in range(0, len(resources) - 2, 3):
            if str(resources[i]).upper() == "STORAGE":
                return int(str(resources[i + 1])), int(str(resources[i + 2]))
    return None


# --- SEARCH / ESEARCH -----------------------------------------------------------------------


def search_result(response: Response) -> list[int]:
    """The numbers of ``* SEARCH n n ...`` and of ``* ESEARCH ... ALL set``, sorted."""
    found: list[int] = []
    for item in response.untagged:
        if not isinstance(item, Data) or not item.tokens:
            continue
        kind = str(item.tokens[0]).upper()
        if kind == "SEARCH":
            found.extend(int(str(t)) for t in item.tokens[1:] if str(t).isdigit())
        elif kind == "ESEARCH":
            tokens = item.tokens
            for i in range(1, len(tokens) - 1):
                if str(tokens[i]).upper() == "ALL":
                    found.extend(_sequence_set(str(tokens[i + 1])))
    return sorted(found)


def _sequence_set(text: str) -> Iterator[int]:
    """``1:3,7`` → 1, 2, 3, 7 (no ``*``: servers send numbers in results)."""
    for part in text.split(","):
        low, _, high = part.partition(":")
        if low.isdigit() and (not high or high.isdigit()):
            a, b = int(low), int(high or low)
            yield from range(min(a, b), max(a, b) + 1)


# --- FETCH --------------------------------------------------------------------------------------


def fetched(response: Response) -> Iterator[dict[str, Token]]:
    """The items of each FETCH line of ``response`` (keys upper-cased), in the order sent."""
    for item in response.untagged:
        if isinstance(item, Data) and len(item.tokens) >= 3:
            if str(item.tokens[1]).upper() == "FETCH":
                yield fetch_items(item.tokens)[1]


T = TypeVar("T")
# Made from UID, RFC822.SIZE, FLAGS and EMAILID (None if not sent).
RowFactory = Callable[[int, int, frozenset[str], str | None], T]


def index_rows(response: Response, make: RowFactory[T]) -> list[T]:
    """``make(uid, size, flags, emailid)`` for each message of a ``UID FETCH 1:* (UID
    RFC822.SIZE FLAGS [EMAILID])``, in the order the server sent them. (The caller's type is
    built straight away: a mailbox index is thousands of rows.)"""
    rows: list[T] = []
    # Few distinct flag combinations occur in a mailbox: share one frozenset for each.
    flag_sets: dict[bytes, frozenset[str]] = {}
    for item in response.untagged:
        if isinstance(item, FetchBatch):
            for _, uid, size, raw_flags, emailid in item.rows:
                flags = flag_sets.get(raw_flags)
                if flags is None:
                    flags = frozenset(raw_flags.decode("utf-8", "replace").split())
                    flag_sets[raw_flags] = flags
                rows.append(make(int(uid), int(size), flags, emailid.decode() or None))
        elif isinstance(item, Data) and len(item.tokens) >= 3:
            row = _index_row(item)
            if row is not None:
                rows.append(make(*row))
    return rows


def _index_row(item: Data) -> tuple[int, int, frozenset[str], str | None] | None:
    """The slow path for FETCH lines the parser's fast path did not take (other item order)."""
    if str(item.tokens[1]).upper() != "FETCH":
        return None
    _, fields = fetch_items(item.tokens)
    uid, size = fields.get("UID"), fields.get("RFC822.SIZE")
    if uid is None or size is None:
        return None
    flags = fields.get("FLAGS")
    return (
        int(str(uid)),
        int(str(size)),
        frozenset(str(f) for f in flags) if isinstance(flags, list) else frozenset(),
        _first_str(fields.get("EMAILID")),
    )


def _first_str(token: Token) -> str | None:
    if isinstance(token, list):
        token = token[0] if token else None
    if isinstance(token, bytes):
        return token.decode("ascii", "replace")
    return str(token) if token is not None else None


def arrivals(response: Response) -> list[tuple[int, int, datetime]]:
    """(UID, RFC822.SIZE, INTERNALDATE) of each FETCH line that has all three, sorted."""
    result = []
    for fields in fetched(response):
        uid, size, date = fields.get("UID"), fields.get("RFC822.SIZE"), fields.get("INTERNALDATE")
        if uid is None or size is None or not isinstance(date, bytes):
            continue
        result.append((int(str(uid)), int(str(size)), parse_internaldate(date)))
    return sorted(result)


def sizes_and_dates(response: Response) -> Iterator[tuple[int, int, bytes]]:
    """(UID, RFC822.SIZE, INTERNALDATE as sent) of each FETCH line that has all three."""
    for fields in fetched(response):
        uid, size, date = fields.get("UID"), fields.get("RFC822.SIZE"), fields.get("INTERNALDATE")
        if uid is None or size is None or not isinstance(date, bytes | str):
            continue
        yield int(str(uid)), int(str(size)), date if isinstance(date, bytes) else date.encode()


def sizes(response: Response) -> Iterator[tuple[int, int]]:
    """(UID, RFC822.SIZE) of each FETCH line that has both."""
    for fields in fetched(response):
        uid, size = fields.get("UID"), fields.get("RFC822.SIZE")
        if uid is not None and size is not None and str(size).isdigit():
            yield int(str(uid)), int(str(size))


def parse_internaldate(raw: bytes) -> datetime:
    """``17-Jul-1996 02:44:25 -0700`` → an aware datetime (RFC 3501 date-time)."""
    return datetime.strptime(raw.decode("ascii").strip(), "%d-%b-%Y %H:%M:%S %z")


# --- APPENDUID / COPYUID (RFC 4315) -------------------------------------------------------------


def appended_uid(status: Status) -> str | None:
    """The UID the server gave an APPENDed message (``[APPENDUID validity uid]``), as sent."""
    code = status.code
    if status.code_name == "APPENDUID" and code and len(code) >= 3:
        uid = code[2]
        return uid.decode() if isinstance(uid, bytes) else str(uid)
    return None


def copied_uids(status: Status) -> tuple[int, str, str] | None:
    """``[COPYUID validity source-set target-set]`` of a COPY or MOVE: the target mailbox's
    UIDVALIDITY and the two UID sets, as sent."""
    code = status.code
    if status.code_name == "COPYUID" and code and len(code) >= 4 and str(code[1]).isdigit():
        return int(str(code[1])), str(code[2]), str(code[3])
    return None


# --- METADATA (RFC 5464) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metadata:
    """What GETMETADATA returned: entry name (lower-cased) → value; NIL entries are left out."""

    values: dict[str, bytes]
    long_entries: int = 0  # [METADATA LONGENTRIES n]: the largest value left out over MAXSIZE
    # Entries whose values came as literals too large to keep (over the parser's stream
    # threshold, 64 KiB): named, their bytes dropped unread.
    streamed: list[str] = field(default_factory=list)


def metadata(response: Response) -> Metadata:
    values: dict[str, bytes] = {}
    streamed: list[str] = []
    for item in response.untagged:
        if not isinstance(item, Data) or len(item.tokens) < 3:
            continue
        if str(item.tokens[0]).upper() != "METADATA" or not isinstance(item.tokens[2], list):
            continue
        pairs = item.tokens[2]
        for i in range(0, len(pairs) - 1, 2):
            name, value = pairs[i], pairs[i + 1]
            if not isinstance(name, (str, bytes)):
                continue
            text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
            if isinstance(value, bytes):
                values[text.lower()] = value
            elif isinstance(value, StreamedLiteral):
                streamed.append(text.lower())  # too large to keep: its bytes were dropped
    long_entries = 0
    status = response.status
    if status.code_name == "METADATA" and status.code and len(status.code) >= 3:
        if str(status.code[1]).upper() == "LONGENTRIES" and str(status.code[2]).isdigit():
            long_entries = int(str(status.code[2]))
    return Metadata(values, long_entries, streamed)
