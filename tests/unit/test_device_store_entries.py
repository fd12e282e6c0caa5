"""How a state copy is spread over METADATA entries and put back together (no server)."""

from __future__ import annotations

import re
import socket
import time

import pytest

from gateway.host import host_name
from gateway.maildrop.device_state import DeviceState
from gateway.upstream.device_store import (
    PROBE_AGAIN_AFTER,
    STALE_PARTIAL_SECONDS,
    STATE_ROOT,
    RecentRefusals,
    _state_message,
    assemble,
    chunk_entries,
    new_writer_id,
    writer_time,
)

KEY = DeviceState("INBOX", "phone").key
PREFIX = f"{STATE_ROOT}/{KEY}"


def test_chunks_are_bounded_named_i_of_n_and_join_back() -> None:
    data = bytes(range(256)) * 300  # 76,800 octets
    entries = chunk_entries(KEY, "w1", data, 32 * 1024)
    assert list(entries) == [f"{PREFIX}/w1-0-3", f"{PREFIX}/w1-1-3", f"{PREFIX}/w1-2-3"]
    assert all(len(v) <= 32 * 1024 for v in entries.values())
    found = assemble(entries, PREFIX, now=0)
    assert found.whole == {"w1": data}
    assert sorted(found.names) == sorted(entries)


def test_an_empty_copy_is_one_entry() -> None:
    assert chunk_entries(KEY, "w", b"", 10) == {f"{PREFIX}/w-0-1": b""}


def test_entry_names_are_lower_case_as_dovecot_stores_them() -> None:
    writer = new_writer_id()
    assert writer == writer.lower() and all(
        n == n.lower() for n in chunk_entries(KEY, writer, b"x", 1)
    )


def test_partial_copies_do_not_count_and_are_removed_only_when_stale() -> None:
    fresh, old = new_writer_id(), "0000000000000001abcd"
    entries = {
        **chunk_entries(KEY, "whole", b"abcdef", 3),
        f"{PREFIX}/{fresh}-0-2": b"half",  # being written right now
        f"{PREFIX}/{old}-1-2": b"left over",  # a writer that died long ago
    }
    found = assemble(entries, PREFIX, now=writer_time(fresh) + 1)
    assert found.whole == {"whole": b"abcdef"}
    assert found.partial == 2
    assert f"{PREFIX}/{old}-1-2" in found.names
    assert f"{PREFIX}/{fresh}-0-2" not in found.names
    later = assemble(entries, PREFIX, now=writer_time(fresh) + STALE_PARTIAL_SECONDS + 1)
    assert f"{PREFIX}/{fresh}-0-2" in later.names


def test_foreign_and_malformed_names_are_ignored() -> None:
    entries = {
        f"{PREFIX}/w-0-1": b"ok",
        f"{PREFIX}/w-0-2": b"disagrees on n",
        f"{PREFIX}/x-5-2": b"index out of range",
        f"{PREFIX}/nodash": b"?",
        f"{PREFIX}/a/b-0-1": b"deeper",
        f"{STATE_ROOT}/other/w-0-1": b"another device",
    }
    found = assemble(entries, PREFIX, now=0)
    assert found.whole == {"w": b"ok"}
    assert found.names == [f"{PREFIX}/w-0-1"]


def test_a_10000_message_state_size() -> None:
    """The numbers docs/pop3.md gives."""
    uids = set(range(1, 20_000, 2))
    emailids = {f"M{n:024x}" for n in range(10_000)}
    with_ids = DeviceState("INBOX", "phone", 7, uids, emailids).to_message(
        date=0, message_id="<s@test>"
    )
    uids_only = DeviceState("INBOX", "phone", 7, uids).to_message(date=0, message_id="<s@test>")
    assert 300_000 < len(with_ids) < 360_000
    assert len(chunk_entries(KEY, "w", with_ids, 32 * 1024)) == 11
    assert 50_000 < len(uids_only) < 60_000
    assert len(chunk_entries(KEY, "w", uids_only, 32 * 1024)) == 2


def test_a_state_message_is_dated_and_named_without_a_dns_lookup_per_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host name for the Message-ID is looked up once per process (``gateway.host``), not
    by every save on the reactor thread (``make_msgid`` without a domain calls getfqdn)."""
    host_name()  # what Gateway.start does
    lookups: list[str] = []
    monkeypatch.setattr(socket, "getfqdn", lambda name="": lookups.append(name) or "slow.dns")
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    state = DeviceState("INBOX", "phone", 7, {1})
    first, second = _state_message(state), _state_message(state)
    assert lookups == []
    assert b"\r\nDate: Sun, 09 Sep 2001 01:46:40 -0000\r\n" in first
    ids = [re.findall(rb"\r\nMessage-ID: (<[^\r\n]*>)\r\n", m) for m in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
    assert all(i[0].endswith(f".popgate-state@{host_name()}>".encode()) for i in ids)


def test_a_refusal_is_trusted_for_probe_again_after_then_forgotten() -> None:
    now = [1000.0]
    refusals = RecentRefusals(clock=lambda: now[0])
    key = ("alice", "INBOX")
    assert key not in refusals
    refusals.add(key)
    assert key in refusals and ("bob", "INBOX") not in refusals
    now[0] += PROBE_AGAIN_AFTER - 1
    assert key in refusals
    now[0] += 1
    assert key not in refusals  # asked again (with the probe) from now on


def test_remembered_refusals_are_bounded() -> None:
    refusals = RecentRefusals(clock=lambda: 0.0)
    for i in range(10_001):
        refusals.add((f"user{i}", "INBOX"))
    assert ("user0", "INBOX") not in refusals  # the oldest went first
    assert ("user1", "INBOX") in refusals and ("user10000", "INBOX") in refusals
