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
        add_start, add_end = starts.append, ends.append
        end = -2
        for low, high in sorted(ranges):
            if low <= end + 1:
                if high > end:
                    ends[-1] = end = high
            else:
                add_start(low)
                add_end(high)
                end = high
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


# What a UID set may consist of; with int() refusing empty parts this is the whole syntax check
# (int() alone would also take "+1", " 1", "1_0" and any Unicode digit).
_NOT_UID_SET = str.maketrans("", "", "0123456789,:")


def parse_uid_set(text: str, max_ranges: int | None = None) -> UidSet:
    """The inverse of :func:`format_uid_set`; raises ValueError on anything else.

    Numbers must be RFC 3501 UIDs (1 to 2**32-1); ``max_ranges`` bounds the work before any
    of it is done. The common shapes are converted by C loops (a state of single UIDs is the
    most ranges per byte a forger can send).
    """
    if not text:
        return UidSet()
    if max_ranges is not None and text.count(",") >= max_ranges:
        raise ValueError(f"more than {max_ranges} UID ranges")
    if not text.isascii() or text.translate(_NOT_UID_SET):
        raise ValueError("not a UID set")
    parts = text.split(",")
    if ":" not in text:
        firsts = lasts = list(map(int, parts))  # int("") refuses "1,,2"
    else:
        firsts, lasts = [], []
        for part in parts:
            a, sep, b = part.partition(":")
            first = int(a)
            last = int(b) if sep else first  # int("2:3") refuses "1:2:3"
            if first > last:
                first, last = last, first
            firsts.append(first)
            lasts.append(last)
    if min(firsts) < 1 or max(lasts) > MAX_UID:
        raise ValueError("UID out of range")
    return UidSet.from_ranges(zip(firsts, lasts, strict=True))
