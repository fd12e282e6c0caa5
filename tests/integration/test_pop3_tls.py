"""TLS on both sides: STLS and implicit TLS towards devices (with the self-signed certificate
the gateway generates at start), the TLS floor for old devices, the plaintext-login policy, and
the verification and security modes of the upstream IMAP connection.
"""

from __future__ import annotations

import poplib
import re
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.pop3_helpers import (
    GREETING,
    Account,
    PopWire,
    make_account,
    on_the_wire,
    report_logs,
    running_gateway,
    trust_gateway_cert,
)
from tests.support import messages
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

PLAINTEXT_REFUSED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on insecure connections; use STLS or TLS\r\n"
)
SYS_TEMP = b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n"
# Python warns about every mention of TLS 1.0; here it is the point.
tls1_warnings = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated")


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Default TLS settings; no certificate files exist, so the gateway generates them."""
    directory = tmp_path_factory.mktemp("pop3-tls")
    assert not (directory / "popgate.key").exists()
    with running_gateway(upstream, directory) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gateway: GatewayProcess) -> None:
    report_logs(request, gateway)


@pytest.fixture(scope="module")
def account(upstream: Upstream) -> Account:
    return make_account(upstream, [messages.plain("over TLS", n=1), messages.dotted()], "tls")


def tls1_client(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` restricted to TLS 1.0, as the old devices the floor exists for speak it."""
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def imap_logins(upstream: Upstream, user: str) -> list[bool]:
    """One entry per successful IMAP login of ``user`` in the server's log: whether it ran over
    TLS (STARTTLS or implicit)."""
    lines = upstream.log_text().splitlines()
    if upstream.kind == "dovecot":
        # imap-login: Info: Login: user=<NAME>, method=PLAIN, rip=…, mpid=…, TLS, session=<…>
        return [
            ", TLS," in line
            for line in lines
            if "imap-login: Info: Login:" in line and f"user=<{user}>" in line and "mpid=" in line
        ]
    # Cyrus: login: localhost [127.0.0.1] NAME plaintext+TLS User logged in SESSIONID=<…>
    pattern = re.compile(rf"login: \S+ \[[^]]*\] {re.escape(user)} (\S+) User logged in")
    found = (pattern.search(line) for line in lines)
    return ["+TLS" in m.group(1) for m in found if m]


# --------------------------------------------------------------------- the generated certificate
def test_generated_certificate_and_private_key(gateway: GatewayProcess) -> None:
    key_file = Path(gateway.config["tls"]["key_file"])
    cert_file = Path(gateway.config["tls"]["cert_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in key_file.read_bytes()
    assert b"BEGIN CERTIFICATE" in cert_file.read_bytes()
    assert "generated a self-signed certificate" in gateway.log_text()
    assert str(key_file.parent) in gateway.log_text()
    assert "PRIVATE KEY" not in gateway.log_text()


# --------------------------------------------------------------------- towards devices
def test_poplib_stls_then_login(gateway: GatewayProcess, account: Account) -> None:
    context, hostname = trust_gateway_cert(gateway)
    pop = poplib.POP3(hostname, gateway.pop3_port, timeout=15)  # stls() checks this name
    try:
        assert pop.stls(context=context).startswith(b"+OK")
        assert "STLS" not in pop.capa()
        pop.user(account.name)
        pop.pass_(account.password)
        assert pop.stat() == (2, sum(map(len, account.messages)))
        _, lines, _ = pop.retr(2)
        assert b"\r\n".join(lines) + b"\r\n" == on_the_wire(account.messages[1])
    finally:
        assert pop.quit() == b"+OK Bye"


def test_poplib_implicit_tls(gateway: GatewayProcess, account: Account) -> None:
    context, hostname = trust_gateway_cert(gateway)
    pop = poplib.POP3_SSL(hostname, gateway.pop3s_port, context=context, timeout=15)
    try:
        assert pop.getwelcome() == GREETING.rstrip()
        assert pop.sock.version() in ("TLSv1.2", "TLSv1.3")
        pop.user(account.name)
        pop.pass_(account.password)
        assert [line.split()[0] for line in pop.uidl()[1]] == [b"1", b"2"]
    finally:
        assert pop.quit() == b"+OK Bye"


def test_commands_pipelined_behind_stls_are_discarded(
    gateway: GatewayProcess, account: Account
) -> None:
    """RFC 2595 §3.1 (the STARTTLS command-injection class, CVE-2011-0411): anything the
    client sent in the clear after STLS must not be executed inside the TLS session."""
    context, hostname = trust_gateway_cert(gateway)
    with PopWire.connect(gateway.host, gateway.pop3_port) as client:
        client.send(f"STLS\r\nUSER {account.name}\r\nPASS {account.password}\r\n".encode())
        assert client.line() == b"+OK Begin TLS negotiation\r\n"
        client.sock = context.wrap_socket(client.sock, server_hostname=hostname)
        assert client.command("STAT") == b"-ERR Command not valid in this state\r\n"
        assert client.command("PASS x") == b"-ERR Send USER first\r\n"
        client.login(account.name, account.password)
        assert client.quit() == b"+OK Bye\r\n"


def test_stls_is_refused_after_login(gateway: GatewayProcess, account: Account) -> None:
    with PopWire.connect(gateway.host, gateway.pop3_port) as client:
        client.login(account.name, account.password)
        assert client.command("STLS") == b"-ERR Command not valid in this state\r\n"
        assert client.quit() == b"+OK Bye\r\n"


@tls1_warnings
def test_default_floor_refuses_tls_1_0(gateway: GatewayProcess) -> None:
    context, hostname = trust_gateway_cert(gateway)
    tls1_client(context)
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol version|unsupported protocol"):
        PopWire.connect(gateway.host, gateway.pop3s_port, tls=context, server_hostname=hostname)
    with PopWire.connect(gateway.host, gateway.pop3_port) as client:
        with pytest.raises(ssl.SSLError, match=r"(?i)protocol version|unsupported protocol"):
            client.stls(context, hostname)


@tls1_warnings
def test_pop3_tls_min_version_lets_tls_1_0_devices_in(
    start_gateway: Callable[..., GatewayProcess], account: Account
) -> None:
    gw = start_gateway(pop3={"tls_min_version": "TLSv1"})
    context, hostname = trust_gateway_cert(gw)
    tls1_client(context)
    with PopWire.connect(gw.host, gw.pop3s_port, tls=context, server_hostname=hostname) as client:
        assert client.greeting == GREETING
        assert client.sock.version() == "TLSv1"  # type: ignore[attr-defined]
        client.login(account.name, account.password)
        assert client.fetch("RETR 2")[1] == on_the_wire(account.messages[1])
        assert client.quit() == b"+OK Bye\r\n"
    with PopWire.connect(gw.host, gw.pop3_port) as client:
        client.stls(context, hostname)
        assert client.sock.version() == "TLSv1"  # type: ignore[attr-defined]
        client.login(account.name, account.password)
        assert client.quit() == b"+OK Bye\r\n"


# --------------------------------------------------------------------- plaintext policy
def test_no_plaintext_login_outside_insecure_auth_networks(
    start_gateway: Callable[..., GatewayProcess], account: Account
) -> None:
    gw = start_gateway(security={"insecure_auth_networks": []})
    context, hostname = trust_gateway_cert(gw)
    with PopWire.connect(gw.host, gw.pop3_port) as client:
        _, caps = client.listing("CAPA")
        assert b"STLS" in caps
        assert b"USER" not in caps and b"SASL PLAIN" not in caps
        assert client.command(f"USER {account.name}") == PLAINTEXT_REFUSED
        assert client.command(f"PASS {account.password}") == b"-ERR Send USER first\r\n"
        assert client.auth_plain(account.name, account.password) == PLAINTEXT_REFUSED
        assert client.command("AUTH PLAIN") == PLAINTEXT_REFUSED
        client.stls(context, hostname)
        _, caps = client.listing("CAPA")
        assert b"USER" in caps and b"SASL PLAIN" in caps and b"STLS" not in caps
        client.login(account.name, account.password)
        assert client.quit() == b"+OK Bye\r\n"
    with PopWire.connect(gw.host, gw.pop3s_port, tls=context, server_hostname=hostname) as client:
        assert client.auth_plain(account.name, account.password).startswith(b"+OK Logged in")
    assert "login failed" not in gw.log_text()
    assert account.password not in gw.log_text()


# --------------------------------------------------------------------- towards the upstream
def test_upstream_certificate_not_trusted_without_ca_file(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess], account: Account
) -> None:
    """The test CA is not in the system store: the upstream must not be trusted (so the
    password is never sent to it), and the log must tell the operator that the certificate is
    the problem."""
    gw = start_gateway(upstream_imap={"ca_file": None, "verify_certificate": True})
    logins_before = len(imap_logins(upstream, account.name))
    with PopWire.connect(gw.host, gw.pop3_port) as client:
        assert client.auth_plain(account.name, account.password) == SYS_TEMP
    assert len(imap_logins(upstream, account.name)) == logins_before
    line = gw.wait_for_log(r"ERROR popgate\.pop3 login failed, upstream unavailable: .*").group(0)
    assert re.search(r"(?i)certificate", line), line
    assert account.password not in gw.log_text()


def test_upstream_implicit_tls(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess], account: Account
) -> None:
    gw = start_gateway(
        upstream_imap={"security": "tls", "port": upstream.imaps_port, "verify_certificate": True}
    )
    with PopWire.connect(gw.host, gw.pop3_port) as client:
        client.login(account.name, account.password)
        assert client.fetch("RETR 1")[1] == on_the_wire(account.messages[0])
        assert client.quit() == b"+OK Bye\r\n"
    assert imap_logins(upstream, account.name)[-1] is True


def test_upstream_without_tls(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> None:
    acct = make_account(upstream, [messages.plain("in the clear", n=2)], "cleartext")
    gw = start_gateway(upstream_imap={"security": "none", "port": upstream.imap_port})
    with PopWire.connect(gw.host, gw.pop3_port) as client:
        client.login(acct.name, acct.password)
        assert client.fetch("RETR 1")[1] == on_the_wire(acct.messages[0])
        assert client.quit() == b"+OK Bye\r\n"
    # make_account's own imaplib sessions use STARTTLS; the gateway's login is the clear one
    assert imap_logins(upstream, acct.name)[-1] is False
