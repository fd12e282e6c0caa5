"""Wiring of submission: listeners on the running asyncio loop, the relay, the spool.

aiosmtpd servers are created with ``loop.create_server`` on the loop Twisted's asyncio reactor
runs (no aiosmtpd ``Controller`` and no thread), so one ``popgate serve`` process serves POP3
and submission together. Call :meth:`SubmissionService.start` / ``stop`` from asyncio code
(gateway/app.py bridges from Twisted with ``Deferred.fromFuture``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from gateway.config import LISTEN_BACKLOG, Config, ListenAddress
from gateway.limits import ClientLimits
from gateway.metrics import DISCARD, Metrics
from gateway.proxy_protocol import RefusalLog
from gateway.submission.handler import SubmissionHandler, SubmissionSMTP
from gateway.submission.relay import Relay, RelayCapabilities
from gateway.submission.sent import SentWriter
from gateway.submission.spool import SentSpool, SpoolStore, load_key
from gateway.tls import asyncio_server_context
from gateway.upstream.account import ImapAccount
from gateway.upstream.logins import UpstreamLogins

log = logging.getLogger("popgate.submission")

# RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for the client's next command.
CLIENT_TIMEOUT = 300.0
IDENT = "popgate ESMTP"


class SubmissionService:
    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        limits: ClientLimits | None = None,
        metrics: Metrics = DISCARD,
        tls_context: ssl.SSLContext | None = None,
        logins: UpstreamLogins | None = None,
    ) -> None:
        self.reactor = reactor
        self.logins = logins or UpstreamLogins(reactor, config.upstream.imap)
        # The listeners' TLS; the gateway passes ServerTLS.asyncio_context, which follows a
        # certificate reload. Without one, a context of the files as they are now.
        self.tls_context = tls_context
        self.metrics = metrics
        self.config = config
        self.limits = limits
        self.sessions: set[SubmissionSMTP] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.spool: SentSpool | None = None
        self.relay: Relay | None = None
        self._warm_up: asyncio.Future[RelayCapabilities | None] | None = None
        self.writer: SentWriter | None = None

    async def _authenticate(
        self, user: str, password: str, peer_ip: str | None
    ) -> ImapAccount | None:
        """The submission password check: a login to IMAP as the user, kept for the Sent copy
        of the session's message (see SentWriter.lend); or with OAuth the local device password
        and a usable token (no connection)."""
        loop = asyncio.get_running_loop()
        if self.logins.oauth:
            check = self.logins.check_device(user, password, peer_ip)
            await Deferred.fromCoroutine(check).asFuture(loop)
            return None
        login = self.logins.device(user, password, peer_ip)
        return await Deferred.fromCoroutine(login).asFuture(loop)

    async def start(self) -> list[tuple[ListenAddress, bool]]:
        config, settings = self.config, self.config.submission
        loop = asyncio.get_running_loop()
        key = await asyncio.to_thread(load_key, settings, create=True)
        assert key is not None
        store = SpoolStore(settings.spool_dir, key)
        await asyncio.to_thread(store.prepare)
        writer = SentWriter(
            self.reactor, config.upstream.imap, settings.sent_folder, loop, self.logins
        )
        writer.metrics = self.metrics
        self.writer = writer
        self.spool = SentSpool(
            store, writer.store, settings.retry_initial_delay, settings.retry_max_delay, loop
        )
        self.spool.metrics = self.metrics
        self.metrics.watch_spool(lambda: self.spool.waiting if self.spool else 0)
        hostname = socket.getfqdn() or "localhost"
        self.relay = Relay(
            config.upstream.smtp, hostname, self.logins.tokens, self.logins.mechanism
        )
        handler = SubmissionHandler(
            relay=self.relay,
            authenticate=self._authenticate,
            store=store,
            spool=self.spool,
            lend=writer.lend,
            security=config.security,
            device_separator=config.pop3.device_separator,
            max_message_size=settings.max_message_size,
            hostname=hostname,
            # With a master identity (or OAuth) a retry needs no password: none is kept on disk.
            keep_password=not self.logins.unattended,
            limits=self.limits,
            metrics=self.metrics,
        )
        context = self.tls_context or asyncio_server_context(
            config.tls, config.tls_min_version_for("submission")
        )

        proxies = RefusalLog("submission", loop.time) if settings.proxy_protocol else None

        def protocol(implicit: bool) -> SubmissionSMTP:
            return SubmissionSMTP(
                handler,
                sessions=self.sessions,
                proxies=proxies,
                tls_context=None if implicit else context,
                hostname=hostname,
                ident=IDENT,
                data_size_limit=settings.max_message_size,
                enable_SMTPUTF8=True,  # per connection, EHLO turns it off unless the relay has it
                auth_require_tls=False,  # enforced by the handler, with insecure_auth_networks
                timeout=CLIENT_TIMEOUT,
                loop=loop,
            )

        bound: list[tuple[ListenAddress, bool]] = []
        for addresses, implicit in ((settings.listen, False), (settings.listen_tls, True)):
            for address in addresses:
                server = await loop.create_server(
                    lambda implicit=implicit: protocol(implicit),
                    address.host,
                    address.port,
                    ssl=context if implicit else None,
                    reuse_address=True,
                    backlog=LISTEN_BACKLOG,
                )
                self.servers.append(server)
                host, port = server.sockets[0].getsockname()[:2]
                shown = ListenAddress(host, port)
                bound.append((shown, implicit))
                log.info("listening submission on %s (%s)", shown, "tls" if implicit else "plain")
        await self.spool.start()
        # A first look at the relay's extensions, so the first EHLO need not wait for it.
        self._warm_up = asyncio.ensure_future(self.relay.known_capabilities())
        return bound

    async def stop(self, grace: float) -> None:
        """Stop accepting, let sessions finish for ``grace`` seconds, then drop them. Spool
        entries stay on disk: the next start picks them up."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.sessions:
            log.info("waiting up to %ss for %d submission sessions", grace, len(self.sessions))
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close()
        if self.relay is not None and self.relay.closing:
            await asyncio.wait(list(self.relay.closing), timeout=1.0)
        if self.spool is not None:
            await self.spool.stop(max(0.0, deadline - loop.time()) + 1.0)
        if self.writer is not None:
            await self.writer.close_lent()
