"""Twisted glue for the POP3 session: sockets, TLS, timers and the upstream calls.

All protocol decisions are made by ``gateway.proto.pop3.Pop3Session``; this module only carries
its actions out and reports the results back.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

import gateway
from gateway.addresses import Networks, client_address, format_peer, limit_key
from gateway.limits import ClientLimits, FailureThrottle, Refusal
from gateway.maildrop.login import Login
from gateway.metrics import since
from gateway.oauth.errors import GrantUnusable, ProviderUnavailable
from gateway.pop3.backend import MaildropService, Pop3Mailbox, UpdateFailed
from gateway.pop3.prefetch import Prefetcher
from gateway.proto import pop3
from gateway.transports import (
    enable_keepalive,
    send_at_once,
    set_buffer_size,
    unsent_octets,
    write_through,
)
from gateway.upstream.account import LoginRejected, UpstreamUnavailable
from gateway.upstream.imap_client import READ_SIZE, ImapError
from gateway.upstream.logins import grant_problem

log = logging.getLogger("popgate.pop3")

# Answers to pipelined commands are written once this much has gathered, so that a client which
# does not read them is noticed (Twisted pauses ``_ClientPace``) before more are made.
OUT_BATCH = 64 * 1024


class _BodyFeed:
    """Carries one message from its upstream FETCH into the session (a BodySink).

    The session frames the answer and ignores events of a download it no longer waits for (it
    completed at the literal's end, before the FETCH's tagged OK: servers answer pipelined
    FETCHes first and complete them later, and the next RETR takes over at once). This only
    passes the events on and has what they make written.
    """

    __slots__ = ("asked_at", "protocol", "request", "session")

    def __init__(
        self, protocol: Pop3Protocol, session: pop3.Pop3Session, request: pop3.Retrieve
    ) -> None:
        self.protocol = protocol
        self.session = session
        self.request = request
        self.asked_at = time.perf_counter()  # for popgate_pop3_retr_first_byte_seconds

    def literal_begin(self, size: int) -> None:
        session = self.session
        if session.retrieving is self.request and not session.answer_started:
            self.protocol.metrics.pop3_retr_first_byte_seconds.observe(since(self.asked_at))
            # The status line is written with the first chunk (or the end of an empty body):
            # a message that arrives in one piece, most do, costs one round through the pump.
            session.body_begin(self.request, size)

    def literal_data(self, data: bytes) -> None:
        self.session.body_data(self.request, data)
        self.protocol._pump()

    def literal_end(self) -> None:
        # Usually the answer completed with the last chunk already: nothing to do then.
        if self.session.retrieving is self.request:
            self.session.body_end(self.request)
            self.protocol._pump()

    def fetch_done(self, result: object) -> None:
        """The FETCH completed (``result`` may be a Failure): if the session still waits for
        this message, it did not come whole."""
        session, request = self.session, self.request
        if session.retrieving is not request:
            return
        protocol, uid = self.protocol, request.info.uid
        if session.answer_started:
            protocol._log(logging.ERROR, "download of UID %d failed", uid)
            protocol.metrics.upstream_error("imap")
            session.retrieve_failed(request)
        elif isinstance(result, Failure) and result.check(ImapError):
            # Nothing sent yet (e.g. the upstream timed out): an answer, not a drop.
            protocol._log(logging.ERROR, "download failed upstream: %s", result.value)
            protocol.metrics.upstream_error("imap")
            session.retrieve_failed(request)
        else:
            protocol._log(logging.WARNING, "message UID %d vanished upstream", uid)
            session.retrieve_unavailable(request)
        protocol._pump()


def _nothing() -> None:
    pass


class _ClientPace:
    """Everything that produces what the POP client receives, paused while it does not take it.

    Registered on the client transport for the whole connection, so Twisted says when its write
    buffer is full: then the session answers no further commands (a client that pipelines
    without reading cannot make answers pile up here) and the session's IMAP connection, while
    attached, is paused too (bodies wait upstream, not here). ``stopProducing`` (the device went
    away) does not close the IMAP connection: the session still logs out there, or finishes the
    update after QUIT.
    """

    def __init__(self, on_resume: Callable[[], None]) -> None:
        self.paused = False
        self.upstream: Any = None  # the IMAP transport while downloads feed this client
        self._on_resume = on_resume

    def attach(self, imap_transport: object) -> None:
        self.upstream = imap_transport
        if self.paused:
            self.upstream.pauseProducing()

    def detach(self) -> None:
        """Stop tying the IMAP reads to this client; they may have been paused meanwhile."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        if self.upstream is not None:
            self.upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.upstream is not None:
            self.upstream.resumeProducing()
        self._on_resume()

    def stopProducing(self) -> None:
        pass

    def close(self) -> None:
        """The client is gone: let go of the IMAP transport and of the session (whose bound
        method ``on_resume`` is, a reference cycle that would keep the session for the cyclic
        collector)."""
        self.detach()
        self._on_resume = _nothing


@dataclass(frozen=True)
class Listener:
    """What one POP3 listener offers: TLS (implicit or via STLS), who may log in without TLS,
    how long a session may idle, and the process's client limits (None: unlimited)."""

    tls_context: IOpenSSLServerConnectionCreator | None
    implicit_tls: bool
    insecure_auth_networks: Networks
    idle_timeout: float
    limits: ClientLimits | None = None


class Pop3Protocol(Protocol):
    def __init__(
        self,
        service: MaildropService,
        reactor: IReactorTime,
        listener: Listener,
        on_close: Callable[[Pop3Protocol], None] = lambda p: None,
    ) -> None:
        self.service = service
        self.metrics = service.metrics
        self.reactor = reactor
        self.tls_context = listener.tls_context
        self.implicit_tls = listener.implicit_tls
        self.insecure_auth_networks = listener.insecure_auth_networks
        self.idle_timeout = listener.idle_timeout
        # Without limits (tests of other things) failures are simply not delayed.
        self.throttle = (
            listener.limits.failures
            if listener.limits is not None
            else FailureThrottle(0.0, 0.0, reactor.seconds)
        )
        self.on_close = on_close
        self.session_id = secrets.token_hex(4)
        self.session: pop3.Pop3Session | None = None
        self.maildrop: Pop3Mailbox | None = None
        self.prefetcher: Prefetcher | None = None
        self.login: Login | None = None
        self.peer = "?"
        self.peer_ip: str | None = None
        self._timer: IDelayedCall | None = None
        self._login_delay: Deferred[None] | None = None  # a failed login's answer, held back
        self._queued_at_timeout: int | None = None
        self._pace = _ClientPace(self._pump)
        self._reading = True  # the client transport is not paused by us
        self._pumping = False
        # Writes held while a batch of work is under way (one read from upstream, one round
        # of client commands), sent together at its end: one system call, not one per answer.
        self._corked = 0
        self._out: list[bytes] = []
        self._out_size = 0  # of the answers in _out (see OUT_BATCH)
        self._closed = False
        self.busy_with_update = False

    # -- logging --------------------------------------------------------------------------

    def _log(self, level: int, message: str, *args: object, login: Login | None = None) -> None:
        extra = {"session": self.session_id, "peer": self.peer}
        login = login or self.login
        if login is not None:
            extra["user"] = login.user
            extra["device"] = login.device
        log.log(level, message, *args, extra=extra)

    # -- Twisted ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer_ip = getattr(peer, "host", None)
        self.peer = format_peer(self.peer_ip, getattr(peer, "port", None))
        # Replies are small and answered one by one: waiting for Nagle would add latency.
        send_at_once(self.transport)
        # A device that vanished without a FIN (NAT drop, pulled cable) is noticed and its
        # session freed in minutes rather than at the idle timeout or never.
        enable_keepalive(self.transport)
        # IMAP reads come in chunks of up to READ_SIZE: with Twisted's 64 KiB, every one of
        # them would pause and resume the IMAP reads even when the client keeps up.
        set_buffer_size(self.transport, READ_SIZE)
        self.session = pop3.Pop3Session(
            tls_active=self.implicit_tls,
            stls_available=self.tls_context is not None and not self.implicit_tls,
            plaintext_allowed=self._peer_is_trusted(),
            implementation=f"popgate-{gateway.__version__}",
            capabilities_extra=self.service.capabilities,
        )
        self.transport.registerProducer(self._pace, True)  # type: ignore[union-attr]
        self.metrics.pop3_sessions.inc()
        self.metrics.pop3_sessions_active.inc()
        self._log(logging.INFO, "connect tls=%s", "implicit" if self.implicit_tls else "no")
        self._reset_timer()
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        self._reset_timer()
        assert self.session is not None
        self.session.receive_data(data)
        self._pump()
        self._regulate_input()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._login_delay is not None:
            self._login_delay.cancel()
        if self.session is not None:
            self.session.connection_lost()
        self._release_upstream()
        self._pace.close()
        if self.maildrop is not None and not self.busy_with_update:
            # Dropped before or during TRANSACTION: the deletes are forgotten (RFC 1939).
            Deferred.fromCoroutine(self.maildrop.close())
        self._log(logging.INFO, "disconnect")
        if self.session is not None:  # counted in connectionMade
            self.metrics.pop3_sessions_active.dec()
        self.on_close(self)

    # -- helpers --------------------------------------------------------------------------

    def read_started(self) -> None:
        """An upstream read is being handled: hold the writes it causes (ReadObserver)."""
        self._cork()

    def read_done(self) -> None:
        self._uncork()

    def _cork(self) -> None:
        self._corked += 1

    def _uncork(self) -> None:
        self._corked -= 1
        if not self._corked:
            self._flush()

    def _flush(self) -> None:
        if self._out and not self._closed:
            out, self._out, self._out_size = self._out, [], 0
            self._reset_timer()  # writes count as activity: a slow download is not idle
            try:
                write_through(self.transport, out)
            except RuntimeError as e:
                # uvloop refuses to watch a socket whose poll handle it has closed: seen when
                # the client went away while its reading was paused (a flood), so Twisted never
                # learnt it. The connection is dead; left to Twisted it stays registered for
                # ever, and a shutdown waiting for it never ends.
                self._log(logging.INFO, "client gone (%s); dropping the session", e)
                self.abort()

    def _release_upstream(self) -> None:
        """Stop tying the IMAP reads to this client's pace (QUIT, or the client is gone)."""
        if self.maildrop is not None:
            self.maildrop.observe_reads(None)
        self._pace.detach()

    def _regulate_input(self) -> None:
        """Read from the client only while the session wants more input: a busy session (a
        login, a download the client does not read, the UPDATE) leaves the rest in the kernel,
        whose buffers and TCP window then hold the client back."""
        if self._closed or self.session is None or self.session.state is pop3.State.CLOSED:
            return  # closing: the transport stops reading by itself
        wanted = self.session.wants_input
        if wanted == self._reading:
            return
        self._reading = wanted
        if wanted:
            self.transport.resumeProducing()  # type: ignore[union-attr]
        else:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _peer_is_trusted(self) -> bool:
        return self.peer_ip in self.insecure_auth_networks

    def _reset_timer(self) -> None:
        if self._closed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        else:
            self._timer = self.reactor.callLater(self.idle_timeout, self._idle)

    def shut_down(self) -> None:
        """Tell the client why and close (inside a download: drop it); its deletes are not
        applied (no QUIT was seen)."""
        if self._closed or self.transport is None:
            return
        if self.session is None:
            self.transport.loseConnection()
            return
        self.session.abandon("Server shutting down", code="SYS/TEMP")
        self._pump()

    def abort(self) -> None:
        """Drop the connection now, without flushing what is queued."""
        if self._closed or self.transport is None:
            return
        self._closed = True  # nothing more is written, whatever still completes
        self._out, self._out_size = [], 0
        abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
        abort()

    def _idle(self) -> None:
        if self.busy_with_update:
            self._reset_timer()  # an UPDATE in progress is finished, not cut off
            return
        # A slow device may take longer than the timeout to drain what the kernel already
        # holds for it (a message written in one go, or the IMAP side paused meanwhile): as
        # long as those bytes keep moving, the session is not idle.
        queued = unsent_octets(self.transport)
        if queued and queued != self._queued_at_timeout:
            self._queued_at_timeout = queued
            self._reset_timer()
            return
        self._log(logging.INFO, "idle timeout after %ss, closing", self.idle_timeout)
        if queued:
            self.abort()  # the client takes nothing any more: no point queueing a goodbye
            return
        assert self.session is not None
        self.session.abandon("Idle timeout, closing connection")
        self._pump()

    def _pump(self) -> None:
        """Carry out the session's actions until it waits for something. While the client does
        not take what is written to it no command is taken (``_ClientPace`` pumps again when it
        does)."""
        session = self.session
        assert session is not None
        if self._pumping:  # called back from inside the loop below: it carries on anyway
            return
        self._pumping = True
        self._cork()
        try:
            while not self._closed:
                # While the client takes nothing, what is decided still goes (a goodbye, an
                # abort), but no further command is answered.
                action = session.next_action(take_commands=not self._pace.paused)
                if action is None:
                    break
                if isinstance(action, pop3.SendBody):
                    # Paced by the upstream (paused with the client): one read's worth at
                    # most, so not counted towards OUT_BATCH.
                    self._out.append(action.data)
                elif isinstance(action, pop3.Send):
                    self._out.append(action.data)
                    self._out_size += len(action.data)
                    if self._out_size >= OUT_BATCH:
                        self._flush()  # may pause us: large answers to pipelined commands
                elif isinstance(action, pop3.Abort):
                    self._log(logging.INFO, "session ended inside a multi-line answer, dropping")
                    self.abort()
                elif isinstance(action, pop3.Retrieve):
                    self._retrieve(action)
                elif isinstance(action, pop3.Retrieved):
                    self._retrieved(action)
                elif isinstance(action, pop3.Authenticate):
                    Deferred.fromCoroutine(self._authenticate(action))
                elif isinstance(action, pop3.Update):
                    Deferred.fromCoroutine(self._update(action))
                elif isinstance(action, pop3.StartTLS):
                    self._flush()  # the +OK goes out in the clear, before the handshake
                    self._start_tls()
                elif isinstance(action, pop3.Close):
                    self._flush()
                    # With a producer registered Twisted would wait for it before closing (a
                    # TLS connection would never send its close alert).
                    self.transport.unregisterProducer()  # type: ignore[union-attr]
                    self.transport.loseConnection()  # type: ignore[union-attr]
        finally:
            self._uncork()
            self._pumping = False
        self._regulate_input()

    def _start_tls(self) -> None:
        assert self.session is not None and self.tls_context is not None
        self.transport.startTLS(self.tls_context)  # type: ignore[union-attr]
        self.session.tls_started()
        self._log(logging.INFO, "STLS started")

    async def _hold(self, seconds: float) -> bool:
        """Wait without blocking anyone else; False if the client left meanwhile."""
        if seconds > 0 and not self._closed:
            self._login_delay = Deferred()
            call = self.reactor.callLater(seconds, self._login_delay.callback, None)
            try:
                await self._login_delay
            except CancelledError:
                if call.active():
                    call.cancel()
            finally:
                self._login_delay = None
        return not self._closed

    async def _authenticate(self, action: pop3.Authenticate) -> None:
        session = self.session
        assert session is not None
        login = self.service.parse_login(action.username)
        throttle = self.throttle
        attempt = throttle.begin(limit_key(self.peer_ip))
        if attempt.refused:
            self._log(logging.WARNING, "login refused unchecked: too many failures", login=login)
            self.metrics.auth("pop3", ok=False)
            session.login_failed(pop3.TooManyFailures())
            self._pump()
            return
        if not await self._hold(attempt.wait):  # its turn in this address's schedule
            throttle.abandoned(attempt)
            return
        started = time.perf_counter()
        try:
            maildrop = await self.service.open(login, action.password, client_address(self.peer_ip))
        except LoginRejected as e:
            self._log(logging.WARNING, "login failed: %s", e, login=login)
            self.metrics.auth("pop3", ok=False)
            if not await self._hold(throttle.failed(attempt)):
                return
            session.login_failed(pop3.BadCredentials())
        except GrantUnusable as e:
            throttle.abandoned(attempt)  # the device password was right: not a guess
            self._log(logging.ERROR, "login failed: %s", grant_problem(e), login=login)
            self.metrics.auth("pop3", ok=False)
            session.login_failed(pop3.BadCredentials())
        except ProviderUnavailable as e:
            throttle.abandoned(attempt)
            self._log(logging.ERROR, "login failed, OAuth provider unavailable: %s", e, login=login)
            session.login_failed(pop3.UpstreamUnavailableReply())
        except (UpstreamUnavailable, ImapError) as e:
            throttle.abandoned(attempt)  # no verdict: its turn is given back
            self._log(logging.ERROR, "login failed, upstream unavailable: %s", e, login=login)
            self.metrics.upstream_error("imap")
            session.login_failed(pop3.UpstreamUnavailableReply())
        except Exception:
            throttle.abandoned(attempt)
            # A bug must not leave the client waiting for ever: answer, keep the traceback.
            log.exception("unexpected error during login", extra={"session": self.session_id})
            session.login_failed(pop3.UpstreamUnavailableReply())
        else:
            throttle.succeeded(attempt)
            self.metrics.auth("pop3", ok=True)
            self.metrics.pop3_login_seconds.observe(since(started))
            if self._closed or session.state is pop3.State.CLOSED:
                maildrop.abort()
                return
            self.maildrop = maildrop
            self.prefetcher = Prefetcher(maildrop.fetch_many)
            self._pace.attach(maildrop.imap_transport)
            maildrop.observe_reads(self)
            self.login = login
            count, octets = maildrop.numbered.stat()
            self._log(
                logging.INFO,
                "login ok mechanism=%s messages=%d octets=%d",
                action.mechanism,
                count,
                octets,
            )
            session.login_done(maildrop.numbered)
        self._pump()

    def _retrieve(self, action: pop3.Retrieve) -> None:
        assert self.maildrop is not None and self.session is not None
        feed = _BodyFeed(self, self.session, action)
        prefetched = self.prefetcher.take(action.info.uid) if self.prefetcher else None
        if prefetched is not None:
            prefetched.attach(feed, feed.fetch_done)
        else:
            self.maildrop.fetch(action.info, feed).addBoth(feed.fetch_done)
        self._fetch_ahead(action)

    def _retrieved(self, action: pop3.Retrieved) -> None:
        assert self.maildrop is not None
        request = action.request
        self.maildrop.record_retrieved(request.info, whole=request.top_lines is None)
        if request.top_lines is None:
            self.metrics.pop3_retrieved_messages.inc()
            self.metrics.pop3_retrieved_bytes.inc(request.info.size)

    def _fetch_ahead(self, action: pop3.Retrieve) -> None:
        """Fetch what the client already asked for, else the message a sequential download
        wants next, while this one is going out."""
        session, prefetcher = self.session, self.prefetcher
        if session is None or session.maildrop is None or prefetcher is None:
            return
        if not prefetcher.hungry:
            return
        # Those already fetched ahead come first among the waiting RETRs: beyond ``depth`` of
        # them nothing could be taken anyway.
        requested = session.pipelined_retrieves(limit=prefetcher.depth)
        if requested:
            prefetcher.want(requested, requested=True)
        elif action.top_lines is None:
            following = session.maildrop.following(action.number, prefetcher.depth)
            prefetcher.want(following, requested=False)

    async def _update(self, action: pop3.Update) -> None:
        assert self.maildrop is not None and self.session is not None
        self.busy_with_update = True
        self._release_upstream()
        problem = None
        try:
            await self.maildrop.update(action.deleted)
        except UpdateFailed as e:
            problem = str(e)
            self._log(logging.ERROR, "update failed: %s", problem)
        except Exception:
            problem = "internal error, see the gateway log"
            log.exception("unexpected error during update", extra={"session": self.session_id})
        else:
            self._log(logging.INFO, "quit, update applied deleted=%d", len(action.deleted))
        finally:
            self.busy_with_update = False
        # From here the connection upstream is no longer the session's: answer first, then
        # let retention (if due) and the LOGOUT happen without the device waiting.
        maildrop, self.maildrop = self.maildrop, None
        if not self._closed:
            self.session.update_done(problem)
            self._pump()
        if problem is None:
            await maildrop.after_quit(deleted_any=bool(action.deleted))
        else:
            await maildrop.close()


class Pop3Factory(Factory):
    """Builds one Pop3Protocol per connection and tracks the live ones for graceful shutdown."""

    noisy = False  # Twisted would log every start and stop of the factory

    def __init__(
        self,
        service: MaildropService,
        reactor: IReactorTime,
        listener: Listener,
        sessions: set[Pop3Protocol],
    ) -> None:
        self.service = service
        self.reactor = reactor
        self.listener = listener
        self.sessions = sessions

    def buildProtocol(self, addr: object) -> Protocol:
        limits = self.listener.limits
        host = getattr(addr, "host", None)
        key = limit_key(host)
        if limits is not None:
            refusal = limits.connections.open(key)
            if refusal is not None:
                line = limits.refusal_log_line(
                    refusal, "pop3", format_peer(host, getattr(addr, "port", None))
                )
                if line is not None:
                    log.warning("%s", line)
                return _Refused(self.reactor, refusal)

        def closed(protocol: Pop3Protocol) -> None:
            self.sessions.discard(protocol)
            if limits is not None:
                limits.connections.close(key)

        protocol = Pop3Protocol(self.service, self.reactor, self.listener, on_close=closed)
        self.sessions.add(protocol)
        return protocol


class _Refused(Protocol):
    """A connection over the limits: told so and closed, before any command is read.

    Over TLS the answer waits for the handshake; a client that never completes it is dropped
    after ``LINGER`` seconds rather than holding a descriptor.
    """

    LINGER = 5.0

    def __init__(self, reactor: IReactorTime, refusal: Refusal) -> None:
        self.reactor = reactor
        self.refusal = refusal
        self._abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(f"-ERR [SYS/TEMP] {self.refusal.value}\r\n".encode())
        self.transport.loseConnection()
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            self._abort = self.reactor.callLater(self.LINGER, abort)

    def dataReceived(self, data: bytes) -> None:
        pass  # nothing a refused client says is read

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
