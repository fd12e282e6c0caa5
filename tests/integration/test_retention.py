"""Retention by age: only POP-deleted messages, only when old enough, dry-run changes nothing."""

from __future__ import annotations

import contextlib
import poplib
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream


def message(subject: str, size: int = 0) -> bytes:
    body = ("x" * 76 + "\r\n") * (size // 78) if size else "body\r\n"
    return f"From: a@example.org\r\nSubject: {subject}\r\n\r\n{body}".encode()


def seed_dated(upstream: Upstream, user: Any, items: list[tuple[str, int, int]]) -> dict[str, int]:
    """APPEND (subject, days ago, size) in order; subject → UID."""
    now = datetime.now(UTC)
    return {
        subject: upstream.append(
            user.name, user.password, message(subject, size), internaldate=now - timedelta(days)
        )
        for subject, days, size in items
    }


def pop_delete(gw: GatewayProcess, login: str, password: str, uids: set[int]) -> None:
    """DELE, through POP, the messages whose UIDL names one of ``uids``; then QUIT."""
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    try:
        client.user(login)
        client.pass_(password)
        for line in client.uidl()[1]:
            number, uidl = line.decode().split()
            if int(uidl[:8], 16) in uids:
                client.dele(int(number))
        assert client.quit() == b"+OK Bye"
    finally:
        with contextlib.suppress(Exception):
            client.close()


def popgate(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "-c", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_age_retention_dry_run_then_apply(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    uid = seed_dated(
        upstream,
        mail_user,
        [("old-a", 100, 0), ("old-b", 90, 0), ("recent", 1, 0), ("old-kept", 120, 0)],
    )
    # Retention is off while the devices delete; a second configuration turns it on for the
    # command, so the runs below are the only ones.
    devices = start_gateway()
    pop_delete(devices, mail_user.name, mail_user.password, {uid["old-a"], uid["recent"]})
    pop_delete(devices, f"{mail_user.name}#phone", mail_user.password, {uid["old-b"]})
    # The age rule alone: the default device never saw old-b, phone never saw old-a, and with
    # wait_for_devices (test_retention_waits_for_devices.py) each would hold the other's back.
    gw = start_gateway(
        retention={
            "delete_after_days": 30,
            "action": "trash",
            "sweep_interval": 0,
            "wait_for_devices": False,
        }
    )
    before = upstream.fetch_flags(mail_user.name, mail_user.password)

    dry = popgate(gw, "retention", "--user", mail_user.name, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    head, *rows = dry.stdout.splitlines()
    assert head == f"{mail_user.name}: would remove 2 messages (trash to Trash)"
    assert [r.split()[1] for r in rows] == [str(uid["old-a"]), str(uid["old-b"])]
    assert all("deleted by POP, arrived" in r and "days ago (> 30)" in r for r in rows)
    assert upstream.fetch_flags(mail_user.name, mail_user.password) == before

    applied = popgate(gw, "retention", "--user", mail_user.name)
    assert applied.returncode == 0, applied.stderr
    inbox = upstream.list_uids(mail_user.name, mail_user.password)
    assert inbox == sorted(
        [uid["recent"], uid["old-kept"]]
    )  # never a message no POP device deleted
    trash = upstream.fetch_bodies(mail_user.name, mail_user.password, "Trash")
    assert sorted(b.split(b"Subject: ")[1].split(b"\r\n")[0] for b in trash.values()) == [
        b"old-a",
        b"old-b",
    ]
    again = popgate(gw, "retention", "--user", mail_user.name)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_retention_runs_after_quit_without_delaying_it(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    uid = seed_dated(upstream, mail_user, [("old", 60, 0), ("young", 2, 0), ("untouched", 60, 0)])
    gw = start_gateway(retention={"delete_after_days": 30, "action": "expunge"})
    pop_delete(gw, mail_user.name, mail_user.password, {uid["old"], uid["young"]})
    gw.wait_for_log(r"retention removed 1 messages \(expunge\) .*user=" + re.escape(mail_user.name))
    assert upstream.list_uids(mail_user.name, mail_user.password) == sorted(
        [uid["young"], uid["untouched"]]
    )


def test_retention_command_needs_the_master_identity(
    mail_user: Any, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway(
        upstream_imap={"master_user": None, "master_password": None},
        retention={"delete_after_days": 30},
    )
    result = popgate(gw, "retention", "--user", mail_user.name, "--dry-run")
    assert result.returncode == 1
    assert "master identity" in result.stderr
