"""The server's :class:`~gateway.oauth.tokens.AccessTokens`: device passwords and access tokens
from the token store, refreshed through the provider's token endpoint.

- Access tokens are cached in memory until ``REFRESH_MARGIN`` seconds before they expire.
- One refresh per user at a time: concurrent callers in this process share one Deferred; other
  processes (replicas on a shared ``token_dir``) are excluded by the store's per-user lock,
  held across the provider call. Under the lock the record is read again, so a replica that
  waited uses the access token (and rotated refresh token) the winner just stored instead of
  spending the old refresh token, which the provider may already have invalidated.
- The store is read again whenever the user's file changed (``popgate oauth login`` or
  ``remove`` run while the server runs): nothing needs a restart.
- Blocking work (files, locks, scrypt) runs in the reactor's thread pool; HTTP runs on the
  reactor (:class:`~gateway.oauth.http.FormPoster`).

Nothing is ever logged with a token or a password in it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from gateway.config import OAuth2Settings
from gateway.oauth.errors import GrantRevoked, NoGrant, OAuthError, ProviderUnavailable
from gateway.oauth.http import FormPoster
from gateway.oauth.protocol import (
    ProviderDown,
    ProviderRefused,
    TokenResponse,
    parse_token_response,
    refresh_request,
)
from gateway.oauth.store import (
    GrantRecord,
    Signature,
    StoreError,
    TokenStore,
    dummy_check,
    load_token_key,
)

__all__ = ["REFRESH_MARGIN", "ClientRejected", "OAuthTokens", "open_access_tokens"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# An access token is refreshed this many seconds before it expires, so that one handed out is
# still good for a whole IMAP login and SMTP transaction.
REFRESH_MARGIN = 120.0
# Longest wait for another process's refresh of the same user (its provider call is bounded by
# REQUEST_TIMEOUT, 20 s).
LOCK_TIMEOUT = 45.0
# A device password checked correct is remembered (as a keyed hash, in memory) this long, so a
# device polling every minute does not cost a scrypt each time. A changed grant file clears it.
VERIFIED_TTL = 600.0


class ClientRejected(GrantRevoked):
    """The provider refused popgate itself (``invalid_client``, ``unauthorized_client``): the
    ``[oauth2]`` client_id or client_secret is wrong or expired. Every user is affected."""


@dataclass
class _Cached:
    token: str = field(repr=False)
    expires_at: float
    signature: Signature | None


class OAuthTokens:
    """See the module docstring."""

    def __init__(
        self,
        settings: OAuth2Settings,
        store: TokenStore,
        reactor: Any,
        *,
        poster: FormPoster | None = None,
        in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.reactor = reactor
        self.poster = poster or FormPoster(reactor)
        self._in_thread = in_thread or deferToThread
        self._cache: dict[str, _Cached] = {}
        self._refreshing: dict[str, list[Deferred[str]]] = {}
        self._rejected: dict[str, str] = {}  # user -> last token an upstream refused
        self._verified: dict[str, tuple[bytes, Signature | None, float]] = {}
        self._verify_key = secrets.token_bytes(32)  # per process, never stored

    def _now(self) -> float:
        return float(self.reactor.seconds())

    # -- device passwords ---------------------------------------------------------------
    def check_device_password(self, user: str, password: str) -> Deferred[bool]:
        signature = self.store.signature(user)
        digest = hmac.new(self._verify_key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        remembered = self._verified.get(user)
        if (
            remembered is not None
            and signature is not None
            and remembered[1] == signature
            and remembered[2] > self._now()
            and hmac.compare_digest(remembered[0], digest)
        ):
            return succeed(True)

        def check() -> bool:
            try:
                record = self.store.read(user)
            except StoreError as exc:
                log.error("oauth: cannot read the grant of %s: %s", user, exc)
                record = None
            if record is None:
                return dummy_check(password)
            return record.password.matches(password)

        def done(ok: bool) -> bool:
            if ok:
                self._verified[user] = (digest, signature, self._now() + VERIFIED_TTL)
            else:
                self._verified.pop(user, None)
            return ok

        return self._in_thread(check).addCallback(done)

    # -- access tokens ------------------------------------------------------------------
    def access_token(self, user: str) -> Deferred[str]:
        signature = self.store.signature(user)
        if signature is None:
            self._cache.pop(user, None)
            return _fail(NoGrant(user, f"no grant stored; run: popgate oauth login {user}"))
        cached = self._cache.get(user)
        if (
            cached is not None
            and cached.signature == signature
            and cached.expires_at - REFRESH_MARGIN > self._now()
        ):
            return succeed(cached.token)
        waiter: Deferred[str] = Deferred()
        waiting = self._refreshing.get(user)
        if waiting is not None:  # one refresh per user: join it
            waiting.append(waiter)
            return waiter
        self._refreshing[user] = [waiter]
        Deferred.fromCoroutine(self._refresh(user)).addBoth(self._deliver, user)
        return waiter

    def forget_access_token(self, user: str, token: str) -> None:
        cached = self._cache.get(user)
        if cached is not None and hmac.compare_digest(cached.token, token):
            del self._cache[user]
        self._rejected[user] = token

    def _deliver(self, result: str | Failure, user: str) -> None:
        for waiter in self._refreshing.pop(user, []):
            if isinstance(result, str):
                waiter.callback(result)
            else:
                waiter.errback(result)

    async def _refresh(self, user: str) -> str:
        try:
            fd = await self._in_thread(self.store.acquire, user, LOCK_TIMEOUT)
        except StoreError as exc:
            raise ProviderUnavailable(user, str(exc)) from None
        try:
            return await self._refresh_locked(user)
        finally:
            self.store.release(fd)

    async def _refresh_locked(self, user: str) -> str:
        try:
            record: GrantRecord | None = await self._in_thread(self.store.read, user)
        except StoreError as exc:
            log.error("oauth: cannot read the grant of %s: %s", user, exc)
            raise GrantRevoked(
                user, f"stored grant unreadable; run: popgate oauth login {user}"
            ) from None
        if record is None:
            self._cache.pop(user, None)
            raise NoGrant(user, f"no grant stored; run: popgate oauth login {user}")
        now = self._now()
        shared = record.access_token
        if (
            shared
            and record.access_expires - REFRESH_MARGIN > now
            and shared != self._rejected.get(user)
        ):
            # Another process (or an earlier refresh here) stored a live token: use it.
            self._remember(user, shared, record.access_expires)
            return shared
        try:
            tokens = await self._ask_provider(user, record)
        except ProviderUnavailable:
            if shared and shared != self._rejected.get(user) and record.access_expires > now:
                # Not refreshed, but the token in hand has not expired yet: keep serving.
                return shared
            raise
        expires_at = now + tokens.expires_in
        updated = record.with_tokens(tokens.access_token, expires_at, tokens.refresh_token, now)
        try:
            await self._in_thread(self.store.write, updated)
        except OSError as exc:
            # The access token is good; the rotated refresh token is lost unless the provider
            # still accepts the old one (docs/oauth2.md, "When a write fails").
            log.error("oauth: could not store the refreshed grant of %s: %s", user, exc)
        self._rejected.pop(user, None)
        self._remember(user, tokens.access_token, expires_at)
        log.info(
            "oauth: refreshed the access token of %s (valid %d s%s)",
            user,
            int(tokens.expires_in),
            ", refresh token rotated" if tokens.refresh_token else "",
        )
        return tokens.access_token

    async def _ask_provider(self, user: str, record: GrantRecord) -> TokenResponse:
        body = refresh_request(self.settings, record.refresh_token)
        try:
            status, answer = await self.poster.post(self.settings.token_url, body)
            return parse_token_response(status, answer)
        except ProviderDown as exc:
            log.warning("oauth: the token endpoint is unavailable for %s: %s", user, exc)
            raise ProviderUnavailable(user, str(exc)) from None
        except ProviderRefused as refused:
            if refused.error in ("invalid_client", "unauthorized_client"):
                log.error(
                    "oauth: the provider refused popgate's client (%s) refreshing %s: check"
                    " [oauth2] client_id and client_secret",
                    refused,
                    user,
                )
                raise ClientRejected(user, str(refused)) from None
            if refused.error == "invalid_grant":
                log.warning(
                    "oauth: the grant of %s was revoked or has expired (%s); to restore it,"
                    " run: popgate oauth login %s",
                    user,
                    refused,
                    user,
                )
                raise GrantRevoked(user, str(refused)) from None
            log.warning("oauth: the token endpoint refused a refresh for %s: %s", user, refused)
            raise ProviderUnavailable(user, str(refused)) from None

    def _remember(self, user: str, token: str, expires_at: float) -> None:
        self._cache[user] = _Cached(token, expires_at, self.store.signature(user))


def _fail(error: OAuthError) -> Deferred[str]:
    d: Deferred[str] = Deferred()
    d.errback(error)
    return d


def open_access_tokens(settings: OAuth2Settings, reactor: Any) -> OAuthTokens:
    """The server's store and token source (the key is generated on first use if unset)."""
    key = load_token_key(settings, create=True)
    assert key is not None  # create=True either returns a key or raises
    store = TokenStore(settings.token_dir, key)
    store.prepare()
    return OAuthTokens(settings, store, reactor)
