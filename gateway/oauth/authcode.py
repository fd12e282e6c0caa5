"""The authorization-code grant with PKCE for installed apps, without I/O.

RFC 6749 4.1 with RFC 7636 (PKCE, ``S256``) and a loopback redirect URI (RFC 8252 7.3,
``http://127.0.0.1:PORT/``): what Google documents for desktop apps, and the one way to a Gmail
grant, since Google's device flow does not allow ``https://mail.google.com/`` (docs/oauth2.md).

The state machine builds the authorization URL, checks the redirect the browser ended on (caught
by the loopback listener or pasted by the operator) and reads the token answer. Randomness is
passed in (``secrets.token_bytes`` by default); no sockets, no clock: the glue in
:mod:`gateway.oauth.login` and :mod:`gateway.oauth.redirect` does the I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal
from urllib.parse import parse_qs, urlencode, urlsplit

from gateway.config import OAuth2Settings
from gateway.oauth.protocol import TokenResponse, client_fields, parse_token_response

__all__ = [
    "MAX_REDIRECT",
    "AuthorizationCodeFlow",
    "AuthorizationFailed",
    "NotARedirect",
    "Pkce",
    "default_flow",
    "loopback_redirect_uri",
]

Flow = Literal["device", "browser"]

# A redirect URL is a few hundred characters (Google's codes ~75, state 43); anything much
# longer is not one, and is refused before it is parsed.
MAX_REDIRECT = 8192
# RFC 7636 4.1: 32 random octets give the recommended 43-character verifier.
VERIFIER_BYTES = 32
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
STATE_BYTES = 32

# Asked of the authorization endpoint on top of RFC 6749's parameters, per provider. Google
# issues a refresh token only with access_type=offline, and only on a consent it has not seen
# before unless prompt=consent (a second login of the same user would get none). Microsoft
# and others ask for it with the "offline_access" scope; RFC 6749 3.1 has servers ignore
# parameters they do not know.
EXTRA_AUTHORIZATION_PARAMS: dict[str, dict[str, str]] = {
    "google": {"access_type": "offline", "prompt": "consent"},
}


def default_flow(settings: OAuth2Settings) -> Flow:
    """``google`` signs in with the browser flow (its device flow refuses the Gmail scope);
    every other provider with the device flow, unless only ``authorization_url`` is set."""
    if settings.provider == "google":
        return "browser"
    if not settings.device_authorization_url and settings.authorization_url:
        return "browser"
    return "device"


def loopback_redirect_uri(port: int) -> str:
    """RFC 8252 7.3: the IP literal, not ``localhost`` (which may resolve elsewhere)."""
    return f"http://127.0.0.1:{port}/"


class AuthorizationFailed(Exception):
    """The browser flow ended without a grant. ``reason`` is ``state_mismatch``,
    ``access_denied`` (or another error the provider redirected with), ``no_code``, or the
    token endpoint's error code (``invalid_grant``, ...). Never contains a code or token."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class NotARedirect(ValueError):
    """The text is not an answer to the authorization request (no ``code``, ``error`` or
    ``state`` in it): a favicon request, a stray line. The flow goes on waiting."""


@dataclass(frozen=True)
class Pkce:
    """RFC 7636: the secret ``verifier`` stays here, the ``challenge`` goes in the URL."""

    verifier: str = field(repr=False)

    @classmethod
    def from_random(cls, random: bytes) -> Pkce:
        return cls(base64.urlsafe_b64encode(random).rstrip(b"=").decode("ascii"))

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Step(Enum):
    WAITING_FOR_REDIRECT = "waiting for the redirect"
    EXCHANGING = "exchanging the code"
    DONE = "done"
    FAILED = "failed"


class AuthorizationCodeFlow:
    """One login, driven from outside::

        flow = AuthorizationCodeFlow(settings, redirect_uri)
        print(flow.authorization_url)
        code = flow.redirect_received(url)   # NotARedirect: keep waiting;
                                             # AuthorizationFailed: the login is over
        post(settings.token_url, flow.token_request(code))
        tokens = flow.token_received(status, body)

    A redirect whose ``state`` is not this flow's ends the flow (RFC 6749 10.12: it may be a
    forged one), so does an ``error`` redirect; only the first good redirect counts.
    """

    def __init__(
        self,
        settings: OAuth2Settings,
        redirect_uri: str,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.settings = settings
        self.redirect_uri = redirect_uri
        self.pkce = Pkce.from_random(random(VERIFIER_BYTES))
        self.state = base64.urlsafe_b64encode(random(STATE_BYTES)).rstrip(b"=").decode("ascii")
        self.step = Step.WAITING_FOR_REDIRECT

    @property
    def authorization_url(self) -> str:
        params = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": self.redirect_uri,
            "state": self.state,
            "code_challenge": self.pkce.challenge,
            "code_challenge_method": "S256",
        }
        if self.settings.scopes:
            params["scope"] = " ".join(self.settings.scopes)
        params.update(EXTRA_AUTHORIZATION_PARAMS.get(self.settings.provider, {}))
        base = self.settings.authorization_url
        return base + ("&" if "?" in base else "?") + urlencode(params)

    def redirect_received(self, text: str) -> str:
        """The URL the browser was sent to (or just its query): the authorization code.

        Raises NotARedirect for text that is no answer at all, AuthorizationFailed (and the
        flow is over) for a wrong ``state``, an ``error`` answer or one without a code."""
        if self.step is not Step.WAITING_FOR_REDIRECT:
            raise NotARedirect(f"the login is no longer waiting for a redirect ({self.step.value})")
        query = _query_of(text)
        if not any(key in query for key in ("code", "error", "state")):
            raise NotARedirect("no code=, error= or state= in it")
        state = query.get("state", "")
        if not hmac.compare_digest(state.encode(), self.state.encode()):
            self.step = Step.FAILED
            what = "has no state" if not state else "has the state of another sign-in"
            raise AuthorizationFailed(
                "state_mismatch",
                f"the redirect {what}, not this login's: refused (a stale or forged sign-in);"
                " run the command again and use the address it prints",
            )
        error = query.get("error")
        if error is not None:
            self.step = Step.FAILED
            description = query.get("error_description", "")
            detail = f": {description[:300]}" if description else ""
            if error == "access_denied":
                message = f"the sign-in was refused (access_denied){detail}"
            else:
                message = f"the provider answered the sign-in with {error[:100]}{detail}"
            raise AuthorizationFailed(error[:100], message)
        code = query.get("code", "")
        if not code:
            self.step = Step.FAILED
            raise AuthorizationFailed("no_code", "the redirect carries no authorization code")
        self.step = Step.EXCHANGING
        return code

    def token_request(self, code: str) -> bytes:
        """RFC 6749 4.1.3 with RFC 7636 4.5: the code, the same redirect URI, the verifier."""
        fields = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": self.pkce.verifier,
            **client_fields(self.settings),
        }
        return urlencode(fields).encode()

    def token_received(self, status: int, body: bytes) -> TokenResponse:
        """The token endpoint's answer: the tokens. ProviderRefused (``invalid_grant``: a
        wrong, spent or expired code, or a verifier that does not match) and ProviderDown
        pass through; either way the flow is over."""
        self.step = Step.FAILED
        tokens = parse_token_response(status, body)
        self.step = Step.DONE
        return tokens


def _query_of(text: str) -> dict[str, str]:
    """The parameters of a pasted URL, a ``?query`` or a bare ``a=b&c=d``. A repeated
    parameter is refused (RFC 6749 3.1: "MUST NOT be included more than once")."""
    text = text.strip()
    if len(text) > MAX_REDIRECT:
        raise NotARedirect(f"longer than {MAX_REDIRECT} characters")
    if _URL.match(text) or text.startswith(("/", "?")):
        try:
            parts = urlsplit(text)
        except ValueError:
            raise NotARedirect("not a URL") from None
        query = parts.query
    else:
        query = text
    try:
        values = parse_qs(query, strict_parsing=bool(query), max_num_fields=32)
    except ValueError:
        raise NotARedirect("not a URL query") from None
    repeated = sorted(k for k, v in values.items() if len(v) > 1)
    if repeated:
        raise NotARedirect(f"{repeated[0]!r} appears more than once")
    return {k: v[0] for k, v in values.items()}
