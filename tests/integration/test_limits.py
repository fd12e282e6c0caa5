"""Hostile clients meet popgate's limits (issue 9 bugs 6 and 7): failed logins are answered
late on a schedule shared by the client address, connections beyond the limits are refused
with a clear answer, and a refused TLS handshake costs one log line.

The timing itself is the unit tests' business (tests/unit/test_limits.py, with a fake clock);
here real clients show what they observe: the answers, their order, the closures and the log.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

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
