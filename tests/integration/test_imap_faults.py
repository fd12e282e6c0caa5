"""The fault forwarder itself: it counts commands, not bytes that look like them."""

from __future__ import annotations

import imaplib

import pytest

from tests.conftest import MailUser
from tests.support.imap_faults import ImapFaults, _first_uids
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration


def test_commands_inside_literals_are_not_counted_and_a_cut_fires_once(
    upstream: Upstream, mail_user: MailUser
) -> None:
    with ImapFaults(upstream.host, upstream.imap_port) as faults:
        cut = faults.cut_at("NOOP", 2)
        conn = imaplib.IMAP4(faults.host, faults.port)
        conn.login(mail_user.name, mail_user.password)
        decoy = b"Subject: decoy\r\n\r\nx NOOP\r\ny NOOP\r\nz UID MOVE 1 Trash\r\n"
        assert conn.append("INBOX", None, None, decoy)[0] == "OK"
        assert faults.commands["APPEND"] == 1
        assert faults.commands["NOOP"] == 0 and faults.commands["UID MOVE"] == 0
        assert conn.noop()[0] == "OK"  # the first NOOP passes
        assert not cut.happened.is_set()
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            conn.noop()  # the second is cut
        cut.wait(5)
        assert cut.line.endswith(b" NOOP\r\n")
        again = imaplib.IMAP4(faults.host, faults.port)  # transparent again
        again.login(mail_user.name, mail_user.password)
        assert again.noop()[0] == "OK"
        again.logout()
    assert upstream.list_uids(mail_user.name, mail_user.password) == [1]


def test_the_first_uids_of_a_set() -> None:
    assert _first_uids("3:7,9", 2) == "3:4"
    assert _first_uids("3:7,9", 6) == "3:7,9"
    assert _first_uids("7:3", 1) == "3"
    assert _first_uids("1:200", 44) == "1:44"
