"""Why popgate has no access token for a user, as types the login paths turn into answers.

The POP3 and submission edges map them in one place each: :class:`NoGrant` and
:class:`GrantRevoked` are the user's (``-ERR [AUTH]`` / ``535 5.7.8`` and a log line telling the
operator to run ``popgate oauth login USER``), :class:`ProviderUnavailable` is nobody's fault
and temporary (``-ERR [SYS/TEMP]`` / ``454 4.7.0``). Messages never contain a token.
"""

from __future__ import annotations

__all__ = ["GrantRevoked", "NoGrant", "OAuthError", "ProviderUnavailable"]


class OAuthError(Exception):
    """Base class: no usable access token for ``user``."""

    def __init__(self, user: str, detail: str = "") -> None:
        self.user = user
        self.detail = detail
        super().__init__(f"{user}: {detail}" if detail else user)


class NoGrant(OAuthError):
    """The user never ran ``popgate oauth login`` (or the grant was removed)."""


class GrantRevoked(OAuthError):
    """The provider answered ``invalid_grant``: the refresh token was revoked or has expired.
    Only ``popgate oauth login USER`` again can fix it."""


class ProviderUnavailable(OAuthError):
    """The provider could not be asked: network error, timeout, 5xx or an unreadable answer.
    Temporary: the next login tries again."""
