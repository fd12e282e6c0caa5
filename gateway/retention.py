"""Retention: removes old POP-deleted messages per ``[retention]``, never anything else.

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
from gateway.maildrop.retention_plan import Candidate, Quota, Removal, plan_retention
from gateway.maildrop.views import POP_DELETED
from gateway.metrics import DISCARD, Metrics
from gateway.oauth.errors import OAuthError
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

    def lines(self) -> list[str]:
        where = f" to {self.target}" if self.target else ""
        verb = "removed" if self.applied else "would remove"
        if self.removals:
            head = f"{self.user}: {verb} {len(self.removals)} messages ({self.action}{where})"
        else:
            head = f"{self.user}: nothing to remove ({self.action})"
        if self.quota is not None:
            head += f"; quota {self.quota.used_kib} of {self.quota.limit_kib} KiB"
        rows = [
            f"  UID {r.uid}  {r.size} octets  arrived {r.arrived:%Y-%m-%d}  {r.reason}"
            for r in self.removals
        ]
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
    report = RetentionReport(user, settings.action)
    await account.open_mailbox(mailbox, readonly=dry_run)
    uids = await account.search_keyword(POP_DELETED)
    if settings.quota_high_percent:
        usage = await account.storage_quota(mailbox)
        report.quota = Quota(*usage) if usage else None
    if not uids:
        return report
    candidates = [Candidate(*row) for row in await account.fetch_arrivals(uids)]
    report.removals = plan_retention(
        candidates,
        now=now or datetime.now(UTC),
        delete_after_days=settings.delete_after_days,
        quota=report.quota,
        quota_high_percent=settings.quota_high_percent,
        quota_target_percent=settings.quota_target_percent,
    )
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
        if report.applied:
            self.metrics.retention_removed_messages.inc(len(report.removals))
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
