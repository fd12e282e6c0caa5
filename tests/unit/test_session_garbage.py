"""Closed POP3 sessions are freed when they close, by reference counting; what else forms
cycles is freed by the gateway's periodic collection, not left to a full collection that its
raised collector thresholds practically never run (the soak's RSS growth)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.app import GC_INTERVAL, collect_garbage_periodically
from tests.unit.test_pop3_glue import connect

SESSIONS = 50


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    """The gateway's thresholds (100,000 / 50 / 100) run a full collection only after 5,000
    young ones; within one test that is never, which ``gc.disable()`` makes exact."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _open_and_close_sessions() -> list[weakref.ref[object]]:
    refs = []
    sessions = []
    for _ in range(SESSIONS):
        protocol, transport, _reactor, _drop = connect()
        protocol.dataReceived(b"USER alice\r\nPASS pw\r\nLIST\r\n")
        assert transport.value().count(b"+OK") >= 3  # logged in and listed: a real session
        sessions.append((protocol, transport))
        refs.append(weakref.ref(protocol))
    gc.collect()  # they lived through collections: now in the oldest generation
    for protocol, transport in sessions:
        protocol.dataReceived(b"QUIT\r\n")
        protocol.connectionLost(Failure(ConnectionError("closed")))
        transport.protocol = None
    sessions.clear()
    return refs


def test_closed_sessions_are_freed_at_once(no_automatic_collection: None) -> None:
    refs = _open_and_close_sessions()
    assert [r for r in refs if r() is not None] == []


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_cyclic_garbage_is_freed_by_the_periodic_collection(
    no_automatic_collection: None,
) -> None:
    clock = Clock()
    collector = collect_garbage_periodically(clock)
    try:
        cycles = [_Cycle() for _ in range(SESSIONS)]
        gc.collect()  # they lived through collections: now in the oldest generation
        refs = [weakref.ref(c) for c in cycles]
        del cycles
        assert sum(r() is not None for r in refs) == SESSIONS  # their own cycles hold them
        clock.advance(GC_INTERVAL)
        assert [r for r in refs if r() is not None] == []
    finally:
        collector.stop()
