"""The browser flow's state machine (gateway/oauth/authcode.py), in memory: PKCE, the
authorization URL, the redirect checks, the token request and answer."""

from __future__ import annotations

import itertools
import json
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest

from gateway.config import OAuth2Settings
from gateway.oauth.authcode import (
    MAX_REDIRECT,
    AuthorizationCodeFlow,
    AuthorizationFailed,
    NotARedirect,
    Pkce,
    default_flow,
    loopback_redirect_uri,
)
from gateway.oauth.protocol import ProviderDown, ProviderRefused

REDIRECT = loopback_redirect_uri(8765)
SETTINGS = OAuth2Settings(
    provider="custom",
    authorization_url="https://idp.example/authorize",
    token_url="https://idp.example/token",
    client_id="popgate-app",
    client_secret="s3cret",
    scopes=("mail", "offline_access"),
)


_COUNTER = itertools.count()


def counting_random(size: int) -> bytes:
    """Deterministic but different per call."""
    return bytes([next(_COUNTER) % 256]) * size


def flow(settings: OAuth2Settings = SETTINGS) -> AuthorizationCodeFlow:
    return AuthorizationCodeFlow(settings, REDIRECT, counting_random)


def test_pkce_s256_matches_rfc_7636_appendix_b() -> None:
    pkce = Pkce("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
    assert pkce.challenge == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert "dBjf" not in repr(pkce)
    made = Pkce.from_random(bytes(range(32)))
    assert len(made.verifier) == 43  # RFC 7636 4.1: 43..128 unreserved characters
    assert set(made.verifier) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    )


def test_authorization_url_carries_pkce_state_and_scopes() -> None:
    f = flow()
    parts = urlsplit(f.authorization_url)
    assert parts.scheme + "://" + parts.netloc + parts.path == "https://idp.example/authorize"
    assert dict(parse_qsl(parts.query)) == {
        "response_type": "code",
        "client_id": "popgate-app",
        "redirect_uri": "http://127.0.0.1:8765/",
        "state": f.state,
        "code_challenge": f.pkce.challenge,
        "code_challenge_method": "S256",
        "scope": "mail offline_access",
    }
    assert f.pkce.verifier not in f.authorization_url
    assert "s3cret" not in f.authorization_url
    assert f.state != f.pkce.verifier


def test_google_asks_for_offline_access_and_consent() -> None:
    google = OAuth2Settings(
        provider="google",
        authorization_url="https://accounts.google.com/o/oauth2/v2/auth?hl=en",
        client_id="c",
        scopes=("https://mail.google.com/",),
    )
    query = parse_qs(urlsplit(flow(google).authorization_url).query)
    assert query["access_type"] == ["offline"] and query["prompt"] == ["consent"]
    assert query["hl"] == ["en"]  # an existing query is kept
    assert query["scope"] == ["https://mail.google.com/"]


def test_default_flow_per_provider() -> None:
    assert default_flow(OAuth2Settings(provider="google", device_authorization_url="x")) == (
        "browser"
    )
    microsoft = OAuth2Settings(
        provider="microsoft", device_authorization_url="d", authorization_url="a"
    )
    assert default_flow(microsoft) == "device"
    both = OAuth2Settings(device_authorization_url="d", authorization_url="a")
    assert default_flow(both) == "device"
    assert default_flow(OAuth2Settings(authorization_url="a")) == "browser"


@pytest.mark.parametrize(
    "shape",
    [
        "http://127.0.0.1:8765/?state={state}&code={code}&scope=mail",
        "  http://127.0.0.1:8765/?code={code}&state={state}\n",  # as pasted, with spaces
        "/?state={state}&code={code}",  # the request target the listener sees
        "?state={state}&code={code}",
        "state={state}&code={code}",
        "state={state}&code={code}&scope=https://mail.google.com/",  # Google's unencoded scope
    ],
)
def test_the_redirect_gives_the_code_in_any_pasted_shape(shape: str) -> None:
    f = flow()
    assert f.redirect_received(shape.format(state=f.state, code="4/0AbC-d_e")) == "4/0AbC-d_e"
    body = parse_qs(f.token_request("4/0AbC-d_e").decode())
    assert body == {
        "grant_type": ["authorization_code"],
        "code": ["4/0AbC-d_e"],
        "redirect_uri": ["http://127.0.0.1:8765/"],
        "code_verifier": [f.pkce.verifier],
        "client_id": ["popgate-app"],
        "client_secret": ["s3cret"],
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/favicon.ico",
        "http://127.0.0.1:8765/",
        "hello world",
        "http://127.0.0.1:8765/?iss=https://idp.example",
        "x" * (MAX_REDIRECT + 1),
        "code=a&code=b&state=s",  # a repeated parameter
    ],
)
def test_what_is_not_a_redirect_keeps_the_flow_waiting(text: str) -> None:
    f = flow()
    with pytest.raises(NotARedirect):
        f.redirect_received(text)
    assert f.redirect_received(f"state={f.state}&code=c") == "c"  # still waiting


@pytest.mark.parametrize(
    ("template", "reason", "message"),
    [
        ("state=forged&code=c", "state_mismatch", "the redirect has the state of another sign-in"),
        ("code=c", "state_mismatch", "the redirect has no state"),
        ("error=access_denied&state=forged", "state_mismatch", "the redirect has the state"),
        (
            "error=access_denied&error_description=no+thanks&state={state}",
            "access_denied",
            "the sign-in was refused (access_denied): no thanks",
        ),
        (
            "error=invalid_scope&state={state}",
            "invalid_scope",
            "the provider answered the sign-in with invalid_scope",
        ),
        ("state={state}", "no_code", "the redirect carries no authorization code"),
    ],
)
def test_a_bad_redirect_ends_the_flow(template: str, reason: str, message: str) -> None:
    f = flow()
    with pytest.raises(AuthorizationFailed) as caught:
        f.redirect_received(template.format(state=f.state))
    assert caught.value.reason == reason
    assert str(caught.value).startswith(message)
    # Over: not even the right redirect is taken now.
    with pytest.raises(NotARedirect):
        f.redirect_received(f"state={f.state}&code=c")


def test_only_the_first_redirect_counts() -> None:
    f = flow()
    assert f.redirect_received(f"state={f.state}&code=first") == "first"
    with pytest.raises(NotARedirect):
        f.redirect_received(f"state={f.state}&code=second")


def test_token_answers() -> None:
    f = flow()
    f.redirect_received(f"state={f.state}&code=c")
    answer = {"access_token": "at", "refresh_token": "rt", "expires_in": 3599, "scope": "mail"}
    tokens = f.token_received(200, json.dumps(answer).encode())
    assert (tokens.access_token, tokens.refresh_token, tokens.expires_in) == ("at", "rt", 3599)
    refused = json.dumps({"error": "invalid_grant", "error_description": "Bad Request"})
    with pytest.raises(ProviderRefused) as caught:
        flow().token_received(400, refused.encode())
    assert caught.value.error == "invalid_grant"
    with pytest.raises(ProviderDown):
        flow().token_received(502, b"<html>bad gateway</html>")
