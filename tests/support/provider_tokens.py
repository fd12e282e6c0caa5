"""A small AccessTokens (gateway/oauth/tokens.py) for tests of the login paths: device passwords
in a dict, refresh tokens in memory, access tokens asked of the local provider's real token
endpoint (tests/support/oauth_provider.py) with the refresh-token grant, rotation included.

It answers synchronously (already-fired Deferreds; the HTTP call to the loopback provider
blocks for a moment), so it serves Twisted and asyncio code alike. The gateway's own token store
(gateway.oauth.store) is what ``popgate serve`` uses; this one isolates the upstream side.
"""

from __future__ import annotations

import hmac
import json
import urllib.error
import urllib.parse
import urllib.request

from twisted.internet.defer import Deferred, fail, succeed

from gateway.oauth.errors import GrantRevoked, NoGrant, ProviderUnavailable
from tests.support.oauth_provider import OAuthProvider


class ProviderTokens:
    def __init__(self, provider: OAuthProvider, token_url: str = "") -> None:
        self.provider = provider
        self.token_url = token_url or provider.token_url  # e.g. through a TcpProxy to cut
        self.passwords: dict[str, str] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.cached: dict[str, str] = {}
        self.forgotten: list[str] = []  # users whose token an upstream refused

    def login(self, user: str, device_password: str) -> None:
        """What ``popgate oauth login`` leaves behind: a grant and a device password."""
        self.refresh_tokens[user] = self.provider.grant(user)["refresh_token"]
        self.passwords[user] = device_password

    def check_device_password(self, user: str, password: str) -> Deferred[bool]:
        expected = self.passwords.get(user, "\0unknown")
        return succeed(hmac.compare_digest(expected.encode(), password.encode()))

    def access_token(self, user: str) -> Deferred[str]:
        if user in self.cached:
            return succeed(self.cached[user])
        try:
            token = self._refresh(user)
        except (NoGrant, GrantRevoked, ProviderUnavailable) as e:
            return fail(e)
        self.cached[user] = token
        return succeed(token)

    def forget_access_token(self, user: str, token: str) -> None:
        self.forgotten.append(user)
        if self.cached.get(user) == token:
            del self.cached[user]

    def _refresh(self, user: str) -> str:
        refresh = self.refresh_tokens.get(user)
        if refresh is None:
            raise NoGrant(user, "no grant stored")
        body = urllib.parse.urlencode(
            {
                "grant_type": "refresh_token",
                "refresh_token": refresh,
                "client_id": self.provider.client_id,
            }
        ).encode()
        try:
            with urllib.request.urlopen(self.token_url, body, timeout=10) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as e:
            error = json.loads(e.read() or b"{}").get("error") if e.code < 500 else None
            if error == "invalid_grant":
                raise GrantRevoked(user, "invalid_grant") from None
            raise ProviderUnavailable(user, f"HTTP {e.code}") from None
        except OSError as e:
            raise ProviderUnavailable(user, str(e)) from None
        self.refresh_tokens[user] = answer["refresh_token"]
        return str(answer["access_token"])
