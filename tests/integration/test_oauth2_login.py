"""popgate's upstream login with OAuth 2.0 tokens against a real Dovecot whose passdb is
``oauth2`` (introspection at the local provider): SASL XOAUTH2 and OAUTHBEARER, a token the
server refuses (forgotten, one fresh retry), a revoked grant, an unreachable provider, and a
wrong device password that never reaches the provider.

Tokens come from tests/support/provider_tokens.py (the provider's real token endpoint); the
gateway's own token store is exercised end to end in test_oauth2.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.config import ImapUpstream, SmtpUpstream
from gateway.oauth.errors import GrantRevoked, NoGrant, ProviderUnavailable
from gateway.submission.relay import Relay, RelayUnavailable
from gateway.submission.replies import Reply
from gateway.upstream.account import ImapAccount, LoginRejected, TokenRejected
from gateway.upstream.logins import DevicePasswordRejected, UpstreamLogins
from tests.support import messages
from tests.support.dovecot import Dovecot
from tests.support.oauth_provider import OAuthProvider
from tests.support.postfix import Postfix
from tests.support.provider_tokens import ProviderTokens
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def provider() -> Iterator[OAuthProvider]:
    with OAuthProvider() as idp:
        yield idp


@pytest.fixture(scope="module")
def oauth_dovecot(provider: OAuthProvider) -> Iterator[Dovecot]:
    with Dovecot(oauth2_introspection_url=provider.introspection_url) as dc:
        yield dc


@pytest.fixture
def token_proxy(provider: OAuthProvider) -> Iterator[TcpProxy]:
    """popgate's way to the provider, to cut (Dovecot keeps introspecting directly: a mailbox
    provider validates its tokens whatever happens between popgate and the token endpoint)."""
    with TcpProxy("127.0.0.1", provider.port) as proxy:
        yield proxy


@pytest.fixture
def tokens(provider: OAuthProvider, token_proxy: TcpProxy) -> ProviderTokens:
    return ProviderTokens(provider, f"http://127.0.0.1:{token_proxy.port}/token")


_users = iter(range(1, 10_000))


@pytest.fixture
def user(oauth_dovecot: Dovecot, tokens: ProviderTokens) -> str:
    name = f"oauth{next(_users)}"
    oauth_dovecot.add_user(name, "unusable-upstream-password")
    with oauth_dovecot.imap_as_master(name) as conn:
        conn.append("INBOX", None, None, messages.plain("hello", "body\n"))
    tokens.login(name, "device-secret")
    return name


def settings(dc: Dovecot) -> ImapUpstream:
    return ImapUpstream(
        host=dc.host,
        port=dc.imap_port,
        security="starttls",
        ca_file=dc.ca_file,
        auth="oauth2",
    )


def logins(dc: Dovecot, tokens: ProviderTokens, mechanism: str = "xoauth2") -> UpstreamLogins:
    return UpstreamLogins(reactor, settings(dc), tokens, mechanism)


async def messages_in_inbox(account: ImapAccount) -> int:
    try:
        return (await account.examine("INBOX")).exists
    finally:
        await account.logout()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
@pytest_twisted.ensureDeferred
async def test_device_login_with_the_users_token(
    oauth_dovecot: Dovecot, tokens: ProviderTokens, user: str, mechanism: str
) -> None:
    account = await logins(oauth_dovecot, tokens, mechanism).device(user, "device-secret", None)
    assert await messages_in_inbox(account) == 1
    assert f"user=<{user}>, method={mechanism.upper()}" in oauth_dovecot.log_text()


@pytest_twisted.ensureDeferred
async def test_the_upstream_password_is_refused(oauth_dovecot: Dovecot, user: str) -> None:
    """The fixture is what it claims: a password does not open the mailbox."""
    plain = ImapUpstream(
        host=oauth_dovecot.host,
        port=oauth_dovecot.imap_port,
        security="starttls",
        ca_file=oauth_dovecot.ca_file,
    )
    with pytest.raises(LoginRejected):
        await ImapAccount.open(reactor, plain, user, "unusable-upstream-password")


@pytest_twisted.ensureDeferred
async def test_wrong_device_password_never_reaches_the_provider(
    oauth_dovecot: Dovecot, provider: OAuthProvider, tokens: ProviderTokens, user: str
) -> None:
    before = provider.requests
    with pytest.raises(DevicePasswordRejected):
        await logins(oauth_dovecot, tokens).device(user, "device-secreT", None)
    assert provider.requests == before


@pytest_twisted.ensureDeferred
async def test_a_token_the_server_refuses_is_refreshed_once(
    oauth_dovecot: Dovecot, provider: OAuthProvider, tokens: ProviderTokens, user: str
) -> None:
    first = await tokens.access_token(user)
    provider.expire_access_tokens(user)  # dead before its cached lifetime says so
    refreshes = provider.count("refresh_token")
    account = await logins(oauth_dovecot, tokens).device(user, "device-secret", None)
    assert await messages_in_inbox(account) == 1
    assert tokens.forgotten == [user]
    assert provider.count("refresh_token") == refreshes + 1
    assert tokens.cached[user] != first


@pytest_twisted.ensureDeferred
async def test_a_refused_token_is_told_apart_by_the_error_challenge(
    oauth_dovecot: Dovecot, user: str
) -> None:
    for mechanism in ("xoauth2", "oauthbearer"):
        with pytest.raises(TokenRejected):
            await ImapAccount.open_oauth(
                reactor, settings(oauth_dovecot), user, "not-a-live-token", mechanism
            )


@pytest_twisted.ensureDeferred
async def test_revoked_grant(
    oauth_dovecot: Dovecot, provider: OAuthProvider, tokens: ProviderTokens, user: str
) -> None:
    provider.revoke(user)
    with pytest.raises(GrantRevoked):
        await logins(oauth_dovecot, tokens).device(user, "device-secret", None)
    tokens.passwords["nogrant"] = "pw"  # a device password, but no grant (removed)
    with pytest.raises(NoGrant):
        await logins(oauth_dovecot, tokens).device("nogrant", "pw", None)


@pytest_twisted.ensureDeferred
async def test_provider_unreachable_but_a_cached_token_still_works(
    oauth_dovecot: Dovecot, tokens: ProviderTokens, token_proxy: TcpProxy, user: str
) -> None:
    await tokens.access_token(user)  # cached, unexpired
    token_proxy.refuse = True
    account = await logins(oauth_dovecot, tokens).without_device(user)
    assert await messages_in_inbox(account) == 1
    tokens.cached.clear()  # now a refresh is needed, and the provider cannot be reached
    with pytest.raises(ProviderUnavailable):
        await logins(oauth_dovecot, tokens).device(user, "device-secret", None)


@pytest_twisted.ensureDeferred
async def test_no_token_in_logs(
    oauth_dovecot: Dovecot,
    tokens: ProviderTokens,
    user: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens.cached[user] = "stale-token-value"
    account = await logins(oauth_dovecot, tokens).device(user, "device-secret", None)
    await messages_in_inbox(account)
    logged = caplog.text + oauth_dovecot.log_text()
    for secret in ("stale-token-value", tokens.cached[user], tokens.refresh_tokens[user]):
        assert secret not in logged
    assert "device-secret" not in logged


# --------------------------------------------------------------------- the SMTP relay
@pytest.fixture(scope="module")
def relay_stack(provider: OAuthProvider) -> Iterator[tuple[Dovecot, Postfix]]:
    """Postfix asking Dovecot's oauth2 passdb (the same introspection) to check AUTH, and
    delivering to Dovecot over LMTP."""
    with (
        Dovecot(
            oauth2_introspection_url=provider.introspection_url, auth_port=True, lmtp=True
        ) as dc,
        Postfix(
            lmtp=(dc.host, dc.lmtp_port), domains=["example.org"], sasl=(dc.host, dc.auth_port)
        ) as mta,
    ):
        yield dc, mta


def relay_settings(mta: Postfix) -> SmtpUpstream:
    return SmtpUpstream(host=mta.host, port=mta.port, security="none", auth="oauth2")


async def relay_one(relay: Relay, user: str, subject: str) -> list[Reply]:
    session = relay.session()
    try:
        return [
            await session.mail(user, "", f"{user}@example.org", []),
            await session.rcpt(f"{user}@example.org", False),
            await session.data(messages.plain(subject, "via the relay\n")),
        ]
    finally:
        await session.quit()


def wait_delivered(dc: Dovecot, user: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        with dc.imap_as_master(user) as conn:
            if int(conn.select(readonly=True)[1][0] or 0) >= count:
                return
        assert time.monotonic() < deadline, "not delivered within 30 s"
        time.sleep(0.1)  # polling the mailbox for an event that has a deadline


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_relay_logs_in_with_the_token_and_refreshes_a_refused_one(
    relay_stack: tuple[Dovecot, Postfix],
    provider: OAuthProvider,
    tokens: ProviderTokens,
    mechanism: str,
) -> None:
    dc, mta = relay_stack
    user = f"relay{next(_users)}"
    dc.add_user(user, "unusable")
    tokens.login(user, "device-secret")
    relay = Relay(relay_settings(mta), "popgate.test", tokens, mechanism)
    replies = asyncio.run(relay_one(relay, user, "first"))
    assert [r.code for r in replies] == [250, 250, 250]
    assert f"sasl_method={mechanism.upper()}, sasl_username={user}" in mta.log_text()
    provider.expire_access_tokens(user)  # the cached token dies early
    replies = asyncio.run(relay_one(relay, user, "second"))
    assert [r.code for r in replies] == [250, 250, 250]
    assert tokens.forgotten == [user]
    wait_delivered(dc, user, 2)


def test_relay_with_a_revoked_grant_is_a_temporary_failure_and_logged(
    relay_stack: tuple[Dovecot, Postfix],
    provider: OAuthProvider,
    tokens: ProviderTokens,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dc, mta = relay_stack
    user = f"relay{next(_users)}"
    dc.add_user(user, "unusable")
    tokens.login(user, "device-secret")
    provider.revoke(user)
    relay = Relay(relay_settings(mta), "popgate.test", tokens, "xoauth2")
    with pytest.raises(RelayUnavailable) as caught:
        asyncio.run(relay_one(relay, user, "never"))
    assert caught.value.reply.code == 451
    assert f"OAuth grant revoked or expired: {user}: invalid_grant" in caplog.text
