"""Durability of the Sent copy: IMAP down, gateway killed, retries that must not duplicate.

The IMAP server is reached through a TcpProxy, so a test can make it refuse connections or
swallow its replies while popgate and the relay keep working.
"""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.submission.spool import KEY_FILE, SpoolStore, parse_key
from tests.conftest import MailUser
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import make_message, sent_mailbox, smtp_session, wait_for_sent
from tests.support.tcp_proxy import TcpProxy
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration


@pytest.fixture
def imap_proxy(upstream: Upstream) -> Iterator[TcpProxy]:
    with TcpProxy(upstream.host, upstream.imap_port) as proxy:
        yield proxy


def spool_dir(gw: GatewayProcess) -> Path:
    return gw.config_path.parent / "spool"


def spool_files(gw: GatewayProcess, suffix: str) -> list[Path]:
    directory = spool_dir(gw)
    return sorted(directory.glob(f"*{suffix}")) if directory.exists() else []


def spool_list(gw: GatewayProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "spool", "list", "-c", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def send(gw: GatewayProcess, upstream: Upstream, user: MailUser, subject: str) -> bytes:
    message = make_message(f"{user.name}@example.org", ["bob@example.org"], subject)
    with smtp_session(gw, upstream, user) as client:
        assert client.sendmail(f"{user.name}@example.org", ["bob@example.org"], message) == {}
    return message


def proxied_gateway(
    submission_gateway: Callable[..., GatewayProcess], user: MailUser, proxy: TcpProxy, **imap: Any
) -> GatewayProcess:
    return submission_gateway(user, upstream_imap={"port": proxy.port, **imap})


def test_imap_down_entry_waits_with_reason_then_lands_once(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    gw = proxied_gateway(submission_gateway, mail_user, imap_proxy)
    with smtp_session(gw, upstream, mail_user) as client:  # AUTH needs IMAP: proxy still up
        imap_proxy.refuse = True  # IMAP goes down: new connections fail ...
        imap_proxy.drop_all()  # ... and so does the one AUTH logged in with
        message = make_message(f"{mail_user.name}@example.org", ["bob@example.org"], "offline")
        assert client.sendmail(f"{mail_user.name}@example.org", ["bob@example.org"], message) == {}
    assert smtp_sink.wait_for(1)[0].data == message  # relayed although IMAP is down
    gw.wait_for_log(r"Sent copy of spool entry \S+ not stored \(attempt 2\)")
    [pending] = spool_files(gw, ".pending")
    listing = spool_list(gw)
    assert listing.returncode == 0, listing.stderr
    assert pending.name.removesuffix(".pending") in listing.stdout
    assert mail_user.name in listing.stdout
    assert "Sent copy not stored after" in listing.stdout
    assert "IMAP" in listing.stdout or "connection" in listing.stdout.lower()
    assert sent_mailbox(upstream, mail_user) == {}

    imap_proxy.refuse = False
    [copy] = wait_for_sent(upstream, mail_user, 1).values()
    assert copy == message
    wait_until(lambda: not spool_files(gw, ".pending"), "spool entry removed")
    assert "empty" in spool_list(gw).stdout
    assert len(sent_mailbox(upstream, mail_user)) == 1


def test_sigkill_after_relay_before_append_copy_appears_once_after_restart(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    gw = proxied_gateway(submission_gateway, mail_user, imap_proxy)
    with smtp_session(gw, upstream, mail_user) as client:
        imap_proxy.refuse = True  # IMAP goes down: new connections fail ...
        imap_proxy.drop_all()  # ... and so does the one AUTH logged in with
        message = make_message(f"{mail_user.name}@example.org", ["bob@example.org"], "crash")
        assert client.sendmail(f"{mail_user.name}@example.org", ["bob@example.org"], message) == {}
    smtp_sink.wait_for(1)
    assert len(spool_files(gw, ".pending")) == 1
    assert gw.pid is not None
    os.kill(gw.pid, signal.SIGKILL)
    assert gw.wait() == -signal.SIGKILL

    imap_proxy.refuse = False
    gw.restart()
    [copy] = wait_for_sent(upstream, mail_user, 1).values()
    assert copy == message
    wait_until(lambda: not spool_files(gw, ".pending"), "spool entry removed")
    assert len(sent_mailbox(upstream, mail_user)) == 1
    assert len(smtp_sink.messages) == 1  # the restart relayed nothing again


def test_sigkill_after_append_landed_before_spool_removal_no_second_copy(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    """The APPEND reached Dovecot but its OK never reached popgate, which then died: the retry
    after the restart finds the same Message-ID with the same bytes and appends nothing."""
    # Clear text on loopback, so the proxy can see the APPEND go by.
    gw = proxied_gateway(submission_gateway, mail_user, imap_proxy, security="none")
    imap_proxy.freeze_after = b" APPEND "
    message = send(gw, upstream, mail_user, "half done")
    assert imap_proxy.frozen.wait(20)
    wait_for_sent(upstream, mail_user, 1)  # Dovecot stored it; popgate does not know
    assert len(spool_files(gw, ".pending")) == 1
    assert gw.pid is not None
    os.kill(gw.pid, signal.SIGKILL)
    gw.wait()

    imap_proxy.freeze_after = None
    imap_proxy.drop_all()
    gw.restart()
    wait_until(lambda: not spool_files(gw, ".pending"), "spool entry removed")
    gw.wait_for_log(r"Sent copy stored: already in Sent")
    [copy] = sent_mailbox(upstream, mail_user).values()
    assert copy == message


def test_same_message_id_different_messages_are_both_sent_and_saved(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    sender = f"{mail_user.name}@example.org"
    reused = "<always-the-same@old-printer.test>"
    first = make_message(sender, ["bob@example.org"], "scan 1", "page one\r\n", message_id=reused)
    second = make_message(sender, ["bob@example.org"], "scan 2", "page two\r\n", message_id=reused)
    with smtp_session(gw, upstream, mail_user) as client:
        assert client.sendmail(sender, ["bob@example.org"], first) == {}
        assert client.sendmail(sender, ["bob@example.org"], second) == {}
    assert [m.data for m in smtp_sink.wait_for(2)] == [first, second]
    copies = wait_for_sent(upstream, mail_user, 2)
    assert sorted(copies.values()) == sorted([first, second])


def test_spool_files_are_private_and_encrypted(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    """No master identity: the entry must keep the password, sealed; the key file is 0600."""
    gw = proxied_gateway(
        submission_gateway, mail_user, imap_proxy, master_user=None, master_password=None
    )
    with smtp_session(gw, upstream, mail_user) as client:
        imap_proxy.refuse = True  # IMAP goes down: new connections fail ...
        imap_proxy.drop_all()  # ... and so does the one AUTH logged in with
        message = make_message(
            f"{mail_user.name}@example.org", ["bob@example.org"], "secret", "the body\r\n"
        )
        client.sendmail(f"{mail_user.name}@example.org", ["bob@example.org"], message)
    gw.wait_for_log(r"Sent copy of spool entry \S+ not stored")
    key_file = spool_dir(gw) / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool_dir(gw).stat().st_mode) == 0o700
    [pending] = spool_files(gw, ".pending")
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    raw = pending.read_bytes()
    for secret in (b"the body", mail_user.password.encode(), mail_user.name.encode(), b"Subject"):
        assert secret not in raw
    store = SpoolStore(spool_dir(gw), parse_key(key_file.read_text()))
    entry = store.load(pending.name.removesuffix(".pending"))
    assert entry.message == message
    assert entry.password == mail_user.password
    assert mail_user.password not in gw.log_text()
    assert base64.b64encode(mail_user.password.encode()).decode() not in gw.log_text()

    imap_proxy.refuse = False  # the stored credential is what the retry logs in with
    wait_for_sent(upstream, mail_user, 1)


def test_with_master_identity_no_password_is_spooled_and_retry_uses_master(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    gw = proxied_gateway(submission_gateway, mail_user, imap_proxy)  # base config has a master
    with smtp_session(gw, upstream, mail_user) as client:
        imap_proxy.refuse = True  # IMAP goes down: new connections fail ...
        imap_proxy.drop_all()  # ... and so does the one AUTH logged in with
        message = make_message(f"{mail_user.name}@example.org", ["bob@example.org"], "master")
        client.sendmail(f"{mail_user.name}@example.org", ["bob@example.org"], message)
    gw.wait_for_log(r"Sent copy of spool entry \S+ not stored")
    [pending] = spool_files(gw, ".pending")
    store = SpoolStore(spool_dir(gw), parse_key((spool_dir(gw) / KEY_FILE).read_text()))
    assert store.load(pending.name.removesuffix(".pending")).password is None
    mark = len(upstream.log_text())
    imap_proxy.refuse = False
    wait_for_sent(upstream, mail_user, 1)
    if upstream.kind == "dovecot":
        assert f"Master user logging in as {mail_user.name}" in upstream.log_text()[mark:]
    else:
        # Cyrus logs the authorization identity; popgate logs users in with LOGIN
        # ("plaintext"), so SASL PLAIN here is the master identity's proxy login.
        assert f"] {mail_user.name} PLAIN+TLS User logged in" in upstream.log_text()[mark:]


def test_sigterm_keeps_pending_entries_for_the_next_start(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    gw = proxied_gateway(submission_gateway, mail_user, imap_proxy)
    with smtp_session(gw, upstream, mail_user) as client:
        imap_proxy.refuse = True  # IMAP goes down: new connections fail ...
        imap_proxy.drop_all()  # ... and so does the one AUTH logged in with
        message = make_message(f"{mail_user.name}@example.org", ["bob@example.org"], "term")
        client.sendmail(f"{mail_user.name}@example.org", ["bob@example.org"], message)
    gw.wait_for_log(r"Sent copy of spool entry \S+ not stored")
    assert gw.stop() == 0
    assert len(spool_files(gw, ".pending")) == 1
    imap_proxy.refuse = False
    gw.start()
    [copy] = wait_for_sent(upstream, mail_user, 1).values()
    assert copy == message
