"""Upstream connections of a submission: how many, and what happens when one dies between
AUTH and the message (docs/benchmark.md, "Submission").

- The IMAP connection AUTH logged in with stores the message's Sent copy: one upstream login
  per submission, not two. If it died meanwhile, a fresh login in the same attempt stores the
  copy, once.
- The relay connection is set up while AUTH is checked; one the relay dropped before MAIL is
  replaced, and a failed AUTH closes it.

Every test counts what reached the real upstreams (IMAP through a TcpProxy, the relay's
received messages) and reads the Sent mailbox back.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import MailUser
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import (
    make_message,
    message_id_of,
    sent_mailbox,
    smtp_session,
    wait_for_sent,
)
from tests.support.tcp_proxy import TcpProxy
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)

STORED = re.compile(r"Sent copy stored: .*")


@pytest.fixture
def imap_proxy(upstream: Upstream) -> Iterator[TcpProxy]:
    with TcpProxy(upstream.host, upstream.imap_port) as proxy:
        yield proxy


@pytest.fixture
def relay_proxy(smtp_sink: SmtpSink) -> Iterator[TcpProxy]:
    with TcpProxy(smtp_sink.host, smtp_sink.port) as proxy:
        yield proxy


def stored_lines(gw: GatewayProcess, count: int, timeout: float = 20.0) -> list[str]:
    """Bounded wait for ``count`` "Sent copy stored" lines in the gateway's log."""
    deadline = time.monotonic() + timeout
    while True:
        found = STORED.findall(gw.log_text())
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, gw.log_text()
        time.sleep(0.05)


def test_sent_copy_is_stored_over_the_auth_login(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    """Two sessions, one message each: two IMAP connections in all (was four)."""
    gw = submission_gateway(mail_user, upstream_imap={"port": imap_proxy.port})
    sender = f"{mail_user.name}@example.org"
    messages = [make_message(sender, ["bob@example.org"], f"one login {n}") for n in (1, 2)]
    for message in messages:
        with smtp_session(gw, upstream, mail_user) as client:
            assert client.sendmail(sender, ["bob@example.org"], message) == {}
    assert len(smtp_sink.wait_for(2)) == 2
    stored = stored_lines(gw, 2)

    assert all("appended to Sent" in line for line in stored), stored
    assert sorted(wait_for_sent(upstream, mail_user, 2).values()) == sorted(messages)
    assert imap_proxy.connections == 2


def test_second_message_of_a_session_logs_in_for_its_copy(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    """The AUTH connection serves one copy; the next message of the session gets a login."""
    gw = submission_gateway(mail_user, upstream_imap={"port": imap_proxy.port})
    sender = f"{mail_user.name}@example.org"
    messages = [make_message(sender, ["bob@example.org"], f"same session {n}") for n in (1, 2)]
    with smtp_session(gw, upstream, mail_user) as client:
        for message in messages:
            assert client.sendmail(sender, ["bob@example.org"], message) == {}
    assert len(smtp_sink.wait_for(2)) == 2
    stored_lines(gw, 2)

    assert sorted(wait_for_sent(upstream, mail_user, 2).values()) == sorted(messages)
    assert imap_proxy.connections == 2


def test_auth_connection_lost_before_the_message_copy_still_lands_once(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    imap_proxy: TcpProxy,
) -> None:
    """The IMAP server drops the connection AUTH made (a restart, an idle timeout); the server
    itself is up. The copy is stored at the first attempt over a fresh login, once."""
    gw = submission_gateway(mail_user, upstream_imap={"port": imap_proxy.port})
    sender = f"{mail_user.name}@example.org"
    message = make_message(sender, ["bob@example.org"], "auth connection dropped")
    with smtp_session(gw, upstream, mail_user) as client:
        imap_proxy.drop_all()
        assert client.sendmail(sender, ["bob@example.org"], message) == {}
    assert len(smtp_sink.wait_for(1)) == 1
    stored = stored_lines(gw, 1)

    assert "appended to Sent" in stored[0]
    assert "the AUTH connection is gone" in gw.log_text()
    assert "not stored (attempt" not in gw.log_text()
    assert list(sent_mailbox(upstream, mail_user).values()) == [message]
    assert imap_proxy.connections == 2


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_relay_connection_dropped_after_auth_is_replaced(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    relay_proxy: TcpProxy,
) -> None:
    """The relay connection set up during AUTH is gone by MAIL: a new one carries the message,
    which arrives once, and its copy lands once."""
    gw = submission_gateway(mail_user, upstream_smtp={"port": relay_proxy.port})
    # the gateway's first look at the relay's extensions, at start: one connection, closed
    wait_until(lambda: relay_proxy.client_closed == 1, "the start-up probe")
    sender = f"{mail_user.name}@example.org"
    message = make_message(sender, ["bob@example.org"], "relay dropped before MAIL")
    with smtp_session(gw, upstream, mail_user) as client:
        wait_until(lambda: relay_proxy.connections == 2, "a relay connection during AUTH")
        relay_proxy.drop_all()
        assert client.sendmail(sender, ["bob@example.org"], message) == {}
    received = smtp_sink.wait_for(1)
    stored_lines(gw, 1)

    assert len(received) == 1
    assert message_id_of(received[0].data) == message_id_of(message)
    assert relay_proxy.connections == 3
    assert list(sent_mailbox(upstream, mail_user).values()) == [message]


def test_failed_auth_closes_the_prepared_relay_connection(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    relay_proxy: TcpProxy,
) -> None:
    """A wrong password: 535, and the relay connection opened meanwhile is closed while the
    client is still connected, so a guesser cannot pile up connections at the relay."""
    gw = submission_gateway(mail_user, upstream_smtp={"port": relay_proxy.port})
    wait_until(lambda: relay_proxy.client_closed == 1, "the start-up probe")
    with smtp_session(gw, upstream) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(mail_user.name, "not-the-password")
        assert refused.value.smtp_code == 535
        wait_until(
            lambda: relay_proxy.client_closed == relay_proxy.connections,
            "every relay connection closed by the gateway",
        )
        # the probe, and one per AUTH: smtplib tries PLAIN, then LOGIN
        assert relay_proxy.connections == 3

    assert smtp_sink.wait_for(0) == []
