"""A device state retention cannot read holds everything back, on both stores and upstreams.

Device "laptop" has a state copy that is corrupt, or over the 4 MiB cap, planted through IMAP
as anyone with the password could. "pc" downloads and deletes old mail. Retention must not
take the laptop for "no device": it removes nothing for the user, warns naming the device (the
gateway's log, ``popgate retention --dry-run``, ``popgate device list``, a metric), and lets
the mail go only once ``popgate device forget`` retired the laptop or the laptop's next login
rewrote its state. Every check reads the upstream back through IMAP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.maildrop.device_state import DeviceState, state_key
from gateway.upstream.device_store import CHUNK_SIZE, STATE_ROOT
from tests.integration.pop3_helpers import (
    POP_DELETED,
    STATE_MAILBOX,
    Account,
    make_account,
    report_logs,
    running_gateway,
    upstream_view,
)
from tests.integration.test_retention import seed_dated
from tests.integration.test_retention_devices import devices, popgate, retention, session
from tests.integration.test_retention_quota import metric_values
from tests.integration.test_state_store import metadata_server, pytest_generate_tests
from tests.support.gateway import GatewayProcess
from tests.support.imap_access import append_message, quote_mailbox
from tests.support.metadata import set_metadata
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration
__all__ = ["metadata_server", "pytest_generate_tests"]  # the fixture and its parametrization

RETENTION = {"delete_after_days": 3, "action": "expunge", "sweep_interval": 0}
KEY = state_key("INBOX", "laptop")
# What the gateway logs (popgate.retention) when a run finds the laptop's state unreadable.
WARNING = (
    r"WARNING popgate\.retention retention removed nothing: state of device laptop "
    rf"\(state {KEY}\) unreadable"
)

# The after-QUIT run ended: it warned, or (the bug) removed the mail.
AFTER_QUIT_RUN = rf"{WARNING}|retention removed \d+ messages"


def broken_copy(kind: str) -> bytes:
    """A state message of the laptop as popgate writes it (headers included), its body
    replaced: not JSON, or a valid-looking one over the 4 MiB cap."""
    header, _, _ = (
        DeviceState("INBOX", "laptop").to_message(date=0, message_id="<s@t>").partition(b"\r\n\r\n")
    )
    if kind == "corrupt":
        return header + b"\r\n\r\n" + b'{"version":2,"uids":' + b"[" * 1000 + b"\r\n"
    assert kind == "oversized"
    body = (
        b'{"version":2,"mailbox":"INBOX","device":"laptop","uidvalidity":1,"uids":"",'
        b'"downloaded":"","last_seen":0,"emailids":['
        + b",".join([b'"M' + b"0" * 100 + b'"'] * 42_000)
        + b"]}"
    )
    return header + b"\r\n\r\n" + body + b"\r\n"


def plant(server: Upstream, acct: Account, store: str, kind: str) -> None:
    raw = broken_copy(kind)
    if store == "mailbox":
        with server.imap(acct.name, acct.password) as conn:
            conn.create(quote_mailbox(STATE_MAILBOX))
            append_message(conn, raw, STATE_MAILBOX)
        return
    # In METADATA: one copy spread over entries of CHUNK_SIZE, as popgate writes it.
    pieces = [raw[i : i + CHUNK_SIZE] for i in range(0, len(raw), CHUNK_SIZE)]
    writer = "00000000000000aa0001"
    entries: dict[str, bytes | None] = {
        f"{STATE_ROOT}/{KEY}/{writer}-{i}-{len(pieces)}": piece for i, piece in enumerate(pieces)
    }
    with server.imap_as_master(acct.name) as conn:
        set_metadata(conn, "INBOX", entries)


@pytest.fixture
def gateway(
    metadata_server: Upstream, tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> Iterator[GatewayProcess]:
    overrides = {
        "pop3": {"state_store": store},
        "retention": RETENTION,
        "http": {"listen": ["127.0.0.1:0"]},
    }
    with running_gateway(metadata_server, tmp_path / "gw", overrides) as gw:
        report_logs(request, gw)
        yield gw


def old_mail(server: Upstream, acct: Account) -> set[int]:
    return set(seed_dated(server, acct, [("a", 10, 0), ("b", 9, 0), ("c", 8, 0)]).values())


def assert_still_upstream(server: Upstream, acct: Account, uids: set[int]) -> None:
    flags = upstream_view(server, acct.name).inbox_flags
    assert set(flags) == uids, flags
    assert all(POP_DELETED in flags[u] for u in uids), flags  # the pc did delete them


@pytest.mark.parametrize("kind", ["corrupt", "oversized"])
@pytest.mark.parametrize("store", ["metadata", "mailbox"])
def test_an_unreadable_state_holds_everything_back_until_the_device_is_forgotten(
    metadata_server: Upstream, gateway: GatewayProcess, store: str, kind: str
) -> None:
    acct = make_account(metadata_server, (), f"unread-{store[:4]}-{kind[:4]}")
    user = acct.name
    every = old_mail(metadata_server, acct)
    plant(metadata_server, acct, store, kind)
    # The pc downloads and deletes everything; retention runs after its QUIT.
    assert session(gateway, f"{user}#pc", acct.password, dele=every) == every
    gateway.wait_for_log(AFTER_QUIT_RUN)
    assert_still_upstream(metadata_server, acct, every)
    gateway.wait_for_log(WARNING)

    dry = retention(gateway, user, "--dry-run")
    assert dry[0] == (
        f"{user}: nothing to remove (expunge): a device state cannot be read; "
        "3 messages would otherwise go"
    ), dry
    assert any(
        line.startswith(f"{user}: WARNING state of device laptop (state {KEY}) unreadable")
        and line.endswith(f"`popgate device forget {user} laptop`")
        for line in dry
    ), dry
    applied = retention(gateway, user)
    assert applied[0] == dry[0], applied
    assert_still_upstream(metadata_server, acct, every)
    assert metric_values(gateway)["popgate_retention_state_unreadable_total"] == 1.0

    listed = devices(gateway, user)
    assert listed["laptop"][:5] == ["unknown", "-", "-", "all", "STATE"], listed
    assert f"state {KEY}" in " ".join(listed["laptop"]), listed
    assert listed["pc"][2:6] == ["3", "3", "0", "active"], listed

    forget = popgate(gateway, "device", "forget", user, "laptop")
    assert forget.returncode == 0 and "forgotten" in forget.stdout, forget
    out = retention(gateway, user)
    assert out[0] == f"{user}: removed 3 messages (expunge)", out
    assert upstream_view(metadata_server, user).inbox_flags == {}


@pytest.mark.parametrize("store", ["metadata", "mailbox"])
def test_the_devices_next_login_rewrites_its_state_and_releases_the_hold(
    metadata_server: Upstream, gateway: GatewayProcess, store: str
) -> None:
    acct = make_account(metadata_server, (), f"unread-login-{store[:4]}")
    user, pw = acct.name, acct.password
    every = old_mail(metadata_server, acct)
    plant(metadata_server, acct, store, "corrupt")
    session(gateway, f"{user}#pc", pw, dele=every)
    gateway.wait_for_log(AFTER_QUIT_RUN)
    assert_still_upstream(metadata_server, acct, every)
    gateway.wait_for_log(WARNING)
    # The laptop logs in: its state is rewritten, readable, and it has downloaded nothing
    # yet, so it still holds the mail back, now as a device that lacks it.
    assert session(gateway, f"{user}#laptop", pw, retr=set()) == every
    held = retention(gateway, user)
    assert held[:2] == [f"{user}: nothing to remove (expunge)", f"{user}: kept 3 messages "
                        "active devices still need"], held  # fmt: skip
    assert_still_upstream(metadata_server, acct, every)
    assert devices(gateway, user)["laptop"][2:6] == ["0", "0", "3", "active"]
    # Once it has downloaded them they go.
    session(gateway, f"{user}#laptop", pw)
    assert retention(gateway, user)[0] == f"{user}: removed 3 messages (expunge)"
    assert upstream_view(metadata_server, user).inbox_flags == {}
