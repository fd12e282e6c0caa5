"""OAuthTokens (the server's AccessTokens) against the local identity provider over real HTTP:
caching, one refresh per user (in a process and across replicas sharing token_dir), rotation,
revocation, outages, grants changed while running, device passwords, and logs free of secrets."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from gateway.config import OAuth2Settings, load_config
from gateway.oauth.errors import GrantRevoked, NoGrant, ProviderUnavailable
from gateway.oauth.service import OAuthTokens
from gateway.oauth.store import GrantRecord, PasswordHash, TokenStore
from tests.support.oauth_provider import OAuthProvider, oauth2_section, store_grant

pytest_plugins = ("tests.support.oauth_fixtures",)

PASSWORD = "device-pass-1234"


@pytest.fixture(scope="module")
def password_hash() -> PasswordHash:
    return PasswordHash.create(PASSWORD)


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def settings(oauth_provider: OAuthProvider, tmp_path: Path) -> OAuth2Settings:
    return OAuth2Settings(
        device_authorization_url=oauth_provider.device_authorization_url,
        token_url=oauth_provider.token_url,
        client_id=oauth_provider.client_id,
        scopes=("mail",),
        token_dir=tmp_path / "tokens",
    )


@pytest.fixture
def secrets_seen() -> Iterator[list[str]]:
    """Every token and password a test handles; checked against all log output at the end."""
    seen: list[str] = [PASSWORD]
    yield seen


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture, secrets_seen: list[str]) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in secrets_seen:
        assert secret not in text


def replica(settings: OAuth2Settings, key: bytes) -> OAuthTokens:
    return OAuthTokens(settings, TokenStore(settings.token_dir, key), reactor)


def seed(
    idp: OAuthProvider,
    tokens: OAuthTokens,
    user: str,
    password_hash: PasswordHash,
    secrets_seen: list[str],
) -> str:
    """A grant as ``popgate oauth login`` leaves it, minus the access token: returns the RT."""
    answer = idp.grant(user)
    secrets_seen += [answer["refresh_token"], answer["access_token"]]
    record = GrantRecord(user, answer["refresh_token"], password_hash, created=time.time())
    with tokens.store.locked(user, 5):
        tokens.store.write(record)
    return str(answer["refresh_token"])


@pytest_twisted.ensureDeferred
async def test_cached_until_shortly_before_expiry_and_rotated_tokens_are_stored(
    oauth_provider: OAuthProvider,
    settings: OAuth2Settings,
    key: bytes,
    password_hash: PasswordHash,
    secrets_seen: list[str],
) -> None:
    tokens = replica(settings, key)
    first_rt = seed(oauth_provider, tokens, "alice", password_hash, secrets_seen)
    access = await tokens.access_token("alice")
    secrets_seen.append(access)
    assert oauth_provider.is_active(access)
    assert await tokens.access_token("alice") == access
    assert oauth_provider.count("refresh_token") == 1
    stored = tokens.store.read("alice")
    assert stored is not None and stored.refresh_token != first_rt
    assert oauth_provider.live_refresh_tokens("alice") == [stored.refresh_token]
    secrets_seen.append(stored.refresh_token)

    # Tokens that live less than the refresh margin are refreshed on every use.
    oauth_provider.access_token_lifetime = 60
    oauth_provider.expire_access_tokens("alice")
    tokens.forget_access_token("alice", access)
    short = await tokens.access_token("alice")
    again = await tokens.access_token("alice")
    secrets_seen += [short, again]
    assert short != again and oauth_provider.count("refresh_token") == 3
    assert oauth_provider.is_active(again)


@pytest_twisted.ensureDeferred
async def test_concurrent_callers_share_one_refresh(
    oauth_provider: OAuthProvider,
    settings: OAuth2Settings,
    key: bytes,
    password_hash: PasswordHash,
    secrets_seen: list[str],
) -> None:
    tokens = replica(settings, key)
    seed(oauth_provider, tokens, "bob", password_hash, secrets_seen)
    results = await DeferredList([tokens.access_token("bob") for _ in range(8)])
    values = {value for ok, value in results if ok}
    assert all(ok for ok, _ in results) and len(values) == 1
    secrets_seen.extend(values)
    assert oauth_provider.count("refresh_token") == 1


@pytest_twisted.ensureDeferred
async def test_two_replicas_on_one_token_dir_never_spend_a_rotated_token(
    oauth_provider: OAuthProvider,
    settings: OAuth2Settings,
    key: bytes,
    password_hash: PasswordHash,
    secrets_seen: list[str],
) -> None:
    # Strict rotation: the old refresh token dies at its first use. Both replicas start at the
    # same moment with nothing cached.
    first, second = replica(settings, key), replica(settings, key)
    seed(oauth_provider, first, "carol", password_hash, secrets_seen)
    for round_ in range(3):
        results = await DeferredList(
            [first.access_token("carol"), second.access_token("carol")], consumeErrors=True
        )
        assert [ok for ok, _ in results] == [True, True], results
        a, b = (value for _, value in results)
        secrets_seen += [a, b]
        assert a == b  # the second waited for the lock and took the token the first stored
        assert oauth_provider.count("refresh_token") == round_ + 1
        stored = first.store.read("carol")
        assert stored is not None
        secrets_seen.append(stored.refresh_token)
        assert oauth_provider.live_refresh_tokens("carol") == [stored.refresh_token]
        # the upstream refuses the token: both replicas are told, the next round refreshes
        oauth_provider.expire_access_tokens("carol")
        first.forget_access_token("carol", a)
        second.forget_access_token("carol", b)
    assert oauth_provider.invalid_grants == 0


@pytest_twisted.ensureDeferred
async def test_revoked_grant_outage_and_no_grant(
    oauth_provider: OAuthProvider,
    settings: OAuth2Settings,
    key: bytes,
    password_hash: PasswordHash,
    secrets_seen: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = replica(settings, key)
    with pytest.raises(NoGrant):
        await tokens.access_token("nobody")
    seed(oauth_provider, tokens, "dave", password_hash, secrets_seen)

    oauth_provider.outage("refused")
    with pytest.raises(ProviderUnavailable):
        await tokens.access_token("dave")
    oauth_provider.outage("503")
    with pytest.raises(ProviderUnavailable):
        await tokens.access_token("dave")
    oauth_provider.outage(None)
    access = await tokens.access_token("dave")
    secrets_seen.append(access)

    oauth_provider.revoke("dave")
    tokens.forget_access_token("dave", access)
    with pytest.raises(GrantRevoked) as revoked:
        await tokens.access_token("dave")
    assert revoked.value.user == "dave"
    assert "run: popgate oauth login dave" in caplog.text
    assert oauth_provider.count("refused_503") == 1


@pytest_twisted.ensureDeferred
async def test_a_running_server_sees_login_and_remove_without_restart(
    oauth_provider: OAuthProvider,
    settings: OAuth2Settings,
    key: bytes,
    password_hash: PasswordHash,
    secrets_seen: list[str],
) -> None:
    tokens = replica(settings, key)
    seed(oauth_provider, tokens, "erin", password_hash, secrets_seen)
    access = await tokens.access_token("erin")
    secrets_seen.append(access)
    assert await tokens.check_device_password("erin", PASSWORD) is True

    tokens.store.remove("erin")  # popgate oauth remove, in another process
    with pytest.raises(NoGrant):
        await tokens.access_token("erin")
    assert await tokens.check_device_password("erin", PASSWORD) is False

    new_hash = PasswordHash.create("a-new-device-pass")
    seed(oauth_provider, tokens, "erin", new_hash, secrets_seen)  # popgate oauth login again
    secrets_seen.append("a-new-device-pass")
    fresh = await tokens.access_token("erin")
    secrets_seen.append(fresh)
    assert fresh != access and oauth_provider.is_active(fresh)
    assert await tokens.check_device_password("erin", PASSWORD) is False
    assert await tokens.check_device_password("erin", "a-new-device-pass") is True


@pytest_twisted.ensureDeferred
async def test_device_passwords_never_contact_the_provider(
    oauth_provider: OAuthProvider,
    settings: OAuth2Settings,
    key: bytes,
    password_hash: PasswordHash,
    secrets_seen: list[str],
) -> None:
    tokens = replica(settings, key)
    seed(oauth_provider, tokens, "frank", password_hash, secrets_seen)
    before = oauth_provider.requests
    secrets_seen += ["wrong-password", "whatever-1"]
    assert await tokens.check_device_password("frank", PASSWORD) is True
    assert await tokens.check_device_password("frank", PASSWORD) is True  # remembered
    assert await tokens.check_device_password("frank", "wrong-password") is False
    assert await tokens.check_device_password("nobody", "whatever-1") is False
    assert await tokens.check_device_password("frank", "") is False
    assert oauth_provider.requests == before


@pytest_twisted.ensureDeferred
async def test_a_refused_token_is_not_handed_out_again_from_the_store(
    oauth_provider: OAuthProvider,
    settings: OAuth2Settings,
    key: bytes,
    password_hash: PasswordHash,
    secrets_seen: list[str],
) -> None:
    tokens = replica(settings, key)
    seed(oauth_provider, tokens, "gina", password_hash, secrets_seen)
    access = await tokens.access_token("gina")
    tokens.forget_access_token("gina", access)
    fresh = await tokens.access_token("gina")
    secrets_seen += [access, fresh]
    assert fresh != access and oauth_provider.count("refresh_token") == 2


@pytest_twisted.ensureDeferred
async def test_the_helpers_other_tests_use_store_what_login_stores(
    oauth_provider: OAuthProvider, tmp_path: Path, key: bytes, secrets_seen: list[str]
) -> None:
    section = oauth2_section(oauth_provider, tmp_path / "t", key)
    config_file = tmp_path / "popgate.toml"
    config_file.write_text(
        '[upstream.imap]\nhost = "127.0.0.1"\nauth = "oauth2"\n[oauth2]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in section.items())
    )
    settings = load_config(config_file, environ={}).oauth2
    record = store_grant(oauth_provider, settings.token_dir, key, "hank", "hank-device-pw")
    secrets_seen += [record.access_token, record.refresh_token, "hank-device-pw"]
    tokens = replica(settings, key)
    assert await tokens.check_device_password("hank", "hank-device-pw") is True
    assert await tokens.access_token("hank") == record.access_token  # no refresh needed
    assert oauth_provider.count("refresh_token") == 0
