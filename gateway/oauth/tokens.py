"""What the login paths need from the OAuth side: check a device's local password, get an
access token for the upstream, and drop one the upstream refused.

:class:`AccessTokens` is the interface the POP3/submission/upstream code depends on; the token
store (:mod:`gateway.oauth.store`) implements it. Tests can give the login paths any object with
these three methods.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

__all__ = ["AccessTokens"]


class AccessTokens(Protocol):
    def check_device_password(self, user: str, password: str) -> Deferred[bool]:
        """Whether ``password`` is the local device password set by ``popgate oauth login``
        for ``user``. The scrypt hash runs in a thread (never on the reactor) and compares in
        constant time; an unknown user answers False after the same amount of work. Never
        contacts the provider."""
        ...

    def access_token(self, user: str) -> Deferred[str]:
        """A live access token for ``user``'s upstream logins.

        Cached in memory until shortly before it expires; otherwise the refresh token is used
        once, and concurrent callers for the same user share that one refresh (also across
        replicas sharing ``token_dir``). Fails with :class:`~gateway.oauth.errors.NoGrant`,
        :class:`~gateway.oauth.errors.GrantRevoked` or
        :class:`~gateway.oauth.errors.ProviderUnavailable`."""
        ...

    def forget_access_token(self, user: str, token: str) -> None:
        """The upstream rejected ``token``: drop it from the cache (only if it is still the
        cached one) so that the next :meth:`access_token` refreshes."""
        ...
