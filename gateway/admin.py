"""Operator commands that act on one user's mailbox through the master identity (with
``[upstream.imap] auth = "oauth2"``: the user's stored OAuth grant).

``popgate device list|reset|forget`` and ``popgate retention``. Each opens one IMAP connection
as the user (SASL PLAIN with the master identity, as the contract's ``master_user``), does its
work and prints a plain-text report; errors come back as ``AdminError`` with a message for
stderr.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from gateway.config import Config
from gateway.maildrop.retention_plan import Candidate, device_views, held_back_counts
from gateway.maildrop.uidl import POP_DELETED
from gateway.oauth.errors import OAuthError
from gateway.retention import run_retention
from gateway.upstream import device_store
from gateway.upstream.account import ImapAccount, LoginRejected, UpstreamUnavailable
from gateway.upstream.imap_client import ImapError
from gateway.upstream.logins import upstream_logins

T = TypeVar("T")


class AdminError(Exception):
    pass


async def _as_user(
    reactor: Any, config: Config, user: str, work: Callable[[ImapAccount], Awaitable[T]]
) -> T:
    oauth = config.upstream.imap.auth == "oauth2"
    if not oauth and not config.upstream.imap.master_user:
        raise AdminError(
            "this command needs a master identity: set [upstream.imap] master_user and "
            "master_password (a Dovecot master user or a Cyrus proxy admin)"
        )
    try:
        # With OAuth the user's stored grant, as the retention sweeps use it.
        account = await upstream_logins(reactor, config).without_device(user)
    except LoginRejected as e:
        raise AdminError(f"{'OAuth' if oauth else 'master'} login for {user} refused: {e}") from e
    except (UpstreamUnavailable, OAuthError) as e:
        raise AdminError(str(e)) from e
    try:
        return await work(account)
    except ImapError as e:
        raise AdminError(f"IMAP error: {e}") from e
    finally:
        await account.logout()


async def device_list(
    reactor: Any, config: Config, user: str, now: datetime | None = None
) -> list[str]:
    """One line per device: last login, downloaded / hidden / held-back counts, status.

    Counts are of messages still in the mailbox; "held back" is what the device alone keeps
    there (deleted by another device, or downloaded by every other active device with
    ``after_all_devices_days``, and not yet downloaded nor deleted by it). A device whose
    state cannot be read gets a line saying so: retention removes nothing while it is there.
    """
    settings = config.retention
    mailbox = config.pop3.mailbox

    async def work(account: ImapAccount) -> list[str]:
        stored = await device_store.load_all(account, config.pop3, mailbox)
        states = stored.states
        if not states and not stored.unreadable:
            return [f"{user}: no POP device has state in {mailbox} (none holds mail back)"]
        when = now or datetime.now(UTC)
        views = device_views(states, now=when, inactive_days=settings.device_inactive_days)
        info = await account.examine(mailbox)
        deleted = set(await account.search_keyword(POP_DELETED))
        present = [
            Candidate(*row, deleted=row[0] in deleted) for row in await account.fetch_arrivals_all()
        ]
        held = held_back_counts(
            present,
            views,
            info.uidvalidity,
            after_all_devices_days=settings.after_all_devices_days,
        )
        if not settings.wait_for_devices and not settings.after_all_devices_days:
            held = dict.fromkeys(held, 0)  # retention waits for no device
        rows = [("DEVICE", "LAST LOGIN (UTC)", "DOWNLOADED", "HIDDEN", "HELD BACK", "STATUS")]
        for v in views:
            same = v.state.uidvalidity == info.uidvalidity
            downloaded = sum(1 for m in present if same and m.uid in v.state.downloaded)
            hidden = sum(1 for m in present if same and m.uid in v.state.uids)
            if not same:
                hidden = len(v.state.emailids)
            seen = f"{v.last_seen:%Y-%m-%d %H:%M}" if v.last_seen else "unknown"
            if v.active:
                status = "active"
            else:
                status = f"inactive (no login for {settings.device_inactive_days}+ days)"
            rows.append((v.device, seen, str(downloaded), str(hidden), str(held[v.device]), status))
        tracked = settings.wait_for_devices or settings.after_all_devices_days
        for u in stored.unreadable:
            status = f"STATE UNREADABLE ({u.reason}; state {u.key})"
            if tracked and settings.enabled:
                status += f": retention removes nothing for {user} until it logs in again or "
                status += f"`popgate device forget {user} {u.device or 'DEVICE'}`"
            rows.append((u.device or "?", "unknown", "-", "-", "all" if tracked else "0", status))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:5])) + "  " + r[5]
            for r in rows
        ]
        lines.append(f"{user}: {len(present)} messages in {mailbox}")
        return lines

    return await _as_user(reactor, config, user, work)


async def device_forget(reactor: Any, config: Config, user: str, device: str) -> list[str]:
    """Retire a device (a stolen phone): its state goes, it no longer holds mail back. If it
    logs in again it is a new device that downloads everything still in the mailbox."""

    async def work(account: ImapAccount) -> list[str]:
        removed = await device_store.reset(account, config.pop3, config.pop3.mailbox, device)
        if not removed:
            return [f"{user}#{device}: no such device (it has no state in {config.pop3.mailbox})"]
        return [f"{user}#{device}: forgotten; it no longer holds any message back"]

    return await _as_user(reactor, config, user, work)


async def device_reset(reactor: Any, config: Config, user: str, device: str) -> list[str]:
    async def work(account: ImapAccount) -> list[str]:
        removed = await device_store.reset(account, config.pop3, config.pop3.mailbox, device)
        if not removed:
            return [f"{user}#{device}: nothing to reset (the device has no state)"]
        return [
            f"{user}#{device}: reset; the device will see every message still in "
            f"{config.pop3.mailbox} at its next login"
        ]

    return await _as_user(reactor, config, user, work)


async def retention(
    reactor: Any, config: Config, user: str, dry_run: bool, now: datetime | None = None
) -> list[str]:
    async def work(account: ImapAccount) -> list[str]:
        report = await run_retention(account, config, user, now=now, dry_run=dry_run)
        lines = report.lines()
        if not config.retention.enabled:
            lines.insert(
                0,
                "retention is off (delete_after_days, quota_high_percent and "
                "after_all_devices_days are 0)",
            )
        return lines

    return await _as_user(reactor, config, user, work)


def run(command: Callable[[Any], Awaitable[list[str]]]) -> tuple[int, list[str]]:
    """Run ``command(reactor)`` to completion on a fresh reactor; (exit status, lines)."""
    from twisted.internet.task import react

    from gateway.app import install_reactor

    install_reactor()
    result: dict[str, Any] = {}

    async def main(reactor: Any) -> None:
        try:
            result["lines"] = await command(reactor)
            result["status"] = 0
        except AdminError as e:
            result["lines"] = [f"popgate: {e}"]
            result["status"] = 1

    try:
        react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    except SystemExit:
        pass
    return result.get("status", 1), result.get("lines", [])
