"""Behind a real HAProxy (``send-proxy-v2`` and ``send-proxy``): the client's address from the
PROXY header is the one popgate uses for its log, for insecure_auth_networks and for the IP it
forwards upstream in IMAP ID (Dovecot logs it as ``rip=``); connections without a header, or
from outside proxy_networks, are refused.

The client binds to 127.0.0.2 (or .3), so its address differs from HAProxy's own 127.0.0.1.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MailUser
from tests.support import messages
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.haproxy import HAProxy, Route, find_haproxy
from tests.support.smtp_sink import SmtpSink
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_haproxy() is None, reason="haproxy missing: run tests/bootstrap.sh"),
]

CLIENT = "127.0.0.2"
TIMEOUT = 30
PROXY_SECURITY = {"proxy_networks": ["127.0.0.1/32"]}


class BoundPOP3(poplib.POP3):
    """poplib's client from a chosen source address."""

    source = CLIENT

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


class BoundPOP3_SSL(poplib.POP3_SSL):
    source = CLIENT

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, (self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., HAProxy]]:
    started: list[HAProxy] = []

    def start(*routes: Route) -> HAProxy:
        directory = tmp_path / f"haproxy{len(started) + 1}"
        directory.mkdir()
        hap = HAProxy(directory, routes)
        started.append(hap)
        return hap.start()

    yield start
    for hap in started:
        hap.stop()


def _wait_dovecot_log(dovecot: Dovecot, pattern: str, gw: GatewayProcess) -> str:
    """The Dovecot log line for ``pattern``; the gateway's log line for the same login comes
    first (popgate logs its login after Dovecot answered), so waiting on it is enough."""
    gw.wait_for_log(r"login ok|auth ok|authenticated|logged in|\bquit\b")
    match = re.search(pattern, dovecot.log_text())
    assert match, dovecot.log_text()[-3000:]
    return match.group(0)


def _pop3_gateway(start_gateway: Callable[..., GatewayProcess], **pop3: Any) -> GatewayProcess:
    return start_gateway(
        ca_signed_cert=True,
        pop3={"proxy_protocol": True, **pop3},
        security={**PROXY_SECURITY, "auth_failure_delay": 0, "max_connections_per_ip": 2000},
    )


@pytest.mark.upstreams("dovecot")  # reads the forwarded address from Dovecot's log (rip=)
@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_pop3_client_address_comes_from_the_header(
    dovecot: Dovecot,
    mail_user: MailUser,
    start_gateway: Callable[..., GatewayProcess],
    haproxy: Callable[..., HAProxy],
    version: str,
    kind: str,
) -> None:
    gw = _pop3_gateway(start_gateway)
    hap = haproxy(Route("pop3", [(gw.host, gw.port("pop3", kind))], version))  # type: ignore[arg-type]
    if kind == "tls":
        context = ssl.create_default_context(cafile=str(dovecot.ca_file))
        client: poplib.POP3 = BoundPOP3_SSL("127.0.0.1", hap.port("pop3"), context=context)
    else:
        client = BoundPOP3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)
    assert client.getwelcome().startswith(b"+OK")
    client.user(f"{mail_user.name}#phone")
    client.pass_(mail_user.password)
    assert client.stat() == (0, 0)
    client.quit()
    # popgate's own log names the client, never HAProxy's 127.0.0.1 ...
    gw.wait_for_log(rf"peer={re.escape(CLIENT)}:\d+|{re.escape(CLIENT)}:\d+.*connect")
    connects = [line for line in gw.log_text().splitlines() if "connect tls=" in line]
    assert connects and all(CLIENT in line for line in connects), connects
    # ... and so does the upstream: popgate forwarded it with IMAP ID.
    _wait_dovecot_log(dovecot, rf"user=<{re.escape(mail_user.name)}>[^\n]*rip={CLIENT}\b", gw)


@pytest.mark.upstreams("dovecot")  # a rule of popgate's own: one upstream is enough
def test_insecure_auth_networks_see_the_header_s_address(
    mail_user: MailUser,
    start_gateway: Callable[..., GatewayProcess],
    haproxy: Callable[..., HAProxy],
) -> None:
    """Plain-text USER/PASS allowed for 127.0.0.3 only: a client at .2 behind the same
    balancer is told to use TLS, one at .3 logs in."""
    gw = start_gateway(
        pop3={"proxy_protocol": True},
        security={**PROXY_SECURITY, "insecure_auth_networks": ["127.0.0.3/32"]},
    )
    hap = haproxy(Route("pop3", [(gw.host, gw.pop3_port)], "v2"))
    denied = BoundPOP3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)
    with pytest.raises(poplib.error_proto, match=r"-ERR"):
        denied.user(mail_user.name)
    denied.quit()

    class From3(BoundPOP3):
        source = "127.0.0.3"

    allowed = From3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)
    allowed.user(mail_user.name)
    allowed.pass_(mail_user.password)
    assert allowed.stat() == (0, 0)
    allowed.quit()


@pytest.mark.upstreams("dovecot")  # a rule of popgate's own: one upstream is enough
def test_connection_limits_count_the_header_s_address(
    mail_user: MailUser,
    start_gateway: Callable[..., GatewayProcess],
    haproxy: Callable[..., HAProxy],
) -> None:
    """max_connections_per_ip = 1: a second connection from 127.0.0.2 through the balancer is
    refused while one from 127.0.0.3 through the same balancer is served."""
    gw = start_gateway(
        pop3={"proxy_protocol": True},
        security={**PROXY_SECURITY, "max_connections_per_ip": 1, "max_connections": 10},
    )
    hap = haproxy(Route("pop3", [(gw.host, gw.pop3_port)], "v1"))
    first = BoundPOP3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
        BoundPOP3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)

    class From3(BoundPOP3):
        source = "127.0.0.3"

    other = From3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)
    other.user(mail_user.name)
    other.pass_(mail_user.password)
    other.quit()
    first.quit()
    gw.wait_for_log(
        rf"pop3 connection from {re.escape(CLIENT)}:\d+ refused: max_connections_per_ip"
    )


def _raw_exchange(host: str, port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``data`` and read until the server closes the connection. (Whatever the server
    has not read when it closes turns its close into a reset, which can discard the answer
    before it is read: so ``data`` is what the server reads in one go.)"""
    with socket.create_connection((host, port), TIMEOUT, (source, 0)) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(4096):
            received += chunk
        return received


def _refused_at_once(host: str, port: int) -> bytes:
    """A peer outside proxy_networks is refused before anything it sends is read: whatever
    PROXY header it would send is never believed, and the answer comes unasked."""
    with socket.create_connection((host, port), TIMEOUT, (CLIENT, 0)) as s:
        received = b""
        while chunk := s.recv(4096):
            received += chunk
        return received


@pytest.mark.upstreams("dovecot")  # refused before any upstream contact: one server is enough
def test_pop3_connection_without_header_is_refused(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = _pop3_gateway(start_gateway)
    answer = _raw_exchange(gw.host, gw.pop3_port, b"CAPA\r\n")  # from a trusted balancer
    assert answer == b"-ERR [SYS/PERM] connection refused (PROXY)\r\n"
    gw.wait_for_log(r"pop3 connection from 127\.0\.0\.1:\d+ refused: no PROXY header")
    assert "connect tls=" not in gw.log_text()


@pytest.mark.upstreams("dovecot")  # refused before any upstream contact: one server is enough
def test_pop3_header_from_outside_proxy_networks_is_refused(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = _pop3_gateway(start_gateway)
    answer = _refused_at_once(gw.host, gw.pop3_port)
    assert answer == b"-ERR [SYS/PERM] connection refused (PROXY)\r\n"
    gw.wait_for_log(
        rf"pop3 connection from {re.escape(CLIENT)}:\d+ refused: not in \[security\] proxy_networks"
    )
    assert "192.0.2.1" not in gw.log_text()


@pytest.mark.upstreams("dovecot")  # refused before any upstream contact: one server is enough
def test_pop3_tls_listener_without_header_is_closed(
    dovecot: Dovecot, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """A TLS client straight at the listener: its ClientHello is no PROXY header."""
    gw = _pop3_gateway(start_gateway)
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        poplib.POP3_SSL(gw.host, gw.pop3s_port, context=context, timeout=TIMEOUT)
    gw.wait_for_log(r"pop3 connection from 127\.0\.0\.1:\d+ refused: no PROXY header")


# --------------------------------------------------------------------- submission


def _message(user: MailUser) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{user.name}@example.test"
    msg["To"] = "rcpt@example.test"
    msg["Subject"] = "through HAProxy"
    msg.set_content("hello\n")
    return msg


@pytest.mark.upstreams("dovecot")  # reads the forwarded address from Dovecot's log (rip=)
@pytest.mark.parametrize(("version", "starttls"), [("v2", True), ("v1", False)])
def test_submission_client_address_comes_from_the_header(
    dovecot: Dovecot,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    haproxy: Callable[..., HAProxy],
    version: str,
    starttls: bool,
) -> None:
    gw = submission_gateway(
        mail_user,
        submission={"listen_tls": [], "proxy_protocol": True},
        security=PROXY_SECURITY,
    )
    hap = haproxy(Route("smtp", [(gw.host, gw.submission_port)], version))  # type: ignore[arg-type]
    with smtplib.SMTP(
        "127.0.0.1", hap.port("smtp"), timeout=TIMEOUT, source_address=(CLIENT, 0)
    ) as smtp:
        smtp.ehlo("device.test")
        if starttls:  # the client's address survives the new session STARTTLS begins
            smtp.starttls(context=ssl.create_default_context(cafile=str(dovecot.ca_file)))
            smtp.ehlo("device.test")
        smtp.login(f"{mail_user.name}#phone", mail_user.password)
        smtp.send_message(_message(mail_user))
    assert len(smtp_sink.messages) == 1
    auth_lines = [line for line in gw.log_text().splitlines() if mail_user.name in line]
    assert auth_lines and all(f"peer={CLIENT}:" in line for line in auth_lines if "peer=" in line)
    assert any(f"peer={CLIENT}:" in line for line in auth_lines), auth_lines
    match = re.search(
        rf"user=<{re.escape(mail_user.name)}>[^\n]*rip={CLIENT}\b", dovecot.log_text()
    )
    assert match, dovecot.log_text()[-3000:]


@pytest.mark.upstreams("dovecot")  # refused before any upstream contact: one server is enough
def test_submission_without_header_or_from_outside_is_refused(
    mail_user: MailUser,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(
        mail_user,
        submission={"listen_tls": [], "proxy_protocol": True},
        security=PROXY_SECURITY,
    )
    # aiosmtpd reads the first 5 octets to tell a header from anything else
    no_header = _raw_exchange(gw.host, gw.submission_port, b"EHLO ")
    assert no_header == b"421 4.7.0 connection refused (PROXY)\r\n"
    outside = _refused_at_once(gw.host, gw.submission_port)
    assert outside == b"421 4.7.0 connection refused (PROXY)\r\n"
    gw.wait_for_log(r"submission connection from 127\.0\.0\.1:\d+ refused: invalid PROXY")
    gw.wait_for_log(rf"submission connection from {re.escape(CLIENT)}:\d+ refused: not in")


# --------------------------------------------------------------------- replicas


def test_two_replicas_behind_haproxy_agree(
    upstream: Upstream,
    seeded_user: Callable[..., Any],
    start_gateway: Callable[..., GatewayProcess],
    haproxy: Callable[..., HAProxy],
) -> None:
    """Two devices of one user alternate between two replicas (HAProxy round-robin) for many
    sessions: every session sees the same UIDLs for the same messages, a message one device
    deleted (hidden) on one replica stays hidden on the other and only for that device, a new
    message shows up on both, and nothing leaves the upstream mailbox."""
    user = seeded_user([messages.plain(f"m{i}", n=i) for i in range(1, 7)])
    replicas = [_pop3_gateway(start_gateway), _pop3_gateway(start_gateway)]
    hap = haproxy(Route("pop3", [(gw.host, gw.pop3_port) for gw in replicas], "v2"))
    hidden: dict[str, set[bytes]] = {"phone": set(), "laptop": set()}
    known: dict[bytes, bytes] = {}  # UIDL -> message bytes, as first seen on either replica
    everything: set[bytes] | None = None
    added = 0
    sessions = 0
    for round_ in range(4):
        if round_ == 2:  # new mail between sessions
            upstream.append(user.name, user.password, messages.plain("late", n=99))
            added += 1
        # Round-robin alternates per connection: swapping the order each round sends each
        # device to the other replica every time.
        for device in ("phone", "laptop") if round_ % 2 == 0 else ("laptop", "phone"):
            client = BoundPOP3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)
            client.user(f"{user.name}#{device}")
            client.pass_(user.password)
            listing = {uidl: int(n) for n, uidl in (line.split() for line in client.uidl()[1])}
            if everything is None:
                everything = set(listing)
                assert len(everything) == 6
            elif len(listing) + len(hidden[device]) > len(everything):
                everything |= set(listing)  # the new message
            assert set(listing) == everything - hidden[device], (round_, device)
            for uidl, n in listing.items():
                body = b"\r\n".join(client.retr(n)[1]) + b"\r\n"
                assert known.setdefault(uidl, body) == body  # same UIDL, same message
            if device == "phone":
                victim = min(listing)
                client.dele(listing[victim])
                hidden["phone"].add(victim)
            client.quit()
            sessions += 1
    assert everything is not None and len(everything) == 6 + added
    assert hidden["phone"] and not hidden["laptop"]
    # HAProxy really alternated: each replica served half of the sessions, all for .2
    for gw in replicas:
        connects = [line for line in gw.log_text().splitlines() if "connect tls=" in line]
        assert len(connects) == sessions // 2, gw.log_text()[-2000:]
        assert all(f"peer={CLIENT}:" in line for line in connects), connects
        for device in ("phone", "laptop"):  # each device met both replicas, twice
            logins = re.findall(rf"login ok.*device={device}\b", gw.log_text())
            assert len(logins) == 2, (device, gw.log_text()[-3000:])
    # Nothing left the upstream mailbox: hidden is a per-device view.
    assert len(upstream.list_uids(user.name, user.password)) == 6 + added


def test_replica_killed_mid_session_loses_nothing(
    upstream: Upstream,
    seeded_user: Callable[..., Any],
    start_gateway: Callable[..., GatewayProcess],
    haproxy: Callable[..., HAProxy],
) -> None:
    """SIGKILL the replica serving a session after its DELE, before QUIT: the device's next
    session succeeds on the other replica and still sees every message (the DELE was never
    applied); a DELE + QUIT there is applied once; nothing leaves the upstream mailbox."""
    user = seeded_user([messages.plain(f"k{i}", n=i) for i in range(1, 5)])
    replicas = [_pop3_gateway(start_gateway), _pop3_gateway(start_gateway)]
    hap = haproxy(Route("pop3", [(gw.host, gw.pop3_port) for gw in replicas], "v2"))

    def session() -> poplib.POP3:
        client = BoundPOP3("127.0.0.1", hap.port("pop3"), timeout=TIMEOUT)
        client.user(f"{user.name}#phone")
        client.pass_(user.password)
        return client

    first = session()  # round-robin: replicas[0]
    uidls = [line.split()[1] for line in first.uidl()[1]]
    assert len(uidls) == 4
    first.retr(1)
    first.dele(1)
    replicas[0].wait_for_log(r"login ok.*device=phone")
    assert "device=phone" not in replicas[1].log_text()
    assert replicas[0].pid is not None
    os.kill(replicas[0].pid, signal.SIGKILL)
    replicas[0].wait(TIMEOUT)
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        first.quit()

    for _ in range(2):  # whichever replica HAProxy tries first, the survivor serves both
        again = session()
        assert [line.split()[1] for line in again.uidl()[1]] == uidls  # DELE never applied
        again.quit()
    third = session()
    third.dele(1)
    third.quit()
    fourth = session()
    assert [line.split()[1] for line in fourth.uidl()[1]] == uidls[1:]  # applied once
    fourth.quit()
    assert len(upstream.list_uids(user.name, user.password)) == 4
