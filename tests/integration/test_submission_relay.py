"""Submission through popgate with real SMTP clients: relay to a sink, Sent copy in Dovecot."""

from __future__ import annotations

import base64
import smtplib
import socket
import time
from collections.abc import Callable

import pytest

from tests.conftest import MailUser
from tests.support.dovecot import free_port
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import (
    client_context,
    make_message,
    message_id_of,
    sent_mailbox,
    smtp_session,
    wait_for_sent,
)
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration


def test_smtplib_starttls_relays_and_stores_sent_copy(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    message = make_message(f"{mail_user.name}@example.org", ["bob@example.org"], "first")
    with smtp_session(gw, upstream, mail_user) as client:
        refused = client.sendmail(
            f"{mail_user.name}@example.org", ["bob@example.org", "carol@example.org"], message
        )
    assert refused == {}
    [received] = smtp_sink.wait_for(1)
    assert received.auth_user == mail_user.name
    assert received.rcpt_tos == ("bob@example.org", "carol@example.org")
    assert received.data == message
    assert b"Bcc" not in received.data
    sent = wait_for_sent(upstream, mail_user, 1)
    [copy] = sent.values()
    assert copy.startswith(message.split(b"\r\n\r\n")[0])
    assert b"Bcc: carol@example.org\r\n" in copy


# --------------------------------------------------------------------- the relay's verdict
def _sender(user: MailUser) -> str:
    return f"{user.name}@example.org"


def test_refused_recipient_gets_the_relays_reply_others_are_sent(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    smtp_sink.rcpt_replies["nobody@example.org"] = "550 5.1.1 <nobody@example.org>: unknown"
    smtp_sink.rcpt_replies["later@example.org"] = "450 4.2.1 Mailbox busy"
    message = make_message(_sender(mail_user), ["bob@example.org"], "partial")
    rcpts = ["bob@example.org", "nobody@example.org", "later@example.org", "hidden@example.org"]
    with smtp_session(gw, upstream, mail_user) as client:
        refused = client.sendmail(_sender(mail_user), rcpts, message)
    assert refused == {
        "nobody@example.org": (550, b"5.1.1 <nobody@example.org>: unknown"),
        "later@example.org": (450, b"4.2.1 Mailbox busy"),
    }
    [received] = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ("bob@example.org", "hidden@example.org")
    [copy] = wait_for_sent(upstream, mail_user, 1).values()
    assert b"Bcc: hidden@example.org\r\n" in copy
    assert b"nobody@" not in copy.split(b"\r\n\r\n")[0]


def test_all_recipients_refused_nothing_sent_nothing_saved(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    smtp_sink.rcpt_replies["nobody@example.org"] = "550 5.1.1 unknown user"
    message = make_message(_sender(mail_user), ["nobody@example.org"], "none")
    with smtp_session(gw, upstream, mail_user) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            client.sendmail(_sender(mail_user), ["nobody@example.org"], message)
        assert caught.value.recipients == {"nobody@example.org": (550, b"5.1.1 unknown user")}
        assert client.noop() == (250, b"2.0.0 OK")  # the session goes on
    assert smtp_sink.messages == []
    assert not list((gw.config_path.parent / "spool").glob("*.pending"))


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"data_reply": "451 4.3.0 Queue full, try later"}, (451, b"4.3.0 Queue full, try later")),
        ({"data_reply": "554 5.7.1 Spam detected"}, (554, b"5.7.1 Spam detected")),
        ({"drop_at": "DATA"}, (451, b"4.4.2 Connection to the relay was lost; try again later")),
    ],
    ids=["4xx", "5xx", "connection-drop"],
)
def test_relay_refusing_the_message_reaches_the_client_and_no_copy_is_kept(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    fault: dict[str, str],
    expected: tuple[int, bytes],
) -> None:
    gw = submission_gateway(mail_user)
    for name, value in fault.items():
        setattr(smtp_sink, name, value)
    message = make_message(_sender(mail_user), ["bob@example.org"], "refused")
    with smtp_session(gw, upstream, mail_user) as client:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail(_sender(mail_user), ["bob@example.org"], message)
        assert (caught.value.smtp_code, caught.value.smtp_error) == expected
        # The next transaction works, on a fresh relay connection if the old one died.
        smtp_sink.faults.data_reply = smtp_sink.faults.drop_at = None
        assert client.sendmail(_sender(mail_user), ["bob@example.org"], message) == {}
    assert len(smtp_sink.wait_for(1)) == 1
    assert len(wait_for_sent(upstream, mail_user, 1)) == 1


def test_sender_refused_by_relay(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    smtp_sink.mail_reply = "553 5.7.1 Sender address rejected: not owned by user"
    with smtp_session(gw, upstream, mail_user) as client:
        code, text = client.mail("ceo@example.org")
    assert (code, text) == (553, b"5.7.1 Sender address rejected: not owned by user")


def test_slow_relay_client_waits_for_the_real_verdict(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    smtp_sink.delays["DATA"] = 1.5
    message = make_message(_sender(mail_user), ["bob@example.org"], "slow")
    with smtp_session(gw, upstream, mail_user) as client:
        client.mail(_sender(mail_user))
        client.rcpt("bob@example.org")
        started = time.monotonic()
        code, text = client.data(message)
        elapsed = time.monotonic() - started
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as SINK")
    assert elapsed >= 1.5
    assert smtp_sink.wait_for(1)[0].data == message


def test_relay_timeout_is_a_temporary_failure(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user, upstream_smtp={"timeout": 1})
    smtp_sink.delays["DATA"] = 3
    message = make_message(_sender(mail_user), ["bob@example.org"], "too slow")
    with smtp_session(gw, upstream, mail_user) as client:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail(_sender(mail_user), ["bob@example.org"], message)
    assert caught.value.smtp_code == 451
    assert sent_mailbox(upstream, mail_user) == {}


def test_relay_unreachable_is_a_temporary_failure_at_mail(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user, upstream_smtp={"port": free_port()})
    with smtp_session(gw, upstream, mail_user) as client:
        assert client.mail(_sender(mail_user)) == (
            451,
            b"4.4.1 The relay is unavailable; try again later",
        )


def test_relay_refusing_the_users_credentials(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    smtp_sink.users[mail_user.name] = "another password"
    with smtp_session(gw, upstream, mail_user) as client:
        code, _text = client.mail(_sender(mail_user))
    assert code == 550
    assert smtp_sink.auth_attempts == [mail_user.name]


def test_auth_none_relays_without_credentials(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user, upstream_smtp={"auth": "none"})
    send_one(gw, upstream, mail_user, "trusted relay")
    [received] = smtp_sink.wait_for(1)
    assert received.auth_user is None
    assert smtp_sink.auth_attempts == []


# --------------------------------------------------------------------- who may submit
def test_no_auth_no_relay(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    with smtp_session(gw, upstream) as client:
        assert client.mail("spammer@example.org") == (530, b"5.7.0 Authentication required")
        assert client.rcpt("victim@example.org")[0] == 530
        assert client.docmd("DATA")[0] == 530
    assert smtp_sink.messages == [] and smtp_sink.auth_attempts == []


def test_wrong_password_is_refused_and_closes_after_three(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    bad = "Not-The-Password-7x"
    plain = base64.b64encode(f"\0{mail_user.name}\0{bad}".encode()).decode()
    with smtp_session(gw, upstream) as client:
        for _ in range(2):
            assert client.docmd("AUTH", f"PLAIN {plain}") == (
                535,
                b"5.7.8 Authentication credentials invalid",
            )
        assert client.docmd("AUTH", f"PLAIN {plain}")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    with smtp_session(gw, upstream) as client:  # smtplib's login tries PLAIN and LOGIN
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            client.login(mail_user.name, bad)
        assert caught.value.smtp_code == 535
    assert bad not in gw.log_text() and plain not in gw.log_text()


def test_device_suffix_is_accepted_and_ignored(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    with smtp_session(gw, upstream, mail_user, login=f"{mail_user.name}#printer") as client:
        message = make_message(_sender(mail_user), ["bob@example.org"], "scan")
        assert client.sendmail(_sender(mail_user), ["bob@example.org"], message) == {}
    assert smtp_sink.wait_for(1)[0].auth_user == mail_user.name
    assert len(wait_for_sent(upstream, mail_user, 1)) == 1
    gw.wait_for_log(rf"auth ok user={mail_user.name} device=printer")


def test_auth_needs_tls_outside_insecure_networks(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user, security={"insecure_auth_networks": []})
    with smtp_session(gw, upstream, tls="none") as client:
        assert not client.has_extn("auth")
        assert client.has_extn("starttls")
        plain = base64.b64encode(f"\0{mail_user.name}\0{mail_user.password}".encode()).decode()
        assert client.docmd("AUTH", f"PLAIN {plain}") == (
            538,
            b"5.7.11 Encryption required for requested authentication mechanism",
        )
        client.starttls(context=client_context(upstream))
        client.ehlo("device.test")
        assert client.has_extn("auth") and not client.has_extn("starttls")
        client.login(mail_user.name, mail_user.password)
    with smtp_session(gw, upstream, mail_user, tls="implicit") as client:
        assert "PLAIN" in client.esmtp_features["auth"].upper()


def test_plain_auth_allowed_from_insecure_network(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)  # 127.0.0.0/8 is in the default insecure_auth_networks
    with smtp_session(gw, upstream, mail_user, tls="none") as client:
        message = make_message(_sender(mail_user), ["bob@example.org"], "old printer")
        assert client.sendmail(_sender(mail_user), ["bob@example.org"], message) == {}
    assert smtp_sink.wait_for(1)[0].data == message


# --------------------------------------------------------------------- extensions
def test_ehlo_advertises_what_the_relay_carries(
    upstream: Upstream,
    mail_user: MailUser,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    with SmtpSink(smtputf8=False, data_size_limit=1_000_000) as sink:
        gw = submission_gateway(mail_user, sink)
        with smtp_session(gw, upstream) as client:
            features = client.esmtp_features
            assert "smtputf8" not in features
            assert features["size"] == "1000000"  # the relay's limit is lower than ours
            for name in ("pipelining", "8bitmime", "enhancedstatuscodes", "auth"):
                assert name in features
    with SmtpSink(smtputf8=True) as sink:
        gw = submission_gateway(mail_user, sink, submission={"max_message_size": 4096})
        with smtp_session(gw, upstream, mail_user) as client:
            assert "smtputf8" in client.esmtp_features
            assert client.esmtp_features["size"] == "4096"
            body = "x" * 70 + "\r\n"
            message = make_message(_sender(mail_user), ["bob@example.org"], "big", body * 70)
            with pytest.raises(smtplib.SMTPSenderRefused) as caught:  # SIZE= in MAIL FROM
                client.sendmail(_sender(mail_user), ["bob@example.org"], message)
            assert caught.value.smtp_code == 552
            client.rset()
            client.mail(_sender(mail_user))
            client.rcpt("bob@example.org")
            code, text = client.data(message)  # no SIZE declared: caught while reading
            assert code == 552 and text.startswith(b"5.3.4")
        assert sink.messages == []


def test_smtputf8_message_end_to_end(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    message = make_message(_sender(mail_user), ["jörg@exämple.org"], "grüße", "Grüße!\r\n")
    with smtp_session(gw, upstream, mail_user) as client:
        refused = client.sendmail(
            _sender(mail_user), ["jörg@exämple.org"], message, mail_options=["SMTPUTF8"]
        )
    assert refused == {}
    [received] = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ("jörg@exämple.org",) and received.data == message
    assert "SMTPUTF8" in received.mail_options
    [copy] = wait_for_sent(upstream, mail_user, 1).values()
    assert copy == message


def test_enhanced_status_codes_on_every_reply_after_ehlo(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    with smtp_session(gw, upstream, mail_user) as client:
        assert client.noop() == (250, b"2.0.0 OK")
        assert client.rset() == (250, b"2.0.0 OK")
        assert client.docmd("DATA")[1].startswith(b"5.5.1 ")  # 503 out of sequence
        assert client.docmd("BOGUS")[1].startswith(b"5.5.2 ")
        assert client.mail(_sender(mail_user)) == (250, b"2.1.0 Sender ok")


def test_pipelined_commands_get_their_replies_in_order(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    smtp_sink.rcpt_replies["nobody@example.org"] = "550 5.1.1 unknown"
    plain = base64.b64encode(f"\0{mail_user.name}\0{mail_user.password}".encode()).decode()
    message = make_message(_sender(mail_user), ["bob@example.org"], "pipelined")
    with socket.create_connection((gw.host, gw.submission_port), timeout=30) as sock:
        reader = sock.makefile("rb")

        def reply() -> list[bytes]:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return lines

        assert reply()[0].startswith(b"220 ")
        sock.sendall(f"EHLO device.test\r\nAUTH PLAIN {plain}\r\n".encode())
        assert any(b"PIPELINING" in line for line in reply())
        assert reply()[0].startswith(b"235 2.7.0")
        sock.sendall(
            f"MAIL FROM:<{_sender(mail_user)}>\r\nRCPT TO:<nobody@example.org>\r\n"
            "RCPT TO:<bob@example.org>\r\nDATA\r\n".encode()
        )
        assert [reply()[0][:3] for _ in range(4)] == [b"250", b"550", b"250", b"354"]
        sock.sendall(message + b".\r\nQUIT\r\n")
        assert reply()[0].startswith(b"250 2.0.0 Ok: queued as SINK")
        assert reply()[0].startswith(b"221")
    assert smtp_sink.wait_for(1)[0].rcpt_tos == ("bob@example.org",)


# --------------------------------------------------------------------- the message itself
def test_bare_lf_is_normalized_and_missing_message_id_added(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    raw = make_message(_sender(mail_user), ["bob@example.org"], "lf", "a\nb\r\n", message_id=None)
    with smtp_session(gw, upstream, mail_user) as client:
        client.mail(_sender(mail_user))
        client.rcpt("bob@example.org")
        # smtplib.data() would fix line ends itself: send the bytes as they are.
        assert client.docmd("DATA")[0] == 354
        client.send(raw.replace(b"a\nb", b"a\n.\nb") + b".\r\n")
        assert client.getreply()[0] == 250
    [received] = smtp_sink.wait_for(1)
    assert b"\na" not in received.data.replace(b"\r\n", b"")
    assert b"a\r\n.\r\nb\r\n" in received.data  # the bare-LF dot line is content, not the end
    message_id = message_id_of(received.data)
    [copy] = wait_for_sent(upstream, mail_user, 1).values()
    assert copy == received.data and message_id_of(copy) == message_id


def test_nul_is_refused_before_anything_is_relayed(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = submission_gateway(mail_user)
    message = make_message(_sender(mail_user), ["bob@example.org"], "nul", "a\0b\r\n")
    with smtp_session(gw, upstream, mail_user) as client:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail(_sender(mail_user), ["bob@example.org"], message)
    assert caught.value.smtp_code == 554
    assert caught.value.smtp_error.startswith(b"5.6.0")
    assert smtp_sink.messages == []


def send_one(gw: GatewayProcess, upstream: Upstream, user: MailUser, subject: str) -> bytes:
    message = make_message(_sender(user), ["bob@example.org"], subject)
    with smtp_session(gw, upstream, user) as client:
        assert client.sendmail(_sender(user), ["bob@example.org"], message) == {}
    return message
