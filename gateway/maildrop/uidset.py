"""IMAP sequence sets of UIDs (RFC 3501 ``sequence-set``), written and read compactly."""

from __future__ import annotations

from collections.abc import Iterable

# A state message or command never needs more; a larger range is corrupt input, not a mailbox.
MAX_RANGE = 10_000_000


def format_uid_set(uids: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1:3,7"``: short commands and state for long runs of UIDs."""
    ranges: list[str] = []
    start = prev = -2
    for uid in sorted(set(uids)):
        if uid == prev + 1:
            prev = uid
            continue
        if start >= 0:
            ranges.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = uid
    if start >= 0:
        ranges.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(ranges)


def parse_uid_set(text: str) -> set[int]:
    """The inverse of :func:`format_uid_set`; raises ValueError on anything else."""
    uids: set[int] = set()
    for part in filter(None, text.split(",")):
        low, sep, high = part.partition(":")
        a = int(low)
        b = int(high) if sep else a
        if a > b:
            a, b = b, a
        if a < 1 or b - a > MAX_RANGE:
            raise ValueError(f"implausible UID range {part!r}")
        uids.update(range(a, b + 1))
    return uids
