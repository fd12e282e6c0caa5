"""The local identity provider the OAuth tests rely on behaves like RFC 8628 / 6749 / 7662 say:
checked over real HTTP with urllib, so a broken fixture cannot make the OAuth tests pass."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.support.oauth_provider import DEVICE_GRANT, OAuthProvider

pytest_plugins = ("tests.support.oauth_fixtures",)


def post(url: str, **form: str) -> tuple[int, dict[str, Any]]:
    data = urllib.parse.urlencode(form).encode()
    try:
        with urllib.request.urlopen(url, data, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def device_flow(idp: OAuthProvider) -> tuple[str, str]:
    status, auth = post(idp.device_authorization_url, client_id=idp.client_id, scope="mail")
    assert status == 200
    return auth["device_code"], auth["user_code"]


def poll(idp: OAuthProvider, device_code: str) -> tuple[int, dict[str, Any]]:
    return post(
        idp.token_url, grant_type=DEVICE_GRANT, device_code=device_code, client_id=idp.client_id
    )


def test_device_flow_pending_then_tokens_then_introspection(oauth_provider: OAuthProvider) -> None:
    device_code, user_code = device_flow(oauth_provider)
    assert oauth_provider.wait_for_user_code(5) == user_code
    assert poll(oauth_provider, device_code) == (400, {"error": "authorization_pending"})
    oauth_provider.approve(user_code, "alice")
    status, tokens = poll(oauth_provider, device_code)
    assert status == 200 and tokens["token_type"] == "Bearer"
    assert post(oauth_provider.introspection_url, token=tokens["access_token"]) == (
        200,
        {
            "active": True,
            "username": "alice",
            "scope": "mail",
            "client_id": "popgate-test",
            "token_type": "Bearer",
        },
    )
    assert post(oauth_provider.introspection_url, token="nonsense") == (200, {"active": False})
    # the device code is spent
    assert poll(oauth_provider, device_code) == (400, {"error": "invalid_grant"})


@pytest.mark.parametrize(
    ("control", "error"),
    [("deny", "access_denied"), ("expire_device_code", "expired_token")],
)
def test_device_flow_denied_or_expired(
    oauth_provider: OAuthProvider, control: str, error: str
) -> None:
    device_code, user_code = device_flow(oauth_provider)
    getattr(oauth_provider, control)(user_code)
    assert poll(oauth_provider, device_code) == (400, {"error": error})


def test_slow_down_forced_and_when_polling_too_fast() -> None:
    with OAuthProvider(interval=30, enforce_interval=True) as idp:
        device_code, user_code = device_flow(idp)
        assert poll(idp, device_code)[1] == {"error": "authorization_pending"}
        assert poll(idp, device_code)[1] == {"error": "slow_down"}  # 30 s had not passed
    with OAuthProvider() as idp:
        device_code, user_code = device_flow(idp)
        idp.force_slow_down(user_code)
        assert poll(idp, device_code)[1] == {"error": "slow_down"}
        assert poll(idp, device_code)[1] == {"error": "authorization_pending"}


def test_refresh_rotates_and_the_old_token_dies(oauth_provider: OAuthProvider) -> None:
    first = oauth_provider.grant("bob")
    status, second = post(
        oauth_provider.token_url,
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
        client_id="popgate-test",
    )
    assert status == 200 and second["refresh_token"] != first["refresh_token"]
    assert oauth_provider.live_refresh_tokens("bob") == [second["refresh_token"]]
    status, again = post(
        oauth_provider.token_url,
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
        client_id="popgate-test",
    )
    assert (status, again["error"]) == (400, "invalid_grant")
    assert oauth_provider.count("refresh_token") == 2


def test_revoke_expire_wrong_client(oauth_provider: OAuthProvider) -> None:
    tokens = oauth_provider.grant("carol")
    oauth_provider.expire_access_tokens("carol")
    assert not oauth_provider.is_active(tokens["access_token"])
    oauth_provider.revoke("carol")
    status, answer = post(
        oauth_provider.token_url,
        grant_type="refresh_token",
        refresh_token=tokens["refresh_token"],
        client_id="popgate-test",
    )
    assert (status, answer["error"]) == (400, "invalid_grant")
    status, answer = post(
        oauth_provider.token_url, grant_type="refresh_token", refresh_token="x", client_id="other"
    )
    assert (status, answer["error"]) == (401, "invalid_client")


def test_outages(oauth_provider: OAuthProvider) -> None:
    oauth_provider.outage("503")
    assert post(oauth_provider.introspection_url, token="x")[0] == 503
    oauth_provider.outage("refused")
    with pytest.raises(urllib.error.URLError) as refused:
        post(oauth_provider.introspection_url, token="x")
    assert isinstance(refused.value.reason, ConnectionRefusedError)
    oauth_provider.outage(None)
    assert post(oauth_provider.introspection_url, token="x") == (200, {"active": False})
    assert oauth_provider.count("refused_503") == 1
