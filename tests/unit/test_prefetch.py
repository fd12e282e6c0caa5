"""Fetching ahead: bodies buffered until taken, limits on size, count and octets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred

from gateway.maildrop.numbering import MessageInfo
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
    """One FETCH per call, for the UIDs of ``sinks``; every body's sink and the FETCH's result."""

    def __init__(self) -> None:
        self.calls: dict[int, tuple[Any, Deferred[None]]] = {}
        self.commands: list[list[int]] = []

    def __call__(self, sinks: Mapping[int, Any]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        for uid, sink in sinks.items():
            self.calls[uid] = (sink, d)
        self.commands.append(list(sinks))
        return d


def msg(uid: int, size: int = 10) -> MessageInfo:
    return MessageInfo(uid, size, f"U{uid}")


def test_a_finished_prefetch_replays_into_the_consumer() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch)
    prefetcher.want([msg(1)], requested=True)
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
    prefetcher.want([msg(1)], requested=True)
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
    prefetcher.want([msg(1)], requested=True)
    fetch.calls[1][1].errback(ConnectionError("gone"))  # nobody listening yet: no unhandled error
    results: list[Any] = []
    body = prefetcher.take(1)
    assert body is not None
    body.attach(Recorder(), results.append)
    assert isinstance(results[0].value, ConnectionError)


def test_speculative_limits() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch, speculative_max_size=100, speculative_budget=150, depth=2)
    prefetcher.want([msg(1, 1000)], requested=False)
    assert fetch.calls == {}  # too big to hold while the client makes up its mind
    prefetcher.want([msg(2, 100)], requested=False)
    prefetcher.want([msg(3, 100)], requested=False)
    assert sorted(fetch.calls) == [2]  # 200 octets would exceed the budget of 150
    assert prefetcher.take(2) is not None
    prefetcher.want([msg(3, 100)], requested=False)
    assert sorted(fetch.calls) == [2, 3]


def test_requested_limits_keep_the_order() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch, requested_budget=1000, depth=3)
    prefetcher.want([msg(1, 500), msg(2, 2000), msg(3, 10)], requested=True)
    # 2 is too big to fetch ahead; 3 must not overtake it, or 3's body would wait behind 2.
    assert sorted(fetch.calls) == [1]
    prefetcher.want([msg(4, 10), msg(5, 10), msg(6, 10), msg(7, 10)], requested=True)
    assert sorted(fetch.calls) == [1, 4, 5]  # depth 3
    assert not prefetcher.hungry
    prefetcher.want([msg(4, 10)], requested=True)
    assert sorted(fetch.calls) == [1, 4, 5]  # never twice
    assert prefetcher.take(4) is not None and not prefetcher.hungry  # 2 of 3 still ahead
    assert prefetcher.take(5) is not None and not prefetcher.hungry  # 1 of 3: 3 // 4 is 0
    assert prefetcher.take(1) is not None and prefetcher.hungry
    assert fetch.commands == [[1], [4, 5]]  # one FETCH per refill


def test_every_body_of_a_batch_learns_how_the_fetch_ended() -> None:
    fetch = FakeFetch()
    prefetcher = Prefetcher(fetch)
    prefetcher.want([msg(1), msg(2)], requested=True)
    sink, d = fetch.calls[1]
    sink.literal_begin(2)
    sink.literal_data(b"ok")
    sink.literal_end()
    d.errback(ConnectionError("gone"))  # after the first body: the second never came
    first, second = prefetcher.take(1), prefetcher.take(2)
    assert first is not None and second is not None
    results: list[Any] = []
    consumer = Recorder()
    first.attach(consumer, results.append)
    second.attach(Recorder(), results.append)
    assert consumer.events == [("begin", 2), ("data", b"ok"), ("end",)]
    assert [isinstance(r.value, ConnectionError) for r in results] == [True, True]
