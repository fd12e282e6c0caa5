"""Real SMTP clients (swaks, msmtp, curl) submit through popgate, over STARTTLS and implicit
TLS, verifying popgate's certificate against the test CA. Each message must reach the relay
as sent and land once in the user's Sent mailbox with \\Seen."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.conftest import MailUser
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import make_message, message_id_of, sent_flags, wait_for_sent
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration

CLIENT_TIMEOUT = 60


def run(argv: Sequence[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert shutil.which(argv[0]), f"{argv[0]} missing: run ./tests/bootstrap.sh"
    result = subprocess.run(
        list(argv), input=stdin, capture_output=True, timeout=CLIENT_TIMEOUT, check=False
    )
    assert result.returncode == 0, (
        f"{argv[0]} exited {result.returncode}\nstdout:\n{result.stdout.decode(errors='replace')}"
        f"\nstderr:\n{result.stderr.decode(errors='replace')}"
    )
    return result


def check_delivery(
    upstream: Upstream, user: MailUser, sink: SmtpSink, rcpts: Sequence[str], body: bytes
) -> bytes:
    [received] = sink.wait_for(1)
    assert received.auth_user == user.name
    assert list(received.rcpt_tos) == list(rcpts)
    assert body in received.data
    [(uid, copy)] = wait_for_sent(upstream, user, 1).items()
    assert message_id_of(copy) == message_id_of(received.data)
    assert "\\Seen" in sent_flags(upstream, user)[uid]
    return copy


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_swaks(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    tls: str,
) -> None:
    gw = submission_gateway(mail_user)
    sender = f"{mail_user.name}@example.org"
    message = make_message(sender, ["bob@example.org"], f"swaks {tls}", "Sent by swaks.\r\n")
    data = tmp_path / "message.eml"
    data.write_bytes(message)
    port = gw.submission_port if tls == "starttls" else gw.submissions_port
    mode = ["--tls"] if tls == "starttls" else ["--tls-on-connect"]
    run(
        [
            "swaks",
            "--server", gw.host, "--port", str(port), *mode,
            "--tls-verify", "--tls-ca-path", str(upstream.ca_file),
            "--auth", "PLAIN", "--auth-user", f"{mail_user.name}#phone",
            "--auth-password", mail_user.password,
            "--from", sender, "--to", "bob@example.org,secret@example.org",
            "--data", str(data), "--helo", "device.test",
        ]
    )  # fmt: skip
    copy = check_delivery(
        upstream, mail_user, smtp_sink, ["bob@example.org", "secret@example.org"], b"by swaks"
    )
    assert b"Bcc: secret@example.org\r\n" in copy
    assert b"Bcc" not in smtp_sink.messages[0].data


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_msmtp(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    tls: str,
) -> None:
    gw = submission_gateway(mail_user)
    sender = f"{mail_user.name}@example.org"
    message = make_message(sender, ["bob@example.org"], f"msmtp {tls}", "Sent by msmtp.\r\n")
    password_file = tmp_path / "password"
    password_file.write_text(mail_user.password)
    port = gw.submission_port if tls == "starttls" else gw.submissions_port
    run(
        [
            "msmtp", "--host", gw.host, f"--port={port}", "--tls=on",
            f"--tls-starttls={'on' if tls == 'starttls' else 'off'}",
            f"--tls-trust-file={upstream.ca_file}", "--auth=plain",
            f"--user={mail_user.name}", f"--passwordeval=cat {password_file}",
            f"--from={sender}", "--domain=device.test", "bob@example.org",
        ],
        stdin=message,
    )  # fmt: skip
    check_delivery(upstream, mail_user, smtp_sink, ["bob@example.org"], b"Sent by msmtp.")


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_curl_without_message_id(
    upstream: Upstream,
    mail_user: MailUser,
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    tls: str,
) -> None:
    gw = submission_gateway(mail_user)
    sender = f"{mail_user.name}@example.org"
    message = make_message(
        sender, ["bob@example.org"], f"curl {tls}", "Sent by curl.\r\n", message_id=None
    )
    upload = tmp_path / "message.eml"
    upload.write_bytes(message)
    if tls == "starttls":
        url, mode = f"smtp://{gw.host}:{gw.submission_port}", ["--ssl-reqd"]
    else:
        url, mode = f"smtps://{gw.host}:{gw.submissions_port}", []
    run(
        [
            "curl", "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT), *mode,
            "--url", url, "--cacert", str(upstream.ca_file), "--login-options", "AUTH=LOGIN",
            "--user", f"{mail_user.name}#laptop:{mail_user.password}",
            "--mail-from", sender, "--mail-rcpt", "bob@example.org",
            "--upload-file", str(upload),
        ]
    )  # fmt: skip
    copy = check_delivery(upstream, mail_user, smtp_sink, ["bob@example.org"], b"Sent by curl.")
    relayed = smtp_sink.messages[0].data
    assert message_id_of(relayed).endswith(b"@example.org>")  # added, with the sender's domain
    assert relayed.replace(b"Message-ID: " + message_id_of(relayed) + b"\r\n", b"") == message
    assert copy == relayed
