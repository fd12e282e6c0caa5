"""Hostile clients meet popgate's limits (issue 9 bugs 6 and 7): failed logins are answered
late on a schedule shared by the client address, connections beyond the limits are refused
with a clear answer, and a refused TLS handshake costs one log line.

The timing itself is the unit tests' business (tests/unit/test_limits.py, with a fake clock);
here real clients show what they observe: the answers, their order, the closures and the log.
"""

from __future__ import annotations

import base64
import contextlib
import poplib
import re
import select
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import MailUser
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration

CLIENT_TIMEOUT = 30
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ [A-Z]+ \S+ ")


def _lines_after(gw: GatewayProcess, start: int) -> list[str]:
    return gw.log_text().splitlines()[start:]


# --------------------------------------------------------------------- bug 7: log flooding
@pytest.mark.parametrize("attempt", ["old-protocol", "garbage"])
def test_refused_starttls_handshake_logs_one_line(
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    attempt: str,
) -> None:
    """A client whose TLS handshake after STARTTLS is refused (a protocol below the floor, or
    bytes that are no handshake at all) costs one log line, not a traceback."""
    gw = submission_gateway(mail_user)
    before = len(gw.log_text().splitlines())
    if attempt == "old-protocol":
        assert shutil.which("openssl")
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"{gw.host}:{gw.submission_port}",
             "-starttls", "smtp", "-tls1", "-cipher", "DEFAULT@SECLEVEL=0"],
            input=b"", capture_output=True, timeout=CLIENT_TIMEOUT, check=False,
        )  # fmt: skip
        assert result.returncode != 0  # the handshake was refused
    else:
        import socket

        with socket.create_connection((gw.host, gw.submission_port), CLIENT_TIMEOUT) as s:
            reader = s.makefile("rb")
            assert reader.readline().startswith(b"220 ")
            s.sendall(b"EHLO device.test\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            s.sendall(b"STARTTLS\r\n")
            assert reader.readline().startswith(b"220 ")
            s.sendall(b"\x16\x03\x01\x00\x05hello, this is no TLS handshake\r\n" * 4)
            assert reader.read() is not None  # until the gateway closes the connection
    gw.wait_for_log(r"TLS handshake failed")
    # Whatever else the connection logs, the refusal is one line and no traceback.
    new = _lines_after(gw, before)
    assert not [line for line in new if "Traceback" in line or not LOG_LINE.match(line)], new
    assert len([line for line in new if "TLS handshake failed" in line]) == 1, new


# --------------------------------------------------------------------- clients on sockets
class Client:
    """A line-based client on a raw socket from a chosen loopback address (Linux routes all
    of 127.0.0.0/8 to lo), so tests can be several client addresses at once."""

    def __init__(self, port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), CLIENT_TIMEOUT, (source, 0))
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        """The next line, or b"" at EOF (reads block up to CLIENT_TIMEOUT)."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def send(self, line: str) -> None:
        self.sock.sendall(f"{line}\r\n".encode())

    def command(self, line: str) -> bytes:
        self.send(line)
        return self.line()

    def answered(self) -> bool:
        """Whether anything (or EOF) is waiting to be read, without blocking."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(self.buffer) or bool(readable)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"


def test_failed_logins_from_one_address_are_answered_in_turn(
    start_gateway: Callable[..., GatewayProcess], mail_user: MailUser, clients: list[Client]
) -> None:
    """Two connections from one address fail at once: the second answer comes after the first
    (one schedule per address), while a client at another address logs in meanwhile."""
    gw = start_gateway(security={"auth_failure_delay": 1.0, "auth_failure_max_delay": 30.0})
    first, second = Client(gw.pop3_port), Client(gw.pop3_port)
    clients += [first, second]
    for client in (first, second):
        assert client.command(f"USER {mail_user.name}") == b"+OK Send your password\r\n"
        client.send("PASS wrong-1")

    # Either may be answered first (their checks upstream ran side by side); never both.
    readable, _, _ = select.select([first.sock, second.sock], [], [], CLIENT_TIMEOUT)
    assert len(readable) == 1
    first, second = (first, second) if readable == [first.sock] else (second, first)
    assert first.line() == AUTH_FAILED
    assert not second.answered()  # its turn comes a doubled delay later
    other = Client(gw.pop3_port, source="127.0.0.2")
    clients.append(other)
    assert other.command(f"USER {mail_user.name}") == b"+OK Send your password\r\n"
    assert other.command(f"PASS {mail_user.password}").startswith(b"+OK Logged in")
    assert not second.answered()
    assert second.line() == AUTH_FAILED


def test_one_schedule_across_pop3_and_submission(
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    clients: list[Client],
) -> None:
    """A failed SMTP AUTH puts the address in the schedule: a POP3 login from the same address,
    even with the right password, is checked only in its turn; another address is not held."""
    gw = submission_gateway(
        mail_user, security={"auth_failure_delay": 60.0, "auth_failure_max_delay": 60.0}
    )
    smtp = Client(gw.submission_port)
    clients.append(smtp)
    assert smtp.greeting.startswith(b"220 ")
    smtp.send("EHLO device.test")
    while not smtp.line().startswith(b"250 "):
        pass
    blob = base64.b64encode(f"\0{mail_user.name}\0wrong".encode()).decode()
    smtp.send(f"AUTH PLAIN {blob}")
    gw.wait_for_log(r"auth failed: rejected by the IMAP server")

    same = Client(gw.pop3_port)
    other = Client(gw.pop3_port, source="127.0.0.2")
    clients += [same, other]
    for client in (same, other):
        assert client.command(f"USER {mail_user.name}") == b"+OK Send your password\r\n"
        client.send(f"PASS {mail_user.password}")
    assert other.line().startswith(b"+OK Logged in")
    assert not same.answered()
    assert not smtp.answered()  # the 535 waits for its 60 s


def test_connections_over_the_per_address_limit_are_refused(
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    clients: list[Client],
) -> None:
    gw = submission_gateway(mail_user, security={"max_connections_per_ip": 3})
    clients += [Client(gw.pop3_port), Client(gw.pop3_port), Client(gw.submission_port)]
    assert [c.greeting[:3] for c in clients] == [b"+OK", b"+OK", b"220"]

    with poplib_refused(gw.pop3_port) as error:
        pass
    assert error.value == "-ERR [SYS/TEMP] Too many connections from your address, try again later"
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(gw.host, gw.submission_port, timeout=CLIENT_TIMEOUT)
    assert refused.value.smtp_code == 421
    assert (
        refused.value.smtp_error == b"4.7.0 Too many connections from your address, try again later"
    )

    # Another address is not affected, and a flood makes a bounded number of log lines.
    elsewhere = Client(gw.pop3_port, source="127.0.0.2")
    clients.append(elsewhere)
    assert elsewhere.greeting.startswith(b"+OK popgate ready")
    for _ in range(30):
        Client(gw.pop3_port).close()
    gw.wait_for_log(r"pop3 connection from 127\.0\.0\.1:\d+ refused: max_connections_per_ip")
    lines = [line for line in gw.log_text().splitlines() if "refused: max_connections" in line]
    # 32 refusals; at most one line per 10 s and kind (a second if this test was slow).
    assert 1 <= len(lines) <= 2, lines


def test_connections_over_the_global_limit_are_refused(
    start_gateway: Callable[..., GatewayProcess], clients: list[Client]
) -> None:
    gw = start_gateway(security={"max_connections": 2, "max_connections_per_ip": 2})
    clients += [Client(gw.pop3_port), Client(gw.pop3_port, source="127.0.0.2")]

    third = Client(gw.pop3_port, source="127.0.0.3")
    clients.append(third)
    assert third.greeting == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    assert third.line() == b""  # closed
    clients[0].close()
    gw.wait_for_log(r"disconnect")
    fourth = Client(gw.pop3_port, source="127.0.0.3")
    clients.append(fourth)
    assert fourth.greeting.startswith(b"+OK popgate ready")


class poplib_refused:
    """``with poplib_refused(port) as error:`` a poplib client meets a refusal at its greeting."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.value = ""

    def __enter__(self) -> poplib_refused:
        try:
            poplib.POP3("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        except poplib.error_proto as e:
            self.value = e.args[0].decode()
        else:
            raise AssertionError("poplib was greeted")
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# --------------------------------------------------------------------- issue 10 item 6
def test_ipv4_client_on_a_dual_stack_listener_is_a_local_client(
    start_gateway: Callable[..., GatewayProcess], mail_user: MailUser
) -> None:
    """``::ffff:127.0.0.1`` on a ``[::]`` listener is 127.0.0.1: inside the default
    insecure_auth_networks, as it already was on submission; logged as an IPv6 peer in brackets."""
    gw = start_gateway(pop3={"listen": ["[::]:0"], "listen_tls": []})
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=CLIENT_TIMEOUT)
    try:
        assert client.user(mail_user.name) == b"+OK Send your password"
        assert client.pass_(mail_user.password).startswith(b"+OK Logged in")
        client.quit()
    finally:
        client.close()
    gw.wait_for_log(r"login ok")
    assert re.search(r"peer=\[::ffff:127\.0\.0\.1\]:\d+$", gw.log_text(), re.M), gw.log_text()
