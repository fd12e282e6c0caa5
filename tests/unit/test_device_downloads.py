"""Per-device download tracking in DeviceState: format, old states, merges, forged input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.maildrop.device_state import MAX_STATE_BYTES, DeviceState, InvalidState
from gateway.maildrop.uidl import IndexedMessage
from gateway.maildrop.uidset import MAX_UID

HEADER = b"X-Popgate-State: pg1-x\r\n\r\n"
# A state message exactly as popgate wrote it before download tracking (version 1).
V1_STATE = (
    b"From: popgate <popgate@localhost>\r\n"
    b"X-Popgate-State: pg1-0123\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n\r\n"
    b'{"version":1,"mailbox":"INBOX","device":"phone","uidvalidity":7,'
    b'"uids":"1:3,9","emailids":["M9"]}\r\n'
)


def v2(**fields: Any) -> bytes:
    data: dict[str, Any] = {
        "version": 2,
        "mailbox": "INBOX",
        "device": "phone",
        "uidvalidity": 7,
        "uids": "1:3",
        "emailids": [],
        "downloaded": "1:5",
        "last_seen": 1_700_000_000,
    }
    data.update(fields)
    return HEADER + json.dumps(data).encode()


def test_an_old_format_state_still_loads_as_nothing_downloaded_and_never_seen() -> None:
    state = DeviceState.from_message(V1_STATE, "INBOX", "phone")
    assert state.uids == {1, 2, 3, 9} and state.emailids == {"M9"}
    assert not state.downloaded and state.last_seen == 0
    # Written back, it is the new format and keeps what it had.
    again = DeviceState.parse(state.to_message(date=0, message_id="<s@test>"))
    assert again == state
    assert b'"version":2' in state.to_message(date=0, message_id="<s@test>")


def test_a_v1_state_with_v2_fields_or_v2_without_them_is_invalid() -> None:
    with pytest.raises(InvalidState):
        DeviceState.parse(v2(version=1))
    data = json.loads(v2().partition(b"\r\n\r\n")[2])
    del data["downloaded"]
    with pytest.raises(InvalidState):
        DeviceState.parse(HEADER + json.dumps(data).encode())


@pytest.mark.parametrize(
    "fields",
    [
        {"downloaded": 5},
        {"downloaded": [1]},
        {"downloaded": "0"},
        {"downloaded": "1:x"},
        {"downloaded": f"{MAX_UID + 1}"},
        {"last_seen": -1},
        {"last_seen": "1"},
        {"last_seen": 1.5},
        {"last_seen": None},
        {"last_seen": True},
        {"last_seen": 10**20},  # forged "seen forever": refused, not trusted
    ],
    ids=repr,
)
def test_forged_download_fields_are_invalid(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidState):
        DeviceState.parse(v2(**fields))


def test_a_state_over_the_size_cap_is_refused_whatever_its_downloads() -> None:
    many = ",".join(str(2 * i + 1) for i in range(MAX_STATE_BYTES // 8))
    raw = v2(uids=many, downloaded=many)
    assert len(raw) > MAX_STATE_BYTES
    with pytest.raises(InvalidState, match="larger than"):
        DeviceState.parse(raw)


def test_a_huge_downloaded_range_stays_a_range() -> None:
    state = DeviceState.parse(v2(downloaded=f"1:{MAX_UID}"))
    assert state.downloaded.ranges() == [(1, MAX_UID)]
    state.prune([IndexedMessage(4, 10, frozenset())])
    assert state.downloaded == {4}


def test_merge_unions_downloads_and_keeps_the_later_login() -> None:
    a = DeviceState("INBOX", "phone", 7, {1}, downloaded={1, 2}, last_seen=100)
    b = DeviceState("INBOX", "phone", 7, {3}, downloaded={5}, last_seen=50)
    a.merge(b)
    assert a.uids == {1, 3} and a.downloaded == {1, 2, 5} and a.last_seen == 100
    # A copy from before a UIDVALIDITY change adds no UIDs, only its login time.
    old = DeviceState("INBOX", "phone", 6, {9}, downloaded={9}, last_seen=200)
    a.merge(old)
    assert a.downloaded == {1, 2, 5} and a.last_seen == 200


def test_download_says_whether_anything_is_new() -> None:
    state = DeviceState("INBOX", "phone", 7, {1})
    assert state.download([2, 3], 7)
    assert not state.download([3], 7)
    assert state.covers(1, 7) and state.covers(2, 7) and not state.covers(4, 7)
    assert not state.covers(2, 8)  # another UIDVALIDITY: nothing is covered
    assert state.download([1], 8)  # rebuilt mailbox: the old UIDs go
    assert state.uids == set() and state.downloaded == {1}


def test_unborn_downloads_are_dropped_like_unborn_hides() -> None:
    state = DeviceState.parse(v2(uids="1", downloaded=f"2,50:{MAX_UID}"))
    assert state.drop_unborn(7, uidnext=10)
    assert state.downloaded == {2}


def test_prune_keeps_downloads_newer_than_the_snapshot() -> None:
    state = DeviceState("INBOX", "phone", 7, downloaded={1, 2, 8})
    state.prune([IndexedMessage(1, 10, frozenset())], newer_from=5)
    assert state.downloaded == {1, 8}


@given(
    st.sets(st.integers(1, MAX_UID), max_size=40),
    st.sets(st.integers(1, MAX_UID), max_size=40),
    st.integers(0, 253402300799),
)
def test_round_trip_with_downloads(uids: set[int], downloaded: set[int], seen: int) -> None:
    state = DeviceState("INBOX", "d", 9, uids, {"E1"}, downloaded, seen)
    assert (
        DeviceState.from_message(state.to_message(date=0, message_id="<s@test>"), "INBOX", "d")
        == state
    )
