"""A device that never heard its 250 sends the same message again: the relay gets it twice
(de-duplication never drops a send), the Sent mailbox keeps one copy. Different messages that
share a Message-ID are still each filed."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MailUser
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import make_message, sent_mailbox, smtp_session, wait_for_sent
from tests.support.tcp_proxy import TcpProxy
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration

STORED = re.compile(r"Sent copy stored: (.*)")


@pytest.fixture
def imap_proxy(upstream: Upstream) -> Iterator[TcpProxy]:
    with TcpProxy(upstream.host, upstream.imap_port) as proxy:
        yield proxy


def stored_outcomes(gw: GatewayProcess, count: int, timeout: float = 20.0) -> list[str]:
    """Bounded wait until ``count`` Sent copies were decided (appended or found); their lines."""
    deadline = time.monotonic() + timeout
    while True:
        found = STORED.findall(gw.log_text())
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} Sent copies decided:\n{gw.log_text()}")
        time.sleep(0.05)


def swaks_send(gw: GatewayProcess, upstream: Upstream, user: MailUser, data: Path) -> None:
    assert shutil.which("swaks"), "swaks missing: run ./tests/bootstrap.sh"
    result = subprocess.run(
        [
            "swaks", "--server", gw.host, "--port", str(gw.submission_port), "--tls",
            "--tls-verify", "--tls-ca-path", str(upstream.ca_file),
            "--auth", "PLAIN", "--auth-user", f"{user.name}#phone",
            "--auth-password", user.password,
            "--from", f"{user.name}@example.org", "--to", "bob@example.org,secret@example.org",
            "--data", str(data), "--helo", "device.test",
        ],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout.decode(errors="replace")


def test_same_message_sent_twice_is_relayed_twice_and_filed_once(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    gw = submission_gateway(mail_user)
    message = make_message(
        f"{mail_user.name}@example.org", ["bob@example.org"], "lost 250", "Once only.\r\n"
    )
    data = tmp_path / "message.eml"
    data.write_bytes(message)
    swaks_send(gw, upstream, mail_user, data)
    swaks_send(gw, upstream, mail_user, data)  # the device retries: same bytes, same envelope

    first, second = smtp_sink.wait_for(2)
    assert first.data == second.data and first.data.startswith(message)
    outcomes = stored_outcomes(gw, 2)
    assert sum("already in Sent" in line for line in outcomes) == 1, outcomes
    [copy] = sent_mailbox(upstream, mail_user).values()
    assert copy.startswith(message.split(b"\r\n\r\n")[0])
    assert b"Bcc: secret@example.org\r\n" in copy


def test_same_message_sent_again_after_a_restart_is_filed_once(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    """The check looks in the Sent mailbox, not in the gateway's memory: it holds across a
    restart, and so across replicas."""
    gw = submission_gateway(mail_user)
    sender = f"{mail_user.name}@example.org"
    message = make_message(sender, ["bob@example.org"], "across restarts")
    with smtp_session(gw, upstream, mail_user) as client:
        assert client.sendmail(sender, ["bob@example.org"], message) == {}
    wait_for_sent(upstream, mail_user, 1)
    gw.restart()
    with smtp_session(gw, upstream, mail_user) as client:
        assert client.sendmail(sender, ["bob@example.org"], message) == {}
    assert len(smtp_sink.wait_for(2)) == 2
    assert "already in Sent" in stored_outcomes(gw, 2)[1]
    assert list(sent_mailbox(upstream, mail_user).values()) == [message]


def test_both_sends_waiting_in_the_spool_land_once(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    """IMAP is down while the device sends twice; at the next start both spool entries are
    tried at the same moment, and still one copy lands."""
    gw = submission_gateway(mail_user, upstream_imap={"port": imap_proxy.port})
    sender = f"{mail_user.name}@example.org"
    message = make_message(sender, ["bob@example.org"], "both waiting")
    with (
        smtp_session(gw, upstream, mail_user) as first,
        smtp_session(gw, upstream, mail_user) as second,
    ):  # AUTH needs IMAP: both log in while it is up
        imap_proxy.refuse = True  # IMAP goes down: new connections fail ...
        imap_proxy.drop_all()  # ... and so does the one AUTH logged in with
        assert first.sendmail(sender, ["bob@example.org"], message) == {}
        assert second.sendmail(sender, ["bob@example.org"], message) == {}
    assert len(smtp_sink.wait_for(2)) == 2
    deadline = time.monotonic() + 20
    while len(re.findall(r"not stored \(attempt 1\)", gw.log_text())) < 2:
        assert time.monotonic() < deadline, gw.log_text()
        time.sleep(0.05)
    assert gw.stop() == 0  # both entries stay pending
    imap_proxy.refuse = False
    gw.start()
    outcomes = stored_outcomes(gw, 2)
    assert sum("already in Sent" in line for line in outcomes) == 1, outcomes
    assert list(sent_mailbox(upstream, mail_user).values()) == [message]


def test_same_message_to_other_blind_recipients_is_filed_again(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    """Same bytes, other envelope: a different send, and its copy records who got it."""
    gw = submission_gateway(mail_user)
    sender = f"{mail_user.name}@example.org"
    message = make_message(sender, ["bob@example.org"], "scan to two people")
    with smtp_session(gw, upstream, mail_user) as client:
        assert client.sendmail(sender, ["bob@example.org", "carol@example.org"], message) == {}
        assert client.sendmail(sender, ["bob@example.org", "dave@example.org"], message) == {}
    assert len(smtp_sink.wait_for(2)) == 2
    copies = sorted(wait_for_sent(upstream, mail_user, 2).values())
    assert [b"Bcc: carol@example.org\r\n" in c for c in copies] == [True, False]
    assert [b"Bcc: dave@example.org\r\n" in c for c in copies] == [False, True]
