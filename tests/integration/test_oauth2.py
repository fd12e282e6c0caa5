"""End to end against an OAuth-only upstream: ``popgate serve`` with ``auth = "oauth2"`` on IMAP
and SMTP, the real token store filled by ``popgate oauth login`` (device flow against the local
provider), real clients with the device password.

    device --POP3/SMTP, device password--> popgate --XOAUTH2/OAUTHBEARER--> Dovecot (passdb oauth2)
                                           popgate --AUTH XOAUTH2--> Postfix (Dovecot SASL)
    Dovecot --introspection--> local provider <--token endpoint (through a cuttable proxy)-- popgate

The upstream refuses passwords (a password login is refused: test_oauth2_login.py); the gateway
has no master identity, so retention sweeps and Sent copies can only use the stored grant.
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import messages
from tests.support.dovecot import Dovecot, issue_server_cert
from tests.support.gateway import GatewayProcess, merge_config
from tests.support.oauth_provider import OAuthProvider
from tests.support.postfix import Postfix
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

DOMAIN = "example.org"
DEVICE_PASSWORD = "scanner-pin-4711"
CLIENT_TIMEOUT = 120


@dataclass
class Stack:
    provider: OAuthProvider
    dovecot: Dovecot
    postfix: Postfix
    token_proxy: TcpProxy  # popgate's way to the provider's endpoints
    imap_proxy: TcpProxy  # popgate's way to Dovecot's IMAP


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with (
        OAuthProvider() as provider,
        Dovecot(
            oauth2_introspection_url=provider.introspection_url, auth_port=True, lmtp=True
        ) as dc,
        Postfix(
            lmtp=(dc.host, dc.lmtp_port), domains=[DOMAIN], sasl=(dc.host, dc.auth_port)
        ) as mta,
        TcpProxy(dc.host, provider.port) as token_proxy,
        TcpProxy(dc.host, dc.imap_port) as imap_proxy,
    ):
        yield Stack(provider, dc, mta, token_proxy, imap_proxy)


@pytest.fixture
def fresh(stack: Stack) -> Iterator[Stack]:
    """The stack as every test finds it: provider and IMAP reachable, long-lived tokens."""
    yield stack
    stack.token_proxy.refuse = False
    stack.imap_proxy.refuse = False
    stack.provider.access_token_lifetime = 3600.0


_names = iter(range(1, 10_000))


@pytest.fixture
def user(fresh: Stack) -> str:
    name = f"ouser{next(_names)}"
    fresh.dovecot.add_user(name, "upstream-refuses-passwords")
    return name


def seed(dc: Dovecot, user: str, bodies: list[bytes], **kwargs: Any) -> None:
    with dc.imap_as_master(user) as conn:
        for body in bodies:
            typ, _ = conn.append("INBOX", None, kwargs.get("internaldate"), body)
            assert typ == "OK"


def mailbox_count(dc: Dovecot, user: str, mailbox: str = "INBOX") -> int:
    with dc.imap_as_master(user) as conn:
        typ, data = conn.select(f'"{mailbox}"', readonly=True)
        assert typ == "OK", data
        return int(data[0] or 0)


def wait_until(
    condition: Callable[[], bool], what: str, gw: GatewayProcess | None = None, timeout: float = 30
) -> None:
    """Poll an upstream mailbox for an event that has a deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        log = gw.log_text()[-4000:] if gw is not None else ""
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{log}"
        time.sleep(0.1)


@pytest.fixture
def start_gateway(fresh: Stack, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(mechanism: str = "xoauth2", **sections: dict[str, Any]) -> GatewayProcess:
        dc, workdir = fresh.dovecot, tmp_path / f"gateway{len(started) + 1}"
        workdir.mkdir()
        provider_url = f"http://127.0.0.1:{fresh.token_proxy.port}"
        config = {
            "upstream.imap": {
                "host": dc.host,
                "port": fresh.imap_proxy.port,
                "security": "starttls",
                "ca_file": str(dc.ca_file),
                "auth": "oauth2",
            },
            "upstream.smtp": {
                "host": fresh.postfix.host,
                "port": fresh.postfix.port,
                "security": "none",
                "auth": "oauth2",
            },
            "oauth2": {
                "provider": "custom",
                "device_authorization_url": provider_url + "/device_authorization",
                "authorization_url": provider_url + "/authorize",
                "token_url": provider_url + "/token",
                "client_id": fresh.provider.client_id,
                "scopes": ["mail"],
                "mechanism": mechanism,
                "token_dir": str(workdir / "oauth"),
            },
            "pop3": {"listen": ["127.0.0.1:0"]},
            "submission": {
                "listen": ["127.0.0.1:0"],
                "spool_dir": str(workdir / "spool"),
                "retry_initial_delay": 1,
                "retry_max_delay": 2,
            },
            "tls": {
                "cert_file": str(workdir / "popgate.crt"),
                "key_file": str(workdir / "popgate.key"),
            },
            "security": {"auth_failure_delay": 0, "max_connections_per_ip": 2000},
            "log": {"level": "debug"},
        }
        config = merge_config(config, sections)
        issue_server_cert(
            dc.ca_file, dc.ca_key_file, workdir / "popgate.crt", workdir / "popgate.key"
        )
        gw = GatewayProcess(config, workdir / "popgate.toml")
        started.append(gw)
        return gw.start(30)

    yield start
    for gw in started:
        gw.stop()


def oauth_login(
    gw: GatewayProcess, provider: OAuthProvider, user: str, signed_in_as: str | None = None
) -> str:
    """``popgate oauth login USER --device-password-file F``: the device flow, approved at the
    provider as a person would in a browser (as ``signed_in_as``: by default ``user``).
    Returns what the command printed."""
    password_file = gw.config_path.parent / f"{user}.device-password"
    password_file.write_text(DEVICE_PASSWORD + "\n")
    os.chmod(password_file, 0o600)
    seen = provider.count("device_authorization")
    argv = [sys.executable, "-m", "gateway", "oauth", "login", user]
    argv += ["--device-password-file", str(password_file), "-c", str(gw.config_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        code = provider.wait_for_user_code(30, after=seen)
        provider.approve(code, signed_in_as or user)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert code in out + err  # the user code was shown to the operator
    return out + err


def oauth_login_in_browser(gw: GatewayProcess, user: str) -> str:
    """``popgate oauth login USER --flow browser``: the test is the browser, signed in at the
    provider as USER, following the redirect to popgate's loopback listener."""
    password_file = gw.config_path.parent / f"{user}.device-password"
    password_file.write_text(DEVICE_PASSWORD + "\n")
    argv = [sys.executable, "-m", "gateway", "oauth", "login", user, "--flow", "browser"]
    argv += ["--device-password-file", str(password_file), "-c", str(gw.config_path)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        printed = ""
        for line in proc.stdout:  # ends at EOF if the command dies: no endless wait
            printed += line
            if line.startswith("  http://"):
                break
        url = printed.splitlines()[-1].strip()
        assert url.startswith("http://"), printed
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(url, headers={"Cookie": f"session={user}"})
        with opener.open(request, timeout=60) as page:  # follows the 302 to 127.0.0.1:PORT
            assert b"popgate received the sign-in" in page.read()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, printed + out + err
    return printed + out + err


def pop_download(gw: GatewayProcess, login: str, password: str = DEVICE_PASSWORD) -> list[bytes]:
    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
    try:
        pop.user(login)
        pop.pass_(password)
        count, _ = pop.stat()
        return [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]
    finally:
        pop.quit()


def pop_login_error(gw: GatewayProcess, login: str, password: str = DEVICE_PASSWORD) -> bytes:
    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
    try:
        pop.user(login)
        with pytest.raises(poplib.error_proto) as caught:
            pop.pass_(password)
        return caught.value.args[0]
    finally:
        pop.close()


def secrets_of(provider: OAuthProvider, user: str) -> list[str]:
    """Every access and refresh token the provider ever issued to ``user``."""
    state = provider._state
    return [t for t, a in state.access.items() if a.user == user] + [
        t for t, r in state.refresh.items() if r.user == user
    ]


def assert_no_secrets(gw: GatewayProcess, stack: Stack, user: str, *more: str) -> None:
    logs = gw.log_text() + gw.stdout_text() + stack.dovecot.log_text() + stack.postfix.log_text()
    for secret in [*secrets_of(stack.provider, user), DEVICE_PASSWORD, *more]:
        assert secret not in logs


def cut_provider(stack: Stack) -> None:
    """popgate can no longer reach the provider: new connections refused, pooled ones cut."""
    stack.token_proxy.refuse = True
    stack.token_proxy.drop_all()


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_two_devices_download_byte_exact(
    fresh: Stack,
    user: str,
    start_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    mechanism: str,
) -> None:
    bodies = [
        messages.plain(f"scan {i}", f"page {i}\n" + ("x" * 70 + "\n") * (i * 20))
        for i in range(1, 4)
    ]
    # POP ends a message with CRLF before the final dot; the stored bytes otherwise unchanged
    on_the_wire = [b if b.endswith(b"\r\n") else b + b"\r\n" for b in bodies]
    seed(fresh.dovecot, user, bodies)
    gw = start_gateway(mechanism)
    printed = oauth_login(gw, fresh.provider, user)
    assert "http://" in printed  # the verification URL

    # An old POP client (mpop: STARTTLS, maildir) as one device ...
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    mpop = shutil.which("mpop")
    assert mpop, "mpop is not installed: run ./tests/bootstrap.sh"
    rc = tmp_path / "mpoprc"
    rc.write_text("")
    os.chmod(rc, 0o600)
    run = subprocess.run(
        [
            mpop, f"--file={rc}", f"--host={gw.host}", f"--port={gw.pop3_port}",
            "--auth=user", f"--user={user}#scanner",
            f"--passwordeval=printf %s '{DEVICE_PASSWORD}'",
            "--tls=on", "--tls-starttls=on", f"--tls-trust-file={fresh.dovecot.ca_file}",
            "--keep=on", "--received-header=off", f"--delivery=maildir,{maildir}",
            f"--uidls-file={tmp_path / 'uidls'}", "--only-new=off", "--half-quiet",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=CLIENT_TIMEOUT, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    got = sorted(p.read_bytes() for sub in ("new", "cur") for p in (maildir / sub).iterdir())
    assert got == sorted(b.replace(b"\r\n", b"\n") for b in on_the_wire)  # mpop stores LF

    # ... and poplib as another: byte-exact, CRLF as on the wire.
    assert pop_download(gw, f"{user}#phone") == on_the_wire
    assert mailbox_count(fresh.dovecot, user) == 3  # nothing left the mailbox
    assert f"user=<{user}>, method={mechanism.upper()}" in fresh.dovecot.log_text()
    assert_no_secrets(gw, fresh, user)


def test_browser_login_grant_downloads_byte_exact(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """The grant from the authorization-code flow (PKCE, loopback redirect) is as good as the
    device flow's: a real POP download through Dovecot's oauth2 passdb."""
    bodies = [messages.plain(f"page {i}", f"line {i}\n" * (i * 50)) for i in range(1, 3)]
    seed(fresh.dovecot, user, bodies)
    gw = start_gateway()
    printed = oauth_login_in_browser(gw, user)
    assert f"Stored the grant of {user}" in printed
    assert fresh.provider.count("authorization_code") >= 1
    on_the_wire = [b if b.endswith(b"\r\n") else b + b"\r\n" for b in bodies]
    assert pop_download(gw, f"{user}#scanner") == on_the_wire
    assert mailbox_count(fresh.dovecot, user) == 2
    assert f"user=<{user}>, method=XOAUTH2" in fresh.dovecot.log_text()
    assert_no_secrets(gw, fresh, user, *fresh.provider.issued_codes())
    for secret in [*secrets_of(fresh.provider, user), *fresh.provider.code_verifiers]:
        assert secret not in printed


def test_wrong_device_password_never_reaches_the_provider(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway()
    oauth_login(gw, fresh.provider, user)
    before = fresh.provider.requests
    answer = pop_login_error(gw, f"{user}#pc", "not-the-pin")
    assert answer.startswith(b"-ERR [AUTH]")
    assert fresh.provider.requests == before
    assert_no_secrets(gw, fresh, user, "not-the-pin")


def test_token_expiry_mid_day_refreshes_transparently(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    seed(fresh.dovecot, user, [messages.plain("morning", "hello\n")])
    fresh.provider.access_token_lifetime = 1  # expired as soon as it is issued, in effect
    gw = start_gateway()
    oauth_login(gw, fresh.provider, user)
    refreshes = fresh.provider.count("refresh_token")
    for _ in range(3):  # three sessions over the "day": each finds its token expired
        assert len(pop_download(gw, f"{user}#pc")) == 1
    assert fresh.provider.count("refresh_token") >= refreshes + 3
    # A token the upstream stops accepting before its expiry: forgotten, refreshed, retried.
    fresh.provider.access_token_lifetime = 3600
    assert len(pop_download(gw, f"{user}#pc")) == 1
    fresh.provider.expire_access_tokens(user)
    refreshes = fresh.provider.count("refresh_token")
    assert len(pop_download(gw, f"{user}#pc")) == 1
    assert fresh.provider.count("refresh_token") == refreshes + 1
    assert_no_secrets(gw, fresh, user)


def test_revoked_grant_is_auth_and_tells_the_operator(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway()
    oauth_login(gw, fresh.provider, user)
    assert pop_download(gw, f"{user}#pc") == []
    fresh.provider.revoke(user)
    answer = pop_login_error(gw, f"{user}#pc")
    assert answer.startswith(b"-ERR [AUTH]")
    # The answer can overtake the gateway's stderr on its way to the test: wait for the line.
    gw.wait_for_log(re.escape(f"popgate oauth login {user}"))
    lines = [line for line in gw.log_text().splitlines() if f"popgate oauth login {user}" in line]
    assert len(lines) == 1, gw.log_text()[-3000:]
    assert_no_secrets(gw, fresh, user)


def test_fresh_tokens_the_upstream_refuses_are_the_grants_fault_not_the_devices(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """The operator signed in as another account: the provider issues and refreshes tokens,
    Dovecot refuses them for this mailbox, a fresh one too. The device's password was right:
    ``-ERR [AUTH]`` at once with a log line naming the user and the command, and the device's
    address is not throttled (with failures counted, every later login from it, another
    user's too, would be held for the 600 s failure delay: longer than the clients wait)."""
    good = f"ouser{next(_names)}"
    fresh.dovecot.add_user(good, "x")
    seed(fresh.dovecot, good, [messages.plain("for the good user", "hello\n")])
    gw = start_gateway(security={"auth_failure_delay": 600, "auth_failure_max_delay": 600})
    oauth_login(gw, fresh.provider, user, signed_in_as=good)  # the wrong account
    oauth_login(gw, fresh.provider, good)

    def operator_lines() -> list[str]:
        command = re.compile(rf"popgate oauth login {user}\b")
        return [line for line in gw.log_text().splitlines() if command.search(line)]

    for attempt in (1, 2):
        refreshes = fresh.provider.count("refresh_token")
        answer = pop_login_error(gw, f"{user}#scanner")
        assert answer.startswith(b"-ERR [AUTH]"), answer
        assert fresh.provider.count("refresh_token") == refreshes + 1  # a fresh token was tried
        # the answer can overtake the gateway's stderr on its way to the test: wait for it
        wait_until(lambda n=attempt: len(operator_lines()) >= n, "the operator's log line", gw)
    assert len(pop_download(gw, f"{good}#pc")) == 1  # same address, not held back
    assert mailbox_count(fresh.dovecot, user) == 0
    lines = operator_lines()
    assert len(lines) == 2, gw.log_text()[-3000:]
    assert all("refuses the access tokens" in line for line in lines), lines
    assert_no_secrets(gw, fresh, user)
    assert_no_secrets(gw, fresh, good)


def test_provider_outage_is_sys_temp_and_a_cached_token_still_works(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    seed(fresh.dovecot, user, [messages.plain("one", "1\n")])
    gw = start_gateway()
    oauth_login(gw, fresh.provider, user)
    assert len(pop_download(gw, f"{user}#pc")) == 1  # a token is cached now
    cut_provider(fresh)
    assert len(pop_download(gw, f"{user}#pc")) == 1  # the cached, unexpired token
    fresh.provider.expire_access_tokens(user)  # now a refresh is needed
    answer = pop_login_error(gw, f"{user}#pc")
    assert answer.startswith(b"-ERR [SYS/TEMP]")
    fresh.token_proxy.refuse = False
    assert len(pop_download(gw, f"{user}#pc")) == 1  # back without a restart
    assert_no_secrets(gw, fresh, user)


def test_scan_to_email_relays_and_the_sent_copy_lands_through_a_retry(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """A scanner with a plain password submits; the relay logs in with the token; the Sent
    copy fails while IMAP is down and lands on a retry, with no device logged in."""
    recipient = f"ouser{next(_names)}"
    fresh.dovecot.add_user(recipient, "x")
    gw = start_gateway()
    oauth_login(gw, fresh.provider, user)
    fresh.imap_proxy.refuse = True  # the Sent copy's first attempt fails
    body = f"scanned page ({time.time_ns()})"
    swaks = subprocess.run(
        [
            "swaks", "--server", gw.host, "--port", str(gw.submission_port), "--tls",
            "--auth", "PLAIN", "--auth-user", f"{user}#scanner",
            "--auth-password", DEVICE_PASSWORD,
            "--from", f"{user}@{DOMAIN}", "--to", f"{recipient}@{DOMAIN}",
            "--header", "Subject: scan", "--body", body,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert "Ok: queued as" in swaks.stdout  # Postfix's verdict, after AUTH XOAUTH2
    wait_until(lambda: mailbox_count(fresh.dovecot, recipient) == 1, "delivery", gw)
    assert f"sasl_method=XOAUTH2, sasl_username={user}" in fresh.postfix.log_text()
    gw.wait_for_log(r"Sent copy of spool entry \S+ not stored \(attempt 1\)", timeout=30)
    assert mailbox_count(fresh.dovecot, user, "Sent") == 0
    fresh.imap_proxy.refuse = False
    wait_until(lambda: mailbox_count(fresh.dovecot, user, "Sent") == 1, "the Sent copy", gw)
    assert_no_secrets(gw, fresh, user)


def pop_delete_all(gw: GatewayProcess, login: str) -> None:
    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
    try:
        pop.user(login)
        pop.pass_(DEVICE_PASSWORD)
        count, _ = pop.stat()
        for n in range(1, count + 1):
            pop.dele(n)
    finally:
        pop.quit()


def test_retention_sweep_uses_the_stored_grant(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """No master identity: the periodic sweep can only log in with the user's grant.

    Two gateways share the token store (replicas): ``devices`` (retention off) serves the
    device that deletes; ``sweeper`` (retention on, a sweep every second) has seen the user
    once, before anything was deleted, and has no device logged in when it moves the message.
    """
    devices = start_gateway()
    oauth_login(devices, fresh.provider, user)
    token_dir = devices.config["oauth2"]["token_dir"]
    sweeper = start_gateway(
        retention={"delete_after_days": 1, "action": "trash", "sweep_interval": 1},
        oauth2={"token_dir": token_dir},
    )
    old = time.time() - 3 * 86400
    seed(fresh.dovecot, user, [messages.plain("old", "stale\n")], internaldate=old)
    assert len(pop_download(sweeper, f"{user}#pc")) == 1  # seen; nothing deleted yet
    pop_delete_all(devices, f"{user}#pc")
    assert mailbox_count(fresh.dovecot, user) == 1  # deleting by POP removes nothing upstream
    wait_until(lambda: mailbox_count(fresh.dovecot, user, "Trash") == 1, "the sweep", sweeper)
    assert mailbox_count(fresh.dovecot, user) == 0
    sweeper.wait_for_log(r"retention removed 1 messages \(trash\) .*user=" + user)
    # The operator's commands work through the same grant (no master identity configured).
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "device", "list", user, "-c", str(devices.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "pc" in listed.stdout
    assert_no_secrets(sweeper, fresh, user)
    assert_no_secrets(devices, fresh, user)


def smtp_auth(gw: GatewayProcess, login: str, password: str) -> tuple[int, bytes]:
    """AUTH PLAIN on the submission port after STARTTLS: the reply code and text."""
    import smtplib
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(gw.host, gw.submission_port, timeout=30) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return smtp.docmd("AUTH", f"PLAIN {blob}")


def test_submission_auth_answers(
    fresh: Stack, user: str, start_gateway: Callable[..., GatewayProcess]
) -> None:
    """535 for a wrong device password (the provider is not asked) and for a revoked grant
    (with the operator's log line), 454 when the provider cannot be reached."""
    # Tokens issued already expired: every AUTH needs a refresh (AUTH itself never uses one)
    fresh.provider.access_token_lifetime = 0
    gw = start_gateway()
    oauth_login(gw, fresh.provider, user)
    before = fresh.provider.requests
    code, text = smtp_auth(gw, f"{user}#scanner", "wrong")
    assert (code, text[:5]) == (535, b"5.7.8")
    assert fresh.provider.requests == before
    assert smtp_auth(gw, f"{user}#scanner", DEVICE_PASSWORD)[0] == 235

    cut_provider(fresh)
    code, text = smtp_auth(gw, f"{user}#scanner", DEVICE_PASSWORD)
    assert (code, text[:5]) == (454, b"4.7.0")
    fresh.token_proxy.refuse = False

    fresh.provider.revoke(user)
    code, text = smtp_auth(gw, f"{user}#scanner", DEVICE_PASSWORD)
    assert (code, text[:5]) == (535, b"5.7.8")
    # The answer can overtake the gateway's stderr on its way to the test: wait for the line.
    gw.wait_for_log(re.escape(f"popgate oauth login {user}"))
    lines = [line for line in gw.log_text().splitlines() if f"popgate oauth login {user}" in line]
    assert len(lines) == 1, gw.log_text()[-3000:]
    assert_no_secrets(gw, fresh, user, "wrong")
