"""Quota-driven retention against servers with a 1 MiB quota per user: a Dovecot with the quota
plugin, a Cyrus with ``autocreate_quota``."""

from __future__ import annotations

import poplib
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.test_retention import pop_delete, seed_dated
from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream


@pytest.fixture(scope="module")
def upstream(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    """This module's own server, with quota; the fixtures that use ``upstream`` get this one.

    Its base directory is its own temp dir: Dovecot's auth process must be able to reach it.
    """
    instance: Upstream
    if request.param == "dovecot":
        instance = Dovecot(quota=True, quota_storage="1M")
    else:
        instance = Cyrus(quota_kib=1024)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def quota_kib(upstream: Upstream, user: Any) -> tuple[int, int]:
    with upstream.imap(user.name, user.password) as imap:
        typ, data = imap.getquotaroot("INBOX")
        assert typ == "OK", data
        line = next(d for d in data[1] if b"STORAGE" in d)
        used, limit = line.split(b"STORAGE ")[1].rstrip(b")").split()
        return int(used), int(limit)


def test_quota_retention_removes_oldest_pop_deleted_first(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    # Nine ~100 KiB messages: about 88% of 1 MiB. Arrival order differs from UID order on
    # purpose: "oldest" means arrival (INTERNALDATE).
    size = 100 * 1024
    items = [(f"m{i}", days, size) for i, days in enumerate([50, 60, 40, 30, 20, 10, 5, 4, 3], 1)]
    uid = seed_dated(upstream, mail_user, items)
    used, limit = quota_kib(upstream, mail_user)
    assert limit == 1024 and used > 0.85 * limit
    devices = start_gateway()
    pop_deleted = {uid[s] for s in ("m1", "m2", "m3", "m4", "m5", "m6")}
    pop_delete(devices, mail_user.name, mail_user.password, pop_deleted)
    # The device state written at QUIT counts too where the quota root spans every mailbox of
    # the user (Cyrus); Dovecot's maildir quota here rounds it away.
    used, limit = quota_kib(upstream, mail_user)

    gw = start_gateway(
        retention={
            "quota_high_percent": 80,
            "quota_target_percent": 50,
            "action": "expunge",
            "sweep_interval": 0,
        }
    )

    def popgate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "retention",
                "--user",
                mail_user.name,
                *args,
                "-c",
                str(gw.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    dry = popgate("--dry-run")
    assert dry.returncode == 0, dry.stderr
    head, *rows = dry.stdout.splitlines()
    # From ~88% to under 50% takes four of the six, oldest arrival first: m2, m1, m3, m4.
    assert head.startswith(f"{mail_user.name}: would remove 4 messages (expunge)")
    assert f"quota {used} of {limit} KiB" in head
    assert [int(r.split()[1]) for r in rows] == [uid["m2"], uid["m1"], uid["m3"], uid["m4"]]
    assert all("quota at 8" in r and "> 80%" in r for r in rows)
    assert len(upstream.list_uids(mail_user.name, mail_user.password)) == 9

    applied = popgate()
    assert applied.returncode == 0, applied.stderr
    left = upstream.list_uids(mail_user.name, mail_user.password)
    assert left == sorted(uid[s] for s in ("m5", "m6", "m7", "m8", "m9"))
    assert quota_kib(upstream, mail_user)[0] < 0.5 * limit


def test_quota_pressure_with_everything_still_needed_removes_nothing_and_warns(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    user, pw = mail_user.name, mail_user.password
    gw = start_gateway(
        retention={
            "quota_high_percent": 80,
            "quota_target_percent": 50,
            "action": "expunge",
            "sweep_interval": 0,
        },
        http={"listen": ["127.0.0.1:0"]},
    )
    # The laptop is known (it polled once, when the mailbox was empty) and active.
    pop_session(gw, f"{user}#laptop", pw, set())
    size = 100 * 1024
    items = [(f"m{i}", 10 + i, size) for i in range(1, 10)]
    uid = seed_dated(upstream, mail_user, items)
    used, limit = quota_kib(upstream, mail_user)
    assert used > 0.85 * limit
    # The PC downloads and deletes everything: retention runs after its QUIT.
    pop_session(gw, f"{user}#pc", pw, set(uid.values()))
    gw.wait_for_log(
        r"WARNING popgate\.retention retention: quota at \d+% and every remaining candidate "
        r"\(9 messages\) is still needed by an active device \(laptop\); nothing more removed"
    )
    assert upstream.list_uids(user, pw) == sorted(uid.values())
    metrics = metric_values(gw)
    assert metrics["popgate_retention_quota_blocked_total"] == 1.0
    assert metrics["popgate_retention_held_back_messages_total"] == 9.0

    dry = subprocess.run(
        [sys.executable, "-m", "gateway", "retention", "--user", user, "--dry-run",
         "-c", str(gw.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith(f"{user}: nothing to remove (expunge); quota ")
    assert lines[1] == f"{user}: kept 9 messages active devices still need"
    assert all(line.endswith("held back by laptop (not downloaded or deleted there)")
               for line in lines[2:11])  # fmt: skip
    assert lines[11].startswith(f"{user}: WARNING quota above quota_high_percent")
    assert upstream.list_uids(user, pw) == sorted(uid.values())


def pop_session(gw: GatewayProcess, login: str, password: str, dele: set[int]) -> None:
    """RETR everything, DELE ``dele`` (by UID), QUIT."""
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    try:
        client.user(login)
        client.pass_(password)
        for line in client.uidl()[1]:
            number, uidl = line.decode().split()
            client.retr(int(number))
            if int(uidl[:8], 16) in dele:
                client.dele(int(number))
        assert client.quit() == b"+OK Bye"
    finally:
        client.close()


def metric_values(gw: GatewayProcess) -> dict[str, float]:
    url = f"http://{gw.host}:{gw.port('http')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if name and not name.startswith("#")
    }
