"""Wiring: builds the listeners from the configuration and runs them until SIGTERM/SIGINT;
SIGHUP re-reads the certificate and key (nothing else of the configuration).

Shutdown is graceful: listeners close first, sessions get ``SHUTDOWN_GRACE`` seconds to finish,
then the rest are dropped. A session that is in its UPDATE is never cut off: it is waited for
(its deletes are either fully recorded or reported), and dropping any other session applies
none of its deletes, as RFC 1939 asks.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway import tls
from gateway.config import LISTEN_BACKLOG, Config, ListenAddress
from gateway.host import host_name
from gateway.limits import ClientLimits, open_files_needed
from gateway.log import setup_logging
from gateway.metrics import Metrics
from gateway.oauth.tokens import AccessTokens
from gateway.pop3.backend import MaildropService
from gateway.pop3.server import Listener, Pop3Factory, Pop3Protocol
from gateway.proxy_protocol import ProxyHeaderFactory
from gateway.upstream.logins import upstream_logins

log = logging.getLogger("popgate")

SHUTDOWN_GRACE = 10.0
# An UPDATE in progress is waited for this long at most, after the grace period.
UPDATE_GRACE = 60.0


async def _listen(
    reactor: Any, address: ListenAddress, factory: Any, tls: Any | None, proxies: Any = None
) -> Any:
    """Listen on ``address`` (IPv4 or IPv6), wrapping in TLS when ``tls`` is given, and below
    that in a PROXY header reader when ``proxies`` (a ProxyHeaderFactory maker) is given."""
    endpoint_type = TCP6ServerEndpoint if ":" in address.host else TCP4ServerEndpoint
    endpoint = endpoint_type(reactor, address.port, backlog=LISTEN_BACKLOG, interface=address.host)
    if tls is not None:
        factory = TLSMemoryBIOFactory(tls, False, factory)
    if proxies is not None:
        factory = proxies(factory, tls is not None)
    return await endpoint.listen(factory)


class Gateway:
    """Everything ``popgate serve`` runs, so tests and the CLI start it the same way."""

    def __init__(self, reactor: Any, config: Config, tokens: AccessTokens | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.ports: list[IListeningPort] = []
        self.pop3_sessions: set[Pop3Protocol] = set()
        self.metrics = Metrics()  # a registry of its own: gateways in one process never mix
        self.logins = upstream_logins(reactor, config, tokens)
        self.maildrops = MaildropService(reactor, config, self.metrics, self.logins)
        # One set of limits for every listener: connections and failed logins are counted per
        # client address across POP3 and submission alike.
        self.limits = ClientLimits(config.security, reactor.seconds)
        self.submission: Any = None  # gateway.submission.service.SubmissionService when configured
        self.server_tls: tls.ServerTLS | None = None  # the listeners' pair, after start()

    async def start(self) -> None:
        config = self.config
        hostname = host_name()  # the one lookup: state messages use it too
        if tls.ensure_server_certificate(config.tls, hostname):
            log.warning(
                "generated a self-signed certificate %s for %s; devices will warn about it",
                config.tls.cert_file,
                hostname,
            )
        self.server_tls = tls.ServerTLS(
            config.tls, config.tls_min_version_for("pop3"), config.tls_min_version_for("submission")
        )
        self._certificate_in_use(self.server_tls)
        pop3_tls = self.server_tls
        networks = config.security.insecure_auth
        proxies = self._pop3_proxy_headers if config.pop3.proxy_protocol else None
        for addresses, implicit in ((config.pop3.listen, False), (config.pop3.listen_tls, True)):
            listener = Listener(pop3_tls, implicit, networks, config.pop3.idle_timeout, self.limits)
            factory = Pop3Factory(self.maildrops, self.reactor, listener, self.pop3_sessions)
            for address in addresses:
                port = await _listen(
                    self.reactor, address, factory, pop3_tls if implicit else None, proxies
                )
                self.ports.append(port)
                bound = port.getHost()
                shown = ListenAddress(bound.host, bound.port)
                log.info("listening pop3 on %s (%s)", shown, "tls" if implicit else "plain")
        self.maildrops.retention.start()
        await self._start_submission()
        await self._start_http()

    def reload_tls(self) -> bool:
        """SIGHUP: new handshakes get the certificate and key now in the files; open sessions
        keep theirs. A pair that cannot be used is logged and the one in use kept."""
        if self.server_tls is None:
            log.warning("certificate not reloaded: the listeners are not started yet")
            return False
        try:
            certificate = self.server_tls.reload()
        except tls.TLSSetupError as e:
            self.metrics.tls_reloads.labels("fail").inc()
            log.error("certificate not reloaded, still using the previous one: %s", e)
            return False
        self.metrics.tls_reloads.labels("ok").inc()
        self._certificate_in_use(self.server_tls)
        second = self.server_tls.second_certificate
        also = f"; second pair: {tls.describe_certificate(second)}" if second is not None else ""
        log.info("certificate reloaded: %s%s", tls.describe_certificate(certificate), also)
        return True

    def _certificate_in_use(self, server_tls: tls.ServerTLS) -> None:
        """The expiry metric follows the certificate that expires first (with two pairs)."""
        self.metrics.tls_certificate_expiry.set(server_tls.expires.timestamp())

    def _pop3_proxy_headers(self, factory: Any, implicit_tls: bool) -> ProxyHeaderFactory:
        # A TLS client waits for the handshake: a plain-text -ERR would only confuse it.
        refusal = b"" if implicit_tls else b"-ERR [SYS/PERM] connection refused (PROXY)\r\n"
        return ProxyHeaderFactory(
            factory, self.reactor, self.config.security.proxies, "pop3", refusal
        )

    async def stop(self) -> None:
        self.maildrops.retention.stop()
        submission_stopped = self._stop_submission()
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        self.ports.clear()
        if self.pop3_sessions:
            log.info("waiting up to %ss for %d sessions", SHUTDOWN_GRACE, len(self.pop3_sessions))
        await self._wait_for(lambda: not self.pop3_sessions, SHUTDOWN_GRACE)
        for session in list(self.pop3_sessions):
            if not session.busy_with_update:
                session.shut_down()
        await self._wait_for(lambda: not self.pop3_sessions, UPDATE_GRACE)
        for session in list(self.pop3_sessions):
            session.abort()
        await submission_stopped

    async def _start_http(self) -> None:
        """``[http] listen``: /metrics, /healthz, /readyz (gateway/web.py)."""
        from gateway import web

        probe = web.ReadinessProbe(
            self.reactor, web.imap_greets(self.reactor, self.config.upstream.imap), self.metrics
        )
        for address in self.config.http.listen:
            port = await _listen(self.reactor, address, web.site(self.metrics, probe), None)
            self.ports.append(port)
            bound = port.getHost()
            log.info("listening http on %s (plain)", ListenAddress(bound.host, bound.port))

    # -- submission (aiosmtpd on the reactor's asyncio loop) --------------------------------

    async def _start_submission(self) -> None:
        """SMTP submission listeners; they log ``listening submission on HOST:PORT (...)``."""
        settings = self.config.submission
        if not settings.listen and not settings.listen_tls:
            return
        from gateway.submission.service import SubmissionService

        # callWhenRunning starts us before the asyncio loop runs; asyncio code needs it running.
        await task.deferLater(self.reactor, 0, lambda: None)
        self.submission = SubmissionService(
            self.reactor,
            self.config,
            self.limits,
            metrics=self.metrics,
            tls_context=self.server_tls.asyncio_context if self.server_tls else None,
            logins=self.logins,
        )
        await defer.Deferred.fromFuture(asyncio.ensure_future(self.submission.start()))

    def _stop_submission(self) -> defer.Deferred[None]:
        """Stops in parallel with POP3: sessions get the same grace; spool files stay."""
        if self.submission is None:
            return defer.succeed(None)
        service, self.submission = self.submission, None
        return defer.Deferred.fromFuture(asyncio.ensure_future(service.stop(SHUTDOWN_GRACE)))

    async def _wait_for(self, condition: Any, seconds: float) -> None:
        deadline = self.reactor.seconds() + seconds
        while not condition() and self.reactor.seconds() < deadline:
            d: defer.Deferred[None] = defer.Deferred()
            self.reactor.callLater(0.05, d.callback, None)
            await d


def install_reactor() -> Any:
    """The asyncio reactor: Twisted (POP3, IMAP) and aiosmtpd (submission) share one loop.

    The loop is uvloop's where installed: its reads and its fd registrations cost less CPU than
    the standard selector loop's (docs/benchmark.md: 5-10 % less server CPU per download).
    Must run before anything imports ``twisted.internet.reactor``.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        try:
            import uvloop
        except ImportError:
            loop = asyncio.new_event_loop()
        else:
            loop = uvloop.new_event_loop()
        asyncioreactor.install(loop)
    from twisted.internet import reactor

    return reactor


def tune_garbage_collector() -> None:
    """A login builds tens of thousands of small objects (one snapshot entry per message); at
    CPython's default threshold that sets off a collection every few hundred, which made a
    10,000-message poll take up to twice as long. Objects that live for the whole process are
    frozen out of the collector's sight."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


# How long a closed session's memory may wait for the collector, at most (see below).
GC_INTERVAL = 30.0


def collect_garbage_periodically(
    reactor: IReactorTime, interval: float = GC_INTERVAL
) -> task.LoopingCall:
    """Run a full collection every ``interval`` seconds.

    A POP3 session frees itself when its connections close (the protocol and its pace
    producer, the IMAP client and its account let go of each other then: see
    tests/integration/test_session_freed.py). What still forms cycles per connection is
    Twisted's own plumbing (a client connection and its connector, the TLS wrapper and its
    transport, the client TLS options of each upstream connection). Under the thresholds above
    the oldest generation is collected only after 5,000 young collections, in a 10-minute soak
    with 2,000 connections never: a timer bounds how long that garbage lives without bringing
    back the frequent young collections that slowed large polls down.
    """
    call = task.LoopingCall(gc.collect)
    call.clock = reactor
    call.start(interval, now=False)
    return call


def ensure_open_files(config: Config) -> None:
    """Raise the soft RLIMIT_NOFILE as far as max_connections needs (up to the hard limit),
    and say so at start when even the hard limit is too low."""
    needed = open_files_needed(config.security.max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open file limit %d is below the %d that [security] max_connections = %d needs;"
            " raise it (ulimit -n, LimitNOFILE=) or lower max_connections",
            soft,
            needed,
            config.security.max_connections,
        )


def serve(config: Config) -> int:
    """Run the gateway in the foreground until SIGTERM/SIGINT; the process exit status."""
    reactor = install_reactor()
    tune_garbage_collector()
    collect_garbage_periodically(reactor)
    setup_logging(config.log)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    ensure_open_files(config)
    gateway = Gateway(reactor, config)
    status = {"code": 0}

    async def run() -> None:
        try:
            await gateway.start()
        except Exception as e:
            log.error("cannot start: %s", e)
            status["code"] = 1
            await gateway.stop()
            reactor.stop()
            return
        log.info("popgate ready")

    stopping = {"done": False}

    def on_signal(signum: int, _frame: object) -> None:
        if stopping["done"]:
            return
        stopping["done"] = True
        log.info("received %s, shutting down", signal.Signals(signum).name)

        async def shutdown() -> None:
            await gateway.stop()
            reactor.stop()

        reactor.callFromThread(lambda: defer.Deferred.fromCoroutine(shutdown()))

    def on_hangup(_signum: int, _frame: object) -> None:
        log.info("received SIGHUP, reloading the certificate and key")
        reactor.callFromThread(gateway.reload_tls)

    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(run()))
    reactor.run(installSignalHandlers=False)
    log.info("stopped")
    sys.stderr.flush()
    return status["code"]
