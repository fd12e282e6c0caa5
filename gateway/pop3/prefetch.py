"""Fetching the next messages from IMAP while the current one is still going out to the device.

Without it every RETR costs a full IMAP round trip before its first byte. Two cases:

- *requested*: RETRs a pipelining client has already sent. Their turn comes as soon as the
  message before them ends, which is also when their body starts arriving (the server answers
  in order), so next to nothing is ever held here; they are fetched up to a generous limit.
- *speculative*: the message a sequential client will most likely ask for next. Its body may sit
  here until the client asks, so only small messages are fetched this way, within a small budget.

Either way at most ``depth`` messages are ahead, and anything larger than the limits is simply
streamed when its RETR comes. Each refill is one FETCH of several UIDs, so the per-command work
upstream and here is paid once per batch rather than once per message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred

from gateway.maildrop.numbering import MessageInfo
from gateway.upstream.imap_client import BodySink

# Speculative: messages up to this size, and this many octets (by RFC822.SIZE) in all.
SPECULATIVE_MAX_SIZE = 256 * 1024
SPECULATIVE_BUDGET = 2 * 1024 * 1024
# Requested: octets fetched ahead and not yet taken, at most (also the largest message).
REQUESTED_BUDGET = 16 * 1024 * 1024
# Messages fetched ahead and not yet taken, at most.
DEPTH = 8


class PrefetchedBody:
    """A BodySink that buffers until a consumer attaches, then passes everything through."""

    def __init__(self) -> None:
        self._target: BodySink | None = None
        self._size: int | None = None
        self._chunks: list[bytes] = []
        self._ended = False
        self._result: object = None
        self._done = False
        self._waiter: Callable[[object], None] | None = None

    def literal_begin(self, size: int) -> None:
        if self._target is not None:
            self._target.literal_begin(size)
        else:
            self._size = size

    def literal_data(self, data: bytes) -> None:
        if self._target is not None:
            self._target.literal_data(data)
        else:
            self._chunks.append(data)

    def literal_end(self) -> None:
        if self._target is not None:
            self._target.literal_end()
        else:
            self._ended = True

    def completed(self, result: object) -> None:
        """The FETCH finished (``result`` may be a Failure): tell the consumer, if any."""
        self._done, self._result = True, result
        if self._waiter is not None:
            self._waiter(result)

    def attach(self, target: BodySink, when_done: Callable[[object], None]) -> None:
        """Replay what arrived so far into ``target``, forward the rest, then ``when_done``."""
        self._target = target
        if self._size is not None:
            target.literal_begin(self._size)
        for chunk in self._chunks:
            target.literal_data(chunk)
        self._chunks.clear()
        if self._ended:
            target.literal_end()
        if self._done:
            when_done(self._result)
        else:
            self._waiter = when_done


class Prefetcher:
    def __init__(
        self,
        fetch: Callable[[Mapping[int, BodySink]], Deferred[Any]],
        *,
        speculative_max_size: int = SPECULATIVE_MAX_SIZE,
        speculative_budget: int = SPECULATIVE_BUDGET,
        requested_budget: int = REQUESTED_BUDGET,
        depth: int = DEPTH,
    ) -> None:
        self._fetch = fetch
        self._speculative = (speculative_max_size, speculative_budget)
        self._requested = (requested_budget, requested_budget)
        self._depth = depth
        self._ahead: dict[int, tuple[MessageInfo, PrefetchedBody]] = {}
        self._octets = 0

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def hungry(self) -> bool:
        """At most a quarter of ``depth`` is fetched ahead: time to fetch more.

        Refilling in batches rather than after every message makes each refill one FETCH of
        several messages, and keeps the look at the client's input off the per-message path;
        what is still ahead covers the round trip of the next FETCH.
        """
        return len(self._ahead) <= self._depth // 4

    def want(self, candidates: Iterable[MessageInfo], *, requested: bool) -> None:
        """Start fetching those candidates that fit the limits, in order, in one command."""
        max_size, budget = self._requested if requested else self._speculative
        batch: dict[int, PrefetchedBody] = {}
        for info in candidates:
            if info.uid in self._ahead:
                continue
            if info.size > max_size:
                break  # fetching later ones first would make this one wait behind them
            if len(self._ahead) >= self._depth or self._octets + info.size > budget:
                break
            body = PrefetchedBody()
            self._ahead[info.uid] = (info, body)
            self._octets += info.size
            batch[info.uid] = body
        if batch:
            d = self._fetch(batch)
            d.addBoth(_completed, batch.values())  # a failure is reported on take()

    def take(self, uid: int) -> PrefetchedBody | None:
        entry = self._ahead.pop(uid, None)
        if entry is None:
            return None
        self._octets -= entry[0].size
        return entry[1]

    def clear(self) -> None:
        self._ahead.clear()
        self._octets = 0


def _completed(result: object, bodies: Iterable[PrefetchedBody]) -> None:
    for body in bodies:
        body.completed(result)
