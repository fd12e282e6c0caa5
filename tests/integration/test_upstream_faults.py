"""A hung or breaking upstream IMAP server, injected at chosen commands (tests/support/imap_faults).

popgate reaches the private Dovecot through an ImapFaults forwarder (in the clear, so the
forwarder can read the commands) with ``[upstream.imap] timeout = 1``:

- a stall at the login snapshot or during QUIT's update gives ``-ERR [SYS/TEMP]`` once the
  timeout has passed, applies nothing half-way, and the device can log in again at once;
- a stall in the middle of a RETR drops the connection (no ``-ERR`` inside a message);
- an ``on_delete = "trash"`` or ``"archive"`` move interrupted half way (copies made, sources
  kept) is completed by the device's retry without a single duplicate and without a loss.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import SeededUser
from tests.integration.pop3_helpers import POP_DELETED, PopWire, upstream_view
from tests.support import messages
from tests.support.gateway import GatewayProcess
from tests.support.imap_faults import ImapFaults
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

TIMEOUT = 1.0  # [upstream.imap] timeout of these gateways, seconds
DEADLINE = 15.0  # how long a test waits for any one event


@pytest.fixture
def faults(upstream: Upstream) -> Iterator[ImapFaults]:
    with ImapFaults(upstream.host, upstream.imap_port) as forwarder:
        yield forwarder


@pytest.fixture
def gateway(
    start_gateway: Callable[..., GatewayProcess], faults: ImapFaults
) -> Callable[..., GatewayProcess]:
    def start(**pop3: object) -> GatewayProcess:
        return start_gateway(
            upstream_imap={"port": faults.port, "security": "none", "timeout": TIMEOUT},
            pop3=pop3,
        )

    return start


def login(gw: GatewayProcess, user: str, password: str) -> PopWire:
    client = PopWire.connect(gw.host, gw.pop3_port, timeout=DEADLINE)
    assert client.greeting.startswith(b"+OK")
    assert client.command(f"USER {user}").startswith(b"+OK")
    return client


def count(client: PopWire) -> int:
    status = client.command("STAT")
    assert status.startswith(b"+OK"), status
    return int(status.split()[1])


def seed(seeded_user: Callable[..., SeededUser], n: int, size: int = 1) -> SeededUser:
    return seeded_user(
        [messages.plain(f"m{i}", f"body {i}\n" * size, n=i) for i in range(1, n + 1)]
    )


# --------------------------------------------------------------------- bug 4: timeouts
def test_a_stall_at_the_login_snapshot_answers_sys_temp_after_the_timeout(
    gateway: Callable[..., GatewayProcess],
    faults: ImapFaults,
    seeded_user: Callable[..., SeededUser],
) -> None:
    gw = gateway()
    acct = seed(seeded_user, 3)
    stall = faults.stall_at("UID FETCH")  # the snapshot's index
    with login(gw, acct.name, acct.password) as client:
        started = time.monotonic()
        client.send(f"PASS {acct.password}\r\n".encode())
        stall.wait(DEADLINE)
        reply = client.line()
        waited = time.monotonic() - started
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
        assert waited >= TIMEOUT  # the answer came from the timeout, not from the server
    # The login pipelines the state mailbox's STATUS (where there is no METADATA), EXAMINE and
    # UID FETCH: the oldest one still owed an answer when the stall begins is named, which
    # depends on how the answers and the stall interleave.
    gw.wait_for_log(r"no answer from IMAP server to (STATUS|EXAMINE|UID FETCH) within 1s")
    # The device is not left [IN-USE]: the next login works at once.
    with login(gw, acct.name, acct.password) as client:
        assert client.command(f"PASS {acct.password}").startswith(b"+OK")
        assert count(client) == 3
        assert client.quit() == b"+OK Bye\r\n"


@pytest.mark.parametrize("at", ["SELECT", "APPEND"])
def test_a_stall_during_the_update_answers_sys_temp_and_a_retry_completes(
    gateway: Callable[..., GatewayProcess],
    faults: ImapFaults,
    seeded_user: Callable[..., SeededUser],
    upstream: Upstream,
    at: str,
) -> None:
    # SELECT: the update's first command (the login only EXAMINEs). APPEND: the state write,
    # after the keyword was stored on the message.
    gw = gateway()
    acct = seed(seeded_user, 3)
    with login(gw, acct.name, acct.password) as client:
        assert client.command(f"PASS {acct.password}").startswith(b"+OK")
        assert client.command("DELE 2").startswith(b"+OK")
        stall = faults.stall_at(at)
        client.send(b"QUIT\r\n")
        stall.wait(DEADLINE)
        reply = client.line()
        assert reply.startswith(b"-ERR [SYS/TEMP] Some deletes were not applied"), reply
        assert client.read_to_eof(DEADLINE) == b""
    # Nothing half-applied that a device could notice: all three are still there.
    after = upstream_view(upstream, acct.name)
    assert sorted(after.inbox_flags) == acct.uids
    with login(gw, acct.name, acct.password) as client:
        assert client.command(f"PASS {acct.password}").startswith(b"+OK")
        assert count(client) == 3
        assert client.command("DELE 2").startswith(b"+OK")
        assert client.quit() == b"+OK Bye\r\n"
    assert upstream_view(upstream, acct.name).hidden_uids() == {acct.uids[1]}
    with login(gw, acct.name, acct.password) as client:
        assert client.command(f"PASS {acct.password}").startswith(b"+OK")
        assert count(client) == 2
        assert client.quit() == b"+OK Bye\r\n"


def test_a_stall_in_the_middle_of_a_retr_drops_the_connection(
    gateway: Callable[..., GatewayProcess],
    faults: ImapFaults,
    seeded_user: Callable[..., SeededUser],
) -> None:
    gw = gateway()
    acct = seed(seeded_user, 1, size=20_000)  # about 200 KB
    with login(gw, acct.name, acct.password) as client:
        assert client.command(f"PASS {acct.password}").startswith(b"+OK")
        stall = faults.stall_at("UID FETCH", contains=b"BODY.PEEK[]", answer_bytes=50_000)
        client.send(b"RETR 1\r\n")
        stall.wait(DEADLINE)
        received = client.read_to_eof(DEADLINE)
    assert received.startswith(b"+OK")
    assert b"-ERR" not in received  # nothing written inside the message
    assert not received.endswith(b"\r\n.\r\n")  # and it does not look complete
    assert 1000 < len(received) < len(acct.messages[0])


# --------------------------------------------------------------------- bug 8: no duplicates
@pytest.mark.parametrize(
    ("policy", "folder", "copied"),
    [("trash", "Trash", 44), ("trash", "Trash", 100), ("archive", "POP Archive", 44)],
    ids=["trash-some-copied", "trash-whole-command-copied", "archive-some-copied"],
)
def test_an_interrupted_move_is_completed_by_the_retry_without_duplicates(
    gateway: Callable[..., GatewayProcess],
    faults: ImapFaults,
    seeded_user: Callable[..., SeededUser],
    upstream: Upstream,
    policy: str,
    folder: str,
    copied: int,
) -> None:
    gw = gateway(on_delete=policy)
    acct = seed(seeded_user, 200)
    bodies = Counter(acct.messages)

    def delete_all_and_quit() -> bytes:
        with login(gw, acct.name, acct.password) as client:
            assert client.command(f"PASS {acct.password}").startswith(b"+OK")
            assert count(client) == 200
            for n in range(1, 201):
                assert client.command(f"DELE {n}").startswith(b"+OK")
            client.send(b"QUIT\r\n")
            return client.line()

    interrupt = faults.interrupt_move_at(copied=copied)
    reply = delete_all_and_quit()
    interrupt.wait(DEADLINE)
    assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
    # What Dovecot's non-atomic MOVE leaves when the link breaks: copies made, sources kept.
    # (popgate moves at most 100 per command, so 100 is a whole command's worth.)
    assert len(upstream.list_uids(acct.name, acct.password, folder)) == copied
    assert len(upstream.list_uids(acct.name, acct.password)) == 200

    assert delete_all_and_quit() == b"+OK Bye\r\n"  # the device's retry
    moved = upstream.fetch_bodies(acct.name, acct.password, folder)
    assert len(moved) == 200  # not 200 + copied
    assert upstream.list_uids(acct.name, acct.password) == []
    assert Counter(moved.values()) == bodies  # nothing lost
    flags = upstream.fetch_flags(acct.name, acct.password, folder)
    assert all(POP_DELETED in f for f in flags.values())
