"""Fetching ahead: bodies buffered until taken, limits on size, count and octets."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from gateway.maildrop.maildrop import MessageInfo
from gateway.pop3.prefetch import Prefetcher


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def literal_begin(self, size: int) -> None:
        self.events.append(("begin", size))

    def literal_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def literal_end(self) -> None:
        self.events.append(("end",))


class FakeFetch:
    def __init__(self) -> None:
        self.calls: dict[int, tuple[Any, Deferred[None]]] = {}

    def __call__(self, info: MessageInfo, sink: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls[info.uid] = (sink, d)
        return d


def msg(uid: int, size: int = 10) -> MessageInfo:
    return MessageInfo(uid, size, f"U{uid}")


def test_a_finished_prefetch_replays_into_the_consumer() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch)
    prefetcher.want([msg(1)])
    sink, d = fetch.calls[1]
    sink.literal_begin(5)
    sink.literal_data(b"hello")
    sink.literal_end()
    d.callback(None)
    consumer, results = Recorder(), []
    body = prefetcher.take(1)
    assert body is not None
    body.attach(consumer, results.append)
    assert consumer.events == [("begin", 5), ("data", b"hello"), ("end",)]
    assert results == [None]
    assert prefetcher.take(1) is None


def test_a_running_prefetch_passes_the_rest_through() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch)
    prefetcher.want([msg(1)])
    sink, d = fetch.calls[1]
    sink.literal_begin(6)
    sink.literal_data(b"abc")
    consumer, results = Recorder(), []
    body = prefetcher.take(1)
    assert body is not None
    body.attach(consumer, results.append)
    sink.literal_data(b"def")
    sink.literal_end()
    assert results == []
    d.callback(None)
    assert consumer.events == [("begin", 6), ("data", b"abc"), ("data", b"def"), ("end",)]
    assert results == [None]


def test_a_failed_prefetch_reports_to_the_consumer_only() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch)
    prefetcher.want([msg(1)])
    fetch.calls[1][1].errback(ConnectionError("gone"))  # nobody listening yet: no unhandled error
    results: list[Any] = []
    body = prefetcher.take(1)
    assert body is not None
    body.attach(Recorder(), results.append)
    assert isinstance(results[0].value, ConnectionError)


def test_limits() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch, max_size=100, budget=250, depth=2)
    prefetcher.want([msg(1, 1000), msg(2, 100), msg(3, 100), msg(4, 10)])
    assert sorted(fetch.calls) == [2, 3]  # too big skipped; then depth reached
    assert prefetcher.take(2) is not None
    prefetcher.want([msg(4, 100), msg(5, 100)])
    assert sorted(fetch.calls) == [2, 3, 4]  # depth 2 again: 3 and 4 waiting
    prefetcher.want([msg(3, 100)])
    assert sorted(fetch.calls) == [2, 3, 4]  # never twice
    big = Prefetcher(fetch, max_size=100, budget=150, depth=5)
    big.want([msg(6, 100), msg(7, 100)])
    assert 6 in fetch.calls and 7 not in fetch.calls  # 200 octets would exceed 150
