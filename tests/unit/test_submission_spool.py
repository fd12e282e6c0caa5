"""The spool: sealed entries, files with safe modes, the retry loop (asyncio, fake IMAP)."""

from __future__ import annotations

import asyncio
import base64
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import SubmissionSettings
from gateway.submission.spool import (
    KEY_FILE,
    Listed,
    SentSpool,
    SpoolEntry,
    SpoolError,
    SpoolStatus,
    SpoolStore,
    backoff_delay,
    decode_entry,
    encode_entry,
    format_listing,
    load_key,
    new_entry_id,
    parse_key,
    seal,
    unseal,
)

KEY = bytes(range(32))


def entry(**changes: object) -> SpoolEntry:
    base = SpoolEntry(
        id=new_entry_id(),
        created=1_790_000_000.0,
        user="alice",
        device="phone",
        sender="alice@example.org",
        recipients=("bob@example.org", "jörg@exämple.org"),
        message_id="<m@example.org>",
        message=b"Subject: x\r\n\r\n\x00\xff binary \r\n",
        peer="127.0.0.1:5555",
        password="pw\nwith newline",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_seal_roundtrip_and_refusals() -> None:
    blob = seal(KEY, b"secret payload")
    assert b"secret" not in blob
    assert unseal(KEY, blob) == b"secret payload"
    with pytest.raises(SpoolError, match="another spool key"):
        unseal(bytes(32), blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SpoolError):
        unseal(KEY, tampered)
    with pytest.raises(SpoolError, match="not a popgate spool file"):
        unseal(KEY, b"hello")
    assert seal(KEY, b"x") != seal(KEY, b"x")  # fresh nonce each time


def test_entry_encoding_roundtrip() -> None:
    e = entry()
    assert decode_entry(encode_entry(e)) == e
    assert decode_entry(encode_entry(e.without_password())).password is None
    with pytest.raises(SpoolError):
        decode_entry(b'{"v": 2}\nx')
    with pytest.raises(SpoolError):
        decode_entry(b"garbage")


def test_backoff() -> None:
    assert [backoff_delay(n, 60, 3600) for n in range(8)] == [
        0, 60, 120, 240, 480, 960, 1920, 3600,
    ]  # fmt: skip
    assert backoff_delay(10_000, 1, 3600) == 3600


def test_parse_key() -> None:
    assert parse_key(base64.b64encode(KEY).decode() + "\n") == KEY
    for bad in ("", "abc", base64.b64encode(b"short").decode(), "!!!!"):
        with pytest.raises(SpoolError):
            parse_key(bad)


def test_generated_key_is_private_and_reused(tmp_path: Path) -> None:
    settings = SubmissionSettings(spool_dir=tmp_path / "spool")
    assert load_key(settings, create=False) is None
    key = load_key(settings, create=True)
    assert key is not None and len(key) == 32
    key_file = tmp_path / "spool" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    assert load_key(settings, create=True) == key
    configured = SubmissionSettings(
        spool_dir=tmp_path / "spool", spool_key=base64.b64encode(KEY).decode()
    )
    assert load_key(configured, create=True) == KEY


def test_store_lifecycle(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "spool", KEY)
    store.prepare()
    e = entry()
    store.write_relaying(e, keep_password=False)
    path = tmp_path / "spool" / f"{e.id}.relaying"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"binary" not in path.read_bytes()
    assert store.ids(".relaying") == [e.id] and store.ids(".pending") == []
    assert store.load(e.id, ".relaying") == e.without_password()
    with pytest.raises(FileExistsError):  # an id is never reused
        store.write_relaying(e, keep_password=True)
    store.mark_relayed(e.id)
    assert store.ids(".pending") == [e.id] and store.ids(".relaying") == []
    store.write_status(e.id, SpoolStatus(3, "IMAP down", 123.0))
    assert store.read_status(e.id) == SpoolStatus(3, "IMAP down", 123.0)
    [listed] = store.listing()
    assert (listed.id, listed.state, listed.entry) == (e.id, "pending", e.without_password())
    store.remove(e.id)
    assert list((tmp_path / "spool").iterdir()) == []
    with pytest.raises(SpoolError):
        store.load("../etc/passwd")


def test_listing_says_why(tmp_path: Path) -> None:
    e = entry(id="0001-a", created=1000.0)
    items = [
        Listed("0001-a", "pending", e, SpoolStatus(2, "cannot reach IMAP server", 1100.0)),
        Listed("0002-b", "relaying", e, None),
        Listed("0003-c", "pending", e, None),
        Listed("0004-d", "unreadable", None, None, "cannot decrypt"),
    ]
    lines = format_listing(items, now=1060.0)
    assert lines[0].split() == [
        "ID", "STATE", "AGE", "USER", "SIZE", "RCPTS", "MESSAGE-ID", "WHY", "IT", "WAITS",
    ]  # fmt: skip
    assert "alice" in lines[1] and "60s" in lines[1]
    assert lines[1].endswith(
        "Sent copy not stored after 2 attempts: cannot reach IMAP server; next try in 40s"
    )
    assert "being relayed now" in lines[2]
    assert "first attempt not finished" in lines[3]
    assert lines[4].endswith("unreadable: cannot decrypt")


def test_retry_loop_until_stored_then_removed(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, KEY)
    calls: list[tuple[str, str | None]] = []

    async def scenario() -> None:
        results = [OSError("IMAP down"), OSError("IMAP still down"), "appended"]
        stored = asyncio.Event()

        async def store_copy(e: SpoolEntry) -> str:
            calls.append((e.id, e.password))
            outcome = results.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            stored.set()
            return outcome

        spool = SentSpool(store, store_copy, 0.01, 0.02, asyncio.get_running_loop())
        e = entry()
        store.write_relaying(e, keep_password=False)
        store.mark_relayed(e.id)
        spool.submit(e)
        await asyncio.wait_for(stored.wait(), 5)
        for _ in range(100):
            if not store.ids(".pending"):
                break
            await asyncio.sleep(0.01)
        await spool.stop(1)

    asyncio.run(scenario())
    # the first attempt has the password from memory, retries only what the file holds
    assert [password for _, password in calls] == ["pw\nwith newline", None, None]
    assert store.ids(".pending") == [] and list(tmp_path.iterdir()) == []


def test_start_drops_unknown_outcomes_and_retries_pending(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, KEY)
    relaying, pending = entry(), entry()
    store.write_relaying(relaying, keep_password=True)
    store.write_relaying(pending, keep_password=True)
    store.mark_relayed(pending.id)
    seen: list[str] = []

    async def scenario() -> None:
        done = asyncio.Event()

        async def store_copy(e: SpoolEntry) -> str:
            seen.append(e.id)
            done.set()
            return "ok"

        spool = SentSpool(store, store_copy, 10, 10, asyncio.get_running_loop())
        await spool.start()
        await asyncio.wait_for(done.wait(), 5)
        await spool.stop(1)

    asyncio.run(scenario())
    assert seen == [pending.id]
    assert store.ids(".relaying") == [] and store.ids(".pending") == []


def test_one_attempt_at_a_time_per_entry(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, KEY)
    running = 0
    most = 0

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def store_copy(e: SpoolEntry) -> str:
            nonlocal running, most
            running += 1
            most = max(most, running)
            started.set()
            await release.wait()
            running -= 1
            return "ok"

        spool = SentSpool(store, store_copy, 10, 10, asyncio.get_running_loop())
        e = entry()
        store.write_relaying(e, keep_password=True)
        store.mark_relayed(e.id)
        spool.submit(e)
        await asyncio.wait_for(started.wait(), 5)
        spool.submit(e)  # while the first attempt runs
        spool._run(e.id, None)  # and the retry timer firing at the same moment
        release.set()
        await spool.stop(1)

    asyncio.run(scenario())
    assert most == 1
