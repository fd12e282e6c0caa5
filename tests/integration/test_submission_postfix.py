"""End to end through a real MTA: alice's POP device sends through popgate, a private Postfix
delivers to the private Dovecot over LMTP, bob's POP device downloads it through popgate, and
alice's Sent mailbox holds the one copy.

    alice's device --SMTP/STARTTLS--> popgate --SMTP--> Postfix --LMTP--> Dovecot (bob's INBOX)
    bob's device   <--POP3-- popgate <--IMAP-- Dovecot
    popgate --IMAP APPEND--> Dovecot (alice's Sent)
"""

from __future__ import annotations

import poplib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.postfix import Postfix
from tests.support.submission import message_id_of

pytestmark = pytest.mark.integration

DOMAIN = "example.org"


@pytest.fixture(scope="module")
def lmtp_dovecot() -> Iterator[Dovecot]:
    dc = Dovecot(lmtp=True)
    dc.start()
    try:
        yield dc
    finally:
        dc.stop()


@pytest.fixture(scope="module")
def postfix(lmtp_dovecot: Dovecot) -> Iterator[Postfix]:
    with Postfix(lmtp=(lmtp_dovecot.host, lmtp_dovecot.lmtp_port), domains=[DOMAIN]) as mta:
        yield mta


def test_alice_sends_bob_downloads_alice_has_the_sent_copy(
    lmtp_dovecot: Dovecot,
    postfix: Postfix,
    start_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    dc = lmtp_dovecot
    alice, bob = ("alice", "alice-pw-1"), ("bob", "bob-pw-2")
    for name, password in (alice, bob):
        dc.add_user(name, password)
    gw = start_gateway(
        {
            "upstream.imap": {
                "host": dc.host,
                "port": dc.imap_port,
                "ca_file": str(dc.ca_file),
                "master_user": dc.master_user,
                "master_password": dc.master_password,
            },
            "upstream.smtp": {
                "host": postfix.host,
                "port": postfix.port,
                "security": "none",
                "auth": "none",  # Postfix trusts 127.0.0.0/8 (mynetworks)
            },
            "submission": {"listen": ["127.0.0.1:0"], "spool_dir": "spool"},
        },
        ca_signed_cert=True,
    )
    body = f"Meeting moved to 3pm. ({time.time_ns()})"
    started = time.monotonic()
    swaks = subprocess.run(
        [
            "swaks", "--server", gw.host, "--port", str(gw.submission_port), "--tls",
            "--auth", "PLAIN", "--auth-user", f"{alice[0]}#phone", "--auth-password", alice[1],
            "--from", f"alice@{DOMAIN}", "--to", f"bob@{DOMAIN}",
            "--header", "Subject: lunch", "--body", body, "--helo", "alice-phone.test",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert "250 2.0.0 Ok: queued as" in swaks.stdout  # Postfix's own verdict, passed back

    deadline = time.monotonic() + 30
    while not dc.list_uids(*bob):
        assert time.monotonic() < deadline, f"not delivered\n{postfix.log_text()[-3000:]}"
        time.sleep(0.1)
    delivered = time.monotonic() - started

    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
    try:
        pop.user(f"{bob[0]}#tablet")
        pop.pass_(bob[1])
        count, _size = pop.stat()
        assert count == 1
        _resp, lines, _octets = pop.retr(1)
    finally:
        pop.quit()
    downloaded = b"\r\n".join(lines) + b"\r\n"
    assert body.encode() in downloaded
    assert b"Bcc" not in downloaded

    deadline = time.monotonic() + 30
    while not (sent := dc.fetch_bodies(*alice, mailbox="Sent")):
        assert time.monotonic() < deadline, "no Sent copy"
        time.sleep(0.1)
    [copy] = sent.values()
    assert message_id_of(copy) == message_id_of(downloaded)
    assert body.encode() in copy
    print(f"alice -> popgate -> Postfix -> LMTP -> bob's INBOX in {delivered:.2f}s")
