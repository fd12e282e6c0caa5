"""How popgate logs in upstream for a user: the one place that picks password or OAuth 2.0.

With ``[upstream.imap] auth = "password"`` a device's own password goes upstream, and work
without a device (retention sweeps, Sent-copy retries) uses the master identity. With
``auth = "oauth2"`` the upstream refuses passwords: a device's password is checked against the
local hash first (a wrong one never reaches the provider), then the user's access token logs in
(SASL XOAUTH2 or OAUTHBEARER), and work without a device uses that same stored grant.

Errors stay types: LoginRejected / UpstreamUnavailable from the IMAP side, and NoGrant,
GrantRevoked, TokenRefused, ProviderUnavailable (gateway.oauth.errors) from the token side, for
the POP3 and submission edges to turn into answers. Once the device password has matched, an
IMAP refusal is never a LoginRejected (which the edges count as a failed login of the device's
address): it is TokenRefused, the grant's problem.
"""

from __future__ import annotations

import logging

from twisted.internet.interfaces import IReactorTime

from gateway.config import Config, ImapUpstream
from gateway.oauth.errors import GrantRevoked, GrantUnusable, TokenRefused
from gateway.oauth.tokens import AccessTokens
from gateway.upstream.account import ImapAccount, LoginRejected, TokenRejected

log = logging.getLogger("popgate.oauth")


def grant_problem(error: GrantUnusable) -> str:
    """The log text for a grant only the operator can fix. What to run (``popgate oauth login
    USER``) is said once: in NoGrant's detail, or in its own line when the provider refused the
    refresh token or the IMAP server refused the tokens; so this line does not repeat it."""
    if isinstance(error, TokenRefused):
        why = "refused by the IMAP server"
    elif isinstance(error, GrantRevoked):
        why = "revoked or expired"
    else:
        why = "missing"
    return f"OAuth grant {why}: {error}"


class DevicePasswordRejected(LoginRejected):
    """Not the local device password of this user (``popgate oauth login`` sets it)."""


class UpstreamLogins:
    """Shared by every service: the IMAP settings, and the token source when auth = oauth2."""

    def __init__(
        self,
        reactor: IReactorTime,
        settings: ImapUpstream,
        tokens: AccessTokens | None = None,
        mechanism: str = "xoauth2",
    ) -> None:
        if settings.auth == "oauth2" and tokens is None:
            raise ValueError('[upstream.imap] auth = "oauth2" needs the OAuth token store')
        self.reactor = reactor
        self.settings = settings
        self.tokens = tokens
        self.mechanism = mechanism

    @property
    def oauth(self) -> bool:
        return self.settings.auth == "oauth2"

    @property
    def unattended(self) -> bool:
        """Whether work without a logged-in device can log in (a master identity or OAuth)."""
        return self.oauth or bool(self.settings.master_user)

    async def check_device(self, user: str, password: str, client_ip: str | None = None) -> None:
        """The device's password alone, without a mailbox (submission AUTH).

        With OAuth: the local hash, then a token is made sure of (so a revoked grant is
        reported at AUTH, not at the first message). With passwords: a login upstream.
        """
        if not self.oauth:
            account = await ImapAccount.open(self.reactor, self.settings, user, password, client_ip)
            await account.logout()
            return
        await self._check_device_password(user, password)
        assert self.tokens is not None
        await self.tokens.access_token(user)

    async def device(self, user: str, password: str, client_ip: str | None) -> ImapAccount:
        """Log in for a device that gave ``password``.

        Raises LoginRejected (with OAuth only DevicePasswordRejected: the provider was not
        asked), UpstreamUnavailable, and with OAuth NoGrant, GrantRevoked, TokenRefused,
        ProviderUnavailable.
        """
        if not self.oauth:
            return await ImapAccount.open(self.reactor, self.settings, user, password, client_ip)
        await self._check_device_password(user, password)
        return await self._with_token(user, client_ip)

    async def without_device(self, user: str) -> ImapAccount:
        """Log in to ``user``'s mailbox with no device present: the master identity, or with
        OAuth the user's stored grant."""
        if self.oauth:
            return await self._with_token(user, None)
        return await ImapAccount.open_as_master(self.reactor, self.settings, user)

    async def _check_device_password(self, user: str, password: str) -> None:
        assert self.tokens is not None
        if not await self.tokens.check_device_password(user, password):
            raise DevicePasswordRejected("not the device password set by popgate oauth login")

    async def _with_token(self, user: str, client_ip: str | None) -> ImapAccount:
        """Log in with the cached (or a refreshed) token; a token the server refuses is
        forgotten and a fresh one tried once. A second refusal is the server's verdict on the
        grant (TokenRefused), never on the device that is waiting."""
        tokens = self.tokens
        assert tokens is not None
        token = await tokens.access_token(user)
        try:
            try:
                return await self._open_oauth(user, token, client_ip)
            except TokenRejected:
                log.info("IMAP server refused the access token; refreshing", extra={"user": user})
                tokens.forget_access_token(user, token)
            token = await tokens.access_token(user)
            return await self._open_oauth(user, token, client_ip)
        except LoginRejected as e:
            log.error(
                "oauth: the IMAP server refuses the access tokens of %s (%s), fresh ones too:"
                " the grant does not open this mailbox (signed in as another account, or IMAP"
                " access not allowed for it); to restore it, run: popgate oauth login %s"
                " (and sign in as %s)",
                user,
                e,
                user,
                user,
            )
            raise TokenRefused(user, f"the IMAP server refused a fresh access token: {e}") from e

    async def _open_oauth(self, user: str, token: str, client_ip: str | None) -> ImapAccount:
        return await ImapAccount.open_oauth(
            self.reactor, self.settings, user, token, self.mechanism, client_ip
        )


def upstream_logins(
    reactor: IReactorTime, config: Config, tokens: AccessTokens | None = None
) -> UpstreamLogins:
    """The logins ``popgate serve`` uses; with any upstream on ``auth = "oauth2"`` the token
    store of ``[oauth2]`` unless ``tokens`` is given (tests)."""
    if config.uses_oauth2 and tokens is None:
        from gateway.oauth.service import open_access_tokens

        tokens = open_access_tokens(config.oauth2, reactor)
    return UpstreamLogins(reactor, config.upstream.imap, tokens, config.oauth2.mechanism)
