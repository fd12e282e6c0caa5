"""Where device state lives: IMAP METADATA when the server takes it, the state mailbox otherwise.

On both upstream servers: ``metadata_server`` is a private one per kind with METADATA on
(``Dovecot(metadata=True)``, ``Cyrus(metadata=True)``: private entries Cyrus does not define are
allowed); the session's ``upstream`` has it off (Dovecot without METADATA; Cyrus offers METADATA
but refuses popgate's undefined entries). Every check reads the server back: LIST and SEARCH as
an IMAP client sees the account, GETMETADATA for the entries (tests/support/metadata.py, not
popgate's client).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from gateway.config import ImapUpstream, Pop3Settings
from gateway.maildrop.device_state import DeviceState
from gateway.maildrop.uidl import IndexedMessage
from gateway.upstream import device_store
from gateway.upstream.account import ImapAccount
from gateway.upstream.device_store import CHUNK_SIZE, MARKER, STATE_ROOT, MetadataStore
from gateway.upstream.imap_client import ImapCommandFailed
from tests.conftest import selected_upstreams
from tests.integration.pop3_helpers import (
    STATE_MAILBOX,
    PopWire,
    make_account,
    report_logs,
    running_gateway,
    upstream_view,
    wait_until,
)
from tests.support import messages
from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.imap_faults import ImapFaults
from tests.support.metadata import get_metadata, set_metadata
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

STANDARD_MAILBOXES = {"INBOX", "Drafts", "Sent", "Trash", "Junk", "Archive"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``metadata_server`` per selected server kind, as the conftest does for ``upstream``."""
    if "metadata_server" in metafunc.fixturenames:
        names = selected_upstreams(metafunc.config)
        metafunc.parametrize("metadata_server", names, indirect=True, scope="module", ids=names)


@pytest.fixture(scope="module")
def metadata_server(request: pytest.FixtureRequest) -> Iterator[Upstream]:
    """A private server of each kind with METADATA on (one per module: they are slow to start).

    Cyrus ends the connection (``BYE [TOOBIG]``) on a quoted string over ``maxquoted``; ours is
    set well under a state entry's size, so every test here also shows values go as literals.
    """
    server: Upstream = (
        Dovecot(metadata=True)
        if request.param == "dovecot"
        else Cyrus(metadata=True, extra_config="maxquoted: 1024\n")
    )
    with server:
        yield server


def four_messages(server: Upstream, tag: str) -> Any:
    return make_account(
        server, [messages.plain(f"m{i}", f"body {i}\n", n=i) for i in range(1, 5)], tag
    )


def delete(gw: GatewayProcess, login: str, password: str, numbers: list[int]) -> None:
    with PopWire.connect(gw.host, gw.pop3_port) as client:
        client.login(login, password)
        for n in numbers:
            assert client.command(f"DELE {n}").startswith(b"+OK")
        assert client.quit() == b"+OK Bye\r\n"


def visible(gw: GatewayProcess, login: str, password: str) -> list[int]:
    """Upstream UIDs the device is offered (popgate's UIDL is the UID, then the UIDVALIDITY, in
    hex, on every server)."""
    with PopWire.connect(gw.host, gw.pop3_port) as client:
        client.login(login, password)
        status, lines = client.listing("UIDL")
        assert status.startswith(b"+OK"), status
        assert client.quit() == b"+OK Bye\r\n"
    return [int(line.split(b" ")[1][:8], 16) for line in lines]


def state_entries(server: Upstream, user: str) -> dict[str, bytes]:
    with server.imap_as_master(user) as conn:
        return get_metadata(conn, "INBOX", STATE_ROOT)


def states_in(entries: dict[str, bytes]) -> dict[str, set[int]]:
    """device → hidden UIDs, from whole single-entry copies (what small states are)."""
    found: dict[str, set[int]] = {}
    for value in entries.values():
        state = DeviceState.parse(value)
        assert state is not None, value[:200]
        found.setdefault(state.device, set()).update(state.uids)
    return found


def imap_client_view(server: Upstream, user: str) -> tuple[set[str], dict[str, int]]:
    """What an IMAP client (Thunderbird, a phone) sees: mailbox names and message counts."""
    seen = upstream_view(server, user)
    counts = {}
    with server.imap_as_master(user) as conn:
        for name in seen.mailboxes:
            typ, data = conn.select(f'"{name}"', readonly=True)
            assert typ == "OK", data
            typ, data = conn.search(None, "ALL")
            counts[name] = len((data[0] or b"").split())
    return set(seen.mailboxes), counts


def test_state_lands_in_metadata_and_no_imap_client_sees_anything(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    acct = four_messages(metadata_server, "md")
    with running_gateway(metadata_server, tmp_path / "gw") as gw:
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1, 3])
        assert visible(gw, f"{acct.name}#phone", acct.password) == [acct.uids[1], acct.uids[3]]
        assert visible(gw, f"{acct.name}#pc", acct.password) == acct.uids
    names, counts = imap_client_view(metadata_server, acct.name)
    assert names == STANDARD_MAILBOXES  # no state mailbox, nothing else of popgate's
    assert counts == {"INBOX": 4, **{n: 0 for n in STANDARD_MAILBOXES - {"INBOX"}}}
    entries = state_entries(metadata_server, acct.name)
    assert states_in(entries) == {"phone": {acct.uids[0], acct.uids[2]}}


def test_state_mailbox_is_carried_over_to_metadata(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """State written to the mailbox (as before METADATA was usable: an older popgate, a server
    upgraded since, ``state_store = "mailbox"``) comes over whole when ``auto`` finds METADATA."""
    acct = four_messages(metadata_server, "mig")
    with running_gateway(
        metadata_server, tmp_path / "before", {"pop3": {"state_store": "mailbox"}}
    ) as gw:
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1])
        delete(gw, f"{acct.name}#pc", acct.password, [2, 4])
    assert len(upstream_view(metadata_server, acct.name).state_messages) == 2
    with running_gateway(metadata_server, tmp_path / "after") as gw:
        report_logs(request, gw)
        # The phone logs in first; the pc's state must come over with it, not be lost.
        assert visible(gw, f"{acct.name}#phone", acct.password) == acct.uids[1:]
        names, _ = imap_client_view(metadata_server, acct.name)
        assert STATE_MAILBOX not in names
        assert states_in(state_entries(metadata_server, acct.name)) == {
            "phone": {acct.uids[0]},
            "pc": {acct.uids[1], acct.uids[3]},
        }
        assert visible(gw, f"{acct.name}#pc", acct.password) == [acct.uids[0], acct.uids[2]]
        delete(gw, f"{acct.name}#pc", acct.password, [1])
        assert visible(gw, f"{acct.name}#pc", acct.password) == [acct.uids[2]]
        assert "carried over to METADATA" in gw.log_text()


def test_copies_of_overlapping_writers_are_merged_then_replaced_by_one(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two replicas that wrote at the same moment each leave a copy; a read merges them, the
    next write replaces both with one."""
    acct = four_messages(metadata_server, "merge")
    key = DeviceState("INBOX", "phone").key
    with running_gateway(metadata_server, tmp_path / "gw") as gw:
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1])  # learn the UIDVALIDITY
        [(name, value)] = state_entries(metadata_server, acct.name).items()
        stored = DeviceState.parse(value)
        assert stored is not None
        first = DeviceState("INBOX", "phone", stored.uidvalidity, {acct.uids[1]})
        second = DeviceState("INBOX", "phone", stored.uidvalidity, {acct.uids[2]})
        with metadata_server.imap_as_master(acct.name) as conn:
            set_metadata(
                conn,
                "INBOX",
                {
                    name: None,
                    f"{STATE_ROOT}/{key}/00000000000000aa0001-0-1": first.to_message(
                        date=0, message_id="<s@test>"
                    ),
                    f"{STATE_ROOT}/{key}/00000000000000bb0002-0-1": second.to_message(
                        date=0, message_id="<s@test>"
                    ),
                },
            )
        assert visible(gw, f"{acct.name}#phone", acct.password) == [acct.uids[0], acct.uids[3]]
        delete(gw, f"{acct.name}#phone", acct.password, [2])
        entries = state_entries(metadata_server, acct.name)
        assert len(entries) == 1
        assert states_in(entries) == {"phone": set(acct.uids[1:])}


def test_mailbox_store_is_unchanged_on_a_metadata_server(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    acct = four_messages(metadata_server, "mbx")
    overrides = {"pop3": {"state_store": "mailbox"}}
    with running_gateway(metadata_server, tmp_path / "gw", overrides) as gw:
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [2])
        assert visible(gw, f"{acct.name}#phone", acct.password) == [
            acct.uids[0],
            *acct.uids[2:],
        ]
    [state] = upstream_view(metadata_server, acct.name).state_messages.values()
    assert DeviceState.from_message(state, "INBOX", "phone") is not None
    with metadata_server.imap_as_master(acct.name) as conn:
        assert get_metadata(conn, "INBOX", "/private/vendor/popgate") == {}


def test_auto_on_a_server_without_metadata_uses_the_mailbox(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    acct = four_messages(upstream, "auto")
    with running_gateway(upstream, tmp_path / "gw") as gw:
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1])
        assert visible(gw, f"{acct.name}#phone", acct.password) == acct.uids[1:]
    assert len(upstream_view(upstream, acct.name).state_messages) == 1


def test_auto_on_a_cyrus_that_defines_only_some_entries_uses_the_mailbox(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Cyrus takes only the METADATA entries it defines (``annotation_definitions``) unless
    ``annotation_allow_undefined`` is set. popgate's state entries carry the device and the
    writer in their names, so no definition can list them: a server that takes the marker entry
    but not a state entry must leave ``auto`` on the mailbox, and deletes must stick."""
    if "cyrus" not in selected_upstreams(request.config):
        pytest.skip("Cyrus not among the selected upstream servers (--upstream)")
    cy = Cyrus()
    definitions = cy.base_dir / "annotations.conf"  # where the cyrus user can read it
    definitions.write_text(
        f"{MARKER.removeprefix('/private')},mailbox,string,backend,value.priv,l\n"
    )
    definitions.chmod(0o644)
    cy.extra_config = f"annotation_definitions: {definitions}\n"
    with cy:
        acct = four_messages(cy, "defs")
        with running_gateway(cy, tmp_path / "gw") as gw:
            report_logs(request, gw)
            delete(gw, f"{acct.name}#phone", acct.password, [1])
            assert visible(gw, f"{acct.name}#phone", acct.password) == acct.uids[1:]
        assert len(upstream_view(cy, acct.name).state_messages) == 1
        assert state_entries(cy, acct.name) == {}


def test_metadata_required_but_missing_is_a_clear_error_and_changes_nothing(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``state_store = "metadata"`` on a server without METADATA (Dovecot), or one that offers
    it but refuses popgate's entries (Cyrus without ``annotation_allow_undefined``): a login
    that needs the state is refused as a temporary failure, and the log says why; nothing is
    written anywhere."""
    acct = four_messages(upstream, "req")
    before = upstream_view(upstream, acct.name)
    with running_gateway(upstream, tmp_path / "gw", {"pop3": {"state_store": "metadata"}}) as gw:
        report_logs(request, gw)
        with PopWire.connect(gw.host, gw.pop3_port) as client:
            assert client.command(f"USER {acct.name}#phone").startswith(b"+OK")
            assert client.command(f"PASS {acct.password}").startswith(b"-ERR [SYS/TEMP]")
        gw.wait_for_log(
            "state_store is metadata, but the IMAP server has no METADATA"
            if upstream.kind == "dovecot"
            else "state_store is metadata, but the IMAP server refuses popgate's private "
            "METADATA entries on INBOX"
        )
    after = upstream_view(upstream, acct.name)
    assert after == before


def admin(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "device", *args, "-c", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("store", ["metadata", "mailbox"])
def test_device_list_and_reset_with_either_store(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    acct = four_messages(metadata_server, f"adm-{store}")
    with running_gateway(metadata_server, tmp_path / "gw", {"pop3": {"state_store": store}}) as gw:
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1, 2])
        delete(gw, f"{acct.name}#pc", acct.password, [4])
        listed = admin(gw, "list", acct.name)
        assert listed.returncode == 0, listed.stderr
        assert hidden_column(listed.stdout) == {"pc": "1", "phone": "2"}, listed.stdout
        reset = admin(gw, "reset", acct.name, "phone")
        assert reset.returncode == 0, reset.stderr
        assert visible(gw, f"{acct.name}#phone", acct.password) == acct.uids
        assert visible(gw, f"{acct.name}#pc", acct.password) == acct.uids[:3]
        assert hidden_column(admin(gw, "list", acct.name).stdout) == {"pc": "1"}
        forget = admin(gw, "forget", acct.name, "pc")
        assert forget.returncode == 0, forget.stderr
        assert "forgotten" in forget.stdout
        assert admin(gw, "list", acct.name).stdout.strip().endswith("(none holds mail back)")
        again = admin(gw, "forget", acct.name, "pc")
        assert again.returncode == 0 and "no such device" in again.stdout


def hidden_column(listing: str) -> dict[str, str]:
    """``popgate device list``: DEVICE, LAST SEEN (date, time), DOWNLOADED, HIDDEN, ..."""
    return {line.split()[0]: line.split()[4] for line in listing.splitlines()[1:-1]}


# --------------------------------------------------------------------- what a login sends
# popgate reaches the server through tests/support/imap_faults.py used as a recorder (in the
# clear): each POP session is one IMAP connection, and its command lines are what is checked.


@contextlib.contextmanager
def recorded_gateway(
    server: Upstream, directory: Path, overrides: Mapping[str, Mapping[str, Any]] = {}
) -> Iterator[tuple[GatewayProcess, ImapFaults]]:
    with ImapFaults(server.host, server.imap_port) as recorder:
        towards = {"upstream.imap": {"port": recorder.port, "security": "none"}}
        with running_gateway(server, directory, {**overrides, **towards}) as gw:
            yield gw, recorder


def recorded_poll(
    gw: GatewayProcess, recorder: ImapFaults, login: str, password: str
) -> tuple[list[int], list[str]]:
    """A poll (login, UIDL, QUIT): the UIDs offered, and the commands of its IMAP connection,
    once popgate has closed it (after QUIT's LOGOUT)."""
    before = recorder.connections()
    uids = visible(gw, login, password)
    numbers = [n for n in recorder.connections() if n not in before]
    assert len(numbers) == 1, f"one IMAP connection per POP session: {recorder.sent}"
    wait_until(lambda: numbers[0] in recorder.closed, what="popgate's LOGOUT")
    return uids, recorder.sent_on(numbers[0])


def opened(commands: list[str]) -> list[str]:
    """The mailboxes EXAMINEd or SELECTed, in order (names unquoted)."""
    found = []
    for line in commands:
        verb, _, rest = line.partition(" ")
        if verb.upper() in ("EXAMINE", "SELECT"):
            found.append(rest.rsplit(" (", 1)[0].strip('"'))
    return found


def test_a_poll_without_state_opens_inbox_once(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """No device has hidden anything, so there is no state mailbox: a STATUS says so and INBOX,
    never closed, is not opened a second time (it used to be EXAMINE INBOX, EXAMINE of the
    missing state mailbox, EXAMINE INBOX again)."""
    acct = four_messages(upstream, "poll")
    with recorded_gateway(upstream, tmp_path / "gw") as (gw, recorder):
        report_logs(request, gw)
        uids, commands = recorded_poll(gw, recorder, f"{acct.name}#phone", acct.password)
    assert uids == acct.uids
    assert opened(commands) == ["INBOX"], commands
    assert f'STATUS "{STATE_MAILBOX}" (MESSAGES)' in commands
    assert commands[-1] == "LOGOUT"


def test_a_device_with_state_still_has_its_deletes_hidden(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Once the state mailbox holds messages it is read (and INBOX opened again after it); a
    reset device's empty state mailbox is not opened at all."""
    acct = four_messages(upstream, "held")
    with recorded_gateway(upstream, tmp_path / "gw") as (gw, recorder):
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1, 3])
        uids, commands = recorded_poll(gw, recorder, f"{acct.name}#phone", acct.password)
        assert uids == [acct.uids[1], acct.uids[3]]
        assert opened(commands) == ["INBOX", STATE_MAILBOX, "INBOX"], commands
        uids, commands = recorded_poll(gw, recorder, f"{acct.name}#pc", acct.password)
        assert uids == acct.uids
        assert opened(commands) == ["INBOX", STATE_MAILBOX, "INBOX"], commands
        reset = admin(gw, "reset", acct.name, "phone")
        assert reset.returncode == 0, reset.stderr
        assert upstream_view(upstream, acct.name).state_messages == {}
        assert STATE_MAILBOX in upstream_view(upstream, acct.name).mailboxes
        uids, commands = recorded_poll(gw, recorder, f"{acct.name}#phone", acct.password)
        assert uids == acct.uids
        assert opened(commands) == ["INBOX"], commands


@pytest.mark.parametrize("deleted", [False, True], ids=["no-state", "with-state"])
def test_a_poll_with_the_metadata_store_opens_inbox_once(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest, deleted: bool
) -> None:
    """GETMETADATA reads the state without leaving INBOX: nothing is opened again."""
    acct = four_messages(metadata_server, "mdpoll")
    with recorded_gateway(metadata_server, tmp_path / "gw") as (gw, recorder):
        report_logs(request, gw)
        if deleted:
            delete(gw, f"{acct.name}#phone", acct.password, [2])
        uids, commands = recorded_poll(gw, recorder, f"{acct.name}#phone", acct.password)
        assert uids == ([acct.uids[0], *acct.uids[2:]] if deleted else acct.uids)
        assert opened(commands) == ["INBOX"], commands
        assert any(c.startswith("GETMETADATA") for c in commands), commands
        uids, commands = recorded_poll(gw, recorder, f"{acct.name}#pc", acct.password)
        assert uids == acct.uids
        assert opened(commands) == ["INBOX"], commands
    assert STATE_MAILBOX not in imap_client_view(metadata_server, acct.name)[0]


@pytest_twisted.ensureDeferred
async def test_a_failed_examine_leaves_nothing_selected(upstream: Upstream) -> None:
    """RFC 3501 6.3.1: a failed EXAMINE closes the mailbox that was open. ``selected`` used to
    keep naming it; the server agrees it is gone (a FETCH is refused)."""
    acct = four_messages(upstream, "closed")
    account = await ImapAccount.open_as_master(reactor, imap_settings(upstream), acct.name)
    try:
        await account.examine("INBOX")
        assert account.selected is not None and account.selected.name == "INBOX"
        with pytest.raises(ImapCommandFailed):
            await account.examine(STATE_MAILBOX)  # no such mailbox
        assert account.selected is None
        with pytest.raises(ImapCommandFailed):
            await account.fetch_sizes(acct.uids)
        await account.examine("INBOX")
        assert [uid for uid, _ in await account.fetch_sizes(acct.uids)] == acct.uids
        await account.unselect()
        assert account.selected is None
    finally:
        await account.logout()


# --------------------------------------------------------------------- the store itself


def imap_settings(dc: Upstream) -> ImapUpstream:
    return ImapUpstream(
        host=dc.host,
        port=dc.imap_port,
        security="starttls",
        ca_file=dc.ca_file,
        master_user=dc.master_user,
        master_password=dc.master_password,
    )


@pytest_twisted.ensureDeferred
async def test_concurrent_saves_keep_every_writers_deletes(metadata_server: Upstream) -> None:
    acct = four_messages(metadata_server, "conc")
    settings = Pop3Settings()
    present = [IndexedMessage(uid, 100, frozenset()) for uid in acct.uids]
    accounts = [
        await ImapAccount.open_as_master(reactor, imap_settings(metadata_server), acct.name)
        for _ in range(2)
    ]
    try:
        uidvalidity = (await accounts[0].examine("INBOX")).uidvalidity
        for round_ in range(3):  # the two saves run side by side, round trip for round trip
            states = []
            for i in range(len(accounts)):
                state = DeviceState("INBOX", "phone")
                state.hide([present[(2 * round_ + i) % 4]], uidvalidity)
                states.append(state)
            await DeferredList(
                [
                    Deferred.fromCoroutine(device_store.save(a, settings, s, present))
                    for a, s in zip(accounts, states, strict=True)
                ],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
        loaded = await device_store.load(accounts[0], settings, "INBOX", "phone")
        assert set(loaded.uids) == set(acct.uids)  # both writers' deletes of all three rounds
    finally:
        for account in accounts:
            await account.logout()


@pytest_twisted.ensureDeferred
async def test_a_10000_message_state_fits_in_chunks_and_reads_back(
    metadata_server: Upstream,
) -> None:
    """The worst case: 10,000 scattered UIDs and 10,000 Cyrus-style EMAILIDs."""
    acct = four_messages(metadata_server, "big")
    uids = set(range(1, 20_000, 2))
    emailids = {f"M{n:024x}" for n in range(10_000)}
    big = DeviceState("INBOX", "phone", 7, uids, emailids)
    present = [IndexedMessage(u, 1, frozenset(), f"M{(u // 2):024x}") for u in uids]
    data = big.to_message(date=0, message_id="<s@test>")
    assert len(data) > 8 * CHUNK_SIZE  # really spread over several entries
    account = await ImapAccount.open_as_master(reactor, imap_settings(metadata_server), acct.name)
    try:
        store = MetadataStore(device_store.MailboxStore(STATE_MAILBOX))
        await store.save(account, DeviceState("INBOX", "phone", 7, set(uids), set(emailids)),
                         present)  # fmt: skip
        loaded = await store.load(account, "INBOX", "phone")
        assert set(loaded.uids) == uids and loaded.emailids == emailids
    finally:
        await account.logout()
    entries = state_entries(metadata_server, acct.name)
    assert len(entries) == -(-len(data) // CHUNK_SIZE)
    assert all(len(v) <= CHUNK_SIZE for v in entries.values())


def test_forged_metadata_state_never_locks_a_device_out(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Anyone with the password can write METADATA: broken copies are ignored and replaced,
    UIDs the mailbox has not given out are dropped, and the device logs in."""
    acct = four_messages(metadata_server, "forged")
    key = DeviceState("INBOX", "phone").key
    with running_gateway(metadata_server, tmp_path / "gw") as gw:
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1])
        [(_name, value)] = state_entries(metadata_server, acct.name).items()
        stored = DeviceState.parse(value)
        unborn = DeviceState("INBOX", "phone", stored.uidvalidity, {acct.uids[1], 999_999})
        with metadata_server.imap_as_master(acct.name) as conn:
            set_metadata(
                conn,
                "INBOX",
                {
                    f"{STATE_ROOT}/{key}/00000000000000aa0001-0-1": b"\r\n\r\n" + b"[" * 50_000,
                    f"{STATE_ROOT}/{key}/00000000000000aa0002-0-1": b"\r\n\r\n{}",
                    f"{STATE_ROOT}/{key}/00000000000000aa0003-0-1": unborn.to_message(
                        date=0, message_id="<s@test>"
                    ),
                },
            )
        assert visible(gw, f"{acct.name}#phone", acct.password) == acct.uids[2:]
        gw.wait_for_log(r"state entries of INBOX over 32768 octets ignored \(the largest: 50004")
        gw.wait_for_log(r"ignored 3 unusable state copies in METADATA in INBOX \(1 entries over")
        entries = state_entries(metadata_server, acct.name)
        assert len(entries) == 1  # rewritten once, from the usable copies; the rest removed
        assert states_in(entries) == {"phone": {acct.uids[0], acct.uids[1]}}


def metadata_commands(commands: list[str]) -> list[str]:
    return [
        c.split(" ", 1)[0].upper() for c in commands if "METADATA" in c.split(" ", 1)[0].upper()
    ]


def test_a_refused_metadata_probe_is_not_repeated_at_every_login(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``auto`` on a server that offers METADATA but refuses popgate's entries (Cyrus without
    ``annotation_allow_undefined``, this suite's default Cyrus): the first login probes with a
    write and logs the refusal; the next ones only read the marker (another gateway may have
    taken METADATA since), for PROBE_AGAIN_AFTER. A server without METADATA (Dovecot here) is
    never asked. Deletes keep working through the state mailbox either way."""
    acct = four_messages(upstream, "probe")
    with recorded_gateway(upstream, tmp_path / "gw") as (gw, recorder):
        report_logs(request, gw)
        polls = [recorded_poll(gw, recorder, f"{acct.name}#phone", acct.password) for _ in range(3)]
        delete(gw, f"{acct.name}#phone", acct.password, [2])
        after_delete = recorded_poll(gw, recorder, f"{acct.name}#phone", acct.password)
        refusals = gw.log_text().count("METADATA not usable on INBOX")
    assert all(uids == acct.uids for uids, _ in polls)
    assert after_delete[0] == [acct.uids[0], *acct.uids[2:]]
    asked = [metadata_commands(commands) for _, commands in [*polls, after_delete]]
    if upstream.kind == "dovecot":
        assert asked == [[], [], [], []] and refusals == 0
    else:
        assert asked[0] == ["GETMETADATA", "SETMETADATA"], asked
        assert asked[1:] == [["GETMETADATA"]] * 3, asked
        assert refusals == 1, gw.log_text()
    assert len(upstream_view(upstream, acct.name).state_messages) == 1


def test_the_state_mailbox_is_asked_about_without_waiting_for_inbox(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A read-only login always reads the device state (EXAMINE reports no PERMANENTFLAGS),
    so the state mailbox's STATUS goes out with the EXAMINE and the index FETCH instead of a
    round trip later: with the upstream hanging right after the EXAMINE, the STATUS has been
    sent all the same."""
    acct = four_messages(upstream, "ahead")
    with recorded_gateway(upstream, tmp_path / "gw", {"pop3": {"state_store": "mailbox"}}) as (
        gw,
        recorder,
    ):
        report_logs(request, gw)
        before = recorder.connections()
        stall = recorder.stall_at("EXAMINE")
        with PopWire.connect(gw.host, gw.pop3_port) as client:
            assert client.command(f"USER {acct.name}#phone").startswith(b"+OK")
            client.send(f"PASS {acct.password}\r\n".encode())
            stall.wait(10)
            [number] = [n for n in recorder.connections() if n not in before]
            commands = recorder.sent_on(number)
        assert f'STATUS "{STATE_MAILBOX}" (MESSAGES)' in commands, commands
        assert opened(commands) == ["INBOX"], commands
        # The device's next login, with the upstream answering again, is served as usual.
        assert visible(gw, f"{acct.name}#phone", acct.password) == acct.uids


def test_the_state_is_searched_for_without_waiting_for_its_mailbox_to_open(
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A device with state: the SEARCH for its state copies goes out with the EXAMINE of the
    state mailbox, a round trip less for every poll of a device that deletes (hide)."""
    acct = four_messages(upstream, "searched")
    with recorded_gateway(upstream, tmp_path / "gw") as (gw, recorder):
        report_logs(request, gw)
        delete(gw, f"{acct.name}#phone", acct.password, [1])
        before = recorder.connections()
        stall = recorder.stall_at("EXAMINE", contains=STATE_MAILBOX.encode())
        with PopWire.connect(gw.host, gw.pop3_port) as client:
            assert client.command(f"USER {acct.name}#phone").startswith(b"+OK")
            client.send(f"PASS {acct.password}\r\n".encode())
            stall.wait(10)
            [number] = [n for n in recorder.connections() if n not in before]
            wait_until(
                lambda: any(c.startswith("UID SEARCH") for c in recorder.sent_on(number)),
                what="the state SEARCH, sent without waiting for the EXAMINE's answer",
            )
        assert visible(gw, f"{acct.name}#phone", acct.password) == acct.uids[1:]
