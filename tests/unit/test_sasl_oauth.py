"""Client side of XOAUTH2 and OAUTHBEARER: exact bytes, and the error challenge told apart."""

from __future__ import annotations

import base64

import pytest

from gateway.proto import sasl


def test_xoauth2_initial_response_is_googles_example() -> None:
    # https://developers.google.com/gmail/imap/xoauth2-protocol, "The SASL XOAUTH2 Mechanism"
    raw = sasl.xoauth2_response(
        "someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    )
    assert raw == (
        b"user=someuser@example.com\x01auth=Bearer "
        b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    )
    assert base64.b64encode(raw) == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52"
        b"YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )


def test_oauthbearer_initial_response_is_rfc7628_example() -> None:
    # RFC 7628 4.1 (with the host and port the example carries)
    raw = sasl.oauthbearer_response(
        "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==", "server.example.com", 143
    )
    assert raw == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    assert base64.b64encode(raw) == (
        b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9"
        b"QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
    )


def test_oauthbearer_without_host_and_escaped_authzid() -> None:
    raw = sasl.oauthbearer_response("a,b=c", "tok")
    assert raw == b"n,a=a=2Cb=3Dc,\x01auth=Bearer tok\x01\x01"


def test_mechanism_names_any_case() -> None:
    assert sasl.oauth_response("xoauth2", "u", "t") == b"user=u\x01auth=Bearer t\x01\x01"
    assert sasl.oauth_response("OAuthBearer", "u", "t") == b"n,a=u,\x01auth=Bearer t\x01\x01"
    with pytest.raises(ValueError):
        sasl.oauth_response("PLAIN", "u", "t")


@pytest.mark.parametrize("token", ["", "a b", "a\x01b", "tok\r\nA1 LOGOUT", "é"])
def test_a_token_that_would_break_the_framing_is_refused_without_echo(token: str) -> None:
    with pytest.raises(sasl.UnusableCredential) as caught:
        sasl.xoauth2_response("u", token)
    if token:
        assert token not in str(caught.value)
    with pytest.raises(sasl.UnusableCredential):
        sasl.oauthbearer_response("u", token)


@pytest.mark.parametrize("user", ["", "a\x01b", "a\r\nb"])
def test_a_user_with_control_characters_is_refused(user: str) -> None:
    with pytest.raises(sasl.UnusableCredential):
        sasl.xoauth2_response(user, "tok")
    with pytest.raises(sasl.UnusableCredential):
        sasl.oauthbearer_response(user, "tok")


def test_error_replies() -> None:
    assert sasl.oauth_error_reply("XOAUTH2") == b""
    assert sasl.oauth_error_reply("oauthbearer") == b"\x01"


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.mark.parametrize(
    ("challenge", "status", "rejected"),
    [
        # Google's documented XOAUTH2 error
        (
            b'{"status":"401","schemes":"bearer mac","scope":"https://mail.google.com/"}',
            "401",
            True,
        ),
        (b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}', "400", True),
        # RFC 7628 3.2.2 / Dovecot
        (b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}', "invalid_token", True),
        (b'{"status":"insufficient_scope","scope":"imap"}', "insufficient_scope", False),
        (b'{"status":"403"}', "403", False),
        (b'{"status": 401}', "401", True),
        (b"[1, 2]", "", False),
        (b"not json", "", False),
    ],
)
def test_error_challenge(challenge: bytes, status: str, rejected: bool) -> None:
    failure = sasl.parse_oauth_challenge(_b64(challenge))
    assert failure.status == status
    assert failure.token_rejected is rejected


def test_error_challenge_keeps_scope_and_accepts_str() -> None:
    text = _b64(b'{"status":"invalid_token","scope":"mail"}').decode()
    assert sasl.parse_oauth_challenge(text) == sasl.OAuthFailure("invalid_token", "mail")


def test_error_challenge_not_base64_or_huge() -> None:
    assert sasl.parse_oauth_challenge(b"%%%") == sasl.OAuthFailure("")
    huge = _b64(b'{"status":"invalid_token","x":"' + b"a" * 20000 + b'"}')
    assert sasl.parse_oauth_challenge(huge) == sasl.OAuthFailure("")
