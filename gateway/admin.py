"""Operator commands that act on one user's mailbox through the master identity (with
``[upstream.imap] auth = "oauth2"``: the user's stored OAuth grant).

``popgate device list|reset`` and ``popgate retention``. Each opens one IMAP connection as the
user (SASL PLAIN with the master identity, as the contract's ``master_user``), does its work and
prints a plain-text report; errors come back as ``AdminError`` with a message for stderr.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from gateway.config import Config
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


async def device_list(reactor: Any, config: Config, user: str) -> list[str]:
    async def work(account: ImapAccount) -> list[str]:
        states = await device_store.load_all(account, config.pop3, config.pop3.mailbox)
        if not states:
            return [f"{user}: no device has hidden any message in {config.pop3.mailbox}"]
        return [f"{s.device}\t{len(s.emailids or s.uids)} messages hidden" for s in states]

    return await _as_user(reactor, config, user, work)


async def device_reset(reactor: Any, config: Config, user: str, device: str) -> list[str]:
    async def work(account: ImapAccount) -> list[str]:
        removed = await device_store.reset(account, config.pop3, config.pop3.mailbox, device)
        if not removed:
            return [f"{user}#{device}: nothing to reset (the device has hidden nothing)"]
        return [
            f"{user}#{device}: reset; the device will see every message still in "
            f"{config.pop3.mailbox} at its next login"
        ]

    return await _as_user(reactor, config, user, work)


async def retention(reactor: Any, config: Config, user: str, dry_run: bool) -> list[str]:
    async def work(account: ImapAccount) -> list[str]:
        report = await run_retention(account, config, user, dry_run=dry_run)
        lines = report.lines()
        if not config.retention.enabled:
            lines.insert(0, "retention is off (delete_after_days and quota_high_percent are 0)")
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
