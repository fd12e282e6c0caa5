"""Pieces of the Sent writer that need no IMAP server: the per-Message-ID locks, the hash sink."""

from __future__ import annotations

import asyncio
import hashlib

from gateway.submission.sent import DigestSink, KeyedLocks, internaldate


def test_one_key_at_a_time_other_keys_in_parallel_and_nothing_kept() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def hold(key: tuple[str, str], name: str) -> None:
            async with locks.hold(key):
                order.append(f"{name} in")
                await release.wait()
                order.append(f"{name} out")

        first = asyncio.create_task(hold(("alice", "<m@x>"), "first"))
        second = asyncio.create_task(hold(("alice", "<m@x>"), "second"))
        other = asyncio.create_task(hold(("bob", "<m@x>"), "other"))
        while len(order) < 2:
            await asyncio.sleep(0)
        assert order == ["first in", "other in"]  # the second waits for the first
        assert len(locks) == 2
        release.set()
        await asyncio.gather(first, second, other)

    asyncio.run(scenario())
    assert order.index("first out") < order.index("second in")
    assert len(locks) == 0


def test_a_failing_holder_releases_its_key() -> None:
    locks = KeyedLocks()

    async def scenario() -> None:
        try:
            async with locks.hold(("alice", "<m@x>")):
                raise OSError("IMAP down")
        except OSError:
            pass
        async with locks.hold(("alice", "<m@x>")):
            pass

    asyncio.run(scenario())
    assert len(locks) == 0


def test_digest_sink_hashes_each_body_in_chunks() -> None:
    sink = DigestSink()
    for body in (b"first body\r\n", b""):
        sink.literal_begin(len(body))
        sink.literal_data(body[:3])
        sink.literal_data(body[3:])
        sink.literal_end()
    assert sink.digests == [hashlib.sha256(b"first body\r\n").digest(), hashlib.sha256().digest()]


def test_internaldate_is_rfc3501_in_utc() -> None:
    assert internaldate(0) == "01-Jan-1970 00:00:00 +0000"
