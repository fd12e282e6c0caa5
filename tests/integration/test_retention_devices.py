"""Retention that knows every device, against real Dovecot and Cyrus.

Time never passes here: messages carry old INTERNALDATEs, and ``popgate retention --now`` /
``popgate device list --now`` judge inactivity as of a later moment.
"""

from __future__ import annotations

import contextlib
import json
import poplib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.maildrop.device_state import DeviceState, state_key
from tests.integration.pop3_helpers import upstream_view, wait_until
from tests.integration.test_retention import seed_dated
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

RETENTION = {"delete_after_days": 3, "action": "expunge", "sweep_interval": 0}


@contextlib.contextmanager
def pop(gw: GatewayProcess, login: str, password: str) -> Iterator[poplib.POP3]:
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    try:
        client.user(login)
        client.pass_(password)
        yield client
        assert client.quit() == b"+OK Bye"
    finally:
        with contextlib.suppress(Exception):
            client.close()


def numbers(client: poplib.POP3) -> dict[int, int]:
    """UID → message number in this session."""
    result = {}
    for line in client.uidl()[1]:
        number, uidl = line.decode().split()
        result[int(uidl[:8], 16)] = int(number)
    return result


def session(
    gw: GatewayProcess,
    login: str,
    password: str,
    *,
    retr: set[int] | None = None,
    dele: set[int] = frozenset(),  # type: ignore[assignment]
) -> set[int]:
    """One device session: RETR ``retr`` (None: everything it sees), DELE ``dele``, QUIT.
    Returns the UIDs it saw."""
    with pop(gw, login, password) as client:
        listed = numbers(client)
        for uid, n in listed.items():
            if retr is None or uid in retr:
                client.retr(n)
            if uid in dele:
                client.dele(n)
    return set(listed)


def popgate(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "-c", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def retention(gw: GatewayProcess, user: str, *extra: str) -> list[str]:
    done = popgate(gw, "retention", "--user", user, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def devices(gw: GatewayProcess, user: str, *extra: str) -> dict[str, list[str]]:
    """``popgate device list``: device → [last seen date, time, downloaded, hidden, held,
    status...]."""
    done = popgate(gw, "device", "list", user, *extra)
    assert done.returncode == 0, done.stderr
    head, *rows, total = done.stdout.splitlines()
    assert head.split()[:2] == ["DEVICE", "LAST"], done.stdout
    assert total.startswith(f"{user}: "), done.stdout
    return {row.split()[0]: row.split()[1:] for row in rows}


def imap_reads_everything(upstream: Upstream, user: Any) -> None:
    """The third client: an IMAP app that reads (and so marks \\Seen) every message."""
    with upstream.imap(user.name, user.password) as conn:
        assert conn.select("INBOX")[0] == "OK"
        typ, data = conn.uid("STORE", "1:*", "+FLAGS", "(\\Seen)")
        assert typ == "OK", data


def later(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat(timespec="seconds")


def test_an_active_device_keeps_what_it_has_not_downloaded(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    user, pw = mail_user.name, mail_user.password
    gw = start_gateway(retention=RETENTION)
    assert session(gw, f"{user}#laptop", pw) == set()  # the laptop is known, saw nothing yet
    uid = seed_dated(upstream, mail_user, [("a", 10, 0), ("b", 9, 0), ("c", 8, 0)])
    every = set(uid.values())
    # The PC downloads and deletes everything; an IMAP client reads everything.
    assert session(gw, f"{user}#pc", pw, dele=every) == every
    imap_reads_everything(upstream, mail_user)

    dry = retention(gw, user, "--dry-run")
    assert dry[0] == f"{user}: nothing to remove (expunge)", dry
    assert dry[1] == f"{user}: kept 3 messages active devices still need", dry
    assert all("held back by laptop (not downloaded or deleted there)" in r for r in dry[2:5])
    retention(gw, user)
    assert upstream.list_uids(user, pw) == sorted(every)
    listed = devices(gw, user)
    # laptop: downloaded 0, hidden 0, holds back 3, active; pc: 3 downloaded, 3 hidden.
    assert listed["laptop"][2:6] == ["0", "0", "3", "active"], listed
    assert listed["pc"][2:6] == ["3", "3", "0", "active"], listed

    # The laptop downloads "a" (RETR, no DELE): "a" may go now, the others still wait.
    assert session(gw, f"{user}#laptop", pw, retr={uid["a"]}) == every
    applied = retention(gw, user)
    assert applied[0] == f"{user}: removed 1 messages (expunge)", applied
    assert upstream.list_uids(user, pw) == sorted([uid["b"], uid["c"]])
    # A message nobody deleted is never taken, however old and downloaded by all.
    assert session(gw, f"{user}#laptop", pw) == {uid["b"], uid["c"]}
    assert retention(gw, user)[0] == f"{user}: removed 2 messages (expunge)"
    assert upstream.list_uids(user, pw) == []


def test_an_inactive_device_stops_holding_back_and_sees_what_is_left(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    user, pw = mail_user.name, mail_user.password
    gw = start_gateway(retention={**RETENTION, "device_inactive_days": 30})
    session(gw, f"{user}#laptop", pw)
    uid = seed_dated(upstream, mail_user, [("gone", 10, 0), ("kept", 10, 0)])
    session(gw, f"{user}#pc", pw, dele={uid["gone"]})
    assert retention(gw, user)[0] == f"{user}: nothing to remove (expunge)"
    # 29 days on the laptop still counts; 31 days on it does not.
    assert devices(gw, user, "--now", later(29))["laptop"][5] == "active"
    assert retention(gw, user, "--dry-run", "--now", later(29))[0].endswith(
        "nothing to remove (expunge)"
    )
    listed = devices(gw, user, "--now", later(31))
    assert listed["laptop"][4:6] == ["0", "inactive"], listed
    out = retention(gw, user, "--now", later(31))
    assert out[0] == f"{user}: removed 1 messages (expunge)", out
    assert f"{user}: inactive devices (hold nothing back): laptop, pc" in out
    assert upstream.list_uids(user, pw) == [uid["kept"]]
    # The laptop comes back: it gets everything still there.
    assert session(gw, f"{user}#laptop", pw) == {uid["kept"]}


def test_leave_on_server_devices_with_after_all_devices_days(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    user, pw = mail_user.name, mail_user.password
    gw = start_gateway(
        retention={"after_all_devices_days": 7, "action": "expunge", "sweep_interval": 0}
    )
    with pop(gw, f"{user}#outlook", pw) as client:
        assert client.capa()["EXPIRE"] == ["7"]  # a downloaded message may go after 7 days
    session(gw, f"{user}#phone", pw)
    uid = seed_dated(upstream, mail_user, [("old", 20, 0), ("young", 2, 0), ("unread", 20, 0)])
    # Both devices "leave a copy on the server": RETR, never DELE. Outlook skips "unread".
    session(gw, f"{user}#outlook", pw, retr={uid["old"], uid["young"]})
    assert retention(gw, user, "--dry-run")[0] == f"{user}: nothing to remove (expunge)"
    session(gw, f"{user}#phone", pw)
    out = retention(gw, user)
    assert out[0] == f"{user}: removed 1 messages (expunge)", out
    assert "downloaded by every active device (2), arrived 20 days ago (> 7)" in out[1]
    assert upstream.list_uids(user, pw) == sorted([uid["young"], uid["unread"]])


def test_an_imap_only_user_loses_nothing(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    user, pw = mail_user.name, mail_user.password
    uid = seed_dated(upstream, mail_user, [("x", 400, 0), ("y", 300, 0)])
    imap_reads_everything(upstream, mail_user)
    gw = start_gateway(
        retention={"delete_after_days": 1, "after_all_devices_days": 1, "sweep_interval": 0}
    )
    assert retention(gw, user)[0] == f"{user}: nothing to remove (trash)"
    assert upstream.list_uids(user, pw) == sorted(uid.values())
    done = popgate(gw, "device", "list", user)
    assert done.stdout.strip() == f"{user}: no POP device has state in INBOX (none holds mail back)"


def test_concurrent_sessions_on_two_replicas_merge_downloads(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    user, pw = mail_user.name, mail_user.password
    uid = seed_dated(upstream, mail_user, [("m1", 9, 0), ("m2", 9, 0), ("m3", 9, 0)])
    replicas = [start_gateway(retention=RETENTION), start_gateway(retention=RETENTION)]
    session(replicas[1], f"{user}#laptop", pw, retr=set())  # known, downloaded nothing
    session(replicas[0], f"{user}#pc", pw, dele=set(uid.values()))
    # Two sessions of one device, one on each replica, open at the same time; each downloads
    # a different message, then both QUIT (the second while the first's state is stored).
    first = poplib.POP3("127.0.0.1", replicas[0].pop3_port, timeout=30)
    second = poplib.POP3("127.0.0.1", replicas[1].pop3_port, timeout=30)
    for client in (first, second):
        client.user(f"{user}#laptop")
        client.pass_(pw)
    first.retr(numbers(first)[uid["m1"]])
    second.retr(numbers(second)[uid["m2"]])
    assert first.quit() == b"+OK Bye"
    assert second.quit() == b"+OK Bye"
    listed = devices(replicas[1], user)
    assert listed["laptop"][2] == "2", listed  # both downloads, neither lost
    out = retention(replicas[1], user)
    assert out[0] == f"{user}: removed 2 messages (expunge)", out
    assert upstream.list_uids(user, pw) == [uid["m3"]]


def test_capa_expire_names_the_shortest_rule(
    mail_user: Any, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """CAPA EXPIRE with the settings combined (unit-tested per combination): a live check."""
    gw = start_gateway(retention={"delete_after_days": 3, "after_all_devices_days": 14})
    with pop(gw, mail_user.name, mail_user.password) as client:
        assert client.capa()["EXPIRE"] == ["3"]


def test_a_state_written_before_download_tracking_still_works(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """A version-1 state (hidden set only) in the state mailbox: the device keeps its hidden
    messages hidden, counts as active with an unknown last login, and its next QUIT writes the
    new format (wherever the store is: Cyrus carries it over to METADATA)."""
    user, pw = mail_user.name, mail_user.password
    uid = seed_dated(upstream, mail_user, [("seen-before", 10, 0), ("new", 10, 0)])
    with upstream.imap(user, pw) as conn:
        assert conn.select("INBOX", readonly=True)[0] == "OK"
        uidvalidity = int(conn.response("UIDVALIDITY")[1][0])
        assert conn.create('"POP Device State"')[0] == "OK"
    header, _, _ = (
        DeviceState("INBOX", "phone")
        .to_message(date=0, message_id="<s@test>")
        .partition(b"\r\n\r\n")
    )
    body = json.dumps(
        {"version": 1, "mailbox": "INBOX", "device": "phone", "uidvalidity": uidvalidity,
         "uids": str(uid["seen-before"]), "emailids": []}
    ).encode()  # fmt: skip
    upstream.append(user, pw, header + b"\r\n\r\n" + body + b"\r\n", mailbox="POP Device State")
    with upstream.imap(user, pw) as conn:  # the keyword a hide always sets first
        assert conn.select("INBOX")[0] == "OK"
        assert conn.uid("STORE", str(uid["seen-before"]), "+FLAGS", "($POPDeleted)")[0] == "OK"
    # Retention on (devices are tracked), but "seen-before" is too young for it.
    gw = start_gateway(retention={"delete_after_days": 30, "sweep_interval": 0})
    listed = devices(gw, user)
    # LAST SEEN unknown, downloaded 0, hidden 1, holds back 0, active.
    assert listed["phone"] == ["unknown", "0", "1", "0", "active"], listed
    assert session(gw, f"{user}#phone", pw, retr=set()) == {uid["new"]}
    listed = devices(gw, user)
    assert listed["phone"][0] != "unknown" and listed["phone"][3] == "1", listed


def test_only_a_whole_retr_in_a_session_ended_by_quit_counts_as_downloaded(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    user, pw = mail_user.name, mail_user.password
    uid = seed_dated(upstream, mail_user, [("a", 1, 0), ("b", 1, 0), ("c", 1, 0)])
    gw = start_gateway(retention=RETENTION)
    with pop(gw, f"{user}#phone", pw) as client:
        n = numbers(client)
        client.top(n[uid["a"]], 0)  # headers only: not a download
        client.retr(n[uid["b"]])
    assert devices(gw, user)["phone"][2] == "1"  # DOWNLOADED
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    client.user(f"{user}#phone")
    client.pass_(pw)
    client.retr(numbers(client)[uid["c"]])
    client.close()  # no QUIT: nothing recorded, as for deletes (RFC 1939)
    wait_until(
        lambda: len(re.findall(r"disconnect .*device=phone ", gw.log_text())) >= 2,
        what="the dropped session's disconnect logged",
    )
    assert devices(gw, user)["phone"][2] == "1"
    # RSET then QUIT: nothing hidden, but the device was seen (it was already, this hour).
    with pop(gw, f"{user}#phone", pw) as client:
        client.dele(1)
        client.rset()
    listed = devices(gw, user)["phone"]
    assert listed[2:6] == ["1", "0", "0", "active"], listed


def test_a_device_that_logged_in_but_never_quit_holds_mail_back(
    mail_user: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """The login itself is recorded (the contract's "last login"): a laptop whose only
    session dropped before QUIT is a known, active device that lacks everything."""
    user, pw = mail_user.name, mail_user.password
    gw = start_gateway(retention=RETENTION)
    uid = seed_dated(upstream, mail_user, [("a", 10, 0), ("b", 9, 0)])
    every = set(uid.values())
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    client.user(f"{user}#laptop")
    client.pass_(pw)
    assert client.stat()[0] == 2
    client.close()  # dropped: no QUIT
    wait_until(
        lambda: re.search(r"disconnect .*device=laptop ", gw.log_text()) is not None,
        what="the dropped session's disconnect logged",
    )
    assert session(gw, f"{user}#pc", pw, dele=every) == every
    out = retention(gw, user)
    assert out[:2] == [f"{user}: nothing to remove (expunge)",
                       f"{user}: kept 2 messages active devices still need"], out  # fmt: skip
    assert all("held back by laptop" in r for r in out[2:4]), out
    assert upstream.list_uids(user, pw) == sorted(every)
    listed = devices(gw, user)
    assert listed["laptop"][0] != "unknown" and listed["laptop"][2:6] == ["0", "0", "2", "active"]
    # Another login and QUIT within the hour writes no state (nothing else changed): the
    # laptop's one state message upstream keeps its UID.
    copies = laptop_state_uids(upstream, user)
    assert len(copies) == 1, copies
    assert session(gw, f"{user}#laptop", pw, retr=set()) == every
    assert laptop_state_uids(upstream, user) == copies


def laptop_state_uids(upstream: Upstream, user: str) -> set[int]:
    key = state_key("INBOX", "laptop").encode()
    return {uid for uid, raw in upstream_view(upstream, user).state_messages.items() if key in raw}
