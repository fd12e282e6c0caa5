"""IMAP sequence sets of UIDs (RFC 3501 ``sequence-set``), written and read compactly.

A set read from outside (a stored device state anyone with the user's password can write) is
kept as ranges and never expanded: ``1:4294967295`` costs two integers, not four billion.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

# RFC 3501: a UID is a non-zero 32-bit number (nz-number).
MAX_UID = 2**32 - 1


class UidSet:
    """A set of UIDs held as sorted, disjoint, non-adjacent closed ranges.

    Memory and work follow the number of ranges, never the number of UIDs they cover; only
    ``__iter__`` and ``intersection`` with explicit UIDs touch single UIDs.
    """

    __slots__ = ("_ends", "_starts")

    def __init__(self, uids: Iterable[int] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        start = prev = -2
        for uid in sorted(set(uids)):
            if uid == prev + 1:
                prev = uid
                continue
            if start >= 0:
                self._starts.append(start)
                self._ends.append(prev)
            start = prev = uid
        if start >= 0:
            self._starts.append(start)
            self._ends.append(prev)

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]]) -> UidSet:
        """Normalise ``(low, high)`` pairs (any order, overlapping or not): O(r log r)."""
        result = cls()
        starts, ends = result._starts, result._ends
        for low, high in sorted(ranges):
            if starts and low <= ends[-1] + 1:
                if high > ends[-1]:
                    ends[-1] = high
            else:
                starts.append(low)
                ends.append(high)
        return result

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        i = bisect_right(self._starts, uid) - 1
        return i >= 0 and uid <= self._ends[i]

    def __len__(self) -> int:
        return sum(self._ends) - sum(self._starts) + len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[int]:
        for low, high in zip(self._starts, self._ends, strict=True):
            yield from range(low, high + 1)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UidSet):
            return self._starts == other._starts and self._ends == other._ends
        if isinstance(other, (set, frozenset)):
            return len(other) == len(self) and all(uid in self for uid in other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable in spirit, like set

    def __repr__(self) -> str:
        return f"UidSet({format_uid_set(self)!r})"

    def __or__(self, other: UidSet) -> UidSet:
        return UidSet.from_ranges(self.ranges() + other.ranges())

    def intersection(self, uids: Iterable[int]) -> UidSet:
        """Those of ``uids`` in this set: work follows ``uids``, whatever this set covers."""
        return UidSet(uid for uid in uids if uid in self)

    def below(self, limit: int) -> UidSet:
        """The UIDs less than ``limit``: O(number of ranges)."""
        kept = [(a, min(b, limit - 1)) for a, b in self.ranges() if a < limit]
        return UidSet.from_ranges(kept)

    def format(self) -> str:
        return ",".join(
            str(low) if low == high else f"{low}:{high}"
            for low, high in zip(self._starts, self._ends, strict=True)
        )


def format_uid_set(uids: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1:3,7"``: short commands and state for long runs of UIDs."""
    return (uids if isinstance(uids, UidSet) else UidSet(uids)).format()


def parse_uid_set(text: str, max_ranges: int | None = None) -> UidSet:
    """The inverse of :func:`format_uid_set`; raises ValueError on anything else.

    Numbers must be RFC 3501 UIDs (1 to 2**32-1, digits only); ``max_ranges`` bounds the work
    before any of it is done.
    """
    if not text:
        return UidSet()
    parts = text.split(",", max_ranges if max_ranges is not None else -1)
    if max_ranges is not None and len(parts) > max_ranges:
        raise ValueError(f"more than {max_ranges} UID ranges")
    ranges = []
    for part in parts:
        low, sep, high = part.partition(":")
        a, b = _uid(low), (_uid(high) if sep else None)
        ranges.append((a, a) if b is None else (min(a, b), max(a, b)))
    return UidSet.from_ranges(ranges)


def _uid(text: str) -> int:
    # int() would take "+1", " 1", "1_0" and any Unicode digit; a UID is ASCII digits only.
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        raise ValueError("not a UID")
    uid = int(text)
    if not 0 < uid <= MAX_UID:
        raise ValueError("UID out of range")
    return uid
