"""Sessions over time: the idle timeout (and what does not count as idle), and a graceful stop.

The module's gateway runs with ``idle_timeout = 2`` so a timeout can be watched in a test;
every wait is a read with a deadline, never a sleep standing in for an event.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.pop3_helpers import (
    Account,
    ConnectionClosed,
    PopWire,
    make_account,
    on_the_wire,
    report_logs,
    running_gateway,
    unstuff,
    upstream_view,
)
from tests.support import messages
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

IDLE_TIMEOUT = 2
IDLE_CLOSE = b"-ERR Idle timeout, closing connection\r\n"
SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down\r\n"


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("pop3-lifecycle")
    with running_gateway(upstream, directory, {"pop3": {"idle_timeout": IDLE_TIMEOUT}}) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gateway: GatewayProcess) -> None:
    report_logs(request, gateway)


@pytest.fixture
def account(upstream: Upstream) -> Account:
    return make_account(upstream, [messages.plain(f"m{i}", n=i) for i in (1, 2)], "life")


def test_short_idle_timeout_is_a_warning_not_an_error(gateway: GatewayProcess) -> None:
    warnings = [
        line
        for line in gateway.log_text().splitlines()
        if " WARNING " in line and "idle_timeout" in line
    ]
    assert warnings, gateway.log_text()


# --------------------------------------------------------------------- idle timeout
def test_idle_sessions_are_told_and_closed_without_applying_deletes(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    before = upstream_view(upstream, account.name)
    with (
        PopWire.connect(gateway.host, gateway.pop3_port) as unauthenticated,
        PopWire.connect(gateway.host, gateway.pop3_port) as deleting,
    ):
        deleting.login(account.name, account.password)
        assert deleting.command("DELE 1") == b"+OK message 1 deleted\r\n"
        start = time.monotonic()
        assert deleting.read_to_eof(timeout=IDLE_TIMEOUT + 10) == IDLE_CLOSE
        assert time.monotonic() - start >= IDLE_TIMEOUT - 0.5
        assert unauthenticated.read_to_eof(timeout=IDLE_TIMEOUT + 10) == IDLE_CLOSE
    gateway.wait_for_log(rf"INFO popgate\.pop3 disconnect .*user={account.name} ")
    assert upstream_view(upstream, account.name) == before
    with PopWire.connect(gateway.host, gateway.pop3_port) as client:
        client.login(account.name, account.password)
        assert client.command("STAT").startswith(b"+OK 2 ")
        assert client.quit() == b"+OK Bye\r\n"


def test_commands_keep_a_session_alive(gateway: GatewayProcess, account: Account) -> None:
    with PopWire.connect(gateway.host, gateway.pop3_port) as client:
        client.login(account.name, account.password)
        end = time.monotonic() + IDLE_TIMEOUT + 1
        while time.monotonic() < end:
            assert client.command("NOOP") == b"+OK\r\n"
            time.sleep(IDLE_TIMEOUT / 4)  # the client's pace, not a synchronisation
        assert client.quit() == b"+OK Bye\r\n"


def test_slow_reader_of_a_large_message_is_not_cut_off(
    upstream: Upstream, gateway: GatewayProcess
) -> None:
    """A device on a slow link reads for longer than idle_timeout without sending anything.
    Bytes keep moving, so the session is not idle (contract: "seconds without a command or
    moving byte"): the whole message arrives intact and the session is still there after it.

    The message is larger than what the kernel buffers on both ends can hold (the client's
    receive buffer is made small), so the gateway is still sending while the client dawdles."""
    big = messages.with_attachment(6 * 1024 * 1024, name="large.bin", seed=3)
    acct = make_account(upstream, [big], "slow")
    with PopWire.connect(gateway.host, gateway.pop3_port, rcvbuf=4096) as client:
        client.login(acct.name, acct.password)
        client.send(b"RETR 1\r\n")
        client.sock.settimeout(client.timeout)
        slow_until = time.monotonic() + 2 * IDLE_TIMEOUT + 0.5
        while time.monotonic() < slow_until:
            chunk = client.sock.recv(4096)
            assert chunk, f"closed after {len(client.buffer)} bytes"
            client.buffer += chunk
            time.sleep(0.5)  # the reader's pace
        slow_part = len(client.buffer)
        assert slow_part < len(big) // 2  # the test really read slowly
        assert client.line() == f"+OK {len(big)} octets\r\n".encode()
        raw = client.multiline_raw()
        spliced = raw.find(b"-ERR")
        assert spliced < 0, f"an -ERR line inside the body: {raw[spliced - 40 : spliced + 60]!r}"
        assert unstuff(raw) == on_the_wire(big)
        assert client.command("NOOP") == b"+OK\r\n"
        assert client.quit() == b"+OK Bye\r\n"


# --------------------------------------------------------------------- SIGTERM
def test_sigterm_lets_sessions_finish_then_applies_no_half_done_update(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway()
    stays = make_account(upstream, [messages.plain("a", n=1), messages.plain("b", n=2)], "stays")
    leaves = make_account(upstream, [messages.plain("c", n=3), messages.plain("d", n=4)], "leaves")
    before = upstream_view(upstream, stays.name)
    lingering = PopWire.connect(gw.host, gw.pop3_port, timeout=30)
    finishing = PopWire.connect(gw.host, gw.pop3_port)
    try:
        lingering.login(stays.name, stays.password)
        assert lingering.command("DELE 1") == b"+OK message 1 deleted\r\n"
        finishing.login(leaves.name, leaves.password)
        assert finishing.command("DELE 2") == b"+OK message 2 deleted\r\n"

        assert gw.pid is not None
        os.kill(gw.pid, signal.SIGTERM)
        gw.wait_for_log(r"received SIGTERM")
        gw.wait_for_log(rf"Port {gw.pop3_port} Closed")
        # Refused, or (racing the close of the listening socket) reset before any greeting.
        with pytest.raises((ConnectionRefusedError, ConnectionResetError, ConnectionClosed)):
            PopWire.connect(gw.host, gw.pop3_port)

        # A session that finishes within the grace period is served to the end.
        assert finishing.fetch("RETR 1")[1] == on_the_wire(leaves.messages[0])
        assert finishing.quit() == b"+OK Bye\r\n"
        assert upstream_view(upstream, leaves.name).hidden_uids() == {leaves.uids[1]}

        # One that does not is told so and dropped, and its DELE is forgotten.
        assert lingering.read_to_eof(timeout=30) == SHUTTING_DOWN
        assert gw.wait(timeout=30) == 0
    finally:
        lingering.close()
        finishing.close()
    assert upstream_view(upstream, stays.name) == before
    assert "Traceback" not in gw.log_text()
