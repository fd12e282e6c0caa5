"""Forged or broken per-device state messages: rejected with InvalidState, at a bounded cost.

Anyone with the user's password can APPEND to the state mailbox. Whatever a state message
holds, parsing it raises nothing but ``InvalidState`` (which the store turns into "ignore and
rewrite"), never expands a UID range into single UIDs, and never allocates much beyond the
message's own size. Memory is measured with tracemalloc (allocations, not time: deterministic).
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.maildrop.device_state import MAX_STATE_BYTES, DeviceState, InvalidState
from gateway.maildrop.uidl import IndexedMessage
from gateway.maildrop.uidset import MAX_UID, UidSet, parse_uid_set

HEADER = b"X-Popgate-State: pg1-x\r\n\r\n"


def state_json(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "mailbox": "INBOX",
        "device": "phone",
        "uidvalidity": 7,
        "uids": "1:3",
        "emailids": [],
    }
    data.update(fields)
    return data


def message(body: bytes | dict[str, Any]) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return HEADER + body


def peak_bytes(work: Callable[[], object]) -> int:
    """Peak of memory allocated while ``work`` runs (its result is dropped inside)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------- nested JSON
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_json_is_invalid_not_a_crash(opener: bytes) -> None:
    # On main this raised RecursionError out of the login: -ERR [SYS/TEMP] at every login.
    raw = message(b'{"version":1,"uids":' + opener * 100_000)
    with pytest.raises(InvalidState, match=r"nested too deeply|not JSON"):
        DeviceState.parse(raw)


def test_nesting_inside_a_field_is_invalid() -> None:
    nested: Any = "x"
    for _ in range(50):
        nested = [nested]
    with pytest.raises(InvalidState):
        DeviceState.parse(message(state_json(emailids=nested)))


# --------------------------------------------------------------------- huge UID ranges
def test_a_huge_range_stays_a_range() -> None:
    # 10 bytes that cost 1 GiB on main (a set of 10,000,001 ints).
    raw = message(state_json(uids="1:10000001"))
    peak = peak_bytes(lambda: DeviceState.parse(raw))
    assert peak < 256 * 1024, peak
    state = DeviceState.parse(raw)
    assert 1 in state.uids and 10_000_001 in state.uids and 10_000_002 not in state.uids
    assert len(state.uids) == 10_000_001
    assert state.uids.ranges() == [(1, 10_000_001)]


def test_many_huge_ranges_cost_no_more_than_one() -> None:
    # Three such ranges took 3 GiB and 8 s on main; the limit was per range, not on the total.
    width = 10_000_000
    uids = ",".join(f"{i * 2 * width + 1}:{i * 2 * width + width}" for i in range(200))
    raw = message(state_json(uids=uids))
    peak = peak_bytes(lambda: DeviceState.parse(raw))
    assert peak < 1024 * 1024, peak
    state = DeviceState.parse(raw)
    assert len(state.uids.ranges()) == 200
    assert len(state.uids) == 200 * width


def test_the_whole_uid_space_is_two_numbers() -> None:
    state = DeviceState.parse(message(state_json(uids=f"1:{MAX_UID}")))
    assert MAX_UID in state.uids and len(state.uids) == MAX_UID


def test_pruning_a_huge_range_works_per_message_present() -> None:
    state = DeviceState.parse(message(state_json(uids=f"1:{MAX_UID}")))
    present = [IndexedMessage(uid, 1, frozenset()) for uid in (5, 9, 2**31)]
    peak = peak_bytes(lambda: state.prune(present))
    assert peak < 64 * 1024, peak
    assert state.uids == {5, 9, 2**31}


def test_many_ranges_beyond_the_size_limit_are_refused_before_parsing() -> None:
    # 1,3,5,...: the most ranges per byte. Over the limit it is refused unread.
    uids = ",".join(str(n) for n in range(1, 2 * 700_000, 2))
    raw = message(state_json(uids=uids))
    assert len(raw) > MAX_STATE_BYTES
    problems: list[str] = []

    def parse() -> None:
        try:
            DeviceState.parse(raw)
        except InvalidState as e:
            problems.append(str(e))

    peak = peak_bytes(parse)
    assert peak < 64 * 1024, peak
    assert problems == [f"state larger than {MAX_STATE_BYTES} bytes"]


def test_many_ranges_within_the_limit_cost_a_bounded_multiple_of_the_input() -> None:
    uids = ",".join(str(n) for n in range(1, 2 * 200_000, 2))
    raw = message(state_json(uids=uids))
    assert len(raw) <= MAX_STATE_BYTES
    peak = peak_bytes(lambda: DeviceState.parse(raw))
    assert peak < 40 * len(raw), (peak, len(raw))
    assert len(DeviceState.parse(raw).uids) == 200_000


def test_an_oversize_message_is_refused_whatever_it_holds() -> None:
    raw = message(state_json(emailids=["M" + "0" * 200] * (MAX_STATE_BYTES // 200)))
    assert len(raw) > MAX_STATE_BYTES
    with pytest.raises(InvalidState, match="larger than"):
        DeviceState.parse(raw)


# --------------------------------------------------------------------- wrong types
@pytest.mark.parametrize(
    "fields",
    [
        {"version": "1"},
        {"version": True},
        {"version": 2},
        {"mailbox": 5},
        {"device": None},
        {"uidvalidity": "5"},
        {"uidvalidity": -1},
        {"uidvalidity": 2**32},
        {"uidvalidity": 1.5},
        {"uidvalidity": None},
        {"uids": 123},
        {"uids": [1, 2]},
        {"uids": "1:x"},
        {"uids": "0"},
        {"uids": "+1"},
        {"uids": " 1"},
        {"uids": "1_0"},
        {"uids": "\u0661"},  # an Arabic-Indic digit: int() takes it, IMAP does not
        {"uids": "4294967296"},
        {"uids": "1,,2"},
        {"uids": "1:2:3"},
        {"emailids": "abc"},
        {"emailids": [1, 2]},
        {"emailids": {"a": 1}},
        {"emailids": [""]},
        {"emailids": ["x" * 256]},
        {"extra": 1},
    ],
    ids=repr,
)
def test_wrong_types_and_values_are_invalid(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidState):
        DeviceState.parse(message(state_json(**fields)))


@pytest.mark.parametrize("missing", ["version", "mailbox", "device", "uidvalidity", "uids"])
def test_missing_fields_are_invalid(missing: str) -> None:
    data = state_json()
    del data[missing]
    with pytest.raises(InvalidState):
        DeviceState.parse(message(data))


@pytest.mark.parametrize(
    "body", [b"", b"\xff\xfe", b"[]", b"null", b"1e999999", b"9" * 5000, b'"x"', b"{"]
)
def test_non_state_bodies_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidState):
        DeviceState.parse(message(body))


def test_a_state_naming_another_device_is_invalid_for_this_one() -> None:
    raw = DeviceState("INBOX", "other", 1, {1}).to_message(date=0, message_id="<s@test>")
    with pytest.raises(InvalidState):
        DeviceState.from_message(raw, "INBOX", "phone")


# --------------------------------------------------------------------- properties
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@given(st.binary(max_size=2000))
def test_any_bytes_raise_only_invalid_state(raw: bytes) -> None:
    try:
        DeviceState.parse(raw)
    except InvalidState:
        pass


@given(
    st.fixed_dictionaries(
        {},
        optional={k: st.just(v) | json_values for k, v in state_json().items()},
    )
)
def test_any_json_raises_only_invalid_state(data: dict[str, Any]) -> None:
    try:
        state = DeviceState.parse(message(data))
    except InvalidState:
        return
    assert set(data) == set(state_json())  # only a complete, well-typed state gets through
    assert state.uids.format() == UidSet(state.uids).format()


uid_ranges = st.lists(
    st.tuples(st.integers(1, MAX_UID), st.integers(0, 2**31)).map(
        lambda r: (r[0], min(MAX_UID, r[0] + r[1]))
    ),
    max_size=50,
)


@settings(max_examples=50)
@given(uid_ranges)
def test_uid_text_of_any_width_parses_in_memory_bounded_by_its_length(
    ranges: list[tuple[int, int]],
) -> None:
    text = ",".join(f"{a}:{b}" if a != b else str(a) for a, b in ranges)
    peak = peak_bytes(lambda: parse_uid_set(text))
    assert peak < 4096 + 200 * len(text), (peak, len(text))
    parsed = parse_uid_set(text)
    for a, b in ranges:
        assert a in parsed and b in parsed


@given(
    st.sets(st.integers(1, 5000), max_size=100),
    st.sets(st.integers(1, 5000), max_size=100),
    st.integers(1, 5100),
)
def test_uid_sets_behave_like_sets(a: set[int], b: set[int], probe: int) -> None:
    ua, ub = UidSet(a), UidSet(b)
    assert ua == a and set(ua) == a and len(ua) == len(a)
    assert (ua | ub) == (a | b)
    assert ua.intersection(b) == (a & b)
    assert (probe in ua) == (probe in a)
    assert parse_uid_set(ua.format()) == ua


@given(
    st.text(max_size=30),
    st.text(max_size=30),
    st.integers(0, MAX_UID),
    st.sets(st.integers(1, MAX_UID), max_size=50),
    st.sets(st.text(min_size=1, max_size=255), max_size=20),
)
def test_state_messages_round_trip(
    mailbox: str, device: str, uidvalidity: int, uids: set[int], emailids: set[str]
) -> None:
    state = DeviceState(mailbox, device, uidvalidity, uids, emailids)
    raw = state.to_message(date=0, message_id="<s@test>")
    assert len(raw) <= MAX_STATE_BYTES
    assert DeviceState.from_message(raw, mailbox, device) == state


def test_uids_not_given_out_yet_are_dropped() -> None:
    state = DeviceState.parse(message(state_json(uidvalidity=7, uids=f"2:5,9,100:{MAX_UID}")))
    assert state.drop_unborn(7, uidnext=10)
    assert state.uids == {2, 3, 4, 5, 9}
    assert not state.drop_unborn(7, uidnext=10)  # nothing more to drop
    other = DeviceState.parse(message(state_json(uidvalidity=8, uids=f"1:{MAX_UID}")))
    assert not other.drop_unborn(7, uidnext=10)  # void anyway under another UIDVALIDITY
    assert len(other.uids) == MAX_UID
