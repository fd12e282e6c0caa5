"""Checks of the test harness itself: the private Dovecot and Cyrus, and the TOML writer."""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
import tomllib
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import MailUser, SeededUser
from tests.support import messages
from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot, _alive
from tests.support.gateway import (
    LISTENING_RE,
    GatewayProcess,
    dump_toml,
    expected_listeners,
    merge_config,
)
from tests.support.imap_access import ImapCommandError
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration


def test_special_use_mailboxes_exist(upstream: Upstream, mail_user: MailUser) -> None:
    boxes = {name: attrs for attrs, name in upstream.list_mailboxes(*mail_user)}
    for name in ("Drafts", "Sent", "Trash", "Junk", "Archive"):
        # Cyrus lists SPECIAL-USE attributes in lower case (attributes are case-insensitive)
        assert f"\\{name}".lower() in {a.lower() for a in boxes[name]}, boxes
    assert "INBOX" in boxes


def test_append_returns_uid_and_exact_bytes(
    upstream: Upstream, seeded_user: Callable[..., SeededUser]
) -> None:
    corpus = messages.corpus()
    seeded = seeded_user(corpus)
    assert seeded.uids == list(range(1, len(corpus) + 1))
    assert seeded.messages == corpus  # builders already produce what BODY[] returns
    assert upstream.list_uids(seeded.name, seeded.password) == seeded.uids


def test_append_flags_and_internaldate(upstream: Upstream, mail_user: MailUser) -> None:
    uid = upstream.append(
        *mail_user,
        messages.plain(),
        mailbox="Archive",
        flags=("\\Seen", "$popgate_test"),
        internaldate=1_700_000_000,
    )
    flags = upstream.fetch_flags(*mail_user, mailbox="Archive")
    assert {"\\Seen", "$popgate_test"} <= flags[uid]
    with upstream.imap(*mail_user) as conn:
        conn.select("Archive", readonly=True)
        typ, data = conn.uid("FETCH", str(uid), "(INTERNALDATE)")
        assert typ == "OK"
        assert isinstance(data[0], bytes) and b'"14-Nov-2023' in data[0]


def test_users_are_isolated_and_wrong_password_fails_fast(
    upstream: Upstream, seeded_user: Callable[..., SeededUser], mail_user: MailUser
) -> None:
    seeded_user([messages.plain()])
    assert upstream.list_uids(*mail_user) == []
    for _ in range(5):  # no auth penalty: each failure answers at once
        with pytest.raises(imaplib.IMAP4.error):
            with upstream.imap(mail_user.name, "wrong"):
                pass


def test_master_user_login_with_authzid(
    upstream: Upstream, seeded_user: Callable[..., SeededUser]
) -> None:
    seeded = seeded_user([messages.plain(), messages.dotted()])
    with upstream.imap_as_master(seeded.name) as conn:
        typ, data = conn.select("INBOX", readonly=True)
        assert typ == "OK" and data == [b"2"]
    # the master password alone is not a user password
    with pytest.raises(imaplib.IMAP4.error):
        with upstream.imap(seeded.name, upstream.master_password):
            pass


@pytest.mark.parametrize("security", ["starttls", "tls", "none"])
def test_imap_security_modes(upstream: Upstream, mail_user: MailUser, security: str) -> None:
    with upstream.imap(*mail_user, security=security) as conn:
        assert conn.noop()[0] == "OK"


def test_dovecot_pop3_reference(dovecot: Dovecot) -> None:
    dovecot.add_user("pop3-reference", "pop3-reference-pw")
    uids = dovecot.append_many(
        "pop3-reference", "pop3-reference-pw", [messages.plain(), messages.dotted()]
    )
    seeded = MailUser("pop3-reference", "pop3-reference-pw")
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=30)
    try:
        pop.stls(context=dovecot.client_ssl_context())
        pop.user(seeded.name)
        pop.pass_(seeded.password)
        assert pop.stat()[0] == 2
        uidls = [line.split()[1] for line in pop.uidl()[1]]
        # pop3_uidl_format = %08Xu%08Xv
        assert [int(u[:8], 16) for u in uidls] == uids
    finally:
        pop.quit()
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    pops = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=ctx, timeout=30)
    pops.user(seeded.name)
    pops.pass_(seeded.password)
    assert pops.stat()[0] == 2
    pops.quit()


def test_log_is_readable(upstream: Upstream, mail_user: MailUser) -> None:
    upstream.list_uids(*mail_user)
    # Dovecot: "imap-login: Login: user=<NAME>"; Cyrus (through our syslog socket):
    # "login: localhost [127.0.0.1] NAME plaintext+TLS User logged in"
    expected = f"user=<{mail_user.name}>" if upstream.kind == "dovecot" else f" {mail_user.name} "
    assert expected in upstream.log_text()


def test_quota_flag_wiring(tmp_path_factory: pytest.TempPathFactory) -> None:
    with Dovecot(quota=True, quota_storage="1M") as dc:
        dc.add_user("q", "qpw")
        with dc.imap("q", "qpw") as conn:
            typ, data = conn.getquotaroot("INBOX")
            assert typ == "OK"
            # imaplib returns [[QUOTAROOT lines], [QUOTA lines]] here
            assert "(STORAGE 0 1024)" in repr(data), data
        dc.append("q", "qpw", messages.with_attachment(200 * 1024))
        with pytest.raises(ImapCommandError, match=r"(?i)quota"):
            for _ in range(10):
                dc.append("q", "qpw", messages.with_attachment(200 * 1024))


def test_stop_is_complete() -> None:
    dc = Dovecot()
    dc.start()
    pid = dc.pid
    assert pid is not None
    base = dc.base_dir
    dc.stop()
    assert not base.exists()
    assert not _alive(pid)


def test_cyrus_stop_is_complete_and_its_master_identity_works() -> None:
    with Cyrus() as cy:
        cy.add_user("alice", "alice-pw")
        with cy.imap_as_master("alice") as conn:  # proxyservers + SASL PLAIN with authzid
            assert conn.select("INBOX")[0] == "OK"
        with pytest.raises(imaplib.IMAP4.error):
            with cy.imap("alice", cy.master_password):
                pass
        pids = [cy.pid, cy._sink_pid]
        base = cy.base_dir
        assert "alice" in cy.log_text()
    assert not base.exists()
    assert all(pid is not None and not _alive(pid) for pid in pids)


def test_cyrus_command_line_start_log_stop() -> None:
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    # not under tmp_path: the cyrus user must be able to reach the directory
    base = Path(tempfile.mkdtemp(prefix="popgate-cyrus-cli-")) / "cyrus"
    base.parent.chmod(0o755)
    run = [sys.executable, "-m", "tests.support.cyrus"]
    started = subprocess.run(
        [*run, "start", "--dir", str(base), "--user", "demo:demo-pw"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    env = dict(line.split("=", 1) for line in started.stdout.split())
    try:
        cy = Cyrus.attach(base)
        assert cy.list_uids("demo", "demo-pw") == []
        log = subprocess.run([*run, "log", "--dir", str(base)], capture_output=True, text=True)
        assert "demo" in log.stdout
    finally:
        stopped = subprocess.run([*run, "stop", "--dir", str(base)], timeout=60, check=False)
        shutil.rmtree(base.parent, ignore_errors=True)
    assert stopped.returncode == 0
    assert not _alive(int(env["CYRUS_PID"]))


def test_toml_writer_roundtrip() -> None:
    base: dict[str, dict[str, Any]] = {
        "upstream.imap": {"host": "h", "port": 1},
        "pop3": {"listen": ["127.0.0.1:0"]},
    }
    merged = merge_config(
        base,
        {
            "upstream.imap": {"port": None, "ca_file": 'a "quoted" päth\\x'},
            "pop3": {"listen_tls": ["127.0.0.1:0"], "idle_timeout": 600, "x": True},
            "log": {"level": "debug"},
        },
    )
    parsed = tomllib.loads(dump_toml(merged))
    assert parsed == {
        "upstream": {"imap": {"host": "h", "ca_file": 'a "quoted" päth\\x'}},
        "pop3": {
            "listen": ["127.0.0.1:0"],
            "listen_tls": ["127.0.0.1:0"],
            "idle_timeout": 600,
            "x": True,
        },
        "log": {"level": "debug"},
    }
    assert expected_listeners(merged) == 2


def test_listening_line_format() -> None:
    m = LISTENING_RE.search("2026-01-01 INFO listening pop3 on 127.0.0.1:40123 (plain)")
    assert m and m.groups() == ("pop3", "127.0.0.1:40123", "plain")


def _pop3_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.makefile("rb").readline()


def test_gateway_fixture_ports_log_and_restart(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway()
    ports = (gw.pop3_port, gw.pop3s_port)
    assert _pop3_greeting(gw.pop3_port).startswith(b"+OK")
    assert "listening pop3 on" in gw.log_text()
    gw.restart()
    assert (gw.pop3_port, gw.pop3s_port) == ports
    assert _pop3_greeting(gw.pop3_port).startswith(b"+OK")
    assert gw.stop() == 0  # SIGTERM is a clean stop
    assert gw.log_text().count("listening pop3 on") == 4


def test_gateway_fixture_reports_config_errors(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(pop3={"no_such_key": 1}, wait=False)
    assert gw.wait() == 2
    assert "no_such_key" in gw.log_text()


@pytest.mark.parametrize("metadata", [False, True], ids=["metadata-off", "metadata-on"])
def test_cyrus_takes_private_metadata_entries_only_when_asked(metadata: bool) -> None:
    imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
    with Cyrus(metadata=metadata) as cy:
        cy.add_user("alice", "alice-pw")
        with cy.imap("alice", "alice-pw") as conn:
            typ, data = conn._simple_command(
                "SETMETADATA", "INBOX", '(/private/vendor/popgate/probe "1")'
            )
        assert (typ == "OK") is metadata, (typ, data)
