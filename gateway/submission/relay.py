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
import logging
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass

import aiosmtplib

from gateway.config import SmtpUpstream
from gateway.submission.replies import Reply

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


class Relay:
    """Shared by all sessions: where to connect, how, and the relay's last known extensions."""

    def __init__(self, settings: SmtpUpstream, local_hostname: str) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self.tls_context = client_tls_context(settings) if settings.security != "none" else None
        self.capabilities: RelayCapabilities | None = None
        self._probe: asyncio.Task[RelayCapabilities | None] | None = None
        self._probe_failed_at: float | None = None

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

    @property
    def capabilities(self) -> RelayCapabilities | None:
        return self.relay.capabilities

    async def _open(self, user: str, password: str) -> aiosmtplib.SMTP:
        smtp = self._smtp
        if smtp is not None and smtp.is_connected and self._identity == (user, password):
            return smtp
        self.close()
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
        self._smtp, self._identity = smtp, (user, password)
        return smtp

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

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

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
