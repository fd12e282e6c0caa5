"""Byte-identical messages ("twins") are two messages to a POP device, on every server.

Cyrus derives EMAILID (RFC 8474) from the content, so twins share one; popgate once served the
EMAILID as the UIDL, and a device then took the second twin for one it already had, and one DELE
hid both. RFC 1939: a unique-id is unique within the maildrop and persists across sessions.
"""

from __future__ import annotations

import os
import poplib
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.maildrop.uidl import POP_DELETED
from tests.conftest import SeededUser
from tests.integration.test_real_clients import lf_form, read_maildir, run_client
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

TWIN = (
    b"From: a@example.org\r\nTo: b@example.org\r\nSubject: twice the same\r\n"
    b"Message-ID: <twin@example.org>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n"
    b"The same bytes, delivered twice.\r\n"
)


def emailids(upstream: Upstream, user: SeededUser) -> dict[int, bytes]:
    with upstream.imap(user.name, user.password) as conn:
        assert conn.select("INBOX", readonly=True)[0] == "OK"
        typ, data = conn.uid("FETCH", "1:*", "(EMAILID)")
        assert typ == "OK", data
    found = (re.search(rb"UID (\d+) EMAILID \(([^)]+)\)", d) for d in data if isinstance(d, bytes))
    return {int(m.group(1)): m.group(2) for m in found if m}


def mpop(gw: GatewayProcess, user: SeededUser, ca_file: Path, work: Path) -> list[bytes]:
    """One mpop run that fetches only what its UIDL file does not know; returns the maildir."""
    maildir = work / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    config = work / "mpoprc"
    if not config.exists():
        config.write_text("")
        os.chmod(config, 0o600)
    run_client(
        [
            "mpop",
            f"--file={config}",
            f"--host={gw.host}",
            f"--port={gw.pop3_port}",
            "--timeout=60",
            "--auth=user",
            f"--user={user.name}",
            f"--passwordeval=printf %s '{user.password}'",
            "--tls=on",
            "--tls-starttls=on",
            f"--tls-trust-file={ca_file}",
            "--keep=on",
            "--only-new=on",
            "--received-header=off",
            f"--delivery=maildir,{maildir}",
            f"--uidls-file={work / 'uidls'}",
            "--half-quiet",
        ]
    )
    return read_maildir(maildir)


def uidl_listing(client: poplib.POP3) -> dict[int, bytes]:
    _, lines, _ = client.uidl()
    return {int(n): uidl for n, uidl in (line.split() for line in lines)}


def test_twins_get_their_own_uidls_are_both_downloaded_and_deleted_one_at_a_time(
    upstream: Upstream,
    seeded_user: Callable[..., SeededUser],
    start_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    user = seeded_user([TWIN])
    gw = start_gateway(ca_signed_cert=True)
    assert mpop(gw, user, upstream.ca_file, tmp_path) == [lf_form(TWIN)]

    second = upstream.append(user.name, user.password, TWIN)
    if upstream.kind == "cyrus":  # the premise: the server gives twins one EMAILID
        ids = emailids(upstream, user)  # (Dovecot 2.3 has no OBJECTID)
        assert ids[user.uids[0]] == ids[second], ids

    # The device keeps a UIDL file: the second twin is new to it and is downloaded.
    assert mpop(gw, user, upstream.ca_file, tmp_path) == [lf_form(TWIN)] * 2

    client = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
    client.user(user.name)
    client.pass_(user.password)
    uidls = uidl_listing(client)
    assert len(set(uidls.values())) == 2, uidls
    client.dele(1)
    assert client.quit().startswith(b"+OK")

    # One DELE hid one message: the other twin is still offered, under the UIDL it had.
    client = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
    client.user(user.name)
    client.pass_(user.password)
    assert uidl_listing(client) == {1: uidls[2]}
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == TWIN
    assert client.quit().startswith(b"+OK")
    flags = upstream.fetch_flags(user.name, user.password)
    assert POP_DELETED in flags[user.uids[0]] and POP_DELETED not in flags[second], flags
