"""Devices, per-device hidden sets, UIDLs and the maildrop built from a snapshot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.maildrop.device_state import DeviceState, InvalidState, state_key
from gateway.maildrop.login import Login
from gateway.maildrop.numbering import MessageDeleted, NoSuchMessage
from gateway.maildrop.uidl import (
    POP_DELETED,
    IndexedMessage,
    MailboxIndex,
    build_maildrop,
    needs_state,
    uidl_for,
)
from gateway.maildrop.uidset import format_uid_set, parse_uid_set


def test_login_names_split_on_the_last_separator() -> None:
    assert Login.parse("alice#phone", "#") == Login("alice", "phone")
    assert Login.parse("alice", "#") == Login("alice", "default")
    assert Login.parse("a#b#c", "#") == Login("a#b", "c")
    assert Login.parse("alice#", "#") == Login("alice#", "default")
    assert Login.parse("alice#phone", "") == Login("alice#phone", "default")


def test_uidl_is_dovecots_default_format() -> None:
    assert uidl_for(IndexedMessage(1, 10, frozenset()), 0x6B03D89E) == "000000016b03d89e"
    assert uidl_for(IndexedMessage(0xFFFFFFFF, 1, frozenset()), 1) == "ffffffff00000001"


def test_uidl_is_unique_even_where_emailids_repeat() -> None:
    # Cyrus gives byte-identical messages one EMAILID (derived from the content).
    twins = [
        IndexedMessage(1, 10, frozenset(), "Mcaf7b7e1"),
        IndexedMessage(2, 10, frozenset(), "Mcaf7b7e1"),
    ]
    drop = build_maildrop(twins, 77, None)
    uidls = [info.uidl for _, info in drop.listing()]
    assert uidls == ["000000010000004d", "000000020000004d"]


def test_uidl_never_depends_on_the_other_messages() -> None:
    # A UIDL a device holds must keep naming the same message whatever comes or goes around it
    # (a twin expunged, hidden for this device, a new one appended), and the maildrop's UIDLs
    # are exactly uidl_for's.
    a, b, c = (IndexedMessage(uid, 10, frozenset(), "E") for uid in (4, 9, 12))
    for index in ([a, b, c], [b, c], [b], [c, b]):
        drop = build_maildrop(index, 3, None)
        assert {info.uid: info.uidl for _, info in drop.listing()} == {
            m.uid: uidl_for(m, 3) for m in index
        }
    hidden_a = build_maildrop([a, b], 3, DeviceState("INBOX", "d", 3, {4}, {"E"}))
    assert [(info.uid, info.uidl) for _, info in hidden_a.listing()] == [(9, uidl_for(b, 3))]


def test_a_hidden_message_does_not_hide_its_byte_identical_twin() -> None:
    state = DeviceState("INBOX", "phone")
    first, twin = IndexedMessage(1, 10, frozenset(), "E"), IndexedMessage(2, 10, frozenset(), "E")
    state.hide([first], 5)
    assert state.hides(first, 5) and not state.hides(twin, 5)
    assert [info.uid for _, info in build_maildrop([first, twin], 5, state).listing()] == [2]


def test_after_a_uidvalidity_change_hidden_messages_are_found_by_emailid() -> None:
    state = DeviceState("INBOX", "phone", 5, {1}, {"E"})
    renumbered = [IndexedMessage(1, 10, frozenset(), "F"), IndexedMessage(2, 10, frozenset(), "E")]
    assert [info.uid for _, info in build_maildrop(renumbered, 6, state).listing()] == [1]


def test_maildrop_skips_deleted_and_hidden_messages() -> None:
    index = [
        IndexedMessage(1, 10, frozenset()),
        IndexedMessage(2, 20, frozenset({"\\Deleted"})),
        IndexedMessage(3, 30, frozenset({POP_DELETED})),
        IndexedMessage(4, 40, frozenset({POP_DELETED})),
    ]
    state = DeviceState("INBOX", "phone", 7, {3})
    drop = build_maildrop(index, 7, state)
    assert [info.uid for _, info in drop.listing()] == [1, 4]
    assert drop.stat() == (2, 50)
    # Under another UIDVALIDITY the UIDs mean nothing: everything comes back, nothing is lost.
    assert len(build_maildrop(index, 8, state)) == 3


def test_maildrop_deletes_and_reset() -> None:
    drop = build_maildrop(
        [IndexedMessage(1, 10, frozenset()), IndexedMessage(2, 5, frozenset())], 1, None
    )
    drop.delete(2)
    assert drop.stat() == (1, 10)
    with pytest.raises(MessageDeleted):
        drop.message(2)
    with pytest.raises(NoSuchMessage):
        drop.message(3)
    assert [m.uid for m in drop.deleted()] == [2]
    drop.reset()
    assert drop.stat() == (2, 15) and drop.deleted() == []


def test_listings_match_the_numbered_messages_before_and_after_dele() -> None:
    index = MailboxIndex(
        IndexedMessage(uid, uid * 10, frozenset({"\\Deleted"} if uid == 3 else ()))
        for uid in range(1, 6)
    )
    drop = build_maildrop(index, 0x2A, None)
    assert drop.listing_lines("uidl") == "".join(
        f"{n} {uidl_for(m, 0x2A)}\r\n" for n, m in enumerate([index[0], index[1], *index[3:]], 1)
    )
    assert drop.listing_lines("size") == "1 10\r\n2 20\r\n3 40\r\n4 50\r\n"
    drop.delete(2)
    assert drop.listing_lines("size") == "1 10\r\n3 40\r\n4 50\r\n"
    assert drop.listing_lines("uidl") == "".join(
        f"{n} {info.uidl}\r\n" for n, info in drop.listing()
    )
    drop.reset()
    assert drop.listing_lines("size") == "1 10\r\n2 20\r\n3 40\r\n4 50\r\n"


def test_devices_that_hide_nothing_share_one_rendered_view_of_an_index() -> None:
    index = MailboxIndex(IndexedMessage(uid, 100, frozenset()) for uid in range(1, 1001))
    empty = DeviceState("INBOX", "laptop", 7)
    other_validity = DeviceState("INBOX", "pc", 6, {5})  # UIDs of an older UIDVALIDITY
    drops = [build_maildrop(index, 7, s) for s in (None, empty, other_validity)]
    listings = [d.listing_lines("uidl") for d in drops]
    assert all(text is listings[0] for text in listings)  # rendered once, shared
    assert listings[0].count("\r\n") == 1000
    # A device that hid UID 5 gets its own numbering; the shared view is untouched.
    phone = build_maildrop(index, 7, DeviceState("INBOX", "phone", 7, {5}))
    assert len(phone) == 999 and phone.message(5).uid == 6
    assert drops[0].message(5).uid == 5 and build_maildrop(index, 7, None).stat() == (1000, 100_000)
    # A DELE in one session is that session's: the others' listing stays whole.
    drops[0].delete(1)
    assert drops[1].listing_lines("uidl") is listings[0]
    assert not drops[0].listing_lines("uidl").startswith("1 ")
    # Under another UIDVALIDITY the UIDLs change: a new view, not the memo of the old one.
    assert build_maildrop(index, 8, None).message(1).uidl == "0000000100000008"


def test_state_is_read_only_when_a_message_could_be_hidden() -> None:
    plain = [IndexedMessage(1, 1, frozenset())]
    flagged = [IndexedMessage(1, 1, frozenset({POP_DELETED}))]
    assert not needs_state(plain, keywords_allowed=True)
    assert needs_state(flagged, keywords_allowed=True)
    assert needs_state(plain, keywords_allowed=False)


def test_state_message_round_trip_and_foreign_messages() -> None:
    state = DeviceState("INBOX", 'ph\u00f6ne "x"', 42, {1, 2, 3, 9}, {"M1"})
    raw = state.to_message(date=0, message_id="<s@test>")
    assert raw.count(b"\r\n\r\n") == 1 and state.key.encode() in raw
    back = DeviceState.from_message(raw, "INBOX", 'ph\u00f6ne "x"')
    assert back == state
    with pytest.raises(InvalidState):
        DeviceState.from_message(raw, "INBOX", "other")
    with pytest.raises(InvalidState):
        DeviceState.from_message(b"Subject: hi\r\n\r\nnot json", "INBOX", "d")
    assert state_key("INBOX", "a") != state_key("INBOX", "b")


def test_merge_hide_and_prune() -> None:
    a = DeviceState("INBOX", "d", 5, {1, 2})
    a.merge(DeviceState("INBOX", "d", 5, {3}, {"E"}))
    assert a.uids == {1, 2, 3} and a.emailids == {"E"}
    a.hide([IndexedMessage(7, 1, frozenset(), "F")], 5)
    assert a.uids == {1, 2, 3, 7} and a.emailids == {"E", "F"}
    a.prune([IndexedMessage(2, 1, frozenset()), IndexedMessage(7, 1, frozenset(), "F")])
    assert a.uids == {2, 7} and a.emailids == {"F"}
    a.hide([IndexedMessage(1, 1, frozenset())], 6)  # new UIDVALIDITY: old UIDs are void
    assert a.uidvalidity == 6 and a.uids == {1}


@given(st.sets(st.integers(min_value=1, max_value=5000), max_size=200))
def test_uid_sets_round_trip(uids: set[int]) -> None:
    text = format_uid_set(uids)
    assert parse_uid_set(text) == uids
    assert format_uid_set([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"


def test_uid_set_rejects_garbage() -> None:
    for bad in ["x", "0", "1:99999999999", "-1"]:
        with pytest.raises(ValueError):
            parse_uid_set(bad)
