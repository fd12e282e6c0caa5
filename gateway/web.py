"""The ``[http]`` listener: ``/metrics``, ``/healthz`` and ``/readyz`` (docs/operations.md).

Served by twisted.web on the gateway's own reactor: no thread, no second event loop. Nothing
here reads a request body or a query string, and every answer is small.

``/readyz`` says whether the upstream IMAP server answers a connection with its greeting. The
verdict is kept for ``READY_CACHE`` seconds and probes never overlap, so however often a load
balancer or scraper asks, the upstream sees at most one connection per ``READY_CACHE``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from gateway.config import ImapUpstream
from gateway.metrics import Metrics
from gateway.upstream.account import connect
from gateway.upstream.imap_client import ImapError

log = logging.getLogger("popgate.http")

READY_CACHE = 5.0  # seconds a probe's verdict is reused


class ReadinessProbe:
    """The last verdict on the upstream, made again once it is ``cache`` seconds old."""

    def __init__(
        self,
        clock: IReactorTime,
        check: Callable[[], Awaitable[None]],
        metrics: Metrics,
        cache: float = READY_CACHE,
    ) -> None:
        self.clock = clock
        self.check = check  # raises UpstreamUnavailable (or any ImapError) when not ready
        self.metrics = metrics
        self.cache = cache
        self._verdict: tuple[bool, str] | None = None
        self._checked_at = 0.0
        self._running: Deferred[tuple[bool, str]] | None = None
        self._waiting: list[Deferred[tuple[bool, str]]] = []

    def verdict(self) -> Deferred[tuple[bool, str]]:
        """``(ready, reason)``, from the cache while it is fresh; one probe at a time."""
        d: Deferred[tuple[bool, str]] = Deferred()
        fresh = self.clock.seconds() - self._checked_at < self.cache
        if self._verdict is not None and fresh:
            d.callback(self._verdict)
            return d
        self._waiting.append(d)
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._probe())
        return d

    async def _probe(self) -> tuple[bool, str]:
        try:
            await self.check()
        except ImapError as e:
            verdict = (False, str(e))
        else:
            verdict = (True, "upstream IMAP server answers")
        self.metrics.readiness_probes.labels("ok" if verdict[0] else "fail").inc()
        if self._verdict is not None and verdict[0] != self._verdict[0]:
            log.log(logging.INFO if verdict[0] else logging.WARNING, "readiness: %s", verdict[1])
        self._verdict, self._checked_at, self._running = verdict, self.clock.seconds(), None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(verdict)
        return verdict


def imap_greets(reactor: Any, settings: ImapUpstream) -> Callable[[], Awaitable[None]]:
    """A readiness check: connect (TLS as configured), take the greeting, log out."""

    async def check() -> None:
        proto = await connect(reactor, settings)  # raises UpstreamUnavailable
        assert proto.transport is not None
        proto.transport.loseConnection()

    return check


class _Text(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, bytes, bytes]]) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request: Request) -> bytes:
        code, content_type, body = self.answer()
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        return body


class _Ready(Resource):
    isLeaf = True

    def __init__(self, probe: ReadinessProbe) -> None:
        super().__init__()
        self.probe = probe

    def render_GET(self, request: Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _failure: gone.append(True))

        def answer(verdict: tuple[bool, str]) -> None:
            ready, reason = verdict
            if gone:
                return  # the client left meanwhile
            request.setResponseCode(200 if ready else 503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.write(f"{'ready' if ready else 'not ready'}: {reason}\n".encode())
            request.finish()

        self.probe.verdict().addCallback(answer)
        return NOT_DONE_YET


_PLAIN = b"text/plain; charset=utf-8"


class MonitoringSite(Site):
    """No access log: a scraper every few seconds would drown the gateway's own lines."""

    def log(self, request: http.Request) -> None:
        pass


def site(metrics: Metrics, probe: ReadinessProbe) -> Site:
    """The HTTP site: the three endpoints, 404 for anything else."""
    root = Resource()
    root.putChild(b"metrics", _Text(lambda: (200, CONTENT_TYPE_LATEST.encode(), metrics.render())))
    root.putChild(b"healthz", _Text(lambda: (200, _PLAIN, b"ok\n")))
    root.putChild(b"readyz", _Ready(probe))
    web = MonitoringSite(root)
    web.noisy = False
    web.displayTracebacks = False
    return web
