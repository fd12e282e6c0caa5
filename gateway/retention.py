"""Retention: removes old POP-deleted messages per ``[retention]`` (and, with
``after_all_devices_days``, messages every active device downloaded), never anything else.
With ``wait_for_devices`` it first reads every device's state and keeps what an active device
still needs (gateway/maildrop/retention_plan.py decides). If any of those states cannot be read
it removes nothing for that user, and warns (``RetentionReport.unreadable``).

It runs after a user's QUIT on the session's own IMAP connection (after the ``+OK`` has gone
out, bounded by ``time_limit``), and, with a master identity configured, as a periodic sweep
over the users this gateway has seen. ``popgate retention --dry-run`` shows the same plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from gateway.config import Config
from gateway.maildrop.device_state import UnreadableState
from gateway.maildrop.retention_plan import (
    Candidate,
    DeviceView,
    Held,
    Quota,
    Removal,
    device_views,
    plan_retention,
)
from gateway.maildrop.uidl import POP_DELETED
from gateway.metrics import DISCARD, Metrics
from gateway.oauth.errors import OAuthError
from gateway.upstream import device_store
from gateway.upstream.account import ImapAccount
from gateway.upstream.folders import resolve_folder
from gateway.upstream.imap_client import ImapError
from gateway.upstream.logins import UpstreamLogins

log = logging.getLogger("popgate.retention")

# UIDs per MOVE/EXPUNGE command: keeps command lines short on huge mailboxes.
BATCH = 500
# A user's mailbox is looked at after QUIT at most this often (seconds) unless the session
# deleted something.
RERUN_AFTER = 3600.0
# Users not seen for this long drop out of the sweep.
FORGET_AFTER = 30 * 86400.0


@dataclass
class RetentionReport:
    user: str
    action: str
    target: str | None = None
    removals: list[Removal] = field(default_factory=list)
    applied: bool = False
    quota: Quota | None = None
    held: list[Held] = field(default_factory=list)
    devices: list[DeviceView] = field(default_factory=list)
    quota_unrelieved: bool = False
    # Device states that could not be read: nothing is removed while there is one.
    unreadable: list[UnreadableState] = field(default_factory=list)
    withheld: list[Removal] = field(default_factory=list)

    @property
    def quota_blocked(self) -> bool:
        """Over quota, and what would relieve it is still needed by some active device."""
        return self.quota_unrelieved and any(h.rule == "quota" for h in self.held)

    def lines(self) -> list[str]:
        where = f" to {self.target}" if self.target else ""
        verb = "removed" if self.applied else "would remove"
        if self.removals:
            head = f"{self.user}: {verb} {len(self.removals)} messages ({self.action}{where})"
        elif self.unreadable:
            head = (
                f"{self.user}: nothing to remove ({self.action}): a device state cannot be "
                f"read; {len(self.withheld)} messages would otherwise go"
            )
        else:
            head = f"{self.user}: nothing to remove ({self.action})"
        if self.quota is not None:
            head += f"; quota {self.quota.used_kib} of {self.quota.limit_kib} KiB"
        rows = [
            f"  UID {r.uid}  {r.size} octets  arrived {r.arrived:%Y-%m-%d}  {r.reason}"
            for r in self.removals
        ]
        rows += [
            f"{self.user}: WARNING state of device {u.label} unreadable ({u.reason}); "
            f"retention removes nothing for {self.user} until that device logs in again or "
            f"`popgate device forget {self.user} {u.device or 'DEVICE'}`"
            for u in self.unreadable
        ]
        rows += [
            f"  UID {r.uid}  {r.size} octets  arrived {r.arrived:%Y-%m-%d}  kept (a device "
            f"state is unreadable); otherwise: {r.reason}"
            for r in self.withheld
        ]
        if self.held:
            rows.append(f"{self.user}: kept {len(self.held)} messages active devices still need")
            rows += [
                f"  UID {h.uid}  {h.size} octets  arrived {h.arrived:%Y-%m-%d}  "
                f"held back by {', '.join(h.devices)} (not downloaded or deleted there)"
                for h in self.held
            ]
        if self.quota_blocked:
            rows.append(
                f"{self.user}: WARNING quota above quota_high_percent and every remaining "
                f"candidate is still needed by an active device; nothing more removed"
            )
        inactive = [d.device for d in self.devices if not d.active]
        if inactive:
            rows.append(f"{self.user}: inactive devices (hold nothing back): {', '.join(inactive)}")
        return [head, *rows]


async def run_retention(
    account: ImapAccount,
    config: Config,
    user: str,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    settings = config.retention
    mailbox = config.pop3.mailbox
    now = now or datetime.now(UTC)
    report = RetentionReport(user, settings.action)
    devices: list[DeviceView] | None = None
    if settings.wait_for_devices or settings.after_all_devices_days:
        # First: the state store may select other mailboxes. A device whose state another
        # session writes meanwhile only holds back more than it needs to.
        stored = await device_store.load_all(account, config.pop3, mailbox)
        report.unreadable = stored.unreadable
        devices = report.devices = device_views(
            stored.states, now=now, inactive_days=settings.device_inactive_days
        )
    info = await account.open_mailbox(mailbox, readonly=dry_run)
    uids = await account.search_keyword(POP_DELETED)
    if settings.quota_high_percent:
        usage = await account.storage_quota(mailbox)
        report.quota = Quota(*usage) if usage else None
    if settings.after_all_devices_days and any(d.active for d in devices or ()):
        deleted = set(uids)
        rows = await account.fetch_arrivals_all()
        candidates = [Candidate(*row, deleted=row[0] in deleted) for row in rows]
    elif uids:
        candidates = [Candidate(*row) for row in await account.fetch_arrivals(uids)]
    else:
        return report
    plan = plan_retention(
        candidates,
        now=now,
        delete_after_days=settings.delete_after_days,
        quota=report.quota,
        quota_high_percent=settings.quota_high_percent,
        quota_target_percent=settings.quota_target_percent,
        devices=devices,
        uidvalidity=info.uidvalidity,
        wait_for_devices=settings.wait_for_devices,
        after_all_devices_days=settings.after_all_devices_days,
        unreadable=len(report.unreadable),
    )
    report.removals, report.held = plan.removals, plan.held
    report.withheld = plan.withheld
    report.quota_unrelieved = plan.quota_unrelieved
    if not report.removals:
        return report
    if settings.action != "expunge":
        report.target = await resolve_folder(
            account, settings.action, config.pop3, create=not dry_run
        )
    if dry_run:
        return report
    chosen = [r.uid for r in report.removals]
    for start in range(0, len(chosen), BATCH):
        batch = chosen[start : start + BATCH]
        if report.target is None:
            await account.expunge(batch)
        else:
            await account.move(batch, report.target)
    report.applied = True
    return report


class RetentionService:
    """Decides when retention runs and keeps it bounded in time."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        metrics: Metrics = DISCARD,
        logins: UpstreamLogins | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.metrics = metrics
        self.logins = logins or UpstreamLogins(reactor, config.upstream.imap)
        self._last_run: dict[str, float] = {}
        self._seen: dict[str, float] = {}
        self._loop: LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        return self.config.retention.enabled

    async def after_quit(self, account: ImapAccount, user: str, deleted_any: bool) -> None:
        """Run on a session's connection after its QUIT was answered; never raises."""
        if not self.enabled:
            return
        now = self.reactor.seconds()
        self._seen[user] = now
        if not deleted_any and now - self._last_run.get(user, -RERUN_AFTER) < RERUN_AFTER:
            return
        self._last_run[user] = now
        await self._bounded(account, user)

    async def _bounded(self, account: ImapAccount, user: str) -> None:
        limit = self.config.retention.time_limit
        d = Deferred.fromCoroutine(run_retention(account, self.config, user))
        d.addTimeout(limit, self.reactor)
        try:
            report = await d
        except ImapError as e:
            log.warning("retention failed: %s", e, extra={"user": user})
            return
        except Exception as e:  # a timeout, or a bug: the next run tries again
            log.warning("retention incomplete: %r", e, extra={"user": user})
            account.abort()
            return
        if report.unreadable:
            self.metrics.retention_state_unreadable.inc()
            # Names the user and the state key (and the device when verified), never content.
            log.warning(
                "retention removed nothing: state of device %s unreadable (%s); run "
                "`popgate device forget` for it, or wait for its next login (%d messages kept)",
                ", ".join(u.label for u in report.unreadable),
                "; ".join(sorted({u.reason for u in report.unreadable})),
                len(report.withheld),
                extra={"user": user},
            )
        if report.applied:
            self.metrics.retention_removed_messages.inc(len(report.removals))
        if report.held:
            self.metrics.retention_held_back_messages.inc(len(report.held))
        if report.quota_blocked:
            self.metrics.retention_quota_blocked.inc()
            log.warning(
                "retention: quota at %.0f%% and every remaining candidate (%d messages) is "
                "still needed by an active device (%s); nothing more removed",
                report.quota.percent if report.quota else 0.0,
                sum(1 for h in report.held if h.rule == "quota"),
                ", ".join(sorted({d for h in report.held for d in h.devices})),
                extra={"user": user},
            )
        if report.removals:
            log.info(
                "retention %s %d messages (%s)",
                "removed" if report.applied else "planned",
                len(report.removals),
                report.action,
                extra={"user": user},
            )

    def start(self) -> None:
        """Periodic sweeps, when they are possible (master identity or OAuth) and wanted."""
        interval = self.config.retention.sweep_interval
        if not self.enabled or not interval or not self.logins.unattended:
            return
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.sweep()))
        self._loop.clock = self.reactor
        self._loop.start(interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def sweep(self) -> None:
        now = self.reactor.seconds()
        for user, seen in list(self._seen.items()):
            if now - seen > FORGET_AFTER:
                del self._seen[user]
                continue
            try:
                account = await self.logins.without_device(user)
            except (ImapError, OAuthError) as e:
                log.warning("retention sweep cannot log in: %s", e, extra={"user": user})
                continue
            self._last_run[user] = now
            await self._bounded(account, user)
            await account.logout()
