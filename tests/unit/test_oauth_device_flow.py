"""The RFC 8628 device flow as a state machine, and its driver on a Clock: intervals, slow_down,
expiry, denial and unreachable polls, with no network and no real time."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gateway.config import OAuth2Settings
from gateway.oauth.login import run_device_flow
from gateway.oauth.protocol import (
    DeviceAuthorization,
    DeviceFlow,
    DeviceFlowFailed,
    ProviderDown,
    ProviderRefused,
    TokenResponse,
    parse_device_authorization,
    parse_token_response,
    refresh_request,
)

SETTINGS = OAuth2Settings(
    device_authorization_url="https://idp.test/device",
    token_url="https://idp.test/token",
    client_id="cid",
    scopes=("mail", "offline_access"),
)
TOKENS = {"access_token": "AT", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "RT"}


def answer(status: int, **fields: Any) -> tuple[int, bytes]:
    return status, json.dumps(fields).encode()


def authorization(interval: float = 5, expires_in: float = 900) -> DeviceAuthorization:
    return DeviceAuthorization("DC", "ABCD-EFGH", "https://idp.test/d", "", expires_in, interval)


# ------------------------------------------------------------------- parsing
def test_device_authorization_answer_microsoft_and_google_shapes() -> None:
    ms = parse_device_authorization(
        *answer(
            200,
            device_code="DC",
            user_code="U1",
            verification_uri="https://microsoft.com/devicelogin",
            expires_in=900,
            interval=5,
            message="To sign in ...",
        )
    )
    assert (ms.verification_uri, ms.expires_in, ms.interval) == (
        "https://microsoft.com/devicelogin",
        900.0,
        5.0,
    )
    google = parse_device_authorization(
        *answer(
            200,
            device_code="DC",
            user_code="U2",
            verification_url="https://www.google.com/device",
            expires_in="1800",
        )
    )
    assert google.verification_uri == "https://www.google.com/device"
    assert google.interval == 5.0  # RFC 8628 3.2: absent means 5
    assert google.expires_in == 1800.0


def test_token_answers_errors_and_outages() -> None:
    tokens = parse_token_response(*answer(200, **TOKENS))
    assert (tokens.access_token, tokens.refresh_token, tokens.expires_in) == ("AT", "RT", 3600)
    assert "AT" not in repr(tokens) and "RT" not in repr(tokens)
    kept = parse_token_response(*answer(200, access_token="AT2", token_type="Bearer"))
    assert kept.refresh_token == "" and kept.expires_in == 3600.0  # Google keeps its RT
    with pytest.raises(ProviderRefused) as refused:
        parse_token_response(
            *answer(400, error="invalid_grant", error_description="AADSTS70000: revoked\nTrace")
        )
    assert (refused.value.error, refused.value.description) == (
        "invalid_grant",
        "AADSTS70000: revoked",
    )
    for status, body in [(503, b"<html>busy</html>"), (200, b"[]"), (500, b'{"error":"x"}')]:
        with pytest.raises(ProviderDown):
            parse_token_response(status, body)
    with pytest.raises(ProviderDown):
        parse_token_response(*answer(200, access_token="AT", token_type="mac"))


def test_refresh_request_carries_client_and_scopes() -> None:
    body = refresh_request(SETTINGS, "R T&x").decode()
    assert body == (
        "grant_type=refresh_token&refresh_token=R+T%26x&client_id=cid&scope=mail+offline_access"
    )


# ------------------------------------------------------------------- the state machine
def test_polls_at_the_interval_and_slow_down_adds_five_seconds() -> None:
    flow = DeviceFlow(authorization(interval=5), now=100)
    assert flow.next_poll_in(100) == 5
    assert flow.received(*answer(400, error="authorization_pending"), now=105) is None
    assert flow.next_poll_in(105) == 5
    assert flow.received(*answer(400, error="slow_down"), now=110) is None
    assert (flow.interval, flow.next_poll_in(110)) == (10, 10)
    assert flow.received(*answer(400, error="slow_down"), now=120) is None
    assert flow.next_poll_in(120) == 15  # and it stays: "this and all subsequent requests"
    tokens = flow.received(*answer(200, **TOKENS), now=135)
    assert isinstance(tokens, TokenResponse) and flow.polls == 4


def test_denied_and_expired_and_other_errors_end_the_flow() -> None:
    flow = DeviceFlow(authorization(), now=0)
    with pytest.raises(DeviceFlowFailed) as denied:
        flow.received(*answer(400, error="access_denied"), now=5)
    assert denied.value.reason == "access_denied"
    flow = DeviceFlow(authorization(), now=0)
    with pytest.raises(DeviceFlowFailed) as expired:
        flow.received(*answer(400, error="expired_token"), now=5)
    assert expired.value.reason == "expired_token"
    flow = DeviceFlow(authorization(), now=0)
    with pytest.raises(DeviceFlowFailed) as other:
        flow.received(*answer(400, error="invalid_client", error_description="AADSTS7000218"), 5)
    assert other.value.reason == "invalid_client" and "AADSTS7000218" in str(other.value)


def test_expiry_is_checked_before_polling() -> None:
    flow = DeviceFlow(authorization(interval=5, expires_in=12), now=0)
    assert flow.next_poll_in(0) == 5
    flow.received(*answer(400, error="authorization_pending"), now=5)
    assert flow.next_poll_in(5) == 5
    flow.received(*answer(400, error="slow_down"), now=10)  # next poll at 20 > 12
    with pytest.raises(DeviceFlowFailed) as expired:
        flow.next_poll_in(10)
    assert expired.value.reason == "expired_token"


def test_unreachable_polls_back_off_then_give_up() -> None:
    flow = DeviceFlow(authorization(interval=1, expires_in=10_000), now=0)
    now = 0.0
    for expected_interval in (6, 11, 16):
        now += flow.next_poll_in(now)
        flow.unreachable(now)
        assert flow.interval == expected_interval
    flow.received(*answer(503), now=now + flow.next_poll_in(now))  # 5xx counts too
    assert flow.interval == 21
    # an answer resets the count
    flow.received(*answer(400, error="authorization_pending"), now=200)
    for _ in range(4):
        flow.unreachable(300)
    with pytest.raises(DeviceFlowFailed) as gave_up:
        flow.unreachable(400)
    assert gave_up.value.reason == "unreachable"


# ------------------------------------------------------------------- the driver on a Clock
class ScriptedProvider:
    """The token endpoint as a list of answers; records when each poll came."""

    def __init__(self, clock: Clock, answers: list[tuple[int, bytes] | Exception]) -> None:
        self.clock = clock
        self.answers = answers
        self.polled_at: list[float] = []

    def post(self, url: str, body: bytes) -> Deferred[tuple[int, bytes]]:
        assert url == SETTINGS.token_url and b"device_code=DC" in body
        self.polled_at.append(self.clock.seconds())
        result = self.answers.pop(0)
        return fail(result) if isinstance(result, Exception) else succeed(result)


def drive(clock: Clock, provider: ScriptedProvider, auth: DeviceAuthorization) -> Callable[[], Any]:
    d = Deferred.fromCoroutine(run_device_flow(clock, provider.post, SETTINGS, auth))
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(2000):
        if results:
            break
        clock.advance(0.5)
    assert results, "the flow did not finish"
    return lambda: results[0]


def test_driver_waits_the_interval_between_polls_and_after_slow_down() -> None:
    clock = Clock()
    provider = ScriptedProvider(
        clock,
        [
            answer(400, error="authorization_pending"),
            answer(400, error="slow_down"),
            ProviderDown("connection refused"),
            answer(400, error="authorization_pending"),
            answer(200, **TOKENS),
        ],
    )
    result = drive(clock, provider, authorization(interval=5))()
    tokens, flow = result
    assert tokens.access_token == "AT"
    # 5, +5, then slow_down: 10, unreachable: +15, then 15
    assert provider.polled_at == [5.0, 10.0, 20.0, 35.0, 50.0]
    assert flow.slow_downs == 1


def test_driver_stops_at_expiry_without_polling_after_it() -> None:
    clock = Clock()
    provider = ScriptedProvider(clock, [answer(400, error="authorization_pending")] * 10)
    failure = drive(clock, provider, authorization(interval=5, expires_in=17))()
    assert failure.check(DeviceFlowFailed) and failure.value.reason == "expired_token"
    assert provider.polled_at == [5.0, 10.0, 15.0]


def test_driver_reports_denial() -> None:
    clock = Clock()
    provider = ScriptedProvider(
        clock, [answer(400, error="authorization_pending"), answer(400, error="access_denied")]
    )
    failure = drive(clock, provider, authorization(interval=2))()
    assert failure.check(DeviceFlowFailed) and failure.value.reason == "access_denied"
    assert provider.polled_at == [2.0, 4.0]
