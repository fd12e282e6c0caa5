"""Which messages retention removes, and why: pure decisions, no I/O, no clock of its own.

Two kinds of message are ever candidates: those some POP device deleted (keyword
``$POPDeleted``, ``Candidate.deleted``), after ``delete_after_days`` or under quota pressure;
and, with ``after_all_devices_days``, those every active device has downloaded. With
``wait_for_devices`` a deleted one also waits until every *active* device (seen within
``device_inactive_days``) has downloaded or deleted it. A user with no device state at all
(IMAP clients only) has no device to wait for, and nothing counts as "downloaded by all".
A user one of whose device states cannot be read (forged, corrupt, too large) loses nothing:
that device may lack anything, so the plan removes nothing (``Plan.withheld`` says what it
would have) until the state is readable again or the device is forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gateway.maildrop.device_state import DeviceState


@dataclass(frozen=True, slots=True)
class Candidate:
    uid: int
    size: int
    arrived: datetime  # IMAP INTERNALDATE
    deleted: bool = True  # carries $POPDeleted


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What retention knows of one device: whether it is active, and what it no longer needs."""

    device: str
    state: DeviceState
    last_seen: datetime | None  # None: unknown (state from before popgate recorded it)
    active: bool

    def covers(self, uid: int, uidvalidity: int) -> bool:
        return self.state.covers(uid, uidvalidity)


def device_views(
    states: Sequence[DeviceState], *, now: datetime, inactive_days: int
) -> list[DeviceView]:
    """Active means seen within ``inactive_days`` of ``now``. A device whose last login is
    unknown (its state predates the record) counts as active: it holds mail back until it
    logs in again or the operator retires it (``popgate device forget``)."""
    cutoff = now - timedelta(days=inactive_days)
    views = []
    for state in states:
        seen = datetime.fromtimestamp(state.last_seen, UTC) if state.last_seen else None
        views.append(DeviceView(state.device, state, seen, seen is None or seen >= cutoff))
    return views


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


@dataclass(frozen=True, slots=True)
class Held:
    """A message a rule would remove, kept because these active devices still need it."""

    uid: int
    size: int
    arrived: datetime
    rule: str  # "age" or "quota"
    devices: tuple[str, ...]


@dataclass
class Plan:
    removals: list[Removal] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    # Quota above quota_high_percent and still above the target after every removal allowed:
    # what is left is needed by some device (or nothing was POP-deleted at all).
    quota_unrelieved: bool = False
    # What the rules would remove, kept because some device's state cannot be read.
    withheld: list[Removal] = field(default_factory=list)


def waiting_devices(
    uid: int, devices: Sequence[DeviceView] | None, uidvalidity: int
) -> tuple[str, ...]:
    """The active devices that have neither downloaded nor deleted ``uid``."""
    if not devices:
        return ()
    return tuple(d.device for d in devices if d.active and not d.covers(uid, uidvalidity))


def plan_retention(
    candidates: Sequence[Candidate],
    *,
    now: datetime,
    delete_after_days: int,
    quota: Quota | None,
    quota_high_percent: int,
    quota_target_percent: int,
    devices: Sequence[DeviceView] | None = None,
    uidvalidity: int = 0,
    wait_for_devices: bool = False,
    after_all_devices_days: int = 0,
    unreadable: int = 0,
) -> Plan:
    """The removals, oldest first: by age, by "downloaded by all", then (if usage is too
    high) by quota; and what a rule would take but a device still needs. ``unreadable``
    (device states that could not be read) makes every removal a withheld one."""
    oldest_first = sorted(candidates, key=lambda c: (c.arrived, c.uid))
    plan = Plan()
    chosen: set[int] = set()
    held: set[int] = set()

    def waits(c: Candidate) -> tuple[str, ...]:
        return waiting_devices(c.uid, devices, uidvalidity) if wait_for_devices else ()

    def take(c: Candidate, reason: str) -> None:
        plan.removals.append(Removal(c.uid, c.size, c.arrived, reason))
        chosen.add(c.uid)

    def hold(c: Candidate, rule: str, waiting: tuple[str, ...]) -> None:
        if c.uid not in held:
            plan.held.append(Held(c.uid, c.size, c.arrived, rule, waiting))
            held.add(c.uid)

    if delete_after_days > 0:
        cutoff = now - timedelta(days=delete_after_days)
        for c in oldest_first:
            if c.deleted and c.arrived < cutoff:
                waiting = waits(c)
                if waiting:
                    hold(c, "age", waiting)
                    continue
                age = (now - c.arrived).days
                take(c, f"deleted by POP, arrived {age} days ago (> {delete_after_days})")
    active = [d for d in devices or () if d.active]
    if after_all_devices_days > 0 and active:
        cutoff = now - timedelta(days=after_all_devices_days)
        for c in oldest_first:
            if c.uid in chosen or c.arrived >= cutoff:
                continue
            if all(d.covers(c.uid, uidvalidity) for d in active):
                age = (now - c.arrived).days
                take(
                    c,
                    f"downloaded by every active device ({len(active)}), arrived {age} days "
                    f"ago (> {after_all_devices_days})",
                )
    if quota is not None and quota.limit_kib > 0 and quota_high_percent > 0:
        if quota.percent > quota_high_percent:
            used = quota.used_kib * 1024 - sum(r.size for r in plan.removals)
            target = quota.limit_kib * 1024 * quota_target_percent / 100
            for c in oldest_first:
                if used < target:
                    break
                if c.uid in chosen or not c.deleted:
                    continue
                waiting = waits(c)
                if waiting:
                    hold(c, "quota", waiting)
                    continue
                take(
                    c,
                    f"deleted by POP; quota at {quota.percent:.0f}% > {quota_high_percent}%, "
                    f"oldest first until under {quota_target_percent}%",
                )
                used -= c.size
            plan.quota_unrelieved = used >= target
    plan.removals.sort(key=lambda r: (r.arrived, r.uid))
    if unreadable:
        plan.withheld, plan.removals = plan.removals, []
    return plan


def held_back_counts(
    messages: Sequence[Candidate],
    devices: Sequence[DeviceView],
    uidvalidity: int,
    *,
    after_all_devices_days: int = 0,
) -> dict[str, int]:
    """Per active device, the messages it alone keeps in the mailbox whatever their age:
    deleted by some device (or, with ``after_all_devices_days``, downloaded by every other
    active device) but not yet downloaded nor deleted by it. Inactive devices hold none."""
    counts = {d.device: 0 for d in devices}
    active = [d for d in devices if d.active]
    for m in messages:
        waiting = [d for d in active if not d.covers(m.uid, uidvalidity)]
        if not waiting:
            continue
        others_done = after_all_devices_days > 0 and len(waiting) < len(active)
        if m.deleted or (others_done and len(waiting) == 1):
            for d in waiting:
                counts[d.device] += 1
    return counts
