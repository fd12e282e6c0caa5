"""What POP deletes do to the IMAP mailbox, per on_delete, across devices (contract table).

Every check reads the upstream state with a real IMAP client (imaplib via the Dovecot helper).
"""

from __future__ import annotations

import contextlib
import poplib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

MESSAGES = [
    f"From: a@example.org\r\nSubject: message {i}\r\nMessage-ID: <m{i}@example.org>\r\n\r\n"
    f"body {i}\r\n".encode()
    for i in range(1, 4)
]


@contextlib.contextmanager
def pop_session(gw: GatewayProcess, login: str, password: str) -> Iterator[poplib.POP3]:
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    try:
        client.user(login)
        client.pass_(password)
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()


def delete_and_quit(gw: GatewayProcess, login: str, password: str, numbers: list[int]) -> bytes:
    with pop_session(gw, login, password) as client:
        for n in numbers:
            client.dele(n)
        return client.quit()


def subjects(gw: GatewayProcess, login: str, password: str) -> list[str]:
    """The subjects a POP device sees, in message-number order (TOP n 0)."""
    with pop_session(gw, login, password) as client:
        count, _ = client.stat()
        found = []
        for n in range(1, count + 1):
            _, lines, _ = client.top(n, 0)
            found += [line.decode()[9:] for line in lines if line.startswith(b"Subject: ")]
        client.quit()
        return found


def mailbox_subjects(upstream: Upstream, user: str, pw: str, mailbox: str) -> list[str]:
    bodies = upstream.fetch_bodies(user, pw, mailbox)
    return [
        line[9:].decode()
        for _, raw in sorted(bodies.items())
        for line in raw.split(b"\r\n")
        if line.startswith(b"Subject: ")
    ]


def stored_flags(upstream: Upstream, user: str, pw: str) -> dict[int, set[str]]:
    """Flags as stored; \\Recent is per-session state (gone in IMAP4rev2), not a stored flag."""
    return {uid: flags - {"\\Recent"} for uid, flags in upstream.fetch_flags(user, pw).items()}


@pytest.fixture
def seeded(seeded_user: Callable[..., Any]) -> Any:
    return seeded_user(MESSAGES)


@pytest.mark.parametrize("policy", ["hide", "seen"])
def test_hide_and_seen_keep_the_message_in_place(
    policy: str, seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway(pop3={"on_delete": policy})
    before = stored_flags(upstream, seeded.name, seeded.password)
    assert delete_and_quit(gw, seeded.name, seeded.password, [2]) == b"+OK Bye"
    after = stored_flags(upstream, seeded.name, seeded.password)
    assert sorted(after) == sorted(before) == seeded.uids  # same UIDs, nothing moved
    second = seeded.uids[1]
    expected = {"$POPDeleted"} | ({"\\Seen"} if policy == "seen" else set())
    assert after[second] == expected
    assert all(after[uid] == before[uid] for uid in seeded.uids if uid != second)
    assert subjects(gw, seeded.name, seeded.password) == ["message 1", "message 3"]
    assert subjects(gw, f"{seeded.name}#phone", seeded.password) == [
        "message 1",
        "message 2",
        "message 3",
    ]


@pytest.mark.parametrize(("policy", "mailbox"), [("archive", "POP Archive"), ("trash", "Trash")])
def test_archive_and_trash_move_the_message(
    policy: str,
    mailbox: str,
    seeded: Any,
    upstream: Upstream,
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(pop3={"on_delete": policy})
    delete_and_quit(gw, seeded.name, seeded.password, [1, 3])
    assert mailbox_subjects(upstream, seeded.name, seeded.password, "INBOX") == ["message 2"]
    assert mailbox_subjects(upstream, seeded.name, seeded.password, mailbox) == [
        "message 1",
        "message 3",
    ]
    moved = upstream.fetch_bodies(seeded.name, seeded.password, mailbox)
    assert sorted(moved.values()) == sorted([seeded.messages[0], seeded.messages[2]])
    # Every device loses it from the mailbox: other POP devices no longer see it.
    assert subjects(gw, f"{seeded.name}#phone", seeded.password) == ["message 2"]


def test_trash_is_found_by_special_use(
    seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    # The fixture's Trash is SPECIAL-USE \Trash; a configured name that differs is honoured.
    gw = start_gateway(pop3={"on_delete": "trash", "trash_folder": "Bin"})
    delete_and_quit(gw, seeded.name, seeded.password, [2])
    assert mailbox_subjects(upstream, seeded.name, seeded.password, "Bin") == ["message 2"]
    assert mailbox_subjects(upstream, seeded.name, seeded.password, "Trash") == []


def test_expunge_removes_only_what_was_deleted(
    seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    # An IMAP client has flagged message 3 \Deleted without expunging: POP must not take it.
    with upstream.imap(seeded.name, seeded.password) as imap:
        imap.select("INBOX")
        imap.uid("STORE", str(seeded.uids[2]), "+FLAGS", "(\\Deleted)")
    gw = start_gateway(pop3={"on_delete": "expunge"})
    delete_and_quit(gw, seeded.name, seeded.password, [1])
    assert upstream.list_uids(seeded.name, seeded.password) == seeded.uids[1:]
    assert mailbox_subjects(upstream, seeded.name, seeded.password, "Trash") == []


@pytest.mark.parametrize("policy", ["hide", "trash", "expunge"])
@pytest.mark.parametrize("ending", ["rset", "drop"])
def test_rset_or_dropped_connection_change_nothing(
    policy: str,
    ending: str,
    seeded: Any,
    upstream: Upstream,
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(pop3={"on_delete": policy})
    before = stored_flags(upstream, seeded.name, seeded.password)
    mailboxes = upstream.list_mailboxes(seeded.name, seeded.password)
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    client.user(seeded.name)
    client.pass_(seeded.password)
    client.dele(1)
    client.dele(2)
    if ending == "rset":
        client.rset()
        client.quit()
    else:
        client.close()  # no QUIT: RFC 1939 says the deletes are forgotten
    # The gateway has logged the disconnect once it has dealt with the session.
    gw.wait_for_log(r"disconnect .*user=" + re.escape(seeded.name))
    assert stored_flags(upstream, seeded.name, seeded.password) == before
    assert upstream.list_mailboxes(seeded.name, seeded.password) == mailboxes
    assert subjects(gw, seeded.name, seeded.password) == ["message 1", "message 2", "message 3"]


def test_two_devices_delete_independently_and_a_new_device_sees_all(
    seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway()
    user, pw = seeded.name, seeded.password
    delete_and_quit(gw, user, pw, [1])
    delete_and_quit(gw, f"{user}#phone", pw, [2])
    assert subjects(gw, user, pw) == ["message 2", "message 3"]
    assert subjects(gw, f"{user}#phone", pw) == ["message 1", "message 3"]
    assert subjects(gw, f"{user}#tablet", pw) == ["message 1", "message 2", "message 3"]
    # Deleting again what another device deleted, and a retry of the same delete, are fine.
    delete_and_quit(gw, f"{user}#phone", pw, [1])
    assert subjects(gw, f"{user}#phone", pw) == ["message 3"]
    assert upstream.list_uids(user, pw) == seeded.uids


def test_device_reset_and_list(
    seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway()
    user, pw = seeded.name, seeded.password
    delete_and_quit(gw, f"{user}#phone", pw, [1, 2])
    delete_and_quit(gw, f"{user}#office", pw, [3])

    def popgate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "-c", str(gw.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = popgate("device", "list", user)
    assert listed.returncode == 0, listed.stderr
    # DEVICE, LAST SEEN (date, time), DOWNLOADED, HIDDEN, ...
    hidden = {line.split()[0]: line.split()[4] for line in listed.stdout.splitlines()[1:-1]}
    assert hidden == {"office": "1", "phone": "2"}, listed.stdout
    reset = popgate("device", "reset", user, "phone")
    assert reset.returncode == 0, reset.stderr
    assert "reset" in reset.stdout
    assert subjects(gw, f"{user}#phone", pw) == ["message 1", "message 2", "message 3"]
    assert subjects(gw, f"{user}#office", pw) == ["message 1", "message 2"]
    again = popgate("device", "reset", user, "phone")
    assert again.returncode == 0 and "nothing to reset" in again.stdout


def test_device_reset_without_master_identity_is_a_clear_error(
    seeded: Any, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway(upstream_imap={"master_user": None, "master_password": None})
    command = [sys.executable, "-m", "gateway", "device", "reset", seeded.name, "phone"]
    result = subprocess.run(
        [*command, "-c", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "master identity" in result.stderr


@pytest.mark.parametrize("on_retrieve", ["keep", "seen"])
def test_on_retrieve(
    on_retrieve: str,
    seeded: Any,
    upstream: Upstream,
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(pop3={"on_retrieve": on_retrieve})
    with pop_session(gw, seeded.name, seeded.password) as client:
        client.retr(1)
        client.top(2, 0)
        client.quit()
    flags = stored_flags(upstream, seeded.name, seeded.password)
    assert flags[seeded.uids[0]] == ({"\\Seen"} if on_retrieve == "seen" else set())
    assert flags[seeded.uids[1]] == set()  # TOP never marks a message read
    assert flags[seeded.uids[2]] == set()


def test_imap_side_changes_show_in_the_next_session(
    seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway()
    user, pw = seeded.name, seeded.password
    with upstream.imap(user, pw) as imap:
        imap.select("INBOX")
        imap.uid("STORE", str(seeded.uids[0]), "+FLAGS", "(\\Deleted)")
        imap.uid("STORE", str(seeded.uids[1]), "+FLAGS", "(\\Deleted)")
        imap.expunge()  # message 1 and 2 gone ...
    upstream.append(user, pw, b"From: b@example.org\r\nSubject: new one\r\n\r\nhi\r\n")
    assert subjects(gw, user, pw) == ["message 3", "new one"]


@pytest.mark.parametrize(
    ("retention", "capability"),
    [
        ({}, b"EXPIRE NEVER"),
        ({"delete_after_days": 30}, b"EXPIRE 30"),
        ({"quota_high_percent": 90, "quota_target_percent": 80}, b"EXPIRE 0"),
    ],
)
def test_capa_expire_follows_the_retention_policy(
    retention: dict[str, int],
    capability: bytes,
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(retention=retention or None)
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    try:
        caps = client.capa()
    finally:
        client.close()
    assert caps["EXPIRE"] == [capability.decode().split()[1]]


def test_update_failing_half_way_is_reported_and_a_retry_is_safe(
    seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    # Both servers refuse a 600-character mailbox name (Dovecot from 256, Cyrus from 491): the
    # state cannot be stored, after the keyword was.
    broken = start_gateway(pop3={"state_mailbox": "x" * 600})
    with pop_session(broken, seeded.name, seeded.password) as client:
        client.dele(2)
        with pytest.raises(poplib.error_proto) as answer:
            client.quit()
    text = answer.value.args[0]
    assert text.startswith(b"-ERR [SYS/TEMP] Some deletes were not applied: 1 deletes not applied")
    assert b"recording the deletes of device default" in text
    # Nothing was lost and the device still sees the message: it may simply delete it again.
    assert upstream.list_uids(seeded.name, seeded.password) == seeded.uids
    assert subjects(broken, seeded.name, seeded.password) == ["message 1", "message 2", "message 3"]
    fixed = start_gateway()
    assert delete_and_quit(fixed, seeded.name, seeded.password, [2]) == b"+OK Bye"
    assert subjects(fixed, seeded.name, seeded.password) == ["message 1", "message 3"]
    assert stored_flags(upstream, seeded.name, seeded.password)[seeded.uids[1]] == {"$POPDeleted"}


def test_changes_between_polls_are_seen_even_with_the_snapshot_cache(
    seeded: Any, upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway()
    user, pw = seeded.name, seeded.password
    assert subjects(gw, user, pw) == ["message 1", "message 2", "message 3"]  # cached now
    assert subjects(gw, user, pw) == ["message 1", "message 2", "message 3"]  # from the cache
    with upstream.imap(user, pw) as imap:  # a flag change: same EXISTS and UIDNEXT
        imap.select("INBOX")
        imap.uid("STORE", str(seeded.uids[0]), "+FLAGS", "(\\Deleted)")
    assert subjects(gw, user, pw) == ["message 2", "message 3"]
    upstream.append(user, pw, b"From: b@example.org\r\nSubject: new one\r\n\r\nhi\r\n")
    assert subjects(gw, user, pw) == ["message 2", "message 3", "new one"]
