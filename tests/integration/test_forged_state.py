"""A forged per-device state message, APPENDed through IMAP, never locks the device out.

Anyone with the user's password (or a confused IMAP client) can write into the state mailbox.
Whatever lands there, the device still logs in and downloads; the unusable copy is reported in
one log line and replaced by a valid state, so the next login reads a clean one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from gateway.maildrop.device_state import DeviceState, state_key
from tests.integration.pop3_helpers import (
    POP_DELETED,
    STATE_MAILBOX,
    Account,
    PopWire,
    imap_add_flags,
    make_account,
    report_logs,
    running_gateway,
    upstream_view,
)
from tests.support import messages
from tests.support.gateway import GatewayProcess
from tests.support.imap_access import append_message, quote_mailbox
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

REPAIR_LOG = "unusable state message"


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with running_gateway(upstream, tmp_path_factory.mktemp("forged-state")) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _attach_gateway_log(request: pytest.FixtureRequest, gateway: GatewayProcess) -> None:
    report_logs(request, gateway)


def state_body(**fields: object) -> bytes:
    data: dict[str, object] = {
        "version": 1,
        "mailbox": "INBOX",
        "device": "default",
        "uidvalidity": 1,
        "uids": "",
        "emailids": [],
    }
    data.update(fields)
    return json.dumps(data).encode()


def forged(kind: str, uidvalidity: int) -> bytes:
    if kind == "nested-json":
        return b'{"version":1,"uids":' + b"[" * 200_000
    if kind == "huge-ranges":
        # Valid JSON: cost 2 GiB and seconds on main, and hid every message yet to come.
        return state_body(uidvalidity=uidvalidity, uids="4:10000001,20000001:30000001")
    if kind == "wrong-types":
        return state_body(uids=123, emailids="abc", uidvalidity=str(uidvalidity))
    assert kind == "oversize"
    return state_body(uidvalidity=uidvalidity, emailids=["M" + "0" * 100] * 50_000)


KINDS = ["nested-json", "huge-ranges", "wrong-types", "oversize"]


def forge_state(upstream: Upstream, acct: Account, kind: str) -> None:
    with upstream.imap(acct.name, acct.password) as conn:
        typ, data = conn.status("INBOX", "(UIDVALIDITY)")
        assert typ == "OK", data
        uidvalidity = int(str(data[0]).rsplit("UIDVALIDITY ", 1)[1].rstrip(")'"))
        raw = (
            b"From: someone <x@example.org>\r\nSubject: not from popgate\r\n"
            + f"X-Popgate-State: {state_key('INBOX', 'default')}\r\n\r\n".encode()
            + forged(kind, uidvalidity)
        )
        conn.create(quote_mailbox(STATE_MAILBOX))
        append_message(conn, raw, STATE_MAILBOX)


@pytest.mark.parametrize("kind", KINDS)
def test_device_logs_in_and_downloads_despite_a_forged_state(
    upstream: Upstream, gateway: GatewayProcess, kind: str
) -> None:
    acct = make_account(
        upstream, [messages.plain(f"m{i}", f"body {i}\n", n=i) for i in range(1, 4)], "forged"
    )
    # Some message carries the keyword, so the login must read the state.
    imap_add_flags(upstream, acct.name, acct.password, acct.uids[0], POP_DELETED)
    forge_state(upstream, acct, kind)
    logged_before = gateway.log_text().count(REPAIR_LOG)

    with PopWire.connect(gateway.host, gateway.pop3_port) as client:
        assert client.login(acct.name, acct.password).startswith(b"+OK"), kind
        status, lines = client.listing("LIST")
        assert status.startswith(b"+OK") and len(lines) == 3  # the forged state hides nothing
        status, body = client.fetch("RETR 2")
        assert status.startswith(b"+OK") and body == acct.messages[1]
        assert client.quit() == b"+OK Bye\r\n"

    gateway.wait_for_log(REPAIR_LOG)
    assert gateway.log_text().count(REPAIR_LOG) == logged_before + 1
    # Repaired: the forged copy is gone, a valid state of the device stands in its place.
    [stored] = upstream_view(upstream, acct.name).state_messages.values()
    assert b"not from popgate" not in stored
    assert DeviceState.from_message(stored, "INBOX", "default").uids == set()

    # A message arriving later is offered (UID 4: inside the forged range), and the next login
    # finds nothing left to repair.
    later = messages.plain("m4", "body 4\n", n=4)
    assert upstream.append(acct.name, acct.password, later) == 4
    with PopWire.connect(gateway.host, gateway.pop3_port) as client:
        assert client.login(acct.name, acct.password).startswith(b"+OK")
        status, lines = client.listing("LIST")
        assert status.startswith(b"+OK") and len(lines) == 4
        assert client.quit() == b"+OK Bye\r\n"
    assert gateway.log_text().count(REPAIR_LOG) == logged_before + 1
