"""What POP sessions do to the upstream mailbox, and what they see of IMAP's changes.

``on_delete = "hide"`` (the default): a DELE applied at QUIT hides the message for that device
only; upstream it stays in INBOX with its UID and system flags, gaining only ``$POPDeleted``.
Every check here reads the mailbox back through IMAP (the Dovecot helper's imaplib).
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from tests.integration.pop3_helpers import (
    POP_DELETED,
    STATE_MAILBOX,
    Account,
    PopWire,
    imap_add_flags,
    imap_expunge,
    make_account,
    on_the_wire,
    report_logs,
    running_gateway,
    upstream_view,
    wait_until,
)
from tests.support import messages
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with running_gateway(upstream, tmp_path_factory.mktemp("pop3-state")) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gateway: GatewayProcess) -> None:
    report_logs(request, gateway)


@pytest.fixture
def account(upstream: Upstream) -> Account:
    """Four messages; the second one is already \\Seen and \\Flagged upstream."""
    acct = make_account(
        upstream, [messages.plain(f"m{i}", f"body {i}\n", n=i) for i in range(1, 5)], "state"
    )
    imap_add_flags(upstream, acct.name, acct.password, acct.uids[1], "\\Seen \\Flagged")
    return acct


def session(gw: GatewayProcess, login: str, password: str) -> PopWire:
    client = PopWire.connect(gw.host, gw.pop3_port)
    client.login(login, password)
    return client


def uidl_map(client: PopWire) -> dict[int, bytes]:
    """Message number → UIDL of the current session."""
    status, lines = client.listing("UIDL")
    assert status.startswith(b"+OK"), status
    return {int(n): uidl for n, uidl in (line.split(b" ") for line in lines)}


def visible_uids(gw: GatewayProcess, login: str, password: str) -> list[int]:
    """The upstream UIDs a device is offered (Dovecot's UIDL format starts with the UID)."""
    with session(gw, login, password) as client:
        uidls = list(uidl_map(client).values())
        assert client.quit() == b"+OK Bye\r\n"
    return [int(u[:8], 16) for u in uidls]


# --------------------------------------------------------------------- DELE at QUIT
def test_dele_quit_hides_the_message_for_this_device_only(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    before = upstream_view(upstream, acct.name)
    assert STATE_MAILBOX not in before.mailboxes

    with session(gateway, acct.name, acct.password) as client:
        uidls_before = uidl_map(client)
        assert client.command("DELE 2") == b"+OK message 2 deleted\r\n"
        assert client.quit() == b"+OK Bye\r\n"

    after = upstream_view(upstream, acct.name)
    # Same messages, same UIDs; the only change is the gateway's keyword on the deleted one.
    assert sorted(after.inbox_flags) == acct.uids
    assert after.system_flags() == before.system_flags()
    assert after.system_flags()[acct.uids[1]] == {"\\Seen", "\\Flagged"}
    for uid in acct.uids:
        added = after.inbox_flags[uid] - before.inbox_flags[uid]
        assert added == ({POP_DELETED} if uid == acct.uids[1] else set()), uid
        assert before.inbox_flags[uid] <= after.inbox_flags[uid]
    assert after.mailboxes == before.mailboxes | {STATE_MAILBOX}
    assert len(after.state_messages) == 1

    # The same device no longer sees it; the other messages keep their UIDLs.
    with session(gateway, acct.name, acct.password) as client:
        sizes = [len(m) for i, m in enumerate(acct.messages) if i != 1]
        assert client.command("STAT") == f"+OK 3 {sum(sizes)}\r\n".encode()
        assert list(uidl_map(client).values()) == [uidls_before[n] for n in (1, 3, 4)]
        assert client.fetch("RETR 2")[1] == on_the_wire(acct.messages[2])
        assert client.quit() == b"+OK Bye\r\n"
    # Another device, and a brand-new one, see everything.
    assert visible_uids(gateway, f"{acct.name}#phone", acct.password) == acct.uids
    assert visible_uids(gateway, f"{acct.name}#never-seen-before", acct.password) == acct.uids
    assert upstream_view(upstream, acct.name) == after


def test_devices_delete_independently(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    phone, tablet = f"{acct.name}#phone", f"{acct.name}#tablet"
    for login, number in ((acct.name, 1), (phone, 2), (tablet, 1), (phone, 1)):
        with session(gateway, login, acct.password) as client:
            assert client.command(f"DELE {number}") == f"+OK message {number} deleted\r\n".encode()
            assert client.quit() == b"+OK Bye\r\n"
    u1, u2, u3, u4 = acct.uids
    assert visible_uids(gateway, acct.name, acct.password) == [u2, u3, u4]
    # phone deleted number 2 (u2), then number 1 of what it still saw (u1)
    assert visible_uids(gateway, phone, acct.password) == [u3, u4]
    assert visible_uids(gateway, tablet, acct.password) == [u2, u3, u4]
    state = upstream_view(upstream, acct.name)
    assert state.hidden_uids() == {u1, u2}
    assert len(state.state_messages) == 3  # one per device that deleted something


def test_hidden_message_stays_hidden_after_more_deletes(
    gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    for _ in range(2):
        with session(gateway, acct.name, acct.password) as client:
            assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
            assert client.quit() == b"+OK Bye\r\n"
    assert visible_uids(gateway, acct.name, acct.password) == acct.uids[2:]


def test_rset_then_quit_changes_nothing(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    before = upstream_view(upstream, acct.name)
    with session(gateway, acct.name, acct.password) as client:
        assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
        assert client.command("DELE 3") == b"+OK message 3 deleted\r\n"
        assert client.command("RSET").startswith(b"+OK maildrop has 4 messages")
        assert client.quit() == b"+OK Bye\r\n"
    assert upstream_view(upstream, acct.name) == before
    assert visible_uids(gateway, acct.name, acct.password) == acct.uids


@pytest.mark.parametrize("how", ["close", "reset"])
def test_dropped_connection_applies_no_deletes(
    upstream: Upstream, gateway: GatewayProcess, account: Account, how: str
) -> None:
    acct = account
    # A device that already deleted something has a state message: it must stay as it is.
    with session(gateway, f"{acct.name}#phone", acct.password) as client:
        assert client.command("DELE 4") == b"+OK message 4 deleted\r\n"
        assert client.quit() == b"+OK Bye\r\n"
    before = upstream_view(upstream, acct.name)
    assert before.hidden_uids() == {acct.uids[3]}
    for login in (acct.name, f"{acct.name}#phone"):
        client = session(gateway, login, acct.password)
        assert client.command("DELE 1") == b"+OK message 1 deleted\r\n"
        assert client.command("DELE 2") == b"+OK message 2 deleted\r\n"
        if how == "reset":  # RST instead of FIN
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    # Both sessions are over for the gateway (phone's earlier session logged one line too).
    for device, count in (("default", 1), ("phone", 2)):
        pattern = rf"INFO popgate\.pop3 disconnect .*user={re.escape(acct.name)} device={device} "
        wait_until(
            lambda p=pattern, n=count: len(re.findall(p, gateway.log_text())) >= n,
            what=f"disconnect of device {device} logged",
        )
    assert upstream_view(upstream, acct.name) == before
    # The devices are free again and still see what they saw.
    assert visible_uids(gateway, acct.name, acct.password) == acct.uids
    assert visible_uids(gateway, f"{acct.name}#phone", acct.password) == acct.uids[:3]


# --------------------------------------------------------------------- reading leaves no trace
def test_retr_and_top_never_set_seen(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    before = upstream_view(upstream, acct.name)
    assert "\\Seen" not in before.inbox_flags[acct.uids[0]]
    with session(gateway, acct.name, acct.password) as client:
        for n, stored in enumerate(acct.messages, 1):
            assert client.fetch(f"RETR {n}")[1] == on_the_wire(stored)
            assert client.fetch(f"TOP {n} 1")[0].startswith(b"+OK")
        assert client.quit() == b"+OK Bye\r\n"
    assert upstream_view(upstream, acct.name) == before


def test_messages_flagged_deleted_upstream_are_not_offered(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    imap_add_flags(upstream, acct.name, acct.password, acct.uids[2], "\\Deleted")
    flagged = upstream.append(acct.name, acct.password, messages.plain("gone"), flags=["\\Deleted"])
    visible = [u for u in acct.uids if u != acct.uids[2]]
    assert visible_uids(gateway, acct.name, acct.password) == visible
    assert visible_uids(gateway, f"{acct.name}#other", acct.password) == visible
    assert flagged in upstream_view(upstream, acct.name).inbox_flags


# --------------------------------------------------------------------- IMAP changes
def test_imap_appends_and_expunges_show_in_the_next_session(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    with session(gateway, acct.name, acct.password) as client:
        first = uidl_map(client)
        assert client.quit() == b"+OK Bye\r\n"
    imap_expunge(upstream, acct.name, acct.password, [acct.uids[0], acct.uids[2]])
    new_message = messages.plain("arrived later", "new\n", n=99)
    new_uid = upstream.append(acct.name, acct.password, new_message)
    with session(gateway, acct.name, acct.password) as client:
        second = uidl_map(client)
        assert list(second.values()) == [first[2], first[4], second[3]]
        assert second[3] not in first.values()
        assert int(second[3][:8], 16) == new_uid
        assert client.fetch("RETR 3")[1] == new_message
        assert client.quit() == b"+OK Bye\r\n"


def test_numbers_stay_stable_while_imap_expunges(
    upstream: Upstream, gateway: GatewayProcess, account: Account
) -> None:
    acct = account
    with session(gateway, acct.name, acct.password) as client:
        listing = client.listing("LIST")
        uidls = uidl_map(client)
        imap_expunge(upstream, acct.name, acct.password, [acct.uids[1]])
        upstream.append(acct.name, acct.password, messages.plain("meanwhile"))
        assert client.listing("LIST") == listing
        assert uidl_map(client) == uidls
        assert client.command("STAT") == f"+OK 4 {sum(len(m) for m in acct.messages)}\r\n".encode()
        assert client.fetch("RETR 3")[1] == on_the_wire(acct.messages[2])
        assert client.command("RETR 2") == b"-ERR Message no longer available upstream\r\n"
        assert client.command("TOP 2 0") == b"-ERR Message no longer available upstream\r\n"
        assert client.fetch("RETR 4")[1] == on_the_wire(acct.messages[3])
        assert client.command("DELE 2") == b"+OK message 2 deleted\r\n"
        assert client.command("DELE 3") == b"+OK message 3 deleted\r\n"
        assert client.quit() == b"+OK Bye\r\n"
    state = upstream_view(upstream, acct.name)
    assert state.hidden_uids() == {acct.uids[2]}
    assert acct.uids[1] not in state.inbox_flags


# --------------------------------------------------------------------- UIDL
def dovecot_pop3_uidl(upstream: Dovecot, user: str, password: str) -> list[bytes]:
    """UIDL lines from Dovecot's own POP3 service for the same mailbox."""
    with PopWire.connect(upstream.host, upstream.pop3_port) as client:
        assert client.command(f"USER {user}").startswith(b"+OK")
        assert client.command(f"PASS {password}").startswith(b"+OK")
        status, lines = client.listing("UIDL")
        assert status.startswith(b"+OK"), status
        assert client.command("QUIT").startswith(b"+OK")
    return lines


def uid_based_uidl(upstream: Upstream, user: str, password: str) -> list[bytes]:
    """``N UIDL`` lines in Dovecot's ``%08Xu%08Xv`` from the UIDs and UIDVALIDITY read over
    IMAP: the reference where no Dovecot POP3 serves the user (Cyrus)."""
    with upstream.imap(user, password) as conn:
        assert conn.select("INBOX", readonly=True)[0] == "OK"
        [uidvalidity] = conn.response("UIDVALIDITY")[1]
        assert isinstance(uidvalidity, bytes)
        typ, data = conn.uid("SEARCH", "ALL")
        assert typ == "OK", data
        uids = sorted(int(u) for u in (data[0] or b"").split())
    return [b"%d %08x%08x" % (n, uid, int(uidvalidity)) for n, uid in enumerate(uids, 1)]


def test_uidl_is_dovecots_own(upstream: Upstream, gateway: GatewayProcess) -> None:
    acct = make_account(upstream, messages.corpus(), "uidl")
    reference = uid_based_uidl(upstream, acct.name, acct.password)
    if isinstance(upstream, Dovecot):
        assert dovecot_pop3_uidl(upstream, acct.name, acct.password) == reference
    assert len(reference) == len(acct.uids)
    for login in (acct.name, f"{acct.name}#phone"):
        with session(gateway, login, acct.password) as client:
            assert client.listing("UIDL")[1] == reference
            for line in reference:
                n, uidl = line.split(b" ")
                assert client.command(f"UIDL {n.decode()}") == b"+OK " + line + b"\r\n"
                assert re.fullmatch(rb"[0-9a-f]{16}", uidl)


def test_uidl_survives_sessions_and_restarts(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess], account: Account
) -> None:
    acct = account
    gw = start_gateway()

    def uidls() -> list[bytes]:
        with session(gw, acct.name, acct.password) as client:
            _, lines = client.listing("UIDL")
            assert client.quit() == b"+OK Bye\r\n"
        return lines

    first = uidls()
    assert len(set(first)) == len(acct.uids)
    assert uidls() == first
    port = gw.pop3_port
    gw.restart()
    assert gw.pop3_port == port
    assert uidls() == first
