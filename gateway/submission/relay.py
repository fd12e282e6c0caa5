"""The upstream SMTP relay ([upstream.smtp]), driven command by command by the client session.

Each client session that gets as far as MAIL owns one upstream connection. MAIL, each RCPT and
the message go upstream as the client sends them, and the relay's reply is what the client gets:
a recipient the relay refuses is refused to the client at its RCPT, with the relay's code and
text, and the client's 250 after DATA is the relay's 250.

What the relay can carry end to end (SIZE, 8BITMIME, SMTPUTF8) decides what the gateway
advertises; :class:`Relay` learns it from every EHLO it sees and keeps the last answer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass

import aiosmtplib
from twisted.internet.defer import Deferred

from gateway.config import SmtpUpstream
from gateway.oauth.errors import GrantRevoked, NoGrant, OAuthError
from gateway.oauth.tokens import AccessTokens
from gateway.proto import sasl
from gateway.submission.replies import Reply
from gateway.upstream.logins import grant_problem

log = logging.getLogger("popgate.submission")

# How long a client's EHLO may wait for a first look at the relay's extensions ...
PROBE_TIMEOUT = 10.0
# ... and how long a failed look is trusted before the next EHLO tries again.
PROBE_RETRY_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class RelayCapabilities:
    """What the relay said in its (post-STARTTLS) EHLO."""

    size: int | None  # None: no SIZE extension; 0: SIZE without a limit
    eightbitmime: bool
    smtputf8: bool

    @classmethod
    def from_extensions(cls, extensions: dict[str, str]) -> RelayCapabilities:
        size: int | None = None
        if "size" in extensions:
            value = extensions["size"].strip()
            size = int(value) if value.isdigit() else 0
        return cls(size, "8bitmime" in extensions, "smtputf8" in extensions)


def client_tls_context(settings: SmtpUpstream) -> ssl.SSLContext:
    """TLS 1.2 or newer towards the relay, verified (system store plus ``ca_file``) unless told
    otherwise, as for IMAP (gateway/tls.py); stdlib ssl because aiosmtplib is asyncio."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
    if not settings.verify_certificate:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class RelayUnavailable(Exception):
    """The relay could not be reached, or the connection broke; ``reply`` is for the client."""

    def __init__(self, reply: Reply, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply


_UNREACHABLE = Reply(451, "4.4.1 The relay is unavailable; try again later")
_LOST = Reply(451, "4.4.2 Connection to the relay was lost; try again later")
_MISCONFIGURED = Reply(451, "4.3.5 The relay does not accept this gateway's login; try later")
# With auth = "oauth2" the device was let in with its local password; a token problem at MAIL
# is the operator's to fix (or the provider's), so the device is told to try again later.
_NO_TOKEN = Reply(451, "4.7.0 No usable access token for the relay; try again later")
_TOKEN_REFUSED = Reply(451, "4.7.0 The relay refused this user's access token; try again later")


class Relay:
    """Shared by all sessions: where to connect, how, and the relay's last known extensions."""

    def __init__(
        self,
        settings: SmtpUpstream,
        local_hostname: str,
        tokens: AccessTokens | None = None,
        mechanism: str = "xoauth2",
    ) -> None:
        if settings.auth == "oauth2" and tokens is None:
            raise ValueError('[upstream.smtp] auth = "oauth2" needs the OAuth token store')
        self.settings = settings
        self.local_hostname = local_hostname
        self.tokens = tokens
        self.mechanism = mechanism
        self.tls_context = client_tls_context(settings) if settings.security != "none" else None
        self.capabilities: RelayCapabilities | None = None
        self._probe: asyncio.Task[RelayCapabilities | None] | None = None
        self._probe_failed_at: float | None = None
        # Upstream QUITs still under way (RelaySession.quit_later): held so none is collected.
        self.closing: set[asyncio.Future[None]] = set()

    def _client(self) -> aiosmtplib.SMTP:
        security = self.settings.security
        return aiosmtplib.SMTP(
            hostname=self.settings.host,
            port=self.settings.port,
            local_hostname=self.local_hostname,
            timeout=self.settings.timeout,
            use_tls=security == "tls",
            start_tls=True if security == "starttls" else False,
            tls_context=self.tls_context,
        )

    async def connect(self) -> aiosmtplib.SMTP:
        """A connected client after EHLO (and STARTTLS); raises RelayUnavailable."""
        smtp = self._client()
        try:
            await smtp.connect()
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as e:
            smtp.close()
            # A relay that greets with 4xx/5xx: its verdict, in its class.
            code = 451 if e.code < 500 else 554
            raise RelayUnavailable(Reply(code, e.message), f"relay refused: {e}") from e
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
            smtp.close()
            raise RelayUnavailable(_UNREACHABLE, f"cannot reach relay: {e}") from e
        self.capabilities = RelayCapabilities.from_extensions(smtp.esmtp_extensions)
        return smtp

    async def known_capabilities(self) -> RelayCapabilities | None:
        """The relay's extensions; the first caller looks (bounded), later ones reuse the answer.

        None when the relay could not be asked: the gateway then advertises only what needs no
        help from the relay.
        """
        if self.capabilities is not None:
            return self.capabilities
        loop = asyncio.get_running_loop()
        failed_at = self._probe_failed_at
        if failed_at is not None and loop.time() - failed_at < PROBE_RETRY_AFTER:
            return None  # the relay was down a moment ago: do not make every EHLO wait
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._look())
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), PROBE_TIMEOUT)
        except TimeoutError:
            return None

    async def _look(self) -> RelayCapabilities | None:
        try:
            smtp = await self.connect()
        except RelayUnavailable as e:
            log.warning("relay %s:%d: %s", self.settings.host, self.settings.port, e)
            self._probe_failed_at = asyncio.get_running_loop().time()
            return None
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
        return self.capabilities

    def session(self) -> RelaySession:
        return RelaySession(self)


class RelaySession:
    """One client session's connection to the relay, logged in as that client's user."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._smtp: aiosmtplib.SMTP | None = None
        self._identity: tuple[str, str] | None = None
        self._broken = False  # lost inside a transaction: every later command of it fails
        # A connection being set up (connect, EHLO, STARTTLS; no login) ahead of MAIL.
        self._connecting: asyncio.Future[aiosmtplib.SMTP] | None = None

    @property
    def capabilities(self) -> RelayCapabilities | None:
        return self.relay.capabilities

    def prepare(self) -> None:
        """Start setting up the connection now (TCP, greeting, EHLO, STARTTLS; the login needs
        the checked credentials and waits for MAIL), so that it overlaps the client's AUTH check
        instead of following it. A failure is reported at MAIL, as without it."""
        if self._connecting is not None or (self._smtp is not None and self._smtp.is_connected):
            return
        self._connecting = asyncio.ensure_future(self.relay.connect())
        self._connecting.add_done_callback(_retrieve)

    async def _open(self, user: str, password: str) -> aiosmtplib.SMTP:
        smtp = self._smtp
        if smtp is not None and smtp.is_connected and self._identity == (user, password):
            return smtp
        connecting, self._connecting = self._connecting, None
        self.close()
        prepared = await connecting if connecting is not None else None
        if prepared is not None and prepared.is_connected:
            smtp = prepared
        else:  # none prepared, or it was dropped while the client took its time
            smtp = await self.relay.connect()
        if self.relay.settings.auth == "passthrough":
            try:
                await _login(smtp, user, password)
            except aiosmtplib.SMTPAuthenticationError as e:
                smtp.close()
                # The relay refused credentials IMAP accepted: its verdict, in its class, on a
                # code that MAIL may have.
                reply = Reply(451 if e.code < 500 else 550, e.message)
                raise RelayUnavailable(reply, f"relay refused the login: {e.code}") from e
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
                smtp.close()
                raise RelayUnavailable(_LOST, f"relay connection lost during login: {e}") from e
            except aiosmtplib.SMTPException as e:
                smtp.close()
                raise RelayUnavailable(_MISCONFIGURED, f"relay login impossible: {e}") from e
        elif self.relay.settings.auth == "oauth2":
            try:
                await self._oauth_login(smtp, user)
            except RelayUnavailable:
                smtp.close()
                raise
        self._smtp, self._identity = smtp, (user, password)
        return smtp

    async def _oauth_login(self, smtp: aiosmtplib.SMTP, user: str) -> None:
        """AUTH with the user's access token; one that is refused is forgotten and a fresh one
        tried once on the same connection."""
        relay = self.relay
        tokens = relay.tokens
        assert tokens is not None
        loop = asyncio.get_running_loop()
        status = ""
        for attempt in (1, 2):
            try:
                token = await Deferred.asFuture(tokens.access_token(user), loop)
            except (NoGrant, GrantRevoked) as e:
                log.error("relay login: %s", grant_problem(e), extra={"user": user})
                raise RelayUnavailable(_NO_TOKEN, f"no OAuth grant: {e}") from e
            except OAuthError as e:
                raise RelayUnavailable(_NO_TOKEN, f"OAuth provider unavailable: {e}") from e
            try:
                failure = await _authenticate_oauth(smtp, relay.mechanism, user, token)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
                raise RelayUnavailable(_LOST, f"relay connection lost during login: {e}") from e
            except (aiosmtplib.SMTPException, sasl.UnusableCredential) as e:
                raise RelayUnavailable(_MISCONFIGURED, f"relay login impossible: {e}") from e
            if failure is None:
                return
            status = failure.status
            if not failure.token_rejected or attempt == 2:
                break
            log.info("relay refused the access token; refreshing", extra={"user": user})
            tokens.forget_access_token(user, token)
        log.error(
            "oauth: the SMTP relay refuses the access tokens of %s (status %s), fresh ones too:"
            " the grant does not allow sending as this user; to restore it, run:"
            " popgate oauth login %s (and sign in as %s)",
            user,
            status,
            user,
            user,
        )
        raise RelayUnavailable(_TOKEN_REFUSED, f"relay refused the access token ({status})")

    async def mail(self, user: str, password: str, sender: str, options: list[str]) -> Reply:
        """Start a transaction (connecting and logging in first if needed)."""
        self._broken = False
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        smtp = await self._open(user, password)
        try:
            return await self._command(smtp.mail(sender, options=options, encoding=encoding))
        except RelayUnavailable:
            # A connection that died while idle: one fresh attempt before giving up.
            self.close()
            smtp = await self._open(user, password)
            return await self._command(smtp.mail(sender, options=options, encoding=encoding))

    async def rcpt(self, recipient: str, utf8: bool) -> Reply:
        smtp = self._live()
        return await self._command(smtp.rcpt(recipient, encoding="utf-8" if utf8 else "ascii"))

    async def data(self, message: bytes) -> Reply:
        smtp = self._live()
        return await self._command(smtp.data(message))

    async def rset(self) -> None:
        """End an open transaction upstream (client RSET, EHLO, or an error)."""
        if self._smtp is None or not self._smtp.is_connected:
            return
        try:
            await self._smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            self.close()

    async def quit(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()

    def quit_later(self) -> None:
        """QUIT upstream without making the client wait for the relay's 221: every message of
        the session has its answer already, so nothing rides on it (docs/benchmark.md)."""
        if self._smtp is None:
            return
        task = asyncio.ensure_future(self.quit())
        self.relay.closing.add(task)
        task.add_done_callback(self.relay.closing.discard)

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.add_done_callback(_close_prepared)

    def _live(self) -> aiosmtplib.SMTP:
        if self._broken or self._smtp is None or not self._smtp.is_connected:
            self._broken = True
            raise RelayUnavailable(_LOST, "relay connection lost in this transaction")
        return self._smtp

    async def _command(self, call: Awaitable[aiosmtplib.SMTPResponse]) -> Reply:
        """Await one aiosmtplib call; a refusal is a Reply, a broken connection an exception."""
        try:
            response = await call
        except aiosmtplib.SMTPResponseException as e:
            if e.code == 421:  # the relay is closing the connection (RFC 5321 3.8)
                self._broken = True
                self.close()
            return Reply(e.code, e.message)
        except ValueError as e:  # aiosmtplib refuses an address it cannot put on a line
            return Reply(553, f"5.1.3 Address not accepted: {e}")
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
            self._broken = True
            self.close()
            raise RelayUnavailable(_LOST, f"relay connection lost: {e}") from e
        return Reply(response.code, response.message)


def _retrieve(future: asyncio.Future[aiosmtplib.SMTP]) -> None:
    """A prepared connection nobody asks for any more: its failure is not an error to log."""
    if not future.cancelled():
        future.exception()


def _close_prepared(future: asyncio.Future[aiosmtplib.SMTP]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


async def _login(smtp: aiosmtplib.SMTP, user: str, password: str) -> None:
    """One mechanism, PLAIN if offered: a refusal is the relay's verdict on the credentials, not
    a reason to try the next mechanism (aiosmtplib's ``login`` would, and retries confuse some
    servers and count twice against the user's login-failure limits)."""
    methods = smtp.supported_auth_methods
    if "plain" in methods:
        await smtp.auth_plain(user, password)
    elif "login" in methods:
        await smtp.auth_login(user, password)
    else:
        await smtp.login(user, password)


async def _authenticate_oauth(
    smtp: aiosmtplib.SMTP, mechanism: str, user: str, token: str
) -> sasl.OAuthFailure | None:
    """AUTH XOAUTH2 / OAUTHBEARER with the token as initial response (RFC 4954).

    None on 235. A refusal comes as a 334 error challenge, answered (empty for XOAUTH2, ^A for
    OAUTHBEARER) so the relay ends the exchange, or as a plain 5xx: either way the decoded
    failure, ``token_rejected`` when a fresh token may help. Raises SMTPException when the relay
    does not offer the mechanism (the operator's configuration).
    """
    name = mechanism.upper()
    if name.lower() not in smtp.server_auth_methods:
        raise aiosmtplib.SMTPException(f"the relay does not offer AUTH {name}")
    blob = base64.b64encode(sasl.oauth_response(name, user, token))
    response = await smtp.execute_command(b"AUTH", name.encode("ascii"), blob)
    if response.code == 235:
        return None
    failure = sasl.OAuthFailure("")
    if response.code == 334:
        failure = sasl.parse_oauth_challenge(response.message)
        response = await smtp.execute_command(base64.b64encode(sasl.oauth_error_reply(name)))
        if response.code == 235:  # a relay that let the exchange succeed after all
            return None
    if response.code in (535, 534) and not failure.status:
        failure = sasl.OAuthFailure("invalid_token")  # no challenge: a plain refusal
    if response.code >= 500 and failure.status:
        return failure
    if response.code >= 400 and response.code < 500:
        raise aiosmtplib.SMTPResponseException(response.code, response.message)
    return failure
