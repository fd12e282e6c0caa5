"""Why popgate has no access token for a user, as types the login paths turn into answers.

The POP3 and submission edges map them in one place each: a :class:`GrantUnusable`
(:class:`NoGrant`, :class:`GrantRevoked`, :class:`TokenRefused`) is the grant's problem, not the
device's (``-ERR [AUTH]`` / ``535 5.7.8`` and a log line telling the operator to run
``popgate oauth login USER``; the device's password was right, so no failed login is counted
against its address), :class:`ProviderUnavailable` is nobody's fault and temporary
(``-ERR [SYS/TEMP]`` / ``454 4.7.0``). Messages never contain a token.
"""

from __future__ import annotations

__all__ = [
    "GrantRevoked",
    "GrantUnusable",
    "NoGrant",
    "OAuthError",
    "ProviderUnavailable",
    "TokenRefused",
]


class OAuthError(Exception):
    """Base class: no usable access token for ``user``."""

    def __init__(self, user: str, detail: str = "") -> None:
        self.user = user
        self.detail = detail
        super().__init__(f"{user}: {detail}" if detail else user)


class GrantUnusable(OAuthError):
    """Only the operator can fix it, with ``popgate oauth login USER``: the device gave the
    right password, so this is no guess to throttle."""


class NoGrant(GrantUnusable):
    """The user never ran ``popgate oauth login`` (or the grant was removed)."""


class GrantRevoked(GrantUnusable):
    """The provider answered ``invalid_grant``: the refresh token was revoked or has expired.
    Only ``popgate oauth login USER`` again can fix it."""


class TokenRefused(GrantUnusable):
    """The upstream refused the user's access token again after a fresh one was obtained (or
    for a reason a fresh token does not change, such as ``insufficient_scope``): the provider
    vouches for the grant, but it does not open this mailbox (signed in as another account, a
    permission or scope missing, IMAP turned off for the mailbox)."""


class ProviderUnavailable(OAuthError):
    """The provider could not be asked: network error, timeout, 5xx or an unreadable answer.
    Temporary: the next login tries again."""
