"""Helpers for the submission tests: SMTP clients, messages, polling the Sent mailbox.

The fixtures are in tests/support/submission_fixtures.py.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import smtplib
import ssl
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tests.support.gateway import GatewayProcess
from tests.support.imap_access import fetch_bodies, fetch_flags
from tests.support.upstreams import Upstream

CLIENT_TIMEOUT = 60

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.MULTILINE | re.IGNORECASE)


def client_context(upstream: Upstream) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(upstream.ca_file))


@contextlib.contextmanager
def smtp_session(
    gw: GatewayProcess,
    upstream: Upstream,
    user: Any | None = None,
    *,
    tls: str = "starttls",
    login: str | None = None,
) -> Iterator[smtplib.SMTP]:
    """smtplib connected to the gateway (``tls``: "starttls", "implicit" or "none"), logged in
    as ``user`` (or ``login`` with the user's password) when a user is given."""
    context = client_context(upstream)
    client: smtplib.SMTP
    if tls == "implicit":
        client = smtplib.SMTP_SSL(
            gw.host, gw.submissions_port, context=context, timeout=CLIENT_TIMEOUT
        )
    else:
        client = smtplib.SMTP(gw.host, gw.submission_port, timeout=CLIENT_TIMEOUT)
        if tls == "starttls":
            client.starttls(context=context)
    try:
        client.ehlo("device.test")
        if user is not None:
            client.login(login or user.name, user.password)
        yield client
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()


def make_message(
    sender: str,
    to: Sequence[str],
    subject: str,
    body: str = "Hello from a POP device.\r\n",
    *,
    message_id: str | None = "auto",
    cc: Sequence[str] = (),
    extra: str = "",
) -> bytes:
    lines = [f"From: {sender}", f"To: {', '.join(to)}"]
    if cc:
        lines.append(f"Cc: {', '.join(cc)}")
    lines.append(f"Subject: {subject}")
    if message_id == "auto":
        message_id = f"<{subject.replace(' ', '-')}.{time.time_ns()}@device.test>"
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    lines.append("Date: Mon, 23 Nov 2026 06:00:00 +0000")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n" + body).encode("utf-8")


def message_id_of(data: bytes) -> bytes:
    m = _MESSAGE_ID.search(data)
    assert m, f"no Message-ID in {data[:300]!r}"
    return m.group(1)


def sent_mailbox(upstream: Upstream, user: Any) -> dict[int, bytes]:
    """UID -> bytes of the user's Sent mailbox (empty if it does not exist)."""
    with upstream.imap(user.name, user.password) as conn:
        try:
            return fetch_bodies(conn, "Sent")
        except Exception:
            return {}


def sent_flags(upstream: Upstream, user: Any) -> dict[int, set[str]]:
    with upstream.imap(user.name, user.password) as conn:
        return fetch_flags(conn, "Sent")


def wait_for_sent(
    upstream: Upstream, user: Any, count: int, timeout: float = 20.0
) -> dict[int, bytes]:
    """Bounded polling until the Sent mailbox holds ``count`` messages; returns them."""
    deadline = time.monotonic() + timeout
    while True:
        found = sent_mailbox(upstream, user)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"Sent holds {len(found)} of {count} copies after {timeout}s")
        time.sleep(0.1)


def imap_search_header(conn: imaplib.IMAP4, name: str, value: str) -> list[int]:
    typ, data = conn.uid("SEARCH", "HEADER", name, f'"{value}"')
    assert typ == "OK", data
    return [int(x) for x in (data[0] or b"").split()]
