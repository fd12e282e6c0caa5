"""The aiosmtpd side of submission: per-connection protocol tweaks and the policy handler.

aiosmtpd runs the SMTP conversation; :class:`SubmissionHandler` decides:

- AUTH PLAIN/LOGIN only over TLS, or from ``[security] insecure_auth_networks``; the
  credentials are checked by logging in to the upstream IMAP server (``alice#phone`` logs in as
  ``alice``). Nothing is relayed without AUTH: MAIL, RCPT and DATA answer ``530 5.7.0`` first.
- MAIL, each RCPT and the message go to the relay as they come, and the relay's reply is the
  client's reply (see relay.py).
- The message is spooled (fsync) before it is relayed; once the relay accepted it, the Sent copy
  is handed to the spool, which stores it (now, or later with retries).

:class:`SubmissionSMTP` adds what aiosmtpd lacks: RFC 3463 codes on every reply once
ENHANCEDSTATUSCODES is advertised, implicit-TLS awareness, and closing the relay connection
with the client's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    syntax,
)
from twisted.internet.defer import Deferred

from gateway.addresses import client_address, format_peer, limit_key
from gateway.config import SecuritySettings
from gateway.limits import MAX_AUTH_FAILURES, ClientLimits, FailureThrottle
from gateway.maildrop.login import Login
from gateway.metrics import DISCARD, Metrics, since
from gateway.oauth.errors import GrantUnusable, ProviderUnavailable
from gateway.proto import sasl
from gateway.proxy_protocol import HEADER_TIMEOUT, RefusalLog
from gateway.submission.message import (
    MessageRefused,
    check_content,
    ensure_message_id,
    new_message_id,
    normalize_line_endings,
)
from gateway.submission.relay import Relay, RelaySession, RelayUnavailable
from gateway.submission.replies import with_enhanced_code
from gateway.submission.spool import SentSpool, SpoolEntry, SpoolStore, new_entry_id
from gateway.upstream.account import ImapAccount, LoginRejected, UpstreamUnavailable
from gateway.upstream.logins import grant_problem

log = logging.getLogger("popgate.submission")

#: Checks a user's password (upstream, or with OAuth locally); raises LoginRejected or
#: UpstreamUnavailable, with OAuth also a GrantUnusable or ProviderUnavailable. Returns
#: the IMAP connection the check logged in with, if any: the session keeps it for its Sent copy.
Authenticator = Callable[[str, str, str | None], Awaitable[ImapAccount | None]]
#: Hands a logged-in IMAP connection to the Sent writer for the copy of one spool entry.
Lend = Callable[[str, ImapAccount], None]

_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
_AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure; try again later"
_NEED_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
_NEED_AUTH = "530 5.7.0 Authentication required"
_PROXY_REFUSED = b"421 4.7.0 connection refused (PROXY)\r\n"
# Logouts under way of connections no message took over: held so none is collected.
_background: set[asyncio.Future[None]] = set()
_TOO_MANY_FAILURES = "454 4.7.0 Too many failed authentications from your address; try again later"


@dataclass(frozen=True)
class Identity:
    """Who authenticated on a session; ``password`` stays in memory and never reaches a log."""

    login: str  # as the device sent it, e.g. alice#phone
    user: str  # upstream user
    device: str
    password: str = field(repr=False)


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_peer(str(peer[0]), peer[1])
    return str(peer or "")


class _Session(Session):
    """aiosmtpd's Session without the deprecation warning its own AUTH code triggers on every
    login (it still sets ``login_data``); we use ``auth_data`` only."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _TlsInfo:
    """What aiosmtpd reads from its own TLS protocol after STARTTLS: ``_extra`` (it becomes
    ``session.ssl``), and that one exists at all (AUTH's TLS check, ``is_tls``)."""

    _NAMES = ("sslcontext", "ssl_object", "peercert", "cipher", "compression")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._extra = {name: transport.get_extra_info(name) for name in self._NAMES}


class SubmissionSMTP(SMTP):
    """One client connection (aiosmtpd creates the session state, we add the relay's)."""

    def __init__(
        self,
        handler: SubmissionHandler,
        *,
        sessions: set[SubmissionSMTP],
        proxies: RefusalLog | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.proxies = proxies  # refusals of connections that must start with a PROXY header
        self.client_peer: tuple[str, int] | None = None  # the client the PROXY header named
        self.relay_session: RelaySession = handler.relay.session()
        self.advertise_enhanced = False  # set when EHLO advertised ENHANCEDSTATUSCODES
        self.auth_failures = 0
        self.limit_key: str | None = None  # counted against the connection limits under this
        self._greeting_done = False
        self._plain_reply = False  # EHLO/HELO replies never carry enhanced codes (RFC 2034)
        self._sessions = sessions
        # The connection AUTH logged in with, until a message's Sent copy takes it over.
        self.imap_account: ImapAccount | None = None

    # -- connection ------------------------------------------------------------------------

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrade = self._original_transport is not None  # STARTTLS: the same connection
        limits = self.event_handler.limits
        if not upgrade and self.proxies is not None:
            # Only a balancer may connect; the client's address (and its limits) come with the
            # header, in handle_PROXY.
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else None
            if host not in self.event_handler.security.proxies:
                port = peer[1] if isinstance(peer, tuple) and len(peer) > 1 else None
                self.proxies.refused("untrusted", host, port, "not in [security] proxy_networks")
                cast(asyncio.WriteTransport, transport).write(_PROXY_REFUSED)
                transport.close()
                return
        elif not upgrade and limits is not None:
            refusal = self.count_connection(transport.get_extra_info("peername"))
            if refusal is not None:
                cast(asyncio.WriteTransport, transport).write(refusal)
                transport.close()
                return
        super().connection_made(transport)
        if upgrade and self.client_peer is not None:
            # aiosmtpd starts a new session after STARTTLS, with the socket's peer: the
            # balancer's. The client is still the one the PROXY header named.
            assert self.session is not None
            self.session.peer = self.client_peer  # type: ignore[assignment]
        self._sessions.add(self)

    async def _handle_client(self) -> None:
        """With PROXY, the header first (aiosmtpd's parser): aiosmtpd's own PROXY handling
        closes a connection without a valid header silently and logs every one."""
        if self.proxies is not None:
            refusal = await self._read_proxy_header()
            if refusal is not None:
                if self.transport is not None:
                    cast(asyncio.WriteTransport, self.transport).write(refusal)
                    self.transport.close()
                return
        await super()._handle_client()

    async def _read_proxy_header(self) -> bytes | None:
        """None when the header named the client and it is within the limits, else the
        refusal to send."""
        assert self.session is not None and self.proxies is not None
        peer = self.session.peer
        host = str(peer[0]) if isinstance(peer, tuple) and peer else None
        port = peer[1] if isinstance(peer, tuple) and len(peer) > 1 else None
        try:
            data = await asyncio.wait_for(get_proxy(self._reader), HEADER_TIMEOUT)
        except TimeoutError:
            self.proxies.refused(
                "timeout", host, port, f"no PROXY header within {HEADER_TIMEOUT:g} s"
            )
            return _PROXY_REFUSED
        except asyncio.IncompleteReadError as e:
            if e.partial:  # a bare connect-and-close is a balancer's health check: not logged
                self.proxies.refused("header", host, port, "closed within a PROXY header")
            return _PROXY_REFUSED
        if not data.valid:
            self.proxies.refused("header", host, port, f"invalid PROXY header ({data.error})")
            return _PROXY_REFUSED
        self.session.proxy_data = data
        if data.src_addr is not None and data.src_port is not None:
            # The client, for every purpose: logs, insecure_auth_networks, limits, IMAP ID.
            self.client_peer = (str(data.src_addr), data.src_port)
            self.session.peer = self.client_peer  # type: ignore[assignment]
        # else a v2 LOCAL / v1 UNKNOWN: the balancer's own connection, its own address stands
        return self.count_connection(self.session.peer)

    def count_connection(self, peer: Any) -> bytes | None:
        """Count the connection under its client's address (the socket's, or with PROXY the
        header's); the refusal when over the limits."""
        limits = self.event_handler.limits
        if limits is None:
            return None
        host = str(peer[0]) if isinstance(peer, tuple) and peer else None
        key = limit_key(host)
        refusal = limits.connections.open(key)
        if refusal is not None:
            line = limits.refusal_log_line(refusal, "submission", _peer_text(peer))
            if line is not None:
                log.warning("%s", line)
            return f"421 4.7.0 {refusal.value}\r\n".encode()
        self.limit_key = key
        return None

    def connection_lost(self, error: Exception | None) -> None:
        if self.session is None:  # refused in connection_made: nothing was set up
            return
        self.relay_session.close()
        self.release_account()
        self._sessions.discard(self)
        key, self.limit_key = self.limit_key, None
        if key is not None and self.event_handler.limits is not None:
            self.event_handler.limits.connections.close(key)
        super().connection_lost(error)

    def release_account(self) -> None:
        """Log out of an IMAP connection no message took over (in the background)."""
        account, self.imap_account = self.imap_account, None
        if account is not None:
            logout = Deferred.fromCoroutine(account.logout())
            task = asyncio.ensure_future(logout.asFuture(self.loop))
            _background.add(task)
            task.add_done_callback(_background.discard)

    @property
    def peer_ip(self) -> str | None:
        peer = self.session.peer if self.session else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    @property
    def peer_text(self) -> str:
        return _peer_text(self.session.peer if self.session else None)

    @property
    def is_tls(self) -> bool:
        if self._tls_protocol is not None:
            return True
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    def close(self) -> None:
        """Drop the client (shutdown after the grace period)."""
        if self.transport is not None:
            self.transport.close()

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS through the loop's own ``start_tls``: aiosmtpd's runs asyncio's pure-Python
        TLS protocol even on uvloop, whose Cython one does the same handshake and records for
        less CPU (docs/benchmark.md, "Submission"). The upgraded connection then goes through
        aiosmtpd's own STARTTLS path in ``connection_made`` (new session, buffer cleared)."""
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context or self.transport is None:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        plain = self.transport
        try:
            secure = await self.loop.start_tls(
                cast(asyncio.WriteTransport, plain), self, self.tls_context, server_side=True
            )
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as error:
            raise TLSSetupException() from error
        if secure is None:  # the connection closed during the handshake
            raise TLSSetupException() from ConnectionResetError("closed during the handshake")
        self._tls_protocol = cast(Any, _TlsInfo(secure))
        self._original_transport = plain
        self.connection_made(secure)

    # -- replies ---------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        session = self.session
        if self.advertise_enhanced and session is not None and session.extended_smtp:
            if not self._plain_reply:
                text = "\r\n".join(with_enhanced_code(line) for line in text.split("\r\n"))
        await super().push(text)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_reply = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_reply = False

    async def smtp_HELO(self, hostname: str) -> None:
        self.advertise_enhanced = False
        await super().smtp_HELO(hostname)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that cannot (or will not) speak our TLS: one line, as on POP3. aiosmtpd
            # closes the connection after this; no reply can reach the client any more.
            cause = error.__cause__
            reason = getattr(cause, "reason", None) or type(cause).__name__
            log.info(
                "TLS handshake failed after STARTTLS: %s", reason, extra={"peer": self.peer_text}
            )
            return "454 4.7.0 TLS not available"
        return cast(str, await super().handle_exception(error))

    async def check_auth_needed(self, caller_method: str) -> bool:
        """No relay without AUTH, ever (HELP/VRFY/MAIL/RCPT/DATA)."""
        if self.session is not None and self.session.authenticated:
            return False
        await self.push(_NEED_AUTH)
        return True


class SubmissionHandler:
    """aiosmtpd hooks (``handle_*``) and AUTH mechanisms (``auth_*``)."""

    def __init__(
        self,
        *,
        relay: Relay,
        authenticate: Authenticator,
        store: SpoolStore,
        spool: SentSpool,
        security: SecuritySettings,
        device_separator: str,
        max_message_size: int,
        hostname: str,
        keep_password: bool,
        limits: ClientLimits | None = None,
        metrics: Metrics = DISCARD,
        lend: Lend | None = None,
    ) -> None:
        self.metrics = metrics
        self.lend = lend
        self.relay = relay
        self.authenticate = authenticate
        self.store = store
        self.spool = spool
        self.security = security
        self.device_separator = device_separator
        self.max_message_size = max_message_size
        self.hostname = hostname
        self.keep_password = keep_password
        self.limits = limits  # None: no connection limits and no failure delays
        self.throttle = (
            limits.failures if limits is not None else FailureThrottle(0.0, 0.0, time.monotonic)
        )

    # -- EHLO ------------------------------------------------------------------------------

    def auth_allowed(self, server: SubmissionSMTP) -> bool:
        if server.is_tls:
            return True
        ip = server.peer_ip
        return ip is not None and self.security.allows_insecure_auth(ip)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Advertise only what holds end to end: the relay's SIZE/8BITMIME/SMTPUTF8 included."""
        srv = cast(SubmissionSMTP, server)
        session.host_name = hostname
        await srv.relay_session.rset()  # EHLO resets any transaction (RFC 5321 4.1.4)
        caps = await self.relay.known_capabilities()
        size = self.max_message_size
        if caps is not None and caps.size:
            size = min(size, caps.size)
        srv.data_size_limit = size
        srv.enable_SMTPUTF8 = bool(caps and caps.smtputf8)
        lines = [srv.hostname, "PIPELINING", f"SIZE {size}"]
        if caps is not None and caps.eightbitmime:
            lines.append("8BITMIME")
        if srv.enable_SMTPUTF8:
            lines.append("SMTPUTF8")
        if srv.tls_context is not None and not srv.is_tls:
            lines.append("STARTTLS")
        if self.auth_allowed(srv):
            lines.append("AUTH PLAIN LOGIN")
        lines.append("ENHANCEDSTATUSCODES")
        srv.advertise_enhanced = True
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    # -- AUTH ------------------------------------------------------------------------------

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        if not self.auth_allowed(cast(SubmissionSMTP, server)):
            return _NEED_TLS
        return MISSING

    # The base64 of a response to a 334 challenge is decoded by aiosmtpd's challenge_auth;
    # everything after that, and initial responses, by gateway.proto.sasl.

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        srv = cast(SubmissionSMTP, server)
        try:
            if len(args) == 1:
                blob = await srv.challenge_auth("")
                if blob is MISSING:
                    return AuthResult(success=False, handled=True)
                assert isinstance(blob, bytes)
                credentials = sasl.parse_plain(blob)
            else:
                credentials = sasl.decode_plain(args[1])
        except sasl.ForeignIdentity:
            return await self._failed(srv, None, "may not act for another user")
        except sasl.SaslError as e:
            await srv.push(f"501 5.5.2 {e.text}")
            return AuthResult(success=False, handled=True)
        return await self._verify(srv, credentials.user, credentials.password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        srv = cast(SubmissionSMTP, server)
        try:
            if len(args) == 1:
                login = await srv.challenge_auth("Username:")
                if login is MISSING:
                    return AuthResult(success=False, handled=True)
                assert isinstance(login, bytes)
                user = login.decode("utf-8")
            else:
                user = sasl.decode_text(args[1])
            password = await srv.challenge_auth("Password:")
            if password is MISSING:
                return AuthResult(success=False, handled=True)
            assert isinstance(password, bytes)
            return await self._verify(srv, user, password.decode("utf-8"))
        except UnicodeDecodeError:
            await srv.push(f"501 5.5.2 {sasl.NotUtf8.text}")
            return AuthResult(success=False, handled=True)
        except sasl.SaslError as e:
            await srv.push(f"501 5.5.2 {e.text}")
            return AuthResult(success=False, handled=True)

    async def _verify(self, srv: SubmissionSMTP, name: str, password: str) -> AuthResult:
        login = Login.parse(name, self.device_separator)
        context = {"user": login.user, "device": login.device, "peer": srv.peer_text}
        if not login.user or "\0" in name or "\0" in password:
            return await self._failed(srv, name, "malformed credentials")
        throttle = self.throttle
        attempt = throttle.begin(limit_key(srv.peer_ip))
        if attempt.refused:
            log.warning("auth refused unchecked: too many failures", extra=context)
            return await self._failed(srv, name, "too many failures", _TOO_MANY_FAILURES)
        try:
            # Its turn in this address's schedule; a timer, so nobody else waits.
            await asyncio.sleep(attempt.wait)
        except asyncio.CancelledError:
            throttle.abandoned(attempt)
            raise
        # The relay connection is set up while the password is checked (relay.py, prepare);
        # it is closed again if the check fails.
        srv.relay_session.prepare()
        verified = False
        try:
            try:
                account = await self.authenticate(login.user, password, client_address(srv.peer_ip))
            except LoginRejected:
                delay = throttle.failed(attempt)
                return await self._failed(srv, name, "rejected by the IMAP server", delay=delay)
            except GrantUnusable as e:
                throttle.abandoned(attempt)  # the device password was right: not a guess
                log.error("auth failed: %s", grant_problem(e), extra=context)
                return await self._failed(srv, name, "no usable OAuth grant")
            except ProviderUnavailable as e:
                throttle.abandoned(attempt)
                log.warning("auth deferred: OAuth provider unavailable: %s", e, extra=context)
                return AuthResult(success=False, handled=False, message=_AUTH_TEMPORARY)
            except UpstreamUnavailable as e:
                throttle.abandoned(attempt)  # no verdict: its turn is given back
                log.warning("auth deferred: IMAP server unavailable: %s", e, extra=context)
                self.metrics.upstream_error("imap")
                return AuthResult(success=False, handled=False, message=_AUTH_TEMPORARY)
            except asyncio.CancelledError:  # the client left during the check
                throttle.abandoned(attempt)
                raise
            verified = True
        finally:
            if not verified:
                srv.relay_session.close()
        throttle.succeeded(attempt)
        srv.release_account()
        srv.imap_account = account
        self.metrics.auth("submission", ok=True)
        log.info("auth ok", extra=context)
        identity = Identity(name, login.user, login.device, password)
        return AuthResult(success=True, auth_data=identity)

    async def _failed(
        self,
        srv: SubmissionSMTP,
        name: str | None,
        why: str,
        reply: str = _AUTH_INVALID,
        delay: float = 0.0,
    ) -> AuthResult:
        """Count the failure and answer it, ``delay`` seconds from now (a timer: nobody else
        waits meanwhile, and aiosmtpd reads no further command from this client)."""
        srv.auth_failures += 1
        self.metrics.auth("submission", ok=False)
        log.info("auth failed: %s", why, extra={"user": name, "peer": srv.peer_text})
        await asyncio.sleep(delay)
        if srv.auth_failures >= MAX_AUTH_FAILURES:
            await srv.push("421 4.7.0 Too many failed authentications; closing")
            srv.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=reply)

    # -- the transaction -------------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        srv = cast(SubmissionSMTP, server)
        identity = cast(Identity, session.auth_data)
        caps = srv.relay_session.capabilities
        upstream_options = []
        for option in mail_options:
            name, _, value = option.partition("=")
            if name == "BODY":
                if value == "8BITMIME" and not (caps and caps.eightbitmime):
                    return "555 5.5.4 BODY=8BITMIME is not available through this relay"
                if caps and caps.eightbitmime:
                    upstream_options.append(option)
            elif name == "SIZE":
                if caps and caps.size is not None:
                    upstream_options.append(option)
            elif name == "SMTPUTF8":
                upstream_options.append(option)
        try:
            reply = await srv.relay_session.mail(
                identity.user, identity.password, address, upstream_options
            )
        except RelayUnavailable as e:
            log.warning("relay: %s", e, extra={"user": identity.user, "peer": srv.peer_text})
            self.metrics.upstream_error("smtp")
            return e.reply.render(enhanced=False)
        if reply.positive:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        else:
            log.info(
                "relay refused sender: %d %s",
                reply.code,
                reply.text,
                extra={"user": identity.user, "peer": srv.peer_text},
            )
        return reply.render(enhanced=False)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        srv = cast(SubmissionSMTP, server)
        try:
            reply = await srv.relay_session.rcpt(address, envelope.smtp_utf8)
        except RelayUnavailable as e:
            return e.reply.render(enhanced=False)
        if reply.positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply.render(enhanced=False)

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        await cast(SubmissionSMTP, server).relay_session.rset()
        return MISSING

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        cast(SubmissionSMTP, server).relay_session.quit_later()
        return MISSING

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        srv = cast(SubmissionSMTP, server)
        identity = cast(Identity, session.auth_data)
        context = {"user": identity.user, "device": identity.device, "peer": srv.peer_text}
        raw = envelope.original_content or b""
        try:
            check_content(raw)
        except MessageRefused as e:
            await srv.relay_session.rset()
            return e.reply
        sender = envelope.mail_from or ""
        message = normalize_line_endings(raw)
        message, mid, added = ensure_message_id(message, new_message_id(sender, self.hostname))
        entry = SpoolEntry(
            id=new_entry_id(),
            created=time.time(),
            user=identity.user,
            device=identity.device,
            sender=sender,
            recipients=tuple(envelope.rcpt_tos),
            message_id=mid,
            message=message,
            peer=srv.peer_text,
            password=identity.password,
        )
        try:
            await asyncio.to_thread(self.store.write_relaying, entry, self.keep_password)
        except OSError as e:
            log.error("cannot spool a submission: %s", e, extra=context)
            self.metrics.submitted("failed")
            await srv.relay_session.rset()
            return "451 4.3.0 Cannot queue the message for its Sent copy; try again later"
        started = time.perf_counter()
        try:
            reply = await srv.relay_session.data(message)
        except RelayUnavailable as e:
            log.warning("relay: %s", e, extra=context)
            self.metrics.upstream_error("smtp")
            self.metrics.submitted("failed")
            reply = e.reply
        else:
            self.metrics.relay_seconds.observe(since(started))
            self.metrics.submitted("relayed" if reply.positive else "rejected")
        if not reply.positive:
            await asyncio.to_thread(self.store.remove, entry.id)
            await srv.relay_session.rset()
            log.info("relay refused the message: %d %s", reply.code, reply.text, extra=context)
            return reply.render(enhanced=False)
        try:
            await asyncio.to_thread(self.store.mark_relayed, entry.id)
        except OSError as e:
            # Relayed: the client must hear 250 or it would send again. The copy is still
            # attempted from memory; only a crash before it lands would lose it.
            log.error("relayed, but the spool entry cannot be kept: %s", e, extra=context)
        log.info(
            "relayed %d octets to %d recipients%s",
            len(message),
            len(entry.recipients),
            " (Message-ID added)" if added else "",
            extra={**context, "message_id": mid, "spool_entry": entry.id},
        )
        account, srv.imap_account = srv.imap_account, None
        if account is not None and self.lend is not None:
            self.lend(entry.id, account)  # the Sent copy needs no login of its own
        elif account is not None:
            srv.imap_account = account
        self.spool.submit(entry)
        return reply.render(enhanced=False)

    async def handle_exception(self, error: Exception) -> str:
        log.error("submission session error", exc_info=error)
        return "451 4.3.0 Internal error; try again later"
