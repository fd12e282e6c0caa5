"""OAuth 2.0 without I/O: the requests popgate sends, the answers it reads, and the RFC 8628
device flow as a state machine.

Nothing here touches the network or a clock: callers pass ``now`` and the HTTP status and body
they received, and get back what to do next. :mod:`gateway.oauth.http` sends the bytes and
:mod:`gateway.oauth.login` / :mod:`gateway.oauth.service` drive these with a reactor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from gateway.config import OAuth2Settings

__all__ = [
    "DEVICE_GRANT",
    "SLOW_DOWN_STEP",
    "DeviceAuthorization",
    "DeviceFlow",
    "DeviceFlowFailed",
    "ProviderDown",
    "ProviderRefused",
    "TokenResponse",
    "client_fields",
    "device_authorization_request",
    "device_token_request",
    "parse_device_authorization",
    "parse_token_response",
    "refresh_request",
]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 3.5: without "interval" the client MUST use 5 s; "slow_down" adds 5 s to it "for this
# and all subsequent requests".
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# A poll that fails at the network level is tried again at the next interval; this many in a
# row end the flow (the code usually outlives a short outage, a dead provider should not hang).
MAX_POLL_FAILURES = 5
# Longest value popgate accepts for one token or code: providers' tokens are a few KiB at most.
MAX_FIELD = 16384


class ProviderDown(Exception):
    """The provider could not be asked or gave no readable answer: network error, timeout,
    5xx, not JSON. Temporary."""


class ProviderRefused(Exception):
    """The provider answered with an OAuth error (RFC 6749 5.2 / RFC 8628 3.5).

    ``error`` is the registered code (``invalid_grant``, ``invalid_client``, ...); the
    description is the provider's text, which never contains a token."""

    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        self.error = error
        self.description = description
        self.status = status
        super().__init__(f"{error}: {description}" if description else error)


class DeviceFlowFailed(Exception):
    """The device flow ended without a grant: ``reason`` is ``access_denied``,
    ``expired_token``, ``unreachable`` or another OAuth error code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# ------------------------------------------------------------------------------- requests
def client_fields(settings: OAuth2Settings) -> dict[str, str]:
    """``client_id`` and, for a confidential client, ``client_secret``."""
    # client_secret_post: both Microsoft and Google take the secret in the form body.
    fields = {"client_id": settings.client_id}
    if settings.client_secret:
        fields["client_secret"] = settings.client_secret
    return fields


def device_authorization_request(settings: OAuth2Settings) -> bytes:
    fields = client_fields(settings)
    if settings.scopes:
        fields["scope"] = " ".join(settings.scopes)
    return urlencode(fields).encode()


def device_token_request(settings: OAuth2Settings, device_code: str) -> bytes:
    fields = {"grant_type": DEVICE_GRANT, "device_code": device_code, **client_fields(settings)}
    return urlencode(fields).encode()


def refresh_request(settings: OAuth2Settings, refresh_token: str) -> bytes:
    fields = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    fields.update(client_fields(settings))
    if settings.scopes:
        fields["scope"] = " ".join(settings.scopes)
    return urlencode(fields).encode()


# ------------------------------------------------------------------------------- answers
def _json_object(status: int, body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        if status >= 500 or status == 429:
            raise ProviderDown(f"HTTP {status}")
        raise ProviderDown(f"HTTP {status} with an answer that is not a JSON object")
    return value


def _raise_error(status: int, answer: dict[str, Any]) -> None:
    """An OAuth error answer becomes ProviderRefused; a server error ProviderDown."""
    if status >= 500 or status == 429:
        raise ProviderDown(f"HTTP {status}")
    error = answer.get("error")
    if status != 200 or error is not None:
        if not isinstance(error, str) or not error:
            raise ProviderDown(f"HTTP {status} without an OAuth error code")
        description = answer.get("error_description")
        text = description if isinstance(description, str) else ""
        # Microsoft's descriptions are long (trace IDs, timestamps): the first line says it.
        raise ProviderRefused(error[:100], text.splitlines()[0][:300] if text else "", status)


def _string(answer: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = answer.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise ProviderDown(f"the answer has no usable {key!r}")
    return value


def _seconds(answer: dict[str, Any], key: str, default: float) -> float:
    value = answer.get(key)
    if isinstance(value, str) and value.isdigit():  # some providers send numbers as strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return default
    return float(value)


@dataclass(frozen=True)
class TokenResponse:
    """A successful token answer. ``refresh_token`` is empty when the provider kept the old
    one (Google does not rotate); ``expires_in`` defaults to an hour when absent."""

    access_token: str = field(repr=False)
    expires_in: float
    refresh_token: str = field(default="", repr=False)
    scope: str = ""


def parse_token_response(status: int, body: bytes) -> TokenResponse:
    answer = _json_object(status, body)
    _raise_error(status, answer)
    token_type = answer.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ProviderDown(f"unsupported token_type {str(token_type)[:40]!r}")
    scope = answer.get("scope")
    return TokenResponse(
        access_token=_string(answer, "access_token"),
        expires_in=_seconds(answer, "expires_in", 3600.0),
        refresh_token=_string(answer, "refresh_token", required=False),
        scope=scope if isinstance(scope, str) else "",
    )


@dataclass(frozen=True)
class DeviceAuthorization:
    """RFC 8628 3.2. ``verification_uri_complete`` is empty when the provider sends none."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: float
    interval: float
    message: str = ""  # Microsoft's ready-made instruction text (not used for output)


def parse_device_authorization(status: int, body: bytes) -> DeviceAuthorization:
    answer = _json_object(status, body)
    _raise_error(status, answer)
    # Google still says "verification_url" (the name of an RFC 8628 draft).
    uri_key = "verification_uri" if "verification_uri" in answer else "verification_url"
    message = answer.get("message")
    return DeviceAuthorization(
        device_code=_string(answer, "device_code"),
        user_code=_string(answer, "user_code"),
        verification_uri=_string(answer, uri_key),
        verification_uri_complete=_string(answer, "verification_uri_complete", required=False),
        expires_in=_seconds(answer, "expires_in", 600.0),
        interval=_seconds(answer, "interval", DEFAULT_INTERVAL),
        message=message if isinstance(message, str) else "",
    )


# ------------------------------------------------------------------------------- device flow
class DeviceFlow:
    """RFC 8628 section 3.4/3.5 polling, driven from outside.

    ::

        flow = DeviceFlow(authorization, now)
        while (delay := flow.next_poll_in(now)) ...:   # raises DeviceFlowFailed on expiry
            wait delay; send device_token_request; then either
            result = flow.received(status, body, now)  # TokenResponse, or None: poll again
            flow.unreachable(now)                       # the poll failed at the network level

    The interval is the provider's (5 s if it gave none), grows by 5 s on every ``slow_down``
    (also when the provider answered 429 or a connection failed: backing off is always
    right), and the flow fails once the device code has expired.
    """

    def __init__(self, authorization: DeviceAuthorization, now: float) -> None:
        self.authorization = authorization
        self.interval = authorization.interval
        self.expires_at = now + authorization.expires_in
        self.last_poll: float | None = None
        self.next_poll_at = now + self.interval
        self.slow_downs = 0
        self.polls = 0
        self._failures = 0

    def next_poll_in(self, now: float) -> float:
        """Seconds to wait before the next poll (0: now). Raises DeviceFlowFailed when the code
        has expired or would have by then."""
        if max(now, self.next_poll_at) >= self.expires_at:
            raise DeviceFlowFailed(
                "expired_token",
                "the code expired before the sign-in was completed; run the command again",
            )
        return max(0.0, self.next_poll_at - now)

    def _polled(self, now: float) -> None:
        self.polls += 1
        self.last_poll = now
        self.next_poll_at = now + self.interval

    def received(self, status: int, body: bytes, now: float) -> TokenResponse | None:
        """The answer to a poll: the tokens, or None to poll again (pending / slow_down)."""
        self._polled(now)
        try:
            tokens = parse_token_response(status, body)
        except ProviderRefused as refused:
            self._refused(refused, now)
            return None
        except ProviderDown:
            self.unreachable(now, counted=False)
            return None
        self._failures = 0
        return tokens

    def _refused(self, refused: ProviderRefused, now: float) -> None:
        self._failures = 0
        if refused.error == "authorization_pending":
            return None
        if refused.error == "slow_down":
            self.slow_downs += 1
            self.interval += SLOW_DOWN_STEP
            self.next_poll_at = now + self.interval
            return None
        if refused.error == "access_denied":
            raise DeviceFlowFailed("access_denied", "the sign-in was refused (access_denied)")
        if refused.error == "expired_token":
            raise DeviceFlowFailed(
                "expired_token",
                "the code expired before the sign-in was completed; run the command again",
            )
        detail = f": {refused.description}" if refused.description else ""
        raise DeviceFlowFailed(refused.error, f"the provider refused: {refused.error}{detail}")

    def unreachable(self, now: float, *, counted: bool = True) -> None:
        """A poll got no answer (or a 5xx): back off like slow_down; give up after a few."""
        if counted:
            self._polled(now)
        self._failures += 1
        if self._failures >= MAX_POLL_FAILURES:
            raise DeviceFlowFailed(
                "unreachable", f"the provider did not answer {self._failures} polls in a row"
            )
        self.interval += SLOW_DOWN_STEP
        self.next_poll_at = now + self.interval
