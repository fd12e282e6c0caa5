"""Submission through popgate with real SMTP clients: relay to a sink, Sent copy in Dovecot."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import MailUser
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import make_message, smtp_session, wait_for_sent

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration


def test_smtplib_starttls_relays_and_stores_sent_copy(
    dovecot: Dovecot,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    message = make_message(f"{mail_user.name}@example.org", ["bob@example.org"], "first")
    with smtp_session(gw, dovecot, mail_user) as client:
        refused = client.sendmail(
            f"{mail_user.name}@example.org", ["bob@example.org", "carol@example.org"], message
        )
    assert refused == {}
    [received] = smtp_sink.wait_for(1)
    assert received.auth_user == mail_user.name
    assert received.rcpt_tos == ("bob@example.org", "carol@example.org")
    assert received.data == message
    assert b"Bcc" not in received.data
    sent = wait_for_sent(dovecot, mail_user, 1)
    [copy] = sent.values()
    assert copy.startswith(message.split(b"\r\n\r\n")[0])
    assert b"Bcc: carol@example.org\r\n" in copy
