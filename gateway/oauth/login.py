"""``popgate oauth login|list|remove``: the operator's side of the token store.

``login`` runs the RFC 8628 device flow (:class:`~gateway.oauth.protocol.DeviceFlow`) on a
reactor: it asks for a device code, prints where to sign in, polls at the provider's interval
and stores the grant with the device password's scrypt hash under the user's lock. With
``--flow browser`` it runs the authorization-code flow with PKCE instead
(:class:`~gateway.oauth.authcode.AuthorizationCodeFlow`; Google's device flow refuses the Gmail
scope). A running ``serve`` sees the new file at the user's next login.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.config import OAuth2Settings
from gateway.oauth.authcode import (
    AuthorizationCodeFlow,
    AuthorizationFailed,
    loopback_redirect_uri,
)
from gateway.oauth.http import FormPoster
from gateway.oauth.protocol import (
    DeviceAuthorization,
    DeviceFlow,
    DeviceFlowFailed,
    ProviderDown,
    ProviderRefused,
    TokenResponse,
    device_authorization_request,
    device_token_request,
    parse_device_authorization,
)
from gateway.oauth.redirect import RedirectCatcher
from gateway.oauth.store import GrantRecord, PasswordHash, TokenStore

__all__ = ["LoginFailed", "format_listing", "run_browser_login", "run_device_flow", "run_login"]

LOCK_TIMEOUT = 60.0
# How long the browser flow waits for the redirect: a sign-in with MFA takes a few minutes,
# and the operator may have to copy an address between machines.
BROWSER_TIMEOUT = 900.0


class LoginFailed(Exception):
    """``popgate oauth login`` did not store a grant; the message says why and what to do."""


async def run_device_flow(
    reactor: Any,
    post: Callable[[str, bytes], Deferred[tuple[int, bytes]]],
    settings: OAuth2Settings,
    authorization: DeviceAuthorization,
    on_slow_down: Callable[[DeviceFlow], None] = lambda flow: None,
) -> tuple[TokenResponse, DeviceFlow]:
    """Poll the token endpoint as ``DeviceFlow`` says until tokens, denial or expiry;
    ``on_slow_down`` hears of every ``slow_down`` when it happens."""
    flow = DeviceFlow(authorization, reactor.seconds())
    while True:
        delay = flow.next_poll_in(reactor.seconds())
        if delay > 0:
            await deferLater(reactor, delay, lambda: None)
        # The code may have expired while waiting.
        flow.next_poll_in(reactor.seconds())
        body = device_token_request(settings, authorization.device_code)
        try:
            status, answer = await post(settings.token_url, body)
        except ProviderDown:
            flow.unreachable(reactor.seconds())
            continue
        slow_downs = flow.slow_downs
        tokens = flow.received(status, answer, reactor.seconds())
        if flow.slow_downs != slow_downs:
            on_slow_down(flow)
        if tokens is not None:
            return tokens, flow


def _minutes(seconds: float) -> str:
    return f"{round(seconds / 60)} minutes" if seconds >= 90 else f"{int(seconds)} seconds"


async def run_login(
    reactor: Any,
    settings: OAuth2Settings,
    store: TokenStore,
    user: str,
    password: str,
    out: TextIO,
    *,
    poster: FormPoster | None = None,
) -> GrantRecord:
    """The whole login: device code, instructions on ``out``, polling, storing."""
    post = (poster or FormPoster(reactor)).post
    # Hash first (it takes a moment): the grant is stored the instant the provider answers.
    password_hash = await deferToThread(PasswordHash.create, password)
    try:
        status, answer = await post(
            settings.device_authorization_url, device_authorization_request(settings)
        )
        authorization = parse_device_authorization(status, answer)
    except ProviderDown as exc:
        raise LoginFailed(f"the provider's device authorization endpoint: {exc}") from None
    except ProviderRefused as refused:
        raise LoginFailed(f"the provider refused to start the sign-in: {refused}") from None

    out.write(
        f"To sign in {user}, open {authorization.verification_uri}\n"
        f"and enter the code {authorization.user_code}\n"
    )
    if authorization.verification_uri_complete:
        out.write(f"(or open {authorization.verification_uri_complete})\n")
    out.write(
        f"Waiting for the sign-in; the code expires in {_minutes(authorization.expires_in)}.\n"
    )
    out.flush()

    def slowed(flow: DeviceFlow) -> None:
        out.write(f"(the provider asked to poll more slowly: every {flow.interval:g} s now)\n")
        out.flush()

    try:
        tokens, _ = await run_device_flow(reactor, post, settings, authorization, slowed)
    except DeviceFlowFailed as failed:
        raise LoginFailed(str(failed)) from None
    return await _save_grant(store, user, password_hash, tokens)


async def run_browser_login(
    reactor: Any,
    settings: OAuth2Settings,
    store: TokenStore,
    user: str,
    password: str,
    out: TextIO,
    *,
    poster: FormPoster | None = None,
    port: int = 0,
    paste: int | None = None,
    timeout: float = BROWSER_TIMEOUT,
) -> GrantRecord:
    """The authorization-code flow with PKCE: print the authorization URL, take the redirect
    from the loopback listener on ``port`` or from a line pasted on file descriptor ``paste``
    (stdin), exchange the code, store the grant. Nothing secret (code, verifier, tokens) is
    printed."""
    post = (poster or FormPoster(reactor)).post
    password_hash = await deferToThread(PasswordHash.create, password)
    catcher = RedirectCatcher(reactor, out)
    try:
        listening = catcher.listen(port)
    except CannotListenError as exc:
        raise LoginFailed(
            f"cannot listen on 127.0.0.1:{port} for the redirect: {exc.socketError}"
        ) from None
    try:
        address = listening.getHost()
        assert isinstance(address, IPv4Address)
        redirect_uri = loopback_redirect_uri(address.port)
        flow = catcher.flow = AuthorizationCodeFlow(settings, redirect_uri)
        out.write(
            f"To sign in {user}, open this address in a browser:\n\n"
            f"  {flow.authorization_url}\n\n"
            f"After the sign-in the browser is sent to {redirect_uri}, where popgate listens.\n"
            "If the browser runs on another machine, that page does not load: copy the address\n"
            "it ended on (from the address bar) and paste it here.\n"
            f"Waiting for the sign-in (at most {_minutes(timeout)}).\n"
        )
        out.flush()
        if paste is not None:
            catcher.read_pasted(paste)
        try:
            code = await catcher.code.addTimeout(timeout, reactor)
        except AuthorizationFailed as failed:
            raise LoginFailed(str(failed)) from None
        except DeferredTimeoutError:
            raise LoginFailed(
                f"no sign-in within {_minutes(timeout)}; run the command again"
            ) from None
    finally:
        await maybeDeferred(listening.stopListening)
    try:
        status, answer = await post(settings.token_url, flow.token_request(code))
        tokens = flow.token_received(status, answer)
    except ProviderDown as exc:
        raise LoginFailed(f"the provider's token endpoint: {exc}") from None
    except ProviderRefused as refused:
        raise LoginFailed(f"the provider refused the authorization code: {refused}") from None
    return await _save_grant(store, user, password_hash, tokens)


async def _save_grant(
    store: TokenStore, user: str, password_hash: PasswordHash, tokens: TokenResponse
) -> GrantRecord:
    """Store the grant with the device password's hash, under the user's lock."""
    if not tokens.refresh_token:
        raise LoginFailed(
            "the provider gave no refresh token: popgate needs offline access"
            ' (Microsoft: add "offline_access" to [oauth2] scopes)'
        )
    now = time.time()
    record = GrantRecord(
        user=user,
        refresh_token=tokens.refresh_token,
        password=password_hash,
        created=now,
        refreshed=now,
        access_token=tokens.access_token,
        access_expires=now + tokens.expires_in,
        scope=tokens.scope,
    )

    def save() -> None:
        with store.locked(user, LOCK_TIMEOUT):
            store.write(record)

    await deferToThread(save)
    return record


# ---------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class _Row:
    user: str
    signed_in: str
    age: str
    refreshed: str
    access: str


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{seconds}s"


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def format_listing(store: TokenStore, now: float) -> list[str]:
    """The table of ``popgate oauth list``: never a token, never a hash."""
    rows: list[_Row] = []
    problems: list[str] = []
    for item in store.listing():
        record = item.record
        if record is None:
            problems.append(f"unreadable: {item.problem}")
            continue
        if record.access_token and record.access_expires > now:
            access = f"valid {_duration(record.access_expires - now)}"
        else:
            access = "expired"
        rows.append(
            _Row(
                record.user,
                _utc(record.created),
                _duration(now - record.created),
                f"{_duration(now - record.refreshed)} ago" if record.refreshed else "never",
                access,
            )
        )
    header = _Row("USER", "SIGNED IN", "TOKEN AGE", "LAST REFRESH", "ACCESS TOKEN")
    widths = [
        max(len(getattr(r, f)) for r in [header, *rows])
        for f in ("user", "signed_in", "age", "refreshed", "access")
    ]
    lines = []
    for row in [header, *rows]:
        cells = (row.user, row.signed_in, row.age, row.refreshed, row.access)
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return lines + problems
