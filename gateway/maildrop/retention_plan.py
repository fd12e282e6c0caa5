"""Which POP-deleted messages retention removes, and why: pure decisions, no I/O.

Only messages some POP device has deleted (keyword ``$POPDeleted``) are ever candidates; the I/O
layer guarantees that by searching for the keyword, and this module never sees anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class Candidate:
    uid: int
    size: int
    arrived: datetime  # IMAP INTERNALDATE


@dataclass(frozen=True, slots=True)
class Quota:
    used_kib: int
    limit_kib: int

    @property
    def percent(self) -> float:
        return 100.0 * self.used_kib / self.limit_kib if self.limit_kib else 0.0


@dataclass(frozen=True, slots=True)
class Removal:
    uid: int
    size: int
    arrived: datetime
    reason: str


def plan_retention(
    candidates: Sequence[Candidate],
    *,
    now: datetime,
    delete_after_days: int,
    quota: Quota | None,
    quota_high_percent: int,
    quota_target_percent: int,
) -> list[Removal]:
    """The removals, oldest first: by age, then (if usage is too high) by quota."""
    oldest_first = sorted(candidates, key=lambda c: (c.arrived, c.uid))
    removals: list[Removal] = []
    chosen: set[int] = set()
    if delete_after_days > 0:
        cutoff = now - timedelta(days=delete_after_days)
        for c in oldest_first:
            if c.arrived < cutoff:
                age = (now - c.arrived).days
                reason = f"deleted by POP, arrived {age} days ago (> {delete_after_days})"
                removals.append(Removal(c.uid, c.size, c.arrived, reason))
                chosen.add(c.uid)
    if quota is not None and quota.limit_kib > 0 and quota_high_percent > 0:
        if quota.percent > quota_high_percent:
            used = quota.used_kib * 1024 - sum(r.size for r in removals)
            target = quota.limit_kib * 1024 * quota_target_percent / 100
            for c in oldest_first:
                if used < target:
                    break
                if c.uid in chosen:
                    continue
                reason = (
                    f"deleted by POP; quota at {quota.percent:.0f}% > {quota_high_percent}%, "
                    f"oldest first until under {quota_target_percent}%"
                )
                removals.append(Removal(c.uid, c.size, c.arrived, reason))
                chosen.add(c.uid)
                used -= c.size
    return removals
