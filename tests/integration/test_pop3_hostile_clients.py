"""Devices that misbehave as real networks and attackers make them (issue 9): a slow reader
caught by a shutdown, clients that flood while their session is busy, and devices whose
connection vanished without a FIN. Real popgate processes, a private Dovecot, raw sockets
(tests/support/client_faults.py); every wait is on an event with a deadline.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable

import pytest

from tests.integration.pop3_helpers import (
    Account,
    PopWire,
    make_account,
    on_the_wire,
    upstream_view,
)
from tests.support import messages
from tests.support.client_faults import (
    Flooder,
    SlowReader,
    Vanished,
    process_rss,
    small_window_socket,
)
from tests.support.gateway import GatewayProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
FLOOD = 200 * MiB
# What the kernel may hold of a flood the gateway does not read: the client's send buffer and
# the gateway's receive buffer (tcp_wmem/tcp_rmem maxima are 4 and 6 MiB here), plus the
# session's own backlog and one read.
KERNEL_AND_BACKLOG = 16 * MiB
# RSS the gateway may grow by while a flood is held off: one read, allocator noise.
RSS_SLACK = 24 * MiB


def stuffed(message: bytes) -> bytes:
    """The message as RETR sends it on the wire, before the terminator."""
    lines = on_the_wire(message).splitlines(keepends=True)
    return b"".join(b"." + line if line.startswith(b".") else line for line in lines)


# --------------------------------------------------------------------- bug 1
def test_sigterm_during_a_slow_download_drops_it_without_an_error_line(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """After the grace period a download still under way is cut off: the client sees a
    broken connection, never ``-ERR`` inside the message and a terminator after it (which
    stored a message 38 bytes too long)."""
    gw = start_gateway()
    big = messages.with_attachment(6 * MiB, name="big.bin", seed=9)
    acct = make_account(upstream, [big], "sigterm-slow")
    wire = PopWire(small_window_socket(gw.host, gw.pop3_port))
    try:
        wire.login(acct.name, acct.password)
        wire.send(b"RETR 1\r\n")
        assert not wire.buffer
        # 200 kB/s: the 6 MiB would take 30 s, the shutdown grace is 10 s.
        reader = SlowReader(wire.sock, rate=200_000)
        reader.wait_for(64 * 1024)
        assert gw.pid is not None
        os.kill(gw.pid, signal.SIGTERM)
        gw.wait_for_log(r"received SIGTERM")
        data = reader.wait_eof(timeout=90)
        assert gw.wait(timeout=30) == 0
    finally:
        wire.close()
    status, _, body = data.partition(b"\r\n")
    assert status == f"+OK {len(acct.messages[0])} octets".encode()
    spliced = data.find(b"-ERR")
    assert spliced < 0, f"-ERR inside the message: {data[spliced - 40 : spliced + 60]!r}"
    assert not data.endswith(b"\r\n.\r\n"), "a cut-off download must not look complete"
    assert stuffed(acct.messages[0]).startswith(body)  # what did arrive is the message
    assert len(body) < len(stuffed(acct.messages[0]))
    gw.wait_for_log(r"session ended inside a multi-line answer, dropping")


# --------------------------------------------------------------------- bug 2
def test_a_client_flooding_a_download_it_does_not_read_cannot_grow_the_gateway(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess], capsys: pytest.CaptureFixture
) -> None:
    gw = start_gateway()
    big = messages.with_attachment(6 * MiB, name="big.bin", seed=10)
    acct = make_account(upstream, [big], "flood-retr")
    wire = PopWire(small_window_socket(gw.host, gw.pop3_port))
    try:
        wire.login(acct.name, acct.password)
        wire.send(b"RETR 1\r\n")
        assert gw.pid is not None
        before = process_rss(gw.pid)
        flood = Flooder(wire.sock, total=FLOOD, pattern=b"NOOP\r\n")
        stalled = flood.wait_stalled(quiet=1.0, timeout=120)
        after = process_rss(gw.pid)
        flood.stop()
    finally:
        wire.close()
    with capsys.disabled():
        print(
            f"\n[flood during an unread RETR] sent {flood.sent / MiB:.1f} MiB of {FLOOD / MiB:.0f};"
            f" gateway RSS {before / MiB:.1f} -> {after / MiB:.1f} MiB"
        )
    assert stalled, f"the gateway read the whole {FLOOD / MiB:.0f} MiB flood"
    assert flood.sent < KERNEL_AND_BACKLOG
    assert after - before < RSS_SLACK


def test_an_unauthenticated_flood_during_a_pending_login_cannot_grow_the_gateway(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess], capsys: pytest.CaptureFixture
) -> None:
    """The login hangs upstream (the IMAP server's answers stop after STARTTLS), so the session
    is busy with ``PASS`` while the client sends junk without a line end."""
    with TcpProxy(upstream.host, upstream.imap_port) as proxy:
        proxy.freeze_after = b"STARTTLS"
        gw = start_gateway(upstream_imap={"port": proxy.port})
        wire = PopWire(small_window_socket(gw.host, gw.pop3_port))
        try:
            wire.send(b"USER nobody\r\nPASS wrong\r\n")
            assert wire.line() == b"+OK Send your password\r\n"
            assert proxy.frozen.wait(15), "the gateway never asked upstream"
            assert gw.pid is not None
            before = process_rss(gw.pid)
            flood = Flooder(wire.sock, total=FLOOD, pattern=b"\x00junk")
            stalled = flood.wait_stalled(quiet=1.0, timeout=120)
            after = process_rss(gw.pid)
            flood.stop()
        finally:
            wire.close()
    # The upstream connection is gone now too: a SIGTERM still ends the gateway.
    assert gw.stop(timeout=40) == 0, gw.log_text()
    with capsys.disabled():
        print(
            f"\n[unauthenticated flood, login pending] sent {flood.sent / MiB:.1f} MiB of"
            f" {FLOOD / MiB:.0f}; gateway RSS {before / MiB:.1f} -> {after / MiB:.1f} MiB"
        )
    assert stalled, f"the gateway read the whole {FLOOD / MiB:.0f} MiB flood"
    assert flood.sent < KERNEL_AND_BACKLOG
    assert after - before < RSS_SLACK


# --------------------------------------------------------------------- bug 5
@pytest.mark.parametrize("on_delete", ["hide", "trash"])
def test_a_device_whose_connection_vanished_logs_in_again_and_deletes_apply_once(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess], on_delete: str
) -> None:
    """A session of ``phone`` goes silent (no FIN) after a DELE; the same device logs in again
    at once, twice, and the two live sessions delete overlapping sets. Each delete is applied
    exactly once upstream; the vanished session's DELE is not applied at all."""
    gw = start_gateway(pop3={"on_delete": on_delete})
    acct: Account = make_account(
        upstream, [messages.plain(f"m{i}", n=i) for i in range(1, 6)], f"stale-{on_delete}"
    )
    device = f"{acct.name}#phone"
    with Vanished() as vanished:
        gone = PopWire.connect(gw.host, gw.pop3_port)
        gone.login(device, acct.password)
        assert gone.command("DELE 1") == b"+OK message 1 deleted\r\n"
        vanished.keep(gone.sock)

        first = PopWire.connect(gw.host, gw.pop3_port)
        second = PopWire.connect(gw.host, gw.pop3_port)
        with first, second:
            assert first.login(device, acct.password).startswith(b"+OK Logged in, 5 messages")
            assert second.login(device, acct.password).startswith(b"+OK Logged in, 5 messages")
            for n in (2, 3):
                assert first.command(f"DELE {n}") == f"+OK message {n} deleted\r\n".encode()
            for n in (3, 4):
                assert second.command(f"DELE {n}") == f"+OK message {n} deleted\r\n".encode()
            assert first.quit() == b"+OK Bye\r\n"
            assert second.quit() == b"+OK Bye\r\n"

    deleted = {acct.uids[i] for i in (1, 2, 3)}
    kept = [acct.messages[i] for i in (0, 4)]
    after = PopWire.connect(gw.host, gw.pop3_port)
    with after:
        after.login(device, acct.password)
        status, lines = after.listing("UIDL")
        assert status.startswith(b"+OK") and len(lines) == len(kept)
        for n, message in enumerate(kept, start=1):
            assert after.fetch(f"RETR {n}")[1] == on_the_wire(message)
        assert after.quit() == b"+OK Bye\r\n"

    view = upstream_view(upstream, acct.name)
    if on_delete == "hide":
        assert view.hidden_uids() == deleted
        assert set(view.inbox_flags) == set(acct.uids)  # nothing left the mailbox
    else:
        assert set(view.inbox_flags) == set(acct.uids) - deleted
        in_trash = Counter(upstream.fetch_bodies(acct.name, acct.password, "Trash").values())
        assert in_trash == Counter(acct.messages[i] for i in (1, 2, 3))  # each exactly once


def test_a_session_with_an_older_snapshot_keeps_what_a_newer_one_of_the_device_hid(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """The older session's UPDATE rewrites the device state with its own snapshot, which never
    saw the message that arrived later: that message must stay hidden all the same."""
    gw = start_gateway()
    acct = make_account(upstream, [messages.plain("old", n=1)], "older-snapshot")
    device = f"{acct.name}#phone"
    with PopWire.connect(gw.host, gw.pop3_port) as older:
        assert older.login(device, acct.password).startswith(b"+OK Logged in, 1 messages")
        upstream.append_many(acct.name, acct.password, [messages.plain("new", n=2)])
        with PopWire.connect(gw.host, gw.pop3_port) as newer:
            assert newer.login(device, acct.password).startswith(b"+OK Logged in, 2 messages")
            assert newer.command("DELE 2") == b"+OK message 2 deleted\r\n"
            assert newer.quit() == b"+OK Bye\r\n"
        assert older.command("DELE 1") == b"+OK message 1 deleted\r\n"
        assert older.quit() == b"+OK Bye\r\n"
    with PopWire.connect(gw.host, gw.pop3_port) as after:
        assert after.login(device, acct.password).startswith(b"+OK Logged in, 0 messages")
        assert after.quit() == b"+OK Bye\r\n"
    assert len(upstream_view(upstream, acct.name).hidden_uids()) == 2
