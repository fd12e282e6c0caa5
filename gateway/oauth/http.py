"""POST a form to the provider with Twisted's Agent: never blocks the reactor, always bounded.

Twisted's own HTTP client (already a dependency, unlike treq or requests): every call has one
deadline covering connect, TLS, request and the whole answer, and an answer larger than
``MAX_ANSWER`` bytes is cut off and treated as unreadable. Network failures and timeouts come
out as :class:`~gateway.oauth.protocol.ProviderDown`; nothing here logs a request body (it holds
refresh tokens and client secrets).
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from gateway import __version__
from gateway.oauth.protocol import ProviderDown

__all__ = ["MAX_ANSWER", "REQUEST_TIMEOUT", "FormPoster"]

# Seconds for one provider call, answer included. Token endpoints answer in well under a
# second; 20 s rides out a slow TLS handshake without holding a device's login for long.
REQUEST_TIMEOUT = 20.0
MAX_ANSWER = 64 * 1024  # token answers are a few KiB (Microsoft's JWT access tokens ~2-3 KiB)


class _BoundedBody(Protocol):
    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.finished.called:
                self.finished.errback(ProviderDown(f"answer larger than {self.limit} bytes"))
            assert self.transport is not None
            self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(ProviderDown(f"answer cut off: {reason.getErrorMessage()}"))


class FormPoster:
    """``post(url, body) -> Deferred[(status, answer bytes)]`` for OAuth endpoints."""

    def __init__(self, reactor: Any, timeout: float = REQUEST_TIMEOUT) -> None:
        self.reactor = reactor
        self.timeout = timeout
        # Not persistent: a provider call happens once an hour per user at most.
        self.agent = Agent(
            reactor, connectTimeout=timeout, pool=HTTPConnectionPool(reactor, persistent=False)
        )

    def post(self, url: str, body: bytes) -> Deferred[tuple[int, bytes]]:
        headers = Headers(
            {
                b"Content-Type": [b"application/x-www-form-urlencoded"],
                b"Accept": [b"application/json"],
                b"User-Agent": [f"popgate/{__version__}".encode()],
            }
        )
        try:
            target = url.encode("ascii")
        except UnicodeEncodeError:
            return _failed(ProviderDown(f"not an ASCII URL: {url!r}"))
        request = self.agent.request(b"POST", target, headers, FileBodyProducer(io.BytesIO(body)))

        def read(response: IResponse) -> Deferred[tuple[int, bytes]]:
            finished: Deferred[bytes] = Deferred()
            response.deliverBody(_BoundedBody(finished, MAX_ANSWER))
            return finished.addCallback(lambda answer: (response.code, answer))

        result: Deferred[tuple[int, bytes]] = request.addCallback(read)
        clock: IReactorTime = self.reactor

        def network_error(failure: Failure) -> Failure:
            if failure.check(ProviderDown):
                return failure
            return Failure(ProviderDown(f"{url}: {failure.getErrorMessage()}"))

        def timed_out(result: object, timeout: float) -> Failure:
            # Whatever the cancelled request failed with (ResponseNeverReceived, ...).
            return Failure(ProviderDown(f"no answer from {url} within {timeout:g} s"))

        result.addErrback(network_error)
        result.addTimeout(self.timeout, clock, onTimeoutCancel=timed_out)
        return result


def _failed(exc: Exception) -> Deferred[tuple[int, bytes]]:
    d: Deferred[tuple[int, bytes]] = Deferred()
    d.errback(exc)
    return d
